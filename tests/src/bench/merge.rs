//! Reading reports back and merging partial reports: `carapace-bench --only PHASE --partial
//! FILE` writes one phase group's report (the `latest.json` format) so that every group can
//! run in its own lab machine; `carapace-bench --merge FILE...` joins them into one report.
//!
//! Reading is by hand over [`serde_json::Value`] rather than a serde derive: the format is
//! the one [`Report::to_json`] writes (`ratio` is derived from `ours`/`peer`, `note` is the
//! fixed [`LAB_NOTE`](super::LAB_NOTE)), so those keys are accepted and recomputed, and any
//! other key is refused.

use super::{BenchError, Report, Row, Samples};
use carapace_errors::chain;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where a report document does not have the expected shape.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SchemaError {
    /// The offending field, e.g. `rows[2].ours`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn schema(field: impl Into<String>, reason: impl Into<String>) -> SchemaError {
    SchemaError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The object at `at`, refusing keys outside `known`.
fn object<'a>(
    v: &'a Value,
    at: &str,
    known: &[&str],
) -> Result<&'a Map<String, Value>, SchemaError> {
    let m = v.as_object().ok_or_else(|| schema(at, "not an object"))?;
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(schema(format!("{at}.{k}"), "unknown key")),
        None => Ok(m),
    }
}

fn field<'a>(m: &'a Map<String, Value>, at: &str, key: &str) -> Result<&'a Value, SchemaError> {
    m.get(key)
        .ok_or_else(|| schema(format!("{at}.{key}"), "missing"))
}

fn string(v: &Value, at: &str) -> Result<String, SchemaError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| schema(at, "not a string"))
}

/// A number; `null` is read as NaN, which is how [`Report::to_json`] writes NaN.
fn number(v: &Value, at: &str) -> Result<f64, SchemaError> {
    match v {
        Value::Null => Ok(f64::NAN),
        _ => v.as_f64().ok_or_else(|| schema(at, "not a number")),
    }
}

/// The array `m[key]`, each element converted by `f` (given the element's field path).
fn list<T>(
    m: &Map<String, Value>,
    at: &str,
    key: &str,
    f: impl Fn(&Value, &str) -> Result<T, SchemaError>,
) -> Result<Vec<T>, SchemaError> {
    let name = format!("{at}.{key}");
    field(m, at, key)?
        .as_array()
        .ok_or_else(|| schema(&name, "not an array"))?
        .iter()
        .enumerate()
        .map(|(i, v)| f(v, &format!("{name}[{i}]")))
        .collect()
}

fn row(v: &Value, at: &str) -> Result<Row, SchemaError> {
    let m = object(
        v,
        at,
        &[
            "name",
            "ours",
            "peer",
            "peer_name",
            "unit",
            "ratio",
            "target",
        ],
    )?;
    let get = |key| field(m, at, key);
    let sub = |key: &str| format!("{at}.{key}");
    let target = match m.get("target") {
        None | Some(Value::Null) => None,
        Some(t) => Some(string(t, &sub("target"))?),
    };
    Ok(Row {
        name: string(get("name")?, &sub("name"))?,
        ours: number(get("ours")?, &sub("ours"))?,
        peer: number(get("peer")?, &sub("peer"))?,
        peer_name: string(get("peer_name")?, &sub("peer_name"))?,
        unit: string(get("unit")?, &sub("unit"))?,
        target,
    })
}

fn samples(v: &Value, at: &str) -> Result<Samples, SchemaError> {
    let m = object(v, at, &["label", "unit", "values"])?;
    Ok(Samples {
        label: string(field(m, at, "label")?, &format!("{at}.label"))?,
        unit: string(field(m, at, "unit")?, &format!("{at}.unit"))?,
        values: list(m, at, "values", number)?,
    })
}

impl Report {
    /// The report of a document [`Report::to_json`] wrote (its `date` and `note` are not
    /// kept: a written report carries the date it is written and the fixed note).
    pub fn from_json(v: &Value) -> Result<Self, SchemaError> {
        let m = object(v, "report", &["date", "note", "notes", "rows", "samples"])?;
        Ok(Self {
            rows: list(m, "report", "rows", row)?,
            samples: list(m, "report", "samples", samples)?,
            notes: list(m, "report", "notes", string)?,
        })
    }

