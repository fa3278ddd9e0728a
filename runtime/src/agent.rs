//! Talking to the guest agent.
//!
//! [`AgentApi`] is the synchronous interface the sandbox logic uses (one method per agent
//! RPC it needs), [`AgentConnector`] makes one connection attempt. The real implementation
//! [`TtrpcConnector`]/[`TtrpcAgent`] drives `carapace-protocol`'s async ttrpc client on a
//! small private tokio runtime: the runtime library and the CLI stay synchronous, and IO
//! pumps can call the agent from several threads at once (ttrpc multiplexes the calls).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use carapace_protocol::agent::{
    ContainerRequest, CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest,
    ExecProcessRequest, ProcessRequest, ReadStreamRequest, ResizeTtyRequest, SharedFs,
    SignalRequest, UpdateResourcesRequest, WriteStdinRequest,
};

/// A container's cgroup statistics as the agent reports them (the cgroup v2 file names
/// containerd's `io.containerd.cgroups.v2.Metrics` uses).
pub use carapace_protocol::agent::StatsResponse as ContainerStats;
use carapace_protocol::agent_ttrpc::AgentClient;
use carapace_protocol::client::{self, ClientError};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Connecting (including the handshake and version check) failed.
    #[error("cannot connect to the guest agent through {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: ClientError,
    },
    /// An RPC failed.
    #[error("agent request {method} for {target} failed")]
    Rpc {
        /// The RPC.
        method: &'static str,
        /// The container/process it was about.
        target: String,
        /// Cause.
        #[source]
        source: ttrpc::Error,
    },
    /// The private async runtime could not be created.
    #[error("cannot create the async runtime for the agent client")]
    Runtime(#[source] std::io::Error),
    /// A fake agent's injected failure (tests).
    #[error("{0}")]
    Other(String),
}

impl AgentError {
    /// Whether the agent refused because its target is not in a state for the request
    /// (FAILED_PRECONDITION), e.g. a signal for a process that has already exited.
    pub fn is_wrong_state(&self) -> bool {
        matches!(
            self,
            AgentError::Rpc { source: ttrpc::Error::RpcStatus(s), .. }
                if s.code() == ttrpc::Code::FAILED_PRECONDITION
        )
    }
}

/// A virtio-fs share the agent mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// virtio-fs tag.
    pub tag: String,
    /// Guest mount point.
    pub mount_point: String,
    /// Read-only.
    pub read_only: bool,
}

/// How a process ended, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code (when it exited).
    pub exit_code: i32,
    /// Killing signal, 0 when it exited.
    pub signal: i32,
    /// exit_code, or 128 + signal.
    pub exit_status: u32,
}

/// One chunk of a process's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Data (possibly empty).
    pub data: Vec<u8>,
    /// No more data will come.
    pub eof: bool,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

/// The agent requests the runtime makes. `exec_id` empty means the container's init.
pub trait AgentApi: Send + Sync {
    /// Sets up the sandbox: hostname and shares.
    fn create_sandbox(&self, id: &str, hostname: &str, shares: &[Share]) -> Result<(), AgentError>;
    /// Creates a container from a guest-path spec (JSON).
    fn create_container(&self, cid: &str, spec_json: &[u8]) -> Result<(), AgentError>;
    /// Starts the container's init; returns its guest pid.
    fn start_container(&self, cid: &str) -> Result<u32, AgentError>;
    /// Starts an extra process (OCI `process` JSON); returns its guest pid.
    fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<u32, AgentError>;
    /// Sends a signal.
    fn signal(&self, cid: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), AgentError>;
    /// Waits (unbounded) for a process to exit.
    fn wait(&self, cid: &str, exec_id: &str) -> Result<ExitInfo, AgentError>;
    /// Writes to a process's stdin; returns the bytes taken.
    fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<usize, AgentError>;
    /// Closes a process's stdin.
    fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<(), AgentError>;
    /// Reads the next chunk of output (waits for data or end).
    fn read(&self, cid: &str, exec_id: &str, stream: Stream) -> Result<Chunk, AgentError>;
    /// Resizes a process's terminal.
    fn resize(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), AgentError>;
    /// Guest pids of the container's processes.
    fn list_processes(&self, cid: &str) -> Result<Vec<u32>, AgentError>;
    /// Removes a stopped container.
    fn remove_container(&self, cid: &str) -> Result<(), AgentError>;
    /// Stops every container and powers the VM off.
    fn destroy_sandbox(&self, id: &str) -> Result<(), AgentError>;
    /// Freezes every process of a running container (cgroup freezer).
    fn pause(&self, cid: &str) -> Result<(), AgentError>;
    /// Thaws a paused container.
    fn resume(&self, cid: &str) -> Result<(), AgentError>;
    /// Applies an OCI `linux.resources` object (JSON) to the container's cgroup.
    fn update_resources(&self, cid: &str, resources_json: &[u8]) -> Result<(), AgentError>;
    /// The container's cgroup statistics.
    fn stats(&self, cid: &str) -> Result<ContainerStats, AgentError>;
    /// Waits (unbounded) for the next OOM kill in any container of the VM; returns the
    /// container's id.
    fn next_oom_event(&self) -> Result<String, AgentError>;
}

