//! Unit tests of every operation, and escape attempts, against a temp dir, calling the
//! filesystem layer (GuardedFs over the passthrough) directly, as the FUSE server would.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use fsd_fuse_backend_rs::abi::fuse_abi::{CreateIn, FsOptions, SetattrValid, stat64};
use fsd_fuse_backend_rs::api::filesystem::{
    Context, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader, ZeroCopyWriter,
};
use fsd_fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fsd_fuse_backend_rs::common::file_traits::FileReadWriteVolatile;

use crate::config::{CacheMode, FsConfig};
use crate::daemon::{ServedFs, open_fs};

const ROOT: u64 = 1;

/// Guest data to be written, as the FUSE server would hand it over.
pub(crate) struct VecReader {
    data: Vec<u8>,
    pos: usize,
}

impl io::Read for VecReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl ZeroCopyReader for VecReader {
    fn read_to(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        let n = count.min(self.data.len() - self.pos);
        let ptr = self.data[self.pos..].as_mut_ptr();
        // SAFETY: `ptr` points to `n` initialised bytes of `self.data`, which is neither
        // moved nor resized while the slice is used in this call.
        let slice = unsafe { FileVolatileSlice::from_raw_ptr(ptr, n) };
        let written = f.write_at_volatile(slice, off)?;
        self.pos += written;
        Ok(written)
    }
}

/// Collects data read for the guest.
pub(crate) struct VecWriter {
    pub(crate) data: Vec<u8>,
}

impl io::Write for VecWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for VecWriter {
    fn write_from(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        let mut tmp = vec![0u8; count];
        // SAFETY: `tmp` owns `count` bytes and outlives the slice, used only in this call.
        let slice = unsafe { FileVolatileSlice::from_raw_ptr(tmp.as_mut_ptr(), count) };
        let n = f.read_at_volatile(slice, off)?;
        self.data.extend_from_slice(&tmp[..n]);
        Ok(n)
    }
    fn available_bytes(&self) -> usize {
        usize::MAX
    }
}

pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) fs: ServedFs,
    pub(crate) ctx: Context,
}

pub(crate) fn fixture_with(cache: CacheMode, readonly: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    fixture_in(dir, cache, readonly)
}

pub(crate) fn fixture_in(dir: tempfile::TempDir, cache: CacheMode, readonly: bool) -> Fixture {
    let cfg = FsConfig::new(dir.path(), cache, readonly, true, false, 0).unwrap();
    let fs = open_fs(&cfg, &cfg.shared_dir).unwrap();
    // A guest offering everything, as Linux does.
    let opts = fs.init(FsOptions::all()).unwrap();
    assert!(!opts.contains(FsOptions::ZERO_MESSAGE_OPEN), "{opts:?}");
    assert!(!opts.contains(FsOptions::ZERO_MESSAGE_OPENDIR), "{opts:?}");
    assert!(!opts.contains(FsOptions::WRITEBACK_CACHE), "{opts:?}");
    assert!(!opts.intersects(crate::guard::NEVER_OFFERED), "{opts:?}");
    // 1 MiB requests and concurrency (the passthrough alone asks for neither).
    assert!(opts.contains(crate::guard::ALWAYS_WANTED), "{opts:?}");
    // SAFETY: geteuid/getegid have no preconditions.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: as above.
    let gid = unsafe { libc::getegid() };
    let ctx = Context { uid, gid, pid: 1 };
    Fixture { dir, fs, ctx }
}

pub(crate) fn fixture() -> Fixture {
    fixture_with(CacheMode::Auto, false)
}

pub(crate) fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn errno(r: io::Result<impl std::fmt::Debug>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("an errno"),
    }
}

impl Fixture {
    pub(crate) fn lookup(&self, parent: u64, name: &str) -> io::Result<Entry> {
        self.fs.lookup(&self.ctx, parent, &c(name))
    }

