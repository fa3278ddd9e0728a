//! The daemon confines itself before it serves the guest.
//!
//! Namespace mode, in two phases around opening the export root:
//! 1. [`enter_namespaces`]: own mount, IPC and network namespaces; every mount becomes a
//!    slave (nothing we do propagates to the host, new host submounts still appear); an
//!    empty tmpfs (the future root) holds the shared dir bind-mounted recursively at
//!    `/shared` (read-only when the export is) and `/proc`.
//! 2. (the caller opens the shared dir and `/proc/self/fd`, which stay valid), then
//!    [`pivot_into`]: `pivot_root` into that tmpfs (made read-only) and detach the old
//!    root, so no host path but the shared dir exists in the daemon's view of the world.
//!
//! 3. With an id block (`--idmap`), [`enter_idmap`]: the daemon joins the user namespace
//!    of the block (made by [`new_idmap_ns`] before phase 1, while the daemon was still
//!    root of the host's) as its root, i.e. host uid and gid `BASE`, with capabilities
//!    only in that namespace. Its mount namespace stays owned by the host's user
//!    namespace, so from then on it can neither mount nor unmount anything.
//!
//! Then [`restrict`] (both modes): no_new_privs, drop every capability except those a
//! file server acting for the guest's users needs, and the seccomp allow-list.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use carapace_idmap::{IdMap, IdmapError};
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
    /// A step of running on an id block (`--idmap`) failed.
    #[error("id block {map}: cannot {step}")]
    Idmap {
        /// What was being done.
        step: &'static str,
        /// The block.
        map: IdMap,
        /// Underlying error.
        #[source]
        source: IdmapError,
    },
    /// The daemon was not single-threaded when it had to join the id block's user
    /// namespace (the kernel refuses `setns(CLONE_NEWUSER)` then).
    #[error(
        "id block {map}: cannot enter its user namespace: the daemon has {threads} threads, it must have one"
    )]
    Threads {
        /// The block.
        map: IdMap,
        /// Threads counted in /proc/self/status.
        threads: usize,
    },
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

/// Name of the shared dir inside the daemon's own root.
pub const SHARED_IN_ROOT: &str = "shared";

/// Phase 1 of the namespace sandbox (see the module documentation). Returns the path
/// under which the export is mounted in the new namespace; the caller opens it as the
/// export root before [`pivot_into`].
pub fn enter_namespaces(shared_dir: &Path, readonly: bool) -> Result<PathBuf, SandboxError> {
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
    // Opened in the new namespace, so the bind below copies our namespace's mount.
    let host_dir = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(shared_dir)
            .map_err(|e| SandboxError::Mount {
                step: "open the shared dir",
                path: shared_dir.to_path_buf(),
                source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?
    };
    // The staging root: an empty tmpfs over the shared dir path (in our namespace only).
    let plain = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        shared_dir,
        Some("tmpfs"),
        plain,
        Some("size=64k,mode=0755"),
    )
    .map_err(mount_err(
        "mount the staging tmpfs over the shared dir",
        shared_dir,
    ))?;
    let export = shared_dir.join(SHARED_IN_ROOT);
    let proc_dir = shared_dir.join("proc");
    for d in [&export, &proc_dir] {
        nix::unistd::mkdir(d.as_path(), nix::sys::stat::Mode::from_bits_truncate(0o755))
            .map_err(mount_err("create a directory in the staging tmpfs", d))?;
    }
    // The shared dir (now covered) is bound in through the descriptor opened above,
    // recursively, so its submounts stay visible.
    let source = PathBuf::from(format!("/proc/self/fd/{}", host_dir.as_raw_fd()));
    mount(
        Some(&source),
        &export,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err(
        "bind the shared dir into the staging root",
        &export,
    ))?;
    drop(host_dir);
    // The recursive bind also copied the staging tmpfs itself (it is mounted on the very
    // directory being bound); that copy now covers the export: take it off.
    let dev = |p: &Path| nix::sys::stat::stat(p).map(|st| st.st_dev);
    let staging_dev = dev(shared_dir).map_err(mount_err("stat the staging root", shared_dir))?;
    if dev(&export).map_err(mount_err("stat the export", &export))? == staging_dev {
        umount2(&export, MntFlags::MNT_DETACH).map_err(mount_err(
            "remove the staging copy over the export",
            &export,
        ))?;
    }
    if readonly {
        mount(
            None::<&str>,
            &export,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(mount_err("remount the shared dir read-only", &export))?;
    }
    // fuse-backend-rs reaches inodes for xattr calls through absolute /proc/self/fd/N
    // paths, so the daemon keeps a /proc (process entries only where supported).
    if mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        plain,
        Some("subset=pid"),
    )
    .is_err()
    {
        mount(Some("proc"), &proc_dir, Some("proc"), plain, None::<&str>)
            .map_err(mount_err("mount proc in the staging root", &proc_dir))?;
    }
    Ok(export)
}

