//! The `carapace` CLI driven the way runc's callers drive it (containerd's runc shim,
//! conmon): `create --pid-file`, `start`, then the pid read from the file is waited for as
//! an adopted child (the caller is a subreaper) and its exit status taken for the
//! container's; `exec --detach --pid-file` the same for an exec'd process; signals sent
//! straight to those pids; `kill`; `delete`. The pids must be host processes of ours (the
//! keepers, `/proc/<pid>/exe` the carapace binary), never a guest pid or the VMM.
//!
//! This test process makes itself a child subreaper (`PR_SET_CHILD_SUBREAPER`), so the
//! keepers, orphaned when `carapace create`/`exec` exit, become its children, as they
//! become containerd's shim's or conmon's.
//!
//! Host-agent variants run here (root, no VM); `*_in_a_vm` variants boot real VMs (lab).

mod runtime_common;

use std::path::Path;
use std::time::{Duration, Instant};

use carapace_tests::{fixtures, kvm_test, workspace_bin};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use runtime_common::{Env, env, env_vm, receive_terminal};
use serde_json::Value;

/// How long a container process may take to end once it should (VM boots are not
/// counted: they happen in `create`).
const EXIT_DEADLINE: Duration = Duration::from_secs(60);

fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
}

/// Waits for our (adopted) child `pid`; its status as runc's callers compute it: the exit
/// code, or 128 + the signal that killed it.
fn reap(pid: i32) -> i32 {
    let deadline = Instant::now() + EXIT_DEADLINE;
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(e) => panic!("waiting for {pid}: {e} (not our child?)"),
        }
        assert!(Instant::now() < deadline, "pid {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is still running (a zombie is not).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_owned()))
        .is_some_and(|r| !r.starts_with('Z'))
}

/// Collects every adopted child that already exited (guards of killed keepers).
fn reap_exited() {
    while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

fn read_pid(file: &Path) -> i32 {
    let text = std::fs::read_to_string(file).unwrap();
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{file:?}: {text:?}"))
}

/// The pid is a host process of ours: the carapace binary (a keeper), not the VMM, not a
/// process of the container.
fn assert_keeper(env: &Env, id: &str, pid: i32) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        workspace_bin("carapace").canonicalize().unwrap(),
        "pid {pid} is not a carapace process"
    );
    let ps = env.run(&["ps", "--format", "json", id]);
    if ps.status.success() {
        let guest: Vec<i64> = serde_json::from_slice(&ps.stdout).unwrap();
        assert!(!guest.contains(&i64::from(pid)), "{pid} is a container pid");
    }
    let st: Value =
        serde_json::from_slice(&std::fs::read(env.root.join(id).join("state.json")).unwrap())
            .unwrap();
    assert_ne!(st["vmm"]["pid"], pid, "the VMM's pid was handed out");
}

/// Whether a process whose last argument is `arg` runs in container `id` (the command
/// lines in the container's /proc, read by an exec; a process count is no measure: the
/// test inits start a `sleep 0.1` every tenth of a second).
fn runs_with_arg(env: &Env, id: &str, arg: &str) -> bool {
    let out = env.run(&[
        "exec",
        id,
        "sh",
        "-c",
        "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done 2>/dev/null",
    ]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim_end().ends_with(&format!(" {arg}")))
}

/// `create --bundle B --pid-file PID_FILE ID`, B a new bundle running `args`; returns
/// create's exit code, the file its output went to (`run_to_files` under `out`) and B.
fn create_with_pid_file(
    env: &Env,
    id: &str,
    args: &[&str],
    pid_file: &Path,
    out: &str,
) -> (i32, std::path::PathBuf, std::path::PathBuf) {
    let b = env.bundle(&format!("b-{id}"), &fixtures::default_spec(args));
    let (rc, written) = env.run_to_files(
        &[
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            id,
        ],
        out,
    );
    (rc, written, b)
}

