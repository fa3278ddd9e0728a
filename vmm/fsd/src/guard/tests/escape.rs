//! Escape attempts at the filesystem layer: nothing outside the shared dir is reachable,
//! readable or writable, and nothing outside is changed.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fsd_fuse_backend_rs::abi::fuse_abi::CreateIn;
use fsd_fuse_backend_rs::api::filesystem::FileSystem;

use super::{Fixture, ROOT, c, fixture_in};
use crate::config::CacheMode;

const SECRET: &[u8] = b"host secret";

/// A shared dir and, beside it, an "outside" dir with a secret file.
struct Setup {
    f: Fixture,
    outside: tempfile::TempDir,
}

fn setup() -> Setup {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), SECRET).unwrap();
    std::fs::create_dir(outside.path().join("sub")).unwrap();
    let shared = tempfile::tempdir().unwrap();
    Setup {
        f: fixture_in(shared, CacheMode::Never, false),
        outside,
    }
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            out.push((e.path(), m.size(), m.mtime()));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Tries everything a guest could do with `ino` (an inode it got from a lookup) to reach
/// the outside dir; asserts that none of it works.
fn assert_no_way_through(s: &Setup, ino: u64) {
    let f = &s.f;
    // Looking up the secret "through" the inode fails (it is a symlink, not a directory).
    assert!(f.lookup(ino, "secret").is_err());
    assert!(f.lookup(ino, "sub").is_err());
    // Opening the symlink inode itself never yields the target's data.
    if let Ok(h) = f.open(ino, libc::O_RDONLY) {
        let data = f.read(ino, h, 1024, 0).unwrap_or_default();
        assert_ne!(data, SECRET);
    }
    // Creating through it fails and creates nothing outside.
    let args = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    assert!(f.fs.create(&f.ctx, ino, &c("planted"), args).is_err());
    assert!(
        f.fs.mkdir(&f.ctx, ino, &c("planted-dir"), 0o755, 0)
            .is_err()
    );
    assert!(f.fs.unlink(&f.ctx, ino, &c("secret")).is_err());
    assert!(!s.outside.path().join("planted").exists());
    assert!(!s.outside.path().join("planted-dir").exists());
    assert!(s.outside.path().join("secret").exists());
}

#[test]
fn dotdot_never_leaves_the_root() {
    let s = setup();
    let f = &s.f;
    let d = f.fs.mkdir(&f.ctx, ROOT, &c("d"), 0o755, 0).unwrap();
    assert_eq!(super::errno(f.lookup(ROOT, "..")), libc::EINVAL);
    assert_eq!(super::errno(f.lookup(d.inode, "..")), libc::EINVAL);
    // A directory moved out of the shared dir by a host process: the guest still holds its
    // inode, but cannot climb from it, because ".." is never resolved.
    std::fs::rename(f.dir.path().join("d"), s.outside.path().join("moved")).unwrap();
    assert_eq!(super::errno(f.lookup(d.inode, "..")), libc::EINVAL);
}

#[test]
fn absolute_symlink_pointing_out_is_not_followed() {
    let s = setup();
    let before = snapshot(s.outside.path());
    symlink(s.outside.path(), s.f.dir.path().join("abs")).unwrap();
    symlink(
        s.outside.path().join("secret"),
        s.f.dir.path().join("abs-file"),
    )
    .unwrap();
    for name in ["abs", "abs-file"] {
        let e = s.f.lookup(ROOT, name).unwrap();
        assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        // The target is handed to the guest as text, to be resolved in the guest.
        let target = s.f.fs.readlink(&s.f.ctx, e.inode).unwrap();
        assert!(target.starts_with(s.outside.path().as_os_str().as_encoded_bytes()));
        assert_no_way_through(&s, e.inode);
    }
    assert_eq!(snapshot(s.outside.path()), before);
}

#[test]
fn relative_symlink_pointing_out_is_not_followed() {
    let s = setup();
    let before = snapshot(s.outside.path());
    let rel = format!(
        "../{}",
        s.outside.path().file_name().unwrap().to_str().unwrap()
    );
    symlink(&rel, s.f.dir.path().join("rel")).unwrap();
    symlink(format!("{rel}/secret"), s.f.dir.path().join("rel-file")).unwrap();
    // The guest can create such links itself, too.
    let g =
        s.f.fs
            .symlink(
                &s.f.ctx,
                &c(&format!("../../../..{}", s.outside.path().display())),
                ROOT,
                &c("guest-made"),
            )
            .unwrap();
    for name in ["rel", "rel-file", "guest-made"] {
        let e = s.f.lookup(ROOT, name).unwrap();
        assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert_no_way_through(&s, e.inode);
    }
    assert_no_way_through(&s, g.inode);
    assert_eq!(snapshot(s.outside.path()), before);
}