/// Phase 2 of the namespace sandbox, after the export root was opened: the staging
/// tmpfs is made read-only, becomes `/` (`pivot_root`), and the old root is detached.
/// The daemon's whole view of the filesystem is then `/shared` (the export) and `/proc`.
pub fn pivot_into(staging: &Path) -> Result<(), SandboxError> {
    mount(
        None::<&str>,
        staging,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(mount_err("make the staging tmpfs read-only", staging))?;
    chdir(staging).map_err(mount_err("chdir into the staging root", staging))?;
    // Stacking the old root under the new one with "." "." needs no directory for it;
    // the old root is then detached from our view.
    pivot_root(".", ".").map_err(|source| SandboxError::PivotRoot {
        path: staging.to_path_buf(),
        source,
    })?;
    umount2(".", MntFlags::MNT_DETACH).map_err(mount_err("detach the old root", staging))?;
    chdir("/").map_err(mount_err("chdir to the new root", staging))?;
    Ok(())
}

/// Makes the user namespace of the id block `map` (ids `0 .. COUNT` are host ids `BASE ..`),
/// for [`enter_idmap`]. Needs root of the host's user namespace: called before phase 1.
pub fn new_idmap_ns(map: IdMap) -> Result<OwnedFd, SandboxError> {
    carapace_idmap::new_userns(map).map_err(|source| SandboxError::Idmap {
        step: "create its user namespace",
        map,
        source,
    })
}

/// Phase 3 (with `--idmap`), after [`pivot_into`] and before [`restrict`]: joins `userns`
/// (from [`new_idmap_ns`]) as its root, so the daemon is host uid and gid `BASE` with no
/// supplementary groups, holding every capability of that namespace and none of the
/// host's (restrict then reduces them to [`KEPT_CAPS`]). The process must be
/// single-threaded: checked first, for a clear error.
pub fn enter_idmap(userns: OwnedFd, map: IdMap) -> Result<(), SandboxError> {
    // /proc is the daemon's own (mounted in phase 1).
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
        });
    if let Some(threads) = threads.filter(|&t| t != 1) {
        return Err(SandboxError::Threads { map, threads });
    }
    carapace_idmap::enter(&userns).map_err(|source| SandboxError::Idmap {
        step: "enter its user namespace",
        map,
        source,
    })
}

/// Capabilities the file server keeps: acting as the guest's users on their files.
/// CAP_DAC_READ_SEARCH is needed by fuse-backend-rs's `link` (`linkat(fd, "",
/// AT_EMPTY_PATH)`, which kernels before 6.10 allow only with it); its dangerous use,
/// `open_by_handle_at`, is not in the seccomp allow-list.
pub const KEPT_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
];

/// no_new_privs, capability drop, seccomp. Works for root, for root of an id block's user
/// namespace (the sets read and changed are then that namespace's capabilities, and the
/// bounding set shrinks the same way) and for unprivileged users (an unprivileged process
/// has no capabilities to drop).
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

/// Upper bound on the daemon's open files (one `O_PATH` descriptor per inode the guest
/// holds, plus open handles): a container rootfs walk easily needs tens of thousands.
pub const MAX_NOFILE: u64 = 1 << 20;

/// Raises the open-file limit: with CAP_SYS_RESOURCE (root, before capabilities are
/// dropped) both limits go to min(`fs.nr_open`, [`MAX_NOFILE`]); otherwise the soft limit
/// goes to the hard one. This limit is what bounds the daemon's descriptors (and the
/// kernel memory behind them) whatever the guest does. Returns the new limit.
pub fn raise_nofile_limit() -> Result<u64, nix::Error> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let want = nr_open.min(MAX_NOFILE).max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}
