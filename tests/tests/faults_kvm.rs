//! Components killed mid-flight, through containerd with real VMs (lab): the VMM, the fs
//! daemon and the shim itself, each at each step of create, start, exec and delete. The kill
//! is put at the step by the runtime's fault points (`[debug] fault_plan`,
//! runtime/src/faults.rs), never by timing. Expected of each case: the task ends with
//! exactly one TaskExit per process, non-zero; Wait returns; delete succeeds; afterwards no
//! VMM, fs daemon, shim, mount, host cgroup or state directory of it is left.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use carapace_tests::containerd::{
    BUSYBOX_IMAGE as IMAGE, CARAPACE_RUNTIME as RUNTIME, Containerd, carapace_world,
    sandbox_log_tails,
};
use carapace_tests::faults::{TaskExit, processes_with, settle_leftovers, task_exits};
use carapace_tests::faults::{ctr, task_status};
use carapace_tests::kvm_test;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// `ctr run -d`: create then start.
    Run,
    /// `ctr task exec` into a running container.
    Exec,
    /// `ctr task delete` of a stopped container.
    Delete,
}

const CASES: [(&str, Flow); 5] = [
    ("create.vmm-started", Flow::Run),
    ("create.container-created", Flow::Run),
    ("start.started", Flow::Run),
    ("exec.started", Flow::Exec),
    ("delete.guest-told", Flow::Delete),
];
const VICTIMS: [&str; 3] = ["vmm", "fsd", "runtime"];

/// Waits until the task is gone or not RUNNING/CREATED any more; returns its last status.
fn wait_settled(ctrd: &Containerd, id: &str, secs: u64) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = task_status(ctrd, id);
        match s.as_deref() {
            Some("RUNNING") | Some("CREATED") if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(300))
            }
            _ => return s,
        }
    }
}

/// What one case left wrong (empty: nothing).
fn run_case(
    ctrd: &Containerd,
    plan: &Path,
    state: &Path,
    id: &str,
    point: &str,
    victim: &str,
    flow: Flow,
) -> Vec<String> {
    let mut wrong = Vec::new();
    let write_plan = |text: &str| std::fs::write(plan, text).expect("write the fault plan");
    write_plan("");
    let line = format!("{point} {victim}\n");
    let step = match flow {
        Flow::Run => {
            write_plan(&line);
            ctr(
                ctrd,
                240,
                &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "600"],
            )
        }
        Flow::Exec => {
            if let Err(e) = ctr(
                ctrd,
                240,
                &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "600"],
            ) {
                wrong.push(format!("setting up: {e}"));
            }
            write_plan(&line);
            ctr(
                ctrd,
                240,
                &["task", "exec", "--exec-id", "e1", id, "sleep", "600"],
            )
        }
        Flow::Delete => {
            if let Err(e) = ctr(
                ctrd,
                240,
                &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "600"],
            ) {
                wrong.push(format!("setting up: {e}"));
            }
            let _ = ctr(ctrd, 60, &["task", "kill", "-s", "SIGKILL", id]);
            if wait_settled(ctrd, id, 120).as_deref() != Some("STOPPED") {
                wrong.push("setting up: the killed task did not stop".into());
            }
            write_plan(&line);
            ctr(ctrd, 240, &["task", "delete", id])
        }
    };
    let left_in_plan = std::fs::read_to_string(plan).unwrap_or_default();
    write_plan("");
    if !left_in_plan.trim().is_empty() {
        wrong.push(format!(
            "the fault {point} {victim} did not fire (plan still holds it)"
        ));
    }
    println!(
        "faults: {id} {point} {victim}: {:?} -> {}",
        flow,
        match &step {
            Ok(_) => "the step succeeded".to_owned(),
            Err(e) => e
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect(),
        }
    );
    // Whatever the step did, the task must settle (nothing keeps running on a broken
    // sandbox), and delete must then work.
    match wait_settled(ctrd, id, 120).as_deref() {
        None | Some("STOPPED") | Some("UNKNOWN") => {}
        Some(s) => wrong.push(format!("task still {s} 120 s after the fault")),
    }
    if task_status(ctrd, id).is_some() {
        let mut deleted = ctr(ctrd, 120, &["task", "delete", id]);
        if deleted.is_err() {
            deleted = ctr(ctrd, 120, &["task", "delete", "-f", id]);
        }
        if let Err(e) = deleted {
            wrong.push(format!("task delete after the fault: {e}"));
        }
    }
    if let Err(e) = ctr(ctrd, 60, &["container", "delete", id])
        && !e.contains("not found")
    {
        wrong.push(format!("container delete: {e}"));
    }
    // nothing of it left
    let left = settle_leftovers(state, id, 20);
    if !left.is_empty() {
        wrong.push(format!("left behind: {}", left.join("; ")));
    }
    wrong
}

