//! The safety layer in front of fuse-backend-rs's passthrough filesystem.
//!
//! fuse-backend-rs resolves every name as one component with `openat(parent_fd, name,
//! O_PATH | O_NOFOLLOW)` from an `O_PATH` handle of the parent, and re-opens inodes for I/O
//! only through `/proc/self/fd/N` of regular files and directories. That already keeps a
//! single well-formed name beneath its parent. What it still allows, and this wrapper
//! refuses before the request reaches it:
//! - `..` and `.` in lookup (it allows them "for NFS export"; `..` from a directory that a
//!   host process moved out of the shared dir would walk out of it), names with `/`, empty
//!   names, names over 255 bytes: `EINVAL` / `ENAMETOOLONG` on every name-carrying request;
//! - device nodes: `mknod` only creates FIFOs, sockets and regular files (`EPERM` otherwise),
//!   so a guest cannot mint a block device that the host could be tricked into using;
//! - writes of any kind when the export is read-only (`EROFS`), including `open` for
//!   writing or with `O_TRUNC`, and `statfs` reports `ST_RDONLY`;
//! - file privileges outside a container's own rootfs ([`crate::zones`]): setuid/setgid
//!   bits are stripped from chmod/create/mknod modes and cleared by writes and
//!   truncation (killpriv), and `security.capability` cannot be set, unless the daemon
//!   was started with `--allow-setid`.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fsd_fuse_backend_rs::abi::fuse_abi::{
    CreateIn, FsOptions, OpenOptions, SetattrValid, stat64, statvfs64,
};
use fsd_fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};

use crate::zones::{Layout, NoFsetid, Zones, is_privilege_xattr, strip_setid};

/// Longest name a Linux filesystem accepts.
const NAME_MAX: usize = 255;

/// Checks that `name` is one ordinary path component.
pub fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    if b.len() > NAME_MAX {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    Ok(())
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// Wraps a FUSE filesystem and enforces the rules listed in the module documentation.
#[derive(Debug)]
pub struct GuardedFs<F> {
    inner: F,
    readonly: bool,
    writeback: bool,
    readdirplus: bool,
    zones: Zones,
    allow_setid: bool,
}

impl<F> GuardedFs<F> {
    /// Wraps `inner`; with `readonly`, every modifying request fails with `EROFS`;
    /// `writeback` lets the guest use a writeback cache (never with `readonly`).
    pub fn new(inner: F, readonly: bool, writeback: bool) -> Self {
        GuardedFs {
            inner,
            readonly,
            writeback: writeback && !readonly,
            readdirplus: true,
            zones: Zones::new(Layout::Plain),
            allow_setid: false,
        }
    }

    /// The export's layout (which trees may hold setuid files, see [`crate::zones`]) and
    /// whether the guest may set file privileges everywhere (`--allow-setid`).
    pub fn with_privileges(mut self, layout: Layout, allow_setid: bool) -> Self {
        self.zones = Zones::new(layout);
        self.allow_setid = allow_setid;
        self
    }

    /// Whether the guest may give files of `inode` privileges.
    fn privileges_allowed(&self, inode: u64) -> bool {
        self.allow_setid || self.zones.privileges_allowed(inode)
    }

    /// Records the zone of an entry the guest now holds.
    fn reached(&self, parent: u64, name: &CStr, r: io::Result<Entry>) -> io::Result<Entry> {
        if let Ok(e) = &r {
            self.zones.record(parent, name.to_bytes(), e.inode);
        }
        r
    }

    /// Whether to offer READDIRPLUS (on by default). Off for `--cache never`, as
    /// virtiofsd does: its entries carry zero timeouts there, so the guest gains nothing,
    /// while each entry costs the daemon a lookup (open + statx + inode record) and the
    /// guest a FORGET later.
    pub fn with_readdirplus(mut self, on: bool) -> Self {
        self.readdirplus = on;
        self
    }

    /// The wrapped filesystem.
    pub fn inner(&self) -> &F {
        &self.inner
    }

    fn writable(&self) -> io::Result<()> {
        if self.readonly { Err(erofs()) } else { Ok(()) }
    }

    fn check_open_flags(&self, flags: u32) -> io::Result<()> {
        if self.readonly {
            let flags = flags as i32;
            if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                return Err(erofs());
            }
        }
        Ok(())
    }
}

/// FUSE INIT options this daemon asks for whenever the guest offers them (the server
/// replies with the intersection):
/// - `BIG_WRITES` + `MAX_PAGES`: max_write and max_pages of 1 MiB / 256 pages (the
///   server's request bound), instead of the 8 KiB default: one request per MiB.
/// - `ASYNC_READ`, `ASYNC_DIO`: the guest may have several reads / direct I/Os of one
///   file in flight.
/// - `PARALLEL_DIROPS`: lookups and readdirs of one directory are not serialised by the
///   guest (the passthrough has no per-directory state that needs it).
/// - `AUTO_INVAL_DATA`: the guest drops cached pages when it sees mtime/size change
///   (cache=auto).
/// - `ATOMIC_O_TRUNC`: `O_TRUNC` comes with the open (which the passthrough passes to
///   the reopen) instead of a separate setattr round trip. The read-only guard refuses
///   it in `open`.
pub const ALWAYS_WANTED: FsOptions = FsOptions::BIG_WRITES
    .union(FsOptions::MAX_PAGES)
    .union(FsOptions::ASYNC_READ)
    .union(FsOptions::ASYNC_DIO)
    .union(FsOptions::PARALLEL_DIROPS)
    .union(FsOptions::AUTO_INVAL_DATA)
    .union(FsOptions::ATOMIC_O_TRUNC);

