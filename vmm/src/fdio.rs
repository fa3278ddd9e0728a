//! Adopting inherited file descriptors.

use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};

/// Duplicates the inherited descriptor `fd` into a `File` (the original stays open).
pub fn file_from_fd(fd: i32) -> std::io::Result<File> {
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EBADF));
    }
    // fcntl(F_GETFD) tells us whether `fd` is open before we borrow it.
    // SAFETY: F_GETFD only queries descriptor flags; it has no memory-safety requirements.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just checked to be open, and the borrow only lives for the clone below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned: OwnedFd = borrowed.try_clone_to_owned()?;
    Ok(File::from(owned))
}
