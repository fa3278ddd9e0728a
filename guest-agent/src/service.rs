//! The ttrpc `Agent` service: sandbox, containers, processes, stdio, cgroups.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carapace_protocol::agent::*;
use carapace_protocol::agent_ttrpc::Agent;
use carapace_protocol::{MAX_READ_CHUNK, MAX_WRITE_CHUNK, PROTOCOL_VERSION};
use oci_spec::runtime::{LinuxResources, LinuxSeccomp, Process, Spec};
use ttrpc::r#async::TtrpcContext;

use crate::cgroup::{Cgroup, CgroupError, CgroupRoot};
use crate::ids::{IdError, validate_id};
use crate::init::{InitConfig, InitKind};
use crate::process::{Proc, SpawnError, StatusReader};
use crate::reaper::Reaper;

/// Errors returned to the host, each mapped to a ttrpc status code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("container {0:?} not found")]
    NoContainer(String),
    #[error("process {exec_id:?} not found in container {container_id:?}")]
    NoProcess {
        container_id: String,
        exec_id: String,
    },
    #[error("{what} {id:?} already exists")]
    Exists { what: &'static str, id: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("container {id:?} is {state}, {op} needs {needed}")]
    State {
        id: String,
        state: &'static str,
        op: &'static str,
        needed: &'static str,
    },
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is refused in host mode")]
    HostMode(&'static str),
}

impl AgentError {
    fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            Self::Id(_) | Self::Invalid { .. } => Code::INVALID_ARGUMENT,
            Self::NoContainer(_) | Self::NoProcess { .. } => Code::NOT_FOUND,
            Self::Exists { .. } => Code::ALREADY_EXISTS,
            Self::State { .. } | Self::HostMode(_) => Code::FAILED_PRECONDITION,
            Self::Cgroup(CgroupError::Unavailable) => Code::UNAVAILABLE,
            Self::Cgroup(CgroupError::Invalid { .. }) => Code::INVALID_ARGUMENT,
            Self::Spawn(_) | Self::Cgroup(_) | Self::Io { .. } => Code::INTERNAL,
        }
    }
}

/// The error of a failed `kill(pid, sig)` of a process this agent still had as live. ESRCH
/// means the reaper collected it in between (its exit is on the way to the process's
/// state): the same answer as for a process already known to have stopped, which the host
/// takes as "already finished", not an internal error.
fn kill_error(id: &str, pid: i32, sig: nix::sys::signal::Signal, e: nix::Error) -> AgentError {
    if e == nix::Error::ESRCH {
        AgentError::State {
            id: id.to_owned(),
            state: "stopped",
            op: "signal",
            needed: "a live process",
        }
    } else {
        AgentError::Io {
            op: format!("kill({pid}, {sig})"),
            source: e.into(),
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        tracing::warn!(error = %chain(&e), "request failed");
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), chain(&e)))
    }
}

type Result<T> = std::result::Result<T, AgentError>;

/// Where the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 in the VM.
    Guest,
    /// A process on the host (tests): no power-off, no guest clock, no virtio-fs.
    Host,
}

/// Agent-wide settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub cgroup_root: Option<PathBuf>,
    /// Directory CopyFile writes under.
    pub shared_dir: PathBuf,
    /// How long an orderly shutdown (Ctrl-Alt-Del in the guest, SIGINT/SIGTERM in host
    /// mode) gives containers between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
}

/// Default of [`Config::stop_grace`]: well within the VMM's default shutdown timeout (10 s).
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CState {
    Created,
    Running,
    Paused,
    Stopped,
}

impl CState {
    fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug)]
struct Container {
    id: String,
    init: Arc<Proc>,
    cgroup: Option<Cgroup>,
    state: Mutex<CState>,
    start: tokio::sync::Mutex<(Option<OwnedFd>, Option<StatusReader>)>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// The spec's seccomp profile, applied to the init and to every exec (as runc does).
    seccomp: Option<LinuxSeccomp>,
    /// The init is pid 1 of a pid namespace created for it (else the namespace is joined
    /// or the VM's, and holds other processes).
    own_pidns: bool,
    /// oom_kill count already reported.
    oom_seen: Mutex<u64>,
}

