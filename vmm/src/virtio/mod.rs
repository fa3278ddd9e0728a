//! virtio devices behind the virtio-mmio transport.
//!
//! Each device implements [`VirtioDevice`]. The transport ([`mmio::MmioTransport`]) owns the
//! register state and the queues until the driver sets DRIVER_OK; it then validates the queues
//! against guest memory and hands them, with their notification eventfds (KVM ioeventfds in the
//! VMM), to [`VirtioDevice::activate`]. Devices process their queues on a worker thread of
//! their own ([`worker`]) running one [`event::EventLoop`], so a slow backend never stalls a vCPU.
//!
//! Everything in guest memory is untrusted: descriptor chains are walked with bounds
//! (virtio-queue stops at the queue size, checks addresses against guest memory), request
//! sizes are capped per device, and a malformed request fails that request or, at worst,
//! puts the device into DEVICE_NEEDS_RESET. The VMM never panics on guest input.

pub mod balloon;
pub mod blk;
pub mod event;
pub mod fs;
pub mod mem;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod tap;
pub mod vhost_irq;
pub mod vsock;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: we only offer the modern (1.0+) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device type ids.
pub mod device_type {
    /// virtio-net.
    pub const NET: u32 = 1;
    /// virtio-blk.
    pub const BLOCK: u32 = 2;
    /// virtio-rng (entropy).
    pub const RNG: u32 = 4;
    /// virtio-balloon (free page reporting only).
    pub const BALLOON: u32 = 5;
    /// virtio-vsock.
    pub const VSOCK: u32 = 19;
    /// virtio-mem (memory hot-plug).
    pub const MEM: u32 = 24;
    /// virtio-fs.
    pub const FS: u32 = 26;
}

/// Interrupt status bit: a used buffer was added.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 0x2;

/// How a device raises interrupts and reports failure to its transport.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
    /// InterruptACK writes seen, so a watchdog can tell a handled interrupt from a lost one.
    acks: AtomicU64,
    /// Interrupts raised again because the guest left one unacknowledged (see [`IrqWatch`]).
    resent: AtomicU64,
    /// irqfd writes: set against `acks`, how many interrupts the guest never handled.
    raised: AtomicU64,
}

/// Detects an interrupt the guest never handled: one watch per device worker, checked on the
/// worker's rescue ticks ([`worker::rescue_period`], when `irq_rescue_ms` turns them on). When the status register stayed
/// non-zero with no InterruptACK across a whole tick, the edge was lost on the way (seen
/// under nested, emulated virtualization) or the guest is very slow; raising it again is
/// harmless either way, because the guest's handler reads the status register and finds
/// nothing new at worst.
#[derive(Debug, Default)]
pub struct IrqWatch {
    pending: bool,
    acks: u64,
}

impl Interrupt {
    /// Wraps the eventfd that raises the device's IRQ (a KVM irqfd in the VMM).
    pub fn new(irq: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
            acks: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            raised: AtomicU64::new(0),
        }
    }

    /// Signals used buffers.
    pub fn notify_queue(&self) {
        self.signal(INT_VRING);
    }

    /// Signals a configuration change.
    pub fn notify_config(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "cannot raise virtio interrupt");
        }
    }

    /// The device hit an unrecoverable guest error: report DEVICE_NEEDS_RESET.
    pub fn fail(&self, why: &str) {
        crate::guest_warn!(reason = why, "virtio device needs reset");
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.notify_config();
        }
    }

    /// Interrupt status register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK.
    pub fn ack(&self, bits: u32) {
        self.acks.fetch_add(1, Ordering::SeqCst);
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// One watchdog tick: raises the interrupt again when it has been pending, unacknowledged,
    /// since the previous tick. Returns whether it did.
    pub fn rescue(&self, watch: &mut IrqWatch) -> bool {
        let acks = self.acks.load(Ordering::SeqCst);
        let pending = self.status() != 0;
        let lost = pending && watch.pending && acks == watch.acks;
        *watch = IrqWatch { pending, acks };
        if lost {
            self.resent.fetch_add(1, Ordering::Relaxed);
            crate::guest_warn!(
                "lab workaround irq_rescue_ms: a virtio interrupt left unacknowledged for a \
                 whole tick was raised again"
            );
            self.raised.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.irq.write(1) {
                tracing::warn!(error = %e, "cannot raise virtio interrupt");
            }
        }
        lost
    }

    /// Interrupts raised (irqfd writes, rescues included).
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    /// InterruptACK writes seen (the guest's handler ran).
    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    /// Interrupts raised again by [`Interrupt::rescue`].
    pub fn resent(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Clears state at device reset.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The irq eventfd (for tests).
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }
}

