//! containerd -> containerd-shim-carapace-v2 -> carapace-runtime -> carapace-agent, end to
//! end through a private containerd and `ctr`, with the agent in host mode
//! (`CARAPACE_SHIM_HOST_AGENT`): everything but the VM is the real thing, so this runs on
//! any host as root. The same flow with a VM is in shim_kvm.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_tests::containerd::{
    BUSYBOX_IMAGE as IMAGE, CARAPACE_RUNTIME as RUNTIME, Containerd, ContainerdError, with_carapace,
};
use carapace_tests::workspace_bin;

struct World {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    ctrd: Option<Containerd>,
}

impl World {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("carapace-shim-")
            .tempdir()
            .expect("tempdir");
        let state = tmp.path().join("run");
        let config = tmp.path().join("configuration.toml");
        std::fs::write(
            &config,
            format!(
                "[fs]\npath = {:?}\n[runtime]\nstate_dir = {:?}\n[agent]\nboot_timeout_ms = 20000\n",
                workspace_bin("carapace-fsd").display().to_string(),
                state.display().to_string()
            ),
        )
        .expect("config");
        let shim = workspace_bin("containerd-shim-carapace-v2");
        let agent = workspace_bin("carapace-agent");
        let bin_dir = shim.parent().expect("bin dir").to_path_buf();
        let ctrd = with_carapace(
            tmp.path(),
            &bin_dir,
            &[
                ("CARAPACE_CONFIG", config.as_path()),
                ("CARAPACE_SHIM_HOST_AGENT", agent.as_path()),
                ("RUST_LOG", Path::new("debug")),
            ],
        )
        .expect("containerd with Carapace");
        Self {
            _tmp: tmp,
            state,
            ctrd: Some(ctrd),
        }
    }

    fn ctrd(&self) -> &Containerd {
        self.ctrd.as_ref().expect("running")
    }

    fn ctr(&self, args: &[&str]) -> Result<String, ContainerdError> {
        self.ctrd()
            .ctr(args)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `ctr run --rm` with our runtime.
    fn run(&self, id: &str, cmd: &[&str]) -> Result<String, ContainerdError> {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    fn state_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.state)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> ! {
        panic!("{what}: {e}\ncontainerd log:\n{}", self.ctrd().log());
    }
}

fn processes_named(name: &str) -> usize {
    let out = Command::new("pgrep")
        .arg("-c")
        .arg("-f")
        .arg(name)
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

carapace_tests::cgroup2_test! {
/// The agent applies the spec's cgroup limits (ctr sets CPU shares), so this needs cgroup2
/// with the cpu controller: on hosts with cgroup v1 it runs inside the lab.
#[lab(carapace_tests::lab::Lab::new().timeout(std::time::Duration::from_secs(900)))]
fn ctr_runs_containers_through_the_carapace_shim() {
    assert!(carapace_tests::is_root(), "this test needs root (containerd, mounts, namespaces)");
    let shims_before = processes_named("containerd-shim-carapace-v2");
    let w = World::new();

    // output and exit status of `ctr run --rm`
    let out = w
        .run("hello", &["sh", "-c", "echo hello from $(cat /etc/hostname)"])
        .unwrap_or_else(|e| w.fail("ctr run", e));
    assert_eq!(out.trim(), "hello from carapace");
    match w.run("exit3", &["sh", "-c", "echo bye; exit 3"]) {
        Err(ContainerdError::Ctr { status: Some(3), .. }) => {}
        other => w.fail("exit status 3 expected", format!("{other:?}")),
    }

    // a detached task: exec into it, list its processes, kill it, delete it
    w.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, "bg", "sleep", "600"])
        .unwrap_or_else(|e| w.fail("ctr run -d", e));
    let out = w
        .ctr(&["task", "exec", "--exec-id", "e1", "bg", "sh", "-c", "echo exec-ok; exit 0"])
        .unwrap_or_else(|e| w.fail("ctr task exec", e));
    assert_eq!(out.trim(), "exec-ok");
    let ps = w.ctr(&["task", "ps", "bg"]).unwrap_or_else(|e| w.fail("ctr task ps", e));
    assert!(ps.lines().count() >= 2, "a header and the sleep: {ps}");
    let ls = w.ctr(&["task", "ls"]).unwrap_or_else(|e| w.fail("ctr task ls", e));
    assert!(ls.contains("bg") && ls.contains("RUNNING"), "{ls}");
    w.ctr(&["task", "kill", "-s", "SIGKILL", "bg"])
        .unwrap_or_else(|e| w.fail("ctr task kill", e));
    // wait for the stop to be reported, then delete task and container
    let mut stopped = false;
    for _ in 0..100 {
        let ls = w.ctr(&["task", "ls"]).unwrap_or_default();
        if ls.contains("STOPPED") {
            stopped = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(stopped, "the killed task never showed as STOPPED");
    w.ctr(&["task", "delete", "bg"]).unwrap_or_else(|e| w.fail("ctr task delete", e));
    w.ctr(&["container", "delete", "bg"]).unwrap_or_else(|e| w.fail("ctr container delete", e));

    // nothing left: no sandbox state, no shim
    assert_eq!(w.state_entries(), Vec::<String>::new(), "sandbox state left");
    let mut left = 0;
    for _ in 0..50 {
        left = processes_named("containerd-shim-carapace-v2").saturating_sub(shims_before);
        if left == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(left, 0, "shim processes left");
}
}
