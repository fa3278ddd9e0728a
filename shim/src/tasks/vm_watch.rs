//! The watches of a VM the shim keeps for its whole life: OOM kills the agent reports, the
//! VMM and the fs daemon ending under it, and what to log when the VM ends on its own.

use std::sync::Arc;

use carapace_runtime::agent::Session;
use carapace_runtime::sandbox::Helper;

use super::{Event, LOST_EXIT_STATUS, ProcState, Tasks};

/// How long a lost agent connection waits for the VMM's exit before the post mortem.
const VMM_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Tasks {
    /// Forwards the OOM kills the agent of a new VM reports, for as long as it answers
    /// (the call fails once the VM is gone).
    pub(super) fn watch_oom(self: &Arc<Self>, agent: Session, vm: &str) {
        let me = Arc::downgrade(self);
        let vm = vm.to_owned();
        tokio::spawn(async move {
            loop {
                match agent.next_oom_event().await {
                    Ok(cid) => {
                        let Some(me) = me.upgrade() else { return };
                        if me.table().contains_key(&cid) {
                            tracing::info!(id = %cid, "OOM kill in the guest");
                            me.emit(Event::Oom { id: cid });
                        } else {
                            tracing::debug!(id = %cid, "OOM kill in a container not ours");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(vm, error = %carapace_errors::Chain(&e), "OOM events end");
                        return;
                    }
                }
            }
        });
    }

    /// Watches the VMM and the fs daemon of VM `vm` (pidfds), each for its exit:
    /// [`Self::fs_daemon_gone`], [`Self::vmm_gone`].
    pub(super) fn watch_helpers(self: &Arc<Self>, vm: &str) {
        for helper in [Helper::FsDaemon, Helper::Vmm] {
            let me = Arc::downgrade(self);
            let backend = self.backend.clone();
            let vm = vm.to_owned();
            tokio::spawn(async move {
                if let Err(e) = backend.helper_exited(&vm, helper).await {
                    tracing::debug!(vm, ?helper, error = %carapace_errors::Chain(&e), "not watching");
                    return;
                }
                let Some(me) = me.upgrade() else { return };
                match helper {
                    Helper::FsDaemon => me.fs_daemon_gone(&vm).await,
                    Helper::Vmm => me.vmm_gone(&vm),
                }
            });
        }
    }

    /// Stops the VM `vm` when its fs daemon exited while the VM is in use: the guest's
    /// files are gone with it, and its processes would hang on them. Their exits are then
    /// reported as for any VM that ended. A daemon stopped by `delete` (after the VMM) is
    /// no news.
    async fn fs_daemon_gone(&self, vm: &str) {
        let in_use = self
            .table()
            .get(vm)
            .is_some_and(|c| c.init.state != ProcState::Stopped && !c.deleting)
            || self.deferred_vms().contains_key(vm);
        if !in_use {
            return;
        }
        tracing::warn!(
            vm,
            "the VM's fs daemon exited; stopping the VM (the guest lost its files)"
        );
        if let Err(e) = self.backend.kill_vm(vm).await {
            tracing::warn!(vm, error = %carapace_errors::Chain(&e), "cannot stop the VM");
        }
    }

    /// Ends the containers of VM `vm` that were created but never started, its VMM having
    /// exited under them (status [`LOST_EXIT_STATUS`], one exit event each): nothing else
    /// would, since only started processes are streamed and waited for. Started ones end
    /// through their streams (the owner's logs why the VM ended); containers being
    /// deleted are left to `delete`.
    fn vmm_gone(&self, vm: &str) {
        let never_started: Vec<String> = self
            .table()
            .iter()
            .filter(|(id, c)| {
                c.role.vm_id(id) == vm && c.init.state == ProcState::Created && !c.deleting
            })
            .map(|(id, _)| id.clone())
            .collect();
        // the owner's init never started, so no stream of it told why the VM ended
        if never_started.iter().any(|id| id == vm) {
            self.tell_why_the_vm_ended(vm, "");
        }
        for id in never_started {
            tracing::warn!(
                id,
                "the VM ended before the container started; reporting it exited"
            );
            self.exited(&id, "", 0, LOST_EXIT_STATUS);
        }
    }

    /// Logs what is left of a VM that ended on its own (the end of the VMM's log and of
    /// the guest console) when the init of the container that owns the VM is lost with
    /// it: once per VM, before `delete` removes those files.
    pub(super) fn tell_why_the_vm_ended(&self, id: &str, exec_id: &str) {
        if !self.owns_vm(id, exec_id) {
            return;
        }
        if let Some(text) = self.backend.vm_post_mortem(id) {
            tracing::warn!(id, "the VM of {id} ended on its own: {text}");
        }
    }

    /// [`Self::tell_why_the_vm_ended`] for a process whose agent connection broke. A VMM
    /// that is ending closes its descriptors (the agent's connection reads end of file)
    /// before the kernel marks the process exited, so the post mortem first waits for the
    /// VMM's exit itself, for at most [`VMM_EXIT_GRACE`]; a connection lost while the VMM
    /// lives on is not a VM that ended, and nothing is logged.
    pub(super) async fn tell_why_the_connection_ended(&self, id: &str, exec_id: &str) {
        if !self.owns_vm(id, exec_id) {
            return;
        }
        let exited = self.backend.helper_exited(id, Helper::Vmm);
        if tokio::time::timeout(VMM_EXIT_GRACE, exited).await.is_err() {
            tracing::debug!(id, "the agent's connection ended but the VMM still runs");
        }
        self.tell_why_the_vm_ended(id, exec_id);
    }

    fn owns_vm(&self, id: &str, exec_id: &str) -> bool {
        exec_id.is_empty() && self.table().get(id).is_some_and(|c| c.role.vm_id(id) == id)
    }
}