/// A queue handed to a device at activation, with its notification eventfd.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The validated queue.
    pub queue: Queue,
    /// Signalled when the driver notifies the queue.
    pub event: EventFd,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device needs.
    #[error("device needs {expected} queues, driver enabled {got}")]
    QueueCount {
        /// Needed.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// A host resource for the device could not be created.
    #[error("cannot start the device backend: {what}")]
    Backend {
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio device model.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// virtio device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (the number of queues is the length).
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads device config space at `offset`; bytes outside the config read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }
    /// Writes device config space; the default ignores writes (read-only config).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "ignored config-space write");
    }
    /// The device's config space image (used by the default `read_config`).
    fn config_bytes(&self) -> Vec<u8> {
        Vec::new()
    }
    /// A counter the device bumps whenever its config space changes on its own (added to
    /// the transport's ConfigGeneration); 0 for a device whose config never changes.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Starts the device with the negotiated features and validated queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops the device (driver reset); it may be activated again afterwards.
    fn reset(&mut self);
    /// Per-device counters for the metrics API.
    fn metrics(&self) -> DeviceMetrics;
}

/// A device's own counters in the metrics API (`devices.<name>.device`): each variant
/// serializes as its plain object (no tag), [`DeviceMetrics::None`] as `null`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum DeviceMetrics {
    /// virtio-balloon (free page reporting).
    Balloon(balloon::BalloonMetrics),
    /// virtio-blk.
    Blk(blk::BlkMetrics),
    /// virtio-fs (vhost-user).
    Fs(fs::FsMetrics),
    /// virtio-mem.
    Mem(mem::MemMetrics),
    /// virtio-net.
    Net(net::NetMetrics),
    /// virtio-rng.
    Rng(rng::RngMetrics),
    /// virtio-vsock.
    Vsock(vsock::VsockMetrics),
    /// A device without counters.
    None,
}

/// Fails with `InvalidAvailRingIndex` when the driver publishes more available entries than
/// the queue holds. virtio-queue's `pop_descriptor_chain` only logs this and returns `None`,
/// which would leave a broken driver silently stuck; devices call this before popping so
/// the error reaches their worker, which then reports DEVICE_NEEDS_RESET.
pub fn check_avail(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), virtio_queue::Error> {
    use virtio_queue::QueueOwnedT;
    queue.iter(mem).map(drop)
}

/// Copies `config[offset..]` into `data`, zero-filling whatever lies outside `config`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - off);
    data[..n].copy_from_slice(&config[off..off + n]);
}

#[cfg(test)]
mod irq_tests {
    use super::*;

    fn raised(i: &Interrupt) -> u64 {
        i.irq().read().unwrap_or(0)
    }

    #[test]
    fn rescue_raises_only_an_interrupt_left_unacknowledged_for_a_whole_tick() {
        let i = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut w = IrqWatch::default();
        // Nothing pending: never raised.
        assert!(!i.rescue(&mut w));
        assert!(!i.rescue(&mut w));
        i.notify_queue();
        assert_eq!(raised(&i), 1);
        // First tick sees it pending; the guest may simply not have run yet.
        assert!(!i.rescue(&mut w));
        assert_eq!(raised(&i), 0);
        // Still pending, no ACK since: lost, raised again (once per tick).
        assert!(i.rescue(&mut w));
        assert_eq!(raised(&i), 1);
        assert!(i.rescue(&mut w));
        assert_eq!(i.resent(), 2);
        // Acknowledged: quiet.
        i.ack(INT_VRING);
        assert!(!i.rescue(&mut w));
        // A new interrupt that the guest handles between ticks (ACK seen, status set again
        // by a later one) is not treated as lost.
        i.notify_queue();
        assert!(!i.rescue(&mut w));
        i.ack(INT_VRING);
        i.notify_queue();
        assert!(!i.rescue(&mut w));
        assert_eq!(i.resent(), 2);
    }
}
