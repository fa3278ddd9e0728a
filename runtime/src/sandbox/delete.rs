//! Deleting sandboxes and pod containers: the guest is told first (DestroySandbox or
//! RemoveContainer, through the caller's session or a short-lived one), then the host side
//! is undone as blocking work. Teardown is idempotent and collects its problems.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Runtime, STOP_GRACE, SandboxError, blocking};
use crate::agent::Session;
use crate::faults::Point;
use crate::process::ProcessRecord;
use crate::state::{SandboxState, StateError, Status};

/// How long a delete waits to reach an agent it has no session to.
const DELETE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a delete has to do once the state is read.
#[derive(Debug)]
enum Deleting {
    /// Nothing left (or cleaned without state).
    Done,
    /// A sandbox and the containers of its pod.
    Sandbox {
        st: SandboxState,
        members: Vec<String>,
    },
    /// A container of a pod.
    Member {
        st: SandboxState,
        sandbox_id: String,
    },
}

/// The deleted container's `poststop` hooks (logged when they fail; [`crate::hooks`]).
fn poststop(st: &SandboxState) {
    if let Some(hooks) = &st.hooks {
        let state = st.oci(Status::Stopped, false);
        crate::hooks::run_logged(crate::hooks::HookKind::Poststop, hooks, &state);
    }
}

impl Runtime {
    /// Undoes one recorded mount and removes the scratch directory it made; the problems.
    fn undo_mount(&self, m: &crate::state::MountRecord) -> Option<String> {
        if let Err(e) = self.mounter.unmount(&m.target) {
            return Some(e.to_string());
        }
        let scratch = m.scratch.as_deref()?;
        crate::mounts::remove_scratch(scratch)
            .err()
            .map(|e| carapace_errors::chain(&e))
    }

