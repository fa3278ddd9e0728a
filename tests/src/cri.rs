//! A small blocking client of the Kubernetes CRI (v1) on a containerd socket, for the
//! pod end-to-end tests and the `pod_start` benchmark: what the kubelet does to run a pod,
//! reduced to the calls those need.
//!
//! The protocol types and gRPC stubs come from the `k8s-cri` crate (generated from the
//! upstream `api.proto` with tonic); this module adds a unix-socket channel, a current-thread
//! tokio runtime so callers stay synchronous, and errors that say which call failed.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

mod stats;
pub use k8s_cri::v1::LinuxContainerResources;
pub use stats::{Usage, limits};

/// Errors from CRI calls.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The async runtime could not be built.
    #[error("cannot build the tokio runtime for the CRI client")]
    Runtime(#[source] std::io::Error),
    /// Connecting to the socket failed.
    #[error("cannot connect to the CRI socket {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call returned an error status.
    #[error("CRI {call} failed: {code:?}: {message}")]
    Call {
        /// Which call, with its subject.
        call: String,
        /// The gRPC code.
        code: tonic::Code,
        /// The runtime's message.
        message: String,
    },
    /// A reply lacked a field the protocol promises.
    #[error("CRI {call}: the reply has no {field}")]
    Incomplete {
        /// Which call.
        call: String,
        /// The missing field.
        field: &'static str,
    },
    /// A container did not reach the wanted state in time.
    #[error("container {id} did not exit within {secs} s (state {state})")]
    Timeout {
        /// The container.
        id: String,
        /// How long we waited.
        secs: u64,
        /// Its last state.
        state: String,
    },
    /// Reading a container log failed.
    #[error("cannot read the container log {path}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn call_err(call: impl Into<String>) -> impl FnOnce(tonic::Status) -> CriError {
    let call = call.into();
    move |s| CriError::Call {
        call,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// A pod to run: what [`Cri::run_pod`] needs.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Pod name (also its uid, suffixed).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// CRI runtime handler (`carapace`, `runc`).
    pub handler: String,
    /// Directory the container logs go to (created).
    pub log_dir: PathBuf,
    /// A privileged pod (its containers may then be privileged too).
    pub privileged: bool,
    /// The pod's network.
    pub network: PodNetwork,
}

/// Which network a pod gets (default: its own, as a kubelet's pods).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetwork {
    /// The node's (a kubelet's hostNetwork pod; a VM cannot share it: Carapace refuses).
    Host,
    /// Its own, set up by the CNI configuration of the containerd (a kubelet's default),
    /// with these (container port, host port) TCP mappings.
    Cni {
        /// hostPort mappings: (container port, host port).
        ports: Vec<(u16, u16)>,
    },
}

impl Default for PodNetwork {
    fn default() -> Self {
        PodNetwork::Cni { ports: Vec::new() }
    }
}

impl PodSpec {
    /// The CRI sandbox configuration: the pod's network, pod-wide pid and ipc namespaces as
    /// a kubelet would ask for.
    pub fn config(&self) -> cri::PodSandboxConfig {
        let (network, hostname, port_mappings) = match &self.network {
            // No hostname: with the host network there is no private UTS namespace to set
            // it in (runc refuses), as for a kubelet's hostNetwork pod.
            PodNetwork::Host => (cri::NamespaceMode::Node, String::new(), Vec::new()),
            PodNetwork::Cni { ports } => (
                cri::NamespaceMode::Pod,
                self.name.clone(),
                ports
                    .iter()
                    .map(|&(container, host)| cri::PortMapping {
                        protocol: cri::Protocol::Tcp as i32,
                        container_port: i32::from(container),
                        host_port: i32::from(host),
                        host_ip: String::new(),
                    })
                    .collect(),
            ),
        };
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name.clone(),
                uid: format!("{}-uid", self.name),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname,
            port_mappings,
            log_directory: self.log_dir.to_string_lossy().into_owned(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: network as i32,
                        pid: cri::NamespaceMode::Pod as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    privileged: self.privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A container to create in a pod.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Container name.
    pub name: String,
    /// Image reference (already present in containerd's `k8s.io` namespace).
    pub image: String,
    /// Command (entrypoint) and its arguments.
    pub command: Vec<String>,
    /// Host directory -> container path bind mounts (what emptyDir/hostPath become).
    pub mounts: Vec<(PathBuf, String)>,
    /// The same, read-only.
    pub read_only_mounts: Vec<(PathBuf, String)>,
    /// Environment.
    pub env: HashMap<String, String>,
    /// Privileged (all capabilities, no seccomp; the pod must be privileged too).
    pub privileged: bool,
    /// A pid namespace of its own (a kubelet's default) rather than the pod's.
    pub own_pid_namespace: bool,
    /// Resources (CPU quota and period, memory limit, CPU set...) as a kubelet passes a
    /// pod spec's limits.
    pub resources: Option<cri::LinuxContainerResources>,
}

/// A blocking CRI client on one containerd socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl std::fmt::Debug for Cri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cri").finish_non_exhaustive()
    }
}

