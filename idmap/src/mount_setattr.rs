//! `mount_setattr(2)`, which neither rustix nor nix wraps yet: the one way to make a whole
//! mount tree read-only (`AT_RECURSIVE`), to give a mount an id mapping
//! (`MOUNT_ATTR_IDMAP`), and to set its attributes while it is still detached, before
//! anyone can see it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Mount attributes to set on a detached tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attrs<'a> {
    /// `MOUNT_ATTR_RDONLY`.
    pub read_only: bool,
    /// `MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV`.
    pub nosuid_nodev: bool,
    /// Propagation `MS_PRIVATE`: the tree leaves whatever peer group its source is in.
    pub private: bool,
    /// `MOUNT_ATTR_IDMAP` with this user namespace: the mount shows (and writes) each
    /// file's id `k` as the host id the namespace maps `k` to. Only on a detached tree
    /// (`OPEN_TREE_CLONE`) that has no id mapping yet, on file systems that support it.
    pub idmap: Option<BorrowedFd<'a>>,
}

/// Sets `attrs` on the mount `tree` (an `open_tree` descriptor), on every mount beneath it
/// too when `recursive`.
pub fn set(tree: impl AsFd, attrs: Attrs<'_>, recursive: bool) -> std::io::Result<()> {
    let mut set = 0u64;
    if attrs.read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    if attrs.nosuid_nodev {
        set |= libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    }
    let mut userns_fd = 0u64;
    if let Some(ns) = attrs.idmap {
        set |= libc::MOUNT_ATTR_IDMAP;
        userns_fd = u64::try_from(ns.as_raw_fd()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "negative descriptor")
        })?;
    }
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: if attrs.private { libc::MS_PRIVATE } else { 0 },
        userns_fd,
    };
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: the path is a valid NUL-terminated empty string (AT_EMPTY_PATH: the operation
    // applies to the descriptor itself, which `tree` keeps open for the call), and `attr`
    // is a fully initialised `struct mount_attr` whose size is passed with it; the kernel
    // only reads it. The user namespace descriptor, when given, is borrowed for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_fd().as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
