//! The daemon confines itself before it serves the guest.
//!
//! Namespace mode, in two phases around opening the export root:
//! 1. [`enter_namespaces`]: own mount, IPC and network namespaces; every mount becomes a
//!    slave (nothing we do propagates to the host, new host submounts still appear); the
//!    shared dir is bind-mounted onto itself recursively (read-only when the export is).
//! 2. (the caller opens the shared dir and `/proc/self/fd`, which stay valid), then
//!    [`pivot_into`]: `pivot_root` into the shared dir and detach the old root, so no
//!    path outside the shared dir exists in the daemon's view of the world.
//!
//! Then [`restrict`] (both modes): no_new_privs, drop every capability except those a
//! file server acting for the guest's users needs, and the seccomp allow-list.

use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{chdir, pivot_root};

use crate::seccomp::{self, SeccompError};

/// Errors while sandboxing the daemon.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// unshare failed (usually: not root).
    #[error(
        "cannot create a mount namespace (needs root or CAP_SYS_ADMIN; use --sandbox none to run unprivileged)"
    )]
    Unshare(#[source] nix::Error),
    /// A mount step failed.
    #[error("sandbox mount step '{step}' on {path} failed")]
    Mount {
        /// What was being done.
        step: &'static str,
        /// Path involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: nix::Error,
    },
    /// pivot_root failed.
    #[error("cannot pivot_root into {path}")]
    PivotRoot {
        /// The shared dir.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: nix::Error,
    },
    /// no_new_privs could not be set.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
    /// Capabilities could not be changed.
    #[error("cannot drop capabilities ({what})")]
    Caps {
        /// Which set.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: caps::errors::CapsError,
    },
    /// seccomp failed.
    #[error("cannot install seccomp filter")]
    Seccomp(#[source] SeccompError),
}

fn mount_err<'a>(
    step: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::Error) -> SandboxError + 'a {
    move |source| SandboxError::Mount {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// Phase 1 of the namespace sandbox (see the module documentation).
pub fn enter_namespaces(shared_dir: &Path, readonly: bool) -> Result<(), SandboxError> {
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWNET)
        .map_err(SandboxError::Unshare)?;
    let root = Path::new("/");
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("make / a recursive slave", root))?;
    mount(
        Some(shared_dir),
        shared_dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("bind the shared dir onto itself", shared_dir))?;
    if readonly {
        mount(
            None::<&str>,
            shared_dir,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(mount_err("remount the shared dir read-only", shared_dir))?;
    }
    Ok(())
}

/// Phase 2 of the namespace sandbox: the shared dir becomes `/`, the old root is gone.
pub fn pivot_into(shared_dir: &Path) -> Result<(), SandboxError> {
    chdir(shared_dir).map_err(mount_err("chdir into the shared dir", shared_dir))?;
    // Stacking the old root under the new one with "." "." avoids needing a writable
    // directory inside the shared dir; the old root is then detached from our view.
    pivot_root(".", ".").map_err(|source| SandboxError::PivotRoot {
        path: shared_dir.to_path_buf(),
        source,
    })?;
    umount2(".", MntFlags::MNT_DETACH).map_err(mount_err("detach the old root", shared_dir))?;
    chdir("/").map_err(mount_err("chdir to the new root", shared_dir))?;
    Ok(())
}

/// Capabilities the file server keeps: acting as the guest's users on their files.
pub const KEPT_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
];

/// no_new_privs, capability drop, seccomp. Works for root and unprivileged users (an
/// unprivileged process has no capabilities to drop).
pub fn restrict() -> Result<(), SandboxError> {
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    drop_caps()?;
    seccomp::install().map_err(SandboxError::Seccomp)
}

fn drop_caps() -> Result<(), SandboxError> {
    let keep: CapsHashSet = KEPT_CAPS.iter().copied().collect();
    let permitted = caps::read(None, CapSet::Permitted).map_err(|source| SandboxError::Caps {
        what: "read permitted",
        source,
    })?;
    // The bounding set can only shrink while we still hold CAP_SETPCAP.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::all() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(|source| SandboxError::Caps {
                    what: "bounding",
                    source,
                })?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|source| SandboxError::Caps {
        what: "ambient",
        source,
    })?;
    caps::clear(None, CapSet::Inheritable).map_err(|source| SandboxError::Caps {
        what: "inheritable",
        source,
    })?;
    let now: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &now).map_err(|source| SandboxError::Caps {
        what: "effective",
        source,
    })?;
    caps::set(None, CapSet::Permitted, &now).map_err(|source| SandboxError::Caps {
        what: "permitted",
        source,
    })?;
    Ok(())
}

/// Raises the soft open-file limit to the hard limit: the passthrough keeps one `O_PATH`
/// descriptor per inode the guest holds. The hard limit is what bounds the daemon's
/// descriptors (and the kernel memory behind them) whatever the guest does.
pub fn raise_nofile_limit() -> Result<u64, nix::Error> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}
