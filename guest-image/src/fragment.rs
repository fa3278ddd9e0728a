//! Kernel config fragments: parsing our fragment, parsing a generated `.config`, and
//! verifying that every option of the fragment ended up in the `.config` as written.
//!
//! Kconfig silently drops an option whose dependencies are not met, so a merge that
//! "succeeds" can still produce a kernel without, say, vsock. [`Fragment::verify`] turns
//! that into an explicit list of mismatches.

use std::collections::BTreeMap;

/// Longest accepted line in a fragment or `.config` (both are small, human-edited files).
const MAX_LINE: usize = 4096;

/// An error in a fragment's text.
#[derive(Debug, thiserror::Error)]
pub enum FragmentError {
    #[error("line {line}: {reason}: {text:?}")]
    Syntax {
        line: usize,
        text: String,
        reason: &'static str,
    },
    #[error("line {line}: {name} is already set on line {first}")]
    Duplicate {
        name: String,
        first: usize,
        line: usize,
    },
    #[error("line {line}: {name}=m asks for a module, but the guest kernel has no modules")]
    Module { name: String, line: usize },
}

/// One option of a fragment. `value` is the text after `=`, or `n` for
/// `# CONFIG_X is not set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    pub value: String,
    pub line: usize,
}

/// A parsed config fragment, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub settings: Vec<Setting>,
}

/// An option of the fragment whose value in the `.config` differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub name: String,
    pub wanted: String,
    /// `None` when the option is absent from the `.config` (its dependencies are unmet).
    pub got: Option<String>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.got {
            Some(got) => write!(f, "{}: wanted {}, got {}", self.name, self.wanted, got),
            None => write!(
                f,
                "{}: wanted {}, absent (dependencies not met)",
                self.name, self.wanted
            ),
        }
    }
}

/// What one line of a fragment or `.config` holds.
enum Line<'a> {
    Blank,
    Set(&'a str, &'a str),
}

fn is_config_name(name: &str) -> bool {
    // Kconfig symbols are upper case by convention, but a few are mixed case.
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

fn classify(text: &str) -> Result<Line<'_>, &'static str> {
    if text.len() > MAX_LINE {
        return Err("line too long");
    }
    let t = text.trim();
    if t.is_empty() {
        return Ok(Line::Blank);
    }
    if let Some(comment) = t.strip_prefix('#') {
        let comment = comment.trim();
        if let Some(name) = comment.strip_suffix(" is not set")
            && is_config_name(name)
        {
            return Ok(Line::Set(name, "n"));
        }
        return Ok(Line::Blank);
    }
    let Some((name, value)) = t.split_once('=') else {
        return Err("expected CONFIG_NAME=value or a # comment");
    };
    if !is_config_name(name) {
        return Err("option name must look like CONFIG_NAME");
    }
    if value.is_empty() {
        return Err("empty value");
    }
    Ok(Line::Set(name, value))
}

impl Fragment {
    /// Parses a fragment: `CONFIG_X=value`, `# CONFIG_X is not set`, comments, blanks.
    /// Modules (`=m`) and duplicate options are errors.
    pub fn parse(text: &str) -> Result<Self, FragmentError> {
        let mut settings: Vec<Setting> = Vec::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let (name, value) = match classify(raw) {
                Ok(Line::Blank) => continue,
                Ok(Line::Set(n, v)) => (n, v),
                Err(reason) => {
                    return Err(FragmentError::Syntax {
                        line,
                        text: raw.chars().take(200).collect(),
                        reason,
                    });
                }
            };
            if value == "m" {
                return Err(FragmentError::Module {
                    name: name.to_owned(),
                    line,
                });
            }
            if let Some(&first) = seen.get(name) {
                return Err(FragmentError::Duplicate {
                    name: name.to_owned(),
                    first,
                    line,
                });
            }
            seen.insert(name.to_owned(), line);
            settings.push(Setting {
                name: name.to_owned(),
                value: value.to_owned(),
                line,
            });
        }
        Ok(Self { settings })
    }

    /// Compares the fragment with a parsed `.config` and returns every option whose value
    /// differs. An option wanted as `n` matches when it is absent.
    pub fn verify(&self, config: &BTreeMap<String, String>) -> Vec<Mismatch> {
        self.settings
            .iter()
            .filter_map(|s| {
                let got = config.get(&s.name);
                let ok = match got {
                    Some(v) => *v == s.value,
                    None => s.value == "n",
                };
                (!ok).then(|| Mismatch {
                    name: s.name.clone(),
                    wanted: s.value.clone(),
                    got: got.cloned(),
                })
            })
            .collect()
    }
}

