//! virtio-balloon (device id 5, virtio 1.2 section 5.5), used for **free page reporting**
//! only: the guest tells the device which ranges of its memory are free, and the VMM gives
//! them back to the host ([`crate::memory::discard_guest_range`]: MADV_DONTNEED, or a hole
//! punched in the memfd when guest memory is shared with a vhost-user daemon). Memory a
//! guest touched once and freed (the initramfs it unpacked, a build that ran, page cache it
//! dropped) then stops being resident on the host; when the guest uses a reported page
//! again it gets a fresh zeroed one.
//!
//! Offered: `VERSION_1` and `VIRTIO_BALLOON_F_REPORTING`. Three queues, in the order Linux's
//! driver numbers them when only reporting is negotiated: inflate (0), deflate (1),
//! reporting (2). The host never asks for pages (`num_pages` stays 0), so the inflate and
//! deflate queues carry nothing a well-behaved guest sends; chains that arrive there
//! anyway are returned unused and counted (`ignored`). A driver that does not accept
//! `REPORTING` sets up two queues and the transport refuses DRIVER_OK.
//!
//! A reporting chain is a list of device-writable buffers, each one free range. Each must be
//! non-empty, 4 KiB-aligned in address and length and inside one region of guest memory
//! (anything else is skipped and counted as `bad_ranges`); the chain is returned with 0
//! bytes written once every range was handled, and the guest's driver waits for that
//! before it uses the pages again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::worker::Worker;
use super::{
    ActivateError, ActiveQueue, DeviceMetrics, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice,
    device_type,
};

/// VIRTIO_BALLOON_F_REPORTING: the free page reporting queue.
pub const F_REPORTING: u64 = 1 << 5;
/// Index of the reporting queue (inflate 0, deflate 1, reporting 2).
pub const REPORTING_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [64, 64, 128];
/// Size of `struct virtio_balloon_config` (num_pages, actual, free_page_hint_cmd_id,
/// poison_val).
pub const CONFIG_LEN: usize = 16;
/// The alignment (and granularity) of a reported range: the guest's page size.
pub const PAGE: u64 = 4096;

/// Counters.
#[derive(Debug, Default)]
pub struct BalloonCounters {
    /// Reporting chains served.
    pub reports: AtomicU64,
    /// Ranges given back to the host.
    pub ranges: AtomicU64,
    /// Bytes given back to the host.
    pub reported_bytes: AtomicU64,
    /// Ranges skipped: empty, unaligned or outside guest memory.
    pub bad_ranges: AtomicU64,
    /// Ranges whose discard failed on the host.
    pub discard_failures: AtomicU64,
    /// Chains on the inflate or deflate queue (the host never asks for pages).
    pub ignored: AtomicU64,
}

/// The balloon device (free page reporting).
#[derive(Debug, Default)]
pub struct Balloon {
    counters: Arc<BalloonCounters>,
    /// The `actual` field the driver writes (kept so it reads back; the host asks for
    /// nothing).
    actual: AtomicU32,
    worker: Option<Worker>,
}

impl Balloon {
    /// New device.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Serves the available chains of queue `index`; returns whether its used ring changed.
pub fn process_queue(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    counters: &BalloonCounters,
) -> Result<bool, virtio_queue::Error> {
    super::check_avail(queue, mem)?;
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        if index == REPORTING_QUEUE {
            for desc in chain {
                report_range(mem, desc.addr().0, u64::from(desc.len()), counters);
            }
            counters.reports.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.ignored.fetch_add(1, Ordering::Relaxed);
        }
        queue.add_used(mem, head, 0)?;
        used = true;
    }
    Ok(used)
}

/// Gives one reported free range back to the host, if it is a whole number of pages inside
/// guest memory.
fn report_range(mem: &GuestMemoryMmap, addr: u64, len: u64, counters: &BalloonCounters) {
    if len == 0 || !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        counters.bad_ranges.fetch_add(1, Ordering::Relaxed);
        crate::guest_warn!(
            addr,
            len,
            "free page report: range not page-aligned, skipped"
        );
        return;
    }
    match crate::memory::discard_guest_range(mem, GuestAddress(addr), len) {
        Ok(()) => {
            counters.ranges.fetch_add(1, Ordering::Relaxed);
            counters.reported_bytes.fetch_add(len, Ordering::Relaxed);
        }
        Err(crate::memory::DiscardError::NotGuestMemory { .. }) => {
            counters.bad_ranges.fetch_add(1, Ordering::Relaxed);
            crate::guest_warn!(addr, len, "free page report: range outside guest memory");
        }
        Err(e) => {
            counters.discard_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(addr, len, error = %e, "free page report: cannot give the range back");
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_REPORTING
    }
    fn config_bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_LEN];
        // num_pages (0: the host asks for nothing), then the driver's `actual`.
        c[4..8].copy_from_slice(&self.actual.load(Ordering::Relaxed).to_le_bytes());
        c
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write, as a whole 32-bit value.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.actual.store(v, Ordering::Relaxed);
        } else {
            tracing::debug!(offset, len = data.len(), "ignored balloon config write");
        }
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() || features & F_REPORTING == 0 {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        let counters = self.counters.clone();
        // The worker's syscalls are virtio-mem's (madvise, fallocate on the memfd): it runs
        // under that seccomp list.
        let worker = Worker::spawn_queues(
            "virtio-balloon",
            crate::seccomp::ThreadKind::Mem,
            queues,
            mem,
            interrupt,
            move |i, q, m| process_queue(i, q, m, &counters),
        )
        .map_err(|source| ActivateError::Backend {
            what: "virtio-balloon worker thread".into(),
            source,
        })?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
    fn metrics(&self) -> DeviceMetrics {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceMetrics::Balloon(BalloonMetrics {
            reports: get(&c.reports),
            ranges: get(&c.ranges),
            reported_bytes: get(&c.reported_bytes),
            bad_ranges: get(&c.bad_ranges),
            discard_failures: get(&c.discard_failures),
            ignored: get(&c.ignored),
        })
    }
}

