//! Running netlink work inside another network namespace: a dedicated thread enters the
//! namespace with `setns(CLONE_NEWNET)` (only that thread changes namespace; the caller's
//! never does), opens a netlink socket there (a socket belongs to the namespace it was
//! created in) and drives it on a current-thread tokio runtime.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use serde::{Deserialize, Serialize};

use super::NetworkError;

/// Which namespace a path named when it was opened (the nsfs device and inode), so that a
/// later teardown does not act on another namespace that reuses the path (a recycled pid
/// in `/proc/<pid>/ns/net`, a re-created bind mount).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    /// `st_dev` of the namespace file.
    pub dev: u64,
    /// `st_ino` of the namespace file.
    pub ino: u64,
}

/// An open network namespace.
#[derive(Debug)]
pub(super) struct Netns {
    file: File,
    pub(super) path: PathBuf,
    pub(super) id: NetnsId,
}

/// Opening a namespace path: gone, or failed.
pub(super) enum OpenError {
    /// The path does not exist (or names a process that is gone).
    Missing(NetworkError),
    /// Anything else.
    Failed(NetworkError),
}

impl From<OpenError> for NetworkError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Missing(e) | OpenError::Failed(e) => e,
        }
    }
}

impl Netns {
    /// Opens `path` (a bind-mounted namespace file or `/proc/<pid>/ns/net`).
    pub(super) fn open(path: &Path) -> Result<Netns, OpenError> {
        let file = File::open(path).map_err(|source| {
            let missing = source.kind() == io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ESRCH);
            let e = if missing {
                NetworkError::NoNetns {
                    path: path.to_owned(),
                    source,
                }
            } else {
                NetworkError::Netns {
                    what: "opening",
                    path: path.to_owned(),
                    source,
                }
            };
            if missing {
                OpenError::Missing(e)
            } else {
                OpenError::Failed(e)
            }
        })?;
        let meta = file.metadata().map_err(|source| {
            OpenError::Failed(NetworkError::Netns {
                what: "reading the attributes of",
                path: path.to_owned(),
                source,
            })
        })?;
        Ok(Netns {
            file,
            path: path.to_owned(),
            id: NetnsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    /// Runs `work` on a new thread inside this namespace, with a netlink connection
    /// opened there, and waits for it. Blocking: call it off an async executor.
    pub(super) fn run<T, W>(&self, work: W) -> Result<T, NetworkError>
    where
        T: Send,
        W: FnOnce(&Netlink) -> Result<T, NetworkError> + Send,
    {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("carapace-netns".into())
                .spawn_scoped(scope, || {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| {
                        if errno == nix::errno::Errno::EINVAL {
                            NetworkError::NotNetns {
                                path: self.path.clone(),
                            }
                        } else {
                            NetworkError::Netns {
                                what: "entering",
                                path: self.path.clone(),
                                source: errno.into(),
                            }
                        }
                    })?;
                    let netlink = Netlink::connect(&self.path)?;
                    work(&netlink)
                })
                .map_err(|source| NetworkError::Step {
                    step: "starting a thread for".into(),
                    netns: self.path.clone(),
                    source,
                })?;
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// A netlink connection in the namespace of the thread that made it, with the runtime
/// that drives it.
#[derive(Debug)]
pub(super) struct Netlink {
    runtime: tokio::runtime::Runtime,
    pub(super) handle: rtnetlink::Handle,
    pub(super) netns: PathBuf,
}

impl Netlink {
    fn connect(netns: &Path) -> Result<Netlink, NetworkError> {
        let step = |source| NetworkError::Step {
            step: "opening a netlink socket".into(),
            netns: netns.to_owned(),
            source,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(step)?;
        // The socket must be made on this thread (inside the namespace) and registered
        // with this runtime's reactor.
        let (connection, handle, _) = {
            let _context = runtime.enter();
            rtnetlink::new_connection().map_err(step)?
        };
        runtime.spawn(connection);
        Ok(Netlink {
            runtime,
            handle,
            netns: netns.to_owned(),
        })
    }

    /// Runs one netlink exchange to completion.
    pub(super) fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// An error of `step` (for example "adding the ingress qdisc to eth0") in this
    /// namespace.
    pub(super) fn error(&self, step: impl Into<String>, source: rtnetlink::Error) -> NetworkError {
        NetworkError::Step {
            step: step.into(),
            netns: self.netns.clone(),
            source: io_error(source),
        }
    }
}

/// A netlink error as an `io::Error`: the kernel's errno when it sent one, so that the
/// message reads "Operation not permitted" rather than a debug dump.
pub(super) fn io_error(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// The errno of a netlink error, if the kernel sent one.
pub(super) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => Some(m.raw_code().abs()),
        _ => None,
    }
}