impl Container {
    fn state(&self) -> CState {
        let st = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.init.exited().is_some() && st != CState::Created {
            return CState::Stopped;
        }
        st
    }
    fn set_state(&self, s: CState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
}

#[derive(Debug, Default)]
struct OomQueue {
    events: Mutex<VecDeque<String>>,
    notify: tokio::sync::Notify,
}

/// The service state shared by all connections.
#[derive(Debug)]
pub struct AgentService {
    config: Config,
    reaper: Reaper,
    cgroups: Option<CgroupRoot>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    sandbox: Mutex<Option<String>>,
    /// Mount points of the virtio-fs shares mounted for the sandbox, in mount order.
    shares: Mutex<Vec<PathBuf>>,
    oom: OomQueue,
    oom_watch: Arc<crate::oom::OomWatcher>,
    started: Instant,
    shutdown: tokio::sync::mpsc::UnboundedSender<ShutdownKind>,
}

/// Why the server should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    /// Shutdown RPC or sandbox destroyed.
    PowerOff,
    /// SIGINT: in the guest, the kernel's Ctrl-Alt-Del (the VMM's shutdown request, with
    /// RB_DISABLE_CAD set); the containers were stopped in order (see
    /// [`AgentService::stop_all`]).
    Interrupted,
}

impl AgentService {
    /// Creates the service and starts its reaper and OOM watcher tasks.
    pub fn new(
        config: Config,
        shutdown: tokio::sync::mpsc::UnboundedSender<ShutdownKind>,
    ) -> std::io::Result<Arc<Self>> {
        let reaper = Reaper::default();
        reaper.start()?;
        let cgroups = match &config.cgroup_root {
            Some(p) => match CgroupRoot::init(p) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "cgroups disabled");
                    None
                }
            },
            None => None,
        };
        let svc = Arc::new(Self {
            config,
            reaper,
            cgroups,
            containers: Mutex::default(),
            sandbox: Mutex::default(),
            shares: Mutex::default(),
            oom: OomQueue::default(),
            oom_watch: Arc::new(crate::oom::OomWatcher::new()),
            started: Instant::now(),
            shutdown,
        });
        let weak = Arc::downgrade(&svc);
        let watcher = svc.oom_watch.clone();
        tokio::spawn(async move {
            loop {
                // Woken by a change of some container's memory.events (inotify), or
                // periodically without inotify.
                watcher.wait().await;
                let Some(svc) = weak.upgrade() else { return };
                svc.poll_oom();
            }
        });
        Ok(svc)
    }

    fn poll_oom(&self) {
        let list: Vec<Arc<Container>> = self.lock_containers().values().cloned().collect();
        for c in list {
            let Some(cg) = &c.cgroup else { continue };
            let kills = cg.memory_events().oom_kill;
            let mut seen = c.oom_seen.lock().unwrap_or_else(|p| p.into_inner());
            if kills > *seen {
                *seen = kills;
                tracing::info!(container = %c.id, "OOM kill");
                let mut q = self.oom.events.lock().unwrap_or_else(|p| p.into_inner());
                if q.len() < 1024 {
                    q.push_back(c.id.clone());
                }
                drop(q);
                self.oom.notify.notify_one();
            }
        }
    }

    fn lock_containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        validate_id("container id", id)?;
        self.lock_containers()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NoContainer(id.to_owned()))
    }

    fn process(&self, cid: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Proc>)> {
        let c = self.container(cid)?;
        if exec_id.is_empty() {
            let p = c.init.clone();
            return Ok((c, p));
        }
        validate_id("exec id", exec_id)?;
        let p = c
            .execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::NoProcess {
                container_id: cid.to_owned(),
                exec_id: exec_id.to_owned(),
            })?;
        Ok((c, p))
    }

    fn cgroup_of<'a>(&self, c: &'a Container) -> Result<&'a Cgroup> {
        c.cgroup
            .as_ref()
            .ok_or(AgentError::Cgroup(CgroupError::Unavailable))
    }

    /// Every pid in the container: from its cgroup, else by pid namespace.
    fn container_pids(&self, c: &Container) -> Result<Vec<u32>> {
        if let Some(cg) = &c.cgroup {
            return Ok(cg.pids()?);
        }
        if !c.own_pidns {
            // Without a cgroup and a pid namespace of its own, only the processes the
            // agent started are known to be the container's.
            let execs = c.execs.lock().unwrap_or_else(|p| p.into_inner());
            return Ok(std::iter::once(&c.init)
                .chain(execs.values())
                .filter(|p| p.pid > 0 && p.exited().is_none())
                .map(|p| p.pid.unsigned_abs())
                .collect());
        }
        let target =
            std::fs::read_link(format!("/proc/{}/ns/pid", c.init.pid)).map_err(|source| {
                AgentError::Io {
                    op: format!("reading pid namespace of {}", c.init.pid),
                    source,
                }
            })?;
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc")
            .map_err(|source| AgentError::Io {
                op: "listing /proc".into(),
                source,
            })?
            .flatten()
        {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_link(e.path().join("ns/pid")).ok().as_ref() == Some(&target) {
                out.push(pid);
            }
        }
        Ok(out)
    }

    async fn do_create(&self, req: CreateContainerRequest) -> Result<()> {
        validate_id("container id", &req.container_id)?;
        let spec: Spec =
            serde_json::from_slice(&req.spec_json).map_err(|e| AgentError::Invalid {
                field: "spec_json",
                reason: e.to_string(),
            })?;
        let process = spec.process().clone().ok_or(AgentError::Invalid {
            field: "spec.process",
            reason: "missing".into(),
        })?;
        validate_process(&process, "spec.process")?;
        let root = spec.root().as_ref().ok_or(AgentError::Invalid {
            field: "spec.root",
            reason: "missing".into(),
        })?;
        if !root.path().is_absolute() || !root.path().is_dir() {
            return Err(AgentError::Invalid {
                field: "spec.root.path",
                reason: format!(
                    "{} is not an absolute path to a directory",
                    root.path().display()
                ),
            });
        }
        for d in spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_ref())
            .into_iter()
            .flatten()
        {
            crate::init::device_kind(d).map_err(|reason| AgentError::Invalid {
                field: "spec.linux.devices",
                reason,
            })?;
        }
        if spec.hooks().is_some() {
            // Hook paths are host executables run in the runtime's namespaces: the host
            // side (runtime/src/oci.rs) strips them; they are never run in the guest.
            tracing::warn!(container = %req.container_id, "spec.hooks ignored: OCI hooks are not run in the guest");
        }
        for m in spec.mounts().iter().flatten() {
            if !m.destination().is_absolute() {
                return Err(AgentError::Invalid {
                    field: "spec.mounts[].destination",
                    reason: format!("{} is not absolute", m.destination().display()),
                });
            }
        }
        {
            let mut map = self.lock_containers();
            if map.contains_key(&req.container_id) {
                return Err(AgentError::Exists {
                    what: "container",
                    id: req.container_id,
                });
            }
            // Reserve the id with a placeholder (an already-exited init) so a concurrent
            // create of the same id fails; replaced or removed below.
            map.insert(
                req.container_id.clone(),
                Arc::new(Container {
                    id: req.container_id.clone(),
                    init: Arc::new(Proc {
                        pid: 0,
                        exit: tokio::sync::watch::channel(Some(crate::reaper::Exit {
                            code: 0,
                            signal: 0,
                        }))
                        .1,
                        stdin: Default::default(),
                        stdout: Default::default(),
                        stderr: Default::default(),
                        tty: None,
                    }),
                    cgroup: None,
                    state: Mutex::new(CState::Created),
                    start: Default::default(),
                    execs: Default::default(),
                    seccomp: None,
                    own_pidns: false,
                    oom_seen: Mutex::new(0),
                }),
            );
        }
        let result = self.create_inner(&req.container_id, spec, process).await;
        let mut map = self.lock_containers();
        match result {
            Ok(c) => {
                map.insert(req.container_id, c);
                Ok(())
            }
            Err(e) => {
                map.remove(&req.container_id);
                Err(e)
            }
        }
    }

    async fn create_inner(&self, id: &str, spec: Spec, process: Process) -> Result<Arc<Container>> {
        let namespaces = crate::namespaces::plan(&spec)
            .and_then(|p| crate::namespaces::check_paths(&p).map(|()| p))
            .map_err(|e| AgentError::Invalid {
                field: "spec.linux.namespaces",
                reason: chain(&e),
            })?;
        let own_pidns = namespaces
            .iter()
            .any(|p| p.ns == crate::namespaces::NsType::Pid && p.path.is_none());
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        let cgroup = match &self.cgroups {
            Some(root) => {
                let cg = root.create(id)?;
                let events = cg.path().join("memory.events");
                if let Err(e) = self.oom_watch.watch(&events) {
                    if events.exists() {
                        tracing::warn!(container = id, error = %chain(&e), "OOM kills of this container will not be reported");
                    } else {
                        tracing::debug!(container = id, "no memory controller: no OOM events");
                    }
                }
                if let Some(Err(e)) = resources.as_ref().map(|r| cg.apply(r)) {
                    let _ = cg.remove().await;
                    return Err(e.into());
                }
                Some(cg)
            }
            None if resources.as_ref().is_some_and(has_limits) => {
                return Err(AgentError::Cgroup(CgroupError::Unavailable));
            }
            None => None,
        };
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        if let Some(s) = &seccomp {
            // Compile once here so a bad profile is a typed error at create time.
            crate::seccomp::compile(s).map_err(|e| AgentError::Invalid {
                field: "spec.linux.seccomp",
                reason: chain(&e),
            })?;
        }
        let cfg = InitConfig {
            tty: process.terminal().unwrap_or(false),
            process,
            cgroup_procs: cgroup.as_ref().map(Cgroup::procs_file),
            seccomp: seccomp.clone(),
            wait_start: true,
            kind: InitKind::Create {
                spec: Box::new(spec),
                namespaces,
            },
        };
        let spawned = match crate::process::spawn(&cfg, &self.reaper).await {
            Ok(s) => s,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.remove().await;
                }
                return Err(e.into());
            }
        };
        let mut status = spawned.status;
        if let Err(e) = status.expect_ready().await {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(spawned.proc.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            spawned.proc.wait().await;
            if let Some(cg) = &cgroup {
                let _ = cg.remove().await;
            }
            return Err(e.into());
        }
        tracing::info!(container = id, pid = spawned.proc.pid, "container created");
        Ok(Arc::new(Container {
            id: id.to_owned(),
            init: spawned.proc,
            cgroup,
            state: Mutex::new(CState::Created),
            start: tokio::sync::Mutex::new((spawned.start, Some(status))),
            execs: Mutex::default(),
            seccomp,
            own_pidns,
            oom_seen: Mutex::new(0),
        }))
    }

    async fn do_start(&self, id: &str) -> Result<u32> {
        let c = self.container(id)?;
        let mut guard = c.start.lock().await;
        let (fd, status) = &mut *guard;
        let (Some(fd), Some(mut st)) = (fd.take(), status.take()) else {
            return Err(AgentError::State {
                id: id.to_owned(),
                state: c.state().name(),
                op: "start",
                needed: "created",
            });
        };
        nix::unistd::write(&fd, b"s").map_err(|e| AgentError::Io {
            op: format!("starting container {id}"),
            source: e.into(),
        })?;
        drop(fd);
        st.expect_exec().await?;
        c.set_state(CState::Running);
        Ok(c.init.pid as u32)
    }

    async fn do_exec(&self, req: ExecProcessRequest) -> Result<u32> {
        let c = self.container(&req.container_id)?;
        validate_id("exec id", &req.exec_id)?;
        if c.state() != CState::Running {
            return Err(AgentError::State {
                id: c.id.clone(),
                state: c.state().name(),
                op: "exec",
                needed: "running",
            });
        }
        let process: Process =
            serde_json::from_slice(&req.process_json).map_err(|e| AgentError::Invalid {
                field: "process_json",
                reason: e.to_string(),
            })?;
        validate_process(&process, "process_json")?;
        if c.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&req.exec_id)
        {
            return Err(AgentError::Exists {
                what: "exec",
                id: req.exec_id,
            });
        }
        let cfg = InitConfig {
            tty: process.terminal().unwrap_or(false),
            process,
            cgroup_procs: c.cgroup.as_ref().map(Cgroup::procs_file),
            // runc semantics: an exec gets the container's seccomp profile; its identity,
            // capabilities, rlimits and no_new_privileges come from its own process spec.
            seccomp: c.seccomp.clone(),
            wait_start: false,
            kind: InitKind::Exec { pid: c.init.pid },
        };
        let spawned = crate::process::spawn(&cfg, &self.reaper).await?;
        let mut st = spawned.status;
        st.expect_exec().await?;
        let pid = spawned.proc.pid as u32;
        c.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.exec_id, spawned.proc);
        Ok(pid)
    }

    async fn do_remove(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        // Unblock a never-started init: closing the start pipe makes it exit.
        c.start.lock().await.0.take();
        self.kill_all(&c)?;
        if c.init.pid > 0 {
            c.init.wait().await;
        }
        if let Some(cg) = &c.cgroup {
            let _ = cg.freeze(false).await;
            cg.kill_all()?;
            cg.remove().await?;
        }
        self.lock_containers().remove(id);
        tracing::info!(container = id, "container removed");
        Ok(())
    }

    fn kill_all(&self, c: &Container) -> Result<()> {
        if c.init.exited().is_some() {
            return Ok(());
        }
        if let Some(cg) = &c.cgroup {
            cg.kill_all()?;
        } else if c.own_pidns {
            // Killing the pid-namespace init kills everything in it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.init.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        } else {
            for pid in self.container_pids(c)? {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        Ok(())
    }

    async fn read_stream(
        &self,
        req: &ReadStreamRequest,
        stderr: bool,
    ) -> Result<ReadStreamResponse> {
        let (_c, p) = self.process(&req.container_id, &req.exec_id)?;
        let max = req.max_len.clamp(1, MAX_READ_CHUNK) as usize;
        let lock = if stderr { &p.stderr } else { &p.stdout };
        let mut guard = lock.lock().await;
        let Some(stream) = guard.as_ref() else {
            return Ok(ReadStreamResponse {
                eof: true,
                ..Default::default()
            });
        };
        let mut buf = vec![0u8; max];
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|source| AgentError::Io {
                op: "reading process output".into(),
                source,
            })?;
        if n == 0 {
            *guard = None;
            return Ok(ReadStreamResponse {
                eof: true,
                ..Default::default()
            });
        }
        buf.truncate(n);
        Ok(ReadStreamResponse {
            data: buf,
            ..Default::default()
        })
    }

    /// Orderly shutdown of every container: SIGTERM to each process of each started
    /// container (a paused one is thawed first, or the signal would wait), up to
    /// `config.stop_grace` for the inits to exit, then the usual removal (SIGKILL to what
    /// is left, cgroups removed). Logs how each container ended.
    pub async fn stop_all(&self) {
        let grace = self.config.stop_grace;
        let all: Vec<Arc<Container>> = self.lock_containers().values().cloned().collect();
        let mut waiting = Vec::new();
        for c in all {
            let state = c.state();
            if matches!(state, CState::Created | CState::Stopped) {
                continue;
            }
            if state == CState::Paused
                && let Some(cg) = &c.cgroup
                && let Err(e) = cg.freeze(false).await
            {
                tracing::warn!(container = %c.id, error = %chain(&e), "thawing before stop");
            }
            match self.container_pids(&c) {
                Ok(pids) => {
                    for pid in pids {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(container = %c.id, error = %chain(&e), "listing processes to stop")
                }
            }
            tracing::info!(container = %c.id, grace_ms = grace.as_millis() as u64, "stopping container (SIGTERM)");
            waiting.push(c);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for c in waiting {
            match tokio::time::timeout_at(deadline, c.init.wait()).await {
                Ok(exit) => {
                    tracing::info!(container = %c.id, status = exit.status(), "container stopped")
                }
                Err(_) => tracing::warn!(
                    container = %c.id,
                    "container did not stop within the grace period: killing it (SIGKILL)"
                ),
            }
        }
        self.destroy_all().await;
    }

    /// Flushes and unmounts the sandbox's virtio-fs shares (last mounted first), so that
    /// the host's file system daemon sees every write before the VM goes away. A busy
    /// share (a process that could not be killed) is detached instead.
    pub fn unmount_shares(&self) {
        nix::unistd::sync();
        let shares = std::mem::take(&mut *self.shares.lock().unwrap_or_else(|p| p.into_inner()));
        for mp in shares.iter().rev() {
            let r = nix::mount::umount2(mp, nix::mount::MntFlags::empty()).or_else(|e| {
                tracing::warn!(mount_point = %mp.display(), error = %e, "unmounting share; detaching it");
                nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH)
            });
            match r {
                Ok(()) => tracing::info!(mount_point = %mp.display(), "share unmounted"),
                Err(e) => {
                    tracing::warn!(mount_point = %mp.display(), error = %e, "cannot unmount share")
                }
            }
        }
    }

    async fn destroy_all(&self) {
        let ids: Vec<String> = self.lock_containers().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.do_remove(&id).await {
                tracing::warn!(container = %id, error = %chain(&e), "removing container during destroy");
            }
        }
    }
}