/// `create --pid-file` + `start`: the pid is the init's keeper, which exits with the
/// init's status; `state` is complete and then says stopped; `delete` leaves nothing.
fn init_pid_exits_with_the_containers_status(env: &Env) {
    let pid_file = env.tmp.path().join("init.pid");
    let (rc, out, b) = create_with_pid_file(
        env,
        "x1",
        &["sh", "-c", "echo to-out; echo to-err >&2; exit 7"],
        &pid_file,
        "x1",
    );
    assert_eq!(rc, 0);
    let pid = read_pid(&pid_file);
    assert_keeper(env, "x1", pid);
    // `created`: the init exists, and so does the process standing for it
    let st = env.state("x1");
    assert_eq!(st["status"], "created");
    assert_eq!(st["pid"], pid);
    assert_eq!(
        st["rootfs"],
        b.canonicalize().unwrap().join("rootfs").to_str().unwrap()
    );
    assert_eq!(st["owner"], "root");
    assert!(st["created"].as_str().is_some_and(|c| c.ends_with('Z')));
    assert!(running(pid));
    assert!(env.run(&["start", "x1"]).status.success());
    assert_eq!(reap(pid), 7);
    let st = env.state("x1");
    assert_eq!(
        (st["status"].clone(), st["pid"].clone()),
        ("stopped".into(), 0.into())
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "to-out\n");
    assert_eq!(
        std::fs::read_to_string(out.with_extension("err")).unwrap(),
        "to-err\n"
    );
    assert!(env.run(&["delete", "x1"]).status.success());
    reap_exited();
    env.assert_clean();
}

/// `exec FLAG --pid-file PID_FILE ID ARGS...` (FLAG `--detach` or `-d`), which must
/// succeed; returns the pid the file then names and the file the output went to
/// (`run_to_files` under `out`).
fn exec_detached(
    env: &Env,
    flag: &str,
    pid_file: &Path,
    id: &str,
    args: &[&str],
    out: &str,
) -> (i32, std::path::PathBuf) {
    let mut argv = vec!["exec", flag, "--pid-file", pid_file.to_str().unwrap(), id];
    argv.extend_from_slice(args);
    let (rc, written) = env.run_to_files(&argv, out);
    assert_eq!(rc, 0, "exec {args:?}");
    (read_pid(pid_file), written)
}

