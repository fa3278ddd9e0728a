//! Tests of the core's requests on containers made by hand (no `__init` helper: the test
//! binary is not the agent), with a real reaper and, where a live init is needed, a real
//! `sleep` child.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::time::TimeSpec;
use tokio::sync::watch;

use super::table::{Container, StartPipe};
use super::*;
use crate::process::{Proc, StatusReader};
use crate::reaper::Exit;

/// Clock values the fake clock was set to; 13 s is refused (EPERM).
pub(crate) static CLOCK: Mutex<Vec<(i64, i64)>> = Mutex::new(Vec::new());

pub(crate) fn fake_clock(ts: TimeSpec) -> nix::Result<()> {
    if ts.tv_sec() == 13 {
        return Err(nix::Error::EPERM);
    }
    CLOCK.lock().unwrap().push((ts.tv_sec(), ts.tv_nsec()));
    Ok(())
}

/// A core in `mode` without cgroups, its clock faked.
/// The one reaper of this test process: the tests run in parallel threads of one process,
/// and a reaper of each test's own would take exits another test waits for.
fn shared_reaper() -> crate::reaper::Reaper {
    static REAPER: std::sync::OnceLock<crate::reaper::Reaper> = std::sync::OnceLock::new();
    REAPER.get_or_init(crate::reaper::Reaper::default).clone()
}

pub(crate) fn core(mode: Mode) -> Arc<Core> {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let config = Config {
        mode,
        cgroup_root: None,
        stop_grace: Duration::from_millis(100),
        cpu_sysfs: PathBuf::from("/nonexistent/cpus"),
    };
    Core::with_reaper(config, tx, fake_clock, shared_reaper()).unwrap()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap()
}

/// A created container `id` whose init is `pid` (0: none) and whose start reports
/// `status` (empty: exec succeeded). Returns the read end of its start pipe.
fn add(
    core: &Core,
    id: &str,
    pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    status: &str,
) -> OwnedFd {
    let (start_r, start_w) = pipe();
    let (status_r, status_w) = pipe();
    nix::unistd::write(&status_w, status.as_bytes()).unwrap();
    drop(status_w);
    let init = Arc::new(Proc {
        pid,
        exit,
        stdin: Default::default(),
        stdout: Default::default(),
        stderr: Default::default(),
        tty: None,
    });
    let start = StartPipe {
        fd: start_w,
        status: StatusReader::new(status_r).unwrap(),
    };
    core.containers.reserve(id).unwrap();
    core.containers.finish(
        id,
        Some(Arc::new(Container::new(
            id.into(),
            init,
            None,
            start,
            None,
            false,
        ))),
    );
    start_r
}

/// A created container without a process; the sender reports its init's exit.
fn add_fake(core: &Core, id: &str, status: &str) -> (watch::Sender<Option<Exit>>, OwnedFd) {
    let (tx, rx) = watch::channel(None);
    let start_r = add(core, id, 0, rx, status);
    (tx, start_r)
}

/// A created container whose init is a real `sleep` child, reaped by the core's reaper.
fn add_sleeper(core: &Core, id: &str) -> (i32, OwnedFd) {
    // The core's reaper collects it (waitpid(-1)): the Child handle is never waited on.
    #[allow(clippy::zombie_processes)]
    let child = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let exit = core.reaper.register(pid);
    (pid, add(core, id, pid, exit, ""))
}

fn state_error(r: Result<impl std::fmt::Debug>) -> StateError {
    match r {
        Err(CoreError::State(e)) => e,
        other => panic!("expected a state error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_concurrent_starts_of_one_container_exactly_one_wins() {
    let core = core(Mode::Host);
    let (_exit, start_r) = add_fake(&core, "c", "");
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (core, barrier) = (core.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                core.start_container("c").await
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => {
                let CoreError::State(e) = e else {
                    panic!("{e}")
                };
                assert_eq!(e.op, Op::Start);
                assert!(matches!(e.state, CState::Starting | CState::Running), "{e}");
                assert_eq!(
                    crate::service::code(&CoreError::State(e)),
                    ttrpc::Code::FAILED_PRECONDITION
                );
            }
        }
    }
    assert_eq!(won, 1);
    // The init was told to start exactly once.
    let mut buf = [0u8; 8];
    assert_eq!(
        nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&start_r), &mut buf),
        Ok(1)
    );
    assert_eq!(core.container("c").unwrap().state(), CState::Running);
}

#[tokio::test]
async fn start_after_the_init_exited_is_refused_with_the_typed_error() {
    let core = core(Mode::Host);
    let (exit, _start_r) = add_fake(&core, "web", "");
    core.start_container("web").await.unwrap();
    exit.send(Some(Exit { code: 0, signal: 0 })).unwrap();
    let e = state_error(core.start_container("web").await);
    assert_eq!(
        e,
        StateError {
            id: "web".into(),
            state: CState::Stopped,
            op: Op::Start
        }
    );
    assert_eq!(
        e.to_string(),
        "container \"web\" is stopped, start needs created"
    );
    // Exec and pause too.
    assert_eq!(
        state_error(core.exec_process("web", "e1", b"{}").await).op,
        Op::Exec
    );
    assert_eq!(
        state_error(core.pause_container("web").await).state,
        CState::Stopped
    );
}

