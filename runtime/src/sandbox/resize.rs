//! Resizing a pod's VM to its containers ([`crate::sizing`]): vCPUs brought online or
//! offline by the agent (SetOnlineCpus), memory plugged or unplugged by the VMM's
//! virtio-mem device (the `memory` API request, [`crate::vmm_api`]). A container joining
//! grows the VM before the guest creates it, an update resizes it before the guest's
//! cgroup changes, a removal shrinks it (memory unplug is best effort: the guest may not
//! be able to give blocks back). The size applied is recorded in the sandbox's state.

use std::time::Duration;

use super::{Placement, Runtime, SandboxError};
use crate::agent::Session;
use crate::sizing::{Bounds, Demand, Size};
use crate::state::VmRecord;
use crate::vmm_api::VmmClient;

/// Deadline of one VMM API exchange.
const VMM_API_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to plug the memory a container needs.
const PLUG_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a shrink waits for the guest to give memory back before it is left as is.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// One resize at a time in this process (the shim serves one pod): the sum over the pod's
/// containers and what is applied stay in step.
static RESIZING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether a resize may fail (growing) or only logs (shrinking after a removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// A container joins or changes: a VM that cannot grow fails the request.
    Grow,
    /// A container left: best effort.
    Shrink,
}

impl Runtime {
    /// The demands of every container in sandbox `sandbox_id`'s VM, its own first.
    fn pod_demands(&self, sandbox_id: &str) -> Result<Vec<(String, Demand)>, SandboxError> {
        let own = self.store.load(sandbox_id)?;
        let mut demands = vec![(own.id.clone(), own.demand.unwrap_or_default())];
        for id in self.members(sandbox_id)? {
            if let Ok(st) = self.store.load(&id) {
                demands.push((id, st.demand.unwrap_or_default()));
            }
        }
        Ok(demands)
    }

    /// Checks that the pod of `sandbox_id` fits its VM's bounds with `extra` (a container
    /// about to join) added; the error names `culprit`. Blocking (reads state).
    pub(super) fn check_fits(
        &self,
        sandbox_id: &str,
        culprit: &str,
        extra: Option<Demand>,
    ) -> Result<Size, SandboxError> {
        let vm = self.store.load(sandbox_id)?.vm;
        let mut demands = self.pod_demands(sandbox_id)?;
        if let Some(d) = extra {
            demands.push((culprit.to_owned(), d));
        }
        let mut h = self.config.hypervisor.clone();
        if let Some(vm) = &vm {
            h.default_vcpus = vm.base.vcpus;
            h.default_memory_mib = vm.base.memory_mib;
        }
        Ok(crate::sizing::size(
            &h,
            &Bounds::new(&h, vm.map(|v| v.created_vcpus)),
            &demands,
            culprit,
        )?)
    }

    /// Resizes sandbox `sandbox_id`'s VM to what its containers' recorded demands add up
    /// to (`culprit`: the container that changed, named in errors) and records the size.
    pub(super) async fn resize_vm(
        &self,
        sandbox_id: &str,
        culprit: &str,
        agent: &Session,
        direction: Direction,
    ) -> Result<Size, SandboxError> {
        let _one = RESIZING.lock().await;
        let target = self.check_fits(sandbox_id, culprit, None)?;
        let st = self.store.load(sandbox_id)?;
        let Some(vm) = st.vm else {
            tracing::info!(
                sandbox_id,
                "the VM's shape is not recorded (made by an older runtime): not resized"
            );
            return Ok(target);
        };
        if self.placement == Placement::HostAgent || vm.size == target {
            return Ok(target);
        }
        let mut applied = vm.size;
        if target.vcpus != vm.size.vcpus {
            let online = agent.set_online_cpus(target.vcpus).await?;
            applied.vcpus = online;
            if online != target.vcpus {
                self.record_size(sandbox_id, applied)?;
                return Err(SandboxError::Resize {
                    id: sandbox_id.to_owned(),
                    what: format!(
                        "{online} vCPUs online in the guest, {} asked for",
                        target.vcpus
                    ),
                });
            }
            tracing::info!(sandbox_id, culprit, vcpus = online, "vCPUs online");
        }
        if target.memory_mib != vm.size.memory_mib {
            match self.resize_memory(sandbox_id, &vm, target.memory_mib).await {
                Ok(mib) => applied.memory_mib = mib,
                Err(e) if direction == Direction::Shrink => {
                    tracing::warn!(sandbox_id, error = %carapace_errors::Chain(&e), "memory not given back by the guest; the VM keeps it");
                    if let Ok(Some(client)) = self.vmm_client(sandbox_id)
                        && let Ok(info) = client.info().await
                        && let Some(hp) = info.memory_hotplug
                    {
                        applied.memory_mib = vm.boot_memory_mib + hp.plugged_mib;
                    }
                }
                Err(e) => {
                    self.record_size(sandbox_id, applied)?;
                    return Err(e);
                }
            }
        }
        self.record_size(sandbox_id, applied)?;
        Ok(applied)
    }

    /// The VMM API client of sandbox `sandbox_id`'s VM (`None` in host-agent mode).
    fn vmm_client(&self, sandbox_id: &str) -> Result<Option<VmmClient>, SandboxError> {
        if self.placement == Placement::HostAgent {
            return Ok(None);
        }
        Ok(Some(VmmClient::new(
            &self.paths(sandbox_id)?.api,
            VMM_API_TIMEOUT,
        )))
    }