    pub(crate) fn create_file(&self, parent: u64, name: &str, data: &[u8]) -> Entry {
        let args = CreateIn {
            flags: (libc::O_RDWR | libc::O_CREAT) as u32,
            mode: 0o644,
            umask: 0o022,
            fuse_flags: 0,
        };
        let (entry, handle, _, _) = self.fs.create(&self.ctx, parent, &c(name), args).unwrap();
        let handle = handle.expect("a handle");
        let n = self.write(entry.inode, handle, data, 0).unwrap();
        assert_eq!(n, data.len());
        self.fs
            .release(&self.ctx, entry.inode, 0, handle, false, false, None)
            .unwrap();
        entry
    }

    pub(crate) fn write(&self, ino: u64, handle: u64, data: &[u8], off: u64) -> io::Result<usize> {
        let mut r = VecReader {
            data: data.to_vec(),
            pos: 0,
        };
        let size = u32::try_from(data.len()).unwrap();
        self.fs
            .write(&self.ctx, ino, handle, &mut r, size, off, None, false, 0, 0)
    }

    pub(crate) fn read(&self, ino: u64, handle: u64, size: u32, off: u64) -> io::Result<Vec<u8>> {
        let mut w = VecWriter { data: Vec::new() };
        self.fs
            .read(&self.ctx, ino, handle, &mut w, size, off, None, 0)?;
        Ok(w.data)
    }

    pub(crate) fn open(&self, ino: u64, flags: i32) -> io::Result<u64> {
        let (h, _, _) = self.fs.open(&self.ctx, ino, flags as u32, 0)?;
        Ok(h.expect("a handle"))
    }

    pub(crate) fn read_all(&self, ino: u64) -> io::Result<Vec<u8>> {
        let h = self.open(ino, libc::O_RDONLY)?;
        let data = self.read(ino, h, 1 << 20, 0);
        self.fs
            .release(&self.ctx, ino, 0, h, false, false, None)
            .unwrap();
        data
    }

    pub(crate) fn list(&self, ino: u64) -> Vec<String> {
        let (h, _) = self.fs.opendir(&self.ctx, ino, 0).unwrap();
        let h = h.unwrap();
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let mut got = 0;
            self.fs
                .readdir(&self.ctx, ino, h, 64 * 1024, offset, &mut |d| {
                    let name = String::from_utf8_lossy(d.name).into_owned();
                    if name != "." && name != ".." {
                        names.push(name);
                    }
                    offset = d.offset;
                    got += 1;
                    Ok(1)
                })
                .unwrap();
            if got == 0 {
                break;
            }
        }
        self.fs.releasedir(&self.ctx, ino, 0, h).unwrap();
        names.sort();
        names
    }

    fn host(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }
}

