//! CRI statistics, exit reasons and resources: `ContainerStats`, `PodSandboxStats`, the reason
//! of `ContainerStatus` and `UpdateContainerResources`, what a kubelet reads and resizes.

use super::{Cri, CriError, PodSpec, call_err, cri};

/// CPU and memory of a container or a pod, as CRI reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Cumulative CPU time, ns (`usage_core_nano_seconds`).
    pub cpu_ns: u64,
    /// Memory working set, bytes (`working_set_bytes`).
    pub working_set: u64,
    /// Memory usage, bytes (`usage_bytes`).
    pub usage: u64,
}

impl Usage {
    fn of(cpu: Option<&cri::CpuUsage>, memory: Option<&cri::MemoryUsage>) -> Self {
        let value = |v: Option<&cri::UInt64Value>| v.map_or(0, |v| v.value);
        Usage {
            cpu_ns: value(cpu.and_then(|c| c.usage_core_nano_seconds.as_ref())),
            working_set: value(memory.and_then(|m| m.working_set_bytes.as_ref())),
            usage: value(memory.and_then(|m| m.usage_bytes.as_ref())),
        }
    }
}

impl Cri {
    /// `RunPodSandbox` with the pod's cgroup parent set, as a kubelet sets it (cgroupfs
    /// form, e.g. `/kubepods/pod<uid>`): where the VM's host processes are charged and
    /// what `PodSandboxStats` reads.
    pub fn run_pod_in_cgroup(
        &mut self,
        pod: &PodSpec,
        cgroup_parent: &str,
    ) -> Result<String, CriError> {
        std::fs::create_dir_all(&pod.log_dir).map_err(|source| CriError::Log {
            path: pod.log_dir.clone(),
            source,
        })?;
        let mut config = pod.config();
        config
            .linux
            .get_or_insert_with(Default::default)
            .cgroup_parent = cgroup_parent.to_owned();
        let r = self
            .rt
            .block_on(self.runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: pod.handler.clone(),
            }))
            .map_err(call_err(format!("RunPodSandbox {}", pod.name)))?
            .into_inner();
        Ok(r.pod_sandbox_id)
    }

    /// `ContainerStats`: the container's CPU and memory.
    pub fn container_usage(&mut self, id: &str) -> Result<Usage, CriError> {
        let call = format!("ContainerStats {id}");
        let r = self
            .rt
            .block_on(self.runtime.container_stats(cri::ContainerStatsRequest {
                container_id: id.to_owned(),
            }))
            .map_err(call_err(call.clone()))?
            .into_inner();
        let s = r.stats.ok_or(CriError::Incomplete {
            call,
            field: "stats",
        })?;
        Ok(Usage::of(s.cpu.as_ref(), s.memory.as_ref()))
    }

    /// `PodSandboxStats`: the pod's CPU and memory (its cgroup parent on the host: what
    /// the kubelet charges the pod, VM included) and each of its containers'.
    pub fn pod_usage(&mut self, pod_id: &str) -> Result<(Usage, Vec<(String, Usage)>), CriError> {
        let call = format!("PodSandboxStats {pod_id}");
        let r = self
            .rt
            .block_on(self.runtime.pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod_id.to_owned(),
            }))
            .map_err(call_err(call.clone()))?
            .into_inner();
        let linux = r.stats.and_then(|s| s.linux).ok_or(CriError::Incomplete {
            call,
            field: "stats.linux",
        })?;
        let containers = linux
            .containers
            .iter()
            .map(|c| {
                let name = c
                    .attributes
                    .as_ref()
                    .and_then(|a| a.metadata.as_ref())
                    .map(|m| m.name.clone())
                    .unwrap_or_default();
                (name, Usage::of(c.cpu.as_ref(), c.memory.as_ref()))
            })
            .collect();
        Ok((
            Usage::of(linux.cpu.as_ref(), linux.memory.as_ref()),
            containers,
        ))
    }

    /// `ContainerStatus`: (state name, exit code, reason), e.g. `OOMKilled`.
    pub fn container_reason(&mut self, id: &str) -> Result<(String, i32, String), CriError> {
        let call = format!("ContainerStatus {id}");
        let r = self
            .rt
            .block_on(self.runtime.container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            }))
            .map_err(call_err(call.clone()))?
            .into_inner();
        let s = r.status.ok_or(CriError::Incomplete {
            call,
            field: "status",
        })?;
        let state = cri::ContainerState::try_from(s.state)
            .map(|st| st.as_str_name().to_owned())
            .unwrap_or_else(|_| format!("state {}", s.state));
        Ok((state, s.exit_code, s.reason))
    }
}

impl Cri {
    /// `UpdateContainerResources`: the container's new limits, as a kubelet sends them
    /// for an in-place resize.
    pub fn update_container_resources(
        &mut self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<(), CriError> {
        self.rt
            .block_on(self.runtime.update_container_resources(
                cri::UpdateContainerResourcesRequest {
                    container_id: id.to_owned(),
                    linux: Some(resources),
                    ..Default::default()
                },
            ))
            .map_err(call_err(format!("UpdateContainerResources {id}")))?;
        Ok(())
    }
}

/// Linux resources of `cpus` whole CPUs (quota over a 100 ms period) and `memory_mib` MiB,
/// what a pod spec's `limits` become.
pub fn limits(cpus: i64, memory_mib: i64) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: cpus * 100_000,
        memory_limit_in_bytes: memory_mib << 20,
        ..Default::default()
    }
}
