//! Requests to a created container's agent: start, signal, list, exec. Each checks the
//! container's status first, then talks over the [`Session`] the caller holds (the shim's,
//! for the VM's life) or, given none, over a new one (the CLI, one per command).

use super::{RECONNECT_TIMEOUT, Runtime, SandboxError, blocking};
use crate::agent::Session;
use crate::faults::Point;

/// A helper process of a sandbox's VM ([`Runtime::helper_exited`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Helper {
    /// The VMM.
    Vmm,
    /// The fs daemon.
    FsDaemon,
}
use crate::hooks::HookKind;
use crate::state::{SandboxState, Status};

/// Text the guest may have written (its console; the VMM's log quotes it too), made fit
/// for the caller's log: every line behind a `  | ` margin, so none can pass for a log
/// record of its own, and control characters (escape sequences, carriage returns) shown
/// as `?`. Its size is the caller's bound ([`crate::process::log_tail`]).
fn quoted(text: &str) -> String {
    text.lines()
        .map(|l| {
            let clean: String = l
                .chars()
                .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
                .collect();
            format!("  | {clean}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Runtime {
    /// Fires fault point `point` for `st` when the configuration names a fault plan
    /// ([`crate::faults`]; fault tests only).
    /// For a container of a pod, the VMM and fs daemon named are the pod's.
    pub(super) fn fault(&self, point: Point, st: &SandboxState) {
        let Some(plan) = self.config.debug.fault_plan.as_deref() else {
            return;
        };
        let pod = st
            .sandbox_id
            .as_deref()
            .and_then(|s| self.store.load(s).ok());
        crate::faults::fire(Some(plan), point, pod.as_ref().unwrap_or(st));
    }

    /// Connects to the agent of a running sandbox (for a container of a pod: the agent of
    /// the pod's VM).
    pub async fn connect(&self, st: &SandboxState) -> Result<Session, SandboxError> {
        let paths = self.paths(st.sandbox_id.as_deref().unwrap_or(&st.id))?;
        let vmm = self.vm_of(st).ok_or(SandboxError::WrongStatus {
            id: st.id.clone(),
            status: "without a VM",
            op: "reach its agent",
        })?;
        self.connect_until(&vmm, &paths, RECONNECT_TIMEOUT).await
    }

    /// Opens a session to the agent running container `id`.
    pub async fn session(&self, id: &str) -> Result<Session, SandboxError> {
        let st = self.store.load(id)?;
        self.connect(&st).await
    }

    /// `session`, or a new one to the agent running `st`.
    async fn use_session(
        &self,
        session: Option<&Session>,
        st: &SandboxState,
    ) -> Result<Session, SandboxError> {
        match session {
            Some(s) => Ok(s.clone()),
            None => self.connect(st).await,
        }
    }

    /// Starts the container's process.
    pub async fn start(&self, id: &str, session: Option<&Session>) -> Result<u32, SandboxError> {
        let lock = self.store.lock(id)?;
        let mut st = self.store.load(id)?;
        self.require(&st, &[Status::Created], "start")?;
        let agent = self.use_session(session, &st).await?;
        let pid = agent.start_container(id).await?;
        st.status = Status::Running;
        st.guest_pid = Some(pid);
        self.store.save(&st)?;
        tracing::info!(id, guest_pid = pid, "started");
        drop(lock);
        self.fault(Point::StartStarted, &st);
        if let Some(hooks) = st.hooks.clone() {
            let state = self.state(id)?;
            blocking(move || {
                crate::hooks::run_logged(HookKind::Poststart, &hooks, &state);
                Ok(())
            })
            .await?;
        }
        Ok(pid)
    }

    /// Kills the VM that runs `id` (its own, or its pod's): for a guest whose agent no longer
    /// answers, so that a kill still ends every process in it. Its session breaks, which
    /// is how the caller learns the processes ended.
    pub fn kill_vm(&self, id: &str) -> Result<(), SandboxError> {
        let st = self.store.load(id)?;
        if let Some(vmm) = self.vm_of(&st) {
            tracing::warn!(id, vmm_pid = vmm.pid, "killing the VM");
            vmm.signal("VMM", nix::sys::signal::Signal::SIGKILL)?;
        }
        Ok(())
    }

    /// What is left to tell of a VM that ended on its own: `None` while the VMM that runs
    /// `id` is alive (or `id` has no VM); else its pid and the end of its log, plus the
    /// end of the guest console when the console is kept. For the log of whoever finds
    /// the VM gone (the shim, when it loses the VM's processes), before `delete` removes
    /// the files.
    pub fn vm_post_mortem(&self, id: &str) -> Option<String> {
        let st = self.store.load(id).ok()?;
        let vmm = self.vm_of(&st)?;
        if vmm.is_alive() {
            return None;
        }
        let paths = self
            .paths(st.sandbox_id.as_deref().unwrap_or(&st.id))
            .ok()?;
        let mut text = format!(
            "the VMM (pid {}) is gone; {} ends with:\n{}",
            vmm.pid,
            paths.vmm_log.display(),
            quoted(&crate::process::log_tail(&paths.vmm_log))
        );
        if self.config.debug.console {
            text.push_str(&format!(
                "\nthe guest console {} ends with:\n{}",
                paths.console.display(),
                quoted(&crate::process::log_tail(&paths.console))
            ));
        }
        Some(text)
    }

    /// Resolves once `helper` (the VMM or the fs daemon) of the VM that runs `id` has
    /// exited (at once when it is gone already); never when that VM has none. For the
    /// shim: without its fs daemon the guest's files are gone (it stops the VM rather than
    /// leave its processes hanging on them); without its VMM a container never started
    /// has ended too.
    pub async fn helper_exited(&self, id: &str, helper: Helper) -> Result<(), SandboxError> {
        let st = self.store.load(id)?;
        let holder = match &st.sandbox_id {
            Some(s) => self.store.load(s)?,
            None => st,
        };
        let (rec, what) = match helper {
            Helper::Vmm => (holder.vmm, "VMM"),
            Helper::FsDaemon => (holder.fsd, "fs daemon"),
        };
        match rec {
            Some(rec) => Ok(crate::exitwatch::exited(rec).await.map_err(|source| {
                crate::process::ProcessError::Watch {
                    what,
                    pid: rec.pid,
                    source,
                }
            })?),
            None => std::future::pending().await,
        }
    }

    /// Fires fault point `point` for container `id` when the configuration names a fault
    /// plan ([`crate::faults`]): for points its caller reaches without the runtime (the
    /// shim starts execs over its own session).
    pub fn fault_point(&self, point: Point, id: &str) {
        if self.config.debug.fault_plan.is_some()
            && let Ok(st) = self.store.load(id)
        {
            self.fault(point, &st);
        }
    }

    /// Signals the container's init (or every process with `all`).
    pub async fn kill(
        &self,
        id: &str,
        signal: u32,
        all: bool,
        session: Option<&Session>,
    ) -> Result<(), SandboxError> {
        let st = self.store.load(id)?;
        self.require(&st, &[Status::Created, Status::Running], "be signalled")?;
        let agent = self.use_session(session, &st).await?;
        agent.signal(id, "", signal, all).await?;
        Ok(())
    }

    /// Guest pids of the container's processes.
    pub async fn ps(&self, id: &str, session: Option<&Session>) -> Result<Vec<u32>, SandboxError> {
        let st = self.store.load(id)?;
        self.require(&st, &[Status::Created, Status::Running], "list processes")?;
        let agent = self.use_session(session, &st).await?;
        Ok(agent.list_processes(id).await?)
    }

    /// Starts an extra process in the running container; returns the session it was
    /// started through (to stream its IO and wait) and its guest pid.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
        session: Option<&Session>,
    ) -> Result<(Session, u32), SandboxError> {
        let st = self.store.load(id)?;
        self.require(&st, &[Status::Running], "exec a process")?;
        let agent = self.use_session(session, &st).await?;
        let bytes = serde_json::to_vec(process).unwrap_or_default();
        let pid = agent.exec_process(id, exec_id, &bytes).await?;
        self.fault(Point::ExecStarted, &st);
        Ok((agent, pid))
    }
}