/// Checks the exits of one case: one per process that was started, each non-zero. One
/// exception, containerd's own: when a shim dies, containerd 1.6 publishes a TaskExit for
/// its task itself (after `shim delete`), whether or not the shim had published one; a
/// shim killed in the middle of deleting a task that already exited so gives it two.
fn check_exits(exits: &[&TaskExit], flow: Flow, point: &str, victim: &str) -> Vec<String> {
    let most = if flow == Flow::Delete && victim == "runtime" {
        2
    } else {
        1
    };
    let mut wrong = Vec::new();
    let mut per: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in exits {
        per.entry(e.process.as_str()).or_default().push(e.status);
    }
    // every process that got started must have ended once; a create that failed started
    // nothing (containerd publishes no exit for a task that never was)
    let started_init = !(flow == Flow::Run && point.starts_with("create."));
    for (process, statuses) in &per {
        if statuses.len() > most {
            wrong.push(format!(
                "{} exits for {process}: {statuses:?}",
                statuses.len()
            ));
        }
        if statuses.contains(&0) {
            wrong.push(format!("{process} exited 0 after a kill: {statuses:?}"));
        }
    }
    let inits = exits.iter().filter(|e| e.process == e.container).count();
    if started_init && inits == 0 {
        wrong.push("no TaskExit for the init".into());
    }
    // containerd publishes an exit for a dead shim's init only: an exec's is lost with the
    // shim (as with runc's shim)
    if flow == Flow::Exec && victim != "runtime" && !per.contains_key("e1") {
        wrong.push("no TaskExit for exec e1".into());
    }
    if !started_init && inits > 1 {
        wrong.push(format!("{inits} TaskExits for an init that never started"));
    }
    wrong
}

/// A private containerd with Carapace as runtime `RUNTIME` (console kept), `debug(its
/// directory)` appended to the `[debug]` section of its configuration.
struct Rig {
    tmp: tempfile::TempDir,
    ctrd: Containerd,
    state: std::path::PathBuf,
}

fn rig(prefix: &str, debug: impl Fn(&Path) -> String) -> Rig {
    assert!(carapace_tests::is_root(), "needs root (containerd, mounts)");
    let (tmp, state, ctrd) = carapace_world(prefix, debug).expect("containerd with Carapace");
    Rig { tmp, ctrd, state }
}

/// `ctr events` against `ctrd`, running.
fn events(ctrd: &Containerd) -> std::process::Child {
    let child = ctrd
        .ctr_command()
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ctr events");
    std::thread::sleep(Duration::from_millis(500));
    child
}

