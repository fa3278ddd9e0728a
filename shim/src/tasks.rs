//! The shim's task logic, free of containerd's wire types: the containers and processes
//! this shim runs, their states, their stdio streams and their events. One exit event per
//! process, sent after its output is drained, so `ctr run` sees all output before the exit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use carapace_runtime::agent::{AgentError, Session};
use carapace_runtime::oci::Bundle;
use tokio::sync::{mpsc, watch};

use crate::backend::{Backend, RootfsMount};
use crate::pod::Role;
use crate::stdio::StdioPaths;

/// Exit status reported when the agent could not tell how a process ended (the VM died).
pub const LOST_EXIT_STATUS: u32 = 255;
/// Exit status of a process killed by SIGKILL (128 + 9), as a shell reports it.
pub const KILLED_STATUS: u32 = 128 + SIGKILL;
/// SIGKILL's number.
const SIGKILL: u32 = 9;

mod types;
mod vm_watch;
pub use types::{Event, Exit, ProcInfo, ProcState, TaskError};

struct Proc {
    stdio: StdioPaths,
    /// The OCI process JSON of an exec, sent to the agent at start.
    spec: Option<Vec<u8>>,
    pid: u32,
    state: ProcState,
    exit: watch::Sender<Option<Exit>>,
}

impl Proc {
    fn new(stdio: StdioPaths, spec: Option<Vec<u8>>) -> Self {
        Self {
            stdio,
            spec,
            pid: 0,
            state: ProcState::Created,
            exit: watch::channel(None).0,
        }
    }
}

struct Container {
    bundle: PathBuf,
    role: Role,
    /// The shim killed this container's VM (its agent could not deliver a SIGKILL): its
    /// processes, lost with the VM, were killed.
    vm_killed: bool,
    /// `delete` is tearing it down: its VM's helpers ending is no news.
    deleting: bool,
    /// The session to the agent of this container's VM (shared by a pod's containers).
    agent: Session,
    init: Proc,
    execs: HashMap<String, Proc>,
}

impl Container {
    fn proc(&self, id: &str, exec_id: &str) -> Result<&Proc, TaskError> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| TaskError::NotFound {
            kind: "process",
            id: format!("{id}/{exec_id}"),
        })
    }

    fn proc_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Proc, TaskError> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| TaskError::NotFound {
                kind: "process",
                id: format!("{id}/{exec_id}"),
            })
    }
}

/// What `create` needs.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Rootfs mounts to make at `<bundle>/rootfs`.
    pub rootfs: Vec<RootfsMount>,
    /// The init's stdio.
    pub stdio: StdioPaths,
}

/// The containers of this shim.
pub struct Tasks {
    backend: Arc<dyn Backend>,
    events: mpsc::UnboundedSender<Event>,
    containers: Mutex<HashMap<String, Container>>,
    /// Pod sandboxes deleted while containers of their pod were still in the table: their
    /// VM is stopped when the last of those is deleted (sandbox id → its bundle and the
    /// VM's session).
    deferred: Mutex<HashMap<String, (PathBuf, Session)>>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").finish_non_exhaustive()
    }
}

fn proc_name(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        id.to_owned()
    } else {
        format!("{id}/{exec_id}")
    }
}

fn agent_err(id: &str, exec_id: &str) -> impl FnOnce(AgentError) -> TaskError {
    let id = proc_name(id, exec_id);
    move |source| TaskError::Agent {
        id,
        source: Box::new(source),
    }
}

/// How long a signal refused by the agent for a process that has exited waits for that exit
/// to reach the shim (its output is still being drained).
const EXIT_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);

