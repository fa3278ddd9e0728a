//! The sandbox lifecycle: one VM holding one container, driven through the seams
//! [`Launcher`], [`AgentConnector`] and [`Mounter`].
//!
//! `create` goes: validate the bundle and the guest image, make the state directory, make
//! the host-only `stage/` and its read-only export `shared/`, bind the rootfs and volumes
//! under `stage/` (they appear in `shared/`; see [`crate::mounts`]), start the fs daemon and wait for its socket,
//! write `vm.json` and start the VMM, wait (bounded by `agent.boot_timeout_ms`) for the
//! agent to answer, then create the sandbox and the container in the guest. Every step is
//! recorded in `state.json` before the next one starts, and any failure tears down what
//! was recorded (VMM, fs daemon, mounts, the directory) before the error is returned.
//! `delete` runs the same teardown, which is idempotent.
//!
//! The API is async: host steps (mounts, helper processes, teardown) run as blocking work
//! off the executor, agent requests go over a [`Session`] the caller holds. Creating
//! returns the session ([`create`](Runtime::create)); the shim keeps it for the VM's life,
//! the CLI opens one per command ([`Runtime::session`]). Modules: `create` (sandboxes and
//! pod containers), `ops` (start, kill, ps, exec), `delete` (delete and teardown), `resize`
//! (the VM sized to its containers: vCPUs online, memory plugged; resource updates).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use carapace_config::Config;

#[cfg(doc)]
use crate::agent::Session;
use crate::agent::{AgentConnector, AgentError, ExitInfo, Transport};
use crate::launcher::{ImageError, Launcher};
use crate::mounts::{MountError, Mounter};
use crate::network::{AttachRecord, Attached, NetworkError, NetworkPlan};
#[cfg(doc)]
use crate::oci::GUEST_SHARED_DIR;
use crate::oci::SpecError;
use crate::process::{ProcessError, ProcessRecord};
use crate::state::{ExitRecord, SandboxState, StateError, StateStore, Status};