fn zero_stat() -> stat64 {
    // SAFETY: stat64 is a plain C struct for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// Runs every operation once; shared by the plain test and the seccomp test.
pub(crate) fn exercise_all(f: &Fixture) {
    // create / write / read / flush / fsync / getattr
    let e = f.create_file(ROOT, "file", b"hello world");
    assert_eq!(f.read_all(e.inode).unwrap(), b"hello world");
    let h = f.open(e.inode, libc::O_RDWR).unwrap();
    assert_eq!(f.write(e.inode, h, b"HELLO", 0).unwrap(), 5);
    f.fs.flush(&f.ctx, e.inode, h, 0).unwrap();
    f.fs.fsync(&f.ctx, e.inode, false, h).unwrap();
    f.fs.fsync(&f.ctx, e.inode, true, h).unwrap();
    assert_eq!(f.read(e.inode, h, 100, 6).unwrap(), b"world");
    // a sparse write, lseek over the hole, fallocate past the end
    assert_eq!(f.write(e.inode, h, b"tail", 1 << 20).unwrap(), 4);
    let data_at =
        f.fs.lseek(&f.ctx, e.inode, h, 4096, libc::SEEK_DATA as u32)
            .unwrap();
    assert!((4096..=1 << 20).contains(&data_at), "{data_at}");
    f.fs.fallocate(&f.ctx, e.inode, h, 0, 2 << 20, 4096)
        .unwrap();
    let hole_at =
        f.fs.lseek(&f.ctx, e.inode, h, 0, libc::SEEK_HOLE as u32)
            .unwrap();
    assert!(hole_at >= 11);
    f.fs.release(&f.ctx, e.inode, 0, h, true, false, None)
        .unwrap();
    let (st, _) = f.fs.getattr(&f.ctx, e.inode, None).unwrap();
    assert_eq!(st.st_size, (2 << 20) + 4096);
    assert_eq!(
        std::fs::read(f.host("file")).unwrap()[..11],
        *b"HELLO world"
    );

    // setattr: chmod, truncate, times, chown to ourselves
    let mut attr = zero_stat();
    attr.st_mode = 0o600;
    attr.st_size = 3;
    attr.st_mtime = 1_000_000;
    attr.st_atime = 1_000_000;
    attr.st_uid = f.ctx.uid;
    attr.st_gid = f.ctx.gid;
    let valid = SetattrValid::MODE
        | SetattrValid::SIZE
        | SetattrValid::MTIME
        | SetattrValid::ATIME
        | SetattrValid::UID
        | SetattrValid::GID;
    let (st, _) = f.fs.setattr(&f.ctx, e.inode, attr, None, valid).unwrap();
    assert_eq!(st.st_mode & 0o7777, 0o600);
    assert_eq!(st.st_size, 3);
    let meta = std::fs::metadata(f.host("file")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.mtime(), 1_000_000);

    // mkdir / lookup / readdir / readdirplus
    let d = f.fs.mkdir(&f.ctx, ROOT, &c("dir"), 0o755, 0o022).unwrap();
    for i in 0..50 {
        f.create_file(d.inode, &format!("f{i:03}"), b"x");
    }
    let names = f.list(d.inode);
    assert_eq!(names.len(), 50);
    assert_eq!(names[0], "f000");
    let (h, _) = f.fs.opendir(&f.ctx, d.inode, 0).unwrap();
    let h = h.unwrap();
    let mut plus = 0;
    f.fs.readdirplus(&f.ctx, d.inode, h, 64 * 1024, 0, &mut |de, entry| {
        if de.name != b"." && de.name != b".." {
            assert_ne!(entry.inode, 0);
            plus += 1;
        }
        Ok(1)
    })
    .unwrap();
    assert!(plus > 0);
    f.fs.fsyncdir(&f.ctx, d.inode, false, h).unwrap();
    f.fs.releasedir(&f.ctx, d.inode, 0, h).unwrap();
    assert_eq!(f.lookup(d.inode, "f007").unwrap().attr.st_size, 1);
    assert_eq!(errno(f.lookup(d.inode, "missing")), libc::ENOENT);

    // rename: plain, NOREPLACE, EXCHANGE
    f.create_file(ROOT, "a", b"A");
    f.create_file(ROOT, "b", b"B");
    f.fs.rename(&f.ctx, ROOT, &c("a"), d.inode, &c("a2"), 0)
        .unwrap();
    assert!(f.host("dir/a2").exists() && !f.host("a").exists());
    let noreplace = libc::RENAME_NOREPLACE;
    assert_eq!(
        errno(f.fs.rename(&f.ctx, d.inode, &c("a2"), ROOT, &c("b"), noreplace)),
        libc::EEXIST
    );
    f.fs.rename(
        &f.ctx,
        d.inode,
        &c("a2"),
        ROOT,
        &c("b"),
        libc::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(std::fs::read(f.host("b")).unwrap(), b"A");
    assert_eq!(std::fs::read(f.host("dir/a2")).unwrap(), b"B");

    // link / symlink / readlink / unlink / rmdir
    let b = f.lookup(ROOT, "b").unwrap();
    let l = f.fs.link(&f.ctx, b.inode, ROOT, &c("b-link")).unwrap();
    assert_eq!(l.attr.st_nlink, 2);
    let s = f.fs.symlink(&f.ctx, &c("dir/a2"), ROOT, &c("sym")).unwrap();
    assert_eq!(s.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(f.fs.readlink(&f.ctx, s.inode).unwrap(), b"dir/a2");
    // (readlinkat, as the daemon would: plain readlink(2) is not in the allow-list)
    let host_target = nix::fcntl::readlinkat(None, &f.host("sym")).unwrap();
    assert_eq!(Path::new(&host_target), Path::new("dir/a2"));
    f.fs.unlink(&f.ctx, ROOT, &c("b-link")).unwrap();
    f.fs.unlink(&f.ctx, ROOT, &c("sym")).unwrap();
    assert_eq!(errno(f.fs.rmdir(&f.ctx, ROOT, &c("dir"))), libc::ENOTEMPTY);
    let e2 = f.fs.mkdir(&f.ctx, ROOT, &c("empty"), 0o700, 0).unwrap();
    assert_eq!(e2.attr.st_mode & 0o777, 0o700);
    f.fs.rmdir(&f.ctx, ROOT, &c("empty")).unwrap();
    assert!(!f.host("empty").exists());

    // mknod: FIFO yes, device no
    let fifo =
        f.fs.mknod(&f.ctx, ROOT, &c("fifo"), libc::S_IFIFO | 0o644, 0, 0)
            .unwrap();
    assert_eq!(fifo.attr.st_mode & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(
        errno(f.fs.mknod(&f.ctx, ROOT, &c("null"), libc::S_IFCHR | 0o666, 0x0103, 0)),
        libc::EPERM
    );
    assert!(!f.host("null").exists());

    // statfs, access
    let sfs = f.fs.statfs(&f.ctx, ROOT).unwrap();
    assert!(sfs.f_bsize > 0);
    assert_eq!(sfs.f_flag & libc::ST_RDONLY, 0);
    f.fs.access(&f.ctx, ROOT, libc::R_OK as u32).unwrap();

    // xattrs (user namespace)
    f.fs.setxattr(&f.ctx, b.inode, &c("user.carapace"), b"v1", 0)
        .unwrap();
    match f
        .fs
        .getxattr(&f.ctx, b.inode, &c("user.carapace"), 64)
        .unwrap()
    {
        GetxattrReply::Value(v) => assert_eq!(v, b"v1"),
        GetxattrReply::Count(n) => panic!("unexpected count {n}"),
    }
    match f.fs.listxattr(&f.ctx, b.inode, 1024).unwrap() {
        ListxattrReply::Names(n) => {
            assert!(n.split(|&c| c == 0).any(|x| x == b"user.carapace"));
        }
        ListxattrReply::Count(n) => panic!("unexpected count {n}"),
    }
    f.fs.removexattr(&f.ctx, b.inode, &c("user.carapace"))
        .unwrap();
    let gone = f.fs.getxattr(&f.ctx, b.inode, &c("user.carapace"), 64);
    assert_eq!(errno(gone.map(|_| ())), libc::ENODATA);

    // forget drops the inode
    f.fs.forget(&f.ctx, fifo.inode, 1);
}

#[test]
fn every_operation_against_a_temp_dir() {
    exercise_all(&fixture());
}

#[test]
fn readdir_of_many_entries() {
    let f = fixture();
    for i in 0..3000 {
        std::fs::write(f.host(&format!("e{i:05}")), b"").unwrap();
    }
    let names = f.list(ROOT);
    assert_eq!(names.len(), 3000);
    assert_eq!(names[2999], "e02999");
}

#[test]
fn cache_modes_set_timeouts() {
    for (mode, secs) in [
        (CacheMode::Never, 0),
        (CacheMode::Auto, 1),
        (CacheMode::Always, 86_400),
    ] {
        let f = fixture_with(mode, false);
        std::fs::write(f.host("x"), b"").unwrap();
        let e = f.lookup(ROOT, "x").unwrap();
        assert_eq!(e.attr_timeout, Duration::from_secs(secs), "{mode:?}");
        let (_, t) = f.fs.getattr(&f.ctx, e.inode, None).unwrap();
        assert_eq!(t, Duration::from_secs(secs), "{mode:?}");
    }
}

#[test]
fn readonly_export_refuses_every_change() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"data").unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let f = fixture_in(dir, CacheMode::Auto, true);
    let e = f.lookup(ROOT, "f").unwrap();
    assert_eq!(f.read_all(e.inode).unwrap(), b"data");
    let rofs = libc::EROFS;
    assert_eq!(errno(f.open(e.inode, libc::O_WRONLY)), rofs);
    assert_eq!(errno(f.open(e.inode, libc::O_RDONLY | libc::O_TRUNC)), rofs);
    let args = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    assert_eq!(errno(f.fs.create(&f.ctx, ROOT, &c("n"), args)), rofs);
    assert_eq!(errno(f.fs.mkdir(&f.ctx, ROOT, &c("n"), 0o755, 0)), rofs);
    assert_eq!(errno(f.fs.unlink(&f.ctx, ROOT, &c("f"))), rofs);
    assert_eq!(errno(f.fs.rmdir(&f.ctx, ROOT, &c("d"))), rofs);
    assert_eq!(
        errno(f.fs.rename(&f.ctx, ROOT, &c("f"), ROOT, &c("g"), 0)),
        rofs
    );
    assert_eq!(errno(f.fs.link(&f.ctx, e.inode, ROOT, &c("g"))), rofs);
    assert_eq!(errno(f.fs.symlink(&f.ctx, &c("f"), ROOT, &c("g"))), rofs);
    let fifo = libc::S_IFIFO | 0o644;
    assert_eq!(errno(f.fs.mknod(&f.ctx, ROOT, &c("g"), fifo, 0, 0)), rofs);
    let mut attr = zero_stat();
    attr.st_mode = 0o777;
    assert_eq!(
        errno(f.fs.setattr(&f.ctx, e.inode, attr, None, SetattrValid::MODE)),
        rofs
    );
    assert_eq!(
        errno(f.fs.setxattr(&f.ctx, e.inode, &c("user.x"), b"1", 0)),
        rofs
    );
    assert_eq!(errno(f.fs.removexattr(&f.ctx, e.inode, &c("user.x"))), rofs);
    assert_eq!(errno(f.fs.access(&f.ctx, e.inode, libc::W_OK as u32)), rofs);
    let sfs = f.fs.statfs(&f.ctx, ROOT).unwrap();
    assert_ne!(sfs.f_flag & libc::ST_RDONLY, 0);
    // Nothing changed on the host.
    let mut names: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "f"]);
    assert_eq!(std::fs::read(f.host("f")).unwrap(), b"data");
}

