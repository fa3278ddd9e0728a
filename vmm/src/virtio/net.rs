//! virtio-net on a host tap: one RX and one TX queue, a fixed 12-byte virtio-net header,
//! no offloads, no mergeable RX buffers, no control queue.
//!
//! TX: each chain's readable part is header + one Ethernet frame; the guest's header is
//! dropped (no offloads are negotiated, so it carries nothing we must honour) and the frame
//! is written to the tap. RX: a frame read from the tap is written, after a zeroed header with
//! `num_buffers = 1`, into one chain; when the guest has posted no RX buffer the frame is kept
//! and the tap is not polled until the guest kicks the RX queue. Frames and chains are bounded
//! by [`MAX_FRAME`]; malformed chains are returned unused and counted.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::event::{EpollSet, EventHandler, LoopError};
use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::worker::{Worker, rescue_period};
use super::{
    ActivateError, ActiveQueue, DeviceMetrics, Interrupt, IrqWatch, VIRTIO_F_VERSION_1,
    VirtioDevice, device_type,
};

/// Largest Ethernet frame (without the virtio-net header) accepted in either direction.
pub const MAX_FRAME: usize = 65_550;
/// Smallest frame sent to the tap: an Ethernet header.
pub const MIN_FRAME: usize = 14;
const QUEUE_SIZE: u16 = 256;
/// VIRTIO_NET_F_MAC: config space holds the MAC address.
pub const F_MAC: u64 = 1 << 5;
/// Frames moved per wake-up before other events get a turn.
const BATCH: usize = 256;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;

/// Counters.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (frames only).
    pub rx_bytes: AtomicU64,
    /// Frames dropped because the guest's buffer chain was too small or malformed.
    pub rx_dropped: AtomicU64,
    /// Times the tap had a frame but the guest had no RX buffer posted.
    pub rx_no_buffer: AtomicU64,
    /// Frames sent to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes sent to the tap (frames only).
    pub tx_bytes: AtomicU64,
    /// Malformed TX chains (bad addresses, shorter than a header, longer than a frame).
    pub tx_bad: AtomicU64,
    /// Frames the tap refused.
    pub tx_errors: AtomicU64,
}

/// Where TX frames go (the tap; a vector in tests).
pub trait FrameSink {
    /// Sends one Ethernet frame (no header).
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
}

impl FrameSink for Vec<Vec<u8>> {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.push(frame.to_vec());
        Ok(())
    }
}

/// Writes frames to a tap, prefixing a zeroed header when the tap expects one.
#[derive(Debug)]
struct TapSink<'a> {
    tap: &'a Tap,
    buf: Vec<u8>,
}

impl FrameSink for TapSink<'_> {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let data = if self.tap.vnet_hdr() {
            self.buf.clear();
            self.buf.resize(VNET_HDR_LEN, 0);
            self.buf.extend_from_slice(frame);
            &self.buf[..]
        } else {
            frame
        };
        self.tap.write_frame(data).map(drop)
    }
}

