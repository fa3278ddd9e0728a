//! The VMM jails itself (the description's `jail` section) once it has opened everything
//! and before any of its threads exists or the guest runs ([`enter`], called by
//! `Vm::start` between building the VM and starting its threads):
//!
//! 1. resource limits (NOFILE, NPROC, FSIZE; soft = hard);
//! 2. new mount, IPC, UTS and (unless `net_namespace` is false) network namespaces; every
//!    mount private, so nothing propagates either way;
//! 3. `root` bound onto itself read-only, nosuid, nodev, noexec, made `/` by `pivot_root`,
//!    the old root detached: the VMM's whole filesystem is `root` (no `/proc`, no `/dev`:
//!    KVM, taps, vhost-net and guest memory are descriptors opened before);
//! 4. the capability bounding set emptied, no supplementary groups, gid and uid set (real,
//!    effective, saved): changing uid from 0 clears every capability;
//! 5. no_new_privs.
//!
//! PID namespace: not made here. `unshare(CLONE_NEWPID)` only places the caller's future
//! children in it, and the VMM has none (its seccomp lists kill a `clone` without
//! CLONE_THREAD; `clone3` gets ENOSYS). Carapace's runtime starts a jailed VMM as PID 1 of
//! a namespace of its own (`carapace_runtime::process::spawn_detached_in`), so it neither
//! sees nor could signal another process even without its filters; as that namespace's
//! init it ignores signals it has no handler for, hence the SIGTERM handler
//! ([`crate::term`]).
//!
//! The namespaces a thread is in, and its root, belong to that thread and to the threads
//! it creates later: so the jail needs a single-threaded process, and says so otherwise.

use std::path::{Path, PathBuf};

use caps::{CapSet, Capability};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Uid, chdir, pivot_root, setgroups, setresgid, setresuid};

pub use carapace_vm_config::{JailConfig, JailRlimits};

/// RLIMIT_FSIZE when the description gives none and no writable block image is larger.
pub const MIN_DEFAULT_FSIZE: u64 = 64 << 20;

/// Errors entering the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Threads already exist: they would stay outside the namespaces and the new root.
    #[error("the VMM must enter its jail while single-threaded, but it has {0} threads")]
    Threads(usize),
    /// A resource limit could not be set.
    #[error("cannot set {what} to {value}")]
    Rlimit {
        /// Which limit.
        what: &'static str,
        /// The value.
        value: u64,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// unshare failed (not root, or namespaces disabled on this host).
    #[error("cannot create the jail's namespaces ({what}); the jail needs root")]
    Unshare {
        /// Which namespaces.
        what: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// A mount step failed.
    #[error("jail: {step} ({path})")]
    Mount {
        /// What was being done.
        step: &'static str,
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// Capabilities could not be dropped.
    #[error("jail: cannot drop capabilities ({what})")]
    Caps {
        /// Which step.
        what: &'static str,
        /// Cause.
        #[source]
        source: caps::errors::CapsError,
    },
    /// The uid, gid or groups could not be set.
    #[error("jail: cannot {what}")]
    Ids {
        /// Which step.
        what: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// After the drop, the process still has privileges.
    #[error("jail: still privileged after dropping them: {0}")]
    StillPrivileged(String),
}

/// The resource limits `j` asks for; `writable_images` are the sizes of the writable block
/// images (FSIZE's default must exceed them).
pub fn rlimits(j: &JailRlimits, writable_images: &[u64]) -> [(Resource, &'static str, u64); 3] {
    let fsize = j.fsize.unwrap_or_else(|| {
        writable_images
            .iter()
            .copied()
            .fold(MIN_DEFAULT_FSIZE, u64::max)
    });
    [
        (Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE", j.nofile),
        (Resource::RLIMIT_NPROC, "RLIMIT_NPROC", j.nproc),
        (Resource::RLIMIT_FSIZE, "RLIMIT_FSIZE", fsize),
    ]
}

/// Threads of this process (from `/proc/self/task`).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// Enters the jail `j` (see the module documentation). `writable_images`: sizes of the
/// writable block images.
pub fn enter(j: &JailConfig, writable_images: &[u64]) -> Result<(), JailError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    for (res, what, value) in rlimits(&j.rlimits, writable_images) {
        setrlimit(res, value, value).map_err(|source| JailError::Rlimit {
            what,
            value,
            source,
        })?;
    }
    let mut ns = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    let mut what = "mount, IPC, UTS";
    if j.net_namespace {
        ns |= CloneFlags::CLONE_NEWNET;
        what = "mount, IPC, UTS, network";
    }
    unshare(ns).map_err(|source| JailError::Unshare { what, source })?;
    pivot_into(&j.root)?;
    drop_privileges(j.uid, j.gid)?;
    nix::sys::prctl::set_no_new_privs().map_err(|source| JailError::Ids {
        what: "set no_new_privs",
        source,
    })?;
    check_unprivileged(j.uid, j.gid)
}

fn mount_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> JailError + 'a {
    move |source| JailError::Mount {
        step,
        path: path.to_owned(),
        source,
    }
}

/// Makes `root` the process's `/` (in its new mount namespace).
fn pivot_into(root: &Path) -> Result<(), JailError> {
    let slash = Path::new("/");
    mount(
        None::<&str>,
        slash,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("make every mount private", slash))?;
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("bind the jail root onto itself", root))?;
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(mount_err("make the jail root read-only", root))?;
    chdir(root).map_err(mount_err("enter the jail root", root))?;
    // The old root is stacked under the new one ("." on "."), then detached.
    pivot_root(".", ".").map_err(mount_err("pivot_root into the jail root", root))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(mount_err("detach the old root", root))?;
    chdir("/").map_err(mount_err("enter the new /", root))
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let caps_err = |what| move |source| JailError::Caps { what, source };
    // The bounding set can only shrink while CAP_SETPCAP is held, so first; only what the
    // running kernel has (a newer capability than the kernel's is EINVAL).
    let bounding = caps::read(None, CapSet::Bounding).map_err(caps_err("read the bounding set"))?;
    for cap in bounding {
        caps::drop(None, CapSet::Bounding, cap).map_err(caps_err("bounding set"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("inheritable set"))?;
    let ids = |what| move |source| JailError::Ids { what, source };
    setgroups(&[]).map_err(ids("drop supplementary groups"))?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(ids("set the gid"))?;
    let u = Uid::from_raw(uid);
    // From uid 0 to another, without SECBIT_KEEP_CAPS: permitted and effective are cleared.
    setresuid(u, u, u).map_err(ids("set the uid"))
}

/// Verifies the drop: ids, capabilities (none in any set).
fn check_unprivileged(uid: u32, gid: u32) -> Result<(), JailError> {
    let (ruid, euid) = (Uid::current().as_raw(), Uid::effective().as_raw());
    let (rgid, egid) = (Gid::current().as_raw(), Gid::effective().as_raw());
    if (ruid, euid, rgid, egid) != (uid, uid, gid, gid) {
        return Err(JailError::StillPrivileged(format!(
            "uid {ruid}/{euid}, gid {rgid}/{egid}"
        )));
    }
    for (set, name) in [
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
        (CapSet::Bounding, "bounding"),
        (CapSet::Ambient, "ambient"),
    ] {
        let held = caps::read(None, set).map_err(|source| JailError::Caps {
            what: "read back",
            source,
        })?;
        if !held.is_empty() {
            let mut v: Vec<Capability> = held.into_iter().collect();
            v.sort_by_key(|c| c.index());
            return Err(JailError::StillPrivileged(format!(
                "{name} capabilities {v:?}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
