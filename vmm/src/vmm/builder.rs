//! Building a VM in small steps, in the order KVM and the guest need them: host and KVM,
//! the VM and its in-kernel irqchip and PIT, guest memory, the legacy port devices, the
//! virtio devices and their MMIO windows (which make the command line), kernel and MP
//! table, vCPUs, and last the threads that run it all ([`VmBuilder::start`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    BASE_CMDLINE, HOTPLUG_CMDLINE, MmioBus, MmioSlot, RunOptions, Vm, VmHandle, VmmError, vcpu,
};
use crate::boot;
use crate::config::{ConfigError, NetConfig, SerialOutput, VmConfig};
use crate::cpu;
use crate::devices::legacy::PioBus;
use crate::devices::output::BoundedOutput;
use crate::hostcheck::{self, HostError, HostFacts};
use crate::kick;
use crate::layout::*;
use crate::memory;
use crate::mptable;
use crate::nudge;
use crate::state::VmState;
use crate::virtio::mem::{MemControl, VirtioMem};
use crate::virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
use crate::virtio::{self, VirtioDevice};

pub(super) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

pub(super) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

fn device_err<E>(device: &str) -> impl FnOnce(E) -> VmmError
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let device = device.to_owned();
    move |e| VmmError::Device {
        device,
        source: e.into(),
    }
}

/// A named virtio device before it gets its MMIO window.
type NamedDevice = (String, Box<dyn VirtioDevice>);

/// The parts of a VM being built: what every later step needs.
pub(super) struct VmBuilder {
    config: VmConfig,
    opts: RunOptions,
    kvm: Kvm,
    vm: VmFd,
    /// RAM and the hot-plug region: what KVM, the devices and vhost backends see.
    mem: GuestMemoryMmap,
    /// RAM only: where the kernel, initrd, boot tables and the e820/PVH map go.
    ram: GuestMemoryMmap,
    /// The virtio-mem device's state, when the VM has memory hot-plug.
    mem_ctl: Option<Arc<MemControl>>,
    state: Arc<VmState>,
}

impl VmBuilder {
    /// Validates the description, checks the host, creates the VM (irqchip, PIT) and its
    /// memory.
    pub(super) fn new(config: VmConfig, opts: RunOptions) -> Result<Self, VmmError> {
        config.validate()?;
        let format = boot::detect_format(&config.kernel)?;
        tracing::debug!(?format, kernel = %config.kernel.display(), "kernel image");
        let kvm = open_kvm(&opts)?;
        let vm = create_vm(&kvm)?;
        // A vhost-user backend maps guest RAM: memfd-backed and shared only then. The
        // hot-plug region is registered whole, up front (see memory.rs).
        let hotplug = config.memory_hotplug.as_ref();
        let g = memory::create_with_hotplug(
            u64::from(config.memory_mib) << 20,
            !config.fs.is_empty(),
            hotplug.map_or(0, |h| u64::from(h.region_mib) << 20),
        )?;
        memory::register(&vm, &g.all)?;
        let mem_ctl = match (g.hotplug, hotplug) {
            (Some(region), Some(h)) => {
                tracing::info!(
                    addr = format_args!("{:#x}", region.addr()),
                    region_mib = h.region_mib,
                    block_mib = h.block_mib,
                    "memory hot-plug region"
                );
                Some(Arc::new(MemControl::new(
                    region,
                    u64::from(h.block_mib) << 20,
                )))
            }
            _ => None,
        };
        let state = Arc::new(VmState::new(opts.start));
        Ok(VmBuilder {
            config,
            opts,
            kvm,
            vm,
            mem: g.all,
            ram: g.ram,
            mem_ctl,
            state,
        })
    }

    /// Serial console and i8042 on the port bus, with their irqfds; the console's
    /// destination is opened now, its writer thread starts in [`VmBuilder::start`].
    pub(super) fn legacy_devices(&self) -> Result<(Arc<PioBus>, ConsoleWriter), VmmError> {
        let out = BoundedOutput::new();
        let writer = ConsoleWriter {
            out: out.clone(),
            dest: open_serial(&self.config.serial)?,
        };
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        self.vm
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        self.vm
            .register_irqfd(&kbd_irq, KBD_IRQ)
            .map_err(kvm_err("KVM_IRQFD (keyboard)"))?;
        let pio = Arc::new(PioBus::new(serial_irq, kbd_irq, out, self.state.clone()));
        Ok((pio, writer))
    }

