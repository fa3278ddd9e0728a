//! Keeper pieces without a VM: signal forwarding through a fake agent, the guard's pipe
//! with real processes, the exec keeper's report protocol with a shell as the keeper.

use super::*;
use crate::agent::{AgentApi, Chunk, ContainerStats, Share, Stream};
use crate::network::NetworkPlan;
use crate::state::SandboxState;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A process that runs until it gets SIGTERM, then "dies of it"; records every signal.
#[derive(Default)]
struct Signalled {
    got: Mutex<Vec<(String, u32)>>,
}

#[async_trait::async_trait]
impl AgentApi for Signalled {
    async fn create_sandbox(&self, _: &str, _: &str, _: &[Share]) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn create_container(&self, _: &str, _: &[u8]) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn start_container(&self, _: &str) -> Result<u32, AgentError> {
        unreachable!()
    }
    async fn exec_process(&self, _: &str, _: &str, _: &[u8]) -> Result<u32, AgentError> {
        unreachable!()
    }
    async fn signal(&self, _: &str, exec_id: &str, sig: u32, all: bool) -> Result<(), AgentError> {
        assert!(!all, "a forwarded signal goes to the one process");
        self.got.lock().unwrap().push((exec_id.to_owned(), sig));
        Ok(())
    }
    async fn wait(&self, _: &str, _: &str) -> Result<ExitInfo, AgentError> {
        loop {
            if self.got.lock().unwrap().iter().any(|(_, s)| *s == 15) {
                return Ok(ExitInfo {
                    exit_code: 0,
                    signal: 15,
                    exit_status: 143,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    async fn write_stdin(&self, _: &str, _: &str, d: &[u8]) -> Result<usize, AgentError> {
        Ok(d.len())
    }
    async fn close_stdin(&self, _: &str, _: &str) -> Result<(), AgentError> {
        Ok(())
    }
    async fn read(&self, _: &str, _: &str, _: Stream) -> Result<Chunk, AgentError> {
        Ok(Chunk {
            data: Vec::new(),
            eof: true,
        })
    }
    async fn resize(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn list_processes(&self, _: &str) -> Result<Vec<u32>, AgentError> {
        unreachable!()
    }
    async fn remove_container(&self, _: &str) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn destroy_sandbox(&self, _: &str) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn configure_network(&self, _: &NetworkPlan) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn pause(&self, _: &str) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn resume(&self, _: &str) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn update_resources(&self, _: &str, _: &[u8]) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn stats(&self, _: &str) -> Result<ContainerStats, AgentError> {
        unreachable!()
    }
    async fn next_oom_event(&self) -> Result<String, AgentError> {
        unreachable!()
    }
    async fn set_online_cpus(&self, _: u32) -> Result<u32, AgentError> {
        unreachable!()
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn null_io() -> HostIo {
    HostIo {
        stdin_release: None,
        stdin: None,
        stdout: Box::new(tokio::io::sink()),
        stderr: Box::new(tokio::io::sink()),
    }
}

#[test]
fn signals_to_the_keeper_reach_its_process_and_the_status_is_128_plus_signal() {
    let fake = Arc::new(Signalled::default());
    let agent: Session = fake.clone();
    let exit = block_on(async {
        let mut signals = Signals::catch().unwrap();
        let raise = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            nix::sys::signal::raise(Signal::SIGTERM).unwrap();
        });
        let exit = tokio::time::timeout(
            Duration::from_secs(10),
            relay(&agent, "c1", "e1", null_io(), &mut signals),
        )
        .await
        .expect("the process never got SIGTERM")
        .unwrap();
        raise.await.unwrap();
        exit
    });
    assert_eq!(
        *fake.got.lock().unwrap(),
        [("e1".to_owned(), 12), ("e1".to_owned(), 15)]
    );
    assert_eq!(exit_code(&exit), 143);
}

#[test]
fn exit_codes_are_the_status_or_128_plus_signal() {
    let exited = ExitInfo {
        exit_code: 7,
        signal: 0,
        exit_status: 7,
    };
    assert_eq!(exit_code(&exited), 7);
    assert_eq!(exit_code(&KILLED), 137);
    let odd = ExitInfo {
        exit_code: 0,
        signal: 0,
        exit_status: 300,
    };
    assert_eq!(exit_code(&odd), 255);
    let rec = crate::state::ExitRecord {
        status: 130,
        signal: 2,
    };
    assert_eq!(recorded_or_killed(Some(rec)).exit_status, 130);
    assert_eq!(recorded_or_killed(Some(rec)).signal, 2);
    assert_eq!(recorded_or_killed(None), KILLED);
}

/// A "guard" that copies what it reads from its pipe into `out`.
fn recording_guard(out: &Path) -> Guard {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("cat > {}.tmp; mv {0}.tmp {0}", out.display()));
    Guard::spawn(cmd).unwrap()
}

fn wait_for(path: &Path) -> Vec<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{path:?} never written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::read(path).unwrap()
}

#[test]
fn a_released_guard_hears_the_word_and_is_gone_when_release_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("heard");
    let guard = recording_guard(&out);
    let pid = guard.child.id() as i32;
    guard.release();
    assert!(!ProcessRecord::of(pid).is_some_and(|p| p.is_alive()));
    assert_eq!(std::fs::read(&out).unwrap(), RELEASE);
}

#[test]
fn a_guard_whose_keeper_vanished_gets_an_end_of_file_without_the_word() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("heard");
    let guard = recording_guard(&out);
    // what a killed keeper leaves: the write end closed, nothing written
    drop(guard);
    assert_eq!(wait_for(&out), b"");
}

fn runtime(root: &Path) -> Runtime {
    Runtime::from_config(carapace_config::Config::default(), root.into(), None)
}

fn keeper_cmd(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    // $0 is the process file's path appended by spawn_exec_keeper
    cmd.arg("-c").arg(script);
    cmd
}

#[test]
fn an_exec_keeper_reports_the_guest_pid_and_is_recorded_for_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    rt.store.create_dir("c1").unwrap();
    rt.store
        .save(&SandboxState::new("c1", Path::new("/b"), BTreeMap::new()))
        .unwrap();
    let fds = tmp.path().join("fds");
    let process = serde_json::json!({"args": ["true"]});
    // the keeper: checks it got the process file, lists its descriptors, reports, lives on
    let script = format!(
        "grep -q true \"$0\" || exit 3; ls /proc/self/fd > {}; \
         echo 4242 > /proc/self/fd/$CARAPACE_KEEPER_READY_FD; exec sleep 30",
        fds.display()
    );
    let (rec, guest_pid) = block_on(spawn_exec_keeper(
        &rt,
        "c1",
        "e1",
        &process,
        keeper_cmd(&script),
        KeeperStdio::Inherit,
    ))
    .unwrap();
    assert_eq!(guest_pid, 4242);
    assert!(rec.is_alive());
    assert_eq!(rt.store.load("c1").unwrap().exec_keepers, [rec]);
    // stdio, the report pipe, and ls's own directory: nothing else of the parent's
    let n = std::fs::read_to_string(&fds).unwrap().lines().count();
    assert!(n <= 5, "descriptors leaked into the keeper: {n}");
    rec.terminate("keeper", Duration::from_secs(3)).unwrap();
    // a gone keeper is dropped from the record at the next exec
    let (rec2, _) = block_on(spawn_exec_keeper(
        &rt,
        "c1",
        "e2",
        &process,
        keeper_cmd("echo 1 > /proc/self/fd/$CARAPACE_KEEPER_READY_FD; exec sleep 30"),
        KeeperStdio::Inherit,
    ))
    .unwrap();
    assert_eq!(rt.store.load("c1").unwrap().exec_keepers, [rec2]);
    rec2.terminate("keeper", Duration::from_secs(3)).unwrap();
}

#[test]
fn an_exec_keeper_failing_before_the_start_is_reported_with_its_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    rt.store.create_dir("c1").unwrap();
    rt.store
        .save(&SandboxState::new("c1", Path::new("/b"), BTreeMap::new()))
        .unwrap();
    let err = block_on(spawn_exec_keeper(
        &rt,
        "c1",
        "e1",
        &serde_json::json!({}),
        keeper_cmd("exit 9"),
        KeeperStdio::Inherit,
    ))
    .unwrap_err();
    assert!(
        matches!(err, KeeperError::KeeperFailed { code: 9, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("e1"), "{err}");
    // nothing left: no process file, no record
    assert!(!tmp.path().join("c1/exec-e1.json").exists());
    assert!(rt.store.load("c1").unwrap().exec_keepers.is_empty());
    // an exec id that cannot name a file is refused before anything is written
    let err = block_on(spawn_exec_keeper(
        &rt,
        "c1",
        "../x",
        &serde_json::json!({}),
        keeper_cmd("exit 0"),
        KeeperStdio::Inherit,
    ))
    .unwrap_err();
    assert!(err.to_string().contains("invalid"), "{err}");
}
