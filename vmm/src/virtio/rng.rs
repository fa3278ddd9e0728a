//! virtio-rng: fills guest buffers from the host's `getrandom(2)`.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::worker::Worker;
use super::{
    ActivateError, ActiveQueue, DeviceMetrics, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice,
    device_type,
};

/// Largest amount of entropy served per request (bounds host work per descriptor chain).
pub const MAX_REQUEST: usize = 64 * 1024;
const QUEUE_SIZE: u16 = 256;

/// Counters.
#[derive(Debug, Default)]
pub struct RngCounters {
    /// Requests served.
    pub requests: AtomicU64,
    /// Bytes handed to the guest.
    pub bytes: AtomicU64,
    /// Malformed requests (no writable buffer, bad addresses).
    pub bad_requests: AtomicU64,
}

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    counters: Arc<RngCounters>,
    worker: Option<Worker>,
}

impl Rng {
    /// New device.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Fills `buf` from getrandom(2).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Serves every available request on `queue`; returns whether the used ring changed.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    counters: &RngCounters,
) -> Result<bool, virtio_queue::Error> {
    super::check_avail(queue, mem)?;
    let mut used = false;
    let mut buf = vec![0u8; MAX_REQUEST];
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = match virtio_queue::Writer::new(mem, chain) {
            Ok(mut w) => {
                let n = w.available_bytes().min(MAX_REQUEST);
                if n == 0 {
                    counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                }
                match fill_random(&mut buf[..n]).and_then(|()| w.write_all(&buf[..n])) {
                    Ok(()) => n as u32,
                    Err(_) => {
                        counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                        0
                    }
                }
            }
            Err(_) => {
                counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                0
            }
        };
        counters.requests.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes
            .fetch_add(u64::from(written), Ordering::Relaxed);
        queue.add_used(mem, head, written)?;
        used = true;
    }
    Ok(used)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
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
        let counters = self.counters.clone();
        let worker = Worker::spawn_single_queue(
            "virtio-rng",
            crate::seccomp::ThreadKind::Rng,
            queues.remove(0),
            mem,
            interrupt,
            move |q, m| process_queue(q, m, &counters),
        )
        .map_err(|source| ActivateError::Backend {
            what: "virtio-rng worker thread".into(),
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
        DeviceMetrics::Rng(RngMetrics {
            bad_requests: c.bad_requests.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
        })
    }
}

/// The rng device's counters in the metrics API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RngMetrics {
    /// Malformed requests.
    pub bad_requests: u64,
    /// Random bytes given to the guest.
    pub bytes: u64,
    /// Requests served.
    pub requests: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn fills_writable_buffers() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            RawDescriptor::from(Descriptor::new(
                0x10_0000,
                100,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
            RawDescriptor::from(Descriptor::new(
                0x20_0000,
                200,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = RngCounters::default();
        assert!(process_queue(&mut q, &m, &c).unwrap());
        assert_eq!(c.bytes.load(Ordering::Relaxed), 300);
        let used = vq.used().ring().ref_at(1).unwrap().load();
        assert_eq!(used.len(), 200);
        let mut b = [0u8; 200];
        m.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
        assert!(b.iter().any(|&x| x != 0));
    }

    #[test]
    fn malformed_chains_do_not_panic() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            // read-only buffer: nothing to fill
            RawDescriptor::from(Descriptor::new(0x10_0000, 100, 0, 0)),
            // outside guest memory
            RawDescriptor::from(Descriptor::new(
                0xffff_0000,
                100,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
            // huge length, capped
            RawDescriptor::from(Descriptor::new(
                0x10_0000,
                3 << 20,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = RngCounters::default();
        process_queue(&mut q, &m, &c).unwrap();
        assert_eq!(c.requests.load(Ordering::Relaxed), 3);
        assert_eq!(c.bad_requests.load(Ordering::Relaxed), 2);
        assert_eq!(c.bytes.load(Ordering::Relaxed), MAX_REQUEST as u64);
    }

    #[test]
    fn impossible_avail_index_is_an_error() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.avail().idx().store(17);
        let mut q: Queue = vq.create_queue().unwrap();
        let c = RngCounters::default();
        assert!(matches!(
            process_queue(&mut q, &m, &c),
            Err(virtio_queue::Error::InvalidAvailRingIndex)
        ));
        assert_eq!(c.requests.load(Ordering::Relaxed), 0);
    }
}
