//! The guest's online vCPUs (SetOnlineCpus): the VMM creates every vCPU the pod's VM may
//! ever use, the kernel starts only `maxcpus=` of them at boot, and the runtime asks for
//! more or fewer as containers join, change and leave. CPU `n` is brought up or down by
//! writing `1` or `0` to `<root>/cpu<n>/online` (root: `/sys/devices/system/cpu`); cpu0 is
//! never taken offline.

use std::path::{Path, PathBuf};

/// Where the kernel shows the CPUs.
pub const SYSFS_CPU_ROOT: &str = "/sys/devices/system/cpu";

/// Largest CPU list the agent reads (`present` is a short range list).
const MAX_LIST: usize = 4096;

/// Errors of [`set_online`].
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The count asked for is out of range.
    #[error("{count} online vCPUs asked for, the guest has 1 to {present}")]
    OutOfRange {
        /// Asked.
        count: u32,
        /// CPUs the guest has (present).
        present: u32,
    },
    /// A sysfs file could not be read or written.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A CPU list in sysfs is not of the form `0-3,5`.
    #[error("{path}: not a CPU list: {text:?}")]
    BadList {
        /// The file.
        path: PathBuf,
        /// What it said (bounded).
        text: String,
    },
}

/// Parses a kernel CPU list (`0-3,5,7-8`, possibly empty) into the CPU numbers, bounded
/// by `limit` entries; `None` when malformed or too long.
pub fn parse_list(text: &str, limit: u32) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    let text = text.trim();
    if text.is_empty() {
        return Some(cpus);
    }
    for part in text.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let n = part.parse::<u32>().ok()?;
                (n, n)
            }
        };
        if hi < lo || hi >= limit {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

fn read_list(path: &Path) -> Result<Vec<u32>, CpuError> {
    let text = std::fs::read_to_string(path).map_err(|source| CpuError::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    // The kernel's NR_CPUS bound is far below this; anything longer is not sysfs's.
    parse_list(&text, 4096)
        .filter(|_| text.len() <= MAX_LIST)
        .ok_or_else(|| CpuError::BadList {
            path: path.to_path_buf(),
            text: text.chars().take(64).collect(),
        })
}

/// Whether CPU `n` is online (cpu0, which has no `online` file when it cannot be
/// unplugged, always is).
fn is_online(root: &Path, n: u32) -> Result<bool, CpuError> {
    let path = root.join(format!("cpu{n}/online"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim() == "1"),
        Err(e) if n == 0 && e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(CpuError::Io {
            op: "reading",
            path,
            source,
        }),
    }
}

fn write_online(root: &Path, n: u32, online: bool) -> Result<(), CpuError> {
    let path = root.join(format!("cpu{n}/online"));
    std::fs::write(&path, if online { "1" } else { "0" }).map_err(|source| CpuError::Io {
        op: if online {
            "bringing online"
        } else {
            "taking offline"
        },
        path,
        source,
    })
}

/// Makes exactly the first `count` present CPUs online (cpu0 included and never taken
/// offline): the missing ones are brought up in ascending order, the extra ones taken down
/// from the highest. Returns how many CPUs are online afterwards.
pub fn set_online(root: &Path, count: u32) -> Result<u32, CpuError> {
    let present = read_list(&root.join("present"))?;
    let n_present = u32::try_from(present.len()).unwrap_or(u32::MAX);
    if count == 0 || count > n_present {
        return Err(CpuError::OutOfRange {
            count,
            present: n_present,
        });
    }
    let (wanted, extra) = present.split_at(count as usize);
    for &n in wanted.iter().filter(|&&n| n != 0) {
        if !is_online(root, n)? {
            write_online(root, n, true)?;
            tracing::info!(cpu = n, "vCPU brought online");
        }
    }
    for &n in extra.iter().rev().filter(|&&n| n != 0) {
        if is_online(root, n)? {
            write_online(root, n, false)?;
            tracing::info!(cpu = n, "vCPU taken offline");
        }
    }
    let mut online = 0;
    for &n in &present {
        if is_online(root, n)? {
            online += 1;
        }
    }
    Ok(online)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/sys/devices/system/cpu` with `present` CPUs, the first `online` of them up;
    /// cpu0 has no `online` file, as on x86 without BOOTPARAM_HOTPLUG_CPU0.
    fn sysfs(present: u32, online: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("present"), format!("0-{}\n", present - 1)).unwrap();
        for n in 0..present {
            let cpu = dir.path().join(format!("cpu{n}"));
            std::fs::create_dir(&cpu).unwrap();
            if n > 0 {
                let v = if n < online { "1\n" } else { "0\n" };
                std::fs::write(cpu.join("online"), v).unwrap();
            }
        }
        dir
    }

    fn states(dir: &Path, present: u32) -> Vec<bool> {
        (0..present).map(|n| is_online(dir, n).unwrap()).collect()
    }

    #[test]
    fn cpu_lists_are_parsed_and_bounded() {
        assert_eq!(parse_list("0-3,5\n", 64), Some(vec![0, 1, 2, 3, 5]));
        assert_eq!(parse_list("0", 64), Some(vec![0]));
        assert_eq!(parse_list("\n", 64), Some(vec![]));
        assert_eq!(parse_list("3-1", 64), None);
        assert_eq!(parse_list("0-64", 64), None);
        assert_eq!(parse_list("a-b", 64), None);
        assert_eq!(parse_list("0,,1", 64), None);
    }

    #[test]
    fn grows_in_order_and_shrinks_from_the_top_never_cpu0() {
        let d = sysfs(4, 1);
        assert_eq!(set_online(d.path(), 3).unwrap(), 3);
        assert_eq!(states(d.path(), 4), [true, true, true, false]);
        assert_eq!(set_online(d.path(), 4).unwrap(), 4);
        assert_eq!(set_online(d.path(), 1).unwrap(), 1);
        assert_eq!(states(d.path(), 4), [true, false, false, false]);
        // asking for what is there writes nothing and says so
        assert_eq!(set_online(d.path(), 1).unwrap(), 1);
    }

    #[test]
    fn out_of_range_counts_are_refused_before_any_write() {
        let d = sysfs(2, 2);
        for count in [0, 3, u32::MAX] {
            match set_online(d.path(), count) {
                Err(CpuError::OutOfRange { count: c, present }) => {
                    assert_eq!((c, present), (count, 2));
                }
                other => panic!("{count}: {other:?}"),
            }
        }
        assert_eq!(states(d.path(), 2), [true, true]);
    }

    #[test]
    fn a_malformed_present_list_or_missing_cpu_is_an_error() {
        let d = sysfs(2, 1);
        std::fs::write(d.path().join("present"), "zero").unwrap();
        assert!(matches!(
            set_online(d.path(), 1),
            Err(CpuError::BadList { .. })
        ));
        std::fs::write(d.path().join("present"), "0-2").unwrap();
        let err = set_online(d.path(), 3).unwrap_err();
        assert!(
            matches!(&err, CpuError::Io { path, .. } if path.ends_with("cpu2/online")),
            "{err:?}"
        );
    }
}
