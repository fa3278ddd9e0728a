//! Talking to the guest agent.
//!
//! [`AgentApi`] is the async interface the sandbox logic uses (one method per agent RPC it
//! needs), [`AgentConnector`] makes one connection attempt. A connection is a [`Session`]:
//! the shim keeps one per VM for the VM's whole life (every container of a pod, every
//! stream and every wait share it: ttrpc multiplexes the calls), and the CLI opens one
//! per command. The real implementation [`TtrpcConnector`]/[`TtrpcAgent`] is
//! `carapace-protocol`'s async ttrpc client, driven by the caller's tokio runtime.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::network::NetworkPlan;
use carapace_protocol::agent::{
    ConfigureNetworkRequest, ContainerRequest, CreateContainerRequest, CreateSandboxRequest,
    DestroySandboxRequest, ExecProcessRequest, IpAddress, Neighbor, NetInterface, ProcessRequest,
    ReadStreamRequest, ResizeTtyRequest, Route, SharedFs, SignalRequest, UpdateResourcesRequest,
    WriteStdinRequest,
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
        source: RpcFailure,
    },
    /// A fake agent's injected failure (tests).
    #[error("{0}")]
    Other(String),
}

/// Why an agent request failed, as ttrpc reported it. A status the agent sent back reads
/// as its code and message (`INVALID_ARGUMENT: ...`), not as ttrpc's debug dump of the
/// status message.
#[derive(Debug)]
pub struct RpcFailure(pub ttrpc::Error);

impl std::fmt::Display for RpcFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ttrpc::Error::RpcStatus(s) => write!(f, "{:?}: {}", s.code(), s.message()),
            other => write!(f, "{other}"),
        }
    }
}

impl std::error::Error for RpcFailure {}

impl AgentError {
    /// Whether the agent gave no verdict at all: unreachable, the connection broken, or the
    /// request's deadline passed (any failure but a status the agent sent back).
    pub fn is_unanswered(&self) -> bool {
        !matches!(
            self,
            AgentError::Rpc {
                source: RpcFailure(ttrpc::Error::RpcStatus(_)),
                ..
            }
        )
    }