/// Sends every available TX chain to `sink`; returns whether the used ring changed.
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    sink: &mut dyn FrameSink,
    buf: &mut Vec<u8>,
    counters: &NetCounters,
) -> Result<bool, virtio_queue::Error> {
    super::check_avail(queue, mem)?;
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match Reader::new(mem, chain) {
            Ok(mut r)
                if r.available_bytes() >= VNET_HDR_LEN + MIN_FRAME
                    && r.available_bytes() <= VNET_HDR_LEN + MAX_FRAME =>
            {
                let mut hdr = [0u8; VNET_HDR_LEN];
                let n = r.available_bytes() - VNET_HDR_LEN;
                buf.resize(n, 0);
                let read = std::io::Read::read_exact(&mut r, &mut hdr)
                    .and_then(|()| std::io::Read::read_exact(&mut r, &mut buf[..n]));
                match read {
                    Ok(()) => match sink.send(&buf[..n]) {
                        Ok(()) => {
                            counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                            counters.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "tap refused a frame");
                            counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Err(_) => {
                        counters.tx_bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                counters.tx_bad.fetch_add(1, Ordering::Relaxed);
            }
        }
        queue.add_used(mem, head, 0)?;
        used = true;
    }
    Ok(used)
}

/// What happened to a frame offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into a guest buffer.
    Delivered,
    /// The guest's buffer was unusable: the frame is dropped, the buffer returned empty.
    Dropped,
    /// No RX buffer is posted: keep the frame and wait for the guest.
    NoBuffer,
}

/// Offers one frame to the guest's RX queue.
pub fn deliver_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &[u8],
    counters: &NetCounters,
) -> Result<RxOutcome, virtio_queue::Error> {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        super::check_avail(queue, mem)?;
        counters.rx_no_buffer.fetch_add(1, Ordering::Relaxed);
        return Ok(RxOutcome::NoBuffer);
    };
    let head = chain.head_index();
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    let written = match Writer::new(mem, chain) {
        Ok(mut w) if frame.len() <= MAX_FRAME && w.available_bytes() >= hdr.len() + frame.len() => {
            use std::io::Write;
            match w.write_all(&hdr).and_then(|()| w.write_all(frame)) {
                Ok(()) => Some(hdr.len() + frame.len()),
                Err(_) => None,
            }
        }
        _ => None,
    };
    let (len, outcome) = match written {
        Some(n) => {
            counters.rx_frames.fetch_add(1, Ordering::Relaxed);
            counters
                .rx_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            (n as u32, RxOutcome::Delivered)
        }
        None => {
            counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            (0, RxOutcome::Dropped)
        }
    };
    queue.add_used(mem, head, len)?;
    Ok(outcome)
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened or adopted.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
}

impl Net {
    /// A device on `tap` with the guest MAC address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap: Arc::new(tap),
            mac,
            counters: Arc::default(),
            worker: None,
        }
    }
}

/// A random locally administered unicast MAC address.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    if super::rng::fill_random(&mut mac).is_err() {
        mac = [0, 0, 0, 0, 0, std::process::id() as u8];
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// The worker's RX/TX state, and its event handler.
struct NetLoop {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    watch: IrqWatch,
    tap: Arc<Tap>,
    counters: Arc<NetCounters>,
    interrupt: Arc<Interrupt>,
    /// A frame read from the tap, with the tap's header if any: `rx_buf[..rx_len]`.
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    tap_polled: bool,
    /// Reading the tap failed for good (not EAGAIN): RX is off.
    tap_broken: bool,
    tx_buf: Vec<u8>,
}

impl NetLoop {
    fn notify(mem: &GuestMemoryMmap, q: &mut Queue, interrupt: &Interrupt) {
        if q.needs_notification(mem).unwrap_or(true) {
            interrupt.notify_queue();
        }
    }

    fn tx(&mut self) -> Result<(), virtio_queue::Error> {
        let mut sink = TapSink {
            tap: &self.tap,
            buf: Vec::new(),
        };
        if process_tx(
            &mut self.tx,
            &self.mem,
            &mut sink,
            &mut self.tx_buf,
            &self.counters,
        )? {
            Self::notify(&self.mem, &mut self.tx, &self.interrupt);
        }
        Ok(())
    }

    /// Moves frames from the tap to the guest until either side runs dry (or a batch).
    fn rx(&mut self, ep: &EpollSet) -> Result<(), virtio_queue::Error> {
        let skip = if self.tap.vnet_hdr() { VNET_HDR_LEN } else { 0 };
        let mut used = false;
        for _ in 0..BATCH {
            let len = match self.rx_len {
                Some(n) => n,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // E.g. the interface was deleted: stop polling it (it would stay
                        // readable/errored forever) instead of spinning; TX keeps counting
                        // errors.
                        tracing::warn!(error = %e, tap = self.tap.name(), "tap read failed, RX stops");
                        self.tap_broken = true;
                        if self.tap_polled {
                            let _ = ep.remove(self.tap.as_raw_fd());
                            self.tap_polled = false;
                        }
                        break;
                    }
                },
            };
            if len < skip {
                self.rx_len = None;
                continue;
            }
            match deliver_rx(
                &mut self.rx,
                &self.mem,
                &self.rx_buf[skip..len],
                &self.counters,
            )? {
                RxOutcome::NoBuffer => {
                    self.rx_len = Some(len);
                    if self.tap_polled {
                        let _ = ep.remove(self.tap.as_raw_fd());
                        self.tap_polled = false;
                    }
                    break;
                }
                RxOutcome::Delivered | RxOutcome::Dropped => {
                    self.rx_len = None;
                    used = true;
                }
            }
        }
        if self.rx_len.is_none()
            && !self.tap_polled
            && !self.tap_broken
            && ep
                .add(self.tap.as_raw_fd(), TAP_TOKEN, EventSet::IN)
                .is_ok()
        {
            self.tap_polled = true;
        }
        if used {
            Self::notify(&self.mem, &mut self.rx, &self.interrupt);
        }
        Ok(())
    }
}