/// Makes one connection attempt to an agent.
pub trait AgentConnector: Send + Sync + std::fmt::Debug {
    /// Connects through `socket` within `timeout`.
    fn connect(&self, socket: &Path, timeout: Duration) -> Result<Arc<dyn AgentApi>, AgentError>;
}

/// How the agent is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The VMM's hybrid-vsock unix socket (`CONNECT 1023`).
    HybridVsock,
    /// A plain unix socket (the agent's host mode).
    Unix,
}

/// The real connector: `carapace-protocol`'s client.
#[derive(Debug, Clone, Copy)]
pub struct TtrpcConnector {
    /// How to reach the agent.
    pub transport: Transport,
    /// Deadline for each request except waits and reads.
    pub request_timeout: Duration,
}

/// A connected agent.
pub struct TtrpcAgent {
    client: AgentClient,
    rt: &'static tokio::runtime::Runtime,
    timeout: Duration,
}

/// The runtime every agent connection of this process blocks on: one worker thread for all
/// of them (a shim holds a connection per container plus one per stream; a runtime each
/// cost a thread pool each). It lives as long as the process, so no connection ever drops
/// a runtime: dropping one inside another runtime's async task panics, which is how the
/// shim's Delete handler died before it answered (the last reference to a deleted
/// container's connection went away there).
fn client_runtime() -> Result<&'static tokio::runtime::Runtime, AgentError> {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("agent-client")
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    // Two first connections at once: the loser's runtime is dropped here, outside any
    // async context (connect is a blocking call).
    Ok(RT.get_or_init(|| rt))
}

impl std::fmt::Debug for TtrpcAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtrpcAgent")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AgentConnector for TtrpcConnector {
    fn connect(&self, socket: &Path, timeout: Duration) -> Result<Arc<dyn AgentApi>, AgentError> {
        let rt = client_runtime()?;
        let (client, info) = rt
            .block_on(async {
                match self.transport {
                    Transport::HybridVsock => client::connect_hybrid_vsock(socket, timeout).await,
                    Transport::Unix => client::connect_unix(socket, timeout).await,
                }
            })
            .map_err(|source| AgentError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        tracing::debug!(agent_version = info.agent_version, "connected to agent");
        Ok(Arc::new(TtrpcAgent {
            rt,
            client,
            timeout: self.request_timeout,
        }))
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl TtrpcAgent {
    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(nanos(self.timeout))
    }

    fn rpc_err(method: &'static str, target: &str) -> impl FnOnce(ttrpc::Error) -> AgentError {
        let target = target.to_owned();
        move |source| AgentError::Rpc {
            method,
            target,
            source,
        }
    }
}

fn proc_req(cid: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: cid.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    }
}

fn container_req(cid: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: cid.to_owned(),
        ..Default::default()
    }
}

fn target(cid: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        cid.to_owned()
    } else {
        format!("{cid}/{exec_id}")
    }
}

