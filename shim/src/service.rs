//! containerd's side: the shim v2 lifecycle (`start`, `delete`, serving) and the Task
//! service, mapped onto [`Tasks`]; events forwarded to containerd's event service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::{ExitSignal, Shim, spawn};
use containerd_shim::event::Event as ShimEvent;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::ttrpc::{Code, get_status};

fn get_rpc_status(code: Code, msg: impl ToString) -> containerd_shim::protos::ttrpc::Error {
    containerd_shim::protos::ttrpc::Error::RpcStatus(get_status(code, msg))
}
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Context, DeleteResponse, Error, Flags, StartOpts, TtrpcResult};
use tokio::sync::{Mutex, mpsc};

use crate::backend::{Backend, RootfsMount};
use crate::pod::Role;
use crate::stdio::StdioPaths;
use crate::tasks::{CreateRequest, Event, Exit, ProcState, TaskError, Tasks};

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.carapace.v2";

/// Exit status `shim delete` reports for a task whose shim was killed.
use crate::tasks::KILLED_STATUS;

/// Builds the backend; the binary passes the real one.
pub type BackendFactory = fn() -> Result<Arc<dyn Backend>, String>;

/// The shim: lifecycle and Task service.
#[derive(Clone)]
pub struct Service {
    id: String,
    namespace: String,
    /// containerd's address (`-address`), from which the pod's shim socket is derived.
    containerd_address: String,
    bundle: PathBuf,
    tasks: Arc<Tasks>,
    backend: Arc<dyn Backend>,
    events: Arc<Mutex<Option<mpsc::UnboundedReceiver<Event>>>>,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

static FACTORY: std::sync::OnceLock<BackendFactory> = std::sync::OnceLock::new();

/// Sets how the shim builds its backend; call before [`containerd_shim::asynchronous::run`].
pub fn set_backend_factory(f: BackendFactory) {
    let _ = FACTORY.set(f);
}

fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    })
}

/// containerd's error for a task error: the code it understands, the whole chain as text.
fn status(e: TaskError) -> containerd_shim::protos::ttrpc::Error {
    let code = match &e {
        TaskError::NotFound { .. } | TaskError::Finished { .. } => Code::NOT_FOUND,
        TaskError::AlreadyExists { .. } => Code::ALREADY_EXISTS,
        TaskError::WrongState { .. } => Code::FAILED_PRECONDITION,
        TaskError::Pod { .. } | TaskError::Spec { .. } | TaskError::Stdio { .. } => {
            Code::INVALID_ARGUMENT
        }
        _ => Code::INTERNAL,
    };
    let msg = carapace_errors::chain(&e);
    tracing::warn!(error = %msg, "request failed");
    get_rpc_status(code, msg)
}

/// Converts a task event into containerd's event message.
pub fn to_shim_event(ev: Event) -> Box<dyn ShimEvent + Send + Sync> {
    match ev {
        Event::Create {
            id,
            bundle,
            stdio,
            pid,
        } => Box::new(TaskCreate {
            container_id: id,
            bundle: bundle.display().to_string(),
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                terminal: stdio.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        }),
        Event::Start { id, pid } => Box::new(TaskStart {
            container_id: id,
            pid,
            ..Default::default()
        }),
        Event::ExecAdded { id, exec_id } => Box::new(TaskExecAdded {
            container_id: id,
            exec_id,
            ..Default::default()
        }),
        Event::ExecStarted { id, exec_id, pid } => Box::new(TaskExecStarted {
            container_id: id,
            exec_id,
            pid,
            ..Default::default()
        }),
        Event::Exit {
            id,
            exec_id,
            pid,
            exit,
        } => Box::new(TaskExit {
            // containerd wants the container id as the process id of an init's exit
            id: if exec_id.is_empty() {
                id.clone()
            } else {
                exec_id
            },
            container_id: id,
            pid,
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        }),
        Event::Paused { id } => Box::new(TaskPaused {
            container_id: id,
            ..Default::default()
        }),
        Event::Resumed { id } => Box::new(TaskResumed {
            container_id: id,
            ..Default::default()
        }),
        Event::Oom { id } => Box::new(TaskOOM {
            container_id: id,
            ..Default::default()
        }),
        Event::Delete { id, pid, exit } => Box::new(TaskDelete {
            container_id: id.clone(),
            id,
            pid,
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        }),
    }
}

