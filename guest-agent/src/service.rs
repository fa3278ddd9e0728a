//! The ttrpc `Agent` service: converts requests and responses between the wire types of
//! carapace-protocol and [`crate::core`], and maps [`CoreError`] to ttrpc status codes.
//! No logic of its own beyond that.

use std::sync::Arc;

use carapace_protocol::PROTOCOL_VERSION;
use carapace_protocol::agent::*;
use carapace_protocol::agent_ttrpc::Agent;
use ttrpc::r#async::TtrpcContext;

use crate::cgroup::CgroupError;
use crate::core::{self, Core, CoreError};
use crate::network::{self, NetError};
use carapace_errors::chain;

/// The status code of each kind of error. The host relies on FAILED_PRECONDITION meaning
/// "wrong state" (`AgentError::is_wrong_state` in the runtime).
pub fn code(e: &CoreError) -> ttrpc::Code {
    use ttrpc::Code;
    match e {
        CoreError::Id(_) | CoreError::Invalid { .. } => Code::INVALID_ARGUMENT,
        CoreError::NoContainer(_) | CoreError::NoSandbox(_) | CoreError::NoProcess { .. } => {
            Code::NOT_FOUND
        }
        CoreError::Exists { .. } => Code::ALREADY_EXISTS,
        CoreError::State(_)
        | CoreError::BeingCreated(_)
        | CoreError::Process { .. }
        | CoreError::HostMode(_) => Code::FAILED_PRECONDITION,
        CoreError::Cgroup(CgroupError::Unavailable) => Code::UNAVAILABLE,
        CoreError::Cgroup(CgroupError::Invalid { .. }) => Code::INVALID_ARGUMENT,
        CoreError::Order(_) => Code::FAILED_PRECONDITION,
        CoreError::Network(NetError::Invalid { .. }) => Code::INVALID_ARGUMENT,
        CoreError::Network(NetError::Precondition { .. }) => Code::FAILED_PRECONDITION,
        CoreError::Cpus(crate::cpus::CpuError::OutOfRange { .. }) => Code::INVALID_ARGUMENT,
        CoreError::Spawn(_)
        | CoreError::Cgroup(_)
        | CoreError::Io { .. }
        | CoreError::Cpus(_)
        | CoreError::Network(NetError::Netlink { .. } | NetError::Socket(_)) => Code::INTERNAL,
    }
}

/// ConfigureNetwork's request as the core's plain data (checked there).
fn network_request(req: ConfigureNetworkRequest) -> network::NetworkRequest {
    use network::model::{AddressRequest, InterfaceRequest, NeighborRequest, RouteRequest};
    network::NetworkRequest {
        interfaces: req
            .interfaces
            .into_iter()
            .map(|i| InterfaceRequest {
                mac: i.mac,
                name: i.name,
                mtu: i.mtu,
                addresses: i
                    .addresses
                    .into_iter()
                    .map(|a| AddressRequest {
                        address: a.address,
                        prefix_len: a.prefix_len,
                    })
                    .collect(),
            })
            .collect(),
        routes: req
            .routes
            .into_iter()
            .map(|r| RouteRequest {
                destination: r.destination,
                gateway: r.gateway,
                device: r.device,
                source: r.source,
                scope: r.scope,
            })
            .collect(),
        neighbors: req
            .neighbors
            .into_iter()
            .map(|n| NeighborRequest {
                ip: n.ip,
                mac: n.mac,
                device: n.device,
            })
            .collect(),
    }
}

/// A core error as a ttrpc status: its code and the whole error chain (logged).
fn status(e: CoreError) -> ttrpc::Error {
    let text = chain(&e);
    tracing::warn!(error = %text, "request failed");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code(&e), text))
}

type Reply<T> = ttrpc::Result<T>;

fn reply<T, U>(r: core::Result<T>, to_wire: impl FnOnce(T) -> U) -> Reply<U> {
    r.map(to_wire).map_err(status)
}

fn empty(r: core::Result<()>) -> Reply<Empty> {
    reply(r, |()| Empty::new())
}

fn started(pid: core::Result<u32>) -> Reply<StartResponse> {
    reply(pid, |pid| StartResponse {
        pid,
        ..Default::default()
    })
}

fn chunk(r: core::Result<core::Chunk>) -> Reply<ReadStreamResponse> {
    reply(r, |c| ReadStreamResponse {
        data: c.data,
        eof: c.eof,
        ..Default::default()
    })
}

/// The ttrpc face of a [`Core`].
#[derive(Debug, Clone)]
pub struct AgentService {
    core: Arc<Core>,
}