impl EventHandler for NetLoop {
    type Error = virtio_queue::Error;

    fn on_event(
        &mut self,
        ep: &EpollSet,
        token: u64,
        _: EventSet,
    ) -> Result<(), virtio_queue::Error> {
        match token {
            RX_TOKEN => {
                let _ = self.rx_evt.read();
                self.rx(ep)
            }
            TX_TOKEN => {
                let _ = self.tx_evt.read();
                self.tx()
            }
            _ => self.rx(ep),
        }
    }

    /// Rescue tick, busy or idle: both rings as if kicked (a kick may have been lost, e.g.
    /// the RX refill a held frame waits for); a lost interrupt is raised again.
    fn on_timer(&mut self, ep: &EpollSet) -> Result<(), virtio_queue::Error> {
        self.interrupt.rescue(&mut self.watch);
        self.tx()?;
        self.rx(ep)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC
    }
    fn config_bytes(&self) -> Vec<u8> {
        self.mac.to_vec()
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let [rxq, txq]: [ActiveQueue; 2] =
            queues
                .try_into()
                .map_err(|q: Vec<ActiveQueue>| ActivateError::QueueCount {
                    expected: 2,
                    got: q.len(),
                })?;
        let mut lp = NetLoop {
            mem,
            rx: rxq.queue,
            tx: txq.queue,
            rx_evt: rxq.event,
            tx_evt: txq.event,
            watch: IrqWatch::default(),
            tap: self.tap.clone(),
            counters: self.counters.clone(),
            interrupt,
            rx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME],
            rx_len: None,
            tap_polled: false,
            tap_broken: false,
            tx_buf: Vec::new(),
        };
        let worker = Worker::spawn("virtio-net", move |mut ev| {
            let ep = ev.epoll();
            if ep
                .add(lp.rx_evt.as_raw_fd(), RX_TOKEN, EventSet::IN)
                .is_err()
                || ep
                    .add(lp.tx_evt.as_raw_fd(), TX_TOKEN, EventSet::IN)
                    .is_err()
            {
                lp.interrupt.fail("epoll");
                return;
            }
            ev.set_timer(rescue_period());
            // Frames queued on the tap before activation, and the tap's first registration.
            let r = match lp.rx(ev.epoll()) {
                Ok(()) => ev.run(&mut lp),
                Err(e) => Err(LoopError::Handler(e)),
            };
            match r {
                Ok(()) | Err(LoopError::Wait(_)) => {}
                Err(LoopError::Handler(e)) => {
                    crate::guest_warn!(error = %e, "virtio-net queue error");
                    lp.interrupt.fail("queue error");
                }
            }
        })
        .map_err(|source| ActivateError::Backend {
            what: "virtio-net worker thread".into(),
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
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceMetrics::Net(NetMetrics {
            rx_bytes: l(&c.rx_bytes),
            rx_dropped: l(&c.rx_dropped),
            rx_frames: l(&c.rx_frames),
            rx_no_buffer: l(&c.rx_no_buffer),
            tap: self.tap.name().to_owned(),
            tx_bad: l(&c.tx_bad),
            tx_bytes: l(&c.tx_bytes),
            tx_errors: l(&c.tx_errors),
            tx_frames: l(&c.tx_frames),
        })
    }
}

/// The network device's counters in the metrics API (see [`NetCounters`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NetMetrics {
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_frames: u64,
    pub rx_no_buffer: u64,
    /// The tap's interface name.
    pub tap: String,
    pub tx_bad: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub tx_frames: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn tx_strips_the_header_and_bounds_chains() {
        let m = mem();
        let frame: Vec<u8> = (0..100u8).collect();
        // chain 0: header and frame split over two descriptors
        m.write_slice(&[0xaa; VNET_HDR_LEN], GuestAddress(0x10_0000))
            .unwrap();
        m.write_slice(&frame, GuestAddress(0x11_0000)).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            d(0x10_0000, VNET_HDR_LEN as u32, VRING_DESC_F_NEXT, 1),
            d(0x11_0000, 100, 0, 0),
            // chain: shorter than a header plus an Ethernet header
            d(0x10_0000, 20, 0, 0),
            // chain: longer than header + MAX_FRAME
            d(0x10_0000, (VNET_HDR_LEN + MAX_FRAME + 1) as u32, 0, 0),
            // chain: outside guest memory
            d(0xffff_0000, 200, 0, 0),
            // chain: only a writable descriptor (nothing to send)
            d(0x10_0000, 200, VRING_DESC_F_WRITE, 0),
        ];
        vq.build_multiple_desc_chains(&descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = NetCounters::default();
        let mut sink: Vec<Vec<u8>> = Vec::new();
        let mut buf = Vec::new();
        assert!(process_tx(&mut q, &m, &mut sink, &mut buf, &c).unwrap());
        assert_eq!(sink, vec![frame]);
        assert_eq!(c.tx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(c.tx_bytes.load(Ordering::Relaxed), 100);
        assert_eq!(c.tx_bad.load(Ordering::Relaxed), 4);
        // every chain was returned to the guest
        assert_eq!(vq.used().idx().load(), 5);
    }

    #[test]
    fn rx_writes_header_and_frame_or_drops() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            // a chain split in two writable descriptors
            d(0x10_0000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            d(0x11_0000, 2000, VRING_DESC_F_WRITE, 0),
            // too small for the frame
            d(0x12_0000, 40, VRING_DESC_F_WRITE, 0),
            // read-only (no room to write)
            d(0x13_0000, 2000, 0, 0),
        ];
        vq.build_multiple_desc_chains(&descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = NetCounters::default();
        let frame: Vec<u8> = (0..60u8).collect();
        assert_eq!(
            deliver_rx(&mut q, &m, &frame, &c).unwrap(),
            RxOutcome::Delivered
        );
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, VNET_HDR_LEN + 60);
        let mut got = [0u8; VNET_HDR_LEN + 60];
        m.read_slice(&mut got[..8], GuestAddress(0x10_0000))
            .unwrap();
        m.read_slice(&mut got[8..], GuestAddress(0x11_0000))
            .unwrap();
        assert_eq!(&got[..10], &[0u8; 10]);
        assert_eq!(&got[10..12], &1u16.to_le_bytes());
        assert_eq!(&got[12..], &frame[..]);
        assert_eq!(
            deliver_rx(&mut q, &m, &frame, &c).unwrap(),
            RxOutcome::Dropped
        );
        assert_eq!(
            deliver_rx(&mut q, &m, &frame, &c).unwrap(),
            RxOutcome::Dropped
        );
        assert_eq!(
            deliver_rx(&mut q, &m, &frame, &c).unwrap(),
            RxOutcome::NoBuffer
        );
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(c.rx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(c.rx_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(c.rx_no_buffer.load(Ordering::Relaxed), 1);
        // an oversized frame is never written
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(&[d(0x10_0000, 0x20_0000, VRING_DESC_F_WRITE, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let big = vec![0u8; MAX_FRAME + 1];
        assert_eq!(
            deliver_rx(&mut q, &m, &big, &c).unwrap(),
            RxOutcome::Dropped
        );
    }

    #[test]
    fn impossible_avail_index_is_an_error() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.avail().idx().store(100);
        let mut q: Queue = vq.create_queue().unwrap();
        let c = NetCounters::default();
        assert!(process_tx(&mut q, &m, &mut Vec::new(), &mut Vec::new(), &c).is_err());
        assert!(deliver_rx(&mut q, &m, &[0u8; 60], &c).is_err());
    }

    #[test]
    fn descriptor_loop_is_bounded() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 4);
        // 0 -> 1 -> 0 -> ...: virtio-queue stops after the queue size.
        let descs = [
            d(0x10_0000, 100, VRING_DESC_F_NEXT, 1),
            d(0x11_0000, 100, VRING_DESC_F_NEXT, 0),
        ];
        for (i, desc) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *desc).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let c = NetCounters::default();
        let mut sink: Vec<Vec<u8>> = Vec::new();
        process_tx(&mut q, &m, &mut sink, &mut Vec::new(), &c).unwrap();
        assert!(sink.len() <= 1);
        assert!(sink.iter().all(|f| f.len() <= 4 * 100));
    }
}
