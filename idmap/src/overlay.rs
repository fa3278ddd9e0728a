//! An overlayfs built from idmapped layers.
//!
//! overlayfs itself cannot be given an id mapping (`mount_setattr` answers EINVAL), but it
//! can be built from layers that are idmapped mounts (Linux 5.19). So a container rootfs
//! that a jailed file server must see through its id block is mounted anew: each layer
//! directory is cloned (`open_tree(OPEN_TREE_CLONE)`), given the block's mapping and
//! attached under a private staging directory; the overlay is made from those (`fsopen`,
//! `fsconfig`, `fsmount`, a detached mount the caller places); then the staged clones are
//! detached again (the overlay holds its own private copies of its layers).
//!
//! overlayfs does its own work on the upper layer (work directory, whiteouts, copy-up)
//! with the credentials of whoever created it, and host root has no id in the block: the
//! kernel would answer EOVERFLOW and make the overlay read-only. So the overlay is created
//! on a thread of its own whose file-system ids are the block's root (`setfsuid`), with
//! `SECBIT_NO_SETUID_FIXUP` so that its capabilities survive the change; the thread then
//! ends, and its credentials with it. Files the overlay writes on the file server's behalf
//! are owned on disk as the server asked (id `k` in the block is id `k` on disk).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::CWD;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};

use crate::mount_setattr::{self, Attrs};
use crate::{IdMap, IdmapError};

/// The layers and options of an overlay mount.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Overlay {
    /// Lower directories, uppermost first (overlayfs' `lowerdir` order).
    pub lower: Vec<PathBuf>,
    /// Upper directory (absent: a read-only overlay).
    pub upper: Option<PathBuf>,
    /// Work directory (with `upper`).
    pub work: Option<PathBuf>,
    /// Every other option, as `key` or `key=value`, passed on unchanged.
    pub other: Vec<String>,
}

/// Splits overlayfs' `lowerdir` value at unescaped `:` (overlayfs takes `\:` for a colon
/// in a path and `\\` for a backslash).
fn split_lowerdir(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ':' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for a space, `\054` for a
/// comma, `\134` for a backslash, ...).
pub fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn absolute(key: &str, path: &str) -> Result<PathBuf, IdmapError> {
    let p = PathBuf::from(path);
    if path.is_empty()
        || !p.is_absolute()
        || p.components().any(|c| matches!(c, Component::ParentDir))
    {
        return Err(IdmapError::OverlayOption {
            option: format!("{key}={path}"),
            reason: "layer paths must be absolute, without `..`",
        });
    }
    Ok(p)
}

fn relative(key: &str, path: &str) -> Result<PathBuf, IdmapError> {
    let p = PathBuf::from(path);
    if path.is_empty()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(IdmapError::OverlayOption {
            option: format!("{key}={path}"),
            reason: "a relative layer path must stay below its base",
        });
    }
    Ok(p)
}

impl Overlay {
    /// Reads overlay options as a mount request gives them (each entry may hold several,
    /// comma-separated): `lowerdir`, `upperdir`, `workdir` are taken apart, every other
    /// option is kept. Layer paths must be absolute: relative ones (a caller that
    /// mounted from another working directory) cannot be found again.
    pub fn from_options<S: AsRef<str>>(options: &[S]) -> Result<Self, IdmapError> {
        let opts: Vec<String> = options
            .iter()
            .flat_map(|s| s.as_ref().split(','))
            .map(|s| s.trim().to_owned())
            .collect();
        Self::from_split(opts, false)
    }

    /// Reads the overlay's options from the super options field of its
    /// `/proc/self/mountinfo` line, as the kernel shows them (commas in paths octal-escaped,
    /// `ro`/`rw` of the super block dropped). Lower layers may be relative here (the
    /// mounter's working directory, which the kernel does not show, was their base): see
    /// [`Overlay::resolve_relative_lower`].
    pub fn from_mountinfo_options(super_options: &str) -> Result<Self, IdmapError> {
        let opts: Vec<String> = super_options
            .split(',')
            .map(unescape_mountinfo)
            .filter(|o| o != "rw" && o != "ro")
            .collect();
        Self::from_split(opts, true)
    }

    /// Whether a lower layer is a relative path.
    pub fn has_relative_lower(&self) -> bool {
        self.lower.iter().any(|p| p.is_relative())
    }

