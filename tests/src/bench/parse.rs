//! Parsing for the benchmark driver: `carapace-vmm-bench`'s `vmm-bench.json`, PSS from
//! `/proc/<pid>/smaps_rollup` and `/proc/<pid>/smaps`, and the density stop rule.

use super::{Row, Samples, percentile_rows};
use serde_json::Value;

/// Errors parsing benchmark inputs.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The document is not JSON.
    #[error("vmm-bench.json is not JSON")]
    Json(#[source] serde_json::Error),
    /// A field is missing or has the wrong type.
    #[error("vmm-bench.json: {0} missing or not of the expected type")]
    Field(String),
    /// A `/proc` file has no line with this key.
    #[error("{file}: no `{key}` line")]
    NoKey {
        /// Which file.
        file: &'static str,
        /// Which key.
        key: &'static str,
    },
    /// A value in a `/proc` file is not a number.
    #[error("{file}: `{line}` is not `<key>: <number> kB`")]
    BadLine {
        /// Which file.
        file: &'static str,
        /// The line.
        line: String,
    },
    /// A statistic over an empty sample set.
    #[error(transparent)]
    Bench(#[from] super::BenchError),
}

/// The metric names `carapace-vmm-bench` writes, and the row names they become.
const VMM_METRICS: [(&str, &str); 2] = [
    ("start -> guest ready line", "boot"),
    ("start -> first vsock reply", "boot_vsock_reply"),
];
const VMM_PSS_METRIC: &str = "VMM PSS beyond guest RAM";

fn samples_of(row: &Value, side: &str, metric: &str) -> Result<Vec<f64>, ParseError> {
    row[side]["samples"]
        .as_array()
        .ok_or_else(|| ParseError::Field(format!("rows[{metric}].{side}.samples")))?
        .iter()
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| ParseError::Field(format!("rows[{metric}].{side}.samples[]")))
        })
        .collect()
}

/// Turns `carapace-vmm-bench`'s JSON into report rows (boot and first-vsock-reply p50/p95,
/// VMM PSS beyond guest RAM p50) and the boot distributions for the chart.
pub fn vmm_bench(json: &str) -> Result<(Vec<Row>, Vec<Samples>), ParseError> {
    let doc: Value = serde_json::from_str(json).map_err(ParseError::Json)?;
    let rows = doc["rows"]
        .as_array()
        .ok_or_else(|| ParseError::Field("rows".into()))?;
    let find = |metric: &str| {
        rows.iter()
            .find(|r| r["metric"] == metric)
            .ok_or_else(|| ParseError::Field(format!("rows[metric == {metric:?}]")))
    };
    let (mut out, mut samples) = (Vec::new(), Vec::new());
    for (metric, name) in VMM_METRICS {
        let r = find(metric)?;
        let ours = Samples::new(
            format!("carapace-vmm {name}"),
            "ms",
            samples_of(r, "ours", metric)?,
        );
        let peer = Samples::new("qemu-microvm", "ms", samples_of(r, "qemu_microvm", metric)?);
        let target = (name == "boot").then_some("<= 0.7");
        out.extend(percentile_rows(name, &ours, &peer, target)?);
        if name == "boot" {
            samples.push(ours);
            samples.push(Samples::new("qemu-microvm boot", "ms", peer.values));
        }
    }
    let r = find(VMM_PSS_METRIC)?;
    let ours = Samples::new(
        "carapace-vmm",
        "KiB",
        samples_of(r, "ours", VMM_PSS_METRIC)?,
    );
    let peer = Samples::new(
        "qemu-microvm",
        "KiB",
        samples_of(r, "qemu_microvm", VMM_PSS_METRIC)?,
    );
    out.push(Row::new(
        "vmm_pss_beyond_guest_ram_p50",
        ours.percentile(50.0)?,
        peer.percentile(50.0)?,
        "qemu-microvm",
        "KiB",
    ));
    Ok((out, samples))
}

fn kb_value(line: &str, file: &'static str) -> Result<u64, ParseError> {
    let mut w = line.split_whitespace();
    let _key = w.next();
    w.next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ParseError::BadLine {
            file,
            line: line.to_owned(),
        })
}