impl AgentService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[async_trait::async_trait]
impl Agent for AgentService {
    async fn version(&self, _ctx: &TtrpcContext, req: VersionRequest) -> Reply<VersionResponse> {
        if req.host_protocol_version != PROTOCOL_VERSION {
            tracing::warn!(
                host = req.host_protocol_version,
                agent = PROTOCOL_VERSION,
                "protocol version mismatch"
            );
        }
        Ok(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        })
    }

    async fn create_sandbox(&self, _ctx: &TtrpcContext, req: CreateSandboxRequest) -> Reply<Empty> {
        let spec = core::SandboxSpec {
            id: req.sandbox_id,
            hostname: req.hostname,
            shares: req
                .shares
                .into_iter()
                .map(|s| core::Share {
                    tag: s.tag,
                    mount_point: s.mount_point,
                    read_only: s.read_only,
                })
                .collect(),
            sysctls: req.sysctls.into_iter().collect(),
        };
        empty(self.core.create_sandbox(&spec).await)
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> Reply<Empty> {
        empty(self.core.configure_network(&network_request(req)).await)
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> Reply<Empty> {
        empty(self.core.destroy_sandbox(&req.sandbox_id).await)
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> Reply<Empty> {
        empty(
            self.core
                .create_container(&req.container_id, &req.spec_json)
                .await,
        )
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> Reply<StartResponse> {
        started(self.core.start_container(&req.container_id).await)
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        empty(self.core.remove_container(&req.container_id).await)
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        empty(self.core.pause_container(&req.container_id).await)
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        empty(self.core.resume_container(&req.container_id).await)
    }

    async fn update_resources(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateResourcesRequest,
    ) -> Reply<Empty> {
        empty(
            self.core
                .update_resources(&req.container_id, &req.resources_json),
        )
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<StatsResponse> {
        reply(
            self.core.with_cgroup(&req.container_id, |cg| cg.stats()),
            |s| s,
        )
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> Reply<ListProcessesResponse> {
        reply(self.core.list_processes(&req.container_id), |pids| {
            ListProcessesResponse {
                pids,
                ..Default::default()
            }
        })
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> Reply<OomEvent> {
        Ok(OomEvent {
            container_id: self.core.next_oom_event().await,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> Reply<StartResponse> {
        started(
            self.core
                .exec_process(&req.container_id, &req.exec_id, &req.process_json)
                .await,
        )
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalRequest) -> Reply<Empty> {
        empty(
            self.core
                .signal_process(&req.container_id, &req.exec_id, req.signal, req.all),
        )
    }

    async fn wait_process(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> Reply<WaitResponse> {
        reply(
            self.core
                .wait_process(&req.container_id, &req.exec_id)
                .await,
            |e| WaitResponse {
                exit_code: e.code,
                signal: e.signal,
                exit_status: e.status(),
                ..Default::default()
            },
        )
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStdinRequest,
    ) -> Reply<WriteStdinResponse> {
        reply(
            self.core
                .write_stdin(&req.container_id, &req.exec_id, &req.data)
                .await,
            |n| WriteStdinResponse {
                // At most MAX_WRITE_CHUNK (2 MiB).
                len: u32::try_from(n).unwrap_or(u32::MAX),
                ..Default::default()
            },
        )
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> Reply<Empty> {
        empty(self.core.close_stdin(&req.container_id, &req.exec_id).await)
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> Reply<ReadStreamResponse> {
        chunk(
            self.core
                .read_output(
                    &req.container_id,
                    &req.exec_id,
                    core::Stream::Stdout,
                    req.max_len,
                )
                .await,
        )
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> Reply<ReadStreamResponse> {
        chunk(
            self.core
                .read_output(
                    &req.container_id,
                    &req.exec_id,
                    core::Stream::Stderr,
                    req.max_len,
                )
                .await,
        )
    }

    async fn resize_tty(&self, _ctx: &TtrpcContext, req: ResizeTtyRequest) -> Reply<Empty> {
        empty(
            self.core
                .resize_tty(&req.container_id, &req.exec_id, req.rows, req.cols),
        )
    }

    async fn set_guest_time(&self, _ctx: &TtrpcContext, req: SetTimeRequest) -> Reply<Empty> {
        empty(self.core.set_guest_time(req.sec, req.nsec))
    }

    async fn set_online_cpus(
        &self,
        _ctx: &TtrpcContext,
        req: SetOnlineCpusRequest,
    ) -> Reply<SetOnlineCpusResponse> {
        let online = self.core.set_online_cpus(req.count).await.map_err(status)?;
        Ok(SetOnlineCpusResponse {
            online,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{CState, Op, StateError};
    use nix::sys::signal::Signal;
    use ttrpc::Code;

    fn io() -> std::io::Error {
        std::io::Error::other("boom")
    }

    #[test]
    fn every_error_kind_keeps_its_status_code() {
        let cases: Vec<(CoreError, Code)> = vec![
            (
                CoreError::Id(crate::ids::IdError::Escapes {
                    path: "../x".into(),
                    root: "/r".into(),
                }),
                Code::INVALID_ARGUMENT,
            ),
            (
                CoreError::Invalid {
                    field: "f",
                    reason: "r".into(),
                },
                Code::INVALID_ARGUMENT,
            ),
            (CoreError::NoContainer("c".into()), Code::NOT_FOUND),
            (CoreError::NoSandbox("s".into()), Code::NOT_FOUND),
            (
                CoreError::NoProcess {
                    container_id: "c".into(),
                    exec_id: "e".into(),
                },
                Code::NOT_FOUND,
            ),
            (
                CoreError::Exists {
                    what: "container",
                    id: "c".into(),
                },
                Code::ALREADY_EXISTS,
            ),
            (
                CoreError::State(StateError {
                    id: "c".into(),
                    state: CState::Stopped,
                    op: Op::Start,
                }),
                Code::FAILED_PRECONDITION,
            ),
            (
                CoreError::BeingCreated("c".into()),
                Code::FAILED_PRECONDITION,
            ),
            (
                CoreError::HostMode("SetGuestTime"),
                Code::FAILED_PRECONDITION,
            ),
            (
                CoreError::Cgroup(CgroupError::Unavailable),
                Code::UNAVAILABLE,
            ),
            (
                CoreError::Cgroup(CgroupError::Invalid {
                    field: "f",
                    reason: "r".into(),
                }),
                Code::INVALID_ARGUMENT,
            ),
            (
                CoreError::Spawn(crate::process::SpawnError::Setup("x".into())),
                Code::INTERNAL,
            ),
            (
                CoreError::Io {
                    op: "op".into(),
                    source: io(),
                },
                Code::INTERNAL,
            ),
            (
                CoreError::HostMode("ConfigureNetwork"),
                Code::FAILED_PRECONDITION,
            ),
            (
                CoreError::Order("ConfigureNetwork needs a sandbox"),
                Code::FAILED_PRECONDITION,
            ),
            (
                CoreError::Network(NetError::invalid("interfaces[1].mtu", "70000")),
                Code::INVALID_ARGUMENT,
            ),
            (
                CoreError::Network(NetError::Precondition {
                    field: "interfaces[0].mac".into(),
                    reason: "no link has MAC 02:00:00:00:00:05".into(),
                }),
                Code::FAILED_PRECONDITION,
            ),
            (
                CoreError::Network(NetError::Netlink {
                    step: "adding 10.88.0.5/16 to eth0".into(),
                    reason: "File exists".into(),
                }),
                Code::INTERNAL,
            ),
            (CoreError::Network(NetError::Socket(io())), Code::INTERNAL),
        ];
        for (e, want) in cases {
            assert_eq!(code(&e), want, "{e}");
        }
    }

    #[test]
    fn the_status_carries_the_whole_chain() {
        let ttrpc::Error::RpcStatus(s) = status(CoreError::Io {
            op: "writing stdin".into(),
            source: io(),
        }) else {
            panic!("not a status");
        };
        assert_eq!(s.code(), Code::INTERNAL);
        assert_eq!(s.message(), "writing stdin: boom");
    }

    #[test]
    fn a_process_reaped_before_the_signal_is_already_stopped() {
        // The race: the agent still had the process as live, the reaper had collected it.
        let e = crate::core::kill_error("c1", 36, Signal::SIGKILL, nix::Error::ESRCH);
        assert_eq!(code(&e), Code::FAILED_PRECONDITION, "{e}");
        assert!(e.to_string().contains("stopped"), "{e}");
        let e = crate::core::kill_error("c1", 36, Signal::SIGKILL, nix::Error::EPERM);
        assert_eq!(code(&e), Code::INTERNAL, "{e}");
        assert!(e.to_string().contains("kill(36, SIGKILL)"), "{e}");
    }

    /// The generated trait answers an RPC it has no implementation for with NOT_FOUND
    /// "... is not supported", which a host would read as "no such container": every RPC
    /// of the proto must be implemented here.
    #[test]
    fn every_rpc_of_the_proto_is_implemented() {
        let proto = include_str!("../protocol/proto/agent.proto");
        let this = include_str!("service.rs");
        let rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .map(str::trim)
            .collect();
        assert!(rpcs.len() >= 20, "rpcs parsed from agent.proto: {rpcs:?}");
        for rpc in rpcs {
            let mut snake = String::new();
            for (i, c) in rpc.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_lowercase());
            }
            assert!(
                this.contains(&format!("async fn {snake}(")),
                "{rpc} is left on the generated default (NOT_FOUND): implement it, or \
                 answer UNIMPLEMENTED explicitly"
            );
        }
    }

    fn status_code(e: ttrpc::Error) -> Code {
        match e {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[tokio::test]
    async fn configure_network_through_the_service() {
        use crate::core::Mode;
        use crate::core::tests::core;
        let ctx = TtrpcContext::default();
        let req = ConfigureNetworkRequest {
            interfaces: vec![NetInterface {
                mac: "02:00:00:00:00:05".into(),
                name: "eth0".into(),
                mtu: 1400,
                addresses: vec![IpAddress {
                    address: "10.88.0.5".into(),
                    prefix_len: 33,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            routes: vec![Route {
                gateway: "10.88.0.1".into(),
                scope: 253,
                ..Default::default()
            }],
            neighbors: vec![Neighbor {
                ip: "10.88.0.1".into(),
                mac: "02:00:00:00:00:01".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        // Every field reaches the core (the conversion drops nothing).
        let plain = network_request(req.clone());
        let i = &plain.interfaces[0];
        assert_eq!(
            (i.mac.as_str(), i.name.as_str(), i.mtu),
            ("02:00:00:00:00:05", "eth0", 1400)
        );
        assert_eq!(
            (i.addresses[0].address.as_str(), i.addresses[0].prefix_len),
            ("10.88.0.5", 33)
        );
        assert_eq!(
            (plain.routes[0].gateway.as_str(), plain.routes[0].scope),
            ("10.88.0.1", 253)
        );
        assert_eq!(plain.neighbors[0].device, "eth0");
        // In the guest, a bad field is INVALID_ARGUMENT naming it (refused before netlink).
        let guest = AgentService::new(core(Mode::Guest));
        let e = guest
            .configure_network(&ctx, req.clone())
            .await
            .unwrap_err();
        let ttrpc::Error::RpcStatus(s) = e else {
            panic!("not a status")
        };
        assert_eq!(s.code(), Code::INVALID_ARGUMENT);
        assert_eq!(
            s.message(),
            "interfaces[0].addresses[0].prefix_len: 33 is longer than an IPv4 prefix (32)"
        );
        let host = AgentService::new(core(Mode::Host));
        let e = host.configure_network(&ctx, req).await.unwrap_err();
        assert_eq!(status_code(e), Code::FAILED_PRECONDITION);
    }

    #[tokio::test]
    async fn set_guest_time_through_the_service() {
        use crate::core::Mode;
        use crate::core::tests::{CLOCK, core};
        let ctx = TtrpcContext::default();
        let req = |sec, nsec| SetTimeRequest {
            sec,
            nsec,
            ..Default::default()
        };
        let guest = AgentService::new(core(Mode::Guest));
        guest
            .set_guest_time(&ctx, req(1_900_000_002, 7))
            .await
            .unwrap();
        assert!(CLOCK.lock().unwrap().contains(&(1_900_000_002, 7)));
        let e = guest
            .set_guest_time(&ctx, req(1, 1_000_000_000))
            .await
            .unwrap_err();
        assert_eq!(status_code(e), Code::INVALID_ARGUMENT);
        let host = AgentService::new(core(Mode::Host));
        let e = host.set_guest_time(&ctx, req(1, 0)).await.unwrap_err();
        assert_eq!(status_code(e), Code::FAILED_PRECONDITION);
    }

    #[tokio::test]
    async fn set_online_cpus_through_the_service() {
        use crate::core::Mode;
        use crate::core::tests::core_with_cpus;
        let ctx = TtrpcContext::default();
        let req = |count| SetOnlineCpusRequest {
            count,
            ..Default::default()
        };
        let (guest, _dir) = core_with_cpus(Mode::Guest, 3);
        let guest = AgentService::new(guest);
        let answer = guest.set_online_cpus(&ctx, req(3)).await.unwrap();
        assert_eq!(answer.online, 3);
        let e = guest.set_online_cpus(&ctx, req(0)).await.unwrap_err();
        assert_eq!(status_code(e), Code::INVALID_ARGUMENT);
        let (host, _dir) = core_with_cpus(Mode::Host, 3);
        let e = AgentService::new(host)
            .set_online_cpus(&ctx, req(2))
            .await
            .unwrap_err();
        assert_eq!(status_code(e), Code::FAILED_PRECONDITION);
    }
}