/// How long the fs daemon may take to create its socket.
const FSD_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a helper gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Pause between attempts to reach the agent while the guest boots.
const AGENT_RETRY: Duration = Duration::from_millis(20);
/// Deadline for reaching the agent of an already running sandbox.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of sandbox operations.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// State store.
    #[error(transparent)]
    State(#[from] StateError),
    /// The bundle or its spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The guest image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Host mounts.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A helper process (fs daemon, VMM).
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// An agent request.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The VMM exited while the sandbox was being set up or used.
    #[error("the VMM (pid {pid}) exited; its log {log} ends with:\n{tail}")]
    VmmExited {
        /// Its pid.
        pid: i32,
        /// Its log.
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// The fs daemon exited while the guest was being set up: the guest's files are gone.
    #[error(
        "the fs daemon (pid {pid}) exited while the VM was being set up; its log {log} ends with:\n{tail}"
    )]
    FsDaemonExited {
        /// Its pid.
        pid: i32,
        /// Its log.
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// The agent did not answer in time.
    #[error("the guest agent did not answer on {socket} within {timeout:?}; see {log}")]
    AgentTimeout {
        /// The socket tried.
        socket: PathBuf,
        /// The deadline.
        timeout: Duration,
        /// Where the guest console / VMM log is.
        log: PathBuf,
        /// The last connection error.
        #[source]
        last: Box<AgentError>,
    },
    /// The operation does not fit the container's status.
    #[error("container {id} is {status}: cannot {op}")]
    WrongStatus {
        /// The container.
        id: String,
        /// Its status.
        status: &'static str,
        /// The operation.
        op: &'static str,
    },
    /// A file operation in the sandbox directory failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Teardown could not undo everything; the state directory is kept so that
    /// `delete --force` can retry.
    #[error("teardown of {id} incomplete: {problems}")]
    Teardown {
        /// The sandbox.
        id: String,
        /// What is left and why.
        problems: String,
    },
    /// The sandbox failed and tearing it down failed too.
    #[error("{error} (and teardown failed: {teardown})")]
    WithTeardown {
        /// The original failure.
        #[source]
        error: Box<SandboxError>,
        /// The teardown failure.
        teardown: Box<SandboxError>,
    },
    /// The pod's network namespace could not be mirrored into the VM.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// The VMM's jail could not be prepared (no free uid, the jail directory).
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// The sandbox's host cgroup could not be made or joined.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// A `prestart`, `createRuntime` or `createContainer` hook failed: the create fails.
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    /// The pod's containers ask for more than its VM may have.
    #[error(transparent)]
    Sizing(#[from] crate::sizing::SizingError),
    /// The VMM's control API (memory hot-plug).
    #[error(transparent)]
    Vmm(#[from] crate::vmm_api::VmmApiError),
    /// The VM could not be resized as asked.
    #[error("resizing the VM of {id}: {what}")]
    Resize {
        /// The sandbox or container.
        id: String,
        /// What went wrong.
        what: String,
    },
    /// A blocking step (mounts, helper processes, teardown) panicked or was cancelled.
    #[error("a blocking sandbox step did not complete")]
    Blocking(#[source] tokio::task::JoinError),
}

/// What `exec` runs when no process file is given.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Command and arguments.
    pub args: Vec<String>,
    /// `KEY=VALUE` additions (replacing the container's value of KEY).
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Allocate a terminal.
    pub tty: bool,
}

/// Files of one sandbox directory.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    /// The directory.
    pub dir: PathBuf,
    /// Exported to the guest over virtio-fs: a read-only bind of `stage`.
    pub shared: PathBuf,
    /// The host-only tmpfs where every mount point of `shared` is made (see
    /// [`crate::mounts`]).
    pub stage: PathBuf,
    /// fs daemon socket and log.
    pub fsd_socket: PathBuf,
    /// fs daemon log.
    pub fsd_log: PathBuf,
    /// The VMM's jail directory, its `/` ([`crate::jail`]); with a host-mode agent only
    /// the directory of its socket.
    pub jail: PathBuf,
    /// VMM hybrid-vsock socket, inside the jail (the VMM requires it there).
    pub vsock: PathBuf,
    /// VMM control API socket.
    pub api: PathBuf,
    /// VMM log.
    pub vmm_log: PathBuf,
    /// Guest console.
    pub console: PathBuf,
    /// VM description.
    pub vm_json: PathBuf,
    /// The translated spec as sent to the agent.
    pub guest_spec: PathBuf,
}

impl SandboxPaths {
    /// The layout under `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            shared: dir.join("shared"),
            stage: dir.join("stage"),
            fsd_socket: dir.join("fsd.sock"),
            fsd_log: dir.join("fsd.log"),
            jail: dir.join(crate::jail::JAIL_DIR),
            vsock: dir.join(crate::jail::JAIL_DIR).join("vsock.sock"),
            api: dir.join("api.sock"),
            vmm_log: dir.join("vmm.log"),
            console: dir.join("console.log"),
            vm_json: dir.join("vm.json"),
            guest_spec: dir.join("config.json"),
        }
    }
}

/// Where the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In the sandbox VM: the shared directory is a virtio-fs mount at
    /// [`GUEST_SHARED_DIR`], the agent mounts it and sets the hostname.
    Vm,
    /// On the host (`carapace-agent --host-mode`, for tests without KVM): the agent sees
    /// the shared directory at its host path and gets no shares or hostname.
    HostAgent,
}

/// The runtime: configuration, state store and the seams.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Where the agent runs.
    pub placement: Placement,
    /// Effective configuration.
    pub config: Config,
    /// Where state lives.
    pub store: StateStore,
    /// Starts fs daemon and VMM.
    pub launcher: Arc<dyn Launcher>,
    /// Reaches the agent.
    pub connector: Arc<dyn AgentConnector>,
    /// Makes host mounts.
    pub mounter: Arc<dyn Mounter>,
    /// Mirrors a pod's network namespace into its VM.
    pub network: Arc<dyn PodNetwork>,
}