/// `exec --detach --pid-file`: the pid is the exec's keeper, exiting with the process's
/// status; SIGTERM to it reaches the process; SIGKILL to it kills the process; `kill`
/// reaches the init and its keeper exits with the init's status.
fn exec_pids_signals_and_kill(env: &Env) {
    let init_file = env.tmp.path().join("init2.pid");
    let (rc, _, _) = create_with_pid_file(
        env,
        "x2",
        &[
            "sh",
            "-c",
            "trap 'exit 3' TERM; while true; do sleep 0.1; done",
        ],
        &init_file,
        "x2",
    );
    assert_eq!(rc, 0);
    let init = read_pid(&init_file);
    assert!(env.run(&["start", "x2"]).status.success());
    assert!(!runs_with_arg(env, "x2", "600"));

    // an exec exiting by itself, its output relayed by its keeper
    let exec_file = env.tmp.path().join("exec.pid");
    let (pid, out) = exec_detached(
        env,
        "--detach",
        &exec_file,
        "x2",
        &["sh", "-c", "sleep 1; echo from-exec; exit 5"],
        "exec5",
    );
    assert_keeper(env, "x2", pid);
    assert_eq!(reap(pid), 5);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "from-exec\n");

    // stdin and stderr flow through the keeper too: what the caller gave reaches the
    // process, what it writes to stderr reaches the caller's stderr
    let input = env.tmp.path().join("exec6.in");
    std::fs::write(&input, "to-stdin\n").unwrap();
    let (outp, errp) = (
        env.tmp.path().join("exec6.out"),
        env.tmp.path().join("exec6.err"),
    );
    let st = env
        .cmd(&[
            "exec",
            "-d",
            "--pid-file",
            exec_file.to_str().unwrap(),
            "x2",
            "sh",
            "-c",
            "cat; echo to-err >&2; exit 6",
        ])
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(std::fs::File::create(&outp).unwrap())
        .stderr(std::fs::File::create(&errp).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let pid = read_pid(&exec_file);
    assert_keeper(env, "x2", pid);
    assert_eq!(reap(pid), 6);
    assert_eq!(std::fs::read_to_string(&outp).unwrap(), "to-stdin\n");
    let err = std::fs::read_to_string(&errp).unwrap();
    assert!(err.contains("to-err"), "{err}");

    // in the foreground, `exec --pid-file` names itself: it stands for the process and
    // exits with its status
    let fg_file = env.tmp.path().join("exec-fg.pid");
    let mut fg = env
        .cmd(&[
            "exec",
            "--pid-file",
            fg_file.to_str().unwrap(),
            "x2",
            "sh",
            "-c",
            "sleep 1; exit 7",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + EXIT_DEADLINE;
    while !fg_file.exists() {
        assert!(Instant::now() < deadline, "exec wrote no pid file");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_pid(&fg_file), fg.id() as i32);
    assert_eq!(fg.wait().unwrap().code(), Some(7));

    // SIGTERM sent straight to the exec's pid reaches the process (its trap says 4)
    let (pid, _) = exec_detached(
        env,
        "-d",
        &exec_file,
        "x2",
        &[
            "sh",
            "-c",
            "trap 'exit 4' TERM; while true; do sleep 0.1; done",
        ],
        "exec4",
    );
    std::thread::sleep(Duration::from_millis(500)); // the trap is set
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    assert_eq!(reap(pid), 4);

    // SIGKILL sent straight to it (podman rm -f, conmon's exec timeout): the process in
    // the container is killed too
    let (pid, _) = exec_detached(env, "-d", &exec_file, "x2", &["sleep", "600"], "exec-sleep");
    assert!(runs_with_arg(env, "x2", "600"));
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert_eq!(reap(pid), 137);
    let deadline = Instant::now() + EXIT_DEADLINE;
    while runs_with_arg(env, "x2", "600") {
        assert!(
            Instant::now() < deadline,
            "the exec'd process outlived its killed keeper"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(env.state("x2")["status"], "running");

    // an exec that cannot start fails the command clearly, and nothing stays
    let (rc, err_out) = env.run_to_files(
        &[
            "exec",
            "-d",
            "--pid-file",
            env.tmp.path().join("never.pid").to_str().unwrap(),
            "x2",
            "/no/such/binary",
        ],
        "exec-missing",
    );
    assert_ne!(rc, 0);
    let err = std::fs::read_to_string(err_out.with_extension("err")).unwrap();
    assert!(err.contains("/no/such/binary"), "{err}");
    assert!(!env.tmp.path().join("never.pid").exists());

    // `kill` (SIGTERM) reaches the init: its trap exits 3, and so does its keeper
    assert!(env.run(&["kill", "x2", "TERM"]).status.success());
    assert_eq!(reap(init), 3);
    assert_eq!(env.state("x2")["status"], "stopped");
    assert!(env.run(&["delete", "x2"]).status.success());
    reap_exited();
    env.assert_clean();
}

/// SIGKILL straight to the init's pid: the container is killed (its keeper's guard) and
/// counts as stopped; `delete` without --force then cleans up.
fn killing_the_init_pid_kills_the_container(env: &Env) {
    let pid_file = env.tmp.path().join("init3.pid");
    let (rc, _, _) = create_with_pid_file(env, "x3", &["sleep", "600"], &pid_file, "x3");
    assert_eq!(rc, 0);
    let pid = read_pid(&pid_file);
    assert!(env.run(&["start", "x3"]).status.success());
    assert_eq!(env.state("x3")["status"], "running");
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert_eq!(reap(pid), 137);
    assert_eq!(env.state("x3")["status"], "stopped");
    // the guard records how the init ended once it killed it
    let deadline = Instant::now() + EXIT_DEADLINE;
    loop {
        let st: Value =
            serde_json::from_slice(&std::fs::read(env.root.join("x3").join("state.json")).unwrap())
                .unwrap();
        if st["exit"]["status"] == 137 {
            break;
        }
        assert!(Instant::now() < deadline, "no exit recorded: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.run(&["delete", "x3"]).status.success());
    reap_exited();
    env.assert_clean();
}

/// `pause` freezes the container (`state` says paused, it makes no progress), `resume`
/// thaws it; each is refused in the wrong status.
fn pause_and_resume(env: &Env) {
    let b = env.bundle(
        "b4",
        &fixtures::default_spec(&[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done",
        ]),
    );
    let count_file = b.join("rootfs/tmp/count");
    let count = || -> u64 {
        std::fs::read_to_string(&count_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    };
    let (rc, _) = env.run_to_files(&["create", "-b", b.to_str().unwrap(), "x4"], "x4");
    assert_eq!(rc, 0);
    assert_eq!(env.run(&["pause", "x4"]).status.code(), Some(5));
    assert!(env.run(&["start", "x4"]).status.success());
    let deadline = Instant::now() + EXIT_DEADLINE;
    while count() < 3 {
        assert!(Instant::now() < deadline, "the container never counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(env.run(&["resume", "x4"]).status.code(), Some(5));
    assert!(env.run(&["pause", "x4"]).status.success());
    assert_eq!(env.state("x4")["status"], "paused");
    assert_eq!(env.run(&["pause", "x4"]).status.code(), Some(5));
    let frozen = count();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(), frozen, "a paused container went on counting");
    assert!(env.run(&["resume", "x4"]).status.success());
    assert_eq!(env.state("x4")["status"], "running");
    let deadline = Instant::now() + EXIT_DEADLINE;
    while count() <= frozen + 2 {
        assert!(
            Instant::now() < deadline,
            "a resumed container did not go on"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // paused again, it can still be deleted
    assert!(env.run(&["pause", "x4"]).status.success());
    assert!(env.run(&["delete", "--force", "x4"]).status.success());
    reap_exited();
    env.assert_clean();
}

/// `exec --detach --tty --console-socket`: the caller gets the terminal's master (as
/// conmon does for `podman exec -it`), its size reaches the process, and the keeper exits
/// with the process's status.
fn exec_with_a_console_socket(env: &Env) {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let b = env.bundle("b5", &fixtures::default_spec(&["sleep", "600"]));
    let (rc, _) = env.run_to_files(&["run", "-d", "-b", b.to_str().unwrap(), "x5"], "x5");
    assert_eq!(rc, 0);
    let sock = env.tmp.path().join("exec-console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let receiver = std::thread::spawn(move || receive_terminal(listener));
    let pid_file = env.tmp.path().join("exec-tty.pid");
    let (rc, _) = env.run_to_files(
        &[
            "exec",
            "-d",
            "-t",
            "--console-socket",
            sock.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "x5",
            "sh",
            "-c",
            "read x; if [ -t 1 ]; then t=tty; fi; echo got $x $t $(stty size); exit 6",
        ],
        "exec-tty",
    );
    assert_eq!(rc, 0);
    let mut master = receiver.join().unwrap();
    let ws = nix::libc::winsize {
        ws_row: 21,
        ws_col: 77,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, a live local of that
    // type; the descriptor is open for the call.
    let r = unsafe { nix::libc::ioctl(master.as_raw_fd(), nix::libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0);
    std::thread::sleep(Duration::from_millis(600)); // the keeper looks every 200 ms
    master.write_all(b"hi\n").unwrap();
    let pid = read_pid(&pid_file);
    assert_keeper(env, "x5", pid);
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("77") {
        let n = master.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("got hi tty 21 77"), "{text:?}");
    assert_eq!(reap(pid), 6);
    drop(master);
    // without a terminal, the console socket is refused
    let out = env.run(&[
        "exec",
        "-d",
        "--console-socket",
        sock.to_str().unwrap(),
        "x5",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no terminal"));
    assert!(env.run(&["delete", "--force", "x5"]).status.success());
    reap_exited();
    env.assert_clean();
}

/// `update`: limits from flags or an OCI resources object on stdin (containerd's runc
/// shim) reach the container's cgroup; bad input is refused clearly.
fn update_limits(env: &Env) {
    use std::io::Write;
    // its own cgroup namespace and cgroup2 mount: /sys/fs/cgroup is its cgroup
    let mut spec = fixtures::default_spec(&["sleep", "600"]);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "cgroup"}));
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime"]}
        ));
    let b = env.bundle("b6", &spec);
    let (rc, _) = env.run_to_files(&["run", "-d", "-b", b.to_str().unwrap(), "x6"], "x6");
    assert_eq!(rc, 0);
    let read = |file: &str| -> String {
        let out = env.run(&["exec", "x6", "cat", &format!("/sys/fs/cgroup/{file}")]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // the guest's memory, in KiB (the container's /proc is the guest's)
    let guest_kib = || -> u64 {
        let out = env.run(&["exec", "x6", "grep", "MemTotal", "/proc/meminfo"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let before = guest_kib();
    assert!(
        env.run(&["update", "--memory", "96m", "--pids-limit", "77", "x6"])
            .status
            .success()
    );
    assert_eq!(read("memory.max"), (96u64 << 20).to_string());
    // the VM grew for the new limit (hot-plugged memory; the guest plugs it on its own)
    let deadline = Instant::now() + Duration::from_secs(120);
    while guest_kib() < before + 90 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the guest did not grow for the 96 MiB limit: {before} KiB before, {} KiB now",
            guest_kib()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(read("pids.max"), "77");
    let mut child = env
        .cmd(&["update", "--resources", "-", "x6"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"pids": {"limit": 55}}"#)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(read("pids.max"), "55");
    // the limits show in its statistics, as runc's events print them
    let ev = env.run(&["events", "--stats", "x6"]);
    assert!(ev.status.success());
    let ev: Value = serde_json::from_slice(&ev.stdout).unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["id"].as_str()),
        (Some("stats"), Some("x6"))
    );
    assert_eq!(ev["data"]["pids"]["limit"], 55);
    assert!(ev["data"]["pids"]["current"].as_u64() >= Some(1), "{ev}");
    assert_eq!(ev["data"]["memory"]["usage"]["limit"], 96u64 << 20);
    assert!(
        ev["data"]["cpu"]["usage"]["total"].as_u64() > Some(0),
        "{ev}"
    );
    // streamed: one event per interval, until it is stopped
    let mut stream = env
        .cmd(&["events", "--interval", "200ms", "x6"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stream.stdout.take().unwrap()));
    for _ in 0..2 {
        let line = lines.next().unwrap().unwrap();
        let ev: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(ev["type"], "stats", "{line}");
    }
    // an out-of-memory kill in the container (a shell holding 150 MB in a variable, past
    // the 96 MiB limit) comes out of the same stream as an oom event
    let hog = env.run(&[
        "exec",
        "x6",
        "sh",
        "-c",
        "x=$(head -c 150000000 /dev/zero | tr '\\000' a); echo survived ${#x}",
    ]);
    assert!(!String::from_utf8_lossy(&hog.stdout).contains("survived"));
    let mut seen = Vec::new();
    let oom = loop {
        let Some(Ok(line)) = lines.next() else {
            break false;
        };
        let ev: Value = serde_json::from_str(&line).unwrap();
        if ev["type"] == "oom" {
            assert_eq!(ev["id"], "x6", "{line}");
            break true;
        }
        seen.push(ev["type"].to_string());
        if seen.len() > 600 {
            break false;
        }
    };
    assert!(oom, "no oom event in the stream; saw {seen:?}");
    stream.kill().unwrap();
    stream.wait().unwrap();
    let bad = env.run(&["update", "--memory", "lots", "x6"]);
    assert_ne!(bad.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--memory"));
    let none = env.run(&["update", "x6"]);
    assert!(String::from_utf8_lossy(&none.stderr).contains("nothing to update"));
    assert!(env.run(&["delete", "--force", "x6"]).status.success());
    reap_exited();
    env.assert_clean();
}

/// `run --pid-file` in the foreground: `run` itself stands for the container (its pid in
/// the file and in `state`), forwards SIGTERM to it and exits with its status.
fn foreground_run_stands_for_its_container(env: &Env) {
    let b = env.bundle(
        "b7",
        &fixtures::default_spec(&[
            "sh",
            "-c",
            "trap 'exit 8' TERM; while true; do sleep 0.1; done",
        ]),
    );
    let pid_file = env.tmp.path().join("run.pid");
    let mut run = env
        .cmd(&[
            "run",
            "-b",
            b.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "x7",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !pid_file.exists() || env.state("x7")["status"] != "running" {
        assert!(Instant::now() < deadline, "run never started the container");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = read_pid(&pid_file);
    assert_eq!(pid, run.id() as i32);
    assert_eq!(env.state("x7")["pid"], pid);
    std::thread::sleep(Duration::from_millis(500)); // the trap is set
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    assert_eq!(run.wait().unwrap().code(), Some(8));
    reap_exited();
    env.assert_clean();
}

/// A pid file in a missing directory: a clear error naming it, and nothing left (the
/// container deleted; a detached exec's process killed).
fn pid_file_in_a_missing_directory(env: &Env) {
    let bad = env.tmp.path().join("no/such/dir/pid");
    let b = env.bundle("b8", &fixtures::default_spec(&["sleep", "600"]));
    let (rc, out) = env.run_to_files(
        &[
            "create",
            "-b",
            b.to_str().unwrap(),
            "--pid-file",
            bad.to_str().unwrap(),
            "x8",
        ],
        "x8-bad",
    );
    assert_ne!(rc, 0);
    let err = std::fs::read_to_string(out.with_extension("err")).unwrap();
    assert!(
        err.contains("pid file") && err.contains("no/such/dir"),
        "{err}"
    );
    reap_exited();
    env.assert_clean();

    let (rc, _) = env.run_to_files(&["run", "-d", "-b", b.to_str().unwrap(), "x8"], "x8");
    assert_eq!(rc, 0);
    assert!(!runs_with_arg(env, "x8", "601"));
    let (rc, out) = env.run_to_files(
        &[
            "exec",
            "-d",
            "--pid-file",
            bad.to_str().unwrap(),
            "x8",
            "sleep",
            "601",
        ],
        "x8-exec-bad",
    );
    assert_ne!(rc, 0);
    let err = std::fs::read_to_string(out.with_extension("err")).unwrap();
    assert!(err.contains("pid file"), "{err}");
    let deadline = Instant::now() + EXIT_DEADLINE;
    while runs_with_arg(env, "x8", "601") {
        assert!(
            Instant::now() < deadline,
            "the exec'd process was left running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.run(&["delete", "--force", "x8"]).status.success());
    reap_exited();
    env.assert_clean();
}

/// `exec --user`, `--additional-gids`, `--cap`: the process runs as asked; bad values and
/// `--preserve-fds` are refused by name (exit code 2) before anything runs.
fn exec_identity_options(env: &Env) {
    let b = env.bundle("b9", &fixtures::default_spec(&["sleep", "600"]));
    let (rc, _) = env.run_to_files(&["run", "-d", "-b", b.to_str().unwrap(), "x9"], "x9");
    assert_eq!(rc, 0);
    let out = env.run(&[
        "exec",
        "--user",
        "1000:1001",
        "-g",
        "5",
        "--cap",
        "NET_ADMIN",
        "x9",
        "sh",
        "-c",
        "echo $(id -u) $(id -g) $(id -G); grep CapBnd /proc/self/status",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let ids = lines.next().unwrap_or_default();
    assert!(
        ids.starts_with("1000 1001 ") && ids.contains(" 5"),
        "{text}"
    );
    let bnd = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert_ne!(
        bnd & (1 << 12),
        0,
        "CAP_NET_ADMIN not in the bounding set: {text}"
    );
    for (args, says) in [
        (
            &["exec", "--user", "nobody", "x9", "true"][..],
            "numeric UID",
        ),
        (&["exec", "--cap", "CAP_FLY", "x9", "true"][..], "CAP_FLY"),
        (
            &["exec", "--preserve-fds", "1", "x9", "true"][..],
            "--preserve-fds 1",
        ),
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}"
        );
    }
    assert!(env.run(&["delete", "--force", "x9"]).status.success());
    reap_exited();
    env.assert_clean();
}

#[test]
fn runc_callers_get_host_pids_living_as_long_as_the_processes() {
    let Some(env) = env() else { return };
    become_subreaper();
    init_pid_exits_with_the_containers_status(&env);
    exec_pids_signals_and_kill(&env);
    killing_the_init_pid_kills_the_container(&env);
    exec_with_a_console_socket(&env);
    foreground_run_stands_for_its_container(&env);
    pid_file_in_a_missing_directory(&env);
    exec_identity_options(&env);
}

#[test]
fn pause_and_resume_with_the_host_agent() {
    let Some(env) = env() else { return };
    become_subreaper();
    pause_and_resume(&env);
}

kvm_test! {
    /// The same as a runc caller sees it, with real VMs.
    fn runc_callers_get_host_pids_living_as_long_as_the_processes_in_a_vm() {
        let Some(env) = env_vm() else { return };
        become_subreaper();
        init_pid_exits_with_the_containers_status(&env);
        exec_pids_signals_and_kill(&env);
        killing_the_init_pid_kills_the_container(&env);
        pause_and_resume(&env);
        // (the cgroups of this host's host-mode agent may not be writable: VMs only)
        update_limits(&env);
        exec_identity_options(&env);
    }
}

/// What is left of sandboxes whose state lives under `root`: processes naming it in their
/// command line (keepers, guards; the VMM and fs daemon name their sockets there), state
/// entries, mounts.
fn left_under(root: &Path) -> Vec<String> {
    let tag = root.display().to_string();
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        let ours = ["carapace", "carapace-vmm", "carapace-fsd"]
            .iter()
            .any(|b| exe.file_name().is_some_and(|n| n == *b));
        if running(pid) && (cmdline.contains(&tag) || (ours && cmdline.contains("vm.json"))) {
            left.push(format!("process {pid}: {cmdline}"));
        }
    }
    for l in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
    {
        if l.contains(&tag) {
            left.push(format!("mount: {l}"));
        }
    }
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        left.push(format!("state entry: {}", e.path().display()));
    }
    left
}

kvm_test! {
    /// containerd's own runc shim (io.containerd.runc.v2) driving the carapace CLI as its
    /// runc binary (`ctr run --runc-binary`): the container's output and exit status come
    /// back through ctr, an exec's too, `ctr task kill` reaches the container, and after
    /// the deletes nothing of the VMs is left.
    fn containerd_runc_shim_drives_the_cli_in_a_vm() {
        use carapace_tests::containerd::{Containerd, carapace_config};
        use std::os::unix::fs::PermissionsExt;
        if !runtime_common::is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::Builder::new().prefix("carapace-ctr-").tempdir().unwrap();
        let bins = workspace_bin("carapace").parent().unwrap().to_path_buf();
        let (config, _) = carapace_config(dir.path(), &bins, true).unwrap();
        // The shim runs `<runc-binary> --root ... --log ... --log-format json COMMAND`;
        // the wrapper only adds our configuration.
        let wrapper = dir.path().join("carapace-runc");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec {} --config {} \"$@\"\n",
                workspace_bin("carapace").display(),
                config.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let rootfs = dir.path().join("rootfs");
        fixtures::busybox_rootfs(&rootfs).unwrap();
        let archive = dir.path().join("busybox.tar");
        let image = "docker.io/carapace/busybox:cli";
        fixtures::oci_image_archive(&rootfs, image, &["sh"], dir.path(), &archive).unwrap();
        let ctrd = Containerd::start(&dir.path().join("containerd"), &[], None, &[]).unwrap();
        ctrd.import(&archive).unwrap();
        // the runc shim's default state root for our namespace
        let root = Path::new("/run/containerd/runc/carapace-test");
        let w = wrapper.to_str().unwrap();

        // run: output and exit status through the shim
        let out = ctrd
            .ctr_command()
            .args(["run", "--rm", "--runc-binary", w, image, "r1", "sh", "-c", "echo hello from $(uname -r); exit 7"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(7), "{text}\n{}\n{}", String::from_utf8_lossy(&out.stderr), ctrd.log());
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert!(text.starts_with("hello from ") && !text.contains(host.trim()), "{text}");
        let left = left_under(root);
        assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));

        // a detached task, an exec into it, a kill, a delete
        ctrd.ctr(&[
            "run", "-d", "--runc-binary", w, image, "r2",
            "sh", "-c", "trap 'exit 9' TERM; while true; do sleep 0.1; done",
        ])
        .unwrap();
        let exec = ctrd
            .ctr_command()
            .args(["task", "exec", "--exec-id", "e1", "r2", "sh", "-c", "echo in-exec; exit 3"])
            .output()
            .unwrap();
        assert_eq!(exec.status.code(), Some(3), "{}", String::from_utf8_lossy(&exec.stderr));
        assert_eq!(String::from_utf8_lossy(&exec.stdout), "in-exec\n");
        // the task's pid as containerd knows it is a host process of ours
        let tasks = String::from_utf8_lossy(&ctrd.ctr(&["task", "ls"]).unwrap().stdout).into_owned();
        let pid: i32 = tasks
            .lines()
            .find(|l| l.starts_with("r2 "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid for r2 in {tasks}"));
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
            workspace_bin("carapace").canonicalize().unwrap()
        );
        ctrd.ctr(&["task", "kill", "r2"]).unwrap();
        let deadline = Instant::now() + EXIT_DEADLINE;
        loop {
            let tasks = String::from_utf8_lossy(&ctrd.ctr(&["task", "ls"]).unwrap().stdout).into_owned();
            if tasks.lines().any(|l| l.starts_with("r2 ") && l.contains("STOPPED")) {
                break;
            }
            assert!(Instant::now() < deadline, "r2 never stopped: {tasks}");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(!running(pid));
        ctrd.ctr(&["task", "delete", "r2"]).unwrap();
        ctrd.ctr(&["container", "delete", "r2"]).unwrap();
        let left = left_under(root);
        assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
        // a container killed by a signal: 128 + signal through the shim
        let mut run = ctrd
            .ctr_command()
            .args(["run", "--rm", "--runc-binary", w, image, "r3", "sleep", "600"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let tasks = String::from_utf8_lossy(&ctrd.ctr(&["task", "ls"]).unwrap().stdout).into_owned();
            if tasks.lines().any(|l| l.starts_with("r3 ") && l.contains("RUNNING")) {
                break;
            }
            assert!(Instant::now() < deadline, "r3 never ran: {tasks}");
            std::thread::sleep(Duration::from_millis(200));
        }
        ctrd.ctr(&["task", "kill", "-s", "SIGKILL", "r3"]).unwrap();
        assert_eq!(run.wait().unwrap().code(), Some(137));
        let left = left_under(root);
        assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    }
}
