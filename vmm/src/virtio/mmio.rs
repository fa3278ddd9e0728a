//! The virtio-mmio transport (version 2, "modern"), as the Linux `virtio_mmio` driver sees it.
//!
//! Rules enforced here, all against an untrusted driver:
//! - feature writes only between DRIVER and FEATURES_OK; FEATURES_OK is refused (left clear)
//!   unless the driver accepted VIRTIO_F_VERSION_1 and only offered bits;
//! - queue registers are writable only between FEATURES_OK and DRIVER_OK; changes after
//!   DRIVER_OK are ignored and counted;
//! - at DRIVER_OK every queue must be ready and valid (sizes, alignment, rings inside guest
//!   memory) or the device goes to DEVICE_NEEDS_RESET instead of starting;
//! - status bits can only be added; writing 0 resets the device;
//! - accesses outside the register file or config space are ignored (reads return zero).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, DeviceMetrics, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor id reported to the guest ("CRPC").
const VENDOR_ID: u32 = 0x4350_5243;

/// Offset of the QueueNotify register (ioeventfds are registered there).
pub const QUEUE_NOTIFY: u64 = 0x50;
const CONFIG_SPACE: u64 = 0x100;
/// Size of the register window we decode (config space included).
pub const WINDOW: u64 = 0x1000;

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u32 = 64;
    /// FAILED.
    pub const FAILED: u32 = 128;
}
use status::*;

/// Transport counters (exposed through the metrics API).
#[derive(Debug, Default)]
pub struct TransportCounters {
    /// Register reads.
    pub reads: AtomicU64,
    /// Register writes.
    pub writes: AtomicU64,
    /// Writes refused because of the device status (e.g. queue changes after DRIVER_OK).
    pub refused_writes: AtomicU64,
    /// Accesses with a bad size/offset.
    pub bad_accesses: AtomicU64,
    /// Activations.
    pub activations: AtomicU64,
    /// Activations refused (invalid queues).
    pub failed_activations: AtomicU64,
    /// Queue notifications seen by the transport (without ioeventfd).
    pub notifies: AtomicU64,
}

/// One device in the metrics API (`devices.<name>`): transport state and counters plus
/// the device's own. Field names are the API's (tests/src/containerd.rs and the
/// end-to-end tests read `transport.irq_raised`, `irq_acks`, `irq_pending`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MmioMetrics {
    /// Whether the driver started the device (DRIVER_OK accepted).
    pub activated: bool,
    /// The device's own counters.
    pub device: DeviceMetrics,
    /// virtio device type id.
    pub device_type: u32,
    /// Device status register (with DEVICE_NEEDS_RESET when the device asked for it).
    pub status: u32,
    /// Transport counters.
    pub transport: TransportMetrics,
}

/// Transport counters (see [`TransportCounters`]) and the device's interrupt state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TransportMetrics {
    /// Activations.
    pub activations: u64,
    /// Accesses with a bad size/offset.
    pub bad_accesses: u64,
    /// Activations refused.
    pub failed_activations: u64,
    /// InterruptACK writes (the guest's handler ran).
    pub irq_acks: u64,
    /// Interrupt status register now (non-zero: raised, not yet acknowledged).
    pub irq_pending: u32,
    /// Interrupts raised (irqfd writes, rescues included).
    pub irq_raised: u64,
    /// Interrupts raised again by the lab-only rescue tick.
    pub irq_resent: u64,
    /// Queue notifications seen by the transport (without ioeventfd).
    pub notifies: u64,
    /// Register reads.
    pub reads: u64,
    /// Writes refused because of the device status.
    pub refused_writes: u64,
    /// Register writes.
    pub writes: u64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One virtio-mmio device window.
#[derive(Debug)]
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    /// (size, ready) of each queue as the driver left it when the device was activated.
    active_snapshot: Vec<(u16, bool)>,
    interrupt: Arc<Interrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// A queue register got a value the queue refused (size, alignment).
    bad_queue_config: Vec<bool>,
    counters: TransportCounters,
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An eventfd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device declared an invalid queue size.
    #[error("device declares invalid queue max size {0}")]
    QueueSize(u16),
}