#[test]
fn bad_names_are_refused_everywhere() {
    let f = fixture();
    let d = f.fs.mkdir(&f.ctx, ROOT, &c("d"), 0o755, 0).unwrap();
    let long = "x".repeat(256);
    for (name, want) in [
        ("..", libc::EINVAL),
        (".", libc::EINVAL),
        ("", libc::EINVAL),
        ("a/b", libc::EINVAL),
        ("../x", libc::EINVAL),
        (long.as_str(), libc::ENAMETOOLONG),
    ] {
        assert_eq!(errno(f.lookup(ROOT, name)), want, "lookup {name:?}");
        assert_eq!(errno(f.lookup(d.inode, name)), want, "lookup in d {name:?}");
        assert_eq!(
            errno(f.fs.mkdir(&f.ctx, d.inode, &c(name), 0o755, 0)),
            want,
            "mkdir {name:?}"
        );
        assert_eq!(errno(f.fs.unlink(&f.ctx, d.inode, &c(name))), want);
        assert_eq!(
            errno(f.fs.rename(&f.ctx, ROOT, &c("d"), d.inode, &c(name), 0)),
            want
        );
        assert_eq!(
            errno(f.fs.symlink(&f.ctx, &c("/"), d.inode, &c(name))),
            want
        );
    }
}

