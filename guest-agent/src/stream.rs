//! Non-blocking pipe/pty ends driven by tokio's reactor. The agent reads a process's
//! output only when the host asks (ReadStdout/ReadStderr), so a slow host back-pressures
//! the process through the full pipe instead of growing agent memory.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

#[derive(Debug)]
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open, refers to the
        // same file description and returns the same number until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Reads up to `buf.len()` bytes; 0 means EOF (EIO from a pty whose other side is
    /// gone counts as EOF).
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| {
                nix::unistd::read(inner.get_ref().as_raw_fd(), buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes some of `buf`, waiting until the pipe has room.
    pub async fn write(&self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| {
                nix::unistd::write(inner.get_ref().as_fd(), buf).map_err(std::io::Error::from)
            }) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}
