//! The `carapace` CLI end to end without a VM: the real binary, the real carapace-fsd, real
//! bind mounts and the real carapace-agent in host mode standing in for the VMM + guest
//! (`--host-agent`, a hidden testing flag). Everything but the VM itself is exercised:
//! state files, process start/stop order, the ttrpc client, stdio relay, exit codes,
//! teardown. Needs root (mounts, the agent's host mode). After each test nothing may be
//! left: processes, mounts, state entries, sockets.

mod runtime_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carapace_tests::{fixtures, workspace_bin};
use runtime_common::{env, env_with, receive_terminal, script, stderr, stdout};
use serde_json::{Value, json};

#[test]
fn run_prints_output_and_exits_with_the_containers_status() {
    let Some(env) = env() else { return };
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let b = env.bundle(
        "b",
        &fixtures::default_spec(&[
            "sh",
            "-c",
            "echo hello from $(uname -r); echo oops >&2; exit 3",
        ]),
    );
    let out = env.run(&["run", "--bundle", b.to_str().unwrap(), "r1"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stdout(&out), format!("hello from {}", host_release));
    assert!(stderr(&out).contains("oops"));
    env.assert_clean();
}

#[test]
fn create_start_exec_kill_delete() {
    let Some(env) = env() else { return };
    let b = env.bundle(
        "b",
        &fixtures::default_spec(&[
            "sh",
            "-c",
            "echo started; trap 'echo got TERM; exit 7' TERM; while true; do sleep 0.1; done",
        ]),
    );
    let pid_file = env.tmp.path().join("pid");
    let (rc, out) = env.run_to_files(
        &[
            "create",
            "-b",
            b.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "c1",
        ],
        "create",
    );
    assert_eq!(rc, 0);
    let st = env.state("c1");
    assert_eq!(st["status"], "created");
    assert_eq!(st["id"], "c1");
    assert_eq!(st["bundle"], b.canonicalize().unwrap().to_str().unwrap());
    assert_eq!(st["ociVersion"], "1.2.0");
    let pid = st["pid"].as_i64().unwrap();
    assert!(pid > 0);
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), pid.to_string());
    let list = env.run(&["list", "--format", "json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["id"], "c1");
    // created as RFC 3339, like runc: 2026-11-21T17:15:00Z
    let created = list[0]["created"].as_str().unwrap_or_default();
    assert!(
        created.len() == 20 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{created:?}"
    );

    // Start twice: the second is refused (conflict).
    assert!(env.run(&["start", "c1"]).status.success());
    assert_eq!(env.run(&["start", "c1"]).status.code(), Some(5));
    assert_eq!(env.state("c1")["status"], "running");

    let e = env.run(&[
        "exec",
        "-e",
        "FOO=bar",
        "--cwd",
        "/bin",
        "c1",
        "sh",
        "-c",
        "echo $FOO $(pwd); exit 5",
    ]);
    assert_eq!(e.status.code(), Some(5));
    assert_eq!(stdout(&e), "bar /bin\n");
    let ps = env.run(&["ps", "--format", "json", "c1"]);
    let pids: Vec<u32> = serde_json::from_slice(&ps.stdout).unwrap();
    assert!(!pids.is_empty());

    // Running: delete needs --force.
    assert_eq!(env.run(&["delete", "c1"]).status.code(), Some(5));
    assert!(env.run(&["kill", "c1", "TERM"]).status.success());
    env.wait_status("c1", "stopped");
    assert_eq!(env.state("c1")["pid"], 0);
    let relayed = std::fs::read_to_string(&out).unwrap();
    assert_eq!(relayed, "started\ngot TERM\n");
    let state_json: Value =
        serde_json::from_slice(&std::fs::read(env.root.join("c1/state.json")).unwrap()).unwrap();
    assert_eq!(state_json["exit"]["status"], 7);

    assert!(env.run(&["delete", "c1"]).status.success());
    // Idempotent delete: "does not exist" (4) without --force, success with it.
    let again = env.run(&["delete", "c1"]);
    assert_eq!(again.status.code(), Some(4));
    assert!(stderr(&again).contains("does not exist"));
    assert!(env.run(&["delete", "--force", "c1"]).status.success());
    env.assert_clean();
}

#[test]
fn signals_propagate_as_128_plus_signal() {
    let Some(env) = env() else { return };
    // A foreground `run` killed from another CLI call exits with 128 + 9.
    let b = env.bundle("b", &fixtures::default_spec(&["sleep", "30"]));
    let mut fg = env
        .cmd(&["run", "-b", b.to_str().unwrap(), "s1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.root.join("s1/state.json").exists()
        || env.run(&["state", "s1"]).stdout.is_empty()
        || env.state("s1")["status"] != "running"
    {
        assert!(Instant::now() < deadline, "s1 never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.run(&["kill", "s1", "KILL"]).status.success());
    assert_eq!(fg.wait().unwrap().code(), Some(137));

    let b2 = env.bundle("b2", &fixtures::default_spec(&["sleep", "30"]));
    let (rc, _) = env.run_to_files(&["run", "-d", "-b", b2.to_str().unwrap(), "s2"], "s2");
    assert_eq!(rc, 0);
    assert_eq!(env.state("s2")["status"], "running");
    assert!(env.run(&["kill", "s2", "9"]).status.success());
    env.wait_status("s2", "stopped");
    let st: Value =
        serde_json::from_slice(&std::fs::read(env.root.join("s2/state.json")).unwrap()).unwrap();
    assert_eq!(st["exit"]["status"], 137);
    assert_eq!(st["exit"]["signal"], 9);
    assert!(env.run(&["delete", "s2"]).status.success());
    env.assert_clean();
}

#[test]
fn read_only_bind_mount_is_read_only_inside() {
    let Some(env) = env() else { return };
    let ro = env.tmp.path().join("ro-vol");
    let rw = env.tmp.path().join("rw-vol");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::write(ro.join("data"), "from the host\n").unwrap();
    let mut spec = fixtures::default_spec(&[
        "sh",
        "-c",
        "cat /ro/data; if echo x > /ro/new 2>/dev/null; then echo WROTE; else echo READONLY; fi; \
         echo y > /rw/new && echo RW-OK",
    ]);
    spec["mounts"].as_array_mut().unwrap().extend([
        json!({"destination": "/ro", "type": "bind", "source": ro, "options": ["rbind", "ro"]}),
        json!({"destination": "/rw", "type": "bind", "source": rw, "options": ["rbind", "rw"]}),
    ]);
    let b = env.bundle("b", &spec);
    let out = env.run(&["run", "-b", b.to_str().unwrap(), "m1"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "from the host\nREADONLY\nRW-OK\n");
    assert!(!ro.join("new").exists());
    assert_eq!(std::fs::read_to_string(rw.join("new")).unwrap(), "y\n");
    env.assert_clean();
}

#[test]
fn two_sandboxes_side_by_side() {
    let Some(env) = env() else { return };
    for id in ["a", "b"] {
        let b = env.bundle(id, &fixtures::default_spec(&["sleep", "30"]));
        std::fs::write(b.join("rootfs/who"), id).unwrap();
        let (rc, _) = env.run_to_files(&["run", "-d", "-b", b.to_str().unwrap(), id], id);
        assert_eq!(rc, 0);
    }
    let list = env.run(&["list", "-q"]);
    assert_eq!(stdout(&list), "a\nb\n");
    for id in ["a", "b"] {
        assert_eq!(env.state(id)["status"], "running");
        let out = env.run(&["exec", id, "cat", "/who"]);
        assert_eq!(stdout(&out), id);
    }
    assert_ne!(env.state("a")["pid"], env.state("b")["pid"]);
    for id in ["a", "b"] {
        assert!(env.run(&["delete", "-f", id]).status.success());
    }
    env.assert_clean();
}

#[test]
fn bad_spec_fails_clearly_and_leaves_nothing() {
    let Some(env) = env() else { return };
    let mut spec = fixtures::default_spec(&["true"]);
    spec["process"]["args"] = json!([]);
    let b = env.bundle("b", &spec);
    let out = env.run(&["create", "-b", b.to_str().unwrap(), "x"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(stderr(&out).contains("process.args"), "{}", stderr(&out));
    std::fs::write(b.join("config.json"), "{\"ociVersion\": 1}").unwrap();
    let out = env.run(&["create", "-b", b.to_str().unwrap(), "x"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(
        stderr(&out).contains("invalid OCI spec"),
        "{}",
        stderr(&out)
    );
    env.assert_clean();
}

#[test]
fn flags_runc_callers_pass_are_accepted_and_unknown_ones_named() {
    let Some(env) = env() else { return };
    let b = env.bundle("b", &fixtures::default_spec(&["echo", "ok"]));
    // what containerd's runc shim, conmon and docker pass: accepted (cgroups and the
    // root's pivot are the guest's business; the log is JSON lines)
    let out = env.run(&[
        "--systemd-cgroup",
        "--log-format",
        "json",
        "run",
        "--no-pivot",
        "--no-new-keyring",
        "-b",
        b.to_str().unwrap(),
        "r1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "ok");
    let log = std::fs::read_to_string(env.tmp.path().join("carapace.log")).unwrap();
    assert!(log.lines().count() > 0);
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    // an unknown flag: a usage error naming it
    let out = env.run(&["run", "--no-such-flag", "-b", b.to_str().unwrap(), "r2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--no-such-flag"), "{}", stderr(&out));
    // a bundle whose rootfs is missing: refused naming it, nothing left
    let mut spec = fixtures::default_spec(&["true"]);
    spec["root"]["path"] = json!("no-such-rootfs");
    let b = env.bundle("c", &spec);
    let out = env.run(&["create", "-b", b.to_str().unwrap(), "r3"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-rootfs"), "{}", stderr(&out));
    env.assert_clean();
}

#[test]
fn missing_kernel_fails_before_anything_starts() {
    let Some(mut env) = env_with("[hypervisor]\nkernel = \"/nonexistent/carapace/vmlinux\"\n")
    else {
        return;
    };
    env.host_agent = None;
    let b = env.bundle("b", &fixtures::default_spec(&["true"]));
    let out = env.run(&["run", "-b", b.to_str().unwrap(), "k"]);
    assert_eq!(out.status.code(), Some(7));
    let err = stderr(&out);
    assert!(
        err.contains("/nonexistent/carapace/vmlinux") && err.contains("carapace-image build"),
        "{err}"
    );
    env.assert_clean();
}

#[test]
fn agent_not_answering_times_out_and_leaves_nothing() {
    let Some(mut env) = env_with("") else { return };
    std::fs::write(
        &env.config,
        format!(
            "[fs]\npath = {:?}\n[agent]\nboot_timeout_ms = 1500\n",
            workspace_bin("carapace-fsd").display().to_string()
        ),
    )
    .unwrap();
    // A "guest" that boots forever: alive, never listening.
    env.host_agent = Some(script(&env, "silent-agent", "exec sleep 600"));
    let b = env.bundle("b", &fixtures::default_spec(&["true"]));
    let started = Instant::now();
    let out = env.run(&["create", "-b", b.to_str().unwrap(), "t"]);
    assert_eq!(out.status.code(), Some(9));
    assert!(stderr(&out).contains("did not answer"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(20));
    env.assert_clean();
}

#[test]
fn vmm_dying_at_boot_is_reported_with_its_log() {
    let Some(mut env) = env() else { return };
    env.host_agent = Some(script(
        &env,
        "dying-vmm",
        "echo 'kvm: guest exploded' >&2; exit 4",
    ));
    let b = env.bundle("b", &fixtures::default_spec(&["true"]));
    let out = env.run(&["create", "-b", b.to_str().unwrap(), "d"]);
    assert_eq!(out.status.code(), Some(8));
    assert!(stderr(&out).contains("guest exploded"), "{}", stderr(&out));
    env.assert_clean();
}

#[test]
fn missing_fs_daemon_fails_clearly() {
    let Some(env) = env() else { return };
    std::fs::write(&env.config, "[fs]\npath = \"/nonexistent/carapace-fsd\"\n").unwrap();
    let b = env.bundle("b", &fixtures::default_spec(&["true"]));
    let out = env.run(&["create", "-b", b.to_str().unwrap(), "f"]);
    assert_eq!(out.status.code(), Some(8));
    assert!(
        stderr(&out).contains("cannot start fs daemon"),
        "{}",
        stderr(&out)
    );
    env.assert_clean();
}

#[test]
fn vmm_killed_midway_means_stopped_and_delete_cleans_up() {
    let Some(env) = env() else { return };
    let b = env.bundle("b", &fixtures::default_spec(&["sleep", "2"]));
    let (rc, _) = env.run_to_files(&["run", "-d", "-b", b.to_str().unwrap(), "v"], "v");
    assert_eq!(rc, 0);
    let pid = env.state("v")["pid"].as_i64().unwrap();
    // SIGKILL the "VMM" behind the runtime's back.
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    env.wait_status("v", "stopped");
    assert_eq!(env.run(&["kill", "v"]).status.code(), Some(5));
    assert!(env.run(&["delete", "v"]).status.success());
    // The host-mode container (sleep 2) outlives its killed agent briefly; a VM's would not.
    std::thread::sleep(Duration::from_secs(3));
    env.assert_clean();
}

#[test]
fn features_spec_check_and_env() {
    let Some(env) = env() else { return };
    let f = env.run(&["features"]);
    let v: Value = serde_json::from_slice(&f.stdout).unwrap();
    assert_eq!(v["ociVersionMax"], "1.2.0");
    let dir = env.tmp.path().join("spec");
    std::fs::create_dir(&dir).unwrap();
    assert!(
        env.run(&["spec", "-b", dir.to_str().unwrap()])
            .status
            .success()
    );
    let spec: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(spec["root"]["path"], "rootfs");
    let e = env.run(&["env"]);
    assert!(stdout(&e).contains(&env.config.display().to_string()));
    assert!(stdout(&e).contains("carapace-fsd"));
    let c = env.run(&["check", "--format", "json"]);
    let checks: Value = serde_json::from_slice(&c.stdout).unwrap();
    let all_ok = checks.as_array().unwrap().iter().all(|c| c["ok"] == true);
    assert_eq!(c.status.success(), all_ok);
    assert!(Path::new(&env.root).read_dir().is_err());
}

/// Sets the window size of terminal `t` (TIOCSWINSZ on the master).
fn set_size(t: &std::fs::File, rows: u16, cols: u16) {
    use std::os::fd::AsRawFd;
    let ws = nix::libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, a live local of that
    // type; the descriptor is open for the call.
    let r = unsafe { nix::libc::ioctl(t.as_raw_fd(), nix::libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}

#[test]
fn console_socket_receives_a_working_terminal() {
    use std::io::{Read, Write};
    let Some(env) = env() else { return };
    let mut spec = fixtures::default_spec(&[
        "sh",
        "-c",
        "read line; if [ -t 0 ]; then t=yes; else t=no; fi; echo got $line tty=$t size=$(stty size)",
    ]);
    spec["process"]["terminal"] = json!(true);
    let b = env.bundle("b", &spec);
    let sock = env.tmp.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let receiver = std::thread::spawn(move || receive_terminal(listener));
    let (rc, _) = env.run_to_files(
        &[
            "create",
            "-b",
            b.to_str().unwrap(),
            "--console-socket",
            sock.to_str().unwrap(),
            "t1",
        ],
        "create",
    );
    assert_eq!(rc, 0);
    let mut master = receiver.join().unwrap();
    // the caller sizes the terminal (conmon: its own terminal's size) and the keeper
    // passes it on to the container's
    set_size(&master, 33, 101);
    assert!(env.run(&["start", "t1"]).status.success());
    std::thread::sleep(std::time::Duration::from_millis(600));
    master.write_all(b"hello\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("tty=") {
        let n = master.read(&mut buf).unwrap_or_else(|e| {
            panic!(
                "terminal read: {e}; log:\n{}",
                std::fs::read_to_string(env.tmp.path().join("carapace.log")).unwrap_or_default()
            )
        });
        assert!(
            n > 0,
            "terminal closed early: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    while !String::from_utf8_lossy(&seen).contains("101") {
        let n = master.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("got hello tty=yes size=33 101"), "{text}");
    env.wait_status("t1", "stopped");
    drop(master);
    assert!(env.run(&["delete", "t1"]).status.success());
    env.assert_clean();

    // Without process.terminal the console socket is refused before anything starts.
    let b2 = env.bundle("b2", &fixtures::default_spec(&["true"]));
    let out = env.run(&[
        "create",
        "-b",
        b2.to_str().unwrap(),
        "--console-socket",
        sock.to_str().unwrap(),
        "t2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("process.terminal"),
        "{}",
        stderr(&out)
    );
    env.assert_clean();
}

#[test]
fn a_window_size_change_reaches_the_terminal_process_of_run_t() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let Some(env) = env() else { return };
    let mut spec = fixtures::default_spec(&[
        "sh",
        "-c",
        "trap 'echo size=$(stty size)' WINCH; echo ready=$(stty size); \
         while :; do sleep 1; done",
    ]);
    spec["process"]["terminal"] = json!(true);
    let b = env.bundle("b", &spec);
    // `carapace run` in the foreground on a terminal of ours, 24x80
    let size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
    let slave_path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))
        .expect("pty slave path");
    let stdio = || std::process::Stdio::from(pty.slave.try_clone().expect("dup slave"));
    let mut child = env
        .cmd(&["run", "-b", b.to_str().unwrap(), "w1"])
        .stdin(stdio())
        .stdout(stdio())
        .stderr(stdio())
        .spawn()
        .expect("carapace run");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        let mut master = std::fs::File::from(pty.master);
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let wait_for = |text: &str| {
        for _ in 0..300 {
            if String::from_utf8_lossy(&seen.lock().unwrap()).contains(text) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{text:?} never appeared on the terminal: {:?}; log:\n{}",
            String::from_utf8_lossy(&seen.lock().unwrap()),
            std::fs::read_to_string(env.tmp.path().join("carapace.log")).unwrap_or_default()
        );
    };
    // the initial size reached the container's terminal
    wait_for("ready=24 80");
    // the terminal grows; like a terminal emulator, tell the foreground process
    let st = Command::new("stty")
        .arg("-F")
        .arg(&slave_path)
        .args(["rows", "40", "cols", "100"])
        .status()
        .expect("stty");
    assert!(st.success());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGWINCH,
    )
    .expect("SIGWINCH");
    wait_for("size=40 100");
    assert!(env.run(&["delete", "-f", "w1"]).status.success());
    let status = child.wait().expect("carapace run exits");
    assert!(!status.success(), "killed by delete -f: {status:?}");
    drop(pty.slave);
    let _ = reader.join();
    env.assert_clean();
}

/// A hook that records its kind (its `$0`) in `dir/order` and its stdin in `dir/<kind>.json`;
/// `fail` makes it exit 9 after printing a reason.
fn recording_hook(dir: &Path, kind: &str, fail: bool) -> Value {
    let tail = if fail {
        "echo hook-says-no >&2; exit 9"
    } else {
        "exit 0"
    };
    json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!("cat > {d}/$0.json; echo $0 >> {d}/order; {tail}", d = dir.display()), kind],
        "env": ["PATH=/usr/bin:/bin"],
        "timeout": 30
    })
}

#[test]
fn oci_hooks_run_on_the_host_with_the_state_at_their_points() {
    let Some(env) = env() else { return };
    let rec = env.tmp.path().join("hooks");
    std::fs::create_dir(&rec).unwrap();
    let mut spec = fixtures::default_spec(&["sh", "-c", "sleep 60"]);
    let kinds = [
        "prestart",
        "createRuntime",
        "createContainer",
        "poststart",
        "poststop",
    ];
    spec["hooks"] = Value::Object(
        kinds
            .iter()
            .map(|k| (k.to_string(), json!([recording_hook(&rec, k, false)])))
            .collect(),
    );
    let b = env.bundle("b", &spec);
    let order = || std::fs::read_to_string(rec.join("order")).unwrap_or_default();
    let hook_state = |k: &str| -> Value {
        serde_json::from_slice(&std::fs::read(rec.join(format!("{k}.json"))).unwrap())
            .unwrap_or_else(|e| panic!("{k}'s stdin is not the state: {e}"))
    };

    // (create's stdio relay would hold a pipe open: files)
    let (rc, _) = env.run_to_files(&["create", "-b", b.to_str().unwrap(), "h1"], "h1");
    assert_eq!(rc, 0);
    assert_eq!(order(), "prestart\ncreateRuntime\ncreateContainer\n");
    // While the create runs, the VM stands for the container (the init's keeper is
    // started once the create succeeded): a live host process, the same for each hook.
    let pid = hook_state("prestart")["pid"].clone();
    let vmm = pid.as_i64().unwrap();
    assert!(vmm > 0 && std::path::Path::new(&format!("/proc/{vmm}")).exists());
    for k in &kinds[..3] {
        let s = hook_state(k);
        assert_eq!(s["id"], "h1", "{k}: {s}");
        assert_eq!(s["status"], "creating", "{k}: {s}");
        assert_eq!(s["pid"], pid, "{k}: {s}");
        assert_eq!(s["bundle"], b.canonicalize().unwrap().to_str().unwrap());
    }
    assert!(env.run(&["start", "h1"]).status.success());
    assert!(
        order().ends_with("createContainer\npoststart\n"),
        "{}",
        order()
    );
    assert_eq!(hook_state("poststart")["status"], "running");
    // from then on the init's keeper does
    assert_eq!(hook_state("poststart")["pid"], env.state("h1")["pid"]);
    assert!(env.run(&["delete", "--force", "h1"]).status.success());
    assert!(order().ends_with("poststart\npoststop\n"), "{}", order());
    let s = hook_state("poststop");
    assert_eq!(
        (s["status"].clone(), s["pid"].clone()),
        (json!("stopped"), json!(0))
    );
    env.assert_clean();

    // A failing createRuntime hook fails the create (exit code 14, its output in the
    // error), the hooks after it do not run, and nothing is left.
    std::fs::remove_file(rec.join("order")).unwrap();
    spec["hooks"] = json!({
        "prestart": [recording_hook(&rec, "prestart", false)],
        "createRuntime": [recording_hook(&rec, "createRuntime", true)],
        "createContainer": [recording_hook(&rec, "createContainer", false)],
    });
    let b = env.bundle("b2", &spec);
    let (rc, out) = env.run_to_files(&["create", "-b", b.to_str().unwrap(), "h2"], "h2");
    let err = std::fs::read_to_string(out.with_extension("err")).unwrap_or_default();
    assert_eq!(rc, 14, "{err}");
    assert!(
        err.contains("createRuntime hook /bin/sh failed") && err.contains("hook-says-no"),
        "{err}"
    );
    assert_eq!(order(), "prestart\ncreateRuntime\n");
    env.assert_clean();

    // A startContainer hook runs in the container (a program of the container's, in the
    // guest), before the process: its mark is there for the process to read.
    let mut spec = fixtures::default_spec(&["cat", "/tmp/started"]);
    spec["hooks"] = json!({"startContainer": [{
        "path": "/bin/sh",
        "args": ["sh", "-c", "grep -o '\"status\":\"created\"' > /tmp/started"]
    }]});
    let b = env.bundle("b3", &spec);
    let out = env.run(&["run", "-b", b.to_str().unwrap(), "h3"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "\"status\":\"created\"");
    // ... and a failing one fails the start, naming it
    spec["hooks"] = json!({"startContainer": [{"path": "/bin/false"}]});
    let b = env.bundle("b4", &spec);
    let out = env.run(&["run", "-b", b.to_str().unwrap(), "h4"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("hooks.startContainer[0] /bin/false"),
        "{}",
        stderr(&out)
    );
    env.assert_clean();
}

#[test]
fn annotations_size_the_vm_only_when_the_configuration_allows_them() {
    let annotated = |env: &runtime_common::Env, name: &str| {
        let mut spec = fixtures::default_spec(&["true"]);
        spec["annotations"] = json!({"io.carapace.config.hypervisor.default_vcpus": "2"});
        env.bundle(name, &spec)
    };
    // not allowed (the default): refused, naming the annotation, nothing left
    let Some(env) = env() else { return };
    let b = annotated(&env, "b");
    let (rc, out) = env.run_to_files(&["create", "-b", b.to_str().unwrap(), "a1"], "a1");
    let err = std::fs::read_to_string(out.with_extension("err")).unwrap_or_default();
    assert_eq!(rc, 6, "{err}");
    assert!(
        err.contains("io.carapace.config.hypervisor.default_vcpus")
            && err.contains("enable_annotations"),
        "{err}"
    );
    env.assert_clean();

    // allowed: the VM boots with the pod's vCPUs online (the guest starts `maxcpus` of
    // the `max_vcpus` the VMM creates)
    let Some(env) = env_with("[runtime]\nenable_annotations = [\"hypervisor.default_vcpus\"]\n")
    else {
        return;
    };
    let b = annotated(&env, "b");
    let (rc, _) = env.run_to_files(&["create", "-b", b.to_str().unwrap(), "a2"], "a2");
    assert_eq!(rc, 0);
    let vm: Value =
        serde_json::from_slice(&std::fs::read(env.root.join("a2/vm.json")).unwrap()).unwrap();
    let cmdline = vm["cmdline"].as_str().unwrap_or_default();
    assert!(cmdline.split(' ').any(|w| w == "maxcpus=2"), "{vm}");
    assert_eq!(vm["vcpus"], 8, "max_vcpus: {vm}");
    assert!(env.run(&["delete", "--force", "a2"]).status.success());
    env.assert_clean();
}
