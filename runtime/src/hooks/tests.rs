use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use oci_spec::runtime::{Hook, HookBuilder, Hooks, HooksBuilder};

use super::*;

fn state(status: &str) -> OciState {
    OciState {
        oci_version: "1.2.0".into(),
        id: "c1".into(),
        status: status.into(),
        pid: 4242,
        bundle: "/b".into(),
        rootfs: "/b/rootfs".into(),
        created: "2026-12-06T00:00:00Z".into(),
        owner: "root".into(),
        annotations: BTreeMap::from([("k".into(), "v".into())]),
    }
}

/// A hook running `sh -c script` with `env`.
fn sh(script: &str, env: &[&str], timeout: Option<i64>) -> Hook {
    let b = HookBuilder::default()
        .path("/bin/sh")
        .args(vec!["hook-argv0".into(), "-c".into(), script.into()])
        .env(env.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let b = match timeout {
        Some(t) => b.timeout(t),
        None => b,
    };
    b.build().expect("hook")
}

fn prestart(list: Vec<Hook>) -> Hooks {
    HooksBuilder::default()
        .prestart(list)
        .build()
        .expect("hooks")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn a_hook_gets_the_state_on_stdin_its_args_and_only_its_env() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let script = format!(
        "cat > {o}.state; echo \"$0|$FOO|${{HOME:-unset}}|$(pwd)\" > {o}",
        o = out.display()
    );
    let hooks = prestart(vec![sh(&script, &["FOO=bar=baz"], Some(30))]);
    run(HookKind::Prestart, &hooks, &state("creating")).expect("hook runs");
    assert_eq!(read(&out).trim(), "hook-argv0|bar=baz|unset|/");
    let got: OciState =
        serde_json::from_str(&read(&dir.path().join("out.state"))).expect("state JSON");
    assert_eq!(got, state("creating"));
}

#[test]
fn a_failing_hook_is_an_error_with_its_output_and_stops_the_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let second = dir.path().join("second");
    let hooks = prestart(vec![
        sh("echo to-stdout; echo why-it-failed >&2; exit 3", &[], None),
        sh(&format!("touch {}", second.display()), &[], None),
    ]);
    let e = run(HookKind::Prestart, &hooks, &state("creating")).expect_err("must fail");
    let text = e.to_string();
    assert!(matches!(e, HookError::Failed { .. }), "{e:?}");
    assert!(text.contains("prestart hook /bin/sh failed"), "{text}");
    assert!(text.contains("exit status: 3"), "{text}");
    assert!(
        text.contains("why-it-failed") && text.contains("to-stdout"),
        "{text}"
    );
    assert!(!second.exists(), "the hook after a failed one ran");
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_its_process_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("pid");
    // a child of the hook that would outlive it, holding its stdout open
    let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let hooks = prestart(vec![sh(&script, &[], Some(1))]);
    let t = Instant::now();
    let e = run(HookKind::Prestart, &hooks, &state("creating")).expect_err("must time out");
    assert!(matches!(e, HookError::TimedOut { secs: 1, .. }), "{e:?}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    let pid: i32 = read(&pidfile).trim().parse().expect("child pid");
    // SIGKILL is delivered at once; the orphan is reaped by init, so /proc may show it
    // briefly as a zombie before it disappears.
    let gone = (0..200).any(|_| {
        let stat = read(Path::new(&format!("/proc/{pid}/stat")));
        let alive = !stat.is_empty() && !stat.contains(") Z ");
        if alive {
            std::thread::sleep(Duration::from_millis(10));
        }
        !alive
    });
    assert!(gone, "the hook's child {pid} survived the timeout");
}

#[test]
fn a_missing_program_is_a_spawn_error() {
    let hooks = prestart(vec![
        HookBuilder::default()
            .path("/nonexistent/hook")
            .build()
            .expect("hook"),
    ]);
    let e = run(HookKind::Prestart, &hooks, &state("creating")).expect_err("must fail");
    assert!(matches!(e, HookError::Spawn { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/hook"), "{e}");
}

#[test]
fn logged_hooks_all_run_even_after_one_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let second = dir.path().join("second");
    let hooks = HooksBuilder::default()
        .poststop(vec![
            sh("exit 1", &[], None),
            sh(&format!("touch {}", second.display()), &[], None),
        ])
        .build()
        .expect("hooks");
    run_logged(HookKind::Poststop, &hooks, &state("stopped"));
    assert!(
        second.exists(),
        "the hook after a failed poststop hook did not run"
    );
}

#[test]
fn each_kind_runs_only_its_own_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = |n: &str| {
        sh(
            &format!("touch {}", dir.path().join(n).display()),
            &[],
            None,
        )
    };
    let hooks = HooksBuilder::default()
        .prestart(vec![mark("prestart")])
        .create_runtime(vec![mark("createRuntime")])
        .create_container(vec![mark("createContainer")])
        .poststart(vec![mark("poststart")])
        .poststop(vec![mark("poststop")])
        .build()
        .expect("hooks");
    for kind in [
        HookKind::Prestart,
        HookKind::CreateRuntime,
        HookKind::CreateContainer,
        HookKind::Poststart,
        HookKind::Poststop,
    ] {
        run(kind, &hooks, &state("creating")).expect("runs");
        let made: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(made, vec![kind.name().to_owned()], "after {}", kind.name());
        std::fs::remove_file(dir.path().join(kind.name())).expect("rm");
    }
}

#[test]
fn check_names_the_field_that_is_wrong() {
    let relative = prestart(vec![
        HookBuilder::default().path("bin/hook").build().unwrap(),
    ]);
    let (field, reason) = check(&relative).expect_err("relative path");
    assert_eq!(field, "hooks.prestart[0].path");
    assert!(reason.contains("absolute"), "{reason}");

    let zero = HooksBuilder::default()
        .poststop(vec![sh("true", &[], None), sh("true", &[], Some(0))])
        .build()
        .unwrap();
    assert_eq!(
        check(&zero).expect_err("timeout 0").0,
        "hooks.poststop[1].timeout"
    );

    let env = prestart(vec![sh("true", &["NOEQUALS"], None)]);
    assert_eq!(check(&env).expect_err("env").0, "hooks.prestart[0].env");

    let start = HooksBuilder::default()
        .start_container(vec![sh("true", &[], None)])
        .build()
        .unwrap();
    assert!(check(&start).is_ok(), "the guest runs startContainer hooks");
    let relative = HooksBuilder::default()
        .start_container(vec![HookBuilder::default().path("true").build().unwrap()])
        .build()
        .unwrap();
    assert_eq!(
        check(&relative).expect_err("relative").0,
        "hooks.startContainer[0].path"
    );

    assert!(check(&prestart(vec![sh("true", &["A=1"], Some(5))])).is_ok());
    assert!(check(&Hooks::default()).is_ok());
}

#[test]
fn hooks_are_never_given_a_pid_in_the_hosts_network_namespace() {
    let mut s = state("creating");
    s.pid = std::process::id() as i32;
    let e = check_pid_isolated(&s).expect_err("our own pid");
    assert!(e.to_string().contains("host's network namespace"), "{e}");
    s.pid = i32::MAX; // no such process: cannot be told apart, refused
    assert!(check_pid_isolated(&s).is_err());
    // a process in a network namespace of its own (needs root to create one)
    let Ok(mut child) = std::process::Command::new("unshare")
        .args(["--net", "sleep", "30"])
        .spawn()
    else {
        return;
    };
    let own = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while own(child.id()) == own(std::process::id()) && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    s.pid = child.id() as i32;
    let isolated = own(child.id()) != own(std::process::id());
    let r = check_pid_isolated(&s);
    let _ = child.kill();
    let _ = child.wait();
    if isolated {
        r.expect("a pid with a network namespace of its own");
    }
}