#[tokio::test]
async fn a_failed_start_leaves_a_stopped_container_that_can_be_waited_for() {
    let core = core(Mode::Host);
    let (exit, _start_r) = add_fake(&core, "c", "Eexec: no such file\n");
    let e = core.start_container("c").await.unwrap_err();
    assert!(e.to_string().contains("no such file"), "{e}");
    assert_eq!(core.container("c").unwrap().state(), CState::Stopped);
    assert_eq!(
        state_error(core.start_container("c").await).state,
        CState::Stopped
    );
    exit.send(Some(Exit {
        code: 127,
        signal: 0,
    }))
    .unwrap();
    let w = core.wait_process("c", "").await.unwrap();
    assert_eq!(w.status(), 127);
}

#[tokio::test]
async fn wait_before_start_is_refused() {
    let core = core(Mode::Host);
    let _c = add_fake(&core, "c", "");
    let e = state_error(core.wait_process("c", "").await);
    assert_eq!((e.state, e.op), (CState::Created, Op::Wait));
}

#[tokio::test]
async fn a_failed_pause_leaves_the_container_running() {
    let core = core(Mode::Host);
    let _c = add_fake(&core, "c", "");
    core.start_container("c").await.unwrap();
    // No cgroup: UNAVAILABLE, and the state is given back.
    let e = core.pause_container("c").await.unwrap_err();
    assert!(
        matches!(
            e,
            CoreError::Cgroup(crate::cgroup::CgroupError::Unavailable)
        ),
        "{e}"
    );
    assert_eq!(core.container("c").unwrap().state(), CState::Running);
    assert_eq!(
        state_error(core.resume_container("c").await).state,
        CState::Running
    );
}

#[tokio::test]
async fn removing_a_running_container_kills_it_and_one_removal_wins() {
    let core = core(Mode::Host);
    let (pid, _start_r) = add_sleeper(&core, "run");
    core.start_container("run").await.unwrap();
    assert_eq!(
        core.list_processes("run").unwrap(),
        vec![pid.unsigned_abs()]
    );
    let (a, b) = tokio::join!(core.remove_container("run"), core.remove_container("run"));
    let other = match (a, b) {
        (Ok(()), other) | (other, Ok(())) => other,
        (a, b) => panic!("no removal succeeded: {a:?} {b:?}"),
    };
    match other {
        Err(CoreError::State(e)) => assert_eq!((e.state, e.op), (CState::Removing, Op::Remove)),
        Err(CoreError::NoContainer(_)) => {}
        r => panic!("the second removal: {r:?}"),
    }
    assert!(matches!(
        core.container("run"),
        Err(CoreError::NoContainer(_))
    ));
    assert!(matches!(
        core.start_container("run").await,
        Err(CoreError::NoContainer(_))
    ));
    // The init was killed and reaped.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test]
async fn removing_a_created_container_closes_its_start_pipe() {
    let core = core(Mode::Host);
    let (_exit, start_r) = add_fake(&core, "c", "");
    core.remove_container("c").await.unwrap();
    // EOF: the init would exit without starting.
    let mut buf = [0u8; 1];
    assert_eq!(
        nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&start_r), &mut buf),
        Ok(0)
    );
}

#[tokio::test]
async fn ids_being_created_are_taken() {
    let core = core(Mode::Host);
    core.containers.reserve("new").unwrap();
    assert!(matches!(
        core.containers.reserve("new"),
        Err(CoreError::Exists { .. })
    ));
    let e = core.start_container("new").await.unwrap_err();
    assert!(matches!(e, CoreError::BeingCreated(_)), "{e}");
    assert_eq!(crate::service::code(&e), ttrpc::Code::FAILED_PRECONDITION);
    // Sandbox teardown skips it; a failed create frees the id.
    core.destroy_all().await;
    core.containers.finish("new", None);
    assert!(matches!(
        core.container("new"),
        Err(CoreError::NoContainer(_))
    ));
}

#[tokio::test]
async fn exec_ids_are_taken_atomically() {
    let core = core(Mode::Host);
    let _c = add_fake(&core, "c", "");
    let c = core.container("c").unwrap();
    c.reserve_exec("e").unwrap();
    assert!(matches!(c.reserve_exec("e"), Err(CoreError::Exists { .. })));
    // Not visible until started.
    assert!(matches!(c.process("e"), Err(CoreError::NoProcess { .. })));
    c.finish_exec("e", None);
    c.reserve_exec("e").unwrap();
}

