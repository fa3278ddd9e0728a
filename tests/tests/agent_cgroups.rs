//! carapace-agent's cgroup v2 work in host mode: memory and pids limits enforced, an OOM
//! kill reported as an event, stats in containerd's v2 terms, live resource updates.
//! These need cgroup v2 with the memory and pids controllers: on a host whose
//! /sys/fs/cgroup is such a hierarchy the tests run here, otherwise each test re-runs
//! itself inside the lab VM (tests/lab), which mounts cgroup2 on /sys/fs/cgroup.

mod agent_support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_support::{create, creq, ctx, preq, read_all, spec, start, start_agent, wait};
use carapace_protocol::agent::*;
use carapace_tests::lab::{IN_LAB_ENV, Lab};
use serde_json::json;

fn has_controllers() -> bool {
    let c = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    c.split_whitespace().any(|x| x == "memory") && c.split_whitespace().any(|x| x == "pids")
}

/// Runs `body` here when cgroup v2 controllers are available, else re-runs this test
/// inside the lab.
fn with_cgroup_v2(name: &str, body: impl FnOnce()) {
    if has_controllers() {
        body();
        return;
    }
    assert!(
        std::env::var_os(IN_LAB_ENV).is_none(),
        "inside the lab but /sys/fs/cgroup has no memory/pids controllers"
    );
    let exe = std::env::current_exe().unwrap();
    let argv = [
        exe.as_os_str(),
        OsStr::new(name),
        OsStr::new("--exact"),
        OsStr::new("--nocapture"),
        OsStr::new("--test-threads=1"),
    ];
    let out = Lab::new()
        .mem_mib(2048)
        .timeout(Duration::from_secs(900))
        .env(IN_LAB_ENV, "1")
        .run(&argv)
        .expect("running in the lab");
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    assert_eq!(out.status, 0, "{name} failed inside the lab");
    assert!(
        out.stdout.contains("1 passed"),
        "{name} did not run in the lab"
    );
}