/// The seam to [`crate::network`]: reads a network namespace, makes the taps and
/// redirections for the VM, undoes them. Blocking.
pub trait PodNetwork: Send + Sync + std::fmt::Debug {
    /// [`crate::network::inspect`].
    fn inspect(&self, netns: &Path) -> Result<NetworkPlan, NetworkError>;
    /// [`crate::network::attach`].
    fn attach(
        &self,
        netns: &Path,
        plan: &NetworkPlan,
        sandbox_id: &str,
    ) -> Result<Attached, NetworkError>;
    /// [`crate::network::detach`].
    fn detach(&self, record: &AttachRecord) -> Result<(), NetworkError>;
}

/// The real [`PodNetwork`]: netlink, taps and tc in the namespace.
#[derive(Debug, Clone, Copy)]
pub struct SysNetwork;

impl PodNetwork for SysNetwork {
    fn inspect(&self, netns: &Path) -> Result<NetworkPlan, NetworkError> {
        crate::network::inspect(netns)
    }
    fn attach(
        &self,
        netns: &Path,
        plan: &NetworkPlan,
        sandbox_id: &str,
    ) -> Result<Attached, NetworkError> {
        crate::network::attach(netns, plan, sandbox_id)
    }
    fn detach(&self, record: &AttachRecord) -> Result<(), NetworkError> {
        crate::network::detach(record)
    }
}

impl SandboxError {
    /// This error, joined by the failure of the teardown that followed it, if any.
    fn with_teardown(self, teardown: Result<(), SandboxError>) -> SandboxError {
        match teardown {
            Ok(()) => self,
            Err(teardown) => SandboxError::WithTeardown {
                error: Box::new(self),
                teardown: Box::new(teardown),
            },
        }
    }
}

/// Runs a blocking step (file systems, mounts, helper processes) off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SandboxError> + Send + 'static,
) -> Result<T, SandboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(SandboxError::Blocking)?
}

