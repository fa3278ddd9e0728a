//! What the control API reports about a VM: `info` and `metrics`, typed.

use super::VmHandle;
use carapace_vm_config::api::MemoryHotplugInfo;

impl VmHandle {
    /// Static facts and live status for the API's `info`.
    pub fn info(&self) -> VmInfo {
        VmInfo {
            boot_done_ms: self.state.boot_done().map(|d| d.as_secs_f64() * 1000.0),
            cmdline: self.cmdline.to_string(),
            devices: self
                .mmio
                .slots()
                .iter()
                .map(|s| DeviceInfo {
                    irq: s.irq,
                    mmio_base: s.base,
                    name: s.name.clone(),
                })
                .collect(),
            kernel: self.config.kernel.clone(),
            memory_hotplug: self.memory_hotplug.as_ref().map(|c| c.status().info()),
            memory_mib: self.config.memory_mib,
            state: if self.state.stopping() {
                "stopping"
            } else if self.state.paused() {
                "paused"
            } else {
                "running"
            },
            uptime_ms: self.state.start.elapsed().as_millis() as u64,
            vcpus: self.config.vcpus,
        }
    }

    /// Metrics snapshot (exits by kind, console, devices).
    pub fn metrics(&self) -> VmMetrics {
        VmMetrics {
            console: self.pio.console().stats(),
            devices: self
                .mmio
                .slots()
                .iter()
                .map(|s| {
                    let t = s.transport.lock().unwrap_or_else(|p| p.into_inner());
                    (s.name.clone(), t.metrics())
                })
                .collect(),
            exits: self.state.exits.snapshot(),
        }
    }
}

/// The API's `info` (fields sorted by name, as the API has always listed them).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VmInfo {
    /// When the guest wrote the boot-done marker (ms since the VMM started), if it did.
    pub boot_done_ms: Option<f64>,
    /// The guest's command line.
    pub cmdline: String,
    /// The virtio-mmio devices.
    pub devices: Vec<DeviceInfo>,
    /// The kernel image.
    pub kernel: std::path::PathBuf,
    /// Hot-plug memory (virtio-mem) sizes, `null` without memory hot-plug.
    pub memory_hotplug: Option<MemoryHotplugInfo>,
    /// Guest RAM (without hot-plugged memory).
    pub memory_mib: u32,
    /// `running`, `paused` or `stopping`.
    pub state: &'static str,
    /// Time since the VMM started (ms).
    pub uptime_ms: u64,
    /// vCPUs.
    pub vcpus: u8,
}

/// One virtio-mmio device in [`VmInfo`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// Its interrupt (GSI).
    pub irq: u32,
    /// Its register window.
    pub mmio_base: u64,
    /// Its name (`vsock`, `block0`, `fs0`, `rng`, `net0`, ...).
    pub name: String,
}

/// The API's `metrics`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VmMetrics {
    /// Console bytes written and dropped.
    pub console: crate::devices::output::OutputStats,
    /// Per device, by name: transport and device counters.
    pub devices: std::collections::BTreeMap<String, crate::virtio::mmio::MmioMetrics>,
    /// VM exits by kind.
    pub exits: crate::state::ExitCountersSnapshot,
}
