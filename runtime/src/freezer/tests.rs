//! pause/resume against a fake agent: the state's status follows, and each is refused in
//! the wrong status without reaching the agent.

use super::*;
use crate::agent::{AgentApi, AgentError, Chunk, ContainerStats, ExitInfo, Share, Stream};
use crate::network::NetworkPlan;
use crate::process::ProcessRecord;
use crate::state::SandboxState;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Freezer {
    calls: Mutex<Vec<&'static str>>,
}

#[async_trait::async_trait]
impl AgentApi for Freezer {
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
    async fn signal(&self, _: &str, _: &str, _: u32, _: bool) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn wait(&self, _: &str, _: &str) -> Result<ExitInfo, AgentError> {
        unreachable!()
    }
    async fn write_stdin(&self, _: &str, _: &str, _: &[u8]) -> Result<usize, AgentError> {
        unreachable!()
    }
    async fn close_stdin(&self, _: &str, _: &str) -> Result<(), AgentError> {
        unreachable!()
    }
    async fn read(&self, _: &str, _: &str, _: Stream) -> Result<Chunk, AgentError> {
        unreachable!()
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
        self.calls.lock().unwrap().push("pause");
        Ok(())
    }
    async fn resume(&self, _: &str) -> Result<(), AgentError> {
        self.calls.lock().unwrap().push("resume");
        Ok(())
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

#[test]
fn pause_and_resume_follow_the_status_and_refuse_the_wrong_one() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = Runtime::from_config(carapace_config::Config::default(), tmp.path().into(), None);
    rt.store.create_dir("c1").unwrap();
    let mut st = SandboxState::new("c1", Path::new("/b"), BTreeMap::new());
    // a live "VMM": this process
    st.vmm = ProcessRecord::of(std::process::id() as i32);
    st.status = Status::Created;
    rt.store.save(&st).unwrap();
    let fake = Arc::new(Freezer::default());
    let session: Session = fake.clone();
    let s = Some(&session);

    let err = block_on(pause(&rt, "c1", s)).unwrap_err();
    assert!(
        err.to_string().contains("is created: cannot pause"),
        "{err}"
    );
    rt.store
        .update("c1", |st| st.status = Status::Running)
        .unwrap();
    let err = block_on(resume(&rt, "c1", s)).unwrap_err();
    assert!(
        err.to_string().contains("is running: cannot resume"),
        "{err}"
    );
    assert!(fake.calls.lock().unwrap().is_empty());

    block_on(pause(&rt, "c1", s)).unwrap();
    assert_eq!(rt.state("c1").unwrap().status, "paused");
    let err = block_on(pause(&rt, "c1", s)).unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::WrongStatus {
                status: "paused",
                ..
            }
        ),
        "{err}"
    );
    block_on(resume(&rt, "c1", s)).unwrap();
    assert_eq!(rt.state("c1").unwrap().status, "running");
    assert_eq!(*fake.calls.lock().unwrap(), ["pause", "resume"]);

    // a stopped container is neither
    rt.store
        .update("c1", |st| {
            st.exit = Some(crate::state::ExitRecord {
                status: 0,
                signal: 0,
            })
        })
        .unwrap();
    let err = block_on(pause(&rt, "c1", s)).unwrap_err();
    assert!(
        err.to_string().contains("is stopped: cannot pause"),
        "{err}"
    );
}
