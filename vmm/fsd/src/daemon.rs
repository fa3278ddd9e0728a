//! Wires the pieces together: socket, sandbox, filesystem, vhost-user loop.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fsd_fuse_backend_rs::passthrough::PassthroughFs;
use fsd_vhost::vhost_user::{Error as VhostUserError, Listener};
use fsd_vhost_user_backend::VhostUserDaemon;
use fsd_vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Period of the lost-notification watchdog (see `FsBackend::with_watchdog`): long enough
/// that a slow but live guest never trips it, short enough that a lost notification
/// costs seconds, not a hung guest.
pub const WATCHDOG_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

use carapace_idmap::IdMap;

use crate::backend::{BackendError, FsBackend, WATCHDOG_EVENT};
use crate::config::{ConfigError, FsConfig, SandboxMode};
use crate::guard::GuardedFs;
use crate::sandbox::{self, SandboxError};
use crate::socket::{self, SocketError};

/// The filesystem the daemon serves.
pub type ServedFs = GuardedFs<PassthroughFs<()>>;

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// vhost-user socket to listen on.
    pub socket_path: PathBuf,
    /// Validated filesystem configuration.
    pub fs: FsConfig,
    /// Sandbox mode.
    pub sandbox: SandboxMode,
    /// Serve as root of this id block's user namespace (`--idmap`); only with
    /// [`SandboxMode::Namespace`].
    pub idmap: Option<IdMap>,
}

/// Errors of a daemon run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Socket problem.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// Sandbox problem.
    #[error("cannot sandbox the daemon")]
    Sandbox(#[source] SandboxError),
    /// The export root could not be opened.
    #[error("cannot open the shared directory {path} for serving")]
    Fs {
        /// Shared dir.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The device could not be set up.
    #[error("cannot set up the virtio-fs device")]
    Backend(#[source] BackendError),
    /// The vhost-user protocol loop failed.
    #[error("vhost-user {step}: {message}")]
    VhostUser {
        /// What was being done.
        step: &'static str,
        /// The library's message (its error type carries no source chain).
        message: String,
    },
}

impl DaemonError {
    /// Distinct process exit codes per kind of failure (2 is clap's usage error).
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Config(ConfigError::SharedDirPermission { .. })
            | DaemonError::Socket(SocketError::Permission { .. }) => 4,
            DaemonError::Config(_) => 3,
            DaemonError::Socket(_) => 5,
            DaemonError::Sandbox(_) => 6,
            DaemonError::Fs { .. } => 7,
            DaemonError::Backend(_) | DaemonError::VhostUser { .. } => 8,
        }
    }
}

/// Opens the export root at `root` and wraps it in the safety layer.
pub fn open_fs(cfg: &FsConfig, root: &Path) -> io::Result<ServedFs> {
    let fs = PassthroughFs::<()>::new(cfg.passthrough_config(root))?;
    fs.import()?;
    Ok(GuardedFs::new(fs, cfg.readonly, cfg.writeback)
        .with_readdirplus(cfg.cache != crate::config::CacheMode::Never)
        .with_privileges(cfg.layout, cfg.allow_setid))
}

/// Serves one vhost-user connection, then returns.
pub fn run(opts: &DaemonOptions) -> Result<(), DaemonError> {
    let cfg = &opts.fs;
    let namespace = opts.sandbox == SandboxMode::Namespace;
    // The id block's user namespace is made first, while the daemon is still root of the
    // host's (every step up to pivot_into needs that), and entered after pivot_into.
    let userns = match opts.idmap {
        Some(map) if namespace => Some((
            sandbox::new_idmap_ns(map).map_err(DaemonError::Sandbox)?,
            map,
        )),
        Some(_) => {
            return Err(DaemonError::Config(ConfigError::OutOfRange {
                field: "--idmap",
                reason: "needs --sandbox namespace".to_owned(),
            }));
        }
        None => None,
    };
    // Needs CAP_SYS_RESOURCE of the host's user namespace: before entering the block's.
    match sandbox::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    let socket::BoundSocket {
        listener,
        lock: _socket_lock,
    } = socket::listen(&opts.socket_path)?;
    let export = if namespace {
        sandbox::enter_namespaces(&cfg.shared_dir, cfg.readonly).map_err(DaemonError::Sandbox)?
    } else {
        cfg.shared_dir.clone()
    };
    let fs = open_fs(cfg, &export).map_err(|source| DaemonError::Fs {
        path: cfg.shared_dir.clone(),
        source,
    })?;
    if namespace {
        sandbox::pivot_into(&cfg.shared_dir).map_err(DaemonError::Sandbox)?;
    }
    // Still single-threaded here: the tracing subscriber, the socket and the passthrough
    // start no thread; the vhost-user daemon and the worker pool start theirs below.
    if let Some((ns, map)) = userns {
        sandbox::enter_idmap(ns, map).map_err(DaemonError::Sandbox)?;
        tracing::info!("serving as uid {} (root of id block {map})", map.host_base);
    }
    // Created and armed before seccomp, which then only needs read() on it.
    let watchdog = TimerFd::new()
        .and_then(|mut t| {
            t.reset(WATCHDOG_PERIOD, Some(WATCHDOG_PERIOD))?;
            Ok(t)
        })
        .map_err(|e| {
            DaemonError::Backend(BackendError::Watchdog(io::Error::from_raw_os_error(
                e.errno(),
            )))
        })?;
    // Before any thread exists, so every thread inherits the restrictions.
    sandbox::restrict().map_err(DaemonError::Sandbox)?;

    let backend = Arc::new(
        FsBackend::new(Arc::new(fs), cfg.thread_pool_size)
            .map_err(DaemonError::Backend)?
            .with_watchdog(watchdog),
    );
    let watchdog_fd = backend.watchdog_fd();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon =
        VhostUserDaemon::new("carapace-fsd".to_string(), backend, mem).map_err(|e| {
            DaemonError::VhostUser {
                step: "setup",
                message: e.to_string(),
            }
        })?;
    if let (Some(fd), Some(handler)) = (watchdog_fd, daemon.get_epoll_handlers().first()) {
        handler
            .register_listener(fd, EventSet::IN, u64::from(WATCHDOG_EVENT))
            .map_err(|e| DaemonError::VhostUser {
                step: "watchdog registration",
                message: e.to_string(),
            })?;
    }
    tracing::info!(
        socket = %opts.socket_path.display(),
        shared_dir = %cfg.shared_dir.display(),
        readonly = cfg.readonly,
        cache = ?cfg.cache,
        sandbox = ?opts.sandbox,
        idmap = %opts.idmap.map_or_else(|| "none".to_owned(), |m| m.to_string()),
        "waiting for the vhost-user frontend"
    );
    let mut listener = Listener::from(listener);
    daemon
        .start(&mut listener)
        .map_err(|e| DaemonError::VhostUser {
            step: "accept",
            message: e.to_string(),
        })?;
    tracing::info!("frontend connected");
    match daemon.wait() {
        Ok(()) => Ok(()),
        Err(fsd_vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(DaemonError::VhostUser {
            step: "serve",
            message: e.to_string(),
        }),
    }?;
    tracing::info!("frontend disconnected, exiting");
    Ok(())
}
