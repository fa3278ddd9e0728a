//! Building the VM from a [`VmConfig`] and running it until it stops.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::{self, BootError};
use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::cpu::{self, CpuError};
use crate::devices::legacy::PioBus;
use crate::devices::output::BoundedOutput;
use crate::exit::{EXIT_CONFIG, EXIT_IMAGE, EXIT_KVM, EXIT_VMM, ExitReason};
use crate::hostcheck::{self, HostError, HostFacts};
use crate::kick;
use crate::layout::*;
use crate::memory::{self, MemoryError};
use crate::mptable;
use crate::nudge;
use crate::state::{ExitCounters, VmState};
use crate::virtio::mmio::{MmioTransport, QUEUE_NOTIFY, TransportError};
use crate::virtio::{self, VirtioDevice};

/// Kernel command line the VMM always passes (before device entries and the user's part).
///
/// - `console=ttyS0`: the 8250 at 0x3f8/IRQ 4 is the console;
/// - `reboot=k`: reboot through the i8042 reset line (no ACPI in the guest);
/// - `panic=-1`: reboot immediately on panic, so a dead guest ends the VMM;
/// - `pci=off`: there is no PCI bus, devices are virtio-mmio;
/// - `nomodule`: all drivers are built in;
/// - `i8042.*`: probe only the controller's reset-relevant part, quickly.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

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

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// One virtio-mmio device on the bus.
#[derive(Debug)]
pub struct MmioSlot {
    /// Window base address.
    pub base: u64,
    /// IRQ (IOAPIC pin / GSI).
    pub irq: u32,
    /// Device name for metrics.
    pub name: String,
    /// The transport.
    pub transport: Mutex<MmioTransport>,
}

/// MMIO dispatch.
#[derive(Debug, Default)]
pub struct MmioBus {
    slots: Vec<Arc<MmioSlot>>,
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(&MmioSlot, u64)> {
        self.slots
            .iter()
            .find(|s| addr >= s.base && addr < s.base + VIRTIO_MMIO_SIZE)
            .map(|s| (s.as_ref(), addr - s.base))
    }

    /// Guest MMIO read.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((s, off)) => {
                s.transport
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Guest MMIO write.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((s, off)) => {
                s.transport
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }

    /// The devices.
    pub fn slots(&self) -> &[Arc<MmioSlot>] {
        &self.slots
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

fn open_serial(out: &SerialOutput) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        // What the guest prints goes to a file under /run (RAM): capped.
        SerialOutput::File(p) => Box::new(carapace_footprint::logcap::CappedWriter::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io_err(format!("cannot open serial output {}", p.display())))?,
            carapace_footprint::logcap::DEFAULT_LOG_CAP,
            "carapace-vmm console",
        )),
        SerialOutput::Fd(fd) => Box::new(crate::fdio::file_from_fd(*fd).map_err(io_err(
            format!("serial output fd {fd} is not an open file descriptor"),
        ))?),
    })
}