/// FUSE INIT options never enabled, whatever the guest offers: zero-message open/opendir
/// (no handles), killpriv v2 (the guest kernel clears setuid bits itself, as under
/// fuse-backend-rs's VFS defaults), per-file DAX (no DAX window), POSIX/flock locks
/// (kept guest-local, see the README).
pub const NEVER_OFFERED: FsOptions = FsOptions::ZERO_MESSAGE_OPEN
    .union(FsOptions::ZERO_MESSAGE_OPENDIR)
    .union(FsOptions::HANDLE_KILLPRIV_V2)
    .union(FsOptions::PERFILE_DAX)
    .union(FsOptions::POSIX_LOCKS)
    .union(FsOptions::FLOCK_LOCKS);

/// Only FIFOs, sockets and regular files may be created with mknod.
fn check_mknod_mode(mode: u32) -> io::Result<()> {
    match mode & libc::S_IFMT {
        libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFREG | 0 => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EPERM)),
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> FileSystem for GuardedFs<F> {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // fuse-backend-rs's passthrough, when it does not import its root itself (we
        // import before the sandbox), assumes it runs under its VFS layer and turns on
        // whatever the guest offers: zero-message open/opendir (no handles, so e.g.
        // lseek fails), the writeback cache, killpriv v2 and per-file DAX. Offer only
        // what we want.
        let mut capable = capable;
        capable.remove(NEVER_OFFERED);
        if !self.writeback {
            capable.remove(FsOptions::WRITEBACK_CACHE);
        }
        // The same layer is also where the transfer-size and concurrency options come
        // from (its VFS adds them); the passthrough alone only asks for readdirplus. The
        // server answers `capable & returned`, and without BIG_WRITES/MAX_PAGES it
        // announces max_write = 8 KiB: every 1 MiB guest write became ~128 requests.
        let mut want = self.inner.init(capable)? | ALWAYS_WANTED;
        if !self.readdirplus {
            want.remove(FsOptions::DO_READDIRPLUS | FsOptions::READDIRPLUS_AUTO);
        }
        Ok(want & !NEVER_OFFERED)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        self.reached(parent, name, self.inner.lookup(ctx, parent, name))
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.zones.forget(inode);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, _) in &requests {
            self.zones.forget(*inode);
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        if self.privileges_allowed(inode) {
            return self.inner.setattr(ctx, inode, attr, handle, valid);
        }
        let mut attr = attr;
        if valid.contains(SetattrValid::MODE) {
            let is_dir = attr.st_mode & libc::S_IFMT == libc::S_IFDIR;
            attr.st_mode = strip_setid(attr.st_mode, is_dir);
        }
        // Truncation clears setuid/setgid as for any unprivileged writer.
        let _killpriv = if valid.contains(SetattrValid::SIZE) {
            Some(NoFsetid::new()?)
        } else {
            None
        };
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        // The target is stored as data; it is resolved by the guest, never by this daemon.
        if linkname.to_bytes().is_empty() || linkname.to_bytes().len() > libc::PATH_MAX as usize {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.reached(
            parent,
            name,
            self.inner.symlink(ctx, linkname, parent, name),
        )
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        check_mknod_mode(mode)?;
        let mode = if self.privileges_allowed(inode) {
            mode
        } else {
            strip_setid(mode, false)
        };
        self.reached(
            inode,
            name,
            self.inner.mknod(ctx, inode, name, mode, rdev, umask),
        )
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        let mode = if self.privileges_allowed(parent) {
            mode
        } else {
            strip_setid(mode, true)
        };
        self.reached(
            parent,
            name,
            self.inner.mkdir(ctx, parent, name, mode, umask),
        )
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        check_name(oldname)?;
        check_name(newname)?;
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE | libc::RENAME_WHITEOUT;
        if flags & !known != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        check_name(newname)?;
        self.reached(
            newparent,
            newname,
            self.inner.link(ctx, inode, newparent, newname),
        )
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.check_open_flags(flags)?;
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        check_name(name)?;
        let mut args = args;
        if !self.privileges_allowed(parent) {
            args.mode = strip_setid(args.mode, false);
        }
        let r = self.inner.create(ctx, parent, name, args);
        if let Ok((e, ..)) = &r {
            self.zones.record(parent, name.to_bytes(), e.inode);
        }
        r
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        // Writing clears setuid/setgid as for any unprivileged writer (killpriv).
        let _killpriv = if self.privileges_allowed(inode) {
            None
        } else {
            Some(NoFsetid::new()?)
        };
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(ctx, inode)?;
        if self.readonly {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        if is_privilege_xattr(name) && !self.privileges_allowed(inode) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let zones = &self.zones;
        let mut record = |d: DirEntry, e: Entry| {
            zones.record(inode, d.name, e.inode);
            add_entry(d, e)
        };
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut record)
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if self.readonly && mask & libc::W_OK as u32 != 0 {
            return Err(erofs());
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}

#[cfg(test)]
mod tests;