    /// Makes relative lower layers absolute against `base`.
    pub fn resolve_relative_lower(&mut self, base: &Path) {
        for p in &mut self.lower {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    fn from_split(opts: Vec<String>, relative_lower: bool) -> Result<Self, IdmapError> {
        let mut o = Overlay::default();
        for opt in opts {
            if opt.is_empty() {
                continue;
            }
            match opt.split_once('=') {
                Some(("lowerdir", v)) => {
                    if v.contains("::") {
                        return Err(IdmapError::OverlayOption {
                            option: format!("lowerdir={v}"),
                            reason: "data-only lower layers are not supported",
                        });
                    }
                    o.lower = split_lowerdir(v)
                        .iter()
                        .map(|p| {
                            if relative_lower && !p.starts_with('/') {
                                relative("lowerdir", p)
                            } else {
                                absolute("lowerdir", p)
                            }
                        })
                        .collect::<Result<_, _>>()?;
                }
                Some(("upperdir", v)) => o.upper = Some(absolute("upperdir", v)?),
                Some(("workdir", v)) => o.work = Some(absolute("workdir", v)?),
                Some(("lowerdir+" | "datadir+", _)) => {
                    return Err(IdmapError::OverlayOption {
                        option: opt,
                        reason: "append-style layer options are not supported",
                    });
                }
                _ => o.other.push(opt),
            }
        }
        if o.lower.is_empty() {
            return Err(IdmapError::OverlayOption {
                option: "lowerdir".to_owned(),
                reason: "an overlay needs at least one lower layer",
            });
        }
        if o.upper.is_some() != o.work.is_some() {
            return Err(IdmapError::OverlayOption {
                option: "upperdir/workdir".to_owned(),
                reason: "upperdir and workdir come together",
            });
        }
        Ok(o)
    }
}

/// Clones the directory `path` as a detached mount (recursively with its submounts when
/// `recursive`) idmapped by `userns`. Fails on file systems that do not support idmapped
/// mounts (EINVAL), such as overlayfs itself, and on tmpfs before Linux 6.3.
pub fn clone_idmapped(
    path: &Path,
    userns: BorrowedFd<'_>,
    recursive: bool,
) -> Result<OwnedFd, IdmapError> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(CWD, path, flags).map_err(|e| IdmapError::Clone {
        path: path.to_owned(),
        source: e.into(),
    })?;
    mount_setattr::set(
        &tree,
        Attrs {
            idmap: Some(userns),
            ..Attrs::default()
        },
        recursive,
    )
    .map_err(|source| IdmapError::Idmap {
        path: path.to_owned(),
        source,
    })?;
    Ok(tree)
}

/// Staged layer clones under the staging directory, detached and removed on drop.
struct Staged<'a> {
    dir: &'a Path,
    names: Vec<String>,
}

impl Staged<'_> {
    fn attach(&mut self, name: String, tree: &OwnedFd) -> Result<(), IdmapError> {
        let at = self.dir.join(&name);
        std::fs::create_dir(&at).map_err(|source| IdmapError::Staging {
            path: at.clone(),
            source,
        })?;
        self.names.push(name);
        rustix::mount::move_mount(
            tree.as_fd(),
            "",
            CWD,
            &at,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| IdmapError::Staging {
            path: at,
            source: e.into(),
        })
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let at = self.dir.join(name);
            let _ = rustix::mount::unmount(&at, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW);
            let _ = std::fs::remove_dir(&at);
        }
    }
}

/// The deepest directory holding both `a` and `b`.
fn common_dir(a: &Path, b: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for (x, y) in a.components().zip(b.components()) {
        if x != y {
            break;
        }
        out.push(x);
    }
    out
}

