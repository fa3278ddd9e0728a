use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::fs::CWD;
use rustix::mount::{MoveMountFlags, UnmountFlags};

use super::overlay::unescape_mountinfo;
use super::*;

const BLOCK: IdMap = IdMap {
    host_base: 0x7001_0000,
    count: 65536,
};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn id_blocks_parse_and_validate() {
    let m = IdMap::parse("1879113728:65536").unwrap();
    assert_eq!(m, BLOCK);
    assert_eq!(m.line(), "0 1879113728 65536\n");
    assert_eq!(m.to_host(1000), Some(0x7001_0000 + 1000));
    assert_eq!(m.to_host(65536), None);
    assert_eq!(m.to_string(), "1879113728:65536");
    for bad in ["", "5", "a:1", "1:b", "0:10", "5:0", "2147483640:100"] {
        assert!(IdMap::parse(bad).is_err(), "{bad} parsed");
    }
    // The last id of the block may be 2^31 - 1, not beyond.
    assert!(IdMap::parse("2147418112:65536").is_ok());
}

#[test]
fn overlay_options_from_a_mount_request() {
    let o = Overlay::from_options(&[
        "index=off",
        "workdir=/s/2/work",
        "upperdir=/s/2/fs",
        "lowerdir=/s/1/fs:/s/0/fs",
    ])
    .unwrap();
    assert_eq!(o.lower, [Path::new("/s/1/fs"), Path::new("/s/0/fs")]);
    assert_eq!(o.upper.as_deref(), Some(Path::new("/s/2/fs")));
    assert_eq!(o.work.as_deref(), Some(Path::new("/s/2/work")));
    assert_eq!(o.other, ["index=off"]);
    // Comma-joined in one entry, and a read-only overlay.
    let ro = Overlay::from_options(&["lowerdir=/a:/b,userxattr"]).unwrap();
    assert_eq!(ro.lower.len(), 2);
    assert!(ro.upper.is_none());
    assert_eq!(ro.other, ["userxattr"]);
    // Escaped colon inside a layer path.
    let esc = Overlay::from_options(&[r"lowerdir=/a\:b:/c"]).unwrap();
    assert_eq!(esc.lower, [Path::new("/a:b"), Path::new("/c")]);
    for bad in [
        "lowerdir=rel/one",
        "lowerdir=/a/../b",
        "upperdir=/u",
        "lowerdir=/a,upperdir=/u",
        "lowerdir=/a::/data",
        "lowerdir+=/a",
    ] {
        let e = Overlay::from_options(&[bad]).unwrap_err();
        assert!(matches!(e, IdmapError::OverlayOption { .. }), "{bad}: {e}");
    }
}

#[test]
fn overlay_options_from_mountinfo() {
    assert_eq!(unescape_mountinfo(r"/a\040b\054c\134d"), r"/a b,c\d");
    let o = Overlay::from_mountinfo_options(
        r"rw,lowerdir=/l\0541\134:x:/l2,upperdir=/u/fs,workdir=/u/work,index=off",
    )
    .unwrap();
    assert_eq!(o.lower, [Path::new("/l,1:x"), Path::new("/l2")]);
    assert_eq!(o.upper.as_deref(), Some(Path::new("/u/fs")));
    assert_eq!(o.other, ["index=off"]);
    // A mounter that shortened the option with a working directory (containerd does when
    // it would pass a page): kept relative until resolved.
    let mut rel = Overlay::from_mountinfo_options(
        "rw,lowerdir=12/fs:11/fs,upperdir=/s/snapshots/13/fs,workdir=/s/snapshots/13/work",
    )
    .unwrap();
    assert!(rel.has_relative_lower());
    rel.resolve_relative_lower(Path::new("/s/snapshots"));
    assert_eq!(
        rel.lower,
        [
            Path::new("/s/snapshots/12/fs"),
            Path::new("/s/snapshots/11/fs")
        ]
    );
    assert!(Overlay::from_mountinfo_options("lowerdir=../x").is_err());
}

/// Attaches a detached mount at `at` for the test's checks; detached again on drop.
struct Attached<'a>(&'a Path);

impl<'a> Attached<'a> {
    fn new(tree: &std::os::fd::OwnedFd, at: &'a Path) -> Self {
        rustix::mount::move_mount(
            tree.as_fd(),
            "",
            CWD,
            at,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .unwrap();
        Attached(at)
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.0, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW);
    }
}