    /// The virtio devices of the description, in the order of the guest contract: vsock,
    /// block devices, fs devices, rng, net devices, memory hot-plug.
    pub(super) fn virtio_devices(&self) -> Result<Vec<NamedDevice>, VmmError> {
        let c = &self.config;
        let mut devices: Vec<NamedDevice> = Vec::new();
        if let Some(v) = &c.vsock {
            let mut d =
                virtio::vsock::Vsock::new(v.guest_cid, &v.uds_path).map_err(device_err("vsock"))?;
            if let Some(inside) = c.jail.as_ref().and_then(|j| j.inside(&v.uds_path)) {
                d.set_connect_base(inside);
            }
            devices.push(("vsock".into(), Box::new(d)));
        }
        for (i, b) in c.block.iter().enumerate() {
            let name = format!("block{i}");
            let d = virtio::blk::Block::open(&b.path, b.read_only).map_err(device_err(&name))?;
            devices.push((name, Box::new(d)));
        }
        for (i, f) in c.fs.iter().enumerate() {
            let name = format!("fs{i}");
            let d = virtio::fs::VhostUserFs::connect(&f.socket, &f.tag, f.request_queues)
                .map_err(device_err(&name))?;
            devices.push((name, Box::new(d)));
        }
        if c.rng {
            devices.push(("rng".into(), Box::new(virtio::rng::Rng::new())));
        }
        for (i, n) in c.net.iter().enumerate() {
            let name = format!("net{i}");
            let d = net_device(&name, n)?;
            devices.push((name, Box::new(d)));
        }
        if let Some(ctl) = &self.mem_ctl {
            devices.push(("mem".into(), Box::new(VirtioMem::new(ctl.clone()))));
        }
        if c.free_page_reporting {
            devices.push(("balloon".into(), Box::new(virtio::balloon::Balloon::new())));
        }
        Ok(devices)
    }