mod escape;
mod seccomp_allowlist;
mod submounts;

#[test]
fn lseek_on_a_created_handle() {
    let f = fixture();
    let args = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, h, _, _) = f.fs.create(&f.ctx, ROOT, &c("sk"), args).unwrap();
    let h = h.unwrap();
    f.fs.fallocate(&f.ctx, e.inode, h, 0, 0, 1 << 20).unwrap();
    assert_eq!(f.write(e.inode, h, b"end", 2 << 20).unwrap(), 3);
    let hole =
        f.fs.lseek(&f.ctx, e.inode, h, 0, libc::SEEK_HOLE as u32)
            .unwrap();
    assert!(hole <= (2 << 20) + 3);
}

/// FUSE inode numbers are the host's, tagged with a per-device index above bit 47: the
/// passthrough keeps no per-file record once the guest forgets an inode (with its own
/// counter it kept one for every file ever seen, growing without bound), and a file
/// keeps its number across forgets (and daemon restarts).
#[test]
fn inode_numbers_follow_the_host() {
    const HOST_INO_BITS: u64 = (1 << 47) - 1;
    let f = fixture();
    let e = f.create_file(ROOT, "numbered", b"x");
    let host = std::fs::metadata(f.dir.path().join("numbered"))
        .unwrap()
        .ino();
    assert_eq!(e.inode & HOST_INO_BITS, host);
    f.fs.forget(&f.ctx, e.inode, 1);
    let again = f.lookup(ROOT, "numbered").unwrap();
    assert_eq!(again.inode, e.inode);
    f.fs.forget(&f.ctx, again.inode, 1);
    // A file created after many others were created and forgotten still gets its host
    // number (nothing accumulates).
    for i in 0..200 {
        let e = f.create_file(ROOT, &format!("churn{i}"), b"");
        f.fs.forget(&f.ctx, e.inode, 1);
        f.fs.unlink(&f.ctx, ROOT, &c(&format!("churn{i}"))).unwrap();
    }
    let e = f.create_file(ROOT, "later", b"");
    let host = std::fs::metadata(f.dir.path().join("later")).unwrap().ino();
    assert_eq!(e.inode & HOST_INO_BITS, host);
}

