//! Requests to a created container's agent: start, signal, list, exec. Each checks the
//! container's status first, then talks over the [`Session`] the caller holds (the shim's,
//! for the VM's life) or, given none, over a new one (the CLI, one per command).

use super::{RECONNECT_TIMEOUT, Runtime, SandboxError, blocking};
use crate::agent::Session;
use crate::hooks::HookKind;
use crate::state::{SandboxState, Status};

impl Runtime {
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
        Ok((agent, pid))
    }
}