/// The longest any one CRI call may take (pulls and pod starts under the lab's emulation
/// take seconds to a minute).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

impl Cri {
    /// Connects to the CRI service on containerd's gRPC `socket`.
    pub fn connect(socket: &Path) -> Result<Self, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async {
                // The URI is a placeholder: the connector below always dials the socket.
                // Every call is bounded: a sandbox that never comes up fails its call
                // (DEADLINE_EXCEEDED) instead of holding a test or the bench forever.
                Endpoint::from_static("http://[::]:0")
                    .timeout(CALL_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(s))
                        }
                    }))
                    .await
            })
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// The runtime's name and version (`Version`), e.g. `containerd 1.6.20`.
    pub fn version(&mut self) -> Result<String, CriError> {
        let r = self
            .rt
            .block_on(self.runtime.version(cri::VersionRequest::default()))
            .map_err(call_err("Version"))?
            .into_inner();
        Ok(format!("{} {}", r.runtime_name, r.runtime_version))
    }

    /// Whether the image `reference` is known to CRI (`ImageStatus`).
    pub fn has_image(&mut self, reference: &str) -> Result<bool, CriError> {
        let r = self
            .rt
            .block_on(self.images.image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: reference.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            }))
            .map_err(call_err(format!("ImageStatus {reference}")))?
            .into_inner();
        Ok(r.image.is_some())
    }

    /// `RunPodSandbox`: returns the pod sandbox id.
    pub fn run_pod(&mut self, pod: &PodSpec) -> Result<String, CriError> {
        fs::create_dir_all(&pod.log_dir).map_err(|source| CriError::Log {
            path: pod.log_dir.clone(),
            source,
        })?;
        let r = self
            .rt
            .block_on(self.runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod.config()),
                runtime_handler: pod.handler.clone(),
            }))
            .map_err(call_err(format!("RunPodSandbox {}", pod.name)))?
            .into_inner();
        Ok(r.pod_sandbox_id)
    }

    /// The pod's IP addresses as `PodSandboxStatus` reports them (primary first; none for a
    /// host-network pod).
    pub fn pod_ips(&mut self, pod_id: &str) -> Result<Vec<String>, CriError> {
        let r = self
            .rt
            .block_on(
                self.runtime
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: pod_id.to_owned(),
                        verbose: false,
                    }),
            )
            .map_err(call_err(format!("PodSandboxStatus {pod_id}")))?
            .into_inner();
        let net = r.status.and_then(|s| s.network);
        Ok(net
            .map(|n| {
                std::iter::once(n.ip)
                    .chain(n.additional_ips.into_iter().map(|a| a.ip))
                    .filter(|ip| !ip.is_empty())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `CreateContainer` in pod `pod_id`; returns the container id. Its log goes to
    /// `<pod log dir>/<name>.log`.
    pub fn create_container(
        &mut self,
        pod_id: &str,
        pod: &PodSpec,
        c: &ContainerSpec,
    ) -> Result<String, CriError> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: c.name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: c.image.clone(),
                ..Default::default()
            }),
            command: c.command.clone(),
            envs: c
                .env
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts: c
                .mounts
                .iter()
                .map(|m| (m, false))
                .chain(c.read_only_mounts.iter().map(|m| (m, true)))
                .map(|((host, path), readonly)| cri::Mount {
                    container_path: path.clone(),
                    host_path: host.to_string_lossy().into_owned(),
                    readonly,
                    ..Default::default()
                })
                .collect(),
            log_path: format!("{}.log", c.name),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    privileged: c.privileged,
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: if c.own_pid_namespace {
                            cri::NamespaceMode::Container
                        } else {
                            cri::NamespaceMode::Pod
                        } as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                resources: c.resources.clone(),
            }),
            ..Default::default()
        };
        let r = self
            .rt
            .block_on(self.runtime.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.to_owned(),
                config: Some(config),
                sandbox_config: Some(pod.config()),
            }))
            .map_err(call_err(format!("CreateContainer {}", c.name)))?
            .into_inner();
        Ok(r.container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&mut self, id: &str) -> Result<(), CriError> {
        self.rt
            .block_on(self.runtime.start_container(cri::StartContainerRequest {
                container_id: id.to_owned(),
            }))
            .map_err(call_err(format!("StartContainer {id}")))?;
        Ok(())
    }

    /// `ContainerStatus`: (state name, exit code).
    pub fn container_state(&mut self, id: &str) -> Result<(String, i32), CriError> {
        self.container_reason(id)
            .map(|(state, code, _reason)| (state, code))
    }

    /// Polls `ContainerStatus` until the container exited; returns its exit code.
    pub fn wait_exited(&mut self, id: &str, timeout: Duration) -> Result<i32, CriError> {
        let start = Instant::now();
        loop {
            let (state, code) = self.container_state(id)?;
            if state == cri::ContainerState::ContainerExited.as_str_name() {
                return Ok(code);
            }
            if start.elapsed() > timeout {
                return Err(CriError::Timeout {
                    id: id.to_owned(),
                    secs: timeout.as_secs(),
                    state,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ExecSync`: (exit code, stdout, stderr).
    pub fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<(i32, String, String), CriError> {
        let r = self
            .rt
            .block_on(self.runtime.exec_sync(cri::ExecSyncRequest {
                container_id: id.to_owned(),
                cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
                timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            }))
            .map_err(call_err(format!("ExecSync {id} {cmd:?}")))?
            .into_inner();
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    /// `StopContainer` with a grace period.
    pub fn stop_container(&mut self, id: &str, grace: Duration) -> Result<(), CriError> {
        self.rt
            .block_on(self.runtime.stop_container(cri::StopContainerRequest {
                container_id: id.to_owned(),
                timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
            }))
            .map_err(call_err(format!("StopContainer {id}")))?;
        Ok(())
    }

    /// Removes a container (stopped or exited).
    pub fn remove_container(&mut self, id: &str) -> Result<(), CriError> {
        self.rt
            .block_on(self.runtime.remove_container(cri::RemoveContainerRequest {
                container_id: id.to_owned(),
            }))
            .map_err(call_err(format!("RemoveContainer {id}")))?;
        Ok(())
    }

    /// `StopPodSandbox` then `RemovePodSandbox` (which removes its containers too).
    pub fn remove_pod(&mut self, pod_id: &str) -> Result<(), CriError> {
        self.rt
            .block_on(self.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod_id.to_owned(),
            }))
            .map_err(call_err(format!("StopPodSandbox {pod_id}")))?;
        self.rt
            .block_on(
                self.runtime
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: pod_id.to_owned(),
                    }),
            )
            .map_err(call_err(format!("RemovePodSandbox {pod_id}")))?;
        Ok(())
    }

    /// Ids of the pod sandboxes CRI knows.
    pub fn pods(&mut self) -> Result<Vec<String>, CriError> {
        let r = self
            .rt
            .block_on(
                self.runtime
                    .list_pod_sandbox(cri::ListPodSandboxRequest::default()),
            )
            .map_err(call_err("ListPodSandbox"))?
            .into_inner();
        Ok(r.items.into_iter().map(|p| p.id).collect())
    }
}

/// The message text of a CRI container log (`<time> <stream> <P|F> <text>` lines), with
/// partial lines joined: what `kubectl logs` prints.
pub fn log_text(path: &Path) -> Result<String, CriError> {
    let raw = fs::read_to_string(path).map_err(|source| CriError::Log {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_log(&raw))
}

fn parse_log(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let mut f = line.splitn(4, ' ');
        let (Some(_time), Some(_stream), Some(tag), text) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        out.push_str(text.unwrap_or(""));
        if tag == "F" {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_lose_their_prefix_and_partials_join() {
        let raw = "2026-11-21T10:00:00.1Z stdout P hel\n\
                   2026-11-21T10:00:00.2Z stdout F lo\n\
                   2026-11-21T10:00:00.3Z stderr F oops\n\
                   garbage\n";
        assert_eq!(parse_log(raw), "hello\noops\n");
    }

    #[test]
    fn pods_get_their_network_and_pod_wide_pid_and_ipc() {
        let mut p = PodSpec {
            name: "p".into(),
            namespace: "default".into(),
            handler: "carapace".into(),
            log_dir: "/l".into(),
            privileged: false,
            network: PodNetwork::Host,
        };
        let host = p.config();
        let ns = host
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .expect("namespace options");
        assert_eq!(ns.network, cri::NamespaceMode::Node as i32);
        assert!(
            host.hostname.is_empty(),
            "no hostname without a UTS namespace"
        );
        p.network = PodNetwork::Cni {
            ports: vec![(8080, 18080)],
        };
        let c = p.config();
        assert_eq!(c.hostname, "p");
        assert_eq!(c.port_mappings[0].host_port, 18080);
        let ns = c
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .expect("namespace options");
        assert_eq!(ns.network, cri::NamespaceMode::Pod as i32);
        assert_eq!(ns.pid, cri::NamespaceMode::Pod as i32);
        assert_eq!(c.log_directory, "/l");
    }
}