    /// Reads a report (a partial one or `latest.json`) from `path`.
    pub fn read(path: &Path) -> Result<Self, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| BenchError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&v).map_err(|source| BenchError::Schema {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// What a partial report covers, for notes: its file name without `partial-` and `.json`
/// (`target/bench/partial-pod.json` -> `pod`).
pub fn part_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    stem.strip_prefix("partial-")
        .map(str::to_owned)
        .unwrap_or(stem)
}

/// Merges partial reports in the order given (callers give them in phase order): rows,
/// samples and notes are concatenated, a note repeated word for word (the `ran on kernel`
/// line every run writes) is kept once. A file that cannot be read or parsed becomes the
/// note `<part>: not measured: <why>`; a row name in two places is an error.
pub fn merge_files(paths: &[PathBuf]) -> Result<Report, BenchError> {
    let mut merged = Report::default();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for path in paths {
        let part = match Report::read(path) {
            Ok(r) => r,
            Err(e) => {
                merged
                    .notes
                    .push(format!("{}: not measured: {}", part_name(path), chain(&e)));
                continue;
            }
        };
        for row in &part.rows {
            if let Some(first) = seen.insert(row.name.clone(), path.clone()) {
                return Err(BenchError::DuplicateRow {
                    name: row.name.clone(),
                    first,
                    second: path.clone(),
                });
            }
        }
        merged.rows.extend(part.rows);
        merged.samples.extend(part.samples);
        for note in part.notes {
            if !merged.notes.contains(&note) {
                merged.notes.push(note);
            }
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(rows: &[&str], note: &str) -> Report {
        Report {
            rows: rows
                .iter()
                .map(|n| Row::new(*n, 1.5, 3.0, "runc", "ms").target("<= 3"))
                .collect(),
            samples: vec![Samples::new(
                format!("{note} samples"),
                "ms",
                vec![1.0, 2.5],
            )],
            notes: vec!["ran on kernel x".into(), note.into()],
        }
    }

    /// Writes `partial-<group>.json` with these rows and the note `<group> ran`.
    fn write(dir: &Path, group: &str, rows: &[&str]) -> PathBuf {
        let p = dir.join(format!("partial-{group}.json"));
        part(rows, &format!("{group} ran"))
            .write_partial(&p, "2026-11-21")
            .expect("write partial");
        p
    }

    /// Merges the partials `(group, rows)`, written in that order.
    fn merge_parts(parts: &[(&str, &[&str])]) -> Result<Report, BenchError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths: Vec<PathBuf> = parts
            .iter()
            .map(|(group, rows)| write(dir.path(), group, rows))
            .collect();
        merge_files(&paths)
    }

    #[test]
    fn a_written_report_reads_back_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = part(&["boot_p50", "boot_p95"], "boot note");
        r.rows.push(Row::new("zero_peer", 1.0, 0.0, "p", "KiB"));
        let path = dir.path().join("partial-boot.json");
        r.write_partial(&path, "2026-11-21").expect("write partial");
        assert_eq!(Report::read(&path).expect("read"), r);
        // and through the final files: latest.json is a report too
        r.write(dir.path(), "2026-11-21").expect("write");
        assert_eq!(
            Report::read(&dir.path().join("latest.json")).expect("read"),
            r
        );
    }

    #[test]
    fn merge_keeps_rows_samples_and_notes_in_the_order_given() {
        let m = merge_parts(&[
            ("boot", &["boot_p50"]),
            ("pod", &["pod_start_p50", "pod_start_p95"]),
        ])
        .expect("merge");
        let names: Vec<&str> = m.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["boot_p50", "pod_start_p50", "pod_start_p95"]);
        assert_eq!(m.rows[0].target.as_deref(), Some("<= 3"));
        assert_eq!(m.rows[0].ratio(), Some(0.5));
        assert_eq!(m.samples.len(), 2);
        assert_eq!(m.samples[1].label, "pod ran samples");
        assert_eq!(m.notes, ["ran on kernel x", "boot ran", "pod ran"]);
    }

    #[test]
    fn a_row_in_two_partials_is_an_error_naming_it() {
        let e =
            merge_parts(&[("a", &["density"]), ("b", &["x", "density"])]).expect_err("duplicate");
        assert!(
            matches!(&e, BenchError::DuplicateRow { name, .. } if name == "density"),
            "{e:?}"
        );
        assert!(e.to_string().contains("density"), "{e}");
    }

    #[test]
    fn a_missing_or_broken_partial_becomes_a_note() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = write(dir.path(), "fs", &["fs_seq_read"]);
        let broken = dir.path().join("partial-pod.json");
        std::fs::write(
            &broken,
            "{\"rows\": [], \"notes\": [], \"samples\": [], \"x\": 1}",
        )
        .expect("write");
        let missing = dir.path().join("partial-boot.json");
        let m = merge_files(&[missing, broken, fs]).expect("merge");
        assert_eq!(m.rows.len(), 1);
        assert!(
            m.notes[0].starts_with("boot: not measured: cannot read ")
                && m.notes[0].contains("partial-boot.json"),
            "{:?}",
            m.notes
        );
        assert!(
            m.notes[1].starts_with("pod: not measured: ")
                && m.notes[1].contains("report.x: unknown key"),
            "{:?}",
            m.notes
        );
        assert_eq!(&m.notes[2..], ["ran on kernel x", "fs ran"]);
    }

    #[test]
    fn schema_errors_name_the_field() {
        let v: Value = serde_json::json!({
            "rows": [{"name": "a", "ours": "fast", "peer": 1, "peer_name": "p", "unit": "ms"}],
            "notes": [], "samples": []
        });
        let e = Report::from_json(&v).expect_err("bad number");
        assert_eq!(e.field, "report.rows[0].ours");
        let v: Value = serde_json::json!({"rows": [], "samples": []});
        assert_eq!(
            Report::from_json(&v).expect_err("missing").field,
            "report.notes"
        );
    }
}
