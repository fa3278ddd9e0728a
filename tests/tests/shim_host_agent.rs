//! containerd -> containerd-shim-carapace-v2 -> carapace-runtime -> carapace-agent, end to
//! end through a private containerd and `ctr`, with the agent in host mode
//! (`CARAPACE_SHIM_HOST_AGENT`): everything but the VM is the real thing, so this runs on
//! any host as root. The same flow with a VM is in shim_kvm.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_tests::containerd::{
    BUSYBOX_IMAGE as IMAGE, CARAPACE_RUNTIME as RUNTIME, Containerd, ContainerdError, mounts_under,
    with_carapace,
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
                    .collect::<Vec<_>>()
            })
            .map(|mut v| {
                v.sort();
                v
            })
            .unwrap_or_default()
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> ! {
        // the sandboxes' specs as sent to the agent and the agents' logs
        let mut logs = String::new();
        for entry in std::fs::read_dir(&self.state)
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in ["config.json", "vmm.log", "fsd.log"] {
                let text = std::fs::read_to_string(entry.path().join(f)).unwrap_or_default();
                logs.push_str(&format!(
                    "--- {}/{f}\n{text}\n",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
        panic!("{what}: {e}\n{logs}containerd log:\n{}", self.ctrd().log());
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

/// Waits until `ctr task ls` shows task `id` STOPPED.
fn wait_stopped(w: &World, id: &str) {
    for _ in 0..200 {
        let ls = w.ctr(&["task", "ls"]).unwrap_or_default();
        if ls
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id) && l.contains("STOPPED"))
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    w.fail("task never showed as STOPPED", id);
}

/// `ctr run -d` of a CRI-annotated pod member running `script`, with `vol` at /data.
fn run_in_pod(w: &World, id: &str, kind: &str, pod: &str, vol: &Path, script: &str) {
    let (ty, sb, mount) = (
        format!("io.kubernetes.cri.container-type={kind}"),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
        format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display()),
    );
    w.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &ty,
        "--annotation",
        &sb,
        "--mount",
        &mount,
        IMAGE,
        id,
        "sh",
        "-c",
        script,
    ])
    .unwrap_or_else(|e| w.fail(&format!("ctr run -d {id} ({kind})"), e));
}

