//! A jailed VMM for real: a child process (this test binary again, running one test, so
//! its only other thread is libtest's idle main thread) configures the seccomp filters and
//! forks a single-threaded grandchild, which builds a VM running hand-made guest code
//! (on whatever /dev/kvm exists: a software KVM runs it), enters the jail and starts the
//! VM. This test then reads the grandchild's `/proc` entries while the guest runs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::boot::tests::pvh_elf;
use crate::config::{SerialOutput, VmConfig};
use crate::seccomp::{self, SeccompAction, ThreadKind};
use crate::vmm::{RunOptions, Vm};

const CHILD_ENV: &str = "CARAPACE_VMM_JAIL_TEST_DIR";
/// A uid and gid no one on a test machine uses.
const JAIL_ID: u32 = 3_999_977;

fn can_run() -> bool {
    Uid::effective().is_root()
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// The `/proc/<pid>/status` line starting with `key:`, its value.
fn status_field(pid: i32, task: Option<&str>, key: &str) -> String {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let s = std::fs::read_to_string(&path).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// Kills the jailed VMM when the test ends, passed or not.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[test]
fn a_jailed_vmm_runs_unprivileged_in_its_root_with_every_thread_filtered() {
    if !can_run() {
        eprintln!("skipped: needs root and /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("jail");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("marker"), b"jail").unwrap();
    let log = std::fs::File::create(dir.path().join("child.log")).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "jail::tests::jailed_vmm_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let child_log = || std::fs::read_to_string(dir.path().join("child.log")).unwrap_or_default();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let pid: i32 = (&mut out)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.split_once("jailed vmm pid ").map(|(_, p)| p.to_owned()))
        .unwrap_or_else(|| panic!("the child reported no VMM: {}", child_log()))
        .parse()
        .unwrap();
    let _kill = KillOnDrop(pid);
    // The guest printed (the vCPU ran guest code, the console thread wrote it) and the
    // main thread has its filter: the VMM is fully up.
    let serial = dir.path().join("serial.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(std::fs::read_to_string(&serial).unwrap_or_default() == "OK\n"
        && status_field(pid, None, "Seccomp") == "2")
    {
        assert!(
            Instant::now() < deadline,
            "the jailed VMM did not come up: serial {:?}, child log:\n{}",
            std::fs::read_to_string(&serial),
            child_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let id = JAIL_ID.to_string();
    let ids = [id.as_str(); 4].join("\t");
    assert_eq!(status_field(pid, None, "Uid"), ids);
    assert_eq!(status_field(pid, None, "Gid"), ids);
    assert_eq!(status_field(pid, None, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, None, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, None, "NoNewPrivs"), "1");
    // Every thread runs under a filter (mode 2), and each kind that exists by now is there.
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = Vec::new();
    for t in &tasks {
        assert_eq!(status_field(pid, Some(t), "Seccomp"), "2", "task {t}");
        assert_eq!(status_field(pid, Some(t), "NoNewPrivs"), "1", "task {t}");
        names.push(status_field(pid, Some(t), "Name"));
        // Every thread was created in the jail (threads keep their own root).
        let root = format!("/proc/{pid}/task/{t}/root/marker");
        assert!(Path::new(&root).exists(), "task {t} is outside the jail");
    }
    for n in ["vcpu0", "console-out", "spawner"] {
        assert!(names.iter().any(|m| m == n), "{n} not in {names:?}");
    }
    // Its root is the jail: the marker is there, the host's /etc is not.
    let proc_root = Path::new("/proc").join(pid.to_string()).join("root");
    assert_eq!(std::fs::read(proc_root.join("marker")).unwrap(), b"jail");
    assert!(!proc_root.join("etc").exists());
    for ns in ["mnt", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l.split_whitespace()
                    .rev()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    assert_eq!(limit("Max open files"), "4096", "{limits}");
    assert_eq!(limit("Max processes"), "512", "{limits}");
    assert_eq!(
        limit("Max file size"),
        (MIN_DEFAULT_FSIZE).to_string(),
        "{limits}"
    );
    drop(_kill);
    // The child reports on stdout and stderr until it ends: read to the end.
    std::io::copy(&mut out, &mut std::io::sink()).unwrap();
    assert!(child.wait().unwrap().success(), "{}", child_log());
    assert!(
        child_log().contains("jailed vmm killed by signal 9"),
        "{}",
        child_log()
    );
}

#[test]
#[ignore = "run by a_jailed_vmm_runs_unprivileged_in_its_root_with_every_thread_filtered"]
fn jailed_vmm_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let k = dir.join("vmlinux");
    // mov dx, 0x3f8; "OK\n" to the serial port; jmp $
    let code = [
        0x66, 0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xb0, b'\n', 0xee, 0xeb, 0xfe,
    ];
    std::fs::write(&k, pvh_elf(&code, 0x100_0000)).unwrap();
    let mut c = VmConfig::with_kernel(&k);
    c.memory_mib = 64;
    c.serial = SerialOutput::File(dir.join("serial.log"));
    c.jail = Some(JailConfig {
        root: dir.join("jail"),
        uid: JAIL_ID,
        gid: JAIL_ID,
        net_namespace: true,
        rlimits: JailRlimits::default(),
    });
    // SAFETY: the grandchild runs the VM and leaves with _exit; this process's other
    // thread (libtest's main thread) only waits for this test and holds no lock.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // Here: the filters hold the process id.
        seccomp::configure(SeccompAction::Kill).unwrap();
        let opts = RunOptions {
            allow_software_kvm: true,
            ..Default::default()
        };
        let code = match Vm::start(c, opts) {
            Ok(mut vm) => {
                seccomp::install_or_exit(ThreadKind::Main);
                vm.wait(Some(Duration::from_secs(120)));
                0
            }
            Err(e) => {
                eprintln!("jailed vmm: {}", carapace_errors::Chain(&e));
                1
            }
        };
        // SAFETY: ends the forked grandchild without unwinding into libtest.
        unsafe { libc::_exit(code) };
    }
    println!("jailed vmm pid {pid}");
    let mut status = 0;
    // SAFETY: waits for the grandchild forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        eprintln!("jailed vmm killed by signal {}", libc::WTERMSIG(status));
    } else {
        eprintln!("jailed vmm exited {}", libc::WEXITSTATUS(status));
    }
}

#[test]
fn file_size_limit_covers_every_writable_image() {
    let value = |j: &JailRlimits, images: &[u64]| {
        rlimits(j, images)
            .iter()
            .find(|(r, _, _)| *r == Resource::RLIMIT_FSIZE)
            .map(|(_, _, v)| *v)
    };
    let d = JailRlimits::default();
    assert_eq!(value(&d, &[]), Some(MIN_DEFAULT_FSIZE));
    assert_eq!(value(&d, &[1 << 20, 10 << 30]), Some(10 << 30));
    let set = JailRlimits {
        fsize: Some(1 << 20),
        ..d
    };
    assert_eq!(
        value(&set, &[10 << 30]),
        Some(1 << 20),
        "the description wins"
    );
}