/// The name of the user owning `path` (its uid when it has no name; empty when it cannot
/// be read).
fn owner_of(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return String::new();
    };
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(meta.uid())) {
        Ok(Some(u)) => u.name,
        _ => meta.uid().to_string(),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError {
    let path = path.to_path_buf();
    move |source| SandboxError::Io { op, path, source }
}

impl Runtime {
    /// The production runtime for `config`: state under `root`, the configured fs daemon
    /// and VMM, the agent over hybrid vsock. With `host_agent` (tests on hosts that cannot
    /// boot guests) that agent binary runs in host mode in place of the VM, reached over a
    /// plain unix socket.
    pub fn from_config(config: Config, root: PathBuf, host_agent: Option<PathBuf>) -> Self {
        let binary = crate::launcher::BinaryLauncher {
            config: config.clone(),
        };
        let (placement, launcher, transport): (Placement, Arc<dyn Launcher>, Transport) =
            match host_agent {
                None => (Placement::Vm, Arc::new(binary), Transport::HybridVsock),
                Some(agent) => (
                    Placement::HostAgent,
                    Arc::new(crate::launcher::HostAgentLauncher {
                        agent,
                        inner: binary,
                    }),
                    Transport::Unix,
                ),
            };
        Runtime {
            placement,
            store: StateStore::new(root),
            launcher,
            connector: Arc::new(crate::agent::TtrpcConnector {
                transport,
                request_timeout: Duration::from_millis(config.agent.request_timeout_ms),
            }),
            mounter: Arc::new(crate::mounts::SysMounter),
            network: Arc::new(SysNetwork),
            config,
        }
    }

    /// The jail uid claims: under `runtime.state_dir` whatever the state root (`--root`),
    /// so that every state root of one configuration shares them ([`crate::jail`]).
    pub fn jail_claims(&self) -> crate::jail::UidClaims {
        crate::jail::UidClaims::new(&self.config.runtime.state_dir)
    }

    /// The paths of sandbox `id`.
    pub fn paths(&self, id: &str) -> Result<SandboxPaths, SandboxError> {
        Ok(SandboxPaths::new(&self.store.dir(id)?))
    }

    /// The status as it is now: the recorded one, corrected by what is observable (a gone
    /// VMM means stopped; so does a gone keeper of the init, [`crate::keeper`]).
    pub fn live_status(&self, st: &SandboxState) -> Status {
        match st.status {
            Status::Creating | Status::Stopped => st.status,
            Status::Created | Status::Running => {
                let keeper_gone = st.io_relay.is_some_and(|k| !k.is_alive());
                if st.exit.is_some() || keeper_gone || !self.vm_of(st).is_some_and(|v| v.is_alive())
                {
                    Status::Stopped
                } else {
                    st.status
                }
            }
        }
    }

    /// The OCI state of `id`.
    pub fn state(&self, id: &str) -> Result<crate::state::OciState, SandboxError> {
        let st = self.store.load(id)?;
        let status = self.live_status(&st);
        let vm = self.vm_of(&st);
        let alive = vm.is_some_and(|v| v.is_alive());
        let mut oci = st.oci(status, alive);
        if st.sandbox_id.is_some() && alive && status != Status::Stopped {
            // a pod's container is represented by the VMM of the pod's VM
            oci.pid = vm.map(|v| v.pid).unwrap_or(0);
        }
        oci.owner = owner_of(&self.store.dir(id)?);
        Ok(oci)
    }

    /// The VMM running `st`'s container: its own, or for a container of a pod, the VMM of
    /// the pod's sandbox (`None` when that sandbox's state is gone).
    pub fn vm_of(&self, st: &SandboxState) -> Option<ProcessRecord> {
        match &st.sandbox_id {
            None => st.vmm,
            Some(sandbox) => self.store.load(sandbox).ok().and_then(|s| s.vmm),
        }
    }

    fn require(
        &self,
        st: &SandboxState,
        allowed: &[Status],
        op: &'static str,
    ) -> Result<Status, SandboxError> {
        let status = self.live_status(st);
        if allowed.contains(&status) {
            Ok(status)
        } else {
            Err(SandboxError::WrongStatus {
                id: st.id.clone(),
                status: status.as_str(),
                op,
            })
        }
    }

    /// The OCI `process` for an exec: the container's own process (user, env, cwd,
    /// capabilities, rlimits...) with `opts` applied.
    pub fn exec_process(
        &self,
        id: &str,
        opts: &ExecOptions,
    ) -> Result<serde_json::Value, SandboxError> {
        let path = self.paths(id)?.guest_spec;
        let text = std::fs::read(&path).map_err(io_err("reading", &path))?;
        let spec: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| SandboxError::Io {
                op: "parsing",
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?;
        let mut process = spec
            .get("process")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        process["args"] = serde_json::json!(opts.args);
        process["terminal"] = serde_json::json!(opts.tty);
        if let Some(cwd) = &opts.cwd {
            process["cwd"] = serde_json::json!(cwd);
        }
        if !opts.env.is_empty() {
            let mut env: Vec<String> = process
                .get("env")
                .and_then(|e| serde_json::from_value(e.clone()).ok())
                .unwrap_or_default();
            for kv in &opts.env {
                let key = kv.split('=').next().unwrap_or(kv);
                env.retain(|e| e.split('=').next() != Some(key));
                env.push(kv.clone());
            }
            process["env"] = serde_json::json!(env);
        }
        if let Some(o) = process.as_object_mut() {
            o.remove("consoleSize");
        }
        Ok(process)
    }

    /// Records how the container's init ended.
    pub fn record_exit(&self, id: &str, exit: ExitInfo) -> Result<(), SandboxError> {
        self.store.update(id, |st| {
            st.exit = Some(ExitRecord {
                status: exit.exit_status,
                signal: exit.signal,
            });
            st.status = Status::Stopped;
        })?;
        Ok(())
    }

    /// Ids of the containers living in the VM of sandbox `sandbox_id` (besides its own).
    pub fn members(&self, sandbox_id: &str) -> Result<Vec<String>, SandboxError> {
        let mut members = Vec::new();
        for id in self.store.ids()? {
            if let Ok(st) = self.store.load(&id)
                && st.sandbox_id.as_deref() == Some(sandbox_id)
            {
                members.push(id);
            }
        }
        Ok(members)
    }
}

mod create;
mod delete;
mod ops;
pub use ops::Helper;
mod resize;
#[cfg(test)]
mod tests;
