//! Host bind mounts for the sandbox's shared directory, made so that the guest cannot steer
//! them.
//!
//! The fs daemon exports `<state>/<id>/shared` to the guest, and the guest may be hostile.
//! So the host never prepares anything in a directory the guest can write:
//! - `<state>/<id>/stage` is a small tmpfs of the host's own (never exported), in a shared
//!   peer group of its own; `shared` is a **read-only** bind of it in the same peer group.
//!   Every mount point (`<cid>/rootfs`, `<cid>/mounts/<n>`) is created in `stage`, where
//!   the guest can change nothing, and each bind made there propagates to `shared` and to
//!   the fs daemon's (slave) copy of it. The guest can write inside a rootfs or a
//!   read-write volume, never next to them: it cannot plant a symlink where the host binds.
//! - Mount points are created fd-relative (`openat2` with `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`, `mkdirat`), and the bind itself is
//!   `open_tree(OPEN_TREE_CLONE)` + `mount_setattr` + `move_mount` onto the checked
//!   descriptor: a read-only volume is read-only recursively (`AT_RECURSIVE`), every bind
//!   is `nosuid,nodev` and private to its source, and all of it is set while the tree is
//!   still detached, so the copies that propagate to the fs daemon carry the same flags.
//!   `bind` and `rbind` are honoured (`recursive`).
//! - Unmounts use `UMOUNT_NOFOLLOW`. Teardown unmounts what the state file recorded and then
//!   anything else `/proc/self/mountinfo` still shows under the sandbox directory, deepest
//!   first, so a crash between mount and save leaks nothing.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::mount::{MoveMountFlags, OpenTreeFlags};

use carapace_idmap::mount_setattr;

mod remount;
use remount::overlay_at;
pub use remount::{WORK_PREFIX, remove_scratch};

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
    /// A mount point's path is not a plain relative path below the stage directory.
    #[error("mount point {path} is not a relative path without `..`")]
    BadTarget {
        /// The path.
        path: PathBuf,
    },
    /// Mounting failed.
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
        source: std::io::Error,
    },
    /// Making a bind the jailed fs daemon sees through its id block failed.
    #[error(
        "cannot bind {source_path} idmapped for the jailed fs daemon (jail.fs_daemon = false runs it as root instead)"
    )]
    Idmap {
        /// The source.
        source_path: PathBuf,
        /// Cause.
        #[source]
        source: carapace_idmap::IdmapError,
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

/// How one source is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BindOptions {
    /// Read-only, the whole tree (`ro`).
    pub read_only: bool,
    /// With the mounts beneath the source (`rbind`; `bind` when false).
    pub recursive: bool,
    /// Seen through the jailed fs daemon's id block: the bind is an idmapped mount with
    /// this mapping, and a source that is an overlay's root is mounted anew from its
    /// layers, each idmapped (`carapace_idmap::mount_idmapped`).
    pub idmap: Option<carapace_idmap::IdMap>,
}

/// What [`Mounter::bind`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The mount point.
    pub target: PathBuf,
    /// A directory it made outside the stage that must go once the mount is undone (the
    /// work directory of an overlay mounted anew from idmapped layers).
    pub scratch: Option<PathBuf>,
}

/// The mount operations the runtime needs (a seam for tests without privileges).
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Makes `stage` a fresh host-only tmpfs in a shared peer group of its own and `export`
    /// a read-only bind of it in the same group (what the fs daemon serves): binds made
    /// later under `stage` appear under `export`, also in the fs daemon's copy of it.
    fn prepare_export(&self, stage: &Path, export: &Path) -> Result<(), MountError>;
    /// Bind-mounts `source` (file or directory) at `stage/rel`, creating the mount point
    /// to match without following symlinks or crossing mounts; returns the mount point
    /// (and what else it made).
    fn bind(
        &self,
        source: &Path,
        stage: &Path,
        rel: &Path,
        opts: BindOptions,
    ) -> Result<Bound, MountError>;
    /// Unmounts `target` (lazily, not following a symlink); a target that is not mounted
    /// is not an error.
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
    /// Mount points at or below `dir`, deepest first.
    fn mounts_under(&self, dir: &Path) -> Vec<PathBuf>;
}