fn cgroup_root(tag: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(format!("carapace-test-{tag}-{}", std::process::id()))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn memory_limit_oom_kill_is_reported_as_an_event() {
    with_cgroup_v2("memory_limit_oom_kill_is_reported_as_an_event", || {
        rt().block_on(async {
            let root = cgroup_root("oom");
            let a = start_agent(&["--cgroup-root", root.to_str().unwrap()]).await;
            let mut s = spec(
                a.dir.path(),
                &[
                    "sh",
                    "-c",
                    "echo start; x=$(yes | head -c 200000000); echo survived",
                ],
            );
            s["linux"]["resources"] = json!({"memory": {"limit": 33554432, "swap": 33554432}});
            create(&a, "hog", &s).await.expect("create");
            assert_eq!(
                std::fs::read_to_string(root.join("hog/memory.max"))
                    .unwrap()
                    .trim(),
                "33554432"
            );
            // The agent queues OOM events, so the long poll may be sent after the kill.
            let empty = Empty::new();
            let oom = a.client.get_oom_event(ctx(), &empty);
            start(&a, "hog").await;
            let w = wait(&a, "hog", "").await;
            let out = read_all(&a, "hog", "", false).await;
            assert_eq!(out, b"start\n", "the hog must not survive");
            assert_ne!(w.exit_status, 0);
            let ev = tokio::time::timeout(Duration::from_secs(30), oom)
                .await
                .expect("an OOM event within 30 s")
                .unwrap();
            assert_eq!(ev.container_id, "hog");
            let st = a.client.stats(ctx(), &creq("hog")).await.unwrap();
            assert!(st.memory_events.oom_kill >= 1, "{:?}", st.memory_events);
            assert_eq!(st.memory.usage_limit, 33_554_432);
            a.client
                .remove_container(ctx(), &creq("hog"))
                .await
                .unwrap();
            assert!(!root.join("hog").exists());
        });
    });
}

#[test]
fn pids_limit_is_enforced() {
    with_cgroup_v2("pids_limit_is_enforced", || {
        rt().block_on(async {
            let root = cgroup_root("pids");
            let a = start_agent(&["--cgroup-root", root.to_str().unwrap()]).await;
            let mut s = spec(a.dir.path(), &["sleep", "1000"]);
            s["linux"]["resources"] = json!({"pids": {"limit": 4}});
            create(&a, "pids", &s).await.expect("create");
            start(&a, "pids").await;
            // An exec that tries to start 8 more processes hits the limit.
            let process = json!({
                "args": ["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do sleep 1000 >/dev/null 2>&1 & done; echo all-forked"],
                "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
            });
            a.client
                .exec_process(
                    ctx(),
                    &ExecProcessRequest {
                        container_id: "pids".into(),
                        exec_id: "forker".into(),
                        process_json: serde_json::to_vec(&process).unwrap(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let out = read_all(&a, "pids", "forker", false).await;
            let err = String::from_utf8_lossy(&read_all(&a, "pids", "forker", true).await).into_owned();
            assert!(out.is_empty(), "all forks succeeded despite pids.max 4");
            assert!(err.contains("fork"), "{err}");
            assert_ne!(wait(&a, "pids", "forker").await.exit_status, 0);
            let pids = a
                .client
                .list_processes(ctx(), &creq("pids"))
                .await
                .unwrap()
                .pids;
            assert!(
                pids.len() <= 4,
                "{} processes despite pids.max 4: {pids:?}",
                pids.len()
            );
            let st = a.client.stats(ctx(), &creq("pids")).await.unwrap();
            assert_eq!(st.pids.limit, 4);
            assert_eq!(st.pids.current, pids.len() as u64);
            a.client
                .signal_process(
                    ctx(),
                    &SignalRequest {
                        container_id: "pids".into(),
                        signal: 9,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(wait(&a, "pids", "").await.signal, 9);
            a.client
                .remove_container(ctx(), &creq("pids"))
                .await
                .unwrap();
        });
    });
}

#[test]
fn stats_and_update_resources() {
    with_cgroup_v2("stats_and_update_resources", || {
        rt().block_on(async {
            let root = cgroup_root("stats");
            let a = start_agent(&["--cgroup-root", root.to_str().unwrap()]).await;
            let s = spec(
                a.dir.path(),
                &["sh", "-c", "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; echo busy-done; sleep 1000"],
            );
            create(&a, "st", &s).await.expect("create");
            start(&a, "st").await;
            let r = a
                .client
                .read_stdout(ctx(), &ReadStreamRequest { container_id: "st".into(), max_len: 64, ..Default::default() })
                .await
                .unwrap();
            assert_eq!(r.data, b"busy-done\n");
            let st = a.client.stats(ctx(), &creq("st")).await.unwrap();
            assert!(st.cpu.usage_usec > 0, "{:?}", st.cpu);
            assert!(st.memory.usage > 0, "{:?}", st.memory);
            assert_eq!(st.memory.usage_limit, u64::MAX, "no limit reads as max");
            assert_eq!(st.pids.current, 1, "sh execs its last command: only sleep");
            let update = json!({"memory": {"limit": 67108864}, "cpu": {"quota": 20000, "period": 100000}, "pids": {"limit": 10}});
            a.client
                .update_resources(
                    ctx(),
                    &UpdateResourcesRequest { container_id: "st".into(), resources_json: serde_json::to_vec(&update).unwrap(), ..Default::default() },
                )
                .await
                .unwrap();
            let st = a.client.stats(ctx(), &creq("st")).await.unwrap();
            assert_eq!(st.memory.usage_limit, 67_108_864);
            assert_eq!(st.pids.limit, 10);
            assert_eq!(std::fs::read_to_string(root.join("st/cpu.max")).unwrap().trim(), "20000 100000");
            let bad = json!({"unified": {"../../escape": "1"}});
            let e = a
                .client
                .update_resources(
                    ctx(),
                    &UpdateResourcesRequest { container_id: "st".into(), resources_json: serde_json::to_vec(&bad).unwrap(), ..Default::default() },
                )
                .await
                .unwrap_err();
            assert!(matches!(e, ttrpc::Error::RpcStatus(ref s) if s.code() == ttrpc::Code::INVALID_ARGUMENT), "{e:?}");
            // An exec joins the container's cgroup.
            let process = json!({"args": ["cat", "/proc/self/cgroup"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
            a.client
                .exec_process(
                    ctx(),
                    &ExecProcessRequest { container_id: "st".into(), exec_id: "cg".into(), process_json: serde_json::to_vec(&process).unwrap(), ..Default::default() },
                )
                .await
                .unwrap();
            let out = String::from_utf8(read_all(&a, "st", "cg", false).await).unwrap();
            assert!(out.trim().ends_with("/st"), "{out}");
            assert_eq!(wait(&a, "st", "cg").await.exit_status, 0);
            let _ = preq;
            a.client.remove_container(ctx(), &creq("st")).await.unwrap();
        });
    });
}
