//! How big a pod's VM is: the sizing policy, pure.
//!
//! A VM gets `hypervisor.default_vcpus` and `hypervisor.default_memory_mib` (the guest
//! kernel, the agent, the pause container) plus, for every container of the pod, what its
//! limits ask for ([`Demand::of`]):
//!
//! - vCPUs: `ceil(quota / period)` of `linux.resources.cpu`; a container with no quota but
//!   a host CPU set (`cpu.cpus`) counts the set's size (the host's CPU numbers mean nothing
//!   in the guest, so the set is not copied there: the container may use every online
//!   vCPU, and the VM gets as many more vCPUs as the set had CPUs);
//! - memory: `linux.resources.memory.limit`, rounded up to whole MiB and then to the
//!   hot-plug block size.
//!
//! Containers without limits add nothing. The sum is bounded by the VM's maxima
//! ([`Bounds`]: `hypervisor.max_vcpus`, also capped by the vCPUs the VMM created, and
//! `hypervisor.max_memory_mib`); past them [`size`] refuses, naming the container that
//! asked, the size asked and the maximum.

use serde::{Deserialize, Serialize};

use carapace_config::{ContainerLimits, Hypervisor};

/// The hot-plug block size assumed when the VMM reports none (virtio-mem's default).
pub const DEFAULT_BLOCK_MIB: u32 = 2;

/// A VM too small for what its containers ask.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "container {container} makes its pod's VM need {asked} {unit}{of}, more than the maximum \
     of {max} {unit} ({why})",
    of = if .resource == .unit { String::new() } else { format!(" of {}", .resource) }
)]
pub struct SizingError {
    /// The container whose limits went past the maximum.
    pub container: String,
    /// "vCPUs" or "memory".
    pub resource: &'static str,
    /// The unit of `asked` and `max`.
    pub unit: &'static str,
    /// The size the pod would need with it.
    pub asked: u64,
    /// The maximum.
    pub max: u32,
    /// Where the maximum comes from.
    pub why: String,
}

/// What one container adds to its VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory (MiB, a multiple of the block size).
    pub memory_mib: u32,
}

impl Demand {
    /// The demand of a container with these limits; `cpuset_cpus` is the size of its host
    /// CPU set, if it has one; memory is rounded up to `block_mib` (at least 1).
    pub fn of(limits: &ContainerLimits, cpuset_cpus: Option<u32>, block_mib: u32) -> Demand {
        let vcpus = match (limits.cpu_quota_us, limits.cpu_period_us) {
            (Some(quota @ 1..), Some(period @ 1..)) => {
                u32::try_from((quota as u64).div_ceil(period)).unwrap_or(u32::MAX)
            }
            _ => cpuset_cpus.unwrap_or(0),
        };
        let block = u64::from(block_mib.max(1));
        let memory_mib = match limits.memory_limit_bytes {
            Some(bytes @ 1..) => {
                let mib = (bytes as u64).div_ceil(1 << 20);
                u32::try_from(mib.div_ceil(block) * block).unwrap_or(u32::MAX)
            }
            _ => 0,
        };
        Demand { vcpus, memory_mib }
    }
}

/// The largest a VM may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// vCPUs: `hypervisor.max_vcpus`, or fewer when the VMM created fewer.
    pub max_vcpus: u32,
    /// Why `max_vcpus` is what it is (for errors).
    pub vcpus_from_vm: bool,
    /// Memory (MiB): `hypervisor.max_memory_mib`.
    pub max_memory_mib: u32,
}

impl Bounds {
    /// The configuration's bounds, with the vCPUs capped at `created` (the vCPUs the
    /// VMM has for this VM; `None` before it exists).
    pub fn new(h: &Hypervisor, created: Option<u32>) -> Bounds {
        let max_vcpus = created.map_or(h.max_vcpus, |c| c.min(h.max_vcpus));
        Bounds {
            max_vcpus,
            vcpus_from_vm: max_vcpus < h.max_vcpus,
            max_memory_mib: h.max_memory_mib,
        }
    }
}