/// Mounts `overlay` with every layer idmapped by `userns`, whose mapping is `map`, and
/// returns the overlay as a detached mount for the caller to place (`move_mount`).
/// `staging` must be an empty directory only the caller can reach (never one the guest
/// can write): the layer clones are attached there while the overlay is made and
/// detached before this returns, whatever happens.
pub fn mount_idmapped(
    overlay: &Overlay,
    map: IdMap,
    userns: BorrowedFd<'_>,
    staging: &Path,
) -> Result<OwnedFd, IdmapError> {
    map.validate()?;
    if overlay.has_relative_lower() {
        return Err(IdmapError::OverlayOption {
            option: "lowerdir".to_owned(),
            reason: "relative lower layers must be resolved first",
        });
    }
    let mut staged = Staged {
        dir: staging,
        names: Vec::new(),
    };
    let mut lower = Vec::with_capacity(overlay.lower.len());
    for (i, dir) in overlay.lower.iter().enumerate() {
        let tree = clone_idmapped(dir, userns, false)?;
        let name = format!("l{i}");
        staged.attach(name.clone(), &tree)?;
        lower.push(name);
    }
    let mut upper_work = None;
    if let (Some(upper), Some(work)) = (&overlay.upper, &overlay.work) {
        // upperdir and workdir must be on one mount: clone the directory holding both.
        let common = common_dir(upper, work);
        let rel = |p: &Path| {
            p.strip_prefix(&common)
                .map(|r| Path::new("u").join(r))
                .unwrap_or_else(|_| PathBuf::from("u"))
        };
        let tree = clone_idmapped(&common, userns, false)?;
        staged.attach("u".to_owned(), &tree)?;
        upper_work = Some((rel(upper), rel(work)));
    }
    let other = overlay.other.clone();
    let dir = staging.to_owned();
    let made = std::thread::scope(|s| {
        s.spawn(move || create_as_block_root(&dir, map, &lower, upper_work, &other))
            .join()
            .unwrap_or_else(|_| {
                Err(IdmapError::Overlay {
                    step: "the overlay thread panicked",
                    source: std::io::Error::other("panic"),
                })
            })
    });
    drop(staged);
    made
}

/// Runs on a thread of its own (its working directory and credentials die with it):
/// creates the overlay with the block's root as file-system ids.
fn create_as_block_root(
    staging: &Path,
    map: IdMap,
    lower: &[String],
    upper_work: Option<(PathBuf, PathBuf)>,
    other: &[String],
) -> Result<OwnedFd, IdmapError> {
    use rustix::thread::CapabilitiesSecureBits as Bits;
    let err = |step: &'static str| {
        move |e: rustix::io::Errno| IdmapError::Overlay {
            step,
            source: e.into(),
        }
    };
    // Relative layer paths keep the option short whatever the staging path and the
    // number of layers; the working directory is this thread's own.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(|e| IdmapError::Overlay {
        step: "unshare(CLONE_FS) on the overlay thread",
        source: e.into(),
    })?;
    rustix::process::chdir(staging).map_err(err("chdir into the staging directory"))?;
    let bits = rustix::thread::capabilities_secure_bits().map_err(err("read securebits"))?;
    rustix::thread::set_capabilities_secure_bits(bits | Bits::NO_SETUID_FIXUP)
        .map_err(err("set SECBIT_NO_SETUID_FIXUP"))?;
    let root = map.host_base;
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(root));
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(root));
    // setfsuid reports no error: asking again returns the current value.
    if nix::unistd::setfsuid(nix::unistd::Uid::from_raw(root)).as_raw() != root {
        return Err(IdmapError::Overlay {
            step: "setfsuid to the block's root",
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        });
    }
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(err("fsopen(overlay)"))?;
    let set = |key: &str, value: &str| {
        rustix::mount::fsconfig_set_string(&fs, key, value).map_err(|e| IdmapError::Overlay {
            step: "fsconfig",
            source: std::io::Error::other(format!("{key}={value}: {e}")),
        })
    };
    set("lowerdir", &lower.join(":"))?;
    if let Some((upper, work)) = &upper_work {
        set("upperdir", &upper.to_string_lossy())?;
        set("workdir", &work.to_string_lossy())?;
    }
    for opt in other {
        match opt.split_once('=') {
            Some((k, v)) => set(k, v)?,
            None => rustix::mount::fsconfig_set_flag(&fs, opt.as_str()).map_err(|e| {
                IdmapError::Overlay {
                    step: "fsconfig",
                    source: std::io::Error::other(format!("{opt}: {e}")),
                }
            })?,
        }
    }
    rustix::mount::fsconfig_create(&fs).map_err(err("create the overlay (FSCONFIG_CMD_CREATE)"))?;
    rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(err("fsmount"))
}