impl Vm {
    /// Checks the host, builds the VM and starts its vCPUs.
    pub fn start(config: VmConfig, opts: RunOptions) -> Result<Self, VmmError> {
        config.validate()?;
        let format = boot::detect_format(&config.kernel)?;
        tracing::debug!(?format, kernel = %config.kernel.display(), "kernel image");
        let facts = if opts.allow_software_kvm {
            HostFacts {
                cpuinfo: "flags : vmx".into(),
                kvm_pvm_loaded: false,
            }
        } else {
            HostFacts::read()
        };
        hostcheck::check_kvm(&opts.kvm_path, &facts)?;
        let kvm = Kvm::new_with_path(
            std::ffi::CString::new(opts.kvm_path.as_os_str().as_encoded_bytes())
                .unwrap_or_default()
                .as_c_str(),
        )
        .map_err(|source| HostError::Kvm {
            what: "open KVM",
            source,
        })?;
        hostcheck::check_capabilities(&kvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // A vhost-user backend maps guest RAM: memfd-backed and shared only then.
        let mem = memory::create(u64::from(config.memory_mib) << 20, !config.fs.is_empty())?;
        memory::register(&vm, &mem)?;

        let state = Arc::new(VmState::new(opts.start));
        let out = BoundedOutput::spawn(open_serial(&config.serial)?)
            .map_err(io_err("cannot start the console writer thread"))?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&kbd_irq, KBD_IRQ)
            .map_err(kvm_err("KVM_IRQFD (keyboard)"))?;
        let pio = Arc::new(PioBus::new(serial_irq, kbd_irq, out, state.clone()));

        let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
        if let Some(v) = &config.vsock {
            let d = virtio::vsock::Vsock::new(v.guest_cid, &v.uds_path).map_err(|e| {
                VmmError::Device {
                    device: "vsock".into(),
                    source: Box::new(e),
                }
            })?;
            devices.push(("vsock".into(), Box::new(d)));
        }
        for (i, b) in config.block.iter().enumerate() {
            let d =
                virtio::blk::Block::open(&b.path, b.read_only).map_err(|e| VmmError::Device {
                    device: format!("block{i}"),
                    source: Box::new(e),
                })?;
            devices.push((format!("block{i}"), Box::new(d)));
        }
        for (i, f) in config.fs.iter().enumerate() {
            let d = virtio::fs::VhostUserFs::connect(&f.socket, &f.tag, f.request_queues).map_err(
                |e| VmmError::Device {
                    device: format!("fs{i}"),
                    source: Box::new(e),
                },
            )?;
            devices.push((format!("fs{i}"), Box::new(d)));
        }
        if config.rng {
            devices.push(("rng".into(), Box::new(virtio::rng::Rng::new())));
        }
        for (i, n) in config.net.iter().enumerate() {
            let name = format!("net{i}");
            let dev_err = |e: Box<dyn std::error::Error + Send + Sync>| VmmError::Device {
                device: name.clone(),
                source: e,
            };
            let tap = match (&n.tap, n.tap_fd) {
                (Some(t), _) => virtio::tap::Tap::open(t),
                (None, Some(fd)) => virtio::tap::Tap::from_fd(fd),
                (None, None) => {
                    return Err(ConfigError::Invalid {
                        field: "net",
                        reason: "neither `tap` nor `tap_fd` given".into(),
                    }
                    .into());
                }
            }
            .map_err(|e| dev_err(Box::new(e)))?;
            let mac = match &n.mac {
                Some(m) => crate::config::parse_mac(m).map_err(|e| dev_err(e.into()))?,
                None => virtio::net::random_mac(),
            };
            tracing::info!(device = %name, tap = tap.name(), mac = ?mac, "virtio-net");
            devices.push((name, Box::new(virtio::net::Net::new(tap, mac))));
        }
        let mut cmdline = String::from(BASE_CMDLINE);
        let mut bus = MmioBus::default();
        for (i, (name, dev)) in devices.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let irq = VIRTIO_IRQ_BASE + i as u32;
            let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
            vm.register_irqfd(&irq_evt, irq)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            let t =
                MmioTransport::new(dev, mem.clone(), irq_evt).map_err(|e: TransportError| {
                    VmmError::Device {
                        device: name.clone(),
                        source: Box::new(e),
                    }
                })?;
            for (q, evt) in t.queue_events().iter().enumerate() {
                vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                    .map_err(kvm_err("KVM_IOEVENTFD"))?;
            }
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
            bus.slots.push(Arc::new(MmioSlot {
                base,
                irq,
                name,
                transport: Mutex::new(t),
            }));
        }
        if !config.cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&config.cmdline);
        }
        let loaded = boot::load(&mem, &config.kernel, config.initrd.as_deref(), &cmdline)?;
        mptable::write(&mem, config.vcpus)?;

        let base_cpuid = cpu::supported_cpuid(&kvm)?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let mut fds: Vec<VcpuFd> = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            cpu::setup_common(&fd, &base_cpuid, id, config.vcpus, tsc_deadline)?;
            if id == 0 {
                cpu::setup_boot_vcpu(&fd, &mem, loaded.entry)?;
            }
            fds.push(fd);
        }
        kick::install_handler().map_err(|e| VmmError::Io {
            what: "cannot install the vCPU kick signal handler".into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        crate::virtio::worker::set_rescue_period_ms(config.irq_rescue_ms);

        let mmio = Arc::new(bus);
        let entries = Arc::new(nudge::Entries::new(fds.len()));
        let mut vcpus = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            let (state, pio, mmio) = (state.clone(), pio.clone(), mmio.clone());
            let entries = entries.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_loop(id, fd, &state, &pio, &mmio, &entries))
                .map_err(io_err("cannot spawn a vCPU thread"))?;
            vcpus.push(h);
        }
        tracing::info!(
            vcpus = config.vcpus,
            memory_mib = config.memory_mib,
            devices = mmio.slots().len(),
            setup_ms = opts.start.elapsed().as_secs_f64() * 1000.0,
            "VM started"
        );
        let nudge_period = nudge::period(config.vcpu_nudge_ms);
        let handle = VmHandle {
            state,
            pio,
            mmio,
            cmdline: cmdline.into(),
            config: Arc::new(config),
            vcpus: Arc::new(Mutex::new(vcpus)),
        };
        if let Some(period) = nudge_period {
            let h = handle.clone();
            std::thread::Builder::new()
                .name("vcpu-nudge".into())
                .stack_size(64 * 1024)
                .spawn(move || h.nudge_loop(&entries, period))
                .map_err(io_err("cannot spawn the vCPU nudge thread"))?;
            tracing::warn!(
                period_ms = period.as_millis(),
                "lab workaround vcpu_nudge_ms is on: vCPUs inside KVM_RUN for a whole period are interrupted"
            );
        }
        Ok(Vm {
            handle,
            mem,
            _vm: vm,
        })
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
    /// Guest RAM.
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