impl MmioTransport {
    /// Wraps `device`; `irq` raises the device's interrupt.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, TransportError> {
        let queues = Self::fresh_queues(device.as_ref())?;
        let n_queues = queues.len();
        let queue_evts: Vec<EventFd> = (0..n_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_evts,
            active_snapshot: Vec::new(),
            interrupt: Arc::new(Interrupt::new(irq)),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            bad_queue_config: vec![false; n_queues],
            counters: TransportCounters::default(),
        })
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>, TransportError> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).map_err(|_| TransportError::QueueSize(m)))
            .collect()
    }

    /// Queue notification eventfds (register them as KVM ioeventfds at QueueNotify with the
    /// queue index as datamatch).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt state.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Device status register value.
    pub fn status(&self) -> u32 {
        self.status
            | if self.interrupt.needs_reset() {
                NEEDS_RESET
            } else {
                0
            }
    }

    /// Whether the device was started.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Metrics: transport counters plus the device's own.
    pub fn metrics(&self) -> MmioMetrics {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        MmioMetrics {
            activated: self.activated,
            device: self.device.metrics(),
            device_type: self.device.device_type(),
            status: self.status(),
            transport: TransportMetrics {
                activations: l(&c.activations),
                bad_accesses: l(&c.bad_accesses),
                failed_activations: l(&c.failed_activations),
                irq_acks: self.interrupt.acks(),
                irq_pending: self.interrupt.status(),
                irq_raised: self.interrupt.raised(),
                irq_resent: self.interrupt.resent(),
                notifies: l(&c.notifies),
                reads: l(&c.reads),
                refused_writes: l(&c.refused_writes),
                writes: l(&c.writes),
            },
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Guest read of `data.len()` bytes at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        bump(&self.counters.reads);
        if offset >= CONFIG_SPACE {
            if offset >= WINDOW || data.len() > 8 {
                bump(&self.counters.bad_accesses);
                data.fill(0);
                return;
            }
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            bump(&self.counters.bad_accesses);
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self
                .device
                .queue_max_sizes()
                .get(self.queue_sel as usize)
                .map_or(0, |&m| u32::from(m)),
            0x044 => {
                let i = self.queue_sel as usize;
                if self.activated {
                    self.active_snapshot.get(i).is_some_and(|s| s.1).into()
                } else {
                    self.queues.get(i).is_some_and(|q| q.ready()).into()
                }
            }
            0x060 => self.interrupt.status(),
            0x070 => self.status(),
            // SHMLen / SHMBase: we expose no shared memory regions; per the spec a missing
            // region reads as all ones (a zero length would make drivers map nothing).
            0x0b0 | 0x0b4 | 0x0b8 | 0x0bc => 0xffff_ffff,
            0x0fc => self
                .config_generation
                .wrapping_add(self.device.config_generation()),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Guest write of `data` at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        bump(&self.counters.writes);
        if offset >= CONFIG_SPACE {
            if offset >= WINDOW || data.len() > 8 {
                bump(&self.counters.bad_accesses);
                return;
            }
            if self.status & DRIVER == 0 || self.status & FAILED != 0 {
                bump(&self.counters.refused_writes);
                return;
            }
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            bump(&self.counters.bad_accesses);
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let queue_config_ok =
            self.status & FEATURES_OK != 0 && self.status & (DRIVER_OK | FAILED) == 0;
        match offset {
            0x014 => self.device_features_sel = v,
            0x024 => self.driver_features_sel = v,
            0x020 => {
                if self.status & DRIVER == 0 || self.status & FEATURES_OK != 0 {
                    bump(&self.counters.refused_writes);
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {
                        if v != 0 {
                            // Bits beyond 64 are never offered: FEATURES_OK will be refused.
                            self.driver_features |= 1 << 63;
                        }
                    }
                }
            }
            0x030 => self.queue_sel = v,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                if !queue_config_ok {
                    bump(&self.counters.refused_writes);
                    return;
                }
                let sel = self.queue_sel as usize;
                let Some(q) = self.selected_queue() else {
                    bump(&self.counters.refused_writes);
                    return;
                };
                match offset {
                    0x038 => {
                        // An invalid size must fail activation, not silently keep the old one.
                        let ok = u16::try_from(v).is_ok_and(|s| q.try_set_size(s).is_ok());
                        if !ok {
                            self.bad_queue_config[sel] = true;
                        }
                    }
                    0x044 => q.set_ready(v == 1),
                    _ => {
                        let lo = |cur: u64| (cur & !0xffff_ffff) | u64::from(v);
                        let hi = |cur: u64| (cur & 0xffff_ffff) | (u64::from(v) << 32);
                        let r = match offset {
                            0x080 => q.try_set_desc_table_address(GuestAddress(lo(q.desc_table()))),
                            0x084 => q.try_set_desc_table_address(GuestAddress(hi(q.desc_table()))),
                            0x090 => q.try_set_avail_ring_address(GuestAddress(lo(q.avail_ring()))),
                            0x094 => q.try_set_avail_ring_address(GuestAddress(hi(q.avail_ring()))),
                            0x0a0 => q.try_set_used_ring_address(GuestAddress(lo(q.used_ring()))),
                            _ => q.try_set_used_ring_address(GuestAddress(hi(q.used_ring()))),
                        };
                        if r.is_err() {
                            self.bad_queue_config[sel] = true;
                        }
                    }
                }
            }
            QUEUE_NOTIFY => {
                bump(&self.counters.notifies);
                match self.queue_evts.get(v as usize) {
                    Some(e) if self.activated => {
                        let _ = e.write(1);
                    }
                    _ => bump(&self.counters.refused_writes),
                }
            }
            0x064 => self.interrupt.ack(v),
            0x070 => self.write_status(v),
            _ => bump(&self.counters.bad_accesses),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits may only be added.
        if v & self.status != self.status {
            bump(&self.counters.refused_writes);
            return;
        }
        let added = v & !self.status;
        if added & FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.status & DRIVER == 0
                || self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                crate::guest_warn!(
                    driver = format_args!("{:#x}", self.driver_features),
                    offered = format_args!("{offered:#x}"),
                    "refusing FEATURES_OK"
                );
                bump(&self.counters.refused_writes);
                // Accept the other bits, leave FEATURES_OK clear: the driver must check.
                self.status = v & !(FEATURES_OK | DRIVER_OK);
                return;
            }
        }
        if added & DRIVER_OK != 0 {
            if v & FEATURES_OK == 0 || self.activated {
                bump(&self.counters.refused_writes);
                return;
            }
            self.status = v;
            self.activate();
            return;
        }
        self.status = v;
    }

    fn activate(&mut self) {
        let bad = self
            .queues
            .iter()
            .enumerate()
            .find(|(i, q)| !q.ready() || !q.is_valid(&self.mem) || self.bad_queue_config[*i]);
        if let Some((i, q)) = bad {
            crate::guest_warn!(
                queue = i,
                ready = q.ready(),
                "virtio-mmio: DRIVER_OK with an unusable queue; device needs reset"
            );
            bump(&self.counters.failed_activations);
            self.interrupt.fail("invalid queue at DRIVER_OK");
            return;
        }
        let fresh = match Self::fresh_queues(self.device.as_ref()) {
            Ok(f) => f,
            Err(_) => return,
        };
        let queues = std::mem::replace(&mut self.queues, fresh);
        self.active_snapshot = queues.iter().map(|q| (q.size(), q.ready())).collect();
        let mut active = Vec::with_capacity(queues.len());
        for (queue, evt) in queues.into_iter().zip(&self.queue_evts) {
            let event = match evt.try_clone() {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "cannot clone queue eventfd");
                    self.interrupt.fail("host resource exhaustion");
                    return;
                }
            };
            active.push(ActiveQueue { queue, event });
        }
        match self.device.activate(
            self.mem.clone(),
            self.driver_features,
            active,
            self.interrupt.clone(),
        ) {
            Ok(()) => {
                self.activated = true;
                bump(&self.counters.activations);
            }
            Err(e) => {
                crate::guest_warn!(error = %e, "virtio device activation failed");
                bump(&self.counters.failed_activations);
                self.interrupt.fail("activation failed");
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.active_snapshot.clear();
        if let Ok(q) = Self::fresh_queues(self.device.as_ref()) {
            self.queues = q;
        }
        for e in &self.queue_evts {
            let _ = e.read();
        }
        self.interrupt.reset();
        self.bad_queue_config.fill(false);
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

#[cfg(test)]
pub(crate) mod tests;
