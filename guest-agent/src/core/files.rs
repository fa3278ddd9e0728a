//! CopyFile: chunks written into the agent's shared-files directory, never following a
//! symlink in the final component and never leaving the directory.

use std::path::Path;

use carapace_protocol::MAX_WRITE_CHUNK;

use super::{CoreError, Result};
use crate::ids::IdError;

/// One CopyFile chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyFile {
    /// Destination relative to the shared-files directory.
    pub path: String,
    pub data: Vec<u8>,
    /// Byte offset of `data`; 0 creates or truncates the file.
    pub offset: u64,
    /// Permission bits (0: 0644).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Writes `req.data` at `req.offset` into `shared_dir/req.path`.
pub fn copy_file(shared_dir: &Path, req: &CopyFile) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if req.data.len() > MAX_WRITE_CHUNK {
        return Err(CoreError::Invalid {
            field: "data",
            reason: format!(
                "{} bytes exceed the {MAX_WRITE_CHUNK}-byte limit",
                req.data.len()
            ),
        });
    }
    let dest = crate::ids::relative_inside(shared_dir, &req.path)?;
    let io_err = |op: &str| {
        let op = format!("{op} {}", dest.display());
        move |source| CoreError::Io { op, source }
    };
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("creating parent of"))?;
        // A symlinked directory on the way could lead outside: refuse.
        let canon = parent.canonicalize().map_err(io_err("resolving"))?;
        let base = shared_dir
            .canonicalize()
            .map_err(io_err("resolving shared dir for"))?;
        if !canon.starts_with(&base) {
            return Err(CoreError::Id(IdError::Escapes {
                path: req.path.clone(),
                root: shared_dir.to_owned(),
            }));
        }
    }
    let mode = if req.mode == 0 {
        0o644
    } else {
        req.mode & 0o7777
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(req.offset == 0)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&dest)
        .map_err(io_err("opening"))?;
    f.seek(SeekFrom::Start(req.offset))
        .map_err(io_err("seeking in"))?;
    f.write_all(&req.data).map_err(io_err("writing"))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod"))?;
    nix::unistd::fchown(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        Some(nix::unistd::Uid::from_raw(req.uid)),
        Some(nix::unistd::Gid::from_raw(req.gid)),
    )
    .map_err(|e| CoreError::Io {
        op: format!("chown {}", dest.display()),
        source: e.into(),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(path: &str, data: &[u8], offset: u64) -> CopyFile {
        CopyFile {
            path: path.into(),
            data: data.to_vec(),
            offset,
            mode: 0o600,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    #[test]
    fn chunks_land_inside_and_escapes_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        copy_file(dir.path(), &chunk("a/b.txt", b"hello ", 0)).unwrap();
        copy_file(dir.path(), &chunk("a/b.txt", b"world", 6)).unwrap();
        let f = dir.path().join("a/b.txt");
        assert_eq!(std::fs::read(&f).unwrap(), b"hello world");
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        // Offset 0 truncates.
        copy_file(dir.path(), &chunk("a/b.txt", b"x", 0)).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
        for bad in ["../out", "/etc/passwd", "a/../../out"] {
            assert!(
                matches!(
                    copy_file(dir.path(), &chunk(bad, b"x", 0)),
                    Err(CoreError::Id(_))
                ),
                "{bad}"
            );
        }
        // A symlinked directory or final component cannot lead outside.
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        assert!(copy_file(dir.path(), &chunk("link/x", b"x", 0)).is_err());
        std::os::unix::fs::symlink(outside.path().join("f"), dir.path().join("lf")).unwrap();
        assert!(copy_file(dir.path(), &chunk("lf", b"x", 0)).is_err());
        assert!(!outside.path().join("x").exists() && !outside.path().join("f").exists());
        let big = vec![0u8; MAX_WRITE_CHUNK + 1];
        assert!(matches!(
            copy_file(dir.path(), &chunk("big", &big, 0)),
            Err(CoreError::Invalid { .. })
        ));
    }
}
