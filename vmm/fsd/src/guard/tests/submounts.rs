//! Submounts inside the shared dir are served (the guest sees the mounted filesystem),
//! with inode identities that do not collide across filesystems. Runs in a child process
//! with its own mount namespace (unshare needs a single-threaded process), as root.

use std::process::Command;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

use fsd_fuse_backend_rs::api::filesystem::FileSystem;

use super::{ROOT, fixture};

const CHILD_ENV: &str = "CARAPACE_FSD_SUBMOUNT_CHILD";

#[test]
fn submounts_are_visible() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "guard::tests::submounts::child_with_submount",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("submount served"),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "run by submounts_are_visible in a child process"]
fn child_with_submount() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    unshare(CloneFlags::CLONE_NEWNS).unwrap();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .unwrap();
    let f = fixture();
    let sub = f.dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("under"), b"hidden by the mount").unwrap();
    mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    std::fs::write(sub.join("on-tmpfs"), b"from the submount").unwrap();

    let root_dev = f.fs.getattr(&f.ctx, ROOT, None).unwrap().0.st_dev;
    let e = f.lookup(ROOT, "sub").unwrap();
    assert_ne!(
        e.attr.st_dev, root_dev,
        "the submount's own filesystem is shown"
    );
    assert!(
        f.lookup(e.inode, "under").is_err(),
        "the covered dir is not shown"
    );
    let file = f.lookup(e.inode, "on-tmpfs").unwrap();
    assert_eq!(f.read_all(file.inode).unwrap(), b"from the submount");
    assert_ne!(file.inode, e.inode);
    println!("submount served");
}
