//! virtio-mem (device id 24, virtio 1.2 section 5.15): memory the VM grows and shrinks by
//! at run time, in blocks of a region above RAM.
//!
//! The region is mapped, registered with KVM and part of guest memory from the start
//! (`memory::create_with_hotplug`, backed sparsely), so vhost-user and vhost-net reach
//! buffers in it like in RAM; the device tracks which blocks the guest plugged
//! ([`blocks`]), serves the request queue ([`request`]) and gives unplugged blocks back to
//! the host ([`crate::memory::HotplugRegion::discard`]). The host changes the size it wants
//! through [`MemControl::set_requested`] (the API's `memory` request), which raises a
//! configuration-change interrupt; the guest driver then plugs or unplugs on its own
//! schedule, and `plugged_size` shows how far it got.
//!
//! - `blocks.rs`: the bitmap and the request semantics (range checks, ACK/NACK/ERROR);
//! - `request.rs`: the wire format and the queue loop;
//! - here: the device, its config space and the control handle shared with the API.

pub mod blocks;
pub mod request;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::GuestMemoryMmap;

use super::worker::Worker;
use super::{
    ActivateError, ActiveQueue, DeviceMetrics, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice,
    device_type,
};
use crate::memory::HotplugRegion;
use blocks::{Blocks, Geometry, Request, Response};

/// virtio device id of virtio-mem.
pub const DEVICE_ID: u32 = 24;
const QUEUE_SIZE: u16 = 128;
/// Size of `struct virtio_mem_config`.
pub const CONFIG_LEN: usize = 56;
const MIB: u64 = 1 << 20;

/// Errors of [`MemControl::set_requested`] (the API's `memory` request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a whole number of blocks.
    #[error("requested_mib {requested_mib} is not a multiple of block_mib {block_mib}")]
    NotBlockMultiple {
        /// Asked for.
        requested_mib: u64,
        /// Block size.
        block_mib: u64,
    },
    /// More than the region.
    #[error("requested_mib {requested_mib} exceeds region_mib {region_mib}")]
    TooLarge {
        /// Asked for.
        requested_mib: u64,
        /// Region size.
        region_mib: u64,
    },
}

/// Sizes of the hot-plug memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemStatus {
    /// Region size.
    pub region: u64,
    /// Block size.
    pub block: u64,
    /// Plugged by the guest.
    pub plugged: u64,
    /// Asked for by the host.
    pub requested: u64,
}