impl Tasks {
    /// An empty task table sending its events to `events`.
    pub fn new(backend: Arc<dyn Backend>, events: mpsc::UnboundedSender<Event>) -> Self {
        Self {
            backend,
            events,
            containers: Mutex::new(HashMap::new()),
            deferred: Mutex::new(HashMap::new()),
        }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        // a panic while holding the lock leaves consistent data: every update is one assignment
        self.containers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn emit(&self, event: Event) {
        tracing::debug!(?event, "event");
        let _ = self.events.send(event);
    }

    /// Whether no container is left and no VM waits to be stopped (the shim may exit).
    pub fn is_empty(&self) -> bool {
        self.table().is_empty() && self.deferred_vms().is_empty()
    }

    /// Creates a container: reads its pod role, creates it through the backend.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<u32, TaskError> {
        if self.table().contains_key(&req.id) {
            return Err(TaskError::AlreadyExists {
                kind: "container",
                id: req.id,
            });
        }
        // The bundle's spec is read once here; the role and the guest spec come from it.
        let bundle = Bundle::load(&req.bundle).map_err(|source| TaskError::Spec {
            id: req.id.clone(),
            source,
        })?;
        let role = Role::from_spec(&bundle.spec).map_err(|source| TaskError::Pod {
            id: req.id.clone(),
            source,
        })?;
        // A container of a pod whose sandbox this shim runs joins over the VM's session.
        let pod = match &role {
            Role::Container { sandbox_id } => self.table().get(sandbox_id).map(|c| c.agent.clone()),
            Role::Sandbox | Role::Standalone => None,
        };
        let agent = self
            .backend
            .create(&req.id, &bundle, &req.rootfs, &role, pod.as_ref())
            .await?;
        tracing::info!(id = %req.id, ?role, "created");
        if role.owns_vm() {
            self.watch_oom(agent.clone(), &req.id);
            self.watch_helpers(&req.id);
        }
        let container = Container {
            bundle: req.bundle.clone(),
            role,
            vm_killed: false,
            deleting: false,
            agent,
            init: Proc::new(req.stdio.clone(), None),
            execs: HashMap::new(),
        };
        self.table().insert(req.id.clone(), container);
        self.emit(Event::Create {
            id: req.id,
            bundle: req.bundle,
            stdio: req.stdio,
            pid: 0,
        });
        Ok(0)
    }

