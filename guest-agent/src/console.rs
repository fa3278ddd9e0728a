//! Terminals of container processes: the pty is allocated inside the container, from the
//! container's own devpts instance (`/dev/ptmx -> pts/ptmx` after its mounts and
//! pivot_root, or after joining its mount namespace for an exec), so that the process
//! sees its terminal as `/dev/pts/<n>` of its own `/dev/pts`. The container-side helper
//! keeps the slave as the controlling terminal and stdio and passes the master to the
//! agent over a unix socket (`SCM_RIGHTS`), which relays it as the process's stdio.
//!
//! The raw calls (ioctls on the ptmx, wrapping a received descriptor) live here, each
//! with its SAFETY reasoning.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

/// Where the container's pty multiplexer is, as seen from inside the container.
pub const PTMX: &str = "/dev/ptmx";

/// Errors of terminal allocation and hand-over.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(
        "process.terminal: opening {PTMX} in the container (a devpts mount on /dev/pts is needed)"
    )]
    OpenPtmx(#[source] nix::Error),
    #[error("process.terminal: {op} on the container's {PTMX}")]
    Pty {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("process.terminal: {op}")]
    Socket {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("process.terminal: the helper closed the console socket without sending the terminal")]
    Closed,
    #[error("process.terminal: the helper sent {0} descriptors instead of one terminal")]
    BadMessage(usize),
    #[error("process.terminal: the descriptor received is not a terminal")]
    NotATerminal,
}

/// A pty pair allocated in the calling process's mount namespace.
#[derive(Debug)]
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

fn last_err(op: &'static str) -> ConsoleError {
    ConsoleError::Pty {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Opens [`PTMX`] (resolved in the caller's root: the container's), unlocks the new pty
/// and opens its slave through the master (TIOCGPTPEER: no path lookup of
/// `/dev/pts/<n>`, which the container could have replaced). Both ends are close-on-exec
/// and not the caller's controlling terminal yet.
pub fn open_pty() -> Result<Pty, ConsoleError> {
    let master = nix::fcntl::open(
        PTMX,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(ConsoleError::OpenPtmx)?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int through the pointer, which points to `unlock`,
    // alive for the call; on a descriptor that is not a pty master it fails with ENOTTY.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) };
    if rc != 0 {
        return Err(last_err("unlocking the pty (TIOCSPTLCK)"));
    }
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags as an integer argument and returns a new
    // descriptor (or -1); no memory is passed.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if slave < 0 {
        return Err(last_err("opening the pty slave (TIOCGPTPEER)"));
    }
    // SAFETY: the ioctl just returned this new descriptor and nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok(Pty { master, slave })
}

/// A connected pair of unix stream sockets, both close-on-exec: (agent end, helper end).
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd), ConsoleError> {
    nix::sys::socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|source| ConsoleError::Socket {
        op: "socketpair",
        source,
    })
}

/// Sends `fd` over the unix socket `sock` (one byte of data with the `SCM_RIGHTS`
/// message).
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Result<(), ConsoleError> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(b"T")];
    nix::sys::socket::sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|source| ConsoleError::Socket {
            op: "sending the terminal to the agent",
            source,
        })?;
    Ok(())
}

/// Receives one descriptor sent by [`send_fd`] (blocking). EOF without a descriptor (the
/// helper failed first) is [`ConsoleError::Closed`]; anything but exactly one descriptor
/// that is a terminal is refused (extra descriptors are closed).
pub fn recv_tty(sock: BorrowedFd<'_>) -> Result<OwnedFd, ConsoleError> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    // Room for a few descriptors, so that a message with more than one is seen (and its
    // descriptors closed) rather than truncated.
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = nix::sys::socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|source| ConsoleError::Socket {
        op: "receiving the terminal from the helper",
        source,
    })?;
    let mut received = Vec::new();
    let cmsgs = msg.cmsgs().map_err(|source| ConsoleError::Socket {
        op: "reading the control message",
        source,
    })?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel installed this descriptor in our table for this
                // message; nothing else knows of it, so it is owned exactly once here.
                received.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.bytes == 0 && received.is_empty() {
        return Err(ConsoleError::Closed);
    }
    if received.len() != 1 {
        return Err(ConsoleError::BadMessage(received.len()));
    }
    let fd = received.remove(0);
    if !nix::unistd::isatty(fd.as_fd().as_raw_fd()).unwrap_or(false) {
        return Err(ConsoleError::NotATerminal);
    }
    Ok(fd)
}

/// In the container-side helper, after setsid: allocates the pty in the container, makes
/// the slave the controlling terminal and stdin/stdout/stderr (owned by `uid`, as the
/// process's own terminal), and sends the master to the agent over `sock`.
pub fn setup_in_container(sock: OwnedFd, uid: u32) -> Result<(), ConsoleError> {
    let pty = open_pty()?;
    crate::sys::set_controlling_tty(pty.slave.as_fd()).map_err(|source| ConsoleError::Pty {
        op: "making the slave the controlling terminal",
        source,
    })?;
    nix::unistd::fchown(
        pty.slave.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        None,
    )
    .map_err(|e| ConsoleError::Pty {
        op: "chown of the slave to process.user.uid",
        source: e.into(),
    })?;
    for target in 0..=2 {
        // dup2 gives the new descriptor no close-on-exec flag: the workload keeps it.
        nix::unistd::dup2(pty.slave.as_raw_fd(), target).map_err(|e| ConsoleError::Pty {
            op: "dup2 of the slave onto stdio",
            source: e.into(),
        })?;
    }
    send_fd(sock.as_fd(), pty.master.as_fd())?;
    // Our copies of the master and the socket close here; the slave stays as stdio.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_a_terminal_and_refuses_other_descriptors() {
        let (ours, theirs) = socket_pair().unwrap();
        // A pty from this host's /dev/ptmx (the helper does the same in the container).
        let pty = open_pty().expect("a pty from /dev/ptmx");
        send_fd(theirs.as_fd(), pty.master.as_fd()).unwrap();
        let got = recv_tty(ours.as_fd()).unwrap();
        // The received master drives the same pty: a write on it reaches the slave.
        nix::unistd::write(&got, b"x\n").unwrap();
        let mut b = [0u8; 8];
        let n = nix::unistd::read(pty.slave.as_raw_fd(), &mut b).unwrap();
        assert_eq!(&b[..n], b"x\n");

        // A descriptor that is not a terminal is refused.
        let (r, _w) = nix::unistd::pipe().unwrap();
        send_fd(theirs.as_fd(), r.as_fd()).unwrap();
        assert!(matches!(
            recv_tty(ours.as_fd()),
            Err(ConsoleError::NotATerminal)
        ));
        // EOF without a descriptor.
        drop(theirs);
        assert!(matches!(recv_tty(ours.as_fd()), Err(ConsoleError::Closed)));
    }
}
