//! Benchmark reporting: every row compares Carapace with a peer measured in the same run,
//! and the report is written as JSON (latest and a dated copy), a markdown table and an SVG
//! chart of the sampled distributions.

pub mod fsio;
pub mod merge;
pub mod net;
pub mod parse;
pub mod pods;
pub mod timeline;

use serde_json::{Value, json};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// The note every report carries.
pub const LAB_NOTE: &str = "Inside the lab every CPU-bound time is emulated by QEMU TCG \
(10-50x slower than hardware) and every VM exit is expensive: absolute times mean nothing, \
only ratios against the peer measured in the same run carry over. Memory figures are not distorted.";

/// Errors writing, reading or merging reports.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A report file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A report file is not JSON.
    #[error("{path} is not JSON")]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A report file is JSON but not a report.
    #[error("{path} is not a benchmark report")]
    Schema {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong with it.
        #[source]
        source: merge::SchemaError,
    },
    /// Two partial reports (or one twice) carry a row of the same name.
    #[error("row {name} is in both {first} and {second}")]
    DuplicateRow {
        /// The row name.
        name: String,
        /// The file it was first seen in.
        first: PathBuf,
        /// The file it was seen in again.
        second: PathBuf,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A sample set was empty where a statistic was needed.
    #[error("no samples for {0}")]
    NoSamples(String),
}

/// Measured values of one quantity (e.g. boot times in ms over 10 runs).
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    /// What was measured, e.g. `carapace boot`.
    pub label: String,
    /// Unit, e.g. `ms`.
    pub unit: String,
    /// The values, in measurement order.
    pub values: Vec<f64>,
}

impl Samples {
    /// A sample set.
    pub fn new(label: impl Into<String>, unit: impl Into<String>, values: Vec<f64>) -> Self {
        Self {
            label: label.into(),
            unit: unit.into(),
            values,
        }
    }

    /// The `p`-th percentile (0 < p <= 100) by the nearest-rank method.
    pub fn percentile(&self, p: f64) -> Result<f64, BenchError> {
        if self.values.is_empty() {
            return Err(BenchError::NoSamples(self.label.clone()));
        }
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        Ok(v[rank.min(v.len()) - 1])
    }
}

/// One row of the report: ours against the peer, `ratio = ours / peer`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Row name, e.g. `boot_p50`.
    pub name: String,
    /// Our value.
    pub ours: f64,
    /// The peer's value.
    pub peer: f64,
    /// Who the peer is, e.g. `qemu-microvm`; a fixed published figure says so here.
    pub peer_name: String,
    /// Unit of both values.
    pub unit: String,
    /// The target, if the issue sets one, as text (e.g. `<= 0.7`), reported, not enforced.
    pub target: Option<String>,
}

impl Row {
    /// A row.
    pub fn new(
        name: impl Into<String>,
        ours: f64,
        peer: f64,
        peer_name: impl Into<String>,
        unit: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            ours,
            peer,
            peer_name: peer_name.into(),
            unit: unit.into(),
            target: None,
        }
    }

    /// Sets the target column.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// `ours / peer`, or `None` when the peer is zero.
    pub fn ratio(&self) -> Option<f64> {
        (self.peer != 0.0).then(|| self.ours / self.peer)
    }

    /// The JSON object of this row, with the schema's keys.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "ours": self.ours,
            "peer": self.peer,
            "peer_name": self.peer_name,
            "unit": self.unit,
            "ratio": self.ratio(),
            "target": self.target,
        })
    }
}

/// p50 and p95 rows comparing two sample sets.
pub fn percentile_rows(
    name: &str,
    ours: &Samples,
    peer: &Samples,
    target: Option<&str>,
) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for p in [50.0, 95.0] {
        let mut row = Row::new(
            format!("{name}_p{p}"),
            ours.percentile(p)?,
            peer.percentile(p)?,
            peer.label.clone(),
            ours.unit.clone(),
        );
        if let Some(t) = target {
            row = row.target(t);
        }
        rows.push(row);
    }
    Ok(rows)
}