/// The `Pss:` figure (KiB) of a `/proc/<pid>/smaps_rollup`.
pub fn smaps_rollup_pss_kib(text: &str) -> Result<u64, ParseError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .ok_or(ParseError::NoKey {
            file: "smaps_rollup",
            key: "Pss",
        })?;
    kb_value(line, "smaps_rollup")
}

/// PSS (KiB) of a process's largest mapping, from `/proc/<pid>/smaps`: for a VMM that is
/// the guest RAM, so this is the guest memory actually touched (and not shared).
pub fn largest_mapping_pss_kib(text: &str) -> Result<u64, ParseError> {
    let (mut size, mut best_size, mut best_pss) = (0u64, 0u64, None);
    for line in text.lines() {
        if line.starts_with("Size:") {
            size = kb_value(line, "smaps")?;
        } else if line.starts_with("Pss:") {
            let pss = kb_value(line, "smaps")?;
            if best_pss.is_none() || size > best_size {
                best_size = size;
                best_pss = Some(pss);
            }
        }
    }
    best_pss.ok_or(ParseError::NoKey {
        file: "smaps",
        key: "Pss",
    })
}

/// The summed PSS (KiB) of the mappings in an smaps text whose header line (address range,
/// permissions, ..., path) ends with `name`, e.g. the guest-RAM memfd that the VMM and the
/// vhost-user fs daemon both map.
pub fn named_mappings_pss_kib(text: &str, name: &str) -> Result<u64, ParseError> {
    let (mut inside, mut total) = (false, 0);
    for line in text.lines() {
        if line.starts_with(|c: char| c.is_ascii_hexdigit()) && line.contains('-') {
            inside = line.trim_end().ends_with(name);
        } else if inside && line.starts_with("Pss:") {
            total += kb_value(line, "smaps")?;
        }
    }
    Ok(total)
}

/// How many start latencies form the density baseline (the first ones; their median).
pub const DENSITY_BASELINE_STARTS: usize = 3;