/// The size of a VM: vCPUs online and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    /// vCPUs the guest should have online.
    pub vcpus: u32,
    /// Memory (MiB).
    pub memory_mib: u32,
}

/// The size of a VM holding containers with these demands (each named by its id);
/// `culprit` is the container whose arrival or change is being sized, named when the
/// sum goes past `bounds`.
pub fn size(
    h: &Hypervisor,
    bounds: &Bounds,
    demands: &[(String, Demand)],
    culprit: &str,
) -> Result<Size, SizingError> {
    let vcpus = demands
        .iter()
        .fold(u64::from(h.default_vcpus), |a, (_, d)| {
            a + u64::from(d.vcpus)
        });
    let memory = demands
        .iter()
        .fold(u64::from(h.default_memory_mib), |a, (_, d)| {
            a + u64::from(d.memory_mib)
        });
    if vcpus > u64::from(bounds.max_vcpus) {
        return Err(SizingError {
            container: culprit.to_owned(),
            resource: "vCPUs",
            unit: "vCPUs",
            asked: vcpus,
            max: bounds.max_vcpus,
            why: if bounds.vcpus_from_vm {
                format!(
                    "the vCPUs this VM was created with; hypervisor.max_vcpus is {} now, but a \
                     VM keeps the vCPUs it booted with",
                    h.max_vcpus
                )
            } else {
                "hypervisor.max_vcpus".into()
            },
        });
    }
    if memory > u64::from(bounds.max_memory_mib) {
        return Err(SizingError {
            container: culprit.to_owned(),
            resource: "memory",
            unit: "MiB",
            asked: memory,
            max: bounds.max_memory_mib,
            why: "hypervisor.max_memory_mib".into(),
        });
    }
    // both fit in u32: bounded by u32 maxima above
    Ok(Size {
        vcpus: vcpus as u32,
        memory_mib: memory as u32,
    })
}