/// A whole benchmark report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The comparison rows.
    pub rows: Vec<Row>,
    /// Raw distributions for the chart.
    pub samples: Vec<Samples>,
    /// Free-form notes (where it ran, what was skipped and why).
    pub notes: Vec<String>,
}

impl Report {
    /// The JSON document.
    pub fn to_json(&self, date: &str) -> Value {
        json!({
            "date": date,
            "note": LAB_NOTE,
            "notes": self.notes,
            "rows": self.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "samples": self.samples.iter().map(|s| json!({
                "label": s.label, "unit": s.unit, "values": s.values
            })).collect::<Vec<_>>(),
        })
    }

    /// The markdown table.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| row | ours | peer | peer name | unit | ratio (ours/peer) | target |\n|---|---:|---:|---|---|---:|---|\n",
        );
        for r in &self.rows {
            let ratio = r.ratio().map_or("n/a".to_owned(), |x| format!("{x:.2}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                fmt_num(r.ours),
                fmt_num(r.peer),
                r.peer_name,
                r.unit,
                ratio,
                r.target.as_deref().unwrap_or("")
            );
        }
        let _ = write!(s, "\n{LAB_NOTE}\n");
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        s
    }

    /// An SVG strip chart: one lane per sample set (same unit share an axis), each value a
    /// dot, p50 and p95 as ticks.
    pub fn svg(&self) -> String {
        let lane_h = 36.0;
        let (left, width) = (220.0, 520.0);
        let height = 40.0 + lane_h * self.samples.len() as f64 + 30.0;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n",
            left + width + 40.0
        );
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"20\" font-size=\"14\">Start latency distributions (lab: TCG-emulated, compare ratios)</text>"
        );
        for (i, smp) in self.samples.iter().enumerate() {
            // one scale per unit, from 0 to the largest value of that unit
            let max = self
                .samples
                .iter()
                .filter(|o| o.unit == smp.unit)
                .flat_map(|o| o.values.iter().copied())
                .fold(0.0_f64, f64::max)
                .max(f64::MIN_POSITIVE);
            let y = 40.0 + lane_h * i as f64 + lane_h / 2.0;
            let x = |v: f64| left + width * v / max;
            let _ = writeln!(
                s,
                "<text x=\"10\" y=\"{:.1}\">{} ({})</text><line x1=\"{left}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ccc\"/>",
                y + 4.0,
                xml_escape(&smp.label),
                xml_escape(&smp.unit),
                left + width
            );
            for v in &smp.values {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#3366cc\" fill-opacity=\"0.6\"/>",
                    x(*v)
                );
            }
            for (p, color) in [(50.0, "#000"), (95.0, "#c33")] {
                if let Ok(v) = smp.percentile(p) {
                    let _ = writeln!(
                        s,
                        "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{2:.1}\" stroke=\"{color}\" stroke-width=\"2\"><title>p{p} {3}</title></line>",
                        x(v),
                        y - 10.0,
                        y + 10.0,
                        fmt_num(v)
                    );
                }
            }
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#666\">{}</text>",
                left + width + 4.0,
                y + 4.0,
                fmt_num(max)
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{left}\" y=\"{:.1}\" fill=\"#666\">dots: runs; black tick: p50; red tick: p95; axis from 0 to the largest value of the unit</text>\n</svg>",
            height - 10.0
        );
        s
    }

    /// Writes `latest.json`, `<date>.json`, `latest.md` and `latest.svg` into `dir`.
    pub fn write(&self, dir: &Path, date: &str) -> Result<Vec<PathBuf>, BenchError> {
        create_dir(dir)?;
        let json = self.json_text(date);
        let files = [
            ("latest.json", json.clone()),
            (&format!("{date}.json") as &str, json),
            ("latest.md", self.markdown()),
            ("latest.svg", self.svg()),
        ]
        .map(|(name, text)| (dir.join(name), text));
        let mut written = Vec::new();
        for (path, text) in files {
            write_file(&path, &text)?;
            written.push(path);
        }
        Ok(written)
    }

    /// Writes the JSON document alone to `path` (a partial report, for
    /// [`merge::merge_files`]), creating its directory.
    pub fn write_partial(&self, path: &Path, date: &str) -> Result<(), BenchError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_dir(dir)?;
        }
        write_file(path, &self.json_text(date))
    }

    fn json_text(&self, date: &str) -> String {
        serde_json::to_string_pretty(&self.to_json(date)).expect("JSON serialises")
    }
}

