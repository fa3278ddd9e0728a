//! The daemon binary: clear errors with distinct exit codes, and the sandbox really applied
//! to the running process (seen from outside, through /proc).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_carapace-fsd");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_string())
    })
}

/// Waits until the daemon reports it is listening (its seccomp field turns to 2).
fn wait_sandboxed(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("daemon exited early: {st}");
        }
        if status_field(child.id(), "Seccomp").as_deref() == Some("2") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("daemon did not install seccomp within 20 s");
}

/// The daemon child; killed when dropped, so a failing assertion leaves nothing running.
struct Daemon(Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(socket: &Path, shared: &Path, extra: &[&str]) -> Daemon {
    let child = Command::new(BIN)
        .arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(shared)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Daemon(child)
}

fn run_err(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn clear_errors_and_exit_codes() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let sock = sock.to_str().unwrap();

    let (code, err) = run_err(&["--socket-path", sock, "--shared-dir", "/nonexistent/x"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("/nonexistent/x") && err.contains("does not exist"),
        "{err}"
    );

    let file = d.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let (code, err) = run_err(&[
        "--socket-path",
        sock,
        "--shared-dir",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not a directory"), "{err}");

    let shared = d.path().to_str().unwrap();
    let (code, err) = run_err(&[
        "--socket-path",
        "/nonexistent/dir/s.sock",
        "--shared-dir",
        shared,
    ]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("/nonexistent/dir") && err.contains("does not exist"),
        "{err}"
    );

    let (code, err) = run_err(&[
        "--socket-path",
        sock,
        "--shared-dir",
        shared,
        "--cache",
        "sometimes",
    ]);
    assert_eq!(code, 2, "{err}");

    let (code, err) = run_err(&["--help"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn socket_in_use_is_refused_without_disturbing_the_owner() {
    let d = tempfile::tempdir().unwrap();
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let sock = d.path().join("s.sock");
    let mut first = spawn(&sock, &shared, &["--sandbox", "none"]);
    wait_sandboxed(&mut first);
    let (code, err) = run_err(&[
        "--socket-path",
        sock.to_str().unwrap(),
        "--shared-dir",
        shared.to_str().unwrap(),
        "--sandbox",
        "none",
    ]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("in use"), "{err}");
    // The first daemon is still waiting for its VMM.
    assert!(first.try_wait().unwrap().is_none());
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn namespace_sandbox_is_applied() {
    if !is_root() {
        // The namespace sandbox needs root; CI and the lab run as root.
        eprintln!("skipped: not root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("inside"), b"x").unwrap();
    let sock = d.path().join("s.sock");
    let mut child = spawn(&sock, &shared, &["--sandbox", "namespace"]);
    wait_sandboxed(&mut child);
    let pid = child.id();

    assert_eq!(status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
    assert_eq!(status_field(pid, "Seccomp").as_deref(), Some("2"));
    // Only the file-ownership capabilities are left, in every set.
    assert_file_caps_only(pid);

    // Room for one descriptor per inode of a large rootfs: at least our hard limit
    // (raised further where CAP_SYS_RESOURCE allows).
    let nofile = |who: &str, col: usize| -> u64 {
        std::fs::read_to_string(format!("/proc/{who}/limits"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(col))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    assert!(nofile(&pid.to_string(), 3) >= nofile("self", 4));
    // Own mount and network namespaces.
    for ns in ["mnt", "net", "ipc"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, its, "{ns} namespace is shared with the host");
    }
    // Its root is an empty read-only tmpfs holding the export at /shared and /proc:
    // through /proc/<pid>/root we see exactly that.
    let root = format!("/proc/{pid}/root");
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["proc", "shared"]);
    assert!(std::path::Path::new(&format!("{root}/shared/inside")).exists());
    // Its mount table has nothing else.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    assert_eq!(mount_points(&mounts), ["/", "/shared", "/proc"], "{mounts}");
    let root_opts = mounts
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap();
    assert!(root_opts.split(',').any(|o| o == "ro"), "{mounts}");

    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn readonly_sandbox_mounts_read_only() {
    if !is_root() {
        eprintln!("skipped: not root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let sock = d.path().join("s.sock");
    let mut child = spawn(&sock, &shared, &["--readonly"]);
    wait_sandboxed(&mut child);
    let mounts = std::fs::read_to_string(format!("/proc/{}/mounts", child.id())).unwrap();
    let opts = mounts
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_string();
    assert!(opts.split(',').any(|o| o == "ro"), "{mounts}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn exits_cleanly_when_the_frontend_goes_away() {
    let d = tempfile::tempdir().unwrap();
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let sock = d.path().join("s.sock");
    let mode = if is_root() { "namespace" } else { "none" };
    let mut child = spawn(&sock, &shared, &["--sandbox", mode]);
    wait_sandboxed(&mut child);
    let conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "daemon exit status {st}");
            break;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("daemon still running 20 s after the frontend disconnected");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idmap_usage_errors_name_the_flags() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let shared = d.path().to_str().unwrap();
    let base = ["--socket-path", sock, "--shared-dir", shared];
    for bad in ["5:0", "x", "0:65536", "2147483647:2", "1879113728"] {
        let (code, err) = run_err(&[&base[..], &["--idmap", bad]].concat());
        assert_eq!(code, 2, "--idmap {bad}: {err}");
        assert!(err.contains("--idmap") && err.contains(bad), "{err}");
    }
    let (code, err) = run_err(
        &[
            &base[..],
            &["--sandbox", "none", "--idmap", "1879113728:65536"],
        ]
        .concat(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--idmap") && err.contains("--sandbox none"),
        "{err}"
    );
}

/// An idmapped clone of a directory, attached for the test; detached on drop.
struct IdmappedMount<'a>(&'a Path);

impl<'a> IdmappedMount<'a> {
    /// `None` (with the reason printed) where the file system has no idmapped mounts.
    fn new(src: &Path, at: &'a Path, map: carapace_idmap::IdMap) -> Option<Self> {
        use std::os::fd::AsFd;
        let ns = carapace_idmap::new_userns(map).unwrap();
        let tree = match carapace_idmap::clone_idmapped(src, ns.as_fd(), false) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipped: {}", carapace_errors::Chain(&e));
                return None;
            }
        };
        rustix::mount::move_mount(
            tree.as_fd(),
            "",
            rustix::fs::CWD,
            at,
            rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .unwrap();
        Some(IdmappedMount(at))
    }
}

impl Drop for IdmappedMount<'_> {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn idmap_serves_as_root_of_the_id_block() {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        eprintln!("skipped: --idmap needs root (a user namespace and idmapped mounts)");
        return;
    }
    const BASE: u32 = 0x7001_0000;
    let map = carapace_idmap::IdMap {
        host_base: BASE,
        count: 65536,
    };
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = d.path().join("src");
    let at = d.path().join("at");
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(&at).unwrap();
    for (name, id) in [("user", 1000), ("root", 0)] {
        let f = src.join(name);
        std::fs::write(&f, b"x").unwrap();
        std::os::unix::fs::chown(&f, Some(id), Some(id)).unwrap();
    }
    let Some(_mount) = IdmappedMount::new(&src, &at, map) else {
        return;
    };
    // Through the mount, host root sees the block's ids.
    assert_eq!(
        std::fs::metadata(at.join("user")).unwrap().uid(),
        BASE + 1000
    );
    assert_eq!(std::fs::metadata(at.join("root")).unwrap().uid(), BASE);

    let sock = d.path().join("s.sock");
    let mut child = spawn(&sock, &at, &["--idmap", "1879113728:65536"]);
    wait_sandboxed(&mut child);
    assert!(sock.exists());
    let pid = child.id();
    let block_root = ["1879113728"; 4].join(" ");
    let words = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(
        status_field(pid, "Uid").map(words),
        Some(block_root.clone())
    );
    assert_eq!(status_field(pid, "Gid").map(words), Some(block_root));
    assert_eq!(status_field(pid, "Groups").as_deref(), Some(""));
    assert_eq!(status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
    assert_eq!(status_field(pid, "Seccomp").as_deref(), Some("2"));
    for file in ["uid_map", "gid_map"] {
        let m = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
        assert_eq!(words(m), "0 1879113728 65536", "{file}");
    }
    let ours = std::fs::read_link("/proc/self/ns/user").unwrap();
    let its = std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert_ne!(ours, its, "the daemon is in the host's user namespace");
    // The capability drop happened in its namespace too, bounding set included.
    assert_file_caps_only(pid);
    // Its mount namespace is the sandbox's, with the idmapped export.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    assert_eq!(mount_points(&mounts), ["/", "/shared", "/proc"], "{mounts}");
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        info.lines()
            .any(|l| l.split_whitespace().nth(4) == Some("/shared") && l.contains("idmapped")),
        "{info}"
    );

    // It still serves a frontend (the vhost-user threads start after the switch), and
    // exits cleanly when it goes away.
    drop(std::os::unix::net::UnixStream::connect(&sock).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "daemon still running 20 s after the frontend disconnected"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "daemon exit status {status}: {log}");
    assert!(
        log.contains("serving as uid 1879113728 (root of id block 1879113728:65536)"),
        "{log}"
    );
    // The source kept its real ids.
    assert_eq!(std::fs::metadata(src.join("user")).unwrap().uid(), 1000);
}

/// Only the file-ownership capabilities (CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID
/// SETGID SETUID SETFCAP) are left in every set of `pid`, and they are there.
fn assert_file_caps_only(pid: u32) {
    let allowed: u64 = [0u32, 1, 2, 3, 4, 6, 7, 31].iter().map(|b| 1u64 << b).sum();
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let v = u64::from_str_radix(&status_field(pid, set).unwrap(), 16).unwrap();
        assert_eq!(v & !allowed, 0, "{set} = {v:x}");
        assert_ne!(v, 0, "{set}: the daemon keeps the file capabilities");
    }
    assert_eq!(
        status_field(pid, "CapAmb").as_deref(),
        Some("0000000000000000")
    );
}

/// The mount points of a `/proc/<pid>/mounts` text, in order.
fn mount_points(mounts: &str) -> Vec<&str> {
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect()
}