/// Waits for `path` to hold a line of text.
fn wait_for_file(w: &World, path: &Path) -> String {
    for _ in 0..300 {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    w.fail("file never written", path.display());
}

carapace_tests::cgroup2_test! {
/// CRI pod semantics through `ctr --annotation`: a sandbox and a container of the same pod
/// share one shim and one sandbox (here one host-mode agent standing in for the VM), both see
/// the files of a volume bound into both, and deleting the sandbox first keeps the pod's
/// agent until its last container is deleted.
#[lab(carapace_tests::lab::Lab::new().timeout(std::time::Duration::from_secs(900)))]
fn pod_containers_share_one_sandbox_and_a_volume() {
    assert!(carapace_tests::is_root(), "this test needs root (containerd, mounts, namespaces)");
    let shims_before = processes_named("containerd-shim-carapace-v2");
    let agents_before = processes_named("carapace-agent");
    let w = World::new();
    let vol = w._tmp.path().join("vol");
    std::fs::create_dir(&vol).expect("volume dir");

    // (the containers' own commands use the volume: `ctr task exec` in host mode does not
    // see container mounts inside the lab, whose commands run chrooted; see shim_kvm.rs for
    // the same through exec in a VM)
    run_in_pod(&w, "pod1", "sandbox", "pod1", &vol, "echo written-by-pod1 > /data/f; exec sleep 600");
    assert_eq!(wait_for_file(&w, &vol.join("f")), "written-by-pod1\n");
    run_in_pod(&w, "c1", "container", "pod1", &vol, "cat /data/f > /data/g; exec sleep 600");
    // c1 read through its own bind of the volume what pod1 wrote through its bind
    assert_eq!(wait_for_file(&w, &vol.join("g")), "written-by-pod1\n");
    assert_eq!(processes_named("containerd-shim-carapace-v2") - shims_before, 1, "one shim per pod");
    assert_eq!(processes_named("carapace-agent") - agents_before, 1, "one sandbox per pod");
    assert_eq!(w.state_entries(), ["c1", "pod1"]);
    let c1 = std::fs::read_to_string(w.state.join("c1/state.json")).expect("c1 state");
    assert!(c1.contains("\"sandbox_id\": \"pod1\""), "{c1}");
    assert!(w.state.join("pod1/shared/c1/rootfs/bin").is_dir(), "c1's rootfs in the pod's share");

    // the sandbox goes first: its container keeps running in the pod's sandbox
    w.ctr(&["task", "kill", "-s", "SIGKILL", "pod1"]).unwrap_or_else(|e| w.fail("kill pod1", e));
    wait_stopped(&w, "pod1");
    w.ctr(&["task", "delete", "pod1"]).unwrap_or_else(|e| w.fail("task delete pod1", e));
    w.ctr(&["container", "delete", "pod1"]).unwrap_or_else(|e| w.fail("container delete pod1", e));
    if processes_named("carapace-agent") - agents_before != 1 {
        w.fail("the pod's sandbox is gone with its sandbox container", "no agent left");
    }
    let ls = w.ctr(&["task", "ls"]).unwrap_or_else(|e| w.fail("task ls", e));
    assert!(ls.lines().any(|l| l.starts_with("c1 ") && l.contains("RUNNING")), "{ls}");
    assert_eq!(w.state_entries(), ["c1", "pod1"], "the sandbox's state stays with its VM");

    // its last container goes: everything goes
    w.ctr(&["task", "kill", "-s", "SIGKILL", "c1"]).unwrap_or_else(|e| w.fail("kill c1", e));
    wait_stopped(&w, "c1");
    w.ctr(&["task", "delete", "c1"]).unwrap_or_else(|e| w.fail("task delete c1", e));
    w.ctr(&["container", "delete", "c1"]).unwrap_or_else(|e| w.fail("container delete c1", e));
    assert_eq!(w.state_entries(), Vec::<String>::new(), "sandbox state left");
    let mut left = (0, 0);
    for _ in 0..50 {
        left = (
            processes_named("containerd-shim-carapace-v2").saturating_sub(shims_before),
            processes_named("carapace-agent").saturating_sub(agents_before),
        );
        if left == (0, 0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(left, (0, 0), "shims and agents left");
    assert!(vol.join("f").exists(), "the volume's files stay");
}
}

/// Sets a task's memory limit through the shim's ttrpc Task API, as containerd's Update
/// does (the OCI LinuxResources as JSON in an Any): ctr 1.6 has no `task update`.
fn update_memory_limit(w: &World, id: &str, bytes: u64) -> Result<(), String> {
    use containerd_shim::protos::api;
    use containerd_shim::protos::shim_async::{Client, TaskClient};
    let socket = containerd_shim::socket_address(
        &w.ctrd().socket().display().to_string(),
        carapace_tests::containerd::TEST_NAMESPACE,
        id,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = Client::connect(&socket)
            .await
            .map_err(|e| format!("{socket}: {e}"))?;
        let mut resources = containerd_shim::protos::protobuf::well_known_types::any::Any::new();
        resources.type_url =
            "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
        resources.value = serde_json::to_vec(&serde_json::json!({"memory": {"limit": bytes}}))
            .map_err(|e| e.to_string())?;
        let req = api::UpdateTaskRequest {
            id: id.to_owned(),
            resources: containerd_shim::protos::protobuf::MessageField::some(resources),
            ..Default::default()
        };
        TaskClient::new(client)
            .update(
                containerd_shim::protos::ttrpc::context::with_timeout(10_000_000_000),
                &req,
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

/// The value of `key` in `ctr task metrics` table output.
fn metric(table: &str, key: &str) -> Option<u64> {
    table.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(key)).then(|| f.next()?.parse().ok())?
    })
}

carapace_tests::cgroup2_test! {
/// `ctr task pause/resume/update/metrics` reach the container's cgroup through the agent,
/// and an OOM kill in a container becomes a TaskOOM event.
#[lab(carapace_tests::lab::Lab::new().timeout(std::time::Duration::from_secs(900)))]
fn pause_resume_update_metrics_and_oom_events() {
    assert!(carapace_tests::is_root(), "this test needs root (containerd, mounts, namespaces)");
    let w = World::new();
    let status = |id: &str| {
        let ls = w.ctr(&["task", "ls"]).unwrap_or_else(|e| w.fail("task ls", e));
        ls.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_default()
            .to_owned()
    };
    w.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, "p1", "sleep", "600"])
        .unwrap_or_else(|e| w.fail("ctr run -d", e));
    w.ctr(&["task", "pause", "p1"]).unwrap_or_else(|e| w.fail("pause", e));
    assert_eq!(status("p1"), "PAUSED");
    w.ctr(&["task", "resume", "p1"]).unwrap_or_else(|e| w.fail("resume", e));
    assert_eq!(status("p1"), "RUNNING");

    update_memory_limit(&w, "p1", 33554432).unwrap_or_else(|e| w.fail("shim Update", e));
    let table = w.ctr(&["task", "metrics", "p1"]).unwrap_or_else(|e| w.fail("metrics", e));
    assert_eq!(metric(&table, "memory.usage_limit"), Some(33554432), "{table}");
    assert!(metric(&table, "pids.current").is_some_and(|n| n >= 1), "{table}");
    assert!(metric(&table, "memory.usage").is_some_and(|n| n > 0), "{table}");
    w.ctr(&["task", "kill", "-s", "SIGKILL", "p1"]).unwrap_or_else(|e| w.fail("kill", e));
    wait_stopped(&w, "p1");
    w.ctr(&["task", "delete", "p1"]).unwrap_or_else(|e| w.fail("task delete", e));
    w.ctr(&["container", "delete", "p1"]).unwrap_or_else(|e| w.fail("container delete", e));

    // an OOM kill: a shell holding more than its 16 MiB in a variable
    let mut events = w
        .ctrd()
        .ctr_command()
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ctr events");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let hog = "a=$(head -c 200000000 /dev/zero | tr '\\000' a); echo survived";
    let r = w.ctr(&[
        "run", "--rm", "--runtime", RUNTIME, "--memory-limit", "16777216", IMAGE, "oom1", "sh",
        "-c", hog,
    ]);
    assert!(
        matches!(r, Err(ContainerdError::Ctr { status: Some(137), .. })),
        "the hog is OOM-killed: {r:?}"
    );
    let _ = events.kill();
    let out = events.wait_with_output().expect("ctr events output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.contains("/tasks/oom") && l.contains("oom1")),
        "no TaskOOM event for oom1:\n{text}"
    );
}
}

carapace_tests::cgroup2_test! {
/// A shim killed with SIGKILL: containerd runs `containerd-shim-carapace-v2 ... delete`,
/// which must stop the sandbox (agent, fs daemon), undo its mounts and remove its state,
/// for a standalone container and for a pod of two.
#[lab(carapace_tests::lab::Lab::new().timeout(std::time::Duration::from_secs(900)))]
fn shim_delete_cleans_up_after_a_killed_shim() {
    assert!(carapace_tests::is_root(), "this test needs root (containerd, mounts, namespaces)");
    let agents_before = processes_named("carapace-agent");
    let fsds_before = processes_named("carapace-fsd");
    let w = World::new();
    let vol = w._tmp.path().join("vol");
    std::fs::create_dir(&vol).expect("volume dir");
    w.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, "k1", "sleep", "600"])
        .unwrap_or_else(|e| w.fail("ctr run -d k1", e));
    run_in_pod(&w, "pod2", "sandbox", "pod2", &vol, "exec sleep 600");
    run_in_pod(&w, "c2", "container", "pod2", &vol, "exec sleep 600");
    assert_eq!(w.state_entries(), ["c2", "k1", "pod2"]);
    assert_eq!(processes_named("carapace-agent") - agents_before, 2);
    assert!(!mounts_under(&w.state).is_empty());

    for grouping in ["k1", "pod2"] {
        // this containerd's shim (its address is unique to this test), killed by pid
        let pattern = format!(
            "containerd-shim-carapace-v2 -namespace {} -id {grouping} -address {}",
            carapace_tests::containerd::TEST_NAMESPACE,
            w.ctrd().socket().display()
        );
        let out = Command::new("pgrep").args(["-f", &pattern]).output().expect("pgrep");
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        assert_eq!(pids.len(), 1, "one shim for {grouping}: {pids:?}");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), nix::sys::signal::Signal::SIGKILL)
            .expect("kill -9 the shim");
    }
    // containerd sees the shims gone and runs `shim delete` for each task
    let mut left = (Vec::new(), 0, 0, Vec::new());
    for _ in 0..300 {
        left = (
            w.state_entries(),
            processes_named("carapace-agent").saturating_sub(agents_before),
            processes_named("carapace-fsd").saturating_sub(fsds_before),
            mounts_under(&w.state),
        );
        if left == (Vec::new(), 0, 0, Vec::new()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if left != (Vec::new(), 0, 0, Vec::new()) {
        w.fail("left after the shims were killed (state, agents, fs daemons, mounts)", format!("{left:?}"));
    }
    for id in ["k1", "c2", "pod2"] {
        let _ = w.ctr(&["task", "delete", id]);
        w.ctr(&["container", "delete", id]).unwrap_or_else(|e| w.fail("container delete", e));
    }
    assert!(vol.exists(), "the volume stays");
}
}
