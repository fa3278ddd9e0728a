//! The file-system workload of `make bench`: a busybox shell script run inside a container
//! (its root file system: virtio-fs under Carapace, the host's overlayfs under runc) that
//! prints timestamps from `/proc/uptime` (busybox `date` has no sub-second format; reading
//! uptime is a shell builtin, so no process start is timed), and its parser. When the image
//! has `/carapace-fsio` (a static program of carapace-test-programs: busybox has no fio), the
//! script also runs 4 KiB random writes and reads with it.

use super::parse::ParseError;

/// MiB written and read sequentially.
pub const SEQ_MIB: u32 = 32;
/// Files created, then listed with their attributes, then removed.
pub const META_FILES: u32 = 500;
/// Where the random-I/O program is in the image.
pub const FSIO_PATH: &str = "/carapace-fsio";
/// The random-I/O file's size (MiB) and the number of 4 KiB writes, then reads.
pub const RAND_MIB: u32 = 16;
/// See [`RAND_MIB`].
pub const RAND_OPS: u32 = 2000;

/// The script, for `sh -c`.
pub fn script() -> String {
    format!(
        "t() {{ read u _ < /proc/uptime; echo \"FSBENCH $1 $u\"; }}; set -e; t start; \
         dd if=/dev/zero of=/fsbench.dat bs=1M count={SEQ_MIB} conv=fsync 2>/dev/null; t write; \
         dd if=/fsbench.dat of=/dev/null bs=1M 2>/dev/null; t read; \
         mkdir /fsmeta; cd /fsmeta; i=0; \
         while [ $i -lt {META_FILES} ]; do : > f$i; i=$((i+1)); done; \
         ls -l > /dev/null; rm -f f*; t meta; \
         if [ -x {FSIO_PATH} ]; then {FSIO_PATH} /fsbench.rand {RAND_MIB} {RAND_OPS}; fi"
    )
}

/// One run's results.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FsResult {
    /// Sequential write with fsync, MiB/s.
    pub seq_write_mib_s: f64,
    /// Sequential read of the file just written, MiB/s.
    pub seq_read_mib_s: f64,
    /// Metadata operations (create, stat, unlink per file) per second.
    pub metadata_ops_s: f64,
    /// 4 KiB random writes (then one fsync) per second, when the image has the program.
    pub rand_write_iops: Option<f64>,
    /// 4 KiB random reads per second, likewise.
    pub rand_read_iops: Option<f64>,
}

/// Parses the script's output (other lines are ignored). A phase that took less than the
/// clock's 10 ms resolution counts as 10 ms, so a rate is never infinite.
pub fn parse(stdout: &str) -> Result<FsResult, ParseError> {
    let stamp = |phase: &'static str| -> Result<f64, ParseError> {
        let line = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("FSBENCH {phase} ")))
            .ok_or(ParseError::NoKey {
                file: "fs workload output",
                key: phase,
            })?;
        line.trim().parse().map_err(|_| ParseError::BadLine {
            file: "fs workload output",
            line: line.to_owned(),
        })
    };
    let (start, write, read, meta) = (
        stamp("start")?,
        stamp("write")?,
        stamp("read")?,
        stamp("meta")?,
    );
    let secs = |a: f64, b: f64| (b - a).max(0.01);
    let iops = |key: &'static str| -> Result<Option<f64>, ParseError> {
        let Some(v) = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("FSIO {key} ")))
        else {
            return Ok(None);
        };
        match v.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(ParseError::BadLine {
                file: "fs workload output",
                line: v.to_owned(),
            }),
        }
    };
    Ok(FsResult {
        seq_write_mib_s: f64::from(SEQ_MIB) / secs(start, write),
        seq_read_mib_s: f64::from(SEQ_MIB) / secs(write, read),
        metadata_ops_s: f64::from(3 * META_FILES) / secs(read, meta),
        rand_write_iops: iops("rand_write_iops")?,
        rand_read_iops: iops("rand_read_iops")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_timestamps_into_rates() {
        let out = "noise\nFSBENCH start 100.00\nFSBENCH write 102.00\r\nFSBENCH read 102.50\n\
                   FSBENCH meta 105.00\n";
        let r = parse(out).expect("parse");
        assert_eq!(r.seq_write_mib_s, f64::from(SEQ_MIB) / 2.0);
        assert_eq!(r.seq_read_mib_s, f64::from(SEQ_MIB) / 0.5);
        assert_eq!(r.metadata_ops_s, f64::from(3 * META_FILES) / 2.5);
        assert_eq!((r.rand_write_iops, r.rand_read_iops), (None, None));
        let with = format!("{out}FSIO rand_write_iops 812.5\nFSIO rand_read_iops 2000.0\n");
        let r = parse(&with).expect("parse");
        assert_eq!(
            (r.rand_write_iops, r.rand_read_iops),
            (Some(812.5), Some(2000.0))
        );
        assert!(parse(&format!("{out}FSIO rand_read_iops NaN\n")).is_err());
        // same tick: bounded by the clock's resolution, not infinite
        let same = out.replace("102.50", "102.00");
        assert_eq!(
            parse(&same).expect("parse").seq_read_mib_s,
            f64::from(SEQ_MIB) / 0.01
        );
    }

    #[test]
    fn missing_or_bad_stamps_are_errors() {
        assert!(matches!(
            parse("FSBENCH start 1.0\nFSBENCH write 2.0\n"),
            Err(ParseError::NoKey { key: "read", .. })
        ));
        assert!(matches!(
            parse("FSBENCH start x\n"),
            Err(ParseError::BadLine { .. })
        ));
    }

    #[test]
    fn script_times_every_phase() {
        let s = script();
        for phase in ["start", "write", "read", "meta"] {
            assert!(s.contains(&format!("t {phase}")), "{s}");
        }
        assert!(s.contains("conv=fsync"));
        assert!(s.contains(&format!("{FSIO_PATH} /fsbench.rand {RAND_MIB} {RAND_OPS}")));
    }
}
