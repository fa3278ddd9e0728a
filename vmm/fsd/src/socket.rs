//! The vhost-user listening socket, with clear errors for the usual mistakes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Errors while preparing the socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process is accepting connections on the path.
    #[error("socket {path}: in use (another daemon is listening on it)")]
    InUse {
        /// Socket path.
        path: PathBuf,
    },
    /// The path exists and is something else than a socket.
    #[error("socket {path}: exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// Socket path.
        path: PathBuf,
    },
    /// The directory of the socket does not exist.
    #[error("socket {path}: directory {dir} does not exist")]
    DirMissing {
        /// Socket path.
        path: PathBuf,
        /// Its parent directory.
        dir: PathBuf,
    },
    /// Not allowed to create the socket.
    #[error("socket {path}: no permission to create it")]
    Permission {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Any other error.
    #[error("socket {path}: cannot listen")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// A bound listening socket and the lock that marks it as ours.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listener.
    pub listener: UnixListener,
    /// Held for the daemon's lifetime: `<socket>.lock`, exclusively flock'ed.
    pub lock: SocketLock,
}

/// The exclusive lock on `<socket>.lock`; released when dropped.
#[derive(Debug)]
pub struct SocketLock(#[allow(dead_code)] Flock<File>);

/// Binds a listening socket at `path`.
///
/// "In use" is detected without connecting (a connection would be taken by the other
/// daemon as its VMM): another carapace-fsd holds `<path>.lock`, or any process has a
/// listening socket bound at `path` (from `/proc/net/unix`). A stale socket left by a
/// dead daemon is replaced; anything that is not a socket is an error.
pub fn listen(path: &Path) -> Result<BoundSocket, SocketError> {
    let p = path.to_path_buf();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(SocketError::DirMissing {
            path: p,
            dir: dir.to_path_buf(),
        });
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| classify(p.clone(), source))?;
    let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, Errno::EWOULDBLOCK)) => return Err(SocketError::InUse { path: p }),
        Err((_, errno)) => return Err(classify(p, io::Error::from(errno))),
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(SocketError::NotASocket { path: p });
            }
            if is_listening(path) {
                return Err(SocketError::InUse { path: p });
            }
            tracing::info!(path = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(|source| classify(p.clone(), source))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(classify(p, source)),
    }
    let listener = UnixListener::bind(path).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => SocketError::InUse { path: p },
        _ => classify(p, source),
    })?;
    Ok(BoundSocket {
        listener,
        lock: SocketLock(lock),
    })
}

/// Whether some process in this network namespace listens on a socket bound at `path`.
fn is_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(name)) = (cols.get(3), cols.get(7)) else {
            return false;
        };
        let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & SO_ACCEPTCON != 0);
        listening && (Path::new(name) == path || Path::new(name) == want)
    })
}

fn classify(path: PathBuf, source: io::Error) -> SocketError {
    match source.kind() {
        io::ErrorKind::PermissionDenied => SocketError::Permission { path, source },
        _ => SocketError::Io { path, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_use_stale_and_not_socket() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("fs.sock");
        let l = listen(&sock).unwrap();
        assert!(matches!(listen(&sock), Err(SocketError::InUse { .. })));
        // A listener of another program (no lock file held) is detected as well.
        let other = d.path().join("other.sock");
        let _o = UnixListener::bind(&other).unwrap();
        assert!(matches!(listen(&other), Err(SocketError::InUse { .. })));
        drop(l);
        // The file stays behind; nobody listens: it is replaced.
        assert!(sock.exists());
        let _l2 = listen(&sock).unwrap();

        let file = d.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(listen(&file), Err(SocketError::NotASocket { .. })));

        let missing = d.path().join("nope/fs.sock");
        let err = listen(&missing).unwrap_err();
        assert!(matches!(err, SocketError::DirMissing { .. }), "{err}");
    }
}
