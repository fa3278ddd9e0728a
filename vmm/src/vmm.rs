//! Building the VM from a [`VmConfig`] and running it until it stops.
//!
//! - `builder.rs`: [`Vm::start`] in steps (host and KVM, memory, devices, vCPUs, threads);
//! - `bus.rs`: the virtio-mmio bus;
//! - `vcpu.rs`: the vCPU thread's KVM_RUN loop;
//! - `report.rs`: the API's `info` and `metrics`;
//! - here: the errors, [`Vm`] and the [`VmHandle`] the API uses (pause, resume, stop).

mod builder;
mod bus;
mod report;
#[cfg(test)]
mod tests;
mod vcpu;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

use crate::boot::BootError;
use crate::config::{ConfigError, VmConfig};
use crate::cpu::CpuError;
use crate::devices::legacy::PioBus;
use crate::exit::{EXIT_CONFIG, EXIT_IMAGE, EXIT_KVM, EXIT_VMM, ExitReason};
use crate::hostcheck::HostError;
use crate::kick;
use crate::memory::MemoryError;
use crate::mptable;
use crate::nudge;
use crate::state::{ExitCounters, VmState};

pub use bus::{MmioBus, MmioSlot};
pub use carapace_vm_config::api::MemoryHotplugInfo;
pub use report::{DeviceInfo, VmInfo, VmMetrics};

/// Kernel command line the VMM always passes (before device entries and the user's part).
///
/// - `console=ttyS0`: the 8250 at 0x3f8/IRQ 4 is the console;
/// - `reboot=k`: reboot through the i8042 reset line (no ACPI in the guest);
/// - `panic=-1`: reboot immediately on panic, so a dead guest ends the VMM;
/// - `pci=off`: there is no PCI bus, devices are virtio-mmio;
/// - `i8042.*`: probe only the controller's reset-relevant part, quickly.
///
/// (No `nomodule`: no kernel knows it, so the kernel handed it to /init as an argument.)
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Kernel parameters the VMM adds (after the device entries) when the VM has memory
/// hot-plug: memory the virtio-mem driver adds is onlined at once by the kernel (no udev
/// in the guest), in the zone the kernel's recommended policy for virtio-mem picks
/// (ZONE_MOVABLE while the movable/kernel ratio allows, so it can be unplugged again).
pub const HOTPLUG_CMDLINE: &str =
    "memhp_default_state=online memory_hotplug.online_policy=auto-movable";

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM unusable on this host.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Kernel / initrd problem.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU setup.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A KVM VM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A device could not be created.
    #[error("cannot create device {device}")]
    Device {
        /// Device name.
        device: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An I/O resource (eventfd, thread, output file) could not be created.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// The VMM could not enter its jail.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
}

impl VmmError {
    /// Process exit code for this error (see [`crate::exit`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmError::Config(_) => EXIT_CONFIG,
            VmmError::Host(_) => EXIT_KVM,
            VmmError::Boot(_) => EXIT_IMAGE,
            _ => EXIT_VMM,
        }
    }
}

/// Options that are not part of the VM description.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Reference instant for boot-done times (the VMM's process start).
    pub start: Instant,
    /// KVM device path.
    pub kvm_path: std::path::PathBuf,
    /// Skip the software-KVM refusal (only for tests that run hand-made code snippets).
    pub allow_software_kvm: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            start: Instant::now(),
            kvm_path: "/dev/kvm".into(),
            allow_software_kvm: false,
        }
    }
}

