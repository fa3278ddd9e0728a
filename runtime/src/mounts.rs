//! Host bind mounts into the sandbox's shared directory.
//!
//! The fs daemon exports one directory (`<state>/<id>/shared`); the bundle rootfs and the
//! spec's bind-mount sources are bind-mounted beneath it, read-only where asked (a
//! read-only bind is a bind followed by a `MS_REMOUNT|MS_BIND|MS_RDONLY`, which is what
//! makes it read-only for the fs daemon and so for the guest). Teardown unmounts what the
//! state file recorded and then anything else `/proc/self/mountinfo` still shows under the
//! sandbox directory, deepest first, so a crash between mount and save leaks nothing.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Errors of mount operations.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Creating the mount point failed.
    #[error("cannot create mount point {path}")]
    MountPoint {
        /// The mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// mount(2) failed.
    #[error("cannot bind-mount {source_path} on {target}{}", if *read_only { " (read-only)" } else { "" })]
    Bind {
        /// Source.
        source_path: PathBuf,
        /// Target.
        target: PathBuf,
        /// Whether read-only was asked.
        read_only: bool,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// umount2(2) failed.
    #[error("cannot unmount {target}")]
    Unmount {
        /// Target.
        target: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
}

/// The mount operations the runtime needs (a seam for tests without privileges).
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Bind-mounts `source` (file or directory) on `target`, creating `target` to match.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError>;
    /// Unmounts `target` (lazily); a target that is not mounted is not an error.
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
    /// Mount points at or below `dir`, deepest first.
    fn mounts_under(&self, dir: &Path) -> Vec<PathBuf>;
    /// Makes the directory `dir` a mount of its own (a bind on itself) in a new shared peer
    /// group. The fs daemon's mount namespace holds a slave copy of the shared directory,
    /// so binds made beneath `dir` after the daemon started (the containers joining a
    /// pod's VM) still reach the daemon, whatever the propagation of `dir`'s parent mount.
    fn share_subtree(&self, dir: &Path) -> Result<(), MountError>;
}

/// Creates `target` as an empty directory or file, matching `source`.
pub fn make_mount_point(source: &Path, target: &Path) -> Result<(), MountError> {
    let err = |source| MountError::MountPoint {
        path: target.to_path_buf(),
        source,
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if source.is_dir() {
        match std::fs::create_dir(target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(err(e)),
        }
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map(drop)
            .map_err(err)
    }
}

/// The real thing: mount(2) and umount2(2). Needs CAP_SYS_ADMIN.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysMounter;

impl Mounter for SysMounter {
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
        make_mount_point(source, target)?;
        let err = |e| MountError::Bind {
            source_path: source.to_path_buf(),
            target: target.to_path_buf(),
            read_only,
            source: e,
        };
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(err)?;
        // Do not let mounts made later on the host propagate into the sandbox.
        if let Err(e) = mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        ) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(err(e));
        }
        if read_only
            && let Err(e) = mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
        {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(err(e));
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
            Err(source) => Err(MountError::Unmount {
                target: target.to_path_buf(),
                source,
            }),
        }
    }

    fn mounts_under(&self, dir: &Path) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        mount_points_under(&text, dir)
    }

    fn share_subtree(&self, dir: &Path) -> Result<(), MountError> {
        let err = |e| MountError::Bind {
            source_path: dir.to_path_buf(),
            target: dir.to_path_buf(),
            read_only: false,
            source: e,
        };
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(err)?;
        // Private first: leave whatever peer group the parent mount is in, then start a
        // peer group of our own.
        for flags in [MsFlags::MS_PRIVATE, MsFlags::MS_SHARED] {
            if let Err(e) = mount(None::<&str>, dir, None::<&str>, flags, None::<&str>) {
                let _ = umount2(dir, MntFlags::MNT_DETACH);
                return Err(err(e));
            }
        }
        Ok(())
    }
}

/// Decodes the octal escapes (`\040` for a space, ...) mountinfo uses in paths.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points (field 5 of mountinfo) at or below `dir`, deepest first, each once.
pub fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_parsed_deepest_first_with_escapes() {
        let info = "\
22 1 0:21 / / rw - ext4 /dev/sda1 rw
30 22 0:5 /x /run/c/a/shared/a/rootfs rw - ext4 /dev/sda1 rw
31 30 0:5 /y /run/c/a/shared/a/mounts/1 ro - ext4 /dev/sda1 rw
32 22 0:5 /z /run/c/ab/shared rw - ext4 /dev/sda1 rw
33 22 0:5 /s /run/c/a/with\\040space rw - ext4 /dev/sda1 rw
";
        let got = mount_points_under(info, Path::new("/run/c/a"));
        assert_eq!(
            got,
            vec![
                PathBuf::from("/run/c/a/shared/a/mounts/1"),
                PathBuf::from("/run/c/a/shared/a/rootfs"),
                PathBuf::from("/run/c/a/with space"),
            ]
        );
    }

    /// Runs only as root (CAP_SYS_ADMIN); the project's test machines run tests as root.
    #[test]
    fn read_only_bind_is_read_only_and_unmount_is_idempotent() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"data").unwrap();
        let file_src = tmp.path().join("file");
        std::fs::write(&file_src, b"one file").unwrap();
        let shared = tmp.path().join("shared");
        let m = SysMounter;
        let ro = shared.join("c/rootfs");
        let rw = shared.join("c/mounts/0");
        let f = shared.join("c/mounts/1");
        m.bind(&src, &ro, true).unwrap();
        m.bind(&src, &rw, false).unwrap();
        m.bind(&file_src, &f, true).unwrap();
        assert_eq!(std::fs::read(ro.join("f")).unwrap(), b"data");
        assert_eq!(std::fs::read(&f).unwrap(), b"one file");
        let e = std::fs::write(ro.join("g"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        std::fs::write(rw.join("g"), b"x").unwrap();
        assert!(src.join("g").exists());
        let under = m.mounts_under(&shared);
        assert_eq!(under.len(), 3, "{under:?}");
        for p in &under {
            m.unmount(p).unwrap();
            m.unmount(p).unwrap();
        }
        assert!(m.mounts_under(&shared).is_empty());
        assert!(!ro.join("f").exists());
    }
}