/// The agent's cgroup statistics as containerd's cgroup v2 metrics (what `ctr task metrics`
/// and the CRI plugin decode from the `stats` reply).
pub fn to_metrics(s: &carapace_runtime::agent::ContainerStats) -> cg2::Metrics {
    let mut m = cg2::Metrics::new();
    if let Some(p) = s.pids.as_ref() {
        m.pids = MessageField::some(cg2::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = MessageField::some(cg2::CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(x) = s.memory.as_ref() {
        m.memory = MessageField::some(cg2::MemoryStat {
            anon: x.anon,
            file: x.file,
            kernel_stack: x.kernel_stack,
            slab: x.slab,
            sock: x.sock,
            shmem: x.shmem,
            file_mapped: x.file_mapped,
            file_dirty: x.file_dirty,
            file_writeback: x.file_writeback,
            pgfault: x.pgfault,
            pgmajfault: x.pgmajfault,
            inactive_anon: x.inactive_anon,
            active_anon: x.active_anon,
            inactive_file: x.inactive_file,
            active_file: x.active_file,
            unevictable: x.unevictable,
            usage: x.usage,
            usage_limit: x.usage_limit,
            swap_usage: x.swap_usage,
            swap_limit: x.swap_limit,
            ..Default::default()
        });
    }
    if let Some(io) = s.io.as_ref() {
        m.io = MessageField::some(cg2::IOStat {
            usage: io
                .usage
                .iter()
                .map(|e| cg2::IOEntry {
                    major: e.major,
                    minor: e.minor,
                    rbytes: e.rbytes,
                    wbytes: e.wbytes,
                    rios: e.rios,
                    wios: e.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    if let Some(e) = s.memory_events.as_ref() {
        m.memory_events = MessageField::some(cg2::MemoryEvents {
            low: e.low,
            high: e.high,
            max: e.max,
            oom: e.oom,
            oom_kill: e.oom_kill,
            ..Default::default()
        });
    }
    m
}

fn stdio(stdin: String, stdout: String, stderr: String, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin,
        stdout,
        stderr,
        terminal,
    }
}

fn exit_fields(exit: Exit) -> (u32, MessageField<Timestamp>) {
    (exit.status, timestamp(exit.at))
}

#[async_trait]
impl Shim for Service {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let backend = match FACTORY.get().map(|f| f()) {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                eprintln!("containerd-shim-carapace-v2: {e}");
                std::process::exit(2);
            }
            None => {
                eprintln!("containerd-shim-carapace-v2: no backend configured");
                std::process::exit(2);
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        Service {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            containerd_address: args.address.clone(),
            bundle: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(&args.bundle)),
            tasks: Arc::new(Tasks::new(backend.clone(), tx)),
            backend,
            events: Arc::new(Mutex::new(Some(rx))),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // One shim (and one VM) per pod: containers of a pod group under its sandbox id.
        let role = Role::from_bundle(&self.bundle).unwrap_or(Role::Standalone);
        let grouping = role.vm_id(&opts.id).to_owned();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd reads `<bundle>/address` to reach the shims again after a restart
        // (without it a restarted containerd takes every running shim for dead); the crate
        // writes it only for a container joining a running shim. Atomically, as runc's
        // shim does.
        let file = self.bundle.join("address");
        let tmp = self.bundle.join(".address.tmp");
        let written = match tokio::fs::write(&tmp, &address).await {
            Ok(()) => tokio::fs::rename(&tmp, &file).await,
            Err(e) => Err(e),
        };
        written.map_err(|e| Error::Other(format!("cannot write {}: {e}", file.display())))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let (backend, id, bundle) = (self.backend.clone(), self.id.clone(), self.bundle.clone());
        // containerd 1.6 runs `shim delete` whenever its connection for a task closes, which
        // includes every ordinary task delete. While the pod's shim still serves, it owns
        // what is left (a pod sandbox whose VM waits for the pod's last container); only a
        // dead shim's leftovers are ours to clean.
        let grouping = Role::from_bundle(&bundle)
            .unwrap_or(Role::Standalone)
            .vm_id(&id)
            .to_owned();
        let socket =
            containerd_shim::socket_address(&self.containerd_address, &self.namespace, &grouping);
        if shim_serving(&bundle, &socket) {
            tracing::info!(id, "the shim still serves this bundle: nothing to clean up");
        } else {
            if let Err(e) = backend.cleanup(&id, &bundle).await {
                return Err(Error::Other(format!("{e}: {}", e.source)));
            }
        }
        Ok(DeleteResponse {
            exit_status: KILLED_STATUS,
            exited_at: timestamp(SystemTime::now()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        if let Some(mut rx) = self.events.lock().await.take() {
            let namespace = self.namespace.clone();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    let ev = to_shim_event(ev);
                    let topic = ev.topic();
                    if let Err(e) = publisher
                        .publish(Context::default(), &topic, &namespace, ev)
                        .await
                    {
                        tracing::warn!(%topic, error = %e, "cannot publish event");
                    }
                }
            });
        }
        self.clone()
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(get_rpc_status(
                Code::UNIMPLEMENTED,
                "checkpoint/restore is not supported by Carapace",
            ));
        }
        // Which configuration builds this container's VM: the handler's runtime options.
        let config_path = crate::options::config_path(req.options.as_ref())
            .map_err(|e| get_rpc_status(Code::INVALID_ARGUMENT, carapace_errors::chain(&e)))?;
        crate::options::record(
            Path::new(&req.bundle),
            &crate::options::Recorded { config_path },
        )
        .map_err(|e| get_rpc_status(Code::FAILED_PRECONDITION, carapace_errors::chain(&e)))?;
        let rootfs = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let pid = self
            .tasks
            .create(CreateRequest {
                id: req.id.clone(),
                bundle: PathBuf::from(&req.bundle),
                rootfs,
                stdio: stdio(req.stdin, req.stdout, req.stderr, req.terminal),
            })
            .await
            .map_err(status)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self
            .tasks
            .start(&req.id, &req.exec_id)
            .await
            .map_err(status)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = self
            .tasks
            .delete(&req.id, &req.exec_id)
            .await
            .map_err(status)?;
        let (exit_status, exited_at) = exit_fields(exit);
        Ok(api::DeleteResponse {
            pid,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        // The spec is the OCI process as JSON inside an Any.
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if serde_json::from_slice::<serde_json::Value>(&spec).is_err() {
            return Err(get_rpc_status(
                Code::INVALID_ARGUMENT,
                format!(
                    "exec {}: the process spec is not OCI process JSON",
                    req.exec_id
                ),
            ));
        }
        self.tasks
            .exec(
                &req.id,
                &req.exec_id,
                spec,
                stdio(req.stdin, req.stdout, req.stderr, req.terminal),
            )
            .map_err(status)?;
        Ok(api::Empty::default())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.tasks
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(status)?;
        Ok(api::Empty::default())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let exit = self
            .tasks
            .wait(&req.id, &req.exec_id)
            .await
            .map_err(status)?;
        let (exit_status, exited_at) = exit_fields(exit);
        Ok(api::WaitResponse {
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let p = self.tasks.state(&req.id, &req.exec_id).map_err(status)?;
        let state = match p.state {
            ProcState::Created => api::Status::CREATED,
            ProcState::Running => api::Status::RUNNING,
            ProcState::Paused => api::Status::PAUSED,
            ProcState::Stopped => api::Status::STOPPED,
        };
        let (exit_status, exited_at) = p.exit.map(exit_fields).unwrap_or_default();
        Ok(api::StateResponse {
            id: p.id,
            exec_id: p.exec_id,
            bundle: p.bundle.display().to_string(),
            pid: p.pid,
            status: state.into(),
            stdin: p.stdio.stdin,
            stdout: p.stdio.stdout,
            stderr: p.stdio.stderr,
            terminal: p.stdio.terminal,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = self.tasks.pids(&req.id).await.map_err(status)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.tasks
            .resize(&req.id, &req.exec_id, req.width, req.height)
            .await
            .map_err(status)?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.tasks
                .close_stdin(&req.id, &req.exec_id)
                .await
                .map_err(status)?;
        }
        Ok(api::Empty::default())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.tasks.state(&req.id, "").map(|p| p.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.tasks.pause(&req.id).await.map_err(status)?;
        Ok(api::Empty::default())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.tasks.resume(&req.id).await.map_err(status)?;
        Ok(api::Empty::default())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        // containerd marshals the OCI LinuxResources as JSON inside the Any, which is what
        // the agent takes.
        let Some(resources) = req.resources.as_ref() else {
            return Err(get_rpc_status(
                Code::INVALID_ARGUMENT,
                "update without resources",
            ));
        };
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&resources.value) {
            return Err(get_rpc_status(
                Code::INVALID_ARGUMENT,
                format!(
                    "resources of type {:?} are not the JSON LinuxResources containerd sends: {e}",
                    resources.type_url
                ),
            ));
        }
        self.tasks
            .update(&req.id, resources.value.clone())
            .await
            .map_err(status)?;
        Ok(api::Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let stats = self.tasks.stats(&req.id).await.map_err(status)?;
        let any = containerd_shim::util::convert_to_any(Box::new(to_metrics(&stats)))
            .map_err(|e| get_rpc_status(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        // containerd asks after each delete; the shim stays while its pod has containers.
        if req.now || self.tasks.is_empty() {
            tracing::info!(id = %req.id, "shutting down");
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

/// Whether a shim process still accepts connections on `socket` (the pod's shim socket as
/// `shim start` derives it) or on the one recorded in `<bundle>/address`. A killed shim
/// leaves its socket file behind, but nothing accepts on it.
pub fn shim_serving(bundle: &Path, socket: &str) -> bool {
    let recorded = std::fs::read_to_string(bundle.join("address")).unwrap_or_default();
    [socket, recorded.trim()].iter().any(|address| {
        let path = address.trim_start_matches("unix://");
        !path.is_empty() && std::os::unix::net::UnixStream::connect(path).is_ok()
    })
}

/// The bundle a `shim start`/`shim delete` runs in (containerd sets the working directory).
pub fn bundle_dir(flags_bundle: &str) -> PathBuf {
    if flags_bundle.is_empty() {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    } else {
        Path::new(flags_bundle).to_path_buf()
    }
}

#[cfg(test)]
mod tests;
