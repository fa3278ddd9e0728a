//! runc's `--console-socket` protocol: the runtime allocates a terminal and sends its
//! master side, as an `SCM_RIGHTS` message, to the caller listening on a unix socket
//! (podman/conmon do this for `-t`). Here the terminal is a host pty whose slave side is
//! handed to the stdio relay, which forwards it to the guest process's own terminal.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};

/// Errors of the console hand-off.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No pty could be allocated.
    #[error("cannot allocate a pseudo-terminal")]
    Pty(#[source] nix::Error),
    /// The caller's socket did not accept us.
    #[error("cannot connect to console socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Sending the master fd failed.
    #[error("cannot send the terminal to console socket {path}")]
    Send {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
}

/// Allocates a pty, sends its master to the console socket `path` and returns the slave
/// (in raw mode: line discipline and echo happen in the guest's own terminal).
pub fn hand_off(path: &Path) -> Result<OwnedFd, ConsoleError> {
    let pty = nix::pty::openpty(None, None).map_err(ConsoleError::Pty)?;
    let mut raw = tcgetattr(&pty.slave).map_err(ConsoleError::Pty)?;
    cfmakeraw(&mut raw);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &raw).map_err(ConsoleError::Pty)?;
    let sock = UnixStream::connect(path).map_err(|source| ConsoleError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    // runc sends the terminal's name as the payload; callers only use the fd.
    let name = b"/dev/ptmx";
    let fds = [pty.master.as_raw_fd()];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|source| ConsoleError::Send {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(pty.slave)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessageOwned, recvmsg};
    use std::io::{IoSliceMut, Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;

    #[test]
    fn master_arrives_and_talks_to_the_slave() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let receiver = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                .unwrap();
            let mut fd = None;
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(f) = c {
                    fd = f.first().copied();
                }
            }
            // SAFETY: the fd was just received with SCM_RIGHTS: this process owns it and
            // nothing else refers to it.
            unsafe { std::fs::File::from_raw_fd(fd.expect("an fd")) }
        });
        let slave = hand_off(&path).unwrap();
        let mut master = receiver.join().unwrap();
        let mut slave = std::fs::File::from(slave);
        slave.write_all(b"from the container").unwrap();
        let mut buf = [0u8; 18];
        master.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"from the container");
        master.write_all(b"typed\n").unwrap();
        let mut buf = [0u8; 6];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"typed\n");
    }

    #[test]
    fn missing_socket_is_named() {
        let err = hand_off(Path::new("/nonexistent/console.sock")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/console.sock"),
            "{err}"
        );
    }
}