/// The components of `rel`, refused unless it is relative and made of plain names.
fn plain_components(rel: &Path) -> Result<Vec<&std::ffi::OsStr>, MountError> {
    let bad = || MountError::BadTarget {
        path: rel.to_path_buf(),
    };
    let parts: Vec<_> = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(bad()),
        })
        .collect::<Result<_, _>>()?;
    if parts.is_empty() {
        return Err(bad());
    }
    Ok(parts)
}

const RESOLVE_STRICT: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_XDEV)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Opens the directory `name` in `dir` (`O_PATH`), never through a symlink or onto another
/// mount.
fn open_dir_in(dir: impl AsFd, name: &std::ffi::OsStr) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        RESOLVE_STRICT,
    )?)
}

/// Creates the mount point `stage/rel` (directories on the way, then a directory or an
/// empty file to match `source`) fd-relative, and returns an `O_PATH` descriptor of it.
pub fn make_mount_point(source: &Path, stage: &Path, rel: &Path) -> Result<OwnedFd, MountError> {
    let parts = plain_components(rel)?;
    let target = stage.join(rel);
    let err = |e: std::io::Error| MountError::MountPoint {
        path: target.clone(),
        source: e,
    };
    let mut dir: OwnedFd = rustix::fs::open(
        stage,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| err(e.into()))?;
    let (last, parents) = parts.split_last().ok_or_else(|| MountError::BadTarget {
        path: rel.to_path_buf(),
    })?;
    for name in parents {
        match rustix::fs::mkdirat(&dir, *name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(err(e.into())),
        }
        dir = open_dir_in(&dir, name).map_err(err)?;
    }
    let is_dir = source.is_dir();
    if is_dir {
        match rustix::fs::mkdirat(&dir, *last, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(err(e.into())),
        }
        open_dir_in(&dir, last).map_err(err)
    } else {
        // An empty regular file, never a symlink or device that is already there.
        match rustix::fs::openat2(
            &dir,
            *last,
            OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::from_raw_mode(0o644),
            RESOLVE_STRICT,
        ) {
            Ok(fd) => drop(fd),
            Err(e) => return Err(err(e.into())),
        }
        Ok(rustix::fs::openat2(
            &dir,
            *last,
            OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            RESOLVE_STRICT,
        )
        .map_err(|e| err(e.into()))?)
    }
}

/// The real thing: the new mount API and umount2(2). Needs CAP_SYS_ADMIN.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysMounter;