/// The number of vCPUs the VMM creates for a VM that needs `needed` at boot: as many as it
/// may ever use, `hypervisor.max_vcpus`, and never fewer than `needed`. Those not needed
/// yet wait, halted (an idle host thread each), for the guest to bring them online.
///
/// Not capped by the host's CPUs: Kubernetes lets a container's CPU limit exceed the node's
/// CPUs, and such a pod must start (its vCPUs time-share the host's CPUs, as a runc
/// container's threads would); `max_vcpus` is the operator's bound.
pub fn created_vcpus(h: &Hypervisor, needed: u32) -> u32 {
    h.max_vcpus.max(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(quota: Option<i64>, period: Option<u64>, mem: Option<i64>) -> ContainerLimits {
        ContainerLimits {
            cpu_quota_us: quota,
            cpu_period_us: period,
            memory_limit_bytes: mem,
        }
    }

    #[test]
    fn a_container_demands_whole_vcpus_and_memory_in_blocks() {
        let d = Demand::of(
            &limits(Some(150_000), Some(100_000), Some(512 << 20)),
            None,
            2,
        );
        assert_eq!(
            d,
            Demand {
                vcpus: 2,
                memory_mib: 512
            }
        );
        // one byte past 100 MiB is 101 MiB, rounded to the 2 MiB block: 102
        let d = Demand::of(
            &limits(Some(1), Some(100_000), Some((100 << 20) + 1)),
            None,
            2,
        );
        assert_eq!(
            d,
            Demand {
                vcpus: 1,
                memory_mib: 102
            }
        );
        // unlimited quota, no set, no memory limit: nothing
        assert_eq!(
            Demand::of(&limits(Some(-1), Some(100_000), Some(-1)), None, 2),
            Demand::default()
        );
        // a host CPU set counts its size when there is no quota; a quota wins over it
        assert_eq!(Demand::of(&limits(None, None, None), Some(3), 2).vcpus, 3);
        assert_eq!(
            Demand::of(&limits(Some(50_000), Some(100_000), None), Some(3), 2).vcpus,
            1
        );
        // absurd values saturate instead of wrapping
        let d = Demand::of(&limits(Some(i64::MAX), Some(1), Some(i64::MAX)), None, 0);
        assert_eq!(d.vcpus, u32::MAX);
        assert_eq!(d.memory_mib, u32::MAX);
    }

    #[test]
    fn the_vm_is_the_defaults_plus_the_sum_of_its_containers() {
        let h = Hypervisor::default();
        let b = Bounds::new(&h, Some(4));
        assert_eq!(
            size(&h, &b, &[], "pause").unwrap(),
            Size {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let pod = [
            ("pause".to_owned(), Demand::default()),
            (
                "app".to_owned(),
                Demand {
                    vcpus: 2,
                    memory_mib: 512,
                },
            ),
            (
                "sidecar".to_owned(),
                Demand {
                    vcpus: 1,
                    memory_mib: 64,
                },
            ),
        ];
        assert_eq!(
            size(&h, &b, &pod, "sidecar").unwrap(),
            Size {
                vcpus: 4,
                memory_mib: 832
            }
        );
    }

    #[test]
    fn past_the_maximum_is_refused_naming_container_size_and_maximum() {
        let h = Hypervisor::default();
        let big_cpu = [(
            "greedy".to_owned(),
            Demand {
                vcpus: 8,
                memory_mib: 0,
            },
        )];
        let e = size(&h, &Bounds::new(&h, None), &big_cpu, "greedy").unwrap_err();
        assert_eq!((e.resource, e.asked, e.max), ("vCPUs", 9, 8));
        let text = e.to_string();
        assert!(
            text.contains("greedy") && text.contains("9") && text.contains("8"),
            "{text}"
        );
        assert!(text.contains("hypervisor.max_vcpus"), "{text}");
        // the VM's own vCPUs cap it further, and the error says so
        let e = size(&h, &Bounds::new(&h, Some(2)), &big_cpu, "greedy").unwrap_err();
        assert_eq!(e.max, 2);
        assert!(e.to_string().contains("created with"), "{e}");
        let big_mem = [(
            "hog".to_owned(),
            Demand {
                vcpus: 0,
                memory_mib: 16384,
            },
        )];
        let e = size(&h, &Bounds::new(&h, None), &big_mem, "hog").unwrap_err();
        assert_eq!(
            (e.resource, e.unit, e.asked, e.max),
            ("memory", "MiB", 16384 + 256, 16384)
        );
        assert!(e.to_string().contains("hypervisor.max_memory_mib"), "{e}");
        // exactly at the maximum fits
        let at_max = [(
            "fits".to_owned(),
            Demand {
                vcpus: 7,
                memory_mib: 16384 - 256,
            },
        )];
        assert_eq!(
            size(&h, &Bounds::new(&h, None), &at_max, "fits").unwrap(),
            Size {
                vcpus: 8,
                memory_mib: 16384
            }
        );
        // saturated demands do not overflow the sum
        let absurd = [
            (
                "a".to_owned(),
                Demand {
                    vcpus: u32::MAX,
                    memory_mib: u32::MAX,
                },
            ),
            (
                "b".to_owned(),
                Demand {
                    vcpus: u32::MAX,
                    memory_mib: u32::MAX,
                },
            ),
        ];
        assert!(size(&h, &Bounds::new(&h, None), &absurd, "b").is_err());
    }

    #[test]
    fn the_vmm_creates_max_vcpus_but_never_fewer_than_needed() {
        let mut h = Hypervisor::default(); // max_vcpus 8
        assert_eq!(created_vcpus(&h, 1), 8);
        assert_eq!(created_vcpus(&h, 8), 8);
        h.max_vcpus = 2;
        assert_eq!(created_vcpus(&h, 1), 2);
        assert_eq!(created_vcpus(&h, 3), 3);
    }
}