impl MemStatus {
    /// The sizes in MiB, as the control API reports them (a region is at most
    /// `MAX_HOTPLUG_REGION_MIB`, so every size fits).
    pub fn info(&self) -> carapace_vm_config::api::MemoryHotplugInfo {
        let mib = |bytes: u64| u32::try_from(bytes / MIB).unwrap_or(u32::MAX);
        carapace_vm_config::api::MemoryHotplugInfo {
            block_mib: mib(self.block),
            plugged_mib: mib(self.plugged),
            region_mib: mib(self.region),
            requested_mib: mib(self.requested),
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
struct Counters {
    plug_requests: AtomicU64,
    unplug_requests: AtomicU64,
    unplug_all_requests: AtomicU64,
    state_requests: AtomicU64,
    nacks: AtomicU64,
    errors: AtomicU64,
    malformed: AtomicU64,
    discarded_bytes: AtomicU64,
    discard_failures: AtomicU64,
    config_changes: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    blocks: Blocks,
    requested: u64,
    /// The running driver's interrupt (set at activation, cleared at reset).
    interrupt: Option<Arc<Interrupt>>,
}

/// The state shared by the device (its worker and config space) and the control API.
#[derive(Debug)]
pub struct MemControl {
    region: HotplugRegion,
    geo: Geometry,
    inner: Mutex<Inner>,
    /// Bumped on every config-space change: the transport's ConfigGeneration includes it,
    /// so a driver reading a 64-bit field in two halves never sees a torn value.
    generation: AtomicU32,
    counters: Counters,
}

impl MemControl {
    /// Control of `region`, managed in blocks of `block_size` bytes (a power of two dividing
    /// the region size, checked by the VM description), nothing plugged or requested.
    pub fn new(region: HotplugRegion, block_size: u64) -> Self {
        let geo = Geometry {
            addr: region.addr(),
            region_size: region.size(),
            usable_size: region.size(),
            block_size,
        };
        MemControl {
            inner: Mutex::new(Inner {
                blocks: Blocks::new(region.size() / block_size),
                requested: 0,
                interrupt: None,
            }),
            region,
            geo,
            generation: AtomicU32::new(0),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current sizes.
    pub fn status(&self) -> MemStatus {
        let i = self.lock();
        MemStatus {
            region: self.geo.region_size,
            block: self.geo.block_size,
            plugged: i.blocks.plugged() * self.geo.block_size,
            requested: i.requested,
        }
    }

    /// Asks the guest for `requested_mib` of hot-plugged memory (a whole number of blocks,
    /// at most the region): sets `requested_size` and, when a driver runs, raises a
    /// configuration-change interrupt. Returns at once; the guest plugs or unplugs later.
    pub fn set_requested(&self, requested_mib: u64) -> Result<MemStatus, SizeError> {
        let block_mib = self.geo.block_size / MIB;
        let region_mib = self.geo.region_size / MIB;
        if requested_mib > region_mib {
            return Err(SizeError::TooLarge {
                requested_mib,
                region_mib,
            });
        }
        if !requested_mib.is_multiple_of(block_mib) {
            return Err(SizeError::NotBlockMultiple {
                requested_mib,
                block_mib,
            });
        }
        let interrupt = {
            let mut i = self.lock();
            let changed = i.requested != requested_mib * MIB;
            i.requested = requested_mib * MIB;
            if changed {
                self.generation.fetch_add(1, Ordering::SeqCst);
            }
            i.interrupt.clone().filter(|_| changed)
        };
        if let Some(irq) = interrupt {
            self.counters.config_changes.fetch_add(1, Ordering::Relaxed);
            irq.notify_config();
        }
        tracing::info!(requested_mib, "virtio-mem: requested size set");
        Ok(self.status())
    }

    /// Executes one guest request: bitmap update, then the unplugged range goes back to
    /// the host. Counted; errors are logged (rate-limited).
    pub fn execute(&self, req: Request) -> Response {
        let c = &self.counters;
        let counter = match req {
            Request::Plug { .. } => &c.plug_requests,
            Request::Unplug { .. } => &c.unplug_requests,
            Request::UnplugAll => &c.unplug_all_requests,
            Request::State { .. } => &c.state_requests,
            Request::Unknown(_) => &c.malformed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut i = self.lock();
        let requested = i.requested;
        let before = i.blocks.plugged();
        let (resp, discard) = blocks::execute(req, &self.geo, &mut i.blocks, requested);
        if i.blocks.plugged() != before {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        // Discard under the lock: a concurrent PLUG of the same blocks must not get its
        // fresh memory punched out after the ACK.
        if let Some(d) = discard {
            match self.region.discard(d.offset, d.len) {
                Ok(()) => {
                    c.discarded_bytes.fetch_add(d.len, Ordering::Relaxed);
                }
                Err(e) => {
                    c.discard_failures.fetch_add(1, Ordering::Relaxed);
                    crate::guest_warn!(
                        error = %carapace_errors::Chain(&e),
                        "virtio-mem: unplugged memory could not be given back to the host"
                    );
                }
            }
        }
        drop(i);
        match resp {
            Response::Nack => {
                c.nacks.fetch_add(1, Ordering::Relaxed);
            }
            Response::Error(why) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                crate::guest_warn!(request = ?req, reason = why, "virtio-mem: request refused");
            }
            Response::Ack | Response::AckState(_) => {}
        }
        resp
    }

    fn count_malformed(&self) {
        self.counters.malformed.fetch_add(1, Ordering::Relaxed);
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn set_interrupt(&self, irq: Option<Arc<Interrupt>>) {
        self.lock().interrupt = irq;
    }

    /// `struct virtio_mem_config` (little-endian): block_size, node_id, padding, addr,
    /// region_size, usable_region_size, plugged_size, requested_size.
    pub fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let s = self.status();
        let mut b = [0u8; CONFIG_LEN];
        let fields = [
            (0, s.block),
            (16, self.geo.addr),
            (24, s.region),
            (32, self.geo.usable_size),
            (40, s.plugged),
            (48, s.requested),
        ];
        for (at, v) in fields {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// The config generation (see the field).
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    fn metrics(&self) -> MemMetrics {
        let s = self.status();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        MemMetrics {
            block_size: s.block,
            config_changes: l(&c.config_changes),
            discard_failures: l(&c.discard_failures),
            discarded_bytes: l(&c.discarded_bytes),
            errors: l(&c.errors),
            malformed: l(&c.malformed),
            nacks: l(&c.nacks),
            plug_requests: l(&c.plug_requests),
            plugged_size: s.plugged,
            region_size: s.region,
            requested_size: s.requested,
            state_requests: l(&c.state_requests),
            unplug_all_requests: l(&c.unplug_all_requests),
            unplug_requests: l(&c.unplug_requests),
        }
    }
}

/// The virtio-mem device's counters and sizes (bytes) in the metrics API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemMetrics {
    /// Block size.
    pub block_size: u64,
    /// Configuration-change interrupts raised for a new requested size.
    pub config_changes: u64,
    /// Unplugged ranges that could not be given back to the host.
    pub discard_failures: u64,
    /// Bytes given back to the host (unplugged ranges, whole region on UNPLUG_ALL).
    pub discarded_bytes: u64,
    /// Requests answered with ERROR, or unanswerable.
    pub errors: u64,
    /// Requests that could not be parsed (short, unknown type, no room for the answer).
    pub malformed: u64,
    /// Plug requests refused with NACK (beyond the requested size).
    pub nacks: u64,
    /// PLUG requests.
    pub plug_requests: u64,
    /// Plugged memory.
    pub plugged_size: u64,
    /// Region size.
    pub region_size: u64,
    /// Requested size.
    pub requested_size: u64,
    /// STATE requests.
    pub state_requests: u64,
    /// UNPLUG_ALL requests.
    pub unplug_all_requests: u64,
    /// UNPLUG requests.
    pub unplug_requests: u64,
}

/// The virtio-mem device.
#[derive(Debug)]
pub struct VirtioMem {
    ctl: Arc<MemControl>,
    worker: Option<Worker>,
}

impl VirtioMem {
    /// The device for `ctl` (which the control API keeps too).
    pub fn new(ctl: Arc<MemControl>) -> Self {
        VirtioMem { ctl, worker: None }
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        device_type::MEM
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        // No VIRTIO_MEM_F_ACPI_PXM (no ACPI, one node) and no
        // VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: unplugged blocks stay mapped (see the
        // threat model), so the device does not claim to enforce it.
        VIRTIO_F_VERSION_1
    }
    fn config_bytes(&self) -> Vec<u8> {
        self.ctl.config_bytes().to_vec()
    }
    fn config_generation(&self) -> u32 {
        self.ctl.generation()
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        mut queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        self.ctl.set_interrupt(Some(interrupt.clone()));
        let ctl = self.ctl.clone();
        let worker = Worker::spawn_single_queue(
            "virtio-mem",
            crate::seccomp::ThreadKind::Mem,
            queues.remove(0),
            mem,
            interrupt,
            move |q, m| request::process_queue(q, m, &ctl),
        )
        .map_err(|source| ActivateError::Backend {
            what: "virtio-mem worker thread".into(),
            source,
        })?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        // Plugged blocks stay plugged across a device reset (the spec: a new driver finds
        // plugged_size and unplugs everything first).
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        self.ctl.set_interrupt(None);
    }
    fn metrics(&self) -> DeviceMetrics {
        DeviceMetrics::Mem(self.ctl.metrics())
    }
}