    /// Deletes the sandbox: stops the guest, the VMM and the fs daemon, undoes the mounts
    /// and removes the state directory. A running container needs `force`. Without
    /// `force` a missing container is an error (as runc); with it, success. `session` is
    /// the caller's session to the VM, if it holds one.
    pub async fn delete(
        &self,
        id: &str,
        force: bool,
        session: Option<&Session>,
    ) -> Result<(), SandboxError> {
        let rt = self.clone();
        let id_owned = id.to_owned();
        match blocking(move || rt.plan_delete(&id_owned, force)).await? {
            Deleting::Done => Ok(()),
            Deleting::Sandbox { st, members } => {
                if let Some(vmm) = st.vmm
                    && vmm.is_alive()
                {
                    match self.delete_session(session, &vmm, id).await {
                        Ok(agent) => {
                            if let Err(e) = agent.destroy_sandbox(id).await {
                                tracing::warn!(id, error = %carapace_errors::Chain(&e), "DestroySandbox failed; stopping the VMM");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(id, error = %carapace_errors::Chain(&e), "agent unreachable; stopping the VMM")
                        }
                    }
                }
                self.fault(Point::DeleteGuestTold, &st);
                let rt = self.clone();
                blocking(move || {
                    rt.teardown_with_members(&st, members)?;
                    poststop(&st);
                    Ok(())
                })
                .await
            }
            Deleting::Member { st, sandbox_id } => {
                let t = Instant::now();
                let mut pod_agent = None;
                if let Some(vmm) = self.vm_of(&st)
                    && vmm.is_alive()
                {
                    match self.delete_session(session, &vmm, &sandbox_id).await {
                        Ok(agent) => {
                            pod_agent = Some(agent.clone());
                            let connected = t.elapsed();
                            if let Err(e) = agent.remove_container(&st.id).await {
                                tracing::warn!(id = st.id, error = %carapace_errors::Chain(&e), "RemoveContainer failed");
                            }
                            tracing::info!(
                                id = st.id,
                                connect_ms = connected.as_millis() as u64,
                                remove_ms = (t.elapsed() - connected).as_millis() as u64,
                                "removed from the pod's VM"
                            );
                        }
                        Err(e) => {
                            tracing::warn!(id = st.id, error = %carapace_errors::Chain(&e), "agent unreachable")
                        }
                    }
                }
                self.fault(Point::DeleteGuestTold, &st);
                let rt = self.clone();
                let sid = sandbox_id.clone();
                blocking(move || {
                    let t = Instant::now();
                    rt.teardown_member(&st, &sid)?;
                    tracing::info!(
                        id = st.id,
                        teardown_ms = t.elapsed().as_millis() as u64,
                        "host side of the pod container undone"
                    );
                    poststop(&st);
                    Ok(())
                })
                .await?;
                // Its share of the VM goes back (best effort; logged).
                if let Some(agent) = pod_agent {
                    self.shrink_after_removal(&sandbox_id, &agent).await;
                }
                Ok(())
            }
        }
    }

    /// The caller's session, or a new one to the VM of sandbox `sandbox_id`.
    async fn delete_session(
        &self,
        session: Option<&Session>,
        vmm: &ProcessRecord,
        sandbox_id: &str,
    ) -> Result<Session, SandboxError> {
        match session {
            Some(s) => Ok(s.clone()),
            None => {
                let paths = self.paths(sandbox_id)?;
                self.connect_until(vmm, &paths, DELETE_CONNECT_TIMEOUT)
                    .await
            }
        }
    }

    /// Reads the state and checks that `id` may be deleted.
    fn plan_delete(&self, id: &str, force: bool) -> Result<Deleting, SandboxError> {
        let dir = self.store.dir(id)?;
        let st = match self.store.load(id) {
            Ok(st) => st,
            Err(StateError::NotFound { .. }) if force => {
                // A directory without state (a crash right after mkdir): clean it anyway.
                if dir.exists() {
                    self.remove_dir(id, &dir)?;
                }
                return Ok(Deleting::Done);
            }
            Err(StateError::Corrupt { .. }) if force => {
                self.remove_dir(id, &dir)?;
                return Ok(Deleting::Done);
            }
            Err(e) => return Err(e.into()),
        };
        let status = self.live_status(&st);
        if status == Status::Running && !force {
            return Err(SandboxError::WrongStatus {
                id: id.to_owned(),
                status: status.as_str(),
                op: "delete it without --force",
            });
        }
        if let Some(sandbox_id) = st.sandbox_id.clone() {
            return Ok(Deleting::Member { st, sandbox_id });
        }
        let members = self.members(id)?;
        if !members.is_empty() && !force {
            return Err(SandboxError::WrongStatus {
                id: id.to_owned(),
                status: "hosting other containers",
                op: "delete it before them without --force",
            });
        }
        Ok(Deleting::Sandbox { st, members })
    }

    /// With the guest gone: undoes what the pod's other containers left on the host, then
    /// the sandbox itself.
    fn teardown_with_members(
        &self,
        st: &SandboxState,
        members: Vec<String>,
    ) -> Result<(), SandboxError> {
        let id = &st.id;
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
        self.teardown(st)
    }

    /// The host side of a pod's container: its IO relay, its binds in the sandbox's shared
    /// directory (and that per-container directory), its state directory. Idempotent.
    pub(super) fn teardown_member(
        &self,
        st: &SandboxState,
        sandbox_id: &str,
    ) -> Result<(), SandboxError> {
        let mut problems = Vec::new();
        for rec in st.io_relay.iter().chain(&st.exec_keepers) {
            if let Err(e) = rec.terminate("keeper", STOP_GRACE) {
                problems.push(e.to_string());
            }
        }
        for m in st.mounts.iter().rev() {
            problems.extend(self.undo_mount(m));
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
        // The VMM first: keepers ([`crate::keeper`]) forward SIGTERM to their guest process
        // and exit when their VM is gone, which they then see at once.
        let keepers = st.exec_keepers.iter().map(|k| ("exec keeper", Some(*k)));
        for (what, rec) in [("VMM", st.vmm), ("init keeper", st.io_relay)]
            .into_iter()
            .chain(keepers)
            .chain([("fs daemon", st.fsd)])
        {
            if let Some(rec) = rec
                && let Err(e) = rec.terminate(what, STOP_GRACE)
            {
                problems.push(e.to_string());
            }
        }
        // The VMM is gone, so are its taps; the redirections on the namespace's
        // interfaces are ours to remove (containerd deletes the namespace itself).
        if let Some(record) = st.network.as_ref().and_then(|n| n.attached.as_ref())
            && let Err(e) = self.network.detach(record)
        {
            problems.push(carapace_errors::chain(&e));
        }
        // Its processes are gone: the cgroup made for them goes too.
        if let Some(cg) = &st.host_cgroup {
            problems.extend(crate::cgroup::remove(cg));
        }
        for m in st.mounts.iter().rev() {
            problems.extend(self.undo_mount(m));
        }
        let dir = self.store.dir(&st.id)?;
        if !problems.is_empty() {
            return Err(SandboxError::Teardown {
                id: st.id.clone(),
                problems: problems.join("; "),
            });
        }
        // The VMM is gone: its uid goes back (the jail directory goes with the sandbox's).
        if let Some(jail) = &st.jail {
            let claims = self.jail_claims();
            match claims.release(jail.uid, &dir) {
                Ok(released) => {
                    tracing::debug!(id = st.id, uid = jail.uid, released, "jail uid given back")
                }
                Err(e) => {
                    return Err(SandboxError::Teardown {
                        id: st.id.clone(),
                        problems: carapace_errors::chain(&e),
                    });
                }
            }
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
