//! carapace-agent in host mode: the real agent binary serving on a unix socket and
//! running busybox containers on this host (as root), driven through carapace-protocol's
//! client. Covers the RPCs that need no cgroup v2 controllers; cgroup limits, stats and
//! OOM events are in agent_cgroups.rs (they run in the lab, where cgroup v2 controllers
//! are available).

mod agent_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_support::*;
use carapace_protocol::agent::*;
use serde_json::json;

/// Runs `args` to completion; returns (stdout, stderr, wait).
async fn run(a: &Agent, id: &str, args: &[&str]) -> (String, String, WaitResponse) {
    let s = spec(a.dir.path(), args);
    create(a, id, &s).await.expect("create");
    start(a, id).await;
    let out = read_all(a, id, "", false).await;
    let err = read_all(a, id, "", true).await;
    let w = wait(a, id, "").await;
    a.client
        .remove_container(ctx(), &creq(id))
        .await
        .expect("remove");
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        w,
    )
}

#[tokio::test]
async fn version_and_sandbox_lifecycle() {
    let a = start_agent(&[]).await;
    let v = a
        .client
        .version(ctx(), &VersionRequest::default())
        .await
        .unwrap();
    assert_eq!(v.protocol_version, carapace_protocol::PROTOCOL_VERSION);
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));

    let sb = |id: &str| CreateSandboxRequest {
        sandbox_id: id.into(),
        ..Default::default()
    };
    a.client.create_sandbox(ctx(), &sb("pod1")).await.unwrap();
    let e = a
        .client
        .create_sandbox(ctx(), &sb("pod2"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::ALREADY_EXISTS, "{}", msg(&e));
    // A container in the sandbox is removed when the sandbox is destroyed.
    let s = spec(a.dir.path(), &["sleep", "1000"]);
    create(&a, "c1", &s).await.unwrap();
    start(&a, "c1").await;
    let destroy = |id: &str| DestroySandboxRequest {
        sandbox_id: id.into(),
        ..Default::default()
    };
    let e = a
        .client
        .destroy_sandbox(ctx(), &destroy("other"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
    a.client
        .destroy_sandbox(ctx(), &destroy("pod1"))
        .await
        .unwrap();
    let e = a
        .client
        .wait_process(ctx(), &preq("c1", ""))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
    // Host mode refuses guest-only work with a typed error.
    let e = a
        .client
        .set_guest_time(
            ctx(),
            &SetTimeRequest {
                sec: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{}", msg(&e));
}

#[tokio::test]
async fn exit_codes_stdout_and_stderr() {
    let a = start_agent(&[]).await;
    let (out, err, w) = run(
        &a,
        "exit7",
        &["sh", "-c", "echo to-out; echo to-err >&2; exit 7"],
    )
    .await;
    assert_eq!(out, "to-out\n");
    assert_eq!(err, "to-err\n");
    assert_eq!((w.exit_code, w.signal, w.exit_status), (7, 0, 7));
    let (out, _, w) = run(&a, "ok", &["true"]).await;
    assert_eq!((out.as_str(), w.exit_status), ("", 0));
}

#[tokio::test]
async fn container_sees_its_own_namespaces_rootfs_and_identity() {
    let a = start_agent(&[]).await;
    let mut s = spec(
        a.dir.path(),
        &[
            "sh",
            "-c",
            "echo pid=$$; hostname; id -u; id -g; id -G; umask; pwd; echo $FOO; \
         ls /bin/busybox; test -e /etc/hostname && echo rootfs-ok; \
         cat /proc/1/cmdline | tr '\\0' ' '; echo; \
         echo secret=$(cat /etc/secret); echo secretdir=$(ls /etc/secretdir); \
         touch /proc/sys/kernel/x 2>/dev/null || echo procsys-ro; \
         ulimit -n; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; \
         touch /ro/x 2>/dev/null || echo ro-bind; cat /ro/file",
        ],
    );
    let shared = a.dir.path().join("volume");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("file"), "from-volume\n").unwrap();
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [5, 7], "umask": 63});
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 321}]);
    s["process"]["capabilities"] = json!({
        "bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"],
        "permitted": ["CAP_KILL"], "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]
    });
    s["hostname"] = json!("box1");
    let rootfs = PathBuf::from(s["root"]["path"].as_str().unwrap());
    std::fs::write(rootfs.join("etc/secret"), "hidden").unwrap();
    std::fs::create_dir(rootfs.join("etc/secretdir")).unwrap();
    std::fs::write(rootfs.join("etc/secretdir/f"), "hidden").unwrap();
    s["linux"]["maskedPaths"] = json!(["/etc/secret", "/etc/secretdir", "/proc/kcore"]);
    s["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/ro", "type": "bind", "source": shared, "options": ["rbind", "ro"]
    }));
    create(&a, "ns", &s).await.expect("create");
    start(&a, "ns").await;
    let out = String::from_utf8(read_all(&a, "ns", "", false).await).unwrap();
    let err = String::from_utf8(read_all(&a, "ns", "", true).await).unwrap();
    let w = wait(&a, "ns", "").await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(w.exit_status, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(lines[0], "pid=1", "{out}");
    assert_eq!(lines[1], "box1");
    assert_eq!(lines[2], "1000");
    assert_eq!(lines[3], "1000");
    assert_eq!(lines[4], "1000 5 7");
    assert_eq!(lines[5], "0077");
    assert_eq!(lines[6], "/tmp");
    assert_eq!(lines[7], "bar");
    assert_eq!(lines[8], "/bin/busybox");
    assert_eq!(lines[9], "rootfs-ok");
    assert!(lines[10].starts_with("sh -c"), "{out}");
    assert!(out.contains("\nsecret=\n"), "masked file: {out}");
    assert!(out.contains("\nsecretdir=\n"), "masked dir: {out}");
    assert!(out.contains("procsys-ro"), "{out}");
    assert!(out.contains("\n321\n"), "{out}");
    // CAP_KILL is bit 5; as uid 1000 it survives exec only through the ambient set.
    assert!(out.contains("CapEff:\t0000000000000020"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("ro-bind"), "{out}");
    assert!(out.contains("from-volume"), "{out}");
    a.client.remove_container(ctx(), &creq("ns")).await.unwrap();
}

#[tokio::test]
async fn signals_are_delivered_and_reported() {
    let a = start_agent(&[]).await;
    let s = spec(a.dir.path(), &["sleep", "1000"]);
    create(&a, "k", &s).await.unwrap();
    start(&a, "k").await;
    a.client
        .signal_process(
            ctx(),
            &SignalRequest {
                container_id: "k".into(),
                signal: 9,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let w = wait(&a, "k", "").await;
    assert_eq!((w.exit_code, w.signal, w.exit_status), (0, 9, 137));
    // A signal the workload handles.
    let s = spec(
        a.dir.path(),
        &[
            "sh",
            "-c",
            "trap 'exit 3' TERM; echo armed; while :; do sleep 0.05; done",
        ],
    );
    create(&a, "t", &s).await.unwrap();
    start(&a, "t").await;
    let first = a
        .client
        .read_stdout(
            ctx(),
            &ReadStreamRequest {
                container_id: "t".into(),
                max_len: 64,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first.data, b"armed\n");
    a.client
        .signal_process(
            ctx(),
            &SignalRequest {
                container_id: "t".into(),
                signal: 15,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let w = wait(&a, "t", "").await;
    assert_eq!((w.exit_code, w.signal), (3, 0));
    // Signalling a finished process is a typed error.
    let e = a
        .client
        .signal_process(
            ctx(),
            &SignalRequest {
                container_id: "t".into(),
                signal: 15,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION);
}

#[tokio::test]
async fn stdin_is_forwarded_and_closed() {
    let a = start_agent(&[]).await;
    let s = spec(a.dir.path(), &["sh", "-c", "cat; echo after-eof"]);
    create(&a, "in", &s).await.unwrap();
    start(&a, "in").await;
    let w = a
        .client
        .write_stdin(
            ctx(),
            &WriteStdinRequest {
                container_id: "in".into(),
                data: b"hello\nworld\n".to_vec(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(w.len, 12);
    a.client.close_stdin(ctx(), &preq("in", "")).await.unwrap();
    let out = read_all(&a, "in", "", false).await;
    assert_eq!(out, b"hello\nworld\nafter-eof\n");
    assert_eq!(wait(&a, "in", "").await.exit_status, 0);
    let e = a
        .client
        .write_stdin(
            ctx(),
            &WriteStdinRequest {
                container_id: "in".into(),
                data: b"x".to_vec(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION);
}

#[tokio::test]
async fn tty_with_resize() {
    let a = start_agent(&[]).await;
    let mut s = spec(
        a.dir.path(),
        &[
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo is-a-tty; stty size",
        ],
    );
    s["process"]["terminal"] = json!(true);
    create(&a, "tty", &s).await.unwrap();
    // The process waits for start: the size set now is what it sees.
    a.client
        .resize_tty(
            ctx(),
            &ResizeTtyRequest {
                container_id: "tty".into(),
                rows: 42,
                cols: 123,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    start(&a, "tty").await;
    let out = String::from_utf8(read_all(&a, "tty", "", false).await).unwrap();
    assert_eq!(out, "is-a-tty\r\n42 123\r\n");
    // A tty has no separate stderr.
    assert!(read_all(&a, "tty", "", true).await.is_empty());
    assert_eq!(wait(&a, "tty", "").await.exit_status, 0);
    // Resizing a pipe process is a typed error.
    let s = spec(a.dir.path(), &["true"]);
    create(&a, "notty", &s).await.unwrap();
    let e = a
        .client
        .resize_tty(
            ctx(),
            &ResizeTtyRequest {
                container_id: "notty".into(),
                rows: 1,
                cols: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
}

/// Expected output of `seq 1 n`, generated in chunks.
fn seq_stream(n: u64) -> impl Iterator<Item = Vec<u8>> {
    let mut i = 1;
    std::iter::from_fn(move || {
        if i > n {
            return None;
        }
        let mut chunk = Vec::with_capacity(1 << 16);
        while i <= n && chunk.len() < (1 << 16) - 16 {
            chunk.extend_from_slice(i.to_string().as_bytes());
            chunk.push(b'\n');
            i += 1;
        }
        Some(chunk)
    })
}

#[tokio::test]
async fn hundred_mib_of_output_without_loss() {
    let a = start_agent(&[]).await;
    const N: u64 = 13_000_000;
    let expected_len: usize = seq_stream(N).map(|c| c.len()).sum();
    assert!(expected_len >= 100 << 20);
    let s = spec(a.dir.path(), &["seq", "1", "13000000"]);
    create(&a, "big", &s).await.unwrap();
    start(&a, "big").await;
    let mut expected = seq_stream(N).flatten();
    let mut got = 0usize;
    loop {
        let r = a
            .client
            .read_stdout(
                ctx(),
                &ReadStreamRequest {
                    container_id: "big".into(),
                    max_len: 1 << 20,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        if r.eof {
            break;
        }
        for (k, b) in r.data.iter().enumerate() {
            assert_eq!(Some(*b), expected.next(), "byte {} differs", got + k);
        }
        got += r.data.len();
    }
    assert_eq!(got, expected_len);
    assert_eq!(wait(&a, "big", "").await.exit_status, 0);
}

#[tokio::test]
async fn output_written_just_before_exit_is_not_lost() {
    let a = start_agent(&[]).await;
    // The process exits before anything is read; what it wrote stays readable.
    let s = spec(a.dir.path(), &["sh", "-c", "seq 1 5000; echo last >&2"]);
    create(&a, "late", &s).await.unwrap();
    start(&a, "late").await;
    let w = wait(&a, "late", "").await;
    assert_eq!(w.exit_status, 0);
    let out = read_all(&a, "late", "", false).await;
    let expected: Vec<u8> = seq_stream(5000).flatten().collect();
    assert_eq!(out, expected);
    assert_eq!(read_all(&a, "late", "", true).await, b"last\n");
}

#[tokio::test]
async fn exec_into_a_running_container() {
    let a = start_agent(&[]).await;
    let mut s = spec(a.dir.path(), &["sleep", "1000"]);
    s["hostname"] = json!("execbox");
    create(&a, "e", &s).await.unwrap();
    let init_pid = start(&a, "e").await;
    let process = json!({
        "args": ["sh", "-c", "hostname; tr '\\0' ' ' < /proc/1/cmdline; echo; cat; exit 5"],
        "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
    });
    let r = a
        .client
        .exec_process(
            ctx(),
            &ExecProcessRequest {
                container_id: "e".into(),
                exec_id: "x1".into(),
                process_json: serde_json::to_vec(&process).unwrap(),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_ne!(r.pid, init_pid);
    a.client
        .write_stdin(
            ctx(),
            &WriteStdinRequest {
                container_id: "e".into(),
                exec_id: "x1".into(),
                data: b"piped\n".to_vec(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    a.client.close_stdin(ctx(), &preq("e", "x1")).await.unwrap();
    let out = String::from_utf8(read_all(&a, "e", "x1", false).await).unwrap();
    assert_eq!(out, "execbox\nsleep 1000 \npiped\n");
    assert_eq!(wait(&a, "e", "x1").await.exit_code, 5);
    // The exec is part of the container: ListProcesses sees init (and saw the exec).
    let pids = a
        .client
        .list_processes(ctx(), &creq("e"))
        .await
        .unwrap()
        .pids;
    assert!(pids.contains(&init_pid), "{pids:?} lacks {init_pid}");
    // Duplicate exec id, unknown exec id.
    let e = a
        .client
        .exec_process(
            ctx(),
            &ExecProcessRequest {
                container_id: "e".into(),
                exec_id: "x1".into(),
                process_json: serde_json::to_vec(&process).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::ALREADY_EXISTS);
    let e = a
        .client
        .wait_process(ctx(), &preq("e", "nope"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
    a.client.remove_container(ctx(), &creq("e")).await.unwrap();
}

#[tokio::test]
async fn list_processes_and_remove_running_container() {
    let a = start_agent(&[]).await;
    let s = spec(
        a.dir.path(),
        &["sh", "-c", "sleep 1000 & sleep 1000 & echo started; wait"],
    );
    create(&a, "ps", &s).await.unwrap();
    let pid = start(&a, "ps").await;
    let r = a
        .client
        .read_stdout(
            ctx(),
            &ReadStreamRequest {
                container_id: "ps".into(),
                max_len: 64,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.data, b"started\n");
    let pids = a
        .client
        .list_processes(ctx(), &creq("ps"))
        .await
        .unwrap()
        .pids;
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert!(pids.contains(&pid));
    a.client.remove_container(ctx(), &creq("ps")).await.unwrap();
    for p in pids {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists(),
            "pid {p} survived remove"
        );
    }
    let e = a
        .client
        .list_processes(ctx(), &creq("ps"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_the_agent_survives() {
    let a = start_agent(&[]).await;
    let e = a
        .client
        .start_container(ctx(), &creq("missing"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
    for bad in ["../x", "a/b", "", ".."] {
        let e = a
            .client
            .wait_process(ctx(), &preq(bad, ""))
            .await
            .unwrap_err();
        assert_eq!(
            code(&e),
            ttrpc::Code::INVALID_ARGUMENT,
            "{bad:?}: {}",
            msg(&e)
        );
    }
    let e = a
        .client
        .create_container(
            ctx(),
            &CreateContainerRequest {
                container_id: "j".into(),
                spec_json: b"{not json".to_vec(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg(&e).contains("spec_json"), "{}", msg(&e));
    let mut s = spec(a.dir.path(), &["true"]);
    s["process"]["args"] = json!([]);
    let e = create(&a, "noargs", &s).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
    let mut s = spec(a.dir.path(), &["true"]);
    s["root"]["path"] = json!("relative/rootfs");
    let e = create(&a, "relroot", &s).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
    let mut s = spec(a.dir.path(), &["true"]);
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "rel", "type": "tmpfs", "source": "tmpfs"}));
    let e = create(&a, "relmnt", &s).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
    // A mount destination that tries to climb out of the rootfs lands inside it.
    let mut s = spec(
        a.dir.path(),
        &["sh", "-c", "test -d /escaped && echo inside"],
    );
    let outside = a.dir.path().join("escaped");
    s["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/../../../../../escaped", "type": "tmpfs", "source": "tmpfs"}),
    );
    create(&a, "climb", &s).await.unwrap();
    start(&a, "climb").await;
    assert_eq!(read_all(&a, "climb", "", false).await, b"inside\n");
    assert!(!outside.exists());
    // A missing executable fails at create with the reason, named by path as by name,
    // and so does a file that is not executable; the id stays free.
    for (id, prog) in [
        ("noexe", "/no/such/binary"),
        ("noname", "no-such-binary"),
        ("notx", "/etc/passwd"),
    ] {
        let mut s = spec(a.dir.path(), &[prog]);
        if prog == "/etc/passwd" {
            let root = PathBuf::from(s["root"]["path"].as_str().unwrap());
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::write(root.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        }
        let e = create(&a, id, &s).await.unwrap_err();
        assert!(msg(&e).contains(prog), "{id}: {}", msg(&e));
        s["process"]["args"] = json!(["true"]);
        create(&a, id, &s).await.expect("the id is free again");
    }
    // A bad seccomp profile is refused at create.
    let mut s = spec(a.dir.path(), &["true"]);
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_NOTIFY"});
    let e = create(&a, "sec", &s).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{}", msg(&e));
    // An oversized frame (header claims 64 MiB) is refused before allocation.
    {
        use std::io::{Read, Write};
        let mut raw =
            std::os::unix::net::UnixStream::connect(a.dir.path().join("agent.sock")).unwrap();
        let mut header = Vec::new();
        header.extend_from_slice(&(64u32 << 20).to_be_bytes());
        header.extend_from_slice(&1u32.to_be_bytes());
        header.extend_from_slice(&[1, 0]);
        raw.write_all(&header).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut resp = [0u8; 10];
        let _ = raw.read(&mut resp);
    }
    // Still alive and serving.
    assert_serving(&a).await;
}

#[tokio::test]
async fn seccomp_profile_from_the_spec_is_enforced() {
    let a = start_agent(&[]).await;
    let mut s = spec(
        a.dir.path(),
        &[
            "sh",
            "-c",
            "mkdir /tmp/d 2>/dev/null && echo made || echo denied; echo alive",
        ],
    );
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    create(&a, "sc", &s).await.unwrap();
    start(&a, "sc").await;
    assert_eq!(read_all(&a, "sc", "", false).await, b"denied\nalive\n");
}

#[tokio::test]
async fn pause_and_resume_freeze_the_container() {
    let cg_root = carapace_agent_cgroup_root();
    let Some(cg_root) = cg_root else {
        panic!("no cgroup2 hierarchy on this host: pause needs cgroup.freeze");
    };
    let a = start_agent(&["--cgroup-root", cg_root.to_str().unwrap()]).await;
    let s = spec(
        a.dir.path(),
        &["sh", "-c", "while :; do echo tick; sleep 0.05; done"],
    );
    create(&a, "p", &s).await.unwrap();
    start(&a, "p").await;
    let r = a
        .client
        .read_stdout(
            ctx(),
            &ReadStreamRequest {
                container_id: "p".into(),
                max_len: 5,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.data, b"tick\n");
    a.client.pause_container(ctx(), &creq("p")).await.unwrap();
    let frozen = std::fs::read_to_string(cg_root.join("p/cgroup.events")).unwrap();
    assert!(frozen.contains("frozen 1"), "{frozen}");
    // Drain what was written before the freeze, then nothing more arrives.
    let drain = async {
        loop {
            let _ = a
                .client
                .read_stdout(
                    ctx(),
                    &ReadStreamRequest {
                        container_id: "p".into(),
                        max_len: 1 << 16,
                        ..Default::default()
                    },
                )
                .await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(300), drain).await;
    let quiet = tokio::time::timeout(
        Duration::from_millis(500),
        a.client.read_stdout(
            ctx(),
            &ReadStreamRequest {
                container_id: "p".into(),
                max_len: 5,
                ..Default::default()
            },
        ),
    )
    .await;
    assert!(quiet.is_err(), "a frozen container produced output");
    let e = a
        .client
        .pause_container(ctx(), &creq("p"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION);
    a.client.resume_container(ctx(), &creq("p")).await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        a.client.read_stdout(
            ctx(),
            &ReadStreamRequest {
                container_id: "p".into(),
                max_len: 5,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("output after resume")
    .unwrap();
    assert!(!r.data.is_empty());
    a.client.remove_container(ctx(), &creq("p")).await.unwrap();
    assert!(!cg_root.join("p").exists());
}

/// A fresh directory in this host's cgroup2 hierarchy, if there is one.
fn carapace_agent_cgroup_root() -> Option<PathBuf> {
    let base = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(Path::new)
        .find(|p| p.join("cgroup.controllers").exists())?;
    Some(base.join(format!(
        "carapace-test-{}-{}",
        std::process::id(),
        rand_suffix()
    )))
}

/// Every link of this host: (name, MAC, MTU) from /sys/class/net.
fn host_links() -> Vec<(String, String, String)> {
    let mut links: Vec<_> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| {
            let dir = e.unwrap().path();
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            };
            (
                dir.file_name().unwrap().to_string_lossy().into_owned(),
                read("address"),
                read("mtu"),
            )
        })
        .collect();
    links.sort();
    links
}

/// ConfigureNetwork would change the host's network in host mode: it is refused with
/// FAILED_PRECONDITION before the request is even looked at (a valid one naming a real
/// host NIC, and an invalid one), and that NIC keeps its name and MTU. (Only that one is
/// compared: other tests may add and remove links on this host meanwhile.)
#[tokio::test]
async fn configure_network_is_refused_in_host_mode() {
    let a = start_agent(&[]).await;
    a.client
        .create_sandbox(
            ctx(),
            &CreateSandboxRequest {
                sandbox_id: "pod1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let before = host_links();
    let nic = before
        .iter()
        .find(|l| l.1.len() == 17 && l.1 != "00:00:00:00:00:00")
        .cloned();
    let mac = nic
        .as_ref()
        .map_or_else(|| "02:00:00:00:00:05".to_owned(), |l| l.1.clone());
    let valid = ConfigureNetworkRequest {
        interfaces: vec![NetInterface {
            mac,
            name: "carapace-x".into(),
            mtu: 1280,
            addresses: vec![IpAddress {
                address: "10.88.0.5".into(),
                prefix_len: 16,
                ..Default::default()
            }],
            ..Default::default()
        }],
        routes: vec![Route {
            gateway: "10.88.0.1".into(),
            device: "carapace-x".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let invalid = ConfigureNetworkRequest {
        interfaces: vec![NetInterface {
            mac: "not a mac".into(),
            mtu: 70000,
            ..Default::default()
        }],
        ..Default::default()
    };
    for req in [valid, invalid] {
        let e = a.client.configure_network(ctx(), &req).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{}", msg(&e));
        assert!(
            msg(&e).contains("ConfigureNetwork is refused in host mode"),
            "{}",
            msg(&e)
        );
    }
    let after = host_links();
    if let Some(nic) = nic {
        assert!(after.contains(&nic), "{nic:?} changed: {after:?}");
    }
    assert!(!after.iter().any(|l| l.0 == "carapace-x"), "{after:?}");
    assert_serving(&a).await;
}

/// Health, CopyFile and Shutdown left the API (protocol 2): a caller that still asks for
/// them gets UNIMPLEMENTED from ttrpc, not NOT_FOUND (which a host would read as "no such
/// container"), and the agent keeps serving.
#[tokio::test]
async fn removed_rpcs_answer_unimplemented() {
    let a = start_agent(&[]).await;
    let raw = ttrpc::r#async::Client::connect(&format!(
        "unix://{}",
        a.dir.path().join("agent.sock").display()
    ))
    .await
    .expect("raw ttrpc connection");
    for method in ["Health", "CopyFile", "Shutdown"] {
        let mut req = ttrpc::Request::new();
        req.service = "carapace.agent.v1.Agent".into();
        req.method = method.into();
        req.timeout_nano = 10_000_000_000;
        let e = raw.request(req).await.expect_err(method);
        assert_eq!(
            code(&e),
            ttrpc::Code::UNIMPLEMENTED,
            "{method}: {}",
            msg(&e)
        );
    }
    assert_serving(&a).await;
}

/// Runs `process` as exec `exec_id` in container `id` to completion; returns (stdout,
/// stderr, wait).
async fn exec_run(
    a: &Agent,
    id: &str,
    exec_id: &str,
    process: &serde_json::Value,
) -> (String, String, WaitResponse) {
    a.client
        .exec_process(
            ctx(),
            &ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                process_json: serde_json::to_vec(process).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("exec {exec_id}: {}", msg(&e)));
    a.client
        .close_stdin(ctx(), &preq(id, exec_id))
        .await
        .unwrap();
    let out = read_all(a, id, exec_id, false).await;
    let err = read_all(a, id, exec_id, true).await;
    let w = wait(a, id, exec_id).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        w,
    )
}

/// Reads the first line the container's init writes.
async fn first_line(a: &Agent, id: &str) -> String {
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        let r = a
            .client
            .read_stdout(
                ctx(),
                &ReadStreamRequest {
                    container_id: id.into(),
                    max_len: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(!r.eof, "EOF after {line:?}");
        line.extend_from_slice(&r.data);
    }
    String::from_utf8(line).unwrap()
}

#[tokio::test]
async fn exec_gets_the_container_seccomp_and_its_own_process_fields() {
    let a = start_agent(&[]).await;
    let mut s = spec(
        a.dir.path(),
        &[
            "sh",
            "-c",
            "mkdir /tmp/d 2>/dev/null && echo init-made || echo init-denied; exec sleep 1000",
        ],
    );
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    create(&a, "scx", &s).await.unwrap();
    start(&a, "scx").await;
    assert_eq!(first_line(&a, "scx").await, "init-denied\n");
    let script = "mkdir /tmp/e 2>/dev/null && echo made || echo denied; \
                  grep -E '^(Seccomp|NoNewPrivs|CapEff|CapBnd):' /proc/self/status; \
                  id -u; ulimit -n";
    // As root, without capabilities and without no_new_privileges: the filter is still
    // installed (while the helper has CAP_SYS_ADMIN), and no capability is left.
    let root_exec = json!({
        "args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/",
        "user": {"uid": 0, "gid": 0}
    });
    let (out, err, w) = exec_run(&a, "scx", "x-root", &root_exec).await;
    assert_eq!(w.exit_status, 0, "{out}\n{err}");
    assert_eq!(
        out.lines().take(5).collect::<Vec<_>>(),
        [
            "denied",
            "CapEff:\t0000000000000000",
            "CapBnd:\t0000000000000000",
            "NoNewPrivs:\t0",
            "Seccomp:\t2",
        ],
        "{out}"
    );
    assert_eq!(out.lines().nth(5), Some("0"), "{out}");
    // Another user with no_new_privileges, one capability and its own rlimit.
    let user_exec = json!({
        "args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/tmp",
        "user": {"uid": 1000, "gid": 1000}, "noNewPrivileges": true,
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 99, "soft": 99}],
        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL"], "ambient": ["CAP_KILL"], "inheritable": ["CAP_KILL"]}
    });
    let (out, err, w) = exec_run(&a, "scx", "x-user", &user_exec).await;
    assert_eq!(w.exit_status, 0, "{out}\n{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "denied",
            "CapEff:\t0000000000000020",
            "CapBnd:\t0000000000000020",
            "NoNewPrivs:\t1",
            "Seccomp:\t2",
            "1000",
            "99"
        ],
        "{out}"
    );
    a.client
        .remove_container(ctx(), &creq("scx"))
        .await
        .unwrap();
}

fn ns_of(pid: u32, ns: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap()
}

#[tokio::test]
async fn spec_namespaces_are_created_joined_or_shared() {
    let a = start_agent(&[]).await;
    let me = std::process::id();
    // A: its own pid, ipc, uts, mount and cgroup namespaces.
    let mut s = spec(a.dir.path(), &["sleep", "1000"]);
    s["hostname"] = json!("a-host");
    s["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "cgroup"}, {"type": "network"}
    ]);
    create(&a, "nsa", &s).await.unwrap();
    let pa = start(&a, "nsa").await;
    for ns in ["pid", "ipc", "uts", "mnt", "cgroup"] {
        assert_ne!(ns_of(pa, ns), ns_of(me, ns), "{ns} of A");
    }
    assert_eq!(ns_of(pa, "net"), ns_of(me, "net"), "network is shared");
    // B joins A's pid, ipc and uts namespaces by path; shares the agent's cgroup
    // namespace (not listed); a network path is ignored.
    let mut s = spec(a.dir.path(), &["sleep", "1000"]);
    s.as_object_mut().unwrap().remove("hostname");
    s["linux"]["namespaces"] = json!([
        {"type": "pid", "path": format!("/proc/{pa}/ns/pid")},
        {"type": "ipc", "path": format!("/proc/{pa}/ns/ipc")},
        {"type": "uts", "path": format!("/proc/{pa}/ns/uts")},
        {"type": "mount"},
        {"type": "network", "path": "/var/run/netns/does-not-exist"}
    ]);
    create(&a, "nsb", &s).await.unwrap();
    let pb = start(&a, "nsb").await;
    for ns in ["pid", "ipc", "uts"] {
        assert_eq!(ns_of(pb, ns), ns_of(pa, ns), "{ns} of B joins A's");
    }
    assert_ne!(ns_of(pb, "mnt"), ns_of(pa, "mnt"));
    assert_ne!(ns_of(pb, "mnt"), ns_of(me, "mnt"));
    assert_eq!(ns_of(pb, "cgroup"), ns_of(me, "cgroup"));
    // An exec into B lands in A's pid and uts namespaces: it sees A's init as pid 1.
    let p = json!({
        "args": ["sh", "-c", "hostname; tr '\\0' ' ' < /proc/1/cmdline; echo; ls /proc | grep -c '^[0-9]'"],
        "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
    });
    let (out, err, w) = exec_run(&a, "nsb", "x", &p).await;
    assert_eq!(w.exit_status, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["a-host", "sleep 1000 "], "{out}");
    // A's sleep, B's sleep, the exec's sh (and its pipeline).
    assert!(lines[2].parse::<u32>().unwrap() >= 3, "{out}");
    // B's processes are its own, not everything in A's pid namespace.
    let pids = a
        .client
        .list_processes(ctx(), &creq("nsb"))
        .await
        .unwrap()
        .pids;
    assert_eq!(pids, [pb]);
    // A path that is not a namespace of that type fails at create with the reason.
    let mut s = spec(a.dir.path(), &["true"]);
    s.as_object_mut().unwrap().remove("hostname");
    s["linux"]["namespaces"] =
        json!([{"type": "mount"}, {"type": "uts", "path": format!("/proc/{pa}/ns/ipc")}]);
    let e = create(&a, "wrongtype", &s).await.unwrap_err();
    assert!(msg(&e).contains("joining uts namespace"), "{}", msg(&e));
    a.client
        .remove_container(ctx(), &creq("nsb"))
        .await
        .unwrap();
    assert!(Path::new(&format!("/proc/{pa}")).exists(), "A survives B");
    a.client
        .remove_container(ctx(), &creq("nsa"))
        .await
        .unwrap();

    // What cannot be honoured is a typed error naming the field, and nothing is left.
    let bad = |ns: serde_json::Value, host: Option<&str>| {
        let mut s = spec(a.dir.path(), &["true"]);
        s["linux"]["namespaces"] = ns;
        match host {
            Some(h) => s["hostname"] = json!(h),
            None => {
                s.as_object_mut().unwrap().remove("hostname");
            }
        }
        s
    };
    for (i, s) in [
        bad(json!([{"type": "pid"}, {"type": "ipc"}]), None),
        bad(json!([{"type": "mount"}, {"type": "user"}]), None),
        bad(json!([{"type": "mount"}, {"type": "time"}]), None),
        bad(
            json!([{"type": "mount", "path": format!("/proc/{me}/ns/mnt")}]),
            None,
        ),
        bad(
            json!([{"type": "mount"}, {"type": "ipc", "path": "/nonexistent/ns/ipc"}]),
            None,
        ),
        bad(
            json!([{"type": "mount"}, {"type": "pid"}, {"type": "pid"}]),
            None,
        ),
        // A hostname would change the VM's (here: the host's) when uts is shared.
        bad(json!([{"type": "mount"}, {"type": "pid"}]), Some("h")),
    ]
    .iter()
    .enumerate()
    {
        let id = format!("bad{i}");
        let e = create(&a, &id, s).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{i}: {}", msg(&e));
        assert!(msg(&e).contains("namespace"), "{i}: {}", msg(&e));
        let e = a
            .client
            .start_container(ctx(), &creq(&id))
            .await
            .unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
    }
    assert_serving(&a).await;
}

#[tokio::test]
async fn close_stdin_on_a_tty_delivers_eof() {
    let a = start_agent(&[]).await;
    let mut s = spec(a.dir.path(), &["sh", "-c", "cat; echo cat-done"]);
    s["process"]["terminal"] = json!(true);
    create(&a, "ttyeof", &s).await.unwrap();
    start(&a, "ttyeof").await;
    a.client
        .write_stdin(
            ctx(),
            &WriteStdinRequest {
                container_id: "ttyeof".into(),
                data: b"line1\n".to_vec(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    a.client
        .close_stdin(ctx(), &preq("ttyeof", ""))
        .await
        .unwrap();
    let w = wait(&a, "ttyeof", "").await;
    assert_eq!(w.exit_status, 0);
    let out = String::from_utf8(read_all(&a, "ttyeof", "", false).await).unwrap();
    // The terminal echoes the line, cat copies it, then EOF ends cat.
    assert_eq!(out.matches("line1\r\n").count(), 2, "{out:?}");
    assert!(out.ends_with("cat-done\r\n"), "{out:?}");
    a.client
        .remove_container(ctx(), &creq("ttyeof"))
        .await
        .unwrap();
}

#[tokio::test]
async fn spec_devices_are_created_in_the_container() {
    let a = start_agent(&[]).await;
    let mut s = spec(
        a.dir.path(),
        &[
            "sh",
            "-c",
            "stat -c '%F %t:%T %a %u:%g' /dev/extra-null /dev/sub/fifo1 /dev/null; \
             echo x > /dev/extra-null && echo wrote",
        ],
    );
    s["linux"]["devices"] = json!([
        {"path": "/dev/extra-null", "type": "c", "major": 1, "minor": 3,
         "fileMode": 0o640, "uid": 1000, "gid": 1001},
        {"path": "/dev/sub/fifo1", "type": "p"},
        // Already bound from the agent's /dev: kept.
        {"path": "/dev/null", "type": "c", "major": 1, "minor": 3}
    ]);
    create(&a, "dev", &s).await.expect("create");
    start(&a, "dev").await;
    let out = String::from_utf8(read_all(&a, "dev", "", false).await).unwrap();
    let err = String::from_utf8(read_all(&a, "dev", "", true).await).unwrap();
    assert_eq!(wait(&a, "dev", "").await.exit_status, 0, "{out}\n{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "character special file 1:3 640 1000:1001",
            "fifo 0:0 666 0:0",
            "character special file 1:3 666 0:0",
            "wrote"
        ],
        "{out}"
    );
    // "a" (all) is a cgroup rule type, not a node type: refused at create.
    let mut s = spec(a.dir.path(), &["true"]);
    s["linux"]["devices"] = json!([{"path": "/dev/x", "type": "a"}]);
    let e = create(&a, "deva", &s).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{}", msg(&e));
    assert!(msg(&e).contains("spec.linux.devices"), "{}", msg(&e));
}

#[tokio::test]
async fn sysctls_apply_to_the_container_namespaces_only() {
    let a = start_agent(&[]).await;
    let host_before = std::fs::read_to_string("/proc/sys/kernel/shmmni").unwrap();
    // The default spec makes /proc/sys read-only: sysctls are written before that.
    let mut s = spec(
        a.dir.path(),
        &[
            "sh",
            "-c",
            "cat /proc/sys/kernel/shmmni; echo 5 > /proc/sys/kernel/shmmni || echo ro",
        ],
    );
    s["linux"]["sysctl"] = json!({"kernel.shmmni": "1234"});
    create(&a, "sysctl", &s).await.expect("create");
    start(&a, "sysctl").await;
    let out = String::from_utf8(read_all(&a, "sysctl", "", false).await).unwrap();
    assert_eq!(wait(&a, "sysctl", "").await.exit_status, 0);
    assert_eq!(out, "1234\nro\n");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/shmmni").unwrap(),
        host_before
    );
    // An ipc sysctl without an ipc namespace would change the VM's: refused.
    let mut s = spec(a.dir.path(), &["true"]);
    s["linux"]["sysctl"] = json!({"kernel.shmmni": "1234"});
    s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "pid"}, {"type": "uts"}]);
    let e = create(&a, "sysctl2", &s).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{}", msg(&e));
    assert!(msg(&e).contains("kernel.shmmni"), "{}", msg(&e));
}

/// What a terminal process printed: the `tty=` path, whether it exists in the container as
/// a character device, and the owner uid `ls -ln` shows for it.
fn tty_report(out: &str) -> (String, bool, String) {
    let path = out
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("tty="))
        .unwrap_or_else(|| panic!("no tty= line in {out:?}"))
        .to_owned();
    let exists = out.lines().any(|l| l.trim_end() == "exists");
    let owner = out
        .lines()
        .find(|l| l.starts_with('c'))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("no ls -ln line in {out:?}"))
        .to_owned();
    (path, exists, owner)
}

fn is_devpts_path(p: &str) -> bool {
    p.strip_prefix("/dev/pts/")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

const TTY_SCRIPT: &str =
    "t=$(busybox tty); echo \"tty=$t\"; test -c \"$t\" && echo exists; ls -ln \"$t\"";

/// A terminal is allocated from the container's own devpts instance (its /dev/pts mount),
/// so `tty` names a /dev/pts/<n> that exists inside the container, for the init and for
/// an exec (here as another user, who owns its terminal).
#[tokio::test]
async fn terminal_comes_from_the_containers_devpts() {
    let a = start_agent(&[]).await;
    let mut s = spec(a.dir.path(), &["sh", "-c", TTY_SCRIPT]);
    s["process"]["terminal"] = json!(true);
    create(&a, "ptsinit", &s).await.unwrap();
    start(&a, "ptsinit").await;
    let out = String::from_utf8(read_all(&a, "ptsinit", "", false).await).unwrap();
    assert_eq!(wait(&a, "ptsinit", "").await.exit_status, 0, "{out}");
    let (path, exists, owner) = tty_report(&out);
    assert!(is_devpts_path(&path), "init: tty says {path:?}:\n{out}");
    assert!(
        exists,
        "init: {path} does not exist in the container:\n{out}"
    );
    assert_eq!(owner, "0", "init: {out}");
    a.client
        .remove_container(ctx(), &creq("ptsinit"))
        .await
        .unwrap();

    let s = spec(a.dir.path(), &["sleep", "1000"]);
    create(&a, "ptsexec", &s).await.unwrap();
    start(&a, "ptsexec").await;
    let process = json!({
        "terminal": true,
        "args": ["sh", "-c", TTY_SCRIPT],
        "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 65534, "gid": 65534}
    });
    let (out, err, w) = exec_run(&a, "ptsexec", "t1", &process).await;
    assert_eq!(w.exit_status, 0, "{out}");
    assert!(err.is_empty(), "a terminal has no separate stderr: {err:?}");
    let (path, exists, owner) = tty_report(&out);
    assert!(is_devpts_path(&path), "exec: tty says {path:?}:\n{out}");
    assert!(
        exists,
        "exec: {path} does not exist in the container:\n{out}"
    );
    assert_eq!(
        owner, "65534",
        "exec: the terminal is the process user's:\n{out}"
    );
    a.client
        .remove_container(ctx(), &creq("ptsexec"))
        .await
        .unwrap();
}

/// SIGINT (in the guest: Ctrl-Alt-Del, see agent_guest.rs) is an orderly shutdown: every
/// running container gets SIGTERM, the grace period, then SIGKILL; the agent then exits.
/// One container traps TERM and exits 3; the other (`sleep` as its pid namespace's init,
/// which the kernel does not let SIGTERM kill) is killed once the grace period is over.
#[tokio::test]
async fn sigint_stops_containers_with_sigterm_then_sigkill() {
    const GRACE_SECS: u64 = 8;
    let mut a = start_agent_logging(&["--stop-grace-secs", &GRACE_SECS.to_string()], true).await;
    let polite = spec(
        a.dir.path(),
        &[
            "sh",
            "-c",
            "trap 'echo term > /tmp/got-term; exit 3' TERM; echo ready; while true; do sleep 1; done",
        ],
    );
    let rootfs = PathBuf::from(polite["root"]["path"].as_str().unwrap());
    create(&a, "polite", &polite).await.unwrap();
    start(&a, "polite").await;
    assert_eq!(first_line(&a, "polite").await, "ready\n");
    let stubborn = spec(a.dir.path(), &["sleep", "1000"]);
    create(&a, "stubborn", &stubborn).await.unwrap();
    let stubborn_pid = start(&a, "stubborn").await;
    // Created, never started: removed without signals.
    create(&a, "idle", &spec(a.dir.path(), &["true"]))
        .await
        .unwrap();

    let t = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = loop {
        if let Some(st) = a.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(GRACE_SECS + 60),
            "agent still running after SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(a.dir.path().join(AGENT_LOG)).unwrap();
    assert!(status.success(), "agent exit {status}:\n{log}");
    assert!(
        t.elapsed() >= Duration::from_secs(GRACE_SECS),
        "the TERM-proof container was killed before the grace period ended:\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tmp/got-term")).unwrap_or_default(),
        "term\n",
        "the polite container did not get SIGTERM:\n{log}"
    );
    assert!(log.contains("orderly shutdown"), "{log}");
    let stopped = log
        .lines()
        .find(|l| l.contains("container stopped") && l.contains("container=polite"))
        .unwrap_or_else(|| panic!("no stop line for polite:\n{log}"));
    assert!(stopped.contains("status=3"), "{stopped}");
    assert!(
        log.lines().any(|l| l.contains("container=stubborn")
            && l.contains("did not stop within the grace period")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("\"idle\"") && l.contains("container removed")),
        "{log}"
    );
    assert_eq!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(stubborn_pid as i32), None),
        Err(nix::errno::Errno::ESRCH),
        "the stubborn container's init is still there"
    );
}

/// A terminal needs the container's devpts: without a /dev/pts mount, Create fails with
/// an error naming /dev/ptmx (no fallback to a pty from the agent's devpts), and the
/// agent goes on serving.
#[tokio::test]
async fn terminal_without_a_devpts_mount_is_a_clear_error() {
    let a = start_agent(&[]).await;
    let mut s = spec(a.dir.path(), &["true"]);
    s["process"]["terminal"] = json!(true);
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["destination"] != "/dev/pts");
    let e = create(&a, "nopts", &s).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INTERNAL, "{}", msg(&e));
    assert!(
        msg(&e).contains("/dev/ptmx") && msg(&e).contains("devpts"),
        "{}",
        msg(&e)
    );
    let (out, _, w) = run(&a, "after", &["echo", "still-serving"]).await;
    assert_eq!((out.as_str(), w.exit_status), ("still-serving\n", 0));
}

#[tokio::test]
async fn mounts_given_as_a_plain_oci_runtime_gets_them() {
    let a = start_agent(&[]).await;
    let data = a.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("marker"), "bound\n").unwrap();
    let mut s = spec(
        a.dir.path(),
        &[
            "sh",
            "-c",
            "cat /data/marker; \
             grep ' /data ' /proc/self/mountinfo | grep -q shared: && echo data-shared; \
             grep ' /slave ' /proc/self/mountinfo | grep -q master: && echo slave-is-slave; \
             grep -E '^[0-9]+ [0-9]+ [0-9:]+ [^ ]+ / ' /proc/self/mountinfo | grep -q shared: \
               && echo root-shared",
        ],
    );
    let mounts = s["mounts"].as_array_mut().unwrap();
    // a bind given only by its options (no type), with a propagation flag
    mounts.push(
        json!({"destination": "/data", "source": data, "options": ["rbind", "rw", "rshared"]}),
    );
    // a bind of that shared mount (inside the rootfs by then) made its slave
    let rootfs = PathBuf::from(s["root"]["path"].as_str().unwrap());
    let mounts = s["mounts"].as_array_mut().unwrap();
    mounts.push(json!({"destination": "/slave", "source": rootfs.join("data"), "options": ["bind", "slave"]}));
    s["linux"]["rootfsPropagation"] = json!("shared");
    create(&a, "mnt", &s).await.expect("create");
    start(&a, "mnt").await;
    let out = String::from_utf8_lossy(&read_all(&a, "mnt", "", false).await).into_owned();
    let err = String::from_utf8_lossy(&read_all(&a, "mnt", "", true).await).into_owned();
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["bound", "data-shared", "slave-is-slave", "root-shared"],
        "{err}"
    );

    // a rootfsPropagation that is no propagation is refused at create, naming it
    let mut s = spec(a.dir.path(), &["true"]);
    s["linux"]["rootfsPropagation"] = json!("sideways");
    let e = create(&a, "badprop", &s).await.unwrap_err();
    assert!(
        msg(&e).contains("rootfsPropagation") && msg(&e).contains("sideways"),
        "{}",
        msg(&e)
    );
}

#[tokio::test]
async fn start_container_hooks_run_in_the_container_before_its_process() {
    let a = start_agent(&[]).await;
    // the hook writes its state and a mark inside the container; the process reads both
    let mut s = spec(
        a.dir.path(),
        &["sh", "-c", "cat /tmp/mark; cat /tmp/state; echo; echo $$"],
    );
    s["hooks"] = json!({"startContainer": [
        {"path": "/bin/sh", "args": ["sh", "-c", "cat > /tmp/state; echo hook \"$HOOKVAR\" > /tmp/mark"],
         "env": ["HOOKVAR=set"]}
    ]});
    create(&a, "hk", &s).await.expect("create");
    start(&a, "hk").await;
    let out = String::from_utf8_lossy(&read_all(&a, "hk", "", false).await).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"hook set"), "{out}");
    let state: serde_json::Value = serde_json::from_str(lines[1]).expect("state JSON");
    assert_eq!(state["id"], "hk");
    assert_eq!(state["status"], "created");
    // the state's pid is the process's own (the hook ran in its pid namespace, before exec)
    assert_eq!(state["pid"].to_string(), lines[2], "{out}");
    assert_eq!(wait(&a, "hk", "").await.exit_status, 0);

    // a failing hook fails the start, naming it; the process never runs
    let mut s = spec(a.dir.path(), &["sh", "-c", "echo ran"]);
    s["hooks"] = json!({"startContainer": [{"path": "/bin/false"}]});
    create(&a, "hkfail", &s).await.expect("create");
    let e = a
        .client
        .start_container(ctx(), &creq("hkfail"))
        .await
        .unwrap_err();
    assert!(
        msg(&e).contains("startContainer[0] /bin/false exited with status 1"),
        "{}",
        msg(&e)
    );
    assert!(read_all(&a, "hkfail", "", false).await.is_empty());

    // one past its timeout is killed and fails the start, even when it never reads a state
    // larger than a pipe holds (256 KiB of annotations)
    let mut s = spec(a.dir.path(), &["true"]);
    s["annotations"] = json!({"big": "x".repeat(256 << 10)});
    s["hooks"] =
        json!({"startContainer": [{"path": "/bin/sleep", "args": ["sleep", "60"], "timeout": 1}]});
    create(&a, "hkslow", &s).await.expect("create");
    let t0 = std::time::Instant::now();
    let e = a
        .client
        .start_container(ctx(), &creq("hkslow"))
        .await
        .unwrap_err();
    assert!(msg(&e).contains("timeout of 1 s"), "{}", msg(&e));
    assert!(t0.elapsed() < Duration::from_secs(30));
}
