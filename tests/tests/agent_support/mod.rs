//! Helpers shared by the agent_* end-to-end tests: start a host-mode agent, build
//! busybox specs, call the RPCs.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use carapace_protocol::agent::*;
use carapace_protocol::agent_ttrpc::AgentClient;
use carapace_protocol::client;
use carapace_tests::fixtures;
use serde_json::{Value, json};
use ttrpc::context;

#[allow(missing_debug_implementations)]
pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub client: AgentClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn ctx() -> context::Context {
    context::with_timeout(120_000_000_000)
}

pub async fn start_agent(extra: &[&str]) -> Agent {
    start_agent_logging(extra, false).await
}

/// The file the agent's log goes to with [`start_agent_logging`]`(.., true)`.
pub const AGENT_LOG: &str = "agent.log";

/// Starts a host-mode agent; with `to_file`, its log (stderr) goes to [`AGENT_LOG`] in
/// its directory instead of the test's output.
pub async fn start_agent_logging(extra: &[&str], to_file: bool) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let mut cmd = Command::new(carapace_tests::workspace_bin("carapace-agent"));
    cmd.arg("--host-mode")
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .arg("--log")
        .arg("debug")
        .args(extra);
    if to_file {
        cmd.stderr(std::fs::File::create(dir.path().join(AGENT_LOG)).expect("agent log"));
    }
    let child = cmd.spawn().expect("spawning carapace-agent");
    // The socket file appears at bind(), a moment before the server listens: retry
    // refused or missing connections until a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (client, info) = loop {
        match client::connect_unix(&sock, Duration::from_secs(10)).await {
            Ok(connected) => break connected,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("connecting to the agent: {e:?}"),
        }
    };
    assert_eq!(info.protocol_version, carapace_protocol::PROTOCOL_VERSION);
    Agent { child, dir, client }
}

/// Asserts that the agent still answers: the Version RPC (the host's handshake).
pub async fn assert_serving(a: &Agent) {
    let v = a
        .client
        .version(ctx(), &VersionRequest::default())
        .await
        .expect("the agent answers Version");
    assert_eq!(v.protocol_version, carapace_protocol::PROTOCOL_VERSION);
}

/// A busybox rootfs and a default spec running `args` in it.
pub fn spec(dir: &Path, args: &[&str]) -> Value {
    let rootfs = dir.join(format!("rootfs-{}", args.join("_").len() + rand_suffix()));
    fixtures::busybox_rootfs(&rootfs).expect("busybox rootfs");
    let mut spec = fixtures::default_spec(args);
    spec["root"]["path"] = json!(rootfs);
    spec
}

pub fn rand_suffix() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1000
}

pub async fn create(a: &Agent, id: &str, spec: &Value) -> ttrpc::Result<Empty> {
    a.client
        .create_container(
            ctx(),
            &CreateContainerRequest {
                container_id: id.into(),
                spec_json: serde_json::to_vec(spec).unwrap(),
                ..Default::default()
            },
        )
        .await
}

pub async fn start(a: &Agent, id: &str) -> u32 {
    a.client
        .start_container(ctx(), &creq(id))
        .await
        .expect("start")
        .pid
}

pub fn creq(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

pub fn preq(id: &str, exec: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.into(),
        exec_id: exec.into(),
        ..Default::default()
    }
}

pub async fn wait(a: &Agent, id: &str, exec: &str) -> WaitResponse {
    a.client
        .wait_process(ctx(), &preq(id, exec))
        .await
        .expect("wait")
}

/// Reads a stream to EOF.
pub async fn read_all(a: &Agent, id: &str, exec: &str, stderr: bool) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let req = ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            max_len: 1 << 20,
            ..Default::default()
        };
        let r = if stderr {
            a.client.read_stderr(ctx(), &req).await
        } else {
            a.client.read_stdout(ctx(), &req).await
        }
        .expect("read");
        if r.eof {
            return out;
        }
        out.extend_from_slice(&r.data);
    }
}

pub fn code(e: &ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not an RPC status: {other:?}"),
    }
}

pub fn msg(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message().to_owned(),
        other => format!("{other:?}"),
    }
}