fn has_limits(r: &LinuxResources) -> bool {
    r.memory()
        .as_ref()
        .is_some_and(|m| m.limit().is_some() || m.reservation().is_some())
        || r.cpu()
            .as_ref()
            .is_some_and(|c| c.quota().is_some() || c.shares().is_some() || c.cpus().is_some())
        || r.pids().is_some()
        || r.unified().as_ref().is_some_and(|u| !u.is_empty())
}

fn validate_process(p: &Process, field: &'static str) -> Result<()> {
    let invalid = |reason: String| AgentError::Invalid { field, reason };
    match p.args() {
        Some(a) if !a.is_empty() && !a[0].is_empty() => {}
        _ => return Err(invalid("args is empty".into())),
    }
    if !p.cwd().is_absolute() {
        return Err(invalid(format!(
            "cwd {} is not absolute",
            p.cwd().display()
        )));
    }
    for e in p.env().iter().flatten() {
        if !e.contains('=') {
            return Err(invalid(format!("env entry {e:?} has no '='")));
        }
    }
    Ok(())
}

fn empty() -> Empty {
    Empty::new()
}

fn uptime_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[async_trait::async_trait]
impl Agent for AgentService {
    async fn version(
        &self,
        _ctx: &TtrpcContext,
        req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
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

    async fn health(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<HealthResponse> {
        Ok(HealthResponse {
            status: "SERVING".into(),
            uptime_ms: uptime_ms(self.started),
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        validate_id("sandbox id", &req.sandbox_id).map_err(AgentError::from)?;
        {
            let mut sb = self.sandbox.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(existing) = &*sb {
                return Err(AgentError::Exists {
                    what: "sandbox",
                    id: existing.clone(),
                }
                .into());
            }
            *sb = Some(req.sandbox_id.clone());
        }
        let r = (|| -> Result<()> {
            if self.config.mode == Mode::Host {
                if !req.shares.is_empty() || !req.sysctls.is_empty() || !req.hostname.is_empty() {
                    return Err(AgentError::HostMode(
                        "CreateSandbox with shares, sysctls or hostname",
                    ));
                }
                return Ok(());
            }
            if !req.hostname.is_empty() {
                nix::unistd::sethostname(&req.hostname).map_err(|e| AgentError::Io {
                    op: format!("sethostname({:?})", req.hostname),
                    source: e.into(),
                })?;
            }
            for s in &req.shares {
                crate::pid1::mount_virtiofs(&s.tag, Path::new(&s.mount_point), s.read_only)
                    .map_err(|e| AgentError::Invalid {
                        field: "shares",
                        reason: chain(&e),
                    })?;
                self.shares
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(PathBuf::from(&s.mount_point));
            }
            for (k, v) in &req.sysctls {
                let path =
                    crate::ids::relative_inside(Path::new("/proc/sys"), &k.replace('.', "/"))?;
                std::fs::write(&path, v).map_err(|source| AgentError::Io {
                    op: format!("setting sysctl {k}"),
                    source,
                })?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            *self.sandbox.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(e.into());
        }
        tracing::info!(sandbox = %req.sandbox_id, "sandbox created");
        Ok(empty())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        validate_id("sandbox id", &req.sandbox_id).map_err(AgentError::from)?;
        let current = self
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current.as_deref() != Some(req.sandbox_id.as_str()) {
            return Err(AgentError::NoContainer(format!("sandbox {}", req.sandbox_id)).into());
        }
        self.destroy_all().await;
        *self.sandbox.lock().unwrap_or_else(|p| p.into_inner()) = None;
        tracing::info!(sandbox = %req.sandbox_id, "sandbox destroyed");
        if self.config.mode == Mode::Guest {
            self.unmount_shares();
            let _ = self.shutdown.send(ShutdownKind::PowerOff);
        }
        Ok(empty())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.do_create(req).await?;
        Ok(empty())
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StartResponse> {
        let pid = self.do_start(&req.container_id).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.do_remove(&req.container_id).await?;
        Ok(empty())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let c = self.container(&req.container_id)?;
        if c.state() != CState::Running {
            return Err(AgentError::State {
                id: c.id.clone(),
                state: c.state().name(),
                op: "pause",
                needed: "running",
            }
            .into());
        }
        self.cgroup_of(&c)?
            .freeze(true)
            .await
            .map_err(AgentError::from)?;
        c.set_state(CState::Paused);
        Ok(empty())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let c = self.container(&req.container_id)?;
        if c.state() != CState::Paused {
            return Err(AgentError::State {
                id: c.id.clone(),
                state: c.state().name(),
                op: "resume",
                needed: "paused",
            }
            .into());
        }
        self.cgroup_of(&c)?
            .freeze(false)
            .await
            .map_err(AgentError::from)?;
        c.set_state(CState::Running);
        Ok(empty())
    }

    async fn update_resources(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateResourcesRequest,
    ) -> ttrpc::Result<Empty> {
        let c = self.container(&req.container_id)?;
        let res: LinuxResources =
            serde_json::from_slice(&req.resources_json).map_err(|e| AgentError::Invalid {
                field: "resources_json",
                reason: e.to_string(),
            })?;
        self.cgroup_of(&c)?.apply(&res).map_err(AgentError::from)?;
        Ok(empty())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsResponse> {
        let c = self.container(&req.container_id)?;
        Ok(self.cgroup_of(&c)?.stats())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let c = self.container(&req.container_id)?;
        let mut pids = self.container_pids(&c)?;
        pids.sort_unstable();
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        loop {
            let notified = self.oom.notify.notified();
            if let Some(id) = self
                .oom
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                return Ok(OomEvent {
                    container_id: id,
                    ..Default::default()
                });
            }
            notified.await;
        }
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<StartResponse> {
        let pid = self.do_exec(req).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalRequest,
    ) -> ttrpc::Result<Empty> {
        let (c, p) = self.process(&req.container_id, &req.exec_id)?;
        let sig = nix::sys::signal::Signal::try_from(req.signal as i32).map_err(|_| {
            AgentError::Invalid {
                field: "signal",
                reason: format!("{} is not a signal number", req.signal),
            }
        })?;
        if p.exited().is_some() || p.pid <= 0 {
            return Err(AgentError::State {
                id: c.id.clone(),
                state: "stopped",
                op: "signal",
                needed: "a live process",
            }
            .into());
        }
        if req.all && req.exec_id.is_empty() {
            for pid in self.container_pids(&c)? {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
            }
        } else {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig)
                .map_err(|e| kill_error(&c.id, p.pid, sig, e))?;
        }
        Ok(empty())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitResponse> {
        let (c, p) = self.process(&req.container_id, &req.exec_id)?;
        if req.exec_id.is_empty() && c.state() == CState::Created {
            return Err(AgentError::State {
                id: c.id.clone(),
                state: "created",
                op: "wait",
                needed: "started",
            }
            .into());
        }
        let e = p.wait().await;
        Ok(WaitResponse {
            exit_code: e.code,
            signal: e.signal,
            exit_status: e.status(),
            ..Default::default()
        })
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStdinRequest,
    ) -> ttrpc::Result<WriteStdinResponse> {
        if req.data.len() > MAX_WRITE_CHUNK {
            return Err(AgentError::Invalid {
                field: "data",
                reason: format!(
                    "{} bytes exceed the {MAX_WRITE_CHUNK}-byte limit",
                    req.data.len()
                ),
            }
            .into());
        }
        let (_c, p) = self.process(&req.container_id, &req.exec_id)?;
        let guard = p.stdin.lock().await;
        let Some(stdin) = guard.as_ref() else {
            return Err(AgentError::State {
                id: req.container_id.clone(),
                state: "stdin closed",
                op: "write stdin",
                needed: "open stdin",
            }
            .into());
        };
        let mut done = 0;
        while done < req.data.len() {
            let n = stdin
                .write(&req.data[done..])
                .await
                .map_err(|source| AgentError::Io {
                    op: "writing stdin".into(),
                    source,
                })?;
            done += n;
        }
        Ok(WriteStdinResponse {
            len: done as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        let (_c, p) = self.process(&req.container_id, &req.exec_id)?;
        let mut guard = p.stdin.lock().await;
        if let (Some(s), true) = (guard.as_ref(), p.tty.is_some()) {
            // A terminal has no half-close: send the EOF character (VEOF, ^D).
            let _ = s.write(&[4]).await;
        }
        *guard = None;
        Ok(empty())
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        Ok(self.read_stream(&req, false).await?)
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        Ok(self.read_stream(&req, true).await?)
    }

    async fn resize_tty(&self, _ctx: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        let (_c, p) = self.process(&req.container_id, &req.exec_id)?;
        let tty = p.tty.as_ref().ok_or(AgentError::Invalid {
            field: "exec_id",
            reason: "the process has no terminal".into(),
        })?;
        let rows = u16::try_from(req.rows).map_err(|_| AgentError::Invalid {
            field: "rows",
            reason: "above 65535".into(),
        })?;
        let cols = u16::try_from(req.cols).map_err(|_| AgentError::Invalid {
            field: "cols",
            reason: "above 65535".into(),
        })?;
        crate::sys::set_winsize(tty.as_fd(), rows, cols).map_err(|source| AgentError::Io {
            op: "TIOCSWINSZ".into(),
            source,
        })?;
        Ok(empty())
    }

    async fn set_guest_time(
        &self,
        _ctx: &TtrpcContext,
        req: SetTimeRequest,
    ) -> ttrpc::Result<Empty> {
        if self.config.mode == Mode::Host {
            return Err(AgentError::HostMode("SetGuestTime").into());
        }
        if req.nsec >= 1_000_000_000 || req.sec < 0 {
            return Err(AgentError::Invalid {
                field: "sec/nsec",
                reason: "negative seconds or nsec >= 1e9".into(),
            }
            .into());
        }
        let ts = nix::sys::time::TimeSpec::new(req.sec, i64::from(req.nsec));
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|e| {
            AgentError::Io {
                op: "clock_settime(CLOCK_REALTIME)".into(),
                source: e.into(),
            }
        })?;
        Ok(empty())
    }

    async fn copy_file(&self, _ctx: &TtrpcContext, req: CopyFileRequest) -> ttrpc::Result<Empty> {
        Ok(copy_file(&self.config.shared_dir, &req)?)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        self.destroy_all().await;
        if self.config.mode == Mode::Guest {
            self.unmount_shares();
        }
        let _ = self.shutdown.send(ShutdownKind::PowerOff);
        Ok(empty())
    }
}

/// CopyFile: writes `data` at `offset` into `shared_dir/path` (never following a symlink
/// in the final component, never leaving `shared_dir`).
pub fn copy_file(shared_dir: &Path, req: &CopyFileRequest) -> Result<Empty> {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if req.data.len() > MAX_WRITE_CHUNK {
        return Err(AgentError::Invalid {
            field: "data",
            reason: format!(
                "{} bytes exceed the {MAX_WRITE_CHUNK}-byte limit",
                req.data.len()
            ),
        });
    }
    let dest = crate::ids::relative_inside(shared_dir, &req.path)?;
    let io_err = |op: &str| {
        let op = format!("{op} {}", dest.display());
        move |source| AgentError::Io { op, source }
    };
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("creating parent of"))?;
        // A symlinked directory on the way could lead outside: refuse.
        let canon = parent.canonicalize().map_err(io_err("resolving"))?;
        let base = shared_dir
            .canonicalize()
            .map_err(io_err("resolving shared dir for"))?;
        if !canon.starts_with(&base) {
            return Err(AgentError::Id(IdError::Escapes {
                path: req.path.clone(),
                root: shared_dir.to_owned(),
            }));
        }
    }
    let mode = if req.mode == 0 {
        0o644
    } else {
        req.mode & 0o7777
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(req.offset == 0)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&dest)
        .map_err(io_err("opening"))?;
    f.seek(SeekFrom::Start(req.offset))
        .map_err(io_err("seeking in"))?;
    f.write_all(&req.data).map_err(io_err("writing"))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod"))?;
    nix::unistd::fchown(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        Some(nix::unistd::Uid::from_raw(req.uid)),
        Some(nix::unistd::Gid::from_raw(req.gid)),
    )
    .map_err(|e| AgentError::Io {
        op: format!("chown {}", dest.display()),
        source: e.into(),
    })?;
    Ok(empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn a_process_reaped_before_the_signal_is_already_stopped() {
        // The race: the agent still had the process as live, the reaper had collected it.
        let e = kill_error("c1", 36, Signal::SIGKILL, nix::Error::ESRCH);
        assert_eq!(e.code(), ttrpc::Code::FAILED_PRECONDITION, "{e}");
        assert!(e.to_string().contains("stopped"), "{e}");
        let e = kill_error("c1", 36, Signal::SIGKILL, nix::Error::EPERM);
        assert_eq!(e.code(), ttrpc::Code::INTERNAL, "{e}");
        assert!(e.to_string().contains("kill(36, SIGKILL)"), "{e}");
    }
}