fn create_dir(dir: &Path) -> Result<(), BenchError> {
    fs::create_dir_all(dir).map_err(|source| BenchError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), BenchError> {
    fs::write(path, text).map_err(|source| BenchError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(label: &str, v: &[f64]) -> Samples {
        Samples::new(label, "ms", v.to_vec())
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = ms("x", &[5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 9.0, 8.0, 7.0, 6.0]);
        assert_eq!(s.percentile(50.0).expect("p50"), 5.0);
        assert_eq!(s.percentile(95.0).expect("p95"), 10.0);
        assert_eq!(s.percentile(10.0).expect("p10"), 1.0);
        assert_eq!(ms("one", &[7.0]).percentile(95.0).expect("p95"), 7.0);
        assert!(matches!(
            ms("none", &[]).percentile(50.0),
            Err(BenchError::NoSamples(_))
        ));
    }

    #[test]
    fn rows_carry_the_schema_and_the_ratio() {
        let ours = ms("carapace-vmm", &[10.0, 20.0, 30.0]);
        let peer = ms("qemu-microvm", &[20.0, 40.0, 60.0]);
        let rows = percentile_rows("boot", &ours, &peer, Some("<= 0.7")).expect("rows");
        assert_eq!(rows.len(), 2);
        let j = rows[0].to_json();
        assert_eq!(j["name"], "boot_p50");
        assert_eq!(j["ours"], 20.0);
        assert_eq!(j["peer"], 40.0);
        assert_eq!(j["peer_name"], "qemu-microvm");
        assert_eq!(j["unit"], "ms");
        assert_eq!(j["ratio"], 0.5);
        assert_eq!(rows[1].name, "boot_p95");
        assert_eq!(
            Row::new("z", 1.0, 0.0, "p", "ms").to_json()["ratio"],
            Value::Null
        );
    }

    #[test]
    fn report_writes_json_dated_copy_markdown_and_svg() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = Report {
            rows: vec![
                Row::new("sandbox_pss", 8.0, 124.2, "kata (published)", "MiB").target("<= 10 MiB"),
            ],
            samples: vec![ms("ours <a>", &[1.0, 2.0]), ms("peer", &[2.0, 4.0])],
            notes: vec!["ran in the lab".into()],
        };
        let files = report.write(dir.path(), "2026-11-21").expect("write");
        assert_eq!(files.len(), 4);
        let latest: Value = serde_json::from_str(
            &fs::read_to_string(dir.path().join("latest.json")).expect("read"),
        )
        .expect("json");
        let dated = fs::read_to_string(dir.path().join("2026-11-21.json")).expect("dated");
        assert_eq!(latest, serde_json::from_str::<Value>(&dated).expect("json"));
        assert_eq!(latest["rows"][0]["name"], "sandbox_pss");
        assert!(
            latest["note"]
                .as_str()
                .expect("note")
                .contains("only ratios")
        );
        let md = fs::read_to_string(dir.path().join("latest.md")).expect("md");
        assert!(
            md.contains("| sandbox_pss | 8 | 124 | kata (published) | MiB | 0.06 | <= 10 MiB |"),
            "{md}"
        );
        let svg = fs::read_to_string(dir.path().join("latest.svg")).expect("svg");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("ours &lt;a&gt;"));
        assert_eq!(svg.matches("<circle").count(), 4);
    }
}