/// What `ctr events` printed until now; stops it.
fn collect(mut child: std::process::Child) -> String {
    let _ = child.kill();
    let out = child.wait_with_output().expect("ctr events output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().timeout(Duration::from_secs(2400)))]
    fn a_component_killed_at_any_step_ends_the_task_once_and_leaves_nothing() {
        let plan_in = |dir: &Path| dir.join("fault-plan");
        let Rig { tmp, ctrd, state } = rig("carapace-faults-", |dir| {
            format!("fault_plan = {:?}\n", plan_in(dir).display().to_string())
        });
        let plan = plan_in(tmp.path());
        let events = events(&ctrd);

        let mut findings = Vec::new();
        let mut cases = Vec::new();
        let mut n = 0;
        for (point, flow) in CASES {
            for victim in VICTIMS {
                n += 1;
                let id = format!("f{n}");
                let t = Instant::now();
                for w in run_case(&ctrd, &plan, &state, &id, point, victim, flow) {
                    findings.push(format!("{id} ({point} {victim}): {w}"));
                }
                println!("faults: {id} done in {:.1} s", t.elapsed().as_secs_f64());
                cases.push((id, point, victim, flow));
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        let text = collect(events);
        let exits = task_exits(&text);
        for (id, point, victim, flow) in &cases {
            let mine: Vec<&TaskExit> = exits.iter().filter(|e| &e.container == id).collect();
            println!(
                "faults: {id} {point} {victim}: exits {:?}",
                mine.iter().map(|e| (e.process.as_str(), e.status)).collect::<Vec<_>>()
            );
            for w in check_exits(&mine, *flow, point, victim) {
                findings.push(format!("{id} ({point} {victim}): {w}"));
            }
        }
        if !findings.is_empty() {
            panic!(
                "{} findings:\n{}\n\nsandbox logs:\n{}\ncontainerd log (end):\n{}",
                findings.len(),
                findings.join("\n"),
                sandbox_log_tails(&state, 20),
                ctrd.log().lines().rev().take(150).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

kvm_test! {
    /// containerd stopped and started again while containers run: the shims go on, the
    /// restarted containerd reaches them (state, exec, kill, delete), a container that
    /// exited while it was down reports its real status at delete, and no exit is reported
    /// twice.
    #[lab(carapace_tests::lab::Lab::new().timeout(Duration::from_secs(1200)))]
    fn containerd_restarted_while_containers_run() {
        let Rig { tmp, mut ctrd, state } = rig("carapace-restart-", |_| String::new());
        let gate = tmp.path().join("gate");
        std::fs::create_dir(&gate).expect("gate dir");
        let fail = |ctrd: &Containerd, what: &str, e: &dyn std::fmt::Display| -> ! {
            panic!("{what}: {e}\n{}\ncontainerd log:\n{}", sandbox_log_tails(&state, 20), ctrd.log());
        };

        let before = events(&ctrd);
        ctr(&ctrd, 240, &["run", "-d", "--runtime", RUNTIME, IMAGE, "r1", "sleep", "600"])
            .unwrap_or_else(|e| fail(&ctrd, "run r1", &e));
        let mount = format!("type=bind,src={},dst=/gate,options=rbind:rw", gate.display());
        let waiter = "while [ ! -e /gate/go ]; do sleep 0.2; done; echo seen > /gate/seen; exit 3";
        ctr(&ctrd, 240, &["run", "-d", "--runtime", RUNTIME, "--mount", &mount, IMAGE, "r2", "sh", "-c", waiter])
            .unwrap_or_else(|e| fail(&ctrd, "run r2", &e));

        let shims = processes_with("containerd-shim-carapace-v2");
        ctrd.stop_daemon();
        let before = collect(before);
        std::thread::sleep(Duration::from_secs(1));
        let alive: Vec<u32> = shims.iter().copied().filter(|p| Path::new(&format!("/proc/{p}")).exists()).collect();
        if alive != shims {
            fail(&ctrd, "the shims outlive containerd", &format!("{shims:?} before, {alive:?} after it stopped"));
        }
        // r2 ends while containerd is down
        std::fs::write(gate.join("go"), b"").expect("open the gate");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !gate.join("seen").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(gate.join("seen").exists(), "r2 never saw the gate open");
        std::thread::sleep(Duration::from_secs(2));
        ctrd.log_level = Some("debug");
        let log_at_restart = ctrd.log().len();
        ctrd.start_daemon().unwrap_or_else(|e| fail(&ctrd, "containerd again", &e));
        let after = events(&ctrd);

        for (id, want) in [("r1", "RUNNING"), ("r2", "STOPPED")] {
            let got = task_status(&ctrd, id);
            if got.as_deref() != Some(want) {
                let ls = ctr(&ctrd, 30, &["task", "ls"]);
                let bundle = tmp.path().join("containerd/state/io.containerd.runtime.v2.task/carapace-test").join(id);
                let files: Vec<String> = std::fs::read_dir(&bundle)
                    .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                    .unwrap_or_default();
                let address = std::fs::read_to_string(bundle.join("address")).unwrap_or_default();
                let since: String = ctrd.log().get(log_at_restart..).unwrap_or_default().lines()
                    .filter(|l| l.contains("r1") || l.contains("r2") || l.contains("shim") || l.contains("level=error"))
                    .collect::<Vec<_>>().join("\n");
                println!("restart: containerd's log about the shims since its restart:\n{since}");
                fail(
                    &ctrd,
                    &format!("{id} after the restart: {got:?}, expected {want}"),
                    &format!(
                        "task ls: {ls:?}; shims now {:?} (before {shims:?}); bundle {}: {files:?}, address {address:?}",
                        processes_with("containerd-shim-carapace-v2"),
                        bundle.display()
                    ),
                );
            }
        }
        let out = ctr(&ctrd, 120, &["task", "exec", "--exec-id", "x1", "r1", "echo", "still-here"])
            .unwrap_or_else(|e| fail(&ctrd, "exec into r1 after the restart", &e));
        assert_eq!(out.trim(), "still-here");
        // ctr's task delete warns with the task's status when it is not 0
        let deleted_with = |ctrd: &Containerd, id: &str| -> String {
            let out = ctrd.ctr_command_bounded(120).args(["task", "delete", id]).output().expect("ctr");
            format!("{:?} {}", out.status.code(), String::from_utf8_lossy(&out.stderr).trim())
        };
        let r2 = deleted_with(&ctrd, "r2");
        if !r2.contains("non-zero exit code 3") {
            fail(&ctrd, "r2's real status (3) at delete", &r2);
        }
        ctr(&ctrd, 60, &["task", "kill", "-s", "SIGKILL", "r1"])
            .unwrap_or_else(|e| fail(&ctrd, "kill r1", &e));
        if wait_settled(&ctrd, "r1", 120).as_deref() != Some("STOPPED") {
            fail(&ctrd, "r1 stops after SIGKILL", &"still running");
        }
        let r1 = deleted_with(&ctrd, "r1");
        if !r1.contains("non-zero exit code 137") {
            fail(&ctrd, "r1's status (137) at delete", &r1);
        }
        for id in ["r1", "r2"] {
            ctr(&ctrd, 60, &["container", "delete", id]).unwrap_or_else(|e| fail(&ctrd, "container delete", &e));
        }
        std::thread::sleep(Duration::from_secs(1));
        let after = collect(after);
        let exits: Vec<TaskExit> = task_exits(&before).into_iter().chain(task_exits(&after)).collect();
        println!("restart: exits {exits:?}");
        let of = |id: &str| exits.iter().filter(|e| e.container == id && e.process == id).map(|e| e.status).collect::<Vec<_>>();
        assert_eq!(of("r1"), [137], "exactly one exit for r1, after the restart");
        assert!(of("r2").len() <= 1 && of("r2").iter().all(|s| *s == 3), "r2: {:?}", of("r2"));
        let execs: Vec<&TaskExit> = exits.iter().filter(|e| e.process == "x1").collect();
        assert_eq!(execs.len(), 1, "one exit for the exec: {execs:?}");
        std::thread::sleep(Duration::from_secs(2));
        let left: Vec<_> = std::fs::read_dir(&state).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "sandbox state left: {left:?}");
        for name in ["carapace-vmm", "carapace-fsd", "containerd-shim-carapace-v2"] {
            assert!(processes_with(name).is_empty(), "{name} left");
        }
    }
}

/// How long a guest kernel panic may take to end its task (the VM resets at once:
/// `panic=-1`; the lab is 10-50x slower than a real host).
const PANIC_DEADLINE: Duration = Duration::from_secs(60);
/// How long a guest out of memory may take to be an OOM kill of the hog (the hog fills the
/// guest at the lab's pace first).
const OOM_DEADLINE: Duration = Duration::from_secs(120);

/// The shim's report about VM `id` in containerd's log: its line and the lines after it
/// that carry the quoted VMM log and console (up to 60).
fn shim_report(ctrd: &Containerd, id: &str) -> Option<String> {
    let log = ctrd.log();
    let needle = format!("the VM of {id} ended on its own");
    let at = log.find(&needle)?;
    Some(log[at..].lines().take(60).collect::<Vec<_>>().join("\n"))
}

/// Deletes task and container `id` and checks nothing of it is left.
fn remove(ctrd: &Containerd, state: &Path, id: &str, wrong: &mut Vec<String>) {
    if task_status(ctrd, id).is_some() {
        let mut deleted = ctr(ctrd, 120, &["task", "delete", id]);
        if deleted.is_err() {
            deleted = ctr(ctrd, 120, &["task", "delete", "-f", id]);
        }
        if let Err(e) = deleted {
            wrong.push(format!("{id}: task delete: {e}"));
        }
    }
    if let Err(e) = ctr(ctrd, 60, &["container", "delete", id])
        && !e.contains("not found")
    {
        wrong.push(format!("{id}: container delete: {e}"));
    }
    let left = settle_leftovers(state, id, 20);
    if !left.is_empty() {
        wrong.push(format!("{id}: left behind: {}", left.join("; ")));
    }
}

kvm_test! {
    /// The guest fails under its tasks: its kernel panics (sysrq `c` from a privileged
    /// container; an ordinary container cannot, OCI's read-only /proc/sysrq-trigger), or
    /// it runs out of memory (a hog with no limit of its own takes more than the whole
    /// VM). A panic ends the task within PANIC_DEADLINE with one non-zero exit and the
    /// shim's log quoting the guest's panic; out of memory is an OOM kill of the hog
    /// (status 137, TaskOOM) within OOM_DEADLINE while the agent keeps answering. Nothing
    /// is left after delete.
    ///
    /// The agent itself killed: it is the guest's PID 1, which no process can kill (the
    /// kernel drops SIGKILL/SIGSTOP to global init, the OOM killer never picks it, and no
    /// container sees it: hostile_kvm checks both); it ends only by crashing, and PID 1
    /// exiting panics the kernel ("Attempted to kill init"), so the host sees exactly the
    /// panic case.
    #[lab(carapace_tests::lab::Lab::new().timeout(Duration::from_secs(1500)))]
    fn the_guest_failing_ends_its_tasks_with_a_reason() {
        let Rig { tmp: _tmp, ctrd, state } = rig("carapace-guestfail-", |_| String::new());
        let events = events(&ctrd);
        let mut wrong = Vec::new();
        let run = |id: &str, privileged: bool| {
            let mut args = vec!["run", "-d", "--runtime", RUNTIME];
            if privileged {
                args.push("--privileged");
            }
            args.extend([IMAGE, id, "sleep", "600"]);
            ctr(&ctrd, 240, &args)
        };

        // An ordinary container cannot crash its guest: the write fails and the VM lives on.
        match run("n1", false) {
            Err(e) => wrong.push(format!("n1: run: {e}")),
            Ok(_) => {
                let tried = ctr(&ctrd, 120, &["task", "exec", "--exec-id", "try", "n1", "sh", "-c", "echo c > /proc/sysrq-trigger"]);
                println!("guestfail: n1 (not privileged) writes c to /proc/sysrq-trigger: {tried:?}");
                if tried.is_ok() {
                    wrong.push("n1: an ordinary container wrote /proc/sysrq-trigger".into());
                }
                match ctr(&ctrd, 120, &["task", "exec", "--exec-id", "after", "n1", "echo", "alive"]) {
                    Ok(out) if out.trim() == "alive" => {}
                    other => wrong.push(format!("n1: the VM after the refused write: {other:?}")),
                }
                let _ = ctr(&ctrd, 60, &["task", "kill", "-s", "SIGKILL", "n1"]);
                wait_settled(&ctrd, "n1", 120);
            }
        }
        remove(&ctrd, &state, "n1", &mut wrong);

        // A guest kernel panic.
        match run("p1", true) {
            Err(e) => wrong.push(format!("p1: run: {e}")),
            Ok(_) => {
                let t = Instant::now();
                let crashed = ctr(&ctrd, 120, &["task", "exec", "--exec-id", "crash", "p1", "sh", "-c", "echo c > /proc/sysrq-trigger"]);
                let status = wait_settled(&ctrd, "p1", PANIC_DEADLINE.as_secs());
                let took = t.elapsed();
                println!("guestfail: p1 sysrq c: exec {crashed:?}; task {status:?} after {:.1} s", took.as_secs_f64());
                if crashed.is_ok() {
                    wrong.push("p1: the exec that crashed the guest exited 0".into());
                }
                if status.as_deref() != Some("STOPPED") || took > PANIC_DEADLINE {
                    wrong.push(format!("p1: task {status:?} {:.1} s after the panic (deadline {PANIC_DEADLINE:?})", took.as_secs_f64()));
                }
                // the reason, in the shim's log, as soon as the task ended
                match shim_report(&ctrd, "p1") {
                    Some(r) if r.contains("Kernel panic - not syncing: sysrq triggered crash") => {
                        println!("guestfail: p1: the shim's report:\n{r}");
                    }
                    other => wrong.push(format!("p1: the shim's log does not quote the guest's panic: {other:?}")),
                }
            }
        }
        remove(&ctrd, &state, "p1", &mut wrong);

        // The guest out of memory: an exec with no limit of its own fills the VM, fast (a
        // string doubled until it no longer fits; a shell variable filled through a pipe
        // took 3 minutes of busy vCPU in the lab, which the lab does not always survive).
        match run("o1", false) {
            Err(e) => wrong.push(format!("o1: run: {e}")),
            Ok(_) => {
                let hog = "BEGIN { s = \"a\"; while (1) s = s s }";
                let t = Instant::now();
                let out = ctrd
                    .ctr_command_bounded(OOM_DEADLINE.as_secs() + 60)
                    .args(["task", "exec", "--exec-id", "hog", "o1", "busybox", "awk", hog])
                    .output()
                    .expect("ctr");
                let took = t.elapsed();
                println!("guestfail: o1 hog: {:?} after {:.1} s", out.status.code(), took.as_secs_f64());
                if out.status.code() != Some(137) || took > OOM_DEADLINE {
                    wrong.push(format!(
                        "o1: the hog ended {:?} after {:.1} s (expected 137 within {OOM_DEADLINE:?}): {}",
                        out.status.code(),
                        took.as_secs_f64(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                // a kill inside the containers' cgroup, not a global OOM (the guest console)
                let console = state.join("o1").join("console.log");
                let deadline = Instant::now() + Duration::from_secs(60);
                let kind = loop {
                    let text = std::fs::read_to_string(&console).unwrap_or_default();
                    if text.contains("Memory cgroup out of memory: Killed process") {
                        break "memory cgroup";
                    }
                    if text.contains("\nOut of memory: Killed process") {
                        break "global";
                    }
                    if Instant::now() > deadline {
                        break "none on the console";
                    }
                    std::thread::sleep(Duration::from_millis(500));
                };
                println!("guestfail: o1: OOM kill on the guest console: {kind}");
                if kind != "memory cgroup" {
                    wrong.push(format!("o1: OOM kill on the guest console: {kind}, expected memory cgroup"));
                }
                // the agent survived and answers; the container's init lives on
                match ctr(&ctrd, 120, &["task", "exec", "--exec-id", "after", "o1", "echo", "alive"]) {
                    Ok(out) if out.trim() == "alive" => {}
                    other => wrong.push(format!("o1: the agent after the OOM: {other:?}")),
                }
                if task_status(&ctrd, "o1").as_deref() != Some("RUNNING") {
                    wrong.push(format!("o1: the init after the OOM: {:?}", task_status(&ctrd, "o1")));
                }
                let _ = ctr(&ctrd, 60, &["task", "kill", "-s", "SIGKILL", "o1"]);
                wait_settled(&ctrd, "o1", 120);
                if let Some(r) = shim_report(&ctrd, "o1") {
                    wrong.push(format!("o1: the VM ended: {r}"));
                }
            }
        }
        remove(&ctrd, &state, "o1", &mut wrong);

        std::thread::sleep(Duration::from_secs(2));
        let text = collect(events);
        let exits = task_exits(&text);
        let of = |c: &str, p: &str| exits.iter().filter(|e| e.container == c && e.process == p).map(|e| e.status).collect::<Vec<_>>();
        println!("guestfail: exits {exits:?}");
        let p1 = of("p1", "p1");
        if p1.len() != 1 || p1[0] == 0 {
            wrong.push(format!("p1: exits of the init {p1:?}, expected one non-zero"));
        }
        let crash = of("p1", "crash");
        if crash.len() > 1 || crash.contains(&0) {
            wrong.push(format!("p1: exits of the crashing exec {crash:?}"));
        }
        if of("o1", "hog") != [137] {
            wrong.push(format!("o1: exits of the hog {:?}, expected [137]", of("o1", "hog")));
        }
        if !text.lines().any(|l| l.contains("/tasks/oom") && l.contains("\"o1\"")) {
            wrong.push("o1: no TaskOOM".into());
        }
        if !wrong.is_empty() {
            panic!(
                "{} findings:\n{}\n\nsandbox logs:\n{}\ncontainerd log (end):\n{}",
                wrong.len(),
                wrong.join("\n"),
                sandbox_log_tails(&state, 20),
                ctrd.log().lines().rev().take(150).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// A helper program standing in for the fs daemon or the VMM: counts its starts in
/// `<dir>/<name>.starts`, then runs `body`.
fn fake_helper(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let text = format!(
        "#!/bin/sh\necho started >> {:?}\n{body}\n",
        dir.join(format!("{name}.starts")).display().to_string()
    );
    std::fs::write(&path, text).expect("write the fake helper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// One case of [`a_helper_failing_at_start_fails_the_create_clearly_once`].
struct StartFailure {
    id: &'static str,
    /// A fake helper (its name, starting `fsd` or `vmm`, and its shell body), or None.
    fake: Option<(&'static str, &'static str)>,
    /// Guest kernel parameters added to the configuration.
    params: &'static str,
    /// What the error must say.
    want: &'static [&'static str],
    /// The configured timeout at stake.
    timeout_s: u64,
}

kvm_test! {
    /// A helper that fails at start: the fs daemon or the VMM exiting at once or never
    /// getting ready, and a real guest whose agent never answers (it listens on another
    /// vsock port, `carapace.port=1000`). Each `ctr run` fails with an error naming the
    /// helper and why within its timeout (the fs daemon's socket: 10 s; the agent:
    /// `boot_timeout_ms`, 30 s here), the helper was started once (no respawn), and
    /// nothing is left.
    #[lab(carapace_tests::lab::Lab::new().timeout(Duration::from_secs(1200)))]
    fn a_helper_failing_at_start_fails_the_create_clearly_once() {
        let Rig { tmp, ctrd, state } = rig("carapace-helperfail-", |_| String::new());
        let config = tmp.path().join("configuration.toml");
        let base = std::fs::read_to_string(&config)
            .expect("the configuration")
            .replace("boot_timeout_ms = 300000", "boot_timeout_ms = 30000");
        let bins = carapace_tests::workspace_bin("carapace-vmm");
        let bins = bins.parent().expect("bin dir");
        let quoted = |p: &Path| format!("{:?}", p.display().to_string());
        let real_fsd = quoted(&bins.join("carapace-fsd"));
        let real_vmm = quoted(&bins.join("carapace-vmm"));
        assert!(base.contains(&real_fsd) && base.contains(&real_vmm), "{base}");
        let dir = tmp.path();
        let cases = [
            StartFailure { id: "h1", fake: Some(("fsd-exits", "echo 'fsd: no such share' >&2; exit 3")), params: "",
                want: &["fs daemon", "exited before creating", "fsd: no such share"], timeout_s: 10 },
            StartFailure { id: "h2", fake: Some(("fsd-silent", "exec sleep 600")), params: "",
                want: &["fs daemon", "did not create", "10s"], timeout_s: 10 },
            StartFailure { id: "h3", fake: Some(("vmm-exits", "echo 'vmm: cannot open /dev/kvm' >&2; exit 4")), params: "",
                want: &["VMM", "exited", "vmm: cannot open /dev/kvm"], timeout_s: 10 },
            StartFailure { id: "h4", fake: Some(("vmm-silent", "exec sleep 600")), params: "",
                want: &["did not answer", "30s"], timeout_s: 30 },
            StartFailure { id: "h5", fake: None, params: "carapace.port=1000",
                want: &["did not answer", "30s"], timeout_s: 30 },
        ];
        let mut wrong = Vec::new();
        for StartFailure { id, fake, params, want, timeout_s: timeout } in cases {
            let mut text = base.clone();
            let mut starts = None;
            if let Some((name, body)) = fake {
                let path = fake_helper(dir, name, body);
                let real = if name.starts_with("fsd") { &real_fsd } else { &real_vmm };
                text = text.replace(real.as_str(), &quoted(&path));
                starts = Some((name, dir.join(format!("{name}.starts"))));
            }
            if !params.is_empty() {
                text = text.replace("[hypervisor]\n", &format!("[hypervisor]\nkernel_params = {params:?}\n"));
            }
            std::fs::write(&config, &text).expect("write the configuration");
            let t = Instant::now();
            let run = ctr(&ctrd, 240, &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "600"]);
            let took = t.elapsed();
            let first: String = match &run {
                Ok(_) => "succeeded".into(),
                Err(e) => e.chars().take(600).collect(),
            };
            println!("helperfail: {id} {fake:?} {params}: {:.1} s: {first}", took.as_secs_f64());
            match &run {
                Ok(_) => wrong.push(format!("{id}: the run succeeded")),
                Err(e) => {
                    let missing: Vec<&&str> = want.iter().filter(|w| !e.contains(**w)).collect();
                    if !missing.is_empty() {
                        wrong.push(format!("{id}: the error lacks {missing:?}: {e}"));
                    }
                }
            }
            // the configured timeout, and what the lab adds (VM boot, containerd, the shim)
            let bound = Duration::from_secs(timeout + 60);
            if took > bound {
                wrong.push(format!("{id}: the failure took {:.1} s (bound {bound:?})", took.as_secs_f64()));
            }
            // no respawn: still one start a while later
            std::thread::sleep(Duration::from_secs(5));
            if let Some((name, file)) = &starts {
                let n = std::fs::read_to_string(file).unwrap_or_default().lines().count();
                if n != 1 {
                    wrong.push(format!("{id}: {name} started {n} times"));
                }
                let alive = processes_with(name);
                if !alive.is_empty() {
                    wrong.push(format!("{id}: {name} left running: {alive:?}"));
                }
            }
            if task_status(&ctrd, id).is_some() {
                wrong.push(format!("{id}: a task is left: {:?}", task_status(&ctrd, id)));
            }
            remove(&ctrd, &state, id, &mut wrong);
        }
        std::fs::write(&config, &base).expect("restore the configuration");
        if !wrong.is_empty() {
            panic!(
                "{} findings:\n{}\n\ncontainerd log (end):\n{}",
                wrong.len(),
                wrong.join("\n"),
                ctrd.log().lines().rev().take(120).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}