#[test]
fn proc_self_fd_links_are_not_followed() {
    let s = setup();
    // A descriptor of the outside dir, open in this (the daemon's) process.
    let outside = std::fs::File::open(s.outside.path()).unwrap();
    use std::os::fd::AsRawFd;
    let fd = outside.as_raw_fd();
    symlink(format!("/proc/self/fd/{fd}"), s.f.dir.path().join("pfd")).unwrap();
    symlink("/proc/self/root", s.f.dir.path().join("proot")).unwrap();
    symlink("/proc/self/cwd", s.f.dir.path().join("pcwd")).unwrap();
    for name in ["pfd", "proot", "pcwd"] {
        let e = s.f.lookup(ROOT, name).unwrap();
        assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert_no_way_through(&s, e.inode);
        assert!(s.f.lookup(e.inode, "etc").is_err());
    }
    drop(outside);
}

#[test]
fn hardlink_and_rename_cannot_target_outside() {
    let s = setup();
    let before = snapshot(s.outside.path());
    symlink(s.outside.path(), s.f.dir.path().join("out")).unwrap();
    let out = s.f.lookup(ROOT, "out").unwrap();
    let file = s.f.create_file(ROOT, "mine", b"guest data");
    // Link or rename into the symlink "directory": refused, nothing appears outside.
    assert!(
        s.f.fs
            .link(&s.f.ctx, file.inode, out.inode, &c("x"))
            .is_err()
    );
    assert!(
        s.f.fs
            .rename(&s.f.ctx, ROOT, &c("mine"), out.inode, &c("x"), 0)
            .is_err()
    );
    // Renaming the symlink itself just moves the link inside the shared dir.
    s.f.fs
        .rename(&s.f.ctx, ROOT, &c("out"), ROOT, &c("out2"), 0)
        .unwrap();
    assert!(
        std::fs::symlink_metadata(s.f.dir.path().join("out2"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(snapshot(s.outside.path()), before);
}

/// A host process swaps a directory of the shared dir with a symlink to the outside, as
/// fast as it can, while the guest looks up and reads through it. Every lookup holds an
/// O_PATH handle of what it found, without following symlinks, so the guest sees either
/// the real directory or a symlink, never the outside.
#[test]
fn directory_swapped_for_symlink_mid_lookup() {
    let s = setup();
    let shared = s.f.dir.path().to_path_buf();
    std::fs::create_dir(shared.join("d")).unwrap();
    std::fs::write(shared.join("d/secret"), b"inside").unwrap();
    symlink(s.outside.path(), shared.join("link")).unwrap();
    let before = snapshot(s.outside.path());

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = Arc::clone(&stop);
        let shared = shared.clone();
        std::thread::spawn(move || {
            let a = c(shared.join("d").to_str().unwrap());
            let b = c(shared.join("link").to_str().unwrap());
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: both paths are valid NUL-terminated strings living across the call.
                let r = unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
                assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
                swaps += 1;
            }
            swaps
        })
    };

    let (mut saw_dir, mut saw_link) = (0, 0);
    for _ in 0..3000 {
        let Ok(e) = s.f.lookup(ROOT, "d") else {
            continue;
        };
        match e.attr.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                saw_dir += 1;
                if let Ok(inner) = s.f.lookup(e.inode, "secret") {
                    let data = s.f.read_all(inner.inode).unwrap();
                    assert_eq!(data, b"inside", "read through a swapped directory");
                    s.f.fs.forget(&s.f.ctx, inner.inode, 1);
                }
                // Creating inside lands in the real directory, wherever it is now.
                let _ = s.f.fs.mkdir(&s.f.ctx, e.inode, &c("made"), 0o755, 0);
                let _ = s.f.fs.rmdir(&s.f.ctx, e.inode, &c("made"));
            }
            libc::S_IFLNK => {
                saw_link += 1;
                assert!(s.f.lookup(e.inode, "secret").is_err());
            }
            other => panic!("unexpected type {other:o}"),
        }
        s.f.fs.forget(&s.f.ctx, e.inode, 1);
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0);
    assert!(saw_dir > 0, "the race never showed the directory");
    assert!(saw_link > 0, "the race never showed the symlink");
    assert_eq!(snapshot(s.outside.path()), before, "outside dir changed");
}