/// A cheap, cloneable handle on a running VM (for the control API).
#[derive(Debug, Clone)]
pub struct VmHandle {
    /// Shared state (exit reason, boot-done, pause, counters).
    pub state: Arc<VmState>,
    /// Port I/O devices.
    pub pio: Arc<PioBus>,
    /// virtio-mmio devices.
    pub mmio: Arc<MmioBus>,
    /// The command line given to the guest.
    pub cmdline: Arc<str>,
    /// The configuration.
    pub config: Arc<VmConfig>,
    /// The virtio-mem device's state (API `memory`), when the VM has memory hot-plug.
    pub memory_hotplug: Option<Arc<crate::virtio::mem::MemControl>>,
    vcpus: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// A built, running VM.
#[derive(Debug)]
pub struct Vm {
    /// Handle shared with the control API.
    pub handle: VmHandle,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    _vm: VmFd,
}

impl std::ops::Deref for Vm {
    type Target = VmHandle;
    fn deref(&self) -> &VmHandle {
        &self.handle
    }
}

impl Vm {
    /// Checks the host, builds the VM and starts its vCPUs.
    pub fn start(config: VmConfig, opts: RunOptions) -> Result<Self, VmmError> {
        let b = builder::VmBuilder::new(config, opts)?;
        let (pio, console) = b.legacy_devices()?;
        let devices = b.virtio_devices()?;
        let (bus, cmdline) = b.attach_mmio(devices)?;
        let entry = b.load_guest(&cmdline)?;
        let fds = b.vcpus(entry)?;
        b.start(pio, console, bus, cmdline, fds)
    }

    /// Waits until the VM stops (or `timeout`), then stops the vCPUs and flushes the console.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<ExitReason> {
        let reason = self.state.wait_exit(timeout)?;
        self.handle.stop_vcpus();
        self.pio.console().drain(Duration::from_secs(2));
        Some(reason)
    }
}

impl VmHandle {
    /// Until the VM stops: every `period`, interrupts the vCPUs that stayed inside KVM_RUN
    /// for a whole period (see `nudge.rs`).
    fn nudge_loop(&self, entries: &nudge::Entries, period: Duration) {
        while !self.state.stopping() {
            std::thread::sleep(period);
            if self.state.paused() || self.state.stopping() {
                continue;
            }
            let stuck = entries.stuck_for(period);
            if stuck.is_empty() {
                continue;
            }
            let vcpus = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
            for id in stuck {
                if let Some(h) = vcpus.get(id).filter(|h| !h.is_finished()) {
                    ExitCounters::bump(&self.state.exits.nudged);
                    crate::guest_warn!(
                        vcpu = id,
                        "lab workaround vcpu_nudge_ms: a vCPU inside KVM_RUN for a whole period was interrupted"
                    );
                    let _ = h.kill(kick::signal());
                }
            }
        }
    }

    /// Interrupts every vCPU's KVM_RUN, once: call after setting the flag the vCPUs must
    /// look at (pause, stop). A kick is never lost (see `kick.rs`).
    pub fn kick_vcpus(&self) {
        let vcpus = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        for h in vcpus.iter() {
            if !h.is_finished() {
                let _ = h.kill(kick::signal());
            }
        }
    }

    /// Pauses the vCPUs: one kick, then waits until none runs guest code. `false` when a vCPU
    /// is still inside KVM_RUN after `PAUSE_TIMEOUT` (a kick cannot be lost, so only a host
    /// too busy to schedule the vCPU thread gets there).
    pub fn pause(&self) -> bool {
        self.state.set_paused(true);
        self.kick_vcpus();
        let paused = self.state.wait_none_running(PAUSE_TIMEOUT);
        if !paused {
            tracing::warn!(
                running = self.state.running_vcpus(),
                "vCPUs still running {PAUSE_TIMEOUT:?} after the pause kick"
            );
        }
        paused
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        self.state.set_paused(false);
    }

    /// Ends the vCPU threads: the exit reason is set (`stopping`), so one kick makes each
    /// leave KVM_RUN and return; waits up to 2 s for them.
    fn stop_vcpus(&self) {
        self.kick_vcpus();
        let deadline = Instant::now() + Duration::from_secs(2);
        let unfinished = || {
            let v = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
            v.iter().any(|h| !h.is_finished())
        };
        // A vCPU that was kicked is on its way out; this only waits for it to get there
        // (no re-kick: a kick is not lost).
        while unfinished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut v = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        for h in v.drain(..) {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// How long [`VmHandle::pause`] waits for the vCPUs to leave KVM_RUN after its kick.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(1);