/// The density rule: how many sandboxes started before the start latency reached
/// `factor` times the baseline, the median (nearest rank) of the first
/// [`DENSITY_BASELINE_STARTS`] starts, which are not themselves judged (one cold or lucky
/// first start does not decide it).
/// `latencies[i]` is the start time of sandbox `i + 1`; the whole run counts when no start
/// crossed the line (the run was bounded).
pub fn started_before_slowdown(latencies: &[f64], factor: f64) -> usize {
    let head = &latencies[..latencies.len().min(DENSITY_BASELINE_STARTS)];
    let Ok(baseline) = Samples::new("density baseline", "ms", head.to_vec()).percentile(50.0)
    else {
        return 0;
    };
    latencies[head.len()..]
        .iter()
        .position(|&t| t >= factor * baseline)
        .map_or(latencies.len(), |i| head.len() + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMM_JSON: &str = r#"{
      "runs": 3, "memory_mib": 256,
      "rows": [
        {"metric": "start -> guest ready line", "unit": "ms",
         "ours": {"p50": 2.0, "p95": 3.0, "samples": [1.0, 2.0, 3.0]},
         "qemu_microvm": {"p50": 4.0, "p95": 6.0, "samples": [6.0, 4.0, 2.0]},
         "ratio_p50": 0.5},
        {"metric": "start -> first vsock reply", "unit": "ms",
         "ours": {"p50": 5.0, "p95": 5.0, "samples": [5.0, 5.0, 5.0]},
         "qemu_microvm": {"p50": 10.0, "p95": 10.0, "samples": [10.0, 10.0, 10.0]},
         "ratio_p50": 0.5},
        {"metric": "VMM PSS beyond guest RAM", "unit": "KiB",
         "ours": {"p50": 2400.0, "p95": 2500.0, "samples": [2400, 2500, 2300]},
         "qemu_microvm": {"p50": 45000.0, "p95": 46000.0, "samples": [45000, 46000, 44000]},
         "ratio_p50": 0.05}
      ]}"#;

    #[test]
    fn vmm_bench_json_becomes_rows_and_samples() {
        let (rows, samples) = vmm_bench(VMM_JSON).expect("parse");
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "boot_p50",
                "boot_p95",
                "boot_vsock_reply_p50",
                "boot_vsock_reply_p95",
                "vmm_pss_beyond_guest_ram_p50"
            ]
        );
        assert_eq!((rows[0].ours, rows[0].peer), (2.0, 4.0));
        assert_eq!(rows[0].ratio(), Some(0.5));
        assert_eq!(rows[0].target.as_deref(), Some("<= 0.7"));
        assert_eq!((rows[1].ours, rows[1].peer), (3.0, 6.0));
        assert_eq!(rows[2].target, None);
        assert_eq!((rows[4].ours, rows[4].peer), (2400.0, 45000.0));
        assert_eq!(rows[4].unit, "KiB");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[1].label, "qemu-microvm boot");
        assert_eq!(samples[1].values, [6.0, 4.0, 2.0]);
    }

    #[test]
    fn vmm_bench_json_errors_name_the_field() {
        assert!(matches!(vmm_bench("nope"), Err(ParseError::Json(_))));
        let e = vmm_bench(r#"{"rows": []}"#).expect_err("no metrics");
        assert!(e.to_string().contains("guest ready line"), "{e}");
        let bad = VMM_JSON.replace("[1.0, 2.0, 3.0]", "[1.0, \"x\"]");
        let e = vmm_bench(&bad).expect_err("bad sample");
        assert!(e.to_string().contains("ours.samples"), "{e}");
        let empty = VMM_JSON.replace("[1.0, 2.0, 3.0]", "[]");
        assert!(matches!(vmm_bench(&empty), Err(ParseError::Bench(_))));
    }

    #[test]
    fn pss_from_smaps_rollup_and_largest_mapping() {
        let rollup = "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0   [rollup]\n\
                      Rss:                3456 kB\nPss:                1234 kB\nPss_Anon: 1000 kB\n";
        assert_eq!(smaps_rollup_pss_kib(rollup).expect("pss"), 1234);
        assert!(matches!(
            smaps_rollup_pss_kib("Rss: 1 kB\n"),
            Err(ParseError::NoKey { key: "Pss", .. })
        ));
        assert!(matches!(
            smaps_rollup_pss_kib("Pss: lots kB\n"),
            Err(ParseError::BadLine { .. })
        ));
        let smaps = "7f00-7f10 rw-p 0 00:00 0\nSize:  64 kB\nRss: 8 kB\nPss:  8 kB\n\
                     7e00-7f00 rw-p 0 00:00 0\nSize: 262144 kB\nRss: 9000 kB\nPss: 9000 kB\n\
                     7d00-7e00 r-xp 0 00:00 0 /bin/vmm\nSize: 2048 kB\nPss: 300 kB\n";
        assert_eq!(largest_mapping_pss_kib(smaps).expect("largest"), 9000);
        assert!(largest_mapping_pss_kib("").is_err());
        let shared = "7c00-7d00 rw-s 0 00:01 5 /memfd:guest-ram (deleted)\nSize: 4 kB\nPss: 1106 kB\n\
                      7e00-7f00 rw-p 0 00:00 0\nSize: 8 kB\nPss: 7 kB\n\
                      7d00-7e00 r-xp 0 00:00 0 /bin/fsd\nPss: 300 kB\n\
                      7f00-8000 rw-s 0 00:01 5 /memfd:guest-ram (deleted)\nPss: 4 kB\n";
        assert_eq!(
            named_mappings_pss_kib(shared, "/memfd:guest-ram (deleted)").expect("named"),
            1110
        );
        assert_eq!(named_mappings_pss_kib(shared, "/bin/vmm").expect("none"), 0);
    }

    #[test]
    fn density_counts_starts_before_the_latency_doubles() {
        assert_eq!(started_before_slowdown(&[], 2.0), 0);
        assert_eq!(started_before_slowdown(&[10.0, 12.0, 15.0], 2.0), 3);
        // baseline = median of the first three (10), so 20 is the first doubled start
        assert_eq!(
            started_before_slowdown(&[10.0, 12.0, 9.0, 20.0, 11.0], 2.0),
            3
        );
        // a fast first start alone does not stop the run
        assert_eq!(started_before_slowdown(&[4.0, 10.0, 10.0, 12.0], 2.0), 4);
        // a cold first start does not hide a later doubling
        assert_eq!(
            started_before_slowdown(&[60.0, 10.0, 11.0, 19.0, 22.0], 2.0),
            4
        );
        assert_eq!(started_before_slowdown(&[10.0], 2.0), 1);
    }
}