/// The balloon device's counters in the metrics API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BalloonMetrics {
    /// Reporting chains served.
    pub reports: u64,
    /// Free ranges given back to the host.
    pub ranges: u64,
    /// Bytes given back to the host (a range reported twice counts twice).
    pub reported_bytes: u64,
    /// Ranges skipped: empty, unaligned or outside guest memory.
    pub bad_ranges: u64,
    /// Ranges the host failed to discard.
    pub discard_failures: u64,
    /// Chains on the inflate/deflate queues, returned unused.
    pub ignored: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (64 * MIB) as usize)]).unwrap()
    }

    fn fill(m: &GuestMemoryMmap, from: u64, len: u64) {
        for a in (from..from + len).step_by(PAGE as usize) {
            m.write_obj(0xa5_u8, GuestAddress(a)).unwrap();
        }
    }

    fn w(addr: u64, len: u32, next: Option<u16>) -> RawDescriptor {
        let flags = VRING_DESC_F_WRITE as u16 | next.map_or(0, |_| VRING_DESC_F_NEXT as u16);
        RawDescriptor::from(Descriptor::new(addr, len, flags, next.unwrap_or(0)))
    }

    #[test]
    fn reported_ranges_are_given_back_and_the_chain_returned() {
        let m = mem();
        fill(&m, 16 * MIB, 16 * MIB);
        let vq = MockSplitQueue::new(&m, 16);
        // One chain, two free ranges: 16..20 MiB and 24..28 MiB.
        let descs = [
            w(16 * MIB, (4 * MIB) as u32, Some(1)),
            w(24 * MIB, (4 * MIB) as u32, None),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = BalloonCounters::default();
        assert!(process_queue(REPORTING_QUEUE, &mut q, &m, &c).unwrap());
        assert_eq!(c.reports.load(Ordering::Relaxed), 1);
        assert_eq!(c.ranges.load(Ordering::Relaxed), 2);
        assert_eq!(c.reported_bytes.load(Ordering::Relaxed), 8 * MIB);
        assert_eq!(c.bad_ranges.load(Ordering::Relaxed), 0);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 0));
        assert_eq!(vq.used().idx().load(), 1);
        // The reported pages read as zeros; the rest kept its contents.
        for (addr, want) in [
            (16 * MIB, 0),
            (20 * MIB - PAGE, 0),
            (20 * MIB, 0xa5),
            (24 * MIB, 0),
            (28 * MIB - PAGE, 0),
            (28 * MIB, 0xa5),
        ] {
            assert_eq!(
                m.read_obj::<u8>(GuestAddress(addr)).unwrap(),
                want,
                "{addr:#x}"
            );
        }
    }

    #[test]
    fn hostile_ranges_are_skipped_and_the_chain_still_returned() {
        let m = mem();
        fill(&m, 0, 8 * MIB);
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            // unaligned address, unaligned length, empty, past the end, across the end
            w(MIB + 1, PAGE as u32, Some(1)),
            w(2 * MIB, 100, Some(2)),
            w(3 * MIB, 0, Some(3)),
            w(64 * MIB, PAGE as u32, Some(4)),
            w(64 * MIB - PAGE, (2 * PAGE) as u32, None),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = BalloonCounters::default();
        assert!(process_queue(REPORTING_QUEUE, &mut q, &m, &c).unwrap());
        assert_eq!(c.bad_ranges.load(Ordering::Relaxed), 5);
        assert_eq!(c.ranges.load(Ordering::Relaxed), 0);
        assert_eq!(vq.used().idx().load(), 1);
        for a in [MIB, 2 * MIB, 3 * MIB] {
            assert_eq!(m.read_obj::<u8>(GuestAddress(a)).unwrap(), 0xa5);
        }
    }

    #[test]
    fn inflate_and_deflate_chains_are_returned_unused() {
        let m = mem();
        fill(&m, 0, 2 * MIB);
        for index in [0, 1] {
            let vq = MockSplitQueue::new(&m, 16);
            // A PFN list naming page 16 (64 KiB): nothing is discarded.
            m.write_obj(16_u32, GuestAddress(MIB)).unwrap();
            let d = RawDescriptor::from(Descriptor::new(MIB, 4, 0, 0));
            vq.add_desc_chains(&[d], 0).unwrap();
            let mut q: Queue = vq.create_queue().unwrap();
            let c = BalloonCounters::default();
            assert!(process_queue(index, &mut q, &m, &c).unwrap());
            assert_eq!(c.ignored.load(Ordering::Relaxed), 1);
            assert_eq!(c.ranges.load(Ordering::Relaxed), 0);
            assert_eq!(m.read_obj::<u8>(GuestAddress(16 * PAGE)).unwrap(), 0xa5);
        }
    }

    #[test]
    fn config_space_holds_actual_and_nothing_asked() {
        let mut b = Balloon::new();
        assert_eq!(b.features(), VIRTIO_F_VERSION_1 | F_REPORTING);
        assert_eq!(b.queue_max_sizes().len(), 3);
        let mut d = [0xffu8; 4];
        b.read_config(0, &mut d);
        assert_eq!(d, [0; 4], "num_pages");
        b.write_config(4, &7u32.to_le_bytes());
        b.read_config(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
        // num_pages is not the driver's to write, nor are partial writes of actual.
        b.write_config(0, &9u32.to_le_bytes());
        b.write_config(4, &[1]);
        b.read_config(0, &mut d);
        assert_eq!(d, [0; 4]);
        b.read_config(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
    }
}
