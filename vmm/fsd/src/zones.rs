//! Where an inode lives in the export, and whether the guest may give files privileges
//! (setuid/setgid bits, file capabilities) there.
//!
//! A Carapace sandbox exports `<cid>/rootfs` (the container's own snapshot) and
//! `<cid>/mounts/<n>` (its volumes, often host directories that host users also use). A
//! setuid-root binary a guest leaves in a hostPath volume is a way to root for any host user
//! who can run it; in the container's own rootfs it reaches nobody on the host. So outside
//! rootfs trees (and everywhere in a plain export) the daemon:
//! - strips `S_ISUID`, and `S_ISGID` from anything but a directory, from the modes of
//!   chmod, create and mknod;
//! - lets the host kernel clear them on writes and truncation (killpriv): it runs those
//!   without CAP_FSETID;
//! - refuses to set the `security.capability` xattr.
//!
//! The zone of an inode is learnt when the guest first reaches it (lookup, create, mkdir,
//! mknod, symlink, link, readdirplus), from its parent's zone and its name. An inode whose
//! zone is not known (forgotten, never looked up) gets the strict rules.

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::Mutex;

/// The FUSE root inode.
const ROOT: u64 = 1;

/// The shape of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// Any directory: the strict rules everywhere.
    #[default]
    Plain,
    /// A Carapace sandbox's shared directory (`<cid>/rootfs`, `<cid>/mounts/<n>`).
    Sandbox,
}

/// Where an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// The export's root (sandbox layout).
    Top,
    /// `<cid>`.
    Container,
    /// `<cid>/mounts`.
    Mounts,
    /// `<cid>/rootfs` and everything below it: the container's own snapshot.
    Rootfs,
    /// Everything else: volumes, a plain export, anything unknown.
    Volume,
}

/// The zones of the inodes the guest holds.
#[derive(Debug, Default)]
pub struct Zones {
    layout: Layout,
    map: Mutex<HashMap<u64, Zone>>,
}

impl Zones {
    /// Zones for an export of `layout`.
    pub fn new(layout: Layout) -> Self {
        Zones {
            layout,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The zone of `inode` (strict when unknown).
    pub fn of(&self, inode: u64) -> Zone {
        if inode == ROOT {
            return match self.layout {
                Layout::Sandbox => Zone::Top,
                Layout::Plain => Zone::Volume,
            };
        }
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&inode)
            .copied()
            .unwrap_or(Zone::Volume)
    }

    /// The zone of entry `name` of directory `parent`.
    pub fn child(&self, parent: u64, name: &[u8]) -> Zone {
        match (self.of(parent), name) {
            (Zone::Top, _) => Zone::Container,
            (Zone::Container, b"rootfs") => Zone::Rootfs,
            (Zone::Container, b"mounts") => Zone::Mounts,
            (Zone::Rootfs, _) => Zone::Rootfs,
            _ => Zone::Volume,
        }
    }

    /// Records that the guest reached `inode` as `name` in `parent`.
    pub fn record(&self, parent: u64, name: &[u8], inode: u64) {
        if inode == 0 || inode == ROOT {
            return;
        }
        let zone = self.child(parent, name);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // A hard link reached from a stricter zone keeps the stricter rules.
        let z = map.entry(inode).or_insert(zone);
        if zone == Zone::Volume {
            *z = Zone::Volume;
        }
    }

    /// The guest forgot `inode` (its zone is learnt again if it comes back).
    pub fn forget(&self, inode: u64) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&inode);
    }

    /// Whether files of `inode` may carry setuid/setgid bits and file capabilities.
    pub fn privileges_allowed(&self, inode: u64) -> bool {
        self.of(inode) == Zone::Rootfs
    }
}

/// `mode` without `S_ISUID`, and without `S_ISGID` unless it is a directory's (where it only
/// makes new entries inherit the group).
pub fn strip_setid(mode: u32, is_dir: bool) -> u32 {
    let mut m = mode & !libc::S_ISUID;
    if !is_dir {
        m &= !libc::S_ISGID;
    }
    m
}

/// Whether an xattr name is one that grants privileges (file capabilities).
pub fn is_privilege_xattr(name: &CStr) -> bool {
    name.to_bytes() == b"security.capability"
}

/// While alive, the calling thread runs without CAP_FSETID in its effective set, so the
/// host kernel clears setuid/setgid bits on writes and truncation (as it does for any
/// unprivileged writer).
#[derive(Debug)]
pub struct NoFsetid {
    raised: bool,
}

impl NoFsetid {
    /// Drops CAP_FSETID from this thread's effective set if it is there.
    pub fn new() -> std::io::Result<Self> {
        use caps::{CapSet, Capability};
        let had = caps::has_cap(None, CapSet::Effective, Capability::CAP_FSETID)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if had {
            caps::drop(None, CapSet::Effective, Capability::CAP_FSETID)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(NoFsetid { raised: had })
    }
}

impl Drop for NoFsetid {
    fn drop(&mut self) {
        if self.raised
            && let Err(e) = caps::raise(None, caps::CapSet::Effective, caps::Capability::CAP_FSETID)
        {
            tracing::error!(error = %e, "cannot raise CAP_FSETID again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> &[u8] {
        s.as_bytes()
    }

    #[test]
    fn zones_follow_the_sandbox_layout() {
        let z = Zones::new(Layout::Sandbox);
        z.record(ROOT, c("c1"), 10);
        z.record(10, c("rootfs"), 11);
        z.record(11, c("usr"), 12);
        z.record(10, c("mounts"), 13);
        z.record(13, c("0"), 14);
        z.record(14, c("data"), 15);
        z.record(10, c("other"), 16);
        assert_eq!(z.of(ROOT), Zone::Top);
        assert_eq!(z.of(10), Zone::Container);
        assert_eq!(z.of(12), Zone::Rootfs);
        assert_eq!(z.of(13), Zone::Mounts);
        assert_eq!(z.of(15), Zone::Volume);
        assert_eq!(z.of(16), Zone::Volume);
        assert_eq!(z.of(99), Zone::Volume, "unknown: strict");
        assert!(z.privileges_allowed(12) && !z.privileges_allowed(15));
        // A rootfs file also reached through a volume (a hard link) is treated strictly.
        z.record(14, c("link"), 12);
        assert!(!z.privileges_allowed(12));
        z.forget(11);
        assert_eq!(z.of(11), Zone::Volume);
    }

    #[test]
    fn a_plain_export_is_strict_everywhere() {
        let z = Zones::new(Layout::Plain);
        z.record(ROOT, c("rootfs"), 5);
        assert!(!z.privileges_allowed(ROOT) && !z.privileges_allowed(5));
    }

    #[test]
    fn setid_bits_are_stripped_but_a_directory_keeps_setgid() {
        assert_eq!(strip_setid(0o104755, false), 0o100755);
        assert_eq!(strip_setid(0o102755, false), 0o100755);
        assert_eq!(strip_setid(0o46775, true), 0o42775);
        assert_eq!(strip_setid(0o644, false), 0o644);
    }
}