/// Parses a generated `.config` into option -> value (`n` for `# ... is not set`).
/// Lines it does not understand are ignored: the file is generated by Kconfig.
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| match classify(l) {
            Ok(Line::Set(n, v)) => Some((n.to_owned(), v.to_owned())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_comments_and_not_set() {
        let f = Fragment::parse(
            "# a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=64\nCONFIG_D=\"x y\"\n  # indented comment\n",
        )
        .unwrap();
        let got: Vec<_> = f
            .settings
            .iter()
            .map(|s| (s.name.as_str(), s.value.as_str(), s.line))
            .collect();
        assert_eq!(
            got,
            vec![
                ("CONFIG_A", "y", 3),
                ("CONFIG_B", "n", 4),
                ("CONFIG_C", "64", 5),
                ("CONFIG_D", "\"x y\"", 6)
            ]
        );
    }

    #[test]
    fn rejects_modules_duplicates_and_garbage() {
        assert!(matches!(
            Fragment::parse("CONFIG_A=m\n"),
            Err(FragmentError::Module { line: 1, .. })
        ));
        assert!(matches!(
            Fragment::parse("CONFIG_A=y\n# CONFIG_A is not set\n"),
            Err(FragmentError::Duplicate {
                first: 1,
                line: 2,
                ..
            })
        ));
        assert!(matches!(
            Fragment::parse("CONFIG_A=y\nFOO=y\n"),
            Err(FragmentError::Syntax { line: 2, .. })
        ));
        assert!(matches!(
            Fragment::parse("CONFIG_A\n"),
            Err(FragmentError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            Fragment::parse("CONFIG_A=\n"),
            Err(FragmentError::Syntax { .. })
        ));
    }

    #[test]
    fn verify_reports_dropped_and_changed_options() {
        let f = Fragment::parse(
            "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n# CONFIG_D is not set\nCONFIG_E=64\n",
        )
        .unwrap();
        let cfg = parse_config(
            "#\n# Automatically generated\n#\nCONFIG_A=y\n# CONFIG_D is not set\nCONFIG_E=8\nCONFIG_OTHER=y\n",
        );
        let m = f.verify(&cfg);
        assert_eq!(
            m,
            vec![
                Mismatch {
                    name: "CONFIG_B".into(),
                    wanted: "y".into(),
                    got: None
                },
                Mismatch {
                    name: "CONFIG_E".into(),
                    wanted: "64".into(),
                    got: Some("8".into())
                },
            ]
        );
        assert_eq!(
            m[0].to_string(),
            "CONFIG_B: wanted y, absent (dependencies not met)"
        );
        let wanted_off = Fragment::parse("# CONFIG_X is not set\n").unwrap();
        assert_eq!(
            wanted_off.verify(&parse_config("CONFIG_X=y\n"))[0]
                .got
                .as_deref(),
            Some("y")
        );
    }

    #[test]
    fn our_fragment_parses_and_has_no_modules() {
        let f = Fragment::parse(crate::DEFAULT_FRAGMENT).unwrap();
        assert!(f.settings.len() > 50);
        let get = |n: &str| {
            f.settings
                .iter()
                .find(|s| s.name == n)
                .map(|s| s.value.as_str())
        };
        assert_eq!(get("CONFIG_MODULES"), Some("n"));
        assert_eq!(get("CONFIG_PVH"), Some("y"));
        assert_eq!(get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"), Some("y"));
        assert_eq!(get("CONFIG_X86_IOPL_IOPERM"), Some("y"));
        assert_eq!(get("CONFIG_VIRTIO_VSOCKETS"), Some("y"));
        assert_eq!(get("CONFIG_VSOCKETS_LOOPBACK"), Some("n"));
    }
}
