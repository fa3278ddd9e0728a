//! Validation of ids and paths received from the host.

use std::path::{Component, Path, PathBuf};

/// Longest accepted container/exec/sandbox id.
pub const MAX_ID_LEN: usize = 128;

/// Errors for invalid ids and paths.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    #[error("invalid {what} {id:?}: {reason}")]
    InvalidId {
        what: &'static str,
        id: String,
        reason: &'static str,
    },
    #[error("path {path:?} escapes {root}")]
    Escapes { path: String, root: PathBuf },
    #[error("resolving {path:?} under {root}")]
    Resolve {
        path: String,
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("too many symlinks resolving {path:?} under {root}")]
    SymlinkLoop { path: String, root: PathBuf },
}

/// Checks an id: 1..=128 chars of `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn validate_id(what: &'static str, id: &str) -> Result<(), IdError> {
    let bad = |reason| IdError::InvalidId {
        what,
        id: id.chars().take(MAX_ID_LEN + 8).collect(),
        reason,
    };
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(bad("longer than 128 bytes"));
    }
    if id == "." || id == ".." {
        return Err(bad("must not be . or .."));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(bad("only letters, digits, '_', '.' and '-' are allowed"));
    }
    Ok(())
}

/// Checks that `rel` is a relative path without `..` components (lexically).
pub fn relative_inside(root: &Path, rel: &str) -> Result<PathBuf, IdError> {
    let p = Path::new(rel);
    let mut out = root.to_path_buf();
    let mut depth = 0usize;
    for c in p.components() {
        match c {
            Component::Normal(n) => {
                out.push(n);
                depth += 1;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(IdError::Escapes {
                    path: rel.to_owned(),
                    root: root.to_owned(),
                });
            }
        }
    }
    if depth == 0 {
        return Err(IdError::Escapes {
            path: rel.to_owned(),
            root: root.to_owned(),
        });
    }
    Ok(out)
}

/// Resolves `path` (absolute or relative, as seen inside the container) under `root`,
/// following symlinks as if `root` were `/`, so the result never leaves `root`.
/// Components that do not exist yet are appended as they are.
pub fn secure_join(root: &Path, path: &str) -> Result<PathBuf, IdError> {
    let mut pending: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .rev()
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            // `..` at the root stays at the root, as in the kernel.
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(IdError::SymlinkLoop {
                        path: path.to_owned(),
                        root: root.to_owned(),
                    });
                }
                let target = std::fs::read_link(&candidate).map_err(|source| IdError::Resolve {
                    path: path.to_owned(),
                    root: root.to_owned(),
                    source,
                })?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("container id", "abc-1_2.3").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a b",
            "x\0y",
            &"a".repeat(129),
        ] {
            assert!(validate_id("container id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn relative_paths() {
        let root = Path::new("/r");
        assert_eq!(relative_inside(root, "a/b").unwrap(), Path::new("/r/a/b"));
        for bad in ["/etc/passwd", "../x", "a/../../x", "", "."] {
            assert!(relative_inside(root, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secure_join_keeps_symlinks_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/../../../../etc", root.join("evil")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("etc/up")).unwrap();
        assert_eq!(
            secure_join(root, "/evil/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(secure_join(root, "/etc/up/x").unwrap(), root.join("x"));
        assert_eq!(secure_join(root, "../../x").unwrap(), root.join("x"));
        assert_eq!(secure_join(root, "/new/dir").unwrap(), root.join("new/dir"));
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(secure_join(root, "/loop").is_err());
    }
}