impl AgentApi for TtrpcAgent {
    fn create_sandbox(&self, id: &str, hostname: &str, shares: &[Share]) -> Result<(), AgentError> {
        let req = CreateSandboxRequest {
            sandbox_id: id.to_owned(),
            hostname: hostname.to_owned(),
            shares: shares
                .iter()
                .map(|s| SharedFs {
                    tag: s.tag.clone(),
                    mount_point: s.mount_point.clone(),
                    read_only: s.read_only,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.create_sandbox(self.ctx(), &req))
            .map(drop)
            .map_err(Self::rpc_err("CreateSandbox", id))
    }

    fn create_container(&self, cid: &str, spec_json: &[u8]) -> Result<(), AgentError> {
        let req = CreateContainerRequest {
            container_id: cid.to_owned(),
            spec_json: spec_json.to_vec(),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.create_container(self.ctx(), &req))
            .map(drop)
            .map_err(Self::rpc_err("CreateContainer", cid))
    }

    fn start_container(&self, cid: &str) -> Result<u32, AgentError> {
        let req = ContainerRequest {
            container_id: cid.to_owned(),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.start_container(self.ctx(), &req))
            .map(|r| r.pid)
            .map_err(Self::rpc_err("StartContainer", cid))
    }

    fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<u32, AgentError> {
        let req = ExecProcessRequest {
            container_id: cid.to_owned(),
            exec_id: exec_id.to_owned(),
            process_json: process_json.to_vec(),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.exec_process(self.ctx(), &req))
            .map(|r| r.pid)
            .map_err(Self::rpc_err("ExecProcess", &target(cid, exec_id)))
    }

    fn signal(&self, cid: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), AgentError> {
        let req = SignalRequest {
            container_id: cid.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        self.rt
            .block_on(self.client.signal_process(self.ctx(), &req))
            .map(drop)
            .map_err(Self::rpc_err("SignalProcess", &target(cid, exec_id)))
    }

    fn wait(&self, cid: &str, exec_id: &str) -> Result<ExitInfo, AgentError> {
        self.rt
            .block_on(
                self.client
                    .wait_process(ttrpc::context::Context::default(), &proc_req(cid, exec_id)),
            )
            .map(|r| ExitInfo {
                exit_code: r.exit_code,
                signal: r.signal,
                exit_status: r.exit_status,
            })
            .map_err(Self::rpc_err("WaitProcess", &target(cid, exec_id)))
    }

    fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<usize, AgentError> {
        let data = &data[..data.len().min(carapace_protocol::MAX_WRITE_CHUNK)];
        let req = WriteStdinRequest {
            container_id: cid.to_owned(),
            exec_id: exec_id.to_owned(),
            data: data.to_vec(),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.write_stdin(self.ctx(), &req))
            .map(|r| (r.len as usize).min(data.len()))
            .map_err(Self::rpc_err("WriteStdin", &target(cid, exec_id)))
    }

    fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<(), AgentError> {
        self.rt
            .block_on(self.client.close_stdin(self.ctx(), &proc_req(cid, exec_id)))
            .map(drop)
            .map_err(Self::rpc_err("CloseStdin", &target(cid, exec_id)))
    }

    fn read(&self, cid: &str, exec_id: &str, stream: Stream) -> Result<Chunk, AgentError> {
        let req = ReadStreamRequest {
            container_id: cid.to_owned(),
            exec_id: exec_id.to_owned(),
            max_len: 64 * 1024,
            ..Default::default()
        };
        let ctx = ttrpc::context::Context::default();
        let (name, res) = match stream {
            Stream::Stdout => (
                "ReadStdout",
                self.rt.block_on(self.client.read_stdout(ctx, &req)),
            ),
            Stream::Stderr => (
                "ReadStderr",
                self.rt.block_on(self.client.read_stderr(ctx, &req)),
            ),
        };
        res.map(|r| Chunk {
            data: r.data,
            eof: r.eof,
        })
        .map_err(Self::rpc_err(name, &target(cid, exec_id)))
    }

    fn resize(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), AgentError> {
        let req = ResizeTtyRequest {
            container_id: cid.to_owned(),
            exec_id: exec_id.to_owned(),
            rows,
            cols,
            ..Default::default()
        };
        self.rt
            .block_on(self.client.resize_tty(self.ctx(), &req))
            .map(drop)
            .map_err(Self::rpc_err("ResizeTty", &target(cid, exec_id)))
    }

    fn list_processes(&self, cid: &str) -> Result<Vec<u32>, AgentError> {
        let req = ContainerRequest {
            container_id: cid.to_owned(),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.list_processes(self.ctx(), &req))
            .map(|r| r.pids)
            .map_err(Self::rpc_err("ListProcesses", cid))
    }

    fn remove_container(&self, cid: &str) -> Result<(), AgentError> {
        let req = ContainerRequest {
            container_id: cid.to_owned(),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.remove_container(self.ctx(), &req))
            .map(drop)
            .map_err(Self::rpc_err("RemoveContainer", cid))
    }

    fn pause(&self, cid: &str) -> Result<(), AgentError> {
        self.rt
            .block_on(self.client.pause_container(self.ctx(), &container_req(cid)))
            .map(drop)
            .map_err(Self::rpc_err("PauseContainer", cid))
    }

    fn resume(&self, cid: &str) -> Result<(), AgentError> {
        self.rt
            .block_on(
                self.client
                    .resume_container(self.ctx(), &container_req(cid)),
            )
            .map(drop)
            .map_err(Self::rpc_err("ResumeContainer", cid))
    }

    fn update_resources(&self, cid: &str, resources_json: &[u8]) -> Result<(), AgentError> {
        let req = UpdateResourcesRequest {
            container_id: cid.to_owned(),
            resources_json: resources_json.to_vec(),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.update_resources(self.ctx(), &req))
            .map(drop)
            .map_err(Self::rpc_err("UpdateResources", cid))
    }

    fn stats(&self, cid: &str) -> Result<ContainerStats, AgentError> {
        self.rt
            .block_on(self.client.stats(self.ctx(), &container_req(cid)))
            .map_err(Self::rpc_err("Stats", cid))
    }

    fn next_oom_event(&self) -> Result<String, AgentError> {
        self.rt
            .block_on(self.client.get_oom_event(
                ttrpc::context::Context::default(),
                &carapace_protocol::agent::Empty::default(),
            ))
            .map(|e| e.container_id)
            .map_err(Self::rpc_err("GetOomEvent", "the sandbox"))
    }

    fn destroy_sandbox(&self, id: &str) -> Result<(), AgentError> {
        let req = DestroySandboxRequest {
            sandbox_id: id.to_owned(),
            ..Default::default()
        };
        self.rt
            .block_on(self.client.destroy_sandbox(self.ctx(), &req))
            .map(drop)
            .map_err(Self::rpc_err("DestroySandbox", id))
    }
}