impl Mounter for SysMounter {
    fn prepare_export(&self, stage: &Path, export: &Path) -> Result<(), MountError> {
        let err = |source_path: &Path, target: &Path, read_only: bool| {
            let (s, t) = (source_path.to_path_buf(), target.to_path_buf());
            move |e: nix::Error| MountError::Bind {
                source_path: s,
                target: t,
                read_only,
                source: e.into(),
            }
        };
        for d in [stage, export] {
            std::fs::create_dir(d).map_err(|source| MountError::MountPoint {
                path: d.to_path_buf(),
                source,
            })?;
        }
        // Directories and empty mount-point files only: a small fixed size, no devices,
        // no setuid, nothing executable.
        mount(
            Some("carapace-stage"),
            stage,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=1m,nr_inodes=16384"),
        )
        .map_err(err(Path::new("tmpfs"), stage, false))?;
        // Private first: leave whatever peer group the parent mount is in, then start a
        // peer group of our own.
        for flags in [MsFlags::MS_PRIVATE, MsFlags::MS_SHARED] {
            mount(None::<&str>, stage, None::<&str>, flags, None::<&str>)
                .map_err(err(stage, stage, false))?;
        }
        mount(
            Some(stage),
            export,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err(stage, export, true))?;
        mount(
            None::<&str>,
            export,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(err(stage, export, true))?;
        Ok(())
    }

    fn bind(
        &self,
        source: &Path,
        stage: &Path,
        rel: &Path,
        opts: BindOptions,
    ) -> Result<Bound, MountError> {
        let point = make_mount_point(source, stage, rel)?;
        let target = stage.join(rel);
        let err = |e: std::io::Error| MountError::Bind {
            source_path: source.to_path_buf(),
            target: target.clone(),
            read_only: opts.read_only,
            source: e,
        };
        // A jailed fs daemon sees the bind through its id block: a user namespace with the
        // block's mapping is the bind's id mapping, and an overlay (whose mounts cannot be
        // idmapped) is made anew from its layers, each idmapped.
        let userns = match opts.idmap {
            Some(map) => Some(
                carapace_idmap::new_userns(map).map_err(|e| MountError::Idmap {
                    source_path: source.to_path_buf(),
                    source: e,
                })?,
            ),
            None => None,
        };
        let overlay = match (opts.idmap, &userns) {
            (Some(map), Some(ns)) => overlay_at(source)
                .map(|super_options| {
                    remount::remount_overlay(source, stage, &super_options, map, ns.as_fd())
                })
                .transpose()?,
            _ => None,
        };
        let idmapped_clone = overlay.is_none() && userns.is_some();
        let mut scratch = None;
        let tree = match overlay {
            Some((tree, work)) => {
                scratch = Some(work);
                tree
            }
            None => {
                let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
                if opts.recursive {
                    flags |= OpenTreeFlags::AT_RECURSIVE;
                }
                rustix::mount::open_tree(rustix::fs::CWD, source, flags)
                    .map_err(|e| err(e.into()))?
            }
        };
        mount_setattr::set(
            &tree,
            mount_setattr::Attrs {
                read_only: opts.read_only,
                nosuid_nodev: true,
                private: true,
                idmap: userns
                    .as_ref()
                    .filter(|_| idmapped_clone)
                    .map(|ns| ns.as_fd()),
            },
            opts.recursive,
        )
        .map_err(|e| {
            if idmapped_clone {
                MountError::Idmap {
                    source_path: source.to_path_buf(),
                    source: carapace_idmap::IdmapError::Idmap {
                        path: source.to_path_buf(),
                        source: e,
                    },
                }
            } else {
                err(e)
            }
        })?;
        rustix::mount::move_mount(
            &tree,
            "",
            &point,
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(|e| err(e.into()))?;
        Ok(Bound { target, scratch })
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        match umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
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
}

/// Decodes the octal escapes (`\040` for a space, ...) mountinfo uses in paths.
fn unescape(field: &str) -> String {
    carapace_idmap::overlay::unescape_mountinfo(field)
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

    #[test]
    fn mount_point_paths_must_be_plain_and_relative() {
        for bad in ["", "/abs", "a/../b", "..", "./a"] {
            assert!(
                matches!(
                    plain_components(Path::new(bad)),
                    Err(MountError::BadTarget { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(plain_components(Path::new("c/mounts/0")).unwrap().len(), 3);
    }

    fn root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("skipped: needs root");
        false
    }

    /// A sandbox directory with a prepared stage/export pair; unmounted on drop.
    struct Sandbox {
        tmp: tempfile::TempDir,
    }

    impl Sandbox {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            SysMounter
                .prepare_export(&tmp.path().join("stage"), &tmp.path().join("shared"))
                .unwrap();
            Sandbox { tmp }
        }
        fn stage(&self) -> PathBuf {
            self.tmp.path().join("stage")
        }
        fn shared(&self) -> PathBuf {
            self.tmp.path().join("shared")
        }
    }

    impl Drop for Sandbox {
        fn drop(&mut self) {
            for p in SysMounter.mounts_under(self.tmp.path()) {
                let _ = SysMounter.unmount(&p);
            }
        }
    }

    /// The jailed fs daemon's view (needs root and idmapped mounts; tmpfs has them since
    /// Linux 6.3): a rootfs overlay is mounted anew from idmapped layers and a volume is an
    /// idmapped bind, so a file with id `k` shows as the block's `base + k` on the host
    /// side of the export, while the source keeps its ids.
    #[test]
    fn idmapped_binds_show_ids_in_the_block() {
        if !root() {
            return;
        }
        let map = carapace_idmap::IdMap {
            host_base: 0x7001_0000,
            count: 65536,
        };
        let sb = Sandbox::new();
        let src = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = |n: &str| src.path().join(n);
        for d in ["lower", "snap", "snap/fs", "snap/work", "rootfs", "vol"] {
            std::fs::create_dir(p(d)).unwrap();
        }
        for (f, uid) in [("lower/etc", 0), ("lower/home", 1000), ("vol/data", 1000)] {
            std::fs::write(p(f), b"x").unwrap();
            std::os::unix::fs::chown(p(f), Some(uid), Some(uid)).unwrap();
        }
        // The rootfs as the shim mounts it.
        // Volatile, as podman mounts it: its work directory refuses a second overlay.
        let data = format!(
            "volatile,lowerdir={},upperdir={},workdir={}",
            p("lower").display(),
            p("snap/fs").display(),
            p("snap/work").display()
        );
        mount(
            Some("overlay"),
            &p("rootfs"),
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .unwrap();
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = umount2(&self.0, MntFlags::MNT_DETACH);
            }
        }
        let _rootfs = Unmount(p("rootfs"));
        let opts = |recursive| BindOptions {
            read_only: false,
            recursive,
            idmap: Some(map),
        };
        let bound =
            match SysMounter.bind(&p("rootfs"), &sb.stage(), Path::new("c/rootfs"), opts(true)) {
                Ok(t) => t,
                Err(e @ MountError::Idmap { .. }) => {
                    eprintln!("skipped: {}", carapace_errors::Chain(&e));
                    return;
                }
                Err(e) => panic!("{}", carapace_errors::Chain(&e)),
            };
        let rootfs = bound.target.clone();
        // Its own work directory beside the upper layer (the shim's mount keeps its own,
        // which a volatile overlay would not share).
        let work = bound.scratch.clone().expect("a work directory of its own");
        assert_eq!(
            work.parent(),
            Some(p("snap").as_path()),
            "{}",
            work.display()
        );
        assert!(
            work.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(WORK_PREFIX)
        );
        let vol = SysMounter
            .bind(&p("vol"), &sb.stage(), Path::new("c/mounts/0"), opts(false))
            .unwrap();
        assert_eq!(vol.scratch, None);
        let uid = |f: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(f).unwrap());
        assert_eq!(uid(&rootfs.join("etc")), map.host_base);
        assert_eq!(uid(&rootfs.join("home")), map.host_base + 1000);
        let export = sb.shared().join("c");
        assert_eq!(uid(&export.join("rootfs/home")), map.host_base + 1000);
        assert_eq!(uid(&export.join("mounts/0/data")), map.host_base + 1000);
        assert_eq!(uid(&p("vol/data")), 1000);
        // The layer clones were staged beside the stage and are gone.
        let left: Vec<_> = std::fs::read_dir(sb.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("idmap-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // Teardown finds every mount under the sandbox (the Sandbox guard unmounts them).
        let under = SysMounter.mounts_under(sb.tmp.path());
        assert!(under.contains(&rootfs), "{under:?}");
        SysMounter.unmount(&rootfs).unwrap();
        remove_scratch(&work).unwrap();
        assert!(!work.exists());
    }

    /// Runs only as root (CAP_SYS_ADMIN); the project's test machines run tests as root.
    #[test]
    fn binds_appear_in_the_export_with_their_flags_and_unmount_is_idempotent() {
        if !root() {
            return;
        }
        let sb = Sandbox::new();
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("f"), b"data").unwrap();
        let file_src = src.path().join("file");
        std::fs::write(&file_src, b"one file").unwrap();
        let m = SysMounter;
        let ro = BindOptions {
            read_only: true,
            recursive: true,
            idmap: None,
        };
        let rw = BindOptions {
            read_only: false,
            recursive: true,
            idmap: None,
        };
        m.bind(src.path(), &sb.stage(), Path::new("c/rootfs"), ro)
            .unwrap();
        m.bind(src.path(), &sb.stage(), Path::new("c/mounts/0"), rw)
            .unwrap();
        m.bind(&file_src, &sb.stage(), Path::new("c/mounts/1"), ro)
            .unwrap();
        // Made after the export existed, seen through it with the same flags (a read-only
        // bind stays read-only in the copies that propagate).
        let shared = sb.shared();
        assert_eq!(std::fs::read(shared.join("c/rootfs/f")).unwrap(), b"data");
        assert_eq!(
            std::fs::read(shared.join("c/mounts/1")).unwrap(),
            b"one file"
        );
        let e = std::fs::write(shared.join("c/rootfs/g"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        std::fs::write(shared.join("c/mounts/0/g"), b"x").unwrap();
        assert!(src.path().join("g").exists());
        // The export itself is read-only: nothing can be planted next to the binds.
        for attempt in [
            std::os::unix::fs::symlink("/etc", shared.join("c/mounts/2")),
            std::fs::create_dir(shared.join("c2")),
            std::fs::write(shared.join("c/x"), b"x"),
        ] {
            assert_eq!(attempt.unwrap_err().raw_os_error(), Some(libc::EROFS));
        }
        let under = m.mounts_under(&sb.stage().join("c"));
        assert_eq!(under.len(), 3, "{under:?}");
        for p in &under {
            m.unmount(p).unwrap();
            m.unmount(p).unwrap();
        }
        assert!(m.mounts_under(&sb.stage().join("c")).is_empty());
        assert!(
            m.mounts_under(&shared.join("c")).is_empty(),
            "unmounts propagate"
        );
        assert!(!shared.join("c/rootfs/f").exists());
    }

    #[test]
    fn read_only_is_recursive_and_bind_is_not() {
        if !root() {
            return;
        }
        let sb = Sandbox::new();
        let src = tempfile::tempdir().unwrap();
        let sub = src.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        mount(
            Some("t"),
            &sub,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(sub.join("inner"), b"i").unwrap();
        let m = SysMounter;
        let r = m.bind(
            src.path(),
            &sb.stage(),
            Path::new("c/mounts/0"),
            BindOptions {
                read_only: true,
                recursive: true,
                idmap: None,
            },
        );
        let nr = m.bind(
            src.path(),
            &sb.stage(),
            Path::new("c/mounts/1"),
            BindOptions {
                read_only: false,
                recursive: false,
                idmap: None,
            },
        );
        let shared = sb.shared();
        let checks = || {
            r.as_ref().unwrap();
            nr.as_ref().unwrap();
            // rbind ro: the submount is there, and read-only too.
            assert_eq!(
                std::fs::read(shared.join("c/mounts/0/sub/inner")).unwrap(),
                b"i"
            );
            let e = std::fs::write(shared.join("c/mounts/0/sub/new"), b"x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS));
            // bind: the submount is not carried along.
            assert!(!shared.join("c/mounts/1/sub/inner").exists());
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(checks));
        drop(sb);
        let _ = umount2(&sub, MntFlags::MNT_DETACH);
        outcome.unwrap();
    }

    #[test]
    fn a_planted_symlink_on_the_way_is_refused_and_nothing_is_made_outside() {
        if !root() {
            return;
        }
        let sb = Sandbox::new();
        let decoy = tempfile::tempdir().unwrap();
        // Whoever could write the stage (nobody but the host can) plants c -> decoy.
        std::os::unix::fs::symlink(decoy.path(), sb.stage().join("c")).unwrap();
        let src = tempfile::tempdir().unwrap();
        let e = SysMounter
            .bind(
                src.path(),
                &sb.stage(),
                Path::new("c/mounts/0"),
                BindOptions {
                    read_only: false,
                    recursive: true,
                    idmap: None,
                },
            )
            .unwrap_err();
        assert!(matches!(e, MountError::MountPoint { .. }), "{e}");
        assert_eq!(std::fs::read_dir(decoy.path()).unwrap().count(), 0);
        // A symlink as the last component is refused too (never followed to mount on).
        std::fs::create_dir(sb.stage().join("d")).unwrap();
        std::os::unix::fs::symlink(decoy.path(), sb.stage().join("d/rootfs")).unwrap();
        assert!(
            SysMounter
                .bind(
                    src.path(),
                    &sb.stage(),
                    Path::new("d/rootfs"),
                    BindOptions::default()
                )
                .is_err()
        );
        assert!(SysMounter.mounts_under(decoy.path()).is_empty());
    }
}