/// READDIRPLUS is offered except with `--cache never` (zero timeouts: the guest would
/// gain nothing from the attributes, the daemon would pay a lookup per entry).
#[test]
fn readdirplus_only_when_entries_are_cached() {
    let plus = FsOptions::DO_READDIRPLUS | FsOptions::READDIRPLUS_AUTO;
    for (cache, offered) in [
        (CacheMode::Never, false),
        (CacheMode::Auto, true),
        (CacheMode::Always, true),
    ] {
        let f = fixture_with(cache, false);
        let opts = f.fs.init(FsOptions::all()).unwrap();
        assert_eq!(opts.contains(plus), offered, "{cache:?}: {opts:?}");
    }
}

/// A sandbox-layout export: `c1/rootfs` and `c1/mounts/0`.
fn sandbox_fixture(allow_setid: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("c1/rootfs")).unwrap();
    std::fs::create_dir_all(dir.path().join("c1/mounts/0")).unwrap();
    let mut cfg = FsConfig::new(dir.path(), CacheMode::Auto, false, true, false, 0).unwrap();
    cfg.layout = crate::zones::Layout::Sandbox;
    cfg.allow_setid = allow_setid;
    let fs = open_fs(&cfg, &cfg.shared_dir).unwrap();
    fs.init(FsOptions::all()).unwrap();
    let ctx = Context {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        pid: 1,
    };
    Fixture { dir, fs, ctx }
}