fn file(path: &Path, uid: u32, mode: u32) {
    std::fs::write(path, b"x").unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn an_idmapped_clone_shows_ids_in_the_block() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = dir.path().join("src");
    let at = dir.path().join("at");
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(&at).unwrap();
    file(&src.join("root"), 0, 0o600);
    file(&src.join("user"), 1000, 0o600);
    let ns = new_userns(BLOCK).unwrap();
    // Another namespace than ours.
    let ours = std::fs::read_link("/proc/self/ns/user").unwrap();
    let fd_link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&ns));
    assert_ne!(std::fs::read_link(fd_link).unwrap(), ours);
    let tree = match clone_idmapped(&src, ns.as_fd(), false) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped: {}", e);
            return;
        }
    };
    let _a = Attached::new(&tree, &at);
    assert_eq!(
        std::fs::metadata(at.join("root")).unwrap().uid(),
        BLOCK.host_base
    );
    assert_eq!(
        std::fs::metadata(at.join("user")).unwrap().gid(),
        BLOCK.host_base + 1000
    );
    // The source is unchanged.
    assert_eq!(std::fs::metadata(src.join("user")).unwrap().uid(), 1000);
}

#[test]
fn bad_blocks_are_refused_before_any_namespace() {
    let e = new_userns(IdMap {
        host_base: 0,
        count: 10,
    })
    .unwrap_err();
    assert!(matches!(e, IdmapError::BadMap { .. }), "{e}");
}

#[test]
fn an_overlay_of_idmapped_layers_writes_real_ids() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let p = |n: &str| dir.path().join(n);
    for d in [
        "l0",
        "l1",
        "snap",
        "snap/fs",
        "snap/work",
        "stage",
        "merged",
    ] {
        std::fs::create_dir(p(d)).unwrap();
    }
    file(&p("l1/root"), 0, 0o600);
    file(&p("l0/user"), 1000, 0o644);
    let overlay = Overlay::from_options(&[format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        p("l0").display(),
        p("l1").display(),
        p("snap/fs").display(),
        p("snap/work").display()
    )])
    .unwrap();
    let ns = new_userns(BLOCK).unwrap();
    let tree = match mount_idmapped(&overlay, BLOCK, ns.as_fd(), &p("stage")) {
        Ok(t) => t,
        Err(IdmapError::Idmap { source, .. }) => {
            eprintln!("skipped: no idmapped mounts here: {source}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    // The staging directory is empty again: the layer clones were detached.
    assert_eq!(std::fs::read_dir(p("stage")).unwrap().count(), 0);
    let merged = p("merged");
    let _a = Attached::new(&tree, &merged);
    assert_eq!(
        std::fs::metadata(merged.join("root")).unwrap().uid(),
        BLOCK.host_base
    );
    assert_eq!(
        std::fs::metadata(merged.join("user")).unwrap().uid(),
        BLOCK.host_base + 1000
    );
    // A thread whose file-system ids are the block's 1000 creates a file and modifies a
    // lower file (copy-up): on disk, in the upper layer, both belong to 1000.
    let m = merged.clone();
    std::thread::spawn(move || {
        use rustix::thread::CapabilitiesSecureBits as Bits;
        let bits = rustix::thread::capabilities_secure_bits().unwrap();
        rustix::thread::set_capabilities_secure_bits(bits | Bits::NO_SETUID_FIXUP).unwrap();
        let id = BLOCK.host_base + 1000;
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(id));
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(id));
        std::fs::write(m.join("new"), b"n").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(m.join("user"))
            .unwrap();
        std::fs::write(m.join("user"), b"changed").unwrap();
    })
    .join()
    .unwrap();
    for name in ["new", "user"] {
        let md = std::fs::metadata(p("snap/fs").join(name)).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (1000, 1000),
            "{name} in the upper layer"
        );
    }
    // The work directory the overlay made belongs to real root on disk, not to the block.
    let work_owner = std::fs::read_dir(p("snap/work"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().uid())
        .collect::<Vec<_>>();
    assert!(work_owner.iter().all(|&u| u == 0), "{work_owner:?}");
    // An id outside the block cannot be written through the overlay.
    let e = std::os::unix::fs::chown(merged.join("new"), Some(5), None).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EOVERFLOW), "{e}");
}