    /// Gives each device its MMIO window, interrupt (irqfd) and queue ioeventfds; returns
    /// the bus and the guest command line (base, one entry per device, the user's part).
    pub(super) fn attach_mmio(
        &self,
        devices: Vec<NamedDevice>,
    ) -> Result<(MmioBus, String), VmmError> {
        let mut cmdline = String::from(BASE_CMDLINE);
        let mut bus = MmioBus::default();
        for (i, (name, dev)) in devices.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let irq = VIRTIO_IRQ_BASE + i as u32;
            let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
            self.vm
                .register_irqfd(&irq_evt, irq)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            let t =
                MmioTransport::new(dev, self.mem.clone(), irq_evt).map_err(device_err(&name))?;
            for (q, evt) in t.queue_events().iter().enumerate() {
                self.vm
                    .register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
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
        if self.mem_ctl.is_some() {
            cmdline.push(' ');
            cmdline.push_str(HOTPLUG_CMDLINE);
        }
        if !self.config.cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.config.cmdline);
        }
        Ok((bus, cmdline))
    }

    /// Loads kernel and initrd with `cmdline` and writes the MP table; returns the entry.
    pub(super) fn load_guest(&self, cmdline: &str) -> Result<boot::BootEntry, VmmError> {
        let c = &self.config;
        let loaded = boot::load(&self.ram, &c.kernel, c.initrd.as_deref(), cmdline)?;
        mptable::write(&self.ram, c.vcpus)?;
        Ok(loaded.entry)
    }

    /// Creates and sets up the vCPUs (CPUID, MSRs, LAPIC; the boot vCPU at `entry`).
    pub(super) fn vcpus(&self, entry: boot::BootEntry) -> Result<Vec<VcpuFd>, VmmError> {
        let n = self.config.vcpus;
        let base_cpuid = cpu::supported_cpuid(&self.kvm)?;
        let tsc_deadline = self.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let mut fds = Vec::new();
        for id in 0..n {
            let fd = self
                .vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            cpu::setup_common(&fd, &base_cpuid, id, n, tsc_deadline)?;
            if id == 0 {
                cpu::setup_boot_vcpu(&fd, &self.ram, entry)?;
            }
            fds.push(fd);
        }
        Ok(fds)
    }

    /// Starts the VM: kick handler, rescue period for the device workers, one thread per
    /// vCPU, and the vCPU nudger when `vcpu_nudge_ms` asks for it.
    pub(super) fn start(
        self,
        pio: Arc<PioBus>,
        console: ConsoleWriter,
        bus: MmioBus,
        cmdline: String,
        fds: Vec<VcpuFd>,
    ) -> Result<Vm, VmmError> {
        let VmBuilder {
            config,
            opts,
            kvm: _,
            vm,
            mem,
            ram: _,
            mem_ctl,
            state,
        } = self;
        kick::install_handler().map_err(|e| VmmError::Io {
            what: "cannot install the vCPU kick signal handler".into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        crate::virtio::worker::set_rescue_period_ms(config.irq_rescue_ms);
        // Everything is open and no thread exists yet: the jail comes now.
        if let Some(j) = &config.jail {
            crate::jail::enter(j, &writable_image_sizes(&config))?;
            tracing::info!(
                root = %j.root.display(),
                uid = j.uid,
                gid = j.gid,
                net_namespace = j.net_namespace,
                "VMM jailed"
            );
        }
        console
            .out
            .start_writer(console.dest)
            .map_err(io_err("cannot start the console writer thread"))?;
        // Device workers are created by the spawner, not by the vCPU that activates them
        // (see spawner.rs): started before any vCPU runs.
        if crate::seccomp::configured() {
            crate::spawner::start().map_err(io_err("cannot start the worker spawner thread"))?;
        }

        let mmio = Arc::new(bus);
        let entries = Arc::new(nudge::Entries::new(fds.len()));
        let mut vcpus = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            let (state, pio, mmio) = (state.clone(), pio.clone(), mmio.clone());
            let entries = entries.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run(id, fd, &state, &pio, &mmio, &entries))
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
            memory_hotplug: mem_ctl,
            vcpus: Arc::new(Mutex::new(vcpus)),
        };
        if let Some(period) = nudge_period {
            let h = handle.clone();
            std::thread::Builder::new()
                .name("vcpu-nudge".into())
                .stack_size(64 * 1024)
                .spawn(move || {
                    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Nudge);
                    h.nudge_loop(&entries, period)
                })
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
}

/// The console's ring and its destination, joined by a writer thread at start.
pub(super) struct ConsoleWriter {
    out: BoundedOutput,
    dest: Box<dyn Write + Send>,
}

/// Sizes of the writable block images (the jail's RLIMIT_FSIZE must exceed them).
fn writable_image_sizes(c: &VmConfig) -> Vec<u64> {
    c.block
        .iter()
        .filter(|b| !b.read_only)
        .filter_map(|b| std::fs::metadata(&b.path).ok().map(|m| m.len()))
        .collect()
}

/// Checks that this host's KVM can run Linux guests and opens it.
fn open_kvm(opts: &RunOptions) -> Result<Kvm, VmmError> {
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
    Ok(kvm)
}

/// The VM with its TSS, in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
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
    Ok(vm)
}

/// A virtio-net device on the tap (named or inherited) of `n`.
fn net_device(name: &str, n: &NetConfig) -> Result<virtio::net::Net, VmmError> {
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
    .map_err(device_err(name))?;
    let mac = match &n.mac {
        Some(m) => crate::config::parse_mac(m).map_err(device_err(name))?,
        None => virtio::net::random_mac(),
    };
    tracing::info!(
        device = %name,
        tap = tap.name(),
        mac = ?mac,
        backend = if n.vhost { "vhost-net" } else { "userspace" },
        "virtio-net"
    );
    if n.vhost {
        let fd = virtio::net::vhost::open_device().map_err(device_err(name))?;
        return virtio::net::Net::with_vhost(tap, mac, fd).map_err(device_err(name));
    }
    Ok(virtio::net::Net::new(tap, mac))
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