impl Fixture {
    /// The inode of `path` (components looked up one by one, as the guest does).
    fn walk(&self, path: &str) -> u64 {
        path.split('/')
            .fold(ROOT, |ino, name| self.lookup(ino, name).unwrap().inode)
    }

    fn chmod(&self, ino: u64, mode: u32) -> io::Result<()> {
        let mut attr = zero_stat();
        attr.st_mode = libc::S_IFREG | mode;
        self.fs
            .setattr(&self.ctx, ino, attr, None, SetattrValid::MODE)
            .map(drop)
    }
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn a_volume_gets_no_setuid_files_but_a_rootfs_does() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (CAP_FSETID)");
        return;
    }
    let f = sandbox_fixture(false);
    let vol = f.walk("c1/mounts/0");
    let rootfs = f.walk("c1/rootfs");
    // chmod u+s / g+s in a volume: stripped; in the rootfs: kept.
    let v = f.create_file(vol, "tool", b"#!/bin/sh\n");
    f.chmod(v.inode, 0o6755).unwrap();
    assert_eq!(mode_of(&f.host("c1/mounts/0/tool")), 0o755);
    let r = f.create_file(rootfs, "sudo", b"#!/bin/sh\n");
    f.chmod(r.inode, 0o4755).unwrap();
    assert_eq!(mode_of(&f.host("c1/rootfs/sudo")), 0o4755);
    // create with setuid bits in a volume: stripped.
    let args = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o4755,
        umask: 0,
        fuse_flags: 0,
    };
    let (_, h, _, _) = f.fs.create(&f.ctx, vol, &c("created"), args).unwrap();
    f.fs.release(&f.ctx, 0, 0, h.unwrap(), false, false, None)
        .ok();
    assert_eq!(mode_of(&f.host("c1/mounts/0/created")), 0o755);
    // A directory never gets setuid (mkdir(2) drops the set-id bits itself; a chmod keeps
    // setgid, which only makes new entries inherit the group).
    let d =
        f.fs.mkdir(&f.ctx, vol, &c("shared-group"), 0o6775, 0)
            .unwrap();
    assert_eq!(mode_of(&f.host("c1/mounts/0/shared-group")) & 0o4000, 0);
    let mut attr = zero_stat();
    attr.st_mode = libc::S_IFDIR | 0o6775;
    f.fs.setattr(&f.ctx, d.inode, attr, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(mode_of(&f.host("c1/mounts/0/shared-group")), 0o2775);
    // A setuid file placed by the host loses the bits when the guest writes it (killpriv).
    let host_file = f.host("c1/mounts/0/hostbin");
    std::fs::write(&host_file, b"x").unwrap();
    std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let hb = f.lookup(vol, "hostbin").unwrap();
    let h = f.open(hb.inode, libc::O_WRONLY).unwrap();
    f.write(hb.inode, h, b"y", 0).unwrap();
    f.fs.release(&f.ctx, hb.inode, 0, h, false, false, None)
        .unwrap();
    assert_eq!(mode_of(&host_file), 0o755);
    // File capabilities: refused in a volume.
    let cap = [
        1u8, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(
        errno(f.fs.setxattr(&f.ctx, v.inode, &c("security.capability"), &cap, 0)),
        libc::EPERM
    );
}

#[test]
fn allow_setid_lifts_the_volume_rules() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (CAP_FSETID)");
        return;
    }
    let f = sandbox_fixture(true);
    let vol = f.walk("c1/mounts/0");
    let v = f.create_file(vol, "tool", b"x");
    f.chmod(v.inode, 0o4755).unwrap();
    assert_eq!(mode_of(&f.host("c1/mounts/0/tool")), 0o4755);
}