    /// Whether the agent refused because its target is not in a state for the request
    /// (FAILED_PRECONDITION), e.g. a signal for a process that has already exited.
    pub fn is_wrong_state(&self) -> bool {
        matches!(
            self,
            AgentError::Rpc { source: RpcFailure(ttrpc::Error::RpcStatus(s)), .. }
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
#[async_trait::async_trait]
pub trait AgentApi: Send + Sync {
    /// Sets up the sandbox: hostname and shares.
    async fn create_sandbox(
        &self,
        id: &str,
        hostname: &str,
        shares: &[Share],
    ) -> Result<(), AgentError>;
    /// Creates a container from a guest-path spec (JSON).
    async fn create_container(&self, cid: &str, spec_json: &[u8]) -> Result<(), AgentError>;
    /// Starts the container's init; returns its guest pid.
    async fn start_container(&self, cid: &str) -> Result<u32, AgentError>;
    /// Starts an extra process (OCI `process` JSON); returns its guest pid.
    async fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<u32, AgentError>;
    /// Sends a signal.
    async fn signal(
        &self,
        cid: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError>;
    /// Waits (unbounded) for a process to exit.
    async fn wait(&self, cid: &str, exec_id: &str) -> Result<ExitInfo, AgentError>;
    /// Writes to a process's stdin; returns the bytes taken.
    async fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8])
    -> Result<usize, AgentError>;
    /// Closes a process's stdin.
    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<(), AgentError>;
    /// Reads the next chunk of output (waits for data or end).
    async fn read(&self, cid: &str, exec_id: &str, stream: Stream) -> Result<Chunk, AgentError>;
    /// Resizes a process's terminal.
    async fn resize(
        &self,
        cid: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError>;
    /// Guest pids of the container's processes.
    async fn list_processes(&self, cid: &str) -> Result<Vec<u32>, AgentError>;
    /// Removes a stopped container.
    async fn remove_container(&self, cid: &str) -> Result<(), AgentError>;
    /// Stops every container and powers the VM off.
    async fn destroy_sandbox(&self, id: &str) -> Result<(), AgentError>;
    /// Gives the guest the pod's network: interfaces (found by MAC), routes, neighbours.
    async fn configure_network(&self, plan: &NetworkPlan) -> Result<(), AgentError>;
    /// Freezes every process of a running container (cgroup freezer).
    async fn pause(&self, cid: &str) -> Result<(), AgentError>;
    /// Thaws a paused container.
    async fn resume(&self, cid: &str) -> Result<(), AgentError>;
    /// Applies an OCI `linux.resources` object (JSON) to the container's cgroup.
    async fn update_resources(&self, cid: &str, resources_json: &[u8]) -> Result<(), AgentError>;
    /// The container's cgroup statistics.
    async fn stats(&self, cid: &str) -> Result<ContainerStats, AgentError>;
    /// Waits (unbounded) for the next OOM kill in any container of the VM; returns the
    /// container's id.
    async fn next_oom_event(&self) -> Result<String, AgentError>;
    /// Makes `count` vCPUs online in the guest (cpu0 included); returns how many are.
    async fn set_online_cpus(&self, count: u32) -> Result<u32, AgentError>;
}

/// A connection to one agent, shared by everything that talks to that VM.
pub type Session = Arc<dyn AgentApi>;

/// Makes one connection attempt to an agent.
#[async_trait::async_trait]
pub trait AgentConnector: Send + Sync + std::fmt::Debug {
    /// Connects through `socket` within `timeout`.
    async fn connect(&self, socket: &Path, timeout: Duration) -> Result<Session, AgentError>;
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
    timeout: Duration,
}

impl std::fmt::Debug for TtrpcAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtrpcAgent")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl AgentConnector for TtrpcConnector {
    async fn connect(&self, socket: &Path, timeout: Duration) -> Result<Session, AgentError> {
        let connected = match self.transport {
            Transport::HybridVsock => client::connect_hybrid_vsock(socket, timeout).await,
            Transport::Unix => client::connect_unix(socket, timeout).await,
        };
        let (client, info) = connected.map_err(|source| AgentError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        tracing::debug!(agent_version = info.agent_version, "connected to agent");
        Ok(Arc::new(TtrpcAgent {
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
            source: RpcFailure(source),
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

/// The agent's form of a network plan (the wire contract is the protocol's).
pub fn network_request(plan: &NetworkPlan) -> ConfigureNetworkRequest {
    let text = |ip: Option<std::net::IpAddr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
    ConfigureNetworkRequest {
        interfaces: plan
            .interfaces
            .iter()
            .map(|i| NetInterface {
                mac: carapace_vm_config::format_mac(&i.mac),
                name: i.name.clone(),
                mtu: i.mtu,
                addresses: i
                    .addresses
                    .iter()
                    .map(|(ip, len)| IpAddress {
                        address: ip.to_string(),
                        prefix_len: u32::from(*len),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        routes: plan
            .routes
            .iter()
            .map(|r| Route {
                destination: r
                    .destination
                    .map(|(ip, len)| format!("{ip}/{len}"))
                    .unwrap_or_default(),
                gateway: text(r.gateway),
                device: r.device.clone(),
                source: text(r.source),
                scope: u32::from(r.scope),
                ..Default::default()
            })
            .collect(),
        neighbors: plan
            .neighbors
            .iter()
            .map(|n| Neighbor {
                ip: n.address.to_string(),
                mac: carapace_vm_config::format_mac(&n.mac),
                device: n.device.clone(),
                ..Default::default()
            })
            .collect(),
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

#[async_trait::async_trait]
impl AgentApi for TtrpcAgent {
    async fn create_sandbox(
        &self,
        id: &str,
        hostname: &str,
        shares: &[Share],
    ) -> Result<(), AgentError> {
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
        self.client
            .create_sandbox(self.ctx(), &req)
            .await
            .map(drop)
            .map_err(Self::rpc_err("CreateSandbox", id))
    }

    async fn create_container(&self, cid: &str, spec_json: &[u8]) -> Result<(), AgentError> {
        let req = CreateContainerRequest {
            container_id: cid.to_owned(),
            spec_json: spec_json.to_vec(),
            ..Default::default()
        };
        self.client
            .create_container(self.ctx(), &req)
            .await
            .map(drop)
            .map_err(Self::rpc_err("CreateContainer", cid))
    }

    async fn start_container(&self, cid: &str) -> Result<u32, AgentError> {
        let req = ContainerRequest {
            container_id: cid.to_owned(),
            ..Default::default()
        };
        self.client
            .start_container(self.ctx(), &req)
            .await
            .map(|r| r.pid)
            .map_err(Self::rpc_err("StartContainer", cid))
    }

    async fn exec_process(
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
        self.client
            .exec_process(self.ctx(), &req)
            .await
            .map(|r| r.pid)
            .map_err(Self::rpc_err("ExecProcess", &target(cid, exec_id)))
    }

    async fn signal(
        &self,
        cid: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalRequest {
            container_id: cid.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        self.client
            .signal_process(self.ctx(), &req)
            .await
            .map(drop)
            .map_err(Self::rpc_err("SignalProcess", &target(cid, exec_id)))
    }

    async fn wait(&self, cid: &str, exec_id: &str) -> Result<ExitInfo, AgentError> {
        self.client
            .wait_process(ttrpc::context::Context::default(), &proc_req(cid, exec_id))
            .await
            .map(|r| ExitInfo {
                exit_code: r.exit_code,
                signal: r.signal,
                exit_status: r.exit_status,
            })
            .map_err(Self::rpc_err("WaitProcess", &target(cid, exec_id)))
    }

    async fn write_stdin(
        &self,
        cid: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, AgentError> {
        let data = &data[..data.len().min(carapace_protocol::MAX_WRITE_CHUNK)];
        let req = WriteStdinRequest {
            container_id: cid.to_owned(),
            exec_id: exec_id.to_owned(),
            data: data.to_vec(),
            ..Default::default()
        };
        self.client
            .write_stdin(self.ctx(), &req)
            .await
            .map(|r| (r.len as usize).min(data.len()))
            .map_err(Self::rpc_err("WriteStdin", &target(cid, exec_id)))
    }

    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<(), AgentError> {
        self.client
            .close_stdin(self.ctx(), &proc_req(cid, exec_id))
            .await
            .map(drop)
            .map_err(Self::rpc_err("CloseStdin", &target(cid, exec_id)))
    }

    async fn read(&self, cid: &str, exec_id: &str, stream: Stream) -> Result<Chunk, AgentError> {
        let req = ReadStreamRequest {
            container_id: cid.to_owned(),
            exec_id: exec_id.to_owned(),
            max_len: 64 * 1024,
            ..Default::default()
        };
        let ctx = ttrpc::context::Context::default();
        let (name, res) = match stream {
            Stream::Stdout => ("ReadStdout", self.client.read_stdout(ctx, &req).await),
            Stream::Stderr => ("ReadStderr", self.client.read_stderr(ctx, &req).await),
        };
        res.map(|r| Chunk {
            data: r.data,
            eof: r.eof,
        })
        .map_err(Self::rpc_err(name, &target(cid, exec_id)))
    }

    async fn resize(
        &self,
        cid: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let req = ResizeTtyRequest {
            container_id: cid.to_owned(),
            exec_id: exec_id.to_owned(),
            rows,
            cols,
            ..Default::default()
        };
        self.client
            .resize_tty(self.ctx(), &req)
            .await
            .map(drop)
            .map_err(Self::rpc_err("ResizeTty", &target(cid, exec_id)))
    }

    async fn list_processes(&self, cid: &str) -> Result<Vec<u32>, AgentError> {
        let req = ContainerRequest {
            container_id: cid.to_owned(),
            ..Default::default()
        };
        self.client
            .list_processes(self.ctx(), &req)
            .await
            .map(|r| r.pids)
            .map_err(Self::rpc_err("ListProcesses", cid))
    }

    async fn remove_container(&self, cid: &str) -> Result<(), AgentError> {
        let req = ContainerRequest {
            container_id: cid.to_owned(),
            ..Default::default()
        };
        self.client
            .remove_container(self.ctx(), &req)
            .await
            .map(drop)
            .map_err(Self::rpc_err("RemoveContainer", cid))
    }

    async fn pause(&self, cid: &str) -> Result<(), AgentError> {
        self.client
            .pause_container(self.ctx(), &container_req(cid))
            .await
            .map(drop)
            .map_err(Self::rpc_err("PauseContainer", cid))
    }

    async fn resume(&self, cid: &str) -> Result<(), AgentError> {
        self.client
            .resume_container(self.ctx(), &container_req(cid))
            .await
            .map(drop)
            .map_err(Self::rpc_err("ResumeContainer", cid))
    }

    async fn update_resources(&self, cid: &str, resources_json: &[u8]) -> Result<(), AgentError> {
        let req = UpdateResourcesRequest {
            container_id: cid.to_owned(),
            resources_json: resources_json.to_vec(),
            ..Default::default()
        };
        self.client
            .update_resources(self.ctx(), &req)
            .await
            .map(drop)
            .map_err(Self::rpc_err("UpdateResources", cid))
    }

    async fn stats(&self, cid: &str) -> Result<ContainerStats, AgentError> {
        self.client
            .stats(self.ctx(), &container_req(cid))
            .await
            .map_err(Self::rpc_err("Stats", cid))
    }

    async fn next_oom_event(&self) -> Result<String, AgentError> {
        self.client
            .get_oom_event(
                ttrpc::context::Context::default(),
                &carapace_protocol::agent::Empty::default(),
            )
            .await
            .map(|e| e.container_id)
            .map_err(Self::rpc_err("GetOomEvent", "the sandbox"))
    }

    async fn set_online_cpus(&self, count: u32) -> Result<u32, AgentError> {
        let req = carapace_protocol::agent::SetOnlineCpusRequest {
            count,
            ..Default::default()
        };
        self.client
            .set_online_cpus(self.ctx(), &req)
            .await
            .map(|r| r.online)
            .map_err(Self::rpc_err("SetOnlineCpus", "the sandbox"))
    }

    async fn configure_network(&self, plan: &NetworkPlan) -> Result<(), AgentError> {
        self.client
            .configure_network(self.ctx(), &network_request(plan))
            .await
            .map(drop)
            .map_err(Self::rpc_err("ConfigureNetwork", "the sandbox"))
    }

    async fn destroy_sandbox(&self, id: &str) -> Result<(), AgentError> {
        let req = DestroySandboxRequest {
            sandbox_id: id.to_owned(),
            ..Default::default()
        };
        self.client
            .destroy_sandbox(self.ctx(), &req)
            .await
            .map(drop)
            .map_err(Self::rpc_err("DestroySandbox", id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{PlannedInterface, PlannedNeighbor, PlannedRoute};

    #[test]
    fn an_agent_status_reads_as_its_code_and_message() {
        let e = AgentError::Rpc {
            method: "CreateContainer",
            target: "c1".into(),
            source: RpcFailure(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                "process.args[0] \"nope\" not found in the rootfs",
            ))),
        };
        let text = carapace_errors::chain(&e);
        assert_eq!(
            text,
            "agent request CreateContainer for c1 failed: INVALID_ARGUMENT: process.args[0] \"nope\" not found in the rootfs"
        );
        assert!(!text.contains("special_fields") && !text.contains("Status {"));
        assert!(!e.is_unanswered());
        let broken = RpcFailure(ttrpc::Error::RemoteClosed);
        assert!(!broken.to_string().is_empty());
    }

    #[test]
    fn a_network_plan_becomes_the_agents_request_field_by_field() {
        let plan = NetworkPlan {
            interfaces: vec![PlannedInterface {
                name: "eth0".into(),
                mac: [0x0a, 0x58, 0x0a, 0xd5, 0x00, 0x05],
                mtu: 1450,
                kind: Some("veth".into()),
                addresses: vec![
                    ("10.213.0.5".parse().unwrap(), 16),
                    ("fd00::5".parse().unwrap(), 64),
                ],
            }],
            routes: vec![
                PlannedRoute {
                    destination: Some(("10.99.0.0".parse().unwrap(), 24)),
                    gateway: None,
                    device: "eth0".into(),
                    source: Some("10.213.0.5".parse().unwrap()),
                    scope: 253,
                    metric: None,
                    onlink: false,
                },
                PlannedRoute {
                    destination: None,
                    gateway: Some("10.213.0.1".parse().unwrap()),
                    device: "eth0".into(),
                    source: None,
                    scope: 0,
                    metric: Some(100),
                    onlink: false,
                },
            ],
            neighbors: vec![PlannedNeighbor {
                device: "eth0".into(),
                address: "10.213.0.1".parse().unwrap(),
                mac: [0xee; 6],
            }],
        };
        let r = network_request(&plan);
        let i = &r.interfaces[0];
        assert_eq!(
            (i.mac.as_str(), i.name.as_str(), i.mtu),
            ("0a:58:0a:d5:00:05", "eth0", 1450)
        );
        let addrs: Vec<_> = i
            .addresses
            .iter()
            .map(|a| (a.address.as_str(), a.prefix_len))
            .collect();
        assert_eq!(addrs, [("10.213.0.5", 16), ("fd00::5", 64)]);
        let link = &r.routes[0];
        assert_eq!(
            (
                link.destination.as_str(),
                link.gateway.as_str(),
                link.source.as_str(),
                link.scope
            ),
            ("10.99.0.0/24", "", "10.213.0.5", 253)
        );
        // a default route: no destination, the gateway's family decides
        let default = &r.routes[1];
        assert_eq!(
            (
                default.destination.as_str(),
                default.gateway.as_str(),
                default.device.as_str()
            ),
            ("", "10.213.0.1", "eth0")
        );
        let n = &r.neighbors[0];
        assert_eq!(
            (n.ip.as_str(), n.mac.as_str(), n.device.as_str()),
            ("10.213.0.1", "ee:ee:ee:ee:ee:ee", "eth0")
        );
    }
}