#[tokio::test]
async fn set_guest_time_sets_the_clock_in_the_guest_only() {
    let guest = core(Mode::Guest);
    guest.set_guest_time(1_900_000_000, 123).unwrap();
    assert!(CLOCK.lock().unwrap().contains(&(1_900_000_000, 123)));
    for (sec, nsec) in [(-1, 0), (5, 1_000_000_000)] {
        assert!(
            matches!(
                guest.set_guest_time(sec, nsec),
                Err(CoreError::Invalid {
                    field: "sec/nsec",
                    ..
                })
            ),
            "{sec} {nsec}"
        );
    }
    assert!(
        !CLOCK
            .lock()
            .unwrap()
            .iter()
            .any(|(s, _)| *s == -1 || *s == 5)
    );
    // The kernel's refusal is an internal error naming the call.
    let e = guest.set_guest_time(13, 0).unwrap_err();
    assert!(e.to_string().contains("clock_settime"), "{e}");
    assert!(matches!(
        core(Mode::Host).set_guest_time(1_900_000_001, 0),
        Err(CoreError::HostMode("SetGuestTime"))
    ));
    assert!(
        !CLOCK
            .lock()
            .unwrap()
            .iter()
            .any(|(s, _)| *s == 1_900_000_001)
    );
}

#[tokio::test]
async fn configure_network_is_refused_in_host_mode_before_anything_else() {
    use crate::network::model::{InterfaceRequest, NetworkRequest};
    let host = core(Mode::Host);
    *host.sandbox.lock().unwrap() = Some("pod".into());
    // Even an invalid request: the mode is checked first.
    let bad = NetworkRequest {
        interfaces: vec![InterfaceRequest {
            mtu: 70_000,
            ..Default::default()
        }],
        ..Default::default()
    };
    for req in [NetworkRequest::default(), bad] {
        assert!(matches!(
            host.configure_network(&req).await,
            Err(CoreError::HostMode("ConfigureNetwork"))
        ));
    }
}

/// In the guest: checked whole first (INVALID_ARGUMENT), then after CreateSandbox only,
/// and once. Run in a private network namespace (the empty request lists the links).
#[test]
fn configure_network_in_the_guest_needs_a_sandbox_and_happens_once() {
    use crate::network::NetError;
    use crate::network::model::{InterfaceRequest, NetworkRequest};
    crate::network::apply::tests::in_private_netns(|| async {
        let guest = core(Mode::Guest);
        let bad = NetworkRequest {
            interfaces: vec![InterfaceRequest {
                mac: "02:00:00:00:00:05".into(),
                name: "eth0".into(),
                mtu: 70_000,
                addresses: vec![],
            }],
            ..Default::default()
        };
        let e = guest.configure_network(&bad).await.unwrap_err();
        assert!(
            matches!(e, CoreError::Network(NetError::Invalid { .. })),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "interfaces[0].mtu: 70000 is out of 68..=65535"
        );
        let empty = NetworkRequest::default();
        let e = guest.configure_network(&empty).await.unwrap_err();
        assert!(matches!(e, CoreError::Order(_)), "{e:?}");
        assert!(e.to_string().contains("CreateSandbox comes first"), "{e}");
        *guest.sandbox.lock().unwrap() = Some("pod".into());
        guest.configure_network(&empty).await.unwrap();
        let e = guest.configure_network(&empty).await.unwrap_err();
        assert!(e.to_string().contains("configured already"), "{e}");
    });
}

/// A core in `mode` whose CPUs are a scratch sysfs tree with `present` CPUs, cpu0 alone
/// online (cpu0 has no `online` file).
pub(crate) fn core_with_cpus(mode: Mode, present: u32) -> (Arc<Core>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("present"), format!("0-{}\n", present - 1)).unwrap();
    for n in 0..present {
        let cpu = dir.path().join(format!("cpu{n}"));
        std::fs::create_dir(&cpu).unwrap();
        if n > 0 {
            std::fs::write(cpu.join("online"), "0\n").unwrap();
        }
    }
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let config = Config {
        mode,
        cgroup_root: None,
        stop_grace: Duration::from_millis(100),
        cpu_sysfs: dir.path().to_path_buf(),
    };
    (
        Core::with_reaper(config, tx, fake_clock, shared_reaper()).unwrap(),
        dir,
    )
}

#[tokio::test]
async fn set_online_cpus_writes_sysfs_in_the_guest_only() {
    let (guest, dir) = core_with_cpus(Mode::Guest, 4);
    assert_eq!(guest.set_online_cpus(3).await.unwrap(), 3);
    let online =
        |n: u32| std::fs::read_to_string(dir.path().join(format!("cpu{n}/online"))).unwrap();
    assert_eq!(
        (online(1).trim(), online(2).trim(), online(3).trim()),
        ("1", "1", "0")
    );
    assert_eq!(guest.set_online_cpus(2).await.unwrap(), 2);
    assert_eq!(online(2).trim(), "0");
    assert!(matches!(
        guest.set_online_cpus(5).await,
        Err(CoreError::Cpus(crate::cpus::CpuError::OutOfRange {
            count: 5,
            present: 4
        }))
    ));
    let (host, dir) = core_with_cpus(Mode::Host, 4);
    assert!(matches!(
        host.set_online_cpus(2).await,
        Err(CoreError::HostMode("SetOnlineCpus"))
    ));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("cpu1/online")).unwrap(),
        "0\n"
    );
}