    /// Registers an exec (started by [`Tasks::start`]).
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        spec_json: Vec<u8>,
        stdio: StdioPaths,
    ) -> Result<(), TaskError> {
        if exec_id.is_empty() {
            return Err(TaskError::WrongState {
                op: "exec with an empty exec id in",
                id: id.to_owned(),
                state: "a container",
            });
        }
        let mut table = self.table();
        let c = table.get_mut(id).ok_or_else(|| TaskError::NotFound {
            kind: "container",
            id: id.to_owned(),
        })?;
        if c.init.state != ProcState::Running {
            return Err(TaskError::WrongState {
                op: "exec in",
                id: id.to_owned(),
                state: c.init.state.as_str(),
            });
        }
        if c.execs.contains_key(exec_id) {
            return Err(TaskError::AlreadyExists {
                kind: "process",
                id: proc_name(id, exec_id),
            });
        }
        c.execs
            .insert(exec_id.to_owned(), Proc::new(stdio, Some(spec_json)));
        drop(table);
        self.emit(Event::ExecAdded {
            id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        });
        Ok(())
    }

    /// Starts the init (`exec_id` empty) or a registered exec; streams its stdio and
    /// watches for its exit. Returns its pid.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let name = proc_name(id, exec_id);
        let (agent, role, stdio, spec) = {
            let table = self.table();
            let c = table.get(id).ok_or_else(|| TaskError::NotFound {
                kind: "container",
                id: id.to_owned(),
            })?;
            let p = c.proc(id, exec_id)?;
            if p.state != ProcState::Created {
                return Err(TaskError::WrongState {
                    op: "start",
                    id: name,
                    state: p.state.as_str(),
                });
            }
            (
                c.agent.clone(),
                c.role.clone(),
                p.stdio.clone(),
                p.spec.clone(),
            )
        };
        // Open stdio before starting, so no output is produced with nowhere to go.
        let io = stdio.open().map_err(|source| TaskError::Stdio {
            id: name.clone(),
            source,
        })?;
        let pid = match spec {
            None => self.backend.start(id, &role, &agent).await?,
            Some(spec) => agent
                .exec_process(id, exec_id, &spec)
                .await
                .map_err(agent_err(id, exec_id))?,
        };
        {
            let mut table = self.table();
            if let Some(p) = table.get_mut(id).and_then(|c| c.proc_mut(id, exec_id).ok()) {
                p.pid = pid;
                p.state = ProcState::Running;
            }
        }
        self.emit(if exec_id.is_empty() {
            Event::Start {
                id: id.to_owned(),
                pid,
            }
        } else {
            Event::ExecStarted {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
            }
        });
        self.watch(agent, id, exec_id, pid, io);
        tracing::info!(process = %name, pid, "started");
        if !exec_id.is_empty() {
            self.backend
                .fault_point(id, carapace_runtime::faults::Point::ExecStarted);
        }
        Ok(pid)
    }

    /// The agent of a container whose init is in one of `states`.
    fn agent_in(
        &self,
        id: &str,
        op: &'static str,
        states: &[ProcState],
    ) -> Result<Session, TaskError> {
        let table = self.table();
        let c = table.get(id).ok_or_else(|| TaskError::NotFound {
            kind: "container",
            id: id.to_owned(),
        })?;
        if !states.contains(&c.init.state) {
            return Err(TaskError::WrongState {
                op,
                id: id.to_owned(),
                state: c.init.state.as_str(),
            });
        }
        Ok(c.agent.clone())
    }

    /// Moves a container's init from `from` to `to` unless it changed meanwhile (exited).
    fn transition(&self, id: &str, from: ProcState, to: ProcState) -> bool {
        let mut table = self.table();
        match table.get_mut(id) {
            Some(c) if c.init.state == from => {
                c.init.state = to;
                true
            }
            _ => false,
        }
    }

    /// Freezes every process of a running container.
    pub async fn pause(&self, id: &str) -> Result<(), TaskError> {
        let agent = self.agent_in(id, "pause", &[ProcState::Running])?;
        agent.pause(id).await.map_err(agent_err(id, ""))?;
        if self.transition(id, ProcState::Running, ProcState::Paused) {
            self.emit(Event::Paused { id: id.to_owned() });
        }
        Ok(())
    }

    /// Thaws a paused container.
    pub async fn resume(&self, id: &str) -> Result<(), TaskError> {
        let agent = self.agent_in(id, "resume", &[ProcState::Paused])?;
        agent.resume(id).await.map_err(agent_err(id, ""))?;
        if self.transition(id, ProcState::Paused, ProcState::Running) {
            self.emit(Event::Resumed { id: id.to_owned() });
        }
        Ok(())
    }

    /// Applies an OCI `linux.resources` object (JSON) to a container: the backend resizes
    /// its VM first, then updates the guest's cgroup.
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<(), TaskError> {
        let agent = self.agent_in(
            id,
            "update",
            &[ProcState::Created, ProcState::Running, ProcState::Paused],
        )?;
        Ok(self.backend.update(id, &resources_json, &agent).await?)
    }

    /// The container's cgroup statistics.
    pub async fn stats(
        &self,
        id: &str,
    ) -> Result<carapace_runtime::agent::ContainerStats, TaskError> {
        let agent = self.agent_in(
            id,
            "read the statistics of",
            &[ProcState::Created, ProcState::Running, ProcState::Paused],
        )?;
        agent.stats(id).await.map_err(agent_err(id, ""))
    }

    /// Streams a started process's stdio until it exits, then records the exit and sends
    /// the one exit event.
    fn watch(
        self: &Arc<Self>,
        agent: Session,
        id: &str,
        exec_id: &str,
        pid: u32,
        io: carapace_runtime::stdio::HostIo,
    ) {
        let me = self.clone();
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        tokio::spawn(async move {
            let status = match carapace_runtime::stdio::stream_until_exit(&agent, &id, &exec_id, io)
                .await
            {
                Ok(info) => {
                    if exec_id.is_empty() {
                        let role = me.table().get(&id).map(|c| c.role.clone());
                        if let Some(role) = role {
                            me.backend.record_exit(&id, &role, info);
                        }
                    }
                    info.exit_status
                }
                Err(e) => {
                    let killed = me.table().get(&id).is_some_and(|c| c.vm_killed);
                    if killed {
                        tracing::info!(process = %proc_name(&id, &exec_id), "ended with its VM, which the shim killed");
                        KILLED_STATUS
                    } else {
                        tracing::warn!(process = %proc_name(&id, &exec_id), error = %carapace_errors::Chain(&e), "lost the process; reporting it exited");
                        me.tell_why_the_connection_ended(&id, &exec_id).await;
                        LOST_EXIT_STATUS
                    }
                }
            };
            me.exited(&id, &exec_id, pid, status);
        });
    }

    fn exited(&self, id: &str, exec_id: &str, pid: u32, status: u32) {
        let exit = Exit {
            status,
            at: SystemTime::now(),
        };
        {
            let mut table = self.table();
            let Some(p) = table.get_mut(id).and_then(|c| c.proc_mut(id, exec_id).ok()) else {
                return;
            };
            if p.state == ProcState::Stopped {
                return; // already reported
            }
            p.state = ProcState::Stopped;
            tracing::info!(process = %proc_name(id, exec_id), status, "exited");
            // The event goes out before waiters wake, so whoever saw `wait` return
            // also finds the exit among the published events (emit never blocks).
            self.emit(Event::Exit {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
                exit,
            });
            p.exit.send_replace(Some(exit));
        }
    }

    /// Waits until the process exits.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, TaskError> {
        let mut rx = {
            let table = self.table();
            let c = table.get(id).ok_or_else(|| TaskError::NotFound {
                kind: "container",
                id: id.to_owned(),
            })?;
            c.proc(id, exec_id)?.exit.subscribe()
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| TaskError::NotFound {
                kind: "process",
                id: proc_name(id, exec_id),
            })?;
        Ok(exit.expect("waited for Some"))
    }

    /// Signals a process (with `all`, every process of the container).
    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), TaskError> {
        let (agent, mut exit, role) = {
            let table = self.table();
            let c = table.get(id).ok_or_else(|| TaskError::NotFound {
                kind: "container",
                id: id.to_owned(),
            })?;
            let p = c.proc(id, exec_id)?;
            if p.state == ProcState::Stopped {
                return Err(TaskError::Finished {
                    id: proc_name(id, exec_id),
                });
            }
            if p.state == ProcState::Created && !exec_id.is_empty() {
                return Err(TaskError::WrongState {
                    op: "signal",
                    id: proc_name(id, exec_id),
                    state: "not started",
                });
            }
            (c.agent.clone(), p.exit.subscribe(), c.role.clone())
        };
        match agent
            .signal(id, exec_id, signal, all)
            .await
            .map_err(agent_err(id, exec_id))
        {
            // The guest saw the process end before our watcher reported it (CRI stops a
            // pod's containers right after their exit): once the exit arrives, this is the
            // same "already finished" as above.
            Err(TaskError::Agent { source, .. })
                if source.is_wrong_state()
                    && tokio::time::timeout(EXIT_CATCH_UP, exit.wait_for(Option::is_some))
                        .await
                        .is_ok_and(|r| r.is_ok()) =>
            {
                Err(TaskError::Finished {
                    id: proc_name(id, exec_id),
                })
            }
            // A SIGKILL the agent could not deliver (it does not answer: a guest that is
            // hung, starved or crashed): killing must still work, or the container — and a
            // pod stopping it — can never be removed. The VM goes; every process in it is
            // reported killed once the broken session shows.
            Err(TaskError::Agent { source, .. }) if signal == SIGKILL && source.is_unanswered() => {
                tracing::warn!(process = %proc_name(id, exec_id), error = %carapace_errors::Chain(&*source), "the agent did not take SIGKILL; killing the VM");
                for c in self.table().values_mut() {
                    c.vm_killed = true;
                }
                self.backend
                    .kill_vm(role.vm_id(id))
                    .await
                    .map_err(TaskError::Backend)
            }
            r => r,
        }
    }

    /// Deletes an exec, or the container (stopping its VM when it owns one). A running
    /// process cannot be deleted. Returns its pid and exit.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<(u32, Exit), TaskError> {
        let never_started = Exit {
            status: 0,
            at: SystemTime::now(),
        };
        if !exec_id.is_empty() {
            let mut table = self.table();
            let c = table.get_mut(id).ok_or_else(|| TaskError::NotFound {
                kind: "container",
                id: id.to_owned(),
            })?;
            let p = c.proc(id, exec_id)?;
            if p.state == ProcState::Running {
                return Err(TaskError::WrongState {
                    op: "delete",
                    id: proc_name(id, exec_id),
                    state: "running",
                });
            }
            let p = c.execs.remove(exec_id).expect("present");
            let exit = *p.exit.borrow();
            return Ok((p.pid, exit.unwrap_or(never_started)));
        }
        let (bundle, role, pid, exit, agent) = {
            let mut table = self.table();
            let c = table.get_mut(id).ok_or_else(|| TaskError::NotFound {
                kind: "container",
                id: id.to_owned(),
            })?;
            if matches!(c.init.state, ProcState::Running | ProcState::Paused) {
                return Err(TaskError::WrongState {
                    op: "delete",
                    id: id.to_owned(),
                    state: c.init.state.as_str(),
                });
            }
            let exit = *c.init.exit.borrow();
            c.deleting = true;
            (
                c.bundle.clone(),
                c.role.clone(),
                c.init.pid,
                exit,
                c.agent.clone(),
            )
        };
        // A pod's sandbox goes before containers of its pod (its pause process died): the
        // VM stays until the last of them is deleted.
        let defer = role == Role::Sandbox && {
            // decided and recorded under the table's lock, so a container deleted meanwhile
            // either is still counted here or finds the record
            let table = self.table();
            let members = has_members(&table, id);
            if members {
                self.deferred_vms()
                    .insert(id.to_owned(), (bundle.clone(), agent.clone()));
            }
            members
        };
        if defer {
            tracing::info!(
                id,
                "sandbox deleted before its pod's containers: keeping the VM"
            );
        } else {
            let t = std::time::Instant::now();
            self.backend
                .delete(id, &bundle, &role, Some(&agent))
                .await?;
            tracing::info!(
                id,
                ms = t.elapsed().as_millis() as u64,
                "backend delete done"
            );
        }
        self.table().remove(id);
        if let Role::Container { sandbox_id } = &role {
            self.stop_deferred_vm(sandbox_id).await;
        }
        let exit = exit.unwrap_or(never_started);
        self.emit(Event::Delete {
            id: id.to_owned(),
            pid,
            exit,
        });
        tracing::info!(id, "deleted");
        Ok((pid, exit))
    }

    fn deferred_vms(&self) -> MutexGuard<'_, HashMap<String, (PathBuf, Session)>> {
        self.deferred
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops the VM of a sandbox deleted earlier once its last container is gone.
    async fn stop_deferred_vm(&self, sandbox_id: &str) {
        let (bundle, agent) = {
            let table = self.table();
            if has_members(&table, sandbox_id) {
                return;
            }
            match self.deferred_vms().remove(sandbox_id) {
                Some(b) => b,
                None => return,
            }
        };
        let result = self
            .backend
            .delete(sandbox_id, &bundle, &Role::Sandbox, Some(&agent))
            .await;
        match result {
            Ok(()) => tracing::info!(
                id = sandbox_id,
                "last container of the pod deleted: VM stopped"
            ),
            Err(e) => {
                tracing::warn!(id = sandbox_id, error = %carapace_errors::Chain(&e), "cannot stop the pod's VM")
            }
        }
    }

    /// The state of a process.
    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcInfo, TaskError> {
        let table = self.table();
        let c = table.get(id).ok_or_else(|| TaskError::NotFound {
            kind: "container",
            id: id.to_owned(),
        })?;
        let p = c.proc(id, exec_id)?;
        let exit = *p.exit.borrow();
        Ok(ProcInfo {
            id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            bundle: c.bundle.clone(),
            pid: p.pid,
            state: p.state,
            stdio: p.stdio.clone(),
            exit,
        })
    }

    fn agent(&self, id: &str) -> Result<Session, TaskError> {
        self.table()
            .get(id)
            .map(|c| c.agent.clone())
            .ok_or_else(|| TaskError::NotFound {
                kind: "container",
                id: id.to_owned(),
            })
    }

    /// Pids of the container's processes, as the guest sees them.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, TaskError> {
        self.agent(id)?
            .list_processes(id)
            .await
            .map_err(agent_err(id, ""))
    }

    /// Resizes a process's terminal.
    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), TaskError> {
        self.state(id, exec_id)?;
        self.agent(id)?
            .resize(id, exec_id, height, width)
            .await
            .map_err(agent_err(id, exec_id))
    }

    /// Closes a process's stdin.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), TaskError> {
        let info = self.state(id, exec_id)?;
        if info.state != ProcState::Running {
            return Ok(());
        }
        self.agent(id)?
            .close_stdin(id, exec_id)
            .await
            .map_err(agent_err(id, exec_id))
    }

    /// The bundle of a container.
    pub fn bundle(&self, id: &str) -> Option<PathBuf> {
        self.table().get(id).map(|c| c.bundle.clone())
    }
}

/// Whether containers of pod sandbox `sandbox_id` are in `table`.
fn has_members(table: &HashMap<String, Container>, sandbox_id: &str) -> bool {
    table
        .values()
        .any(|c| matches!(&c.role, Role::Container { sandbox_id: s } if s == sandbox_id))
}

/// Reads the pod role of a bundle (for `shim delete`, which has no task table).
pub fn role_of(bundle: &Path) -> Option<Role> {
    Role::from_bundle(bundle).ok()
}

#[cfg(test)]
mod tests;
