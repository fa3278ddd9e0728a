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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_config::Config;

use crate::agent::{AgentApi, AgentConnector, AgentError, ExitInfo, Share, Transport};
use crate::launcher::{
    FsRequest, ImageError, Launcher, VmPaths, VmRequest, check_image, vm_description,
};
use crate::mounts::{MountError, Mounter};
use crate::oci::{self, GUEST_SHARED_DIR, SHARED_FS_TAG, SpecError};
use crate::process::{ProcessError, ProcessRecord, log_tail, wait_for_socket};
use crate::state::{ExitRecord, MountRecord, SandboxState, StateError, StateStore, Status};

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
    /// VMM hybrid-vsock socket.
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
            vsock: dir.join("vsock.sock"),
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
            config,
        }
    }

    /// The paths of sandbox `id`.
    pub fn paths(&self, id: &str) -> Result<SandboxPaths, SandboxError> {
        Ok(SandboxPaths::new(&self.store.dir(id)?))
    }

    /// Creates sandbox and container `id` from `bundle`; on error nothing is left behind.
    pub fn create(&self, id: &str, bundle: &Path) -> Result<SandboxState, SandboxError> {
        crate::state::validate_id(id)?;
        let bundle = std::fs::canonicalize(bundle).map_err(io_err("resolving bundle", bundle))?;
        let paths = self.paths(id)?;
        let guest_shared = match self.placement {
            Placement::Vm => PathBuf::from(GUEST_SHARED_DIR),
            Placement::HostAgent => paths.shared.clone(),
        };
        let guest = oci::translate(&bundle, id, &guest_shared, None)?;
        if self.placement == Placement::Vm {
            check_image(&self.config)?;
        }
        self.store.create_dir(id)?;
        let mut st = SandboxState::new(id, &bundle, guest.annotations.clone());
        match self.create_steps(&mut st, &guest, &paths) {
            Ok(()) => Ok(st),
            Err(error) => {
                tracing::error!(id, %error, "create failed, tearing down");
                match self.teardown(&st) {
                    Ok(()) => Err(error),
                    Err(teardown) => Err(SandboxError::WithTeardown {
                        error: Box::new(error),
                        teardown: Box::new(teardown),
                    }),
                }
            }
        }
    }

    fn create_steps(
        &self,
        st: &mut SandboxState,
        guest: &oci::GuestSpec,
        paths: &SandboxPaths,
    ) -> Result<(), SandboxError> {
        let id = st.id.clone();
        self.store.save(st)?;
        // Recorded before they exist, so that a crash in between still tears them down.
        st.mounts.push(MountRecord {
            source: PathBuf::from("tmpfs"),
            target: paths.stage.clone(),
            read_only: false,
        });
        st.mounts.push(MountRecord {
            source: paths.stage.clone(),
            target: paths.shared.clone(),
            read_only: true,
        });
        self.store.save(st)?;
        self.mounter.prepare_export(&paths.stage, &paths.shared)?;
        self.bind_all(st, guest, paths)?;
        let spec_bytes = serde_json::to_vec_pretty(&guest.json).unwrap_or_default();
        std::fs::write(&paths.guest_spec, &spec_bytes)
            .map_err(io_err("writing", &paths.guest_spec))?;

        tracing::info!(id, "starting fs daemon");
        let fsd = self.launcher.start_fs_daemon(&FsRequest {
            shared_dir: paths.shared.clone(),
            socket: paths.fsd_socket.clone(),
            log: paths.fsd_log.clone(),
        })?;
        st.fsd = Some(fsd);
        self.store.save(st)?;
        wait_for_socket(
            "fs daemon",
            &fsd,
            &paths.fsd_socket,
            &paths.fsd_log,
            FSD_SOCKET_TIMEOUT,
        )?;

        let resources = self.config.vm_resources(&[guest.limits]);
        let desc = vm_description(
            &self.config,
            resources,
            &VmPaths {
                vsock: paths.vsock.clone(),
                api: paths.api.clone(),
                fs_socket: paths.fsd_socket.clone(),
                console: self.config.debug.console.then(|| paths.console.clone()),
            },
        );
        std::fs::write(
            &paths.vm_json,
            serde_json::to_vec_pretty(&desc).unwrap_or_default(),
        )
        .map_err(io_err("writing", &paths.vm_json))?;
        tracing::info!(id, ?resources, "starting VMM");
        let t = Instant::now();
        let vmm = self.launcher.start_vmm(&VmRequest {
            description: paths.vm_json.clone(),
            vsock: paths.vsock.clone(),
            log: paths.vmm_log.clone(),
        })?;
        st.vmm = Some(vmm);
        self.store.save(st)?;

        let agent = self.wait_for_agent(&vmm, paths)?;
        let agent_ms = t.elapsed().as_millis() as u64;
        match self.placement {
            Placement::Vm => {
                let hostname = guest.hostname.clone().unwrap_or_else(|| id.clone());
                let share = Share {
                    tag: SHARED_FS_TAG.to_owned(),
                    mount_point: GUEST_SHARED_DIR.to_owned(),
                    read_only: false,
                };
                agent.create_sandbox(&id, &hostname, &[share])?;
            }
            Placement::HostAgent => agent.create_sandbox(&id, "", &[])?,
        }
        let sandbox_ms = t.elapsed().as_millis() as u64 - agent_ms;
        agent.create_container(&id, &spec_bytes)?;
        st.status = Status::Created;
        self.store.save(st)?;
        tracing::info!(
            id,
            agent_ms,
            sandbox_ms,
            container_ms = t.elapsed().as_millis() as u64 - agent_ms - sandbox_ms,
            "created (VMM start -> agent answering, CreateSandbox, CreateContainer)"
        );
        Ok(())
    }

    /// Retries connecting until the agent answers, the VMM dies or the boot deadline passes.
    fn wait_for_agent(
        &self,
        vmm: &ProcessRecord,
        paths: &SandboxPaths,
    ) -> Result<Arc<dyn AgentApi>, SandboxError> {
        let timeout = Duration::from_millis(self.config.agent.boot_timeout_ms);
        self.connect_until(vmm, paths, timeout)
    }

    fn connect_until(
        &self,
        vmm: &ProcessRecord,
        paths: &SandboxPaths,
        timeout: Duration,
    ) -> Result<Arc<dyn AgentApi>, SandboxError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !vmm.is_alive() {
                return Err(self.vmm_exited(vmm, paths));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = remaining.min(Duration::from_secs(1));
            let last = match self.connector.connect(&paths.vsock, attempt) {
                Ok(agent) => return Ok(agent),
                Err(AgentError::Connect {
                    source:
                        source @ carapace_protocol::client::ClientError::IncompatibleAgent { .. },
                    socket,
                }) => return Err(AgentError::Connect { socket, source }.into()),
                Err(e) => e,
            };
            if Instant::now() + AGENT_RETRY >= deadline {
                if !vmm.is_alive() {
                    return Err(self.vmm_exited(vmm, paths));
                }
                return Err(SandboxError::AgentTimeout {
                    socket: paths.vsock.clone(),
                    timeout,
                    log: if self.config.debug.console {
                        paths.console.clone()
                    } else {
                        paths.vmm_log.clone()
                    },
                    last: Box::new(last),
                });
            }
            tracing::trace!(error = %last, "agent not answering yet");
            std::thread::sleep(AGENT_RETRY);
        }
    }

    fn vmm_exited(&self, vmm: &ProcessRecord, paths: &SandboxPaths) -> SandboxError {
        SandboxError::VmmExited {
            pid: vmm.pid,
            log: paths.vmm_log.clone(),
            tail: log_tail(&paths.vmm_log),
        }
    }

    /// The status as it is now: the recorded one, corrected by what is observable (a gone
    /// VMM means stopped).
    pub fn live_status(&self, st: &SandboxState) -> Status {
        match st.status {
            Status::Creating | Status::Stopped => st.status,
            Status::Created | Status::Running => {
                if st.exit.is_some() || !self.vm_of(st).is_some_and(|v| v.is_alive()) {
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

    /// Connects to the agent of a running sandbox (for a container of a pod: the agent of
    /// the pod's VM).
    pub fn agent(&self, st: &SandboxState) -> Result<Arc<dyn AgentApi>, SandboxError> {
        let paths = self.paths(st.sandbox_id.as_deref().unwrap_or(&st.id))?;
        let vmm = self.vm_of(st).ok_or(SandboxError::WrongStatus {
            id: st.id.clone(),
            status: "without a VM",
            op: "reach its agent",
        })?;
        self.connect_until(&vmm, &paths, RECONNECT_TIMEOUT)
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

    /// Starts the container's process.
    pub fn start(&self, id: &str) -> Result<u32, SandboxError> {
        let _lock = self.store.lock(id)?;
        let mut st = self.store.load(id)?;
        self.require(&st, &[Status::Created], "start")?;
        let agent = self.agent(&st)?;
        let pid = agent.start_container(id)?;
        st.status = Status::Running;
        st.guest_pid = Some(pid);
        self.store.save(&st)?;
        tracing::info!(id, guest_pid = pid, "started");
        Ok(pid)
    }

    /// Signals the container's init (or every process with `all`).
    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), SandboxError> {
        let st = self.store.load(id)?;
        self.require(&st, &[Status::Created, Status::Running], "be signalled")?;
        self.agent(&st)?.signal(id, "", signal, all)?;
        Ok(())
    }

    /// Guest pids of the container's processes.
    pub fn ps(&self, id: &str) -> Result<Vec<u32>, SandboxError> {
        let st = self.store.load(id)?;
        self.require(&st, &[Status::Created, Status::Running], "list processes")?;
        Ok(self.agent(&st)?.list_processes(id)?)
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

    /// Starts an extra process in the running container; returns the agent (to stream
    /// its IO and wait) and its guest pid.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
    ) -> Result<(Arc<dyn AgentApi>, u32), SandboxError> {
        let st = self.store.load(id)?;
        self.require(&st, &[Status::Running], "exec a process")?;
        let agent = self.agent(&st)?;
        let bytes = serde_json::to_vec(process).unwrap_or_default();
        let pid = agent.exec_process(id, exec_id, &bytes)?;
        Ok((agent, pid))
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

    /// Deletes the sandbox: stops the guest, the VMM and the fs daemon, undoes the mounts
    /// and removes the state directory. A running container needs `force`. Without
    /// `force` a missing container is an error (as runc); with it, success.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), SandboxError> {
        let dir = self.store.dir(id)?;
        let st = match self.store.load(id) {
            Ok(st) => st,
            Err(StateError::NotFound { .. }) if force => {
                // A directory without state (a crash right after mkdir): clean it anyway.
                if dir.exists() {
                    self.remove_dir(id, &dir)?;
                }
                return Ok(());
            }
            Err(StateError::Corrupt { .. }) if force => {
                self.remove_dir(id, &dir)?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(sandbox) = st.sandbox_id.clone() {
            return self.delete_member(&st, &sandbox, force);
        }
        let status = self.live_status(&st);
        if status == Status::Running && !force {
            return Err(SandboxError::WrongStatus {
                id: id.to_owned(),
                status: status.as_str(),
                op: "delete it without --force",
            });
        }
        let members = self.members(id)?;
        if !members.is_empty() && !force {
            return Err(SandboxError::WrongStatus {
                id: id.to_owned(),
                status: "hosting other containers",
                op: "delete it before them without --force",
            });
        }
        if let Some(vmm) = st.vmm
            && vmm.is_alive()
        {
            let paths = self.paths(id)?;
            match self.connect_until(&vmm, &paths, Duration::from_secs(2)) {
                Ok(agent) => {
                    if let Err(e) = agent.destroy_sandbox(id) {
                        tracing::warn!(id, error = %e, "DestroySandbox failed; stopping the VMM");
                    }
                }
                Err(e) => tracing::warn!(id, error = %e, "agent unreachable; stopping the VMM"),
            }
        }
        // The guest is gone with its containers: undo what the pod's other containers left
        // on the host before the sandbox itself.
        let mut problems = Vec::new();
        for member in members {
            match self.store.load(&member) {
                Ok(m) => {
                    if let Err(e) = self.teardown_member(&m, id) {
                        problems.push(e.to_string());
                    }
                }
                // Its own delete finished meanwhile (containerd runs `shim delete` for every
                // task of a killed shim at once): its state goes last, nothing is left.
                Err(StateError::NotFound { .. }) => {
                    tracing::debug!(id, member, "member already deleted");
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            return Err(SandboxError::Teardown {
                id: id.to_owned(),
                problems: problems.join("; "),
            });
        }
        self.teardown(&st)
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

    /// Creates container `cid` from `bundle` inside the running VM of pod sandbox
    /// `sandbox_id` (a sandbox made by [`Runtime::create`]): its rootfs and bind-mount
    /// sources are bound under `<sandbox>/stage/<cid>/`, and appear in the `shared/` the
    /// sandbox's fs daemon already exports, and the agent of that VM creates the container. The container gets
    /// a state directory of its own (`sandbox_id` set, no fs daemon or VMM). On error
    /// nothing of it is left behind; the sandbox is untouched.
    pub fn create_in_sandbox(
        &self,
        sandbox_id: &str,
        cid: &str,
        bundle: &Path,
    ) -> Result<SandboxState, SandboxError> {
        crate::state::validate_id(cid)?;
        let bundle = std::fs::canonicalize(bundle).map_err(io_err("resolving bundle", bundle))?;
        let sandbox = self.store.load(sandbox_id)?;
        let vm_alive = sandbox.vmm.is_some_and(|v| v.is_alive());
        if sandbox.sandbox_id.is_some() || sandbox.status == Status::Creating || !vm_alive {
            return Err(SandboxError::WrongStatus {
                id: sandbox_id.to_owned(),
                status: if sandbox.sandbox_id.is_some() {
                    "a container of another sandbox"
                } else if vm_alive {
                    "still being created"
                } else {
                    "without a running VM"
                },
                op: "host another container",
            });
        }
        let sandbox_paths = self.paths(sandbox_id)?;
        let guest_shared = match self.placement {
            Placement::Vm => PathBuf::from(GUEST_SHARED_DIR),
            Placement::HostAgent => sandbox_paths.shared.clone(),
        };
        let guest = oci::translate(&bundle, cid, &guest_shared, sandbox.guest_pid)?;
        self.store.create_dir(cid)?;
        let mut st = SandboxState::new(cid, &bundle, guest.annotations.clone());
        st.sandbox_id = Some(sandbox_id.to_owned());
        match self.join_steps(&mut st, &guest, &sandbox_paths) {
            Ok(()) => Ok(st),
            Err(error) => {
                tracing::error!(cid, sandbox_id, %error, "create in sandbox failed, tearing down");
                match self.teardown_member(&st, sandbox_id) {
                    Ok(()) => Err(error),
                    Err(teardown) => Err(SandboxError::WithTeardown {
                        error: Box::new(error),
                        teardown: Box::new(teardown),
                    }),
                }
            }
        }
    }

    /// Binds every source of `guest` under the sandbox's stage (recorded first).
    fn bind_all(
        &self,
        st: &mut SandboxState,
        guest: &oci::GuestSpec,
        sandbox_paths: &SandboxPaths,
    ) -> Result<(), SandboxError> {
        for bind in &guest.binds {
            st.mounts.push(MountRecord {
                source: bind.source.clone(),
                target: sandbox_paths.stage.join(&bind.target),
                read_only: bind.read_only,
            });
            self.store.save(st)?;
            self.mounter.bind(
                &bind.source,
                &sandbox_paths.stage,
                &bind.target,
                bind.options(),
            )?;
        }
        Ok(())
    }

    fn join_steps(
        &self,
        st: &mut SandboxState,
        guest: &oci::GuestSpec,
        sandbox_paths: &SandboxPaths,
    ) -> Result<(), SandboxError> {
        self.store.save(st)?;
        self.bind_all(st, guest, sandbox_paths)?;
        let spec_bytes = serde_json::to_vec_pretty(&guest.json).unwrap_or_default();
        let spec_path = self.paths(&st.id)?.guest_spec;
        std::fs::write(&spec_path, &spec_bytes).map_err(io_err("writing", &spec_path))?;
        let agent = self.agent(st)?;
        agent.create_container(&st.id, &spec_bytes)?;
        st.status = Status::Created;
        self.store.save(st)?;
        tracing::info!(id = st.id, sandbox = ?st.sandbox_id, "created in the pod's VM");
        Ok(())
    }

    /// Deletes a container of a pod: removes it from the guest (the agent kills what still
    /// runs), undoes its binds and removes its state; the VM keeps running.
    fn delete_member(
        &self,
        st: &SandboxState,
        sandbox_id: &str,
        force: bool,
    ) -> Result<(), SandboxError> {
        let status = self.live_status(st);
        if status == Status::Running && !force {
            return Err(SandboxError::WrongStatus {
                id: st.id.clone(),
                status: status.as_str(),
                op: "delete it without --force",
            });
        }
        let t = Instant::now();
        if let Some(vmm) = self.vm_of(st)
            && vmm.is_alive()
        {
            let paths = self.paths(sandbox_id)?;
            match self.connect_until(&vmm, &paths, Duration::from_secs(2)) {
                Ok(agent) => {
                    let connected = t.elapsed();
                    if let Err(e) = agent.remove_container(&st.id) {
                        tracing::warn!(id = st.id, error = %e, "RemoveContainer failed");
                    }
                    tracing::info!(
                        id = st.id,
                        connect_ms = connected.as_millis() as u64,
                        remove_ms = (t.elapsed() - connected).as_millis() as u64,
                        "removed from the pod's VM"
                    );
                }
                Err(e) => tracing::warn!(id = st.id, error = %e, "agent unreachable"),
            }
        }
        let t = Instant::now();
        let r = self.teardown_member(st, sandbox_id);
        tracing::info!(
            id = st.id,
            teardown_ms = t.elapsed().as_millis() as u64,
            "host side of the pod container undone"
        );
        r
    }

    /// The host side of a pod's container: its IO relay, its binds in the sandbox's shared
    /// directory (and that per-container directory), its state directory. Idempotent.
    fn teardown_member(&self, st: &SandboxState, sandbox_id: &str) -> Result<(), SandboxError> {
        let mut problems = Vec::new();
        if let Some(rec) = st.io_relay
            && let Err(e) = rec.terminate("IO relay", STOP_GRACE)
        {
            problems.push(e.to_string());
        }
        for m in st.mounts.iter().rev() {
            if let Err(e) = self.mounter.unmount(&m.target) {
                problems.push(e.to_string());
            }
        }
        // Unmounting under the stage propagates to the export (and the fs daemon's copy);
        // whatever is left in either is swept.
        let paths = self.paths(sandbox_id)?;
        let base = paths.stage.join(&st.id);
        let exported = paths.shared.join(&st.id);
        for p in self
            .mounter
            .mounts_under(&base)
            .into_iter()
            .chain(self.mounter.mounts_under(&exported))
        {
            if let Err(e) = self.mounter.unmount(&p) {
                problems.push(e.to_string());
            }
        }
        let mut left = self.mounter.mounts_under(&base);
        left.extend(self.mounter.mounts_under(&exported));
        if !left.is_empty() {
            problems.push(format!("still mounted: {left:?}"));
        } else {
            // The stage is the host's own tmpfs (the guest cannot write it).
            match std::fs::remove_dir_all(&base) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("removing {}: {e}", base.display())),
            }
        }
        if !problems.is_empty() {
            return Err(SandboxError::Teardown {
                id: st.id.clone(),
                problems: problems.join("; "),
            });
        }
        let dir = self.store.dir(&st.id)?;
        self.remove_dir(&st.id, &dir)
    }

    /// Stops every recorded process, undoes the mounts and removes the directory.
    /// Idempotent; errors are collected so one failure does not stop the rest.
    pub fn teardown(&self, st: &SandboxState) -> Result<(), SandboxError> {
        let mut problems = Vec::new();
        for (what, rec) in [
            ("IO relay", st.io_relay),
            ("VMM", st.vmm),
            ("fs daemon", st.fsd),
        ] {
            if let Some(rec) = rec
                && let Err(e) = rec.terminate(what, STOP_GRACE)
            {
                problems.push(e.to_string());
            }
        }
        for m in st.mounts.iter().rev() {
            if let Err(e) = self.mounter.unmount(&m.target) {
                problems.push(e.to_string());
            }
        }
        let dir = self.store.dir(&st.id)?;
        if !problems.is_empty() {
            return Err(SandboxError::Teardown {
                id: st.id.clone(),
                problems: problems.join("; "),
            });
        }
        self.remove_dir(&st.id, &dir)
    }

    /// Unmounts whatever is still mounted under `dir`, then removes it — never while a
    /// mount remains, since removing through a bind mount would delete the bundle's files.
    fn remove_dir(&self, id: &str, dir: &Path) -> Result<(), SandboxError> {
        let mut problems = Vec::new();
        for p in self.mounter.mounts_under(dir) {
            if let Err(e) = self.mounter.unmount(&p) {
                problems.push(e.to_string());
            }
        }
        let left = self.mounter.mounts_under(dir);
        if !left.is_empty() {
            problems.push(format!("still mounted: {left:?}"));
        }
        if !problems.is_empty() {
            return Err(SandboxError::Teardown {
                id: id.to_owned(),
                problems: problems.join("; "),
            });
        }
        self.store.remove(id)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