    /// Plugs or unplugs memory so that the VM has `target_mib` (never below its boot
    /// memory); returns the memory it has afterwards.
    async fn resize_memory(
        &self,
        sandbox_id: &str,
        vm: &VmRecord,
        target_mib: u32,
    ) -> Result<u32, SandboxError> {
        let block = vm.hotplug_block_mib.max(1);
        let wanted = target_mib.saturating_sub(vm.boot_memory_mib);
        let plug = wanted.div_ceil(block) * block;
        if vm.hotplug_region_mib == 0 || plug > vm.hotplug_region_mib {
            if plug == 0 {
                return Ok(vm.boot_memory_mib);
            }
            return Err(SandboxError::Resize {
                id: sandbox_id.to_owned(),
                what: format!(
                    "{target_mib} MiB asked for, the VM has {} MiB and can hot-plug {} MiB more",
                    vm.boot_memory_mib, vm.hotplug_region_mib
                ),
            });
        }
        let Some(client) = self.vmm_client(sandbox_id)? else {
            return Ok(target_mib);
        };
        let deadline = if plug >= vm.size.memory_mib.saturating_sub(vm.boot_memory_mib) {
            PLUG_TIMEOUT
        } else {
            UNPLUG_TIMEOUT
        };
        let hp = client.resize_memory(plug, deadline).await?;
        tracing::info!(
            sandbox_id,
            plugged_mib = hp.plugged_mib,
            total_mib = vm.boot_memory_mib + hp.plugged_mib,
            "guest memory resized"
        );
        Ok(vm.boot_memory_mib + hp.plugged_mib)
    }

    fn record_size(&self, sandbox_id: &str, size: Size) -> Result<(), SandboxError> {
        self.store.update(sandbox_id, |st| {
            if let Some(vm) = st.vm.as_mut() {
                vm.size = size;
            }
        })?;
        Ok(())
    }

    /// Shrinks sandbox `sandbox_id`'s VM after a container left it; logs what fails.
    pub(super) async fn shrink_after_removal(&self, sandbox_id: &str, agent: &Session) {
        if let Err(e) = self
            .resize_vm(sandbox_id, sandbox_id, agent, Direction::Shrink)
            .await
        {
            tracing::warn!(sandbox_id, error = %carapace_errors::Chain(&e), "the VM could not shrink after a container left");
        }
    }

    /// Applies an OCI `linux.resources` object (JSON) to container `id`: its demand is
    /// recomputed and recorded, its VM resized first (refused, with nothing changed, when
    /// the pod would pass the maxima), then the guest's cgroup is updated with the host's
    /// CPU and memory-node sets taken out ([`crate::oci::guest_resources`]). Fields the
    /// object leaves out keep their demand.
    pub async fn update_resources(
        &self,
        id: &str,
        resources_json: &[u8],
        session: Option<&Session>,
    ) -> Result<(), SandboxError> {
        let st = self.store.load(id)?;
        self.require(
            &st,
            &[crate::state::Status::Created, crate::state::Status::Running],
            "update",
        )?;
        let mut resources: serde_json::Value =
            serde_json::from_slice(resources_json).map_err(|e| SandboxError::Resize {
                id: id.to_owned(),
                what: format!("the resources are not JSON: {e}"),
            })?;
        let cpuset = crate::oci::guest_resources(id, &mut resources);
        let limits = carapace_config::ContainerLimits {
            cpu_quota_us: resources.pointer("/cpu/quota").and_then(|v| v.as_i64()),
            cpu_period_us: resources.pointer("/cpu/period").and_then(|v| v.as_u64()),
            memory_limit_bytes: resources.pointer("/memory/limit").and_then(|v| v.as_i64()),
        };
        let sandbox_id = st.sandbox_id.clone().unwrap_or_else(|| id.to_owned());
        let block = self
            .store
            .load(&sandbox_id)?
            .vm
            .map_or(crate::sizing::DEFAULT_BLOCK_MIB, |v| v.hotplug_block_mib);
        let old = st.demand.unwrap_or_default();
        let asked = Demand::of(&limits, cpuset, block);
        let cpu_given = limits.cpu_quota_us.is_some() || cpuset.is_some();
        let new = Demand {
            vcpus: if cpu_given { asked.vcpus } else { old.vcpus },
            memory_mib: if limits.memory_limit_bytes.is_some() {
                asked.memory_mib
            } else {
                old.memory_mib
            },
        };
        let agent = match session {
            Some(s) => s.clone(),
            None => self.connect(&st).await?,
        };
        if new != old {
            self.store.update(id, |s| s.demand = Some(new))?;
            let grown = self
                .resize_vm(&sandbox_id, id, &agent, Direction::Grow)
                .await;
            if let Err(e) = grown {
                self.store.update(id, |s| s.demand = Some(old))?;
                self.shrink_after_removal(&sandbox_id, &agent).await;
                return Err(e);
            }
        }
        let guest = serde_json::to_vec(&resources).unwrap_or_default();
        agent.update_resources(id, &guest).await?;
        Ok(())
    }
}