/// How long [`VmHandle::pause`] waits for the vCPUs to leave KVM_RUN after its kick.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(1);

fn vcpu_loop(
    id: usize,
    mut fd: VcpuFd,
    state: &VmState,
    pio: &PioBus,
    mmio: &MmioBus,
    entries: &nudge::Entries,
) {
    let c = &state.exits;
    // SAFETY: `fd` lives in this function until it returns, and `_kick` is declared after
    // it, so the binding is dropped (cleared) before the vCPU's kvm_run mapping goes away.
    let _kick = unsafe { kick::Bound::bind(&mut fd) };
    loop {
        // Re-arm before looking at the flags: a kick that came before this is seen as its
        // flag; one that comes after ends the next KVM_RUN at once.
        kick::rearm(&mut fd);
        if state.stopping() {
            return;
        }
        let running = state.vcpu_running();
        if state.paused() {
            drop(running);
            state.wait_while_paused();
            continue;
        }
        #[cfg(test)]
        state.test_hooks.before_run(id);
        entries.enter(id);
        let exit = fd.run();
        entries.leave(id);
        // `running` lives until the exit is handled (and counted): a pause that saw no
        // vCPU running sees its exits too.
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                ExitCounters::bump(&c.io_in);
                pio.read(port, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ExitCounters::bump(&c.io_out);
                pio.write(port, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ExitCounters::bump(&c.mmio_read);
                if !mmio.read(addr, data) {
                    ExitCounters::bump(&c.unhandled);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ExitCounters::bump(&c.mmio_write);
                if !mmio.write(addr, data) {
                    ExitCounters::bump(&c.unhandled);
                }
            }
            Ok(VcpuExit::Hlt) => {
                ExitCounters::bump(&c.hlt);
                state.guest_halted();
                return;
            }
            Ok(VcpuExit::Shutdown) => {
                state.guest_reset(true);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                        state.request_exit(ExitReason::PowerOff)
                    }
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => state.guest_reset(false),
                    other => state.request_exit(ExitReason::GuestCrash(format!(
                        "vCPU {id}: KVM system event {other}"
                    ))),
                }
                return;
            }
            Ok(VcpuExit::InternalError) => {
                state.request_exit(ExitReason::GuestCrash(format!(
                    "vCPU {id}: KVM internal error (emulation failure)"
                )));
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                state.request_exit(ExitReason::GuestCrash(format!(
                    "vCPU {id}: VM entry failed on host CPU {cpu}, reason {reason:#x}"
                )));
                return;
            }
            Ok(VcpuExit::Intr) => ExitCounters::bump(&c.interrupted),
            Ok(other) => {
                ExitCounters::bump(&c.other);
                tracing::debug!(vcpu = id, exit = ?other, "unhandled vCPU exit");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ExitCounters::bump(&c.interrupted);
            }
            Err(e) => {
                state.request_exit(ExitReason::VmmError(format!("vCPU {id}: KVM_RUN: {e}")));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! These run hand-made guest code on whatever /dev/kvm exists (a software KVM is fine
    //! for a few instructions); they are skipped when /dev/kvm is missing.
    use super::*;
    use crate::boot::tests::pvh_elf;
    use crate::state::MARKER_POWER_OFF;

    fn kvm_usable() -> bool {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
    }

    fn run_snippet(code: &[u8]) -> (ExitReason, Vm, String) {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, pvh_elf(code, 0x100_0000)).unwrap();
        let serial = dir.path().join("serial.log");
        let mut c = VmConfig::with_kernel(&k);
        c.memory_mib = 64;
        c.serial = SerialOutput::File(serial.clone());
        let opts = RunOptions {
            allow_software_kvm: true,
            ..Default::default()
        };
        let mut vm = Vm::start(c, opts).unwrap();
        assert_eq!(vm.info().vcpus, 1);
        let r = vm
            .wait(Some(Duration::from_secs(60)))
            .expect("guest did not stop");
        let out = std::fs::read_to_string(&serial).unwrap();
        (r, vm, out)
    }

    #[test]
    fn pvh_entry_serial_marker_and_poweroff() {
        if !kvm_usable() {
            return;
        }
        // 32-bit protected mode (PVH entry): ebx must point at the start_info magic.
        let mut code = vec![
            0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmp dword [ebx], 0x336ec578
            0x75, 0x1d, // jne fail (+29)
        ];
        code.extend_from_slice(&[
            0x66,
            0xba,
            0xf8,
            0x03, // mov dx, 0x3f8
            0xb0,
            b'O',
            0xee, // mov al, 'O'; out dx, al
            0xb0,
            b'K',
            0xee, // mov al, 'K'; out dx, al
            0xb0,
            b'\n',
            0xee, // newline
            0x66,
            0xba,
            0xf0,
            0x03, // mov dx, 0x3f0
            0xb0,
            123,
            0xee, // boot done
            0xb0,
            MARKER_POWER_OFF,
            0xee, // power-off intent
            0xb0,
            0xfe,
            0xe6,
            0x64, // mov al, 0xfe; out 0x64, al  (i8042 reset)
            0xf4, // hlt (not reached)
            0xeb,
            0xfe, // jmp $ (not reached)
        ]);
        // fail: triple fault via int3 with an empty IDT
        code.push(0xcc);
        let (r, vm, out) = run_snippet(&code);
        assert_eq!(out, "OK\n");
        assert_eq!(r, ExitReason::PowerOff);
        assert!(vm.state.boot_done().is_some());
        let m = vm.metrics();
        assert!(m.exits.io_out >= 6, "{m:?}");
    }

    #[test]
    fn triple_fault_and_reboot_exit_codes() {
        if !kvm_usable() {
            return;
        }
        let (r, _, _) = run_snippet(&[0xcc]); // int3, IDT empty -> triple fault
        if HostFacts::read().software_kvm().is_some() {
            // kvm_pvm cannot deliver the exception and reports an emulation failure instead.
            assert!(
                matches!(r, ExitReason::TripleFault | ExitReason::GuestCrash(_)),
                "{r:?}"
            );
        } else {
            assert_eq!(r, ExitReason::TripleFault);
            assert_eq!(r.code(), 33);
        }
        let (r, _, _) = run_snippet(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
        assert_eq!(r, ExitReason::Reboot);
        assert_eq!(r.code(), 32);
    }

    /// A VM whose one vCPU spins in guest code (`jmp $`) until stopped.
    fn spinning_vm() -> (Vm, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, pvh_elf(&[0xeb, 0xfe], 0x100_0000)).unwrap();
        let mut c = VmConfig::with_kernel(&k);
        c.memory_mib = 64;
        c.serial = SerialOutput::None;
        let opts = RunOptions {
            allow_software_kvm: true,
            ..Default::default()
        };
        (Vm::start(c, opts).unwrap(), dir)
    }

    fn interrupted(vm: &Vm) -> u64 {
        vm.state.exits.snapshot().interrupted
    }

    #[test]
    fn a_kick_between_the_flag_check_and_kvm_run_is_not_lost() {
        if !kvm_usable() {
            return;
        }
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::mpsc;
        let (mut vm, _dir) = spinning_vm();
        // The hook holds the vCPU in the window between its look at the pause flag and
        // KVM_RUN, for as long as the test needs to kick it there.
        let armed = Arc::new(AtomicBool::new(false));
        let (in_window, reached) = mpsc::channel::<()>();
        let (go, wait_go) = mpsc::channel::<()>();
        let wait_go = Mutex::new(wait_go);
        let a = armed.clone();
        vm.state.test_hooks.set_before_run(move |_| {
            if a.swap(false, Ordering::SeqCst) {
                let _ = in_window.send(());
                let _ = wait_go.lock().unwrap().recv();
            }
        });
        for cycle in 0..20 {
            armed.store(true, Ordering::SeqCst);
            // No flag set: this kick only brings the spinning vCPU round to the hook.
            vm.kick_vcpus();
            reached
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("cycle {cycle}: the vCPU never left KVM_RUN"));
            let before = interrupted(&vm);
            vm.state.set_paused(true);
            vm.kick_vcpus(); // lands while the vCPU is outside KVM_RUN, past its flag check
            go.send(()).unwrap();
            assert!(
                vm.state.wait_none_running(Duration::from_secs(5)),
                "cycle {cycle}: the kick was lost, the vCPU went on running guest code"
            );
            assert_eq!(
                interrupted(&vm) - before,
                1,
                "cycle {cycle}: one immediate exit per kick"
            );
            vm.resume();
        }
        vm.state.request_exit(ExitReason::PowerOff);
        assert_eq!(
            vm.wait(Some(Duration::from_secs(10))),
            Some(ExitReason::PowerOff)
        );
    }

    #[test]
    fn every_pause_takes_one_kick() {
        if !kvm_usable() {
            return;
        }
        let (mut vm, _dir) = spinning_vm();
        let cycles = 200;
        let before = interrupted(&vm);
        for cycle in 0..cycles {
            assert!(vm.pause(), "cycle {cycle}: pause timed out");
            assert_eq!(vm.state.running_vcpus(), 0);
            vm.resume();
        }
        // One exit per pause (the kick); a kick that lands before KVM_RUN costs no more.
        let exits = interrupted(&vm) - before;
        assert!(
            exits <= cycles,
            "{exits} interrupted exits for {cycles} pauses"
        );
        vm.state.request_exit(ExitReason::PowerOff);
        assert_eq!(
            vm.wait(Some(Duration::from_secs(10))),
            Some(ExitReason::PowerOff)
        );
    }

    #[test]
    fn software_kvm_is_refused_with_reason() {
        if !kvm_usable() || HostFacts::read().software_kvm().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, pvh_elf(&[0xf4], 0x100_0000)).unwrap();
        let e = Vm::start(VmConfig::with_kernel(&k), RunOptions::default()).unwrap_err();
        assert_eq!(e.exit_code(), EXIT_KVM);
        assert!(e.to_string().contains("software KVM"), "{e}");
    }
}
