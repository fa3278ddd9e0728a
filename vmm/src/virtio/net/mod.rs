//! virtio-net on a host tap: one RX and one TX queue, checksum and TSO offloads, mergeable
//! RX buffers, no control queue. Two backends per NIC:
//!
//! - **userspace** (this module's worker, [`rx`], [`tx`]): frames move between the rings
//!   and the tap in a worker thread, with the virtio-net header passed through to and from
//!   the tap (checked both ways, [`hdr`]);
//! - **vhost-net** ([`vhost`]): the host kernel moves the frames; the VMM only sets it up
//!   and relays its interrupts.
//!
//! Either way the tap's offloads (`TUNSETOFFLOAD`) follow the features the guest accepted,
//! at activation ([`hdr::apply_offloads`]). Frames and chains are bounded by [`MAX_FRAME`];
//! malformed chains and refused headers are returned unused and counted.

pub mod hdr;
pub mod notify;
pub mod rx;
#[cfg(test)]
mod tests;
pub mod tx;
pub mod vhost;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::event::{EpollSet, EventHandler, LoopError};
use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::worker::{Worker, rescue_period};
use super::{
    ActivateError, ActiveQueue, DeviceMetrics, Interrupt, IrqWatch, VirtioDevice, device_type,
};
pub use hdr::F_MAC;
use hdr::VnetHdr;
pub use rx::{RxOutcome, deliver_rx};
pub use tx::{FrameSink, process_tx};

/// Largest Ethernet frame (without the virtio-net header) accepted in either direction: a
/// 64 KiB GSO frame and its Ethernet header.
pub const MAX_FRAME: usize = 65_550;
/// Smallest frame sent to the tap: an Ethernet header.
pub const MIN_FRAME: usize = 14;
const QUEUE_SIZE: u16 = 256;
/// Frames moved per wake-up and direction before other events get a turn.
const BATCH: usize = 256;
/// TX passes per kick before other events get their turn (a driver that keeps adding
/// chains while they are sent is served in batches).
const TX_ROUNDS: usize = 4;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;

/// Counters (the userspace backend's; vhost-net only counts interrupts).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (frames only).
    pub rx_bytes: AtomicU64,
    /// Guest buffers (chains) used for them: more than `rx_frames` with mergeable buffers.
    pub rx_buffers: AtomicU64,
    /// GSO frames delivered (GUEST_TSO4/6).
    pub rx_gso_frames: AtomicU64,
    /// Frames dropped: the guest's buffers were too small or malformed, or the tap's header
    /// asked for an offload the guest did not accept.
    pub rx_dropped: AtomicU64,
    /// Times the tap had a frame but the guest had too few RX buffers posted.
    pub rx_no_buffer: AtomicU64,
    /// Frames sent to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes sent to the tap (frames only).
    pub tx_bytes: AtomicU64,
    /// GSO frames sent (HOST_TSO4/6).
    pub tx_gso_frames: AtomicU64,
    /// Frames sent with a partial checksum (NEEDS_CSUM).
    pub tx_csum_partial: AtomicU64,
    /// Malformed TX chains (bad addresses, shorter than a header, longer than a frame).
    pub tx_bad: AtomicU64,
    /// TX headers refused ([`hdr::check_tx`]: flags, GSO type or sizes, checksum offsets).
    pub tx_bad_hdr: AtomicU64,
    /// Frames the tap refused.
    pub tx_errors: AtomicU64,
    /// vhost-net interrupts relayed to the guest.
    pub vhost_interrupts: Arc<AtomicU64>,
}

/// Writes frames to a tap: with their header when the tap takes one.
#[derive(Debug)]
struct TapSink<'a> {
    tap: &'a Tap,
}

impl FrameSink for TapSink<'_> {
    fn takes_header(&self) -> bool {
        self.tap.vnet_hdr()
    }
    fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.tap.write_frame(data).map(drop)
    }
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened or adopted.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// vhost-net could not be set up.
    #[error(transparent)]
    Vhost(#[from] vhost::VhostNetError),
}

/// Which backend moves a NIC's frames.
#[derive(Debug)]
enum Backend {
    Userspace { worker: Option<Worker> },
    Vhost(vhost::VhostNet),
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    counters: Arc<NetCounters>,
    backend: Backend,
    features: u64,
    /// Negotiated features and the tap's offload flags at the last activation.
    negotiated: (u64, libc::c_uint),
}

impl Net {
    /// A device on `tap` with the guest MAC address `mac`, frames moved in userspace.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        let features = hdr::offered(tap.vnet_hdr());
        Net {
            tap: Arc::new(tap),
            mac,
            counters: Arc::default(),
            backend: Backend::Userspace { worker: None },
            features,
            negotiated: (0, 0),
        }
    }

    /// A device on `tap` whose frames the host kernel moves, through the vhost-net
    /// descriptor `vhost_net` ([`vhost::open_device`]).
    pub fn with_vhost(tap: Tap, mac: [u8; 6], vhost_net: std::fs::File) -> Result<Self, NetError> {
        let v = vhost::VhostNet::new(vhost_net, tap.vnet_hdr())?;
        let features = v.offered();
        Ok(Net {
            tap: Arc::new(tap),
            mac,
            counters: Arc::default(),
            backend: Backend::Vhost(v),
            features,
            negotiated: (0, 0),
        })
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
    features: u64,
    rx: Queue,
    tx: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    watch: IrqWatch,
    tap: Arc<Tap>,
    counters: Arc<NetCounters>,
    interrupt: Arc<Interrupt>,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    event_idx: bool,
    rx_irq: notify::Suppress,
    tx_irq: notify::Suppress,
    /// A frame read from the tap, with the tap's header if any: `rx_buf[..rx_len]`.
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    tap_polled: bool,
    /// Reading the tap failed for good (not EAGAIN): RX is off.
    tap_broken: bool,
    tx_buf: Vec<u8>,
}

impl NetLoop {
    /// Sends the guest's TX chains until the ring is empty; with EVENT_IDX the driver is
    /// then asked to kick at its next chain, and a chain that arrived meanwhile is taken
    /// without waiting for a kick.
    fn tx(&mut self) -> Result<(), virtio_queue::Error> {
        let mut sink = TapSink { tap: &self.tap };
        for _ in 0..TX_ROUNDS {
            let n = process_tx(
                &mut self.tx,
                &self.mem,
                self.features,
                &mut sink,
                &mut self.tx_buf,
                &self.counters,
                BATCH,
            )?;
            if n > 0 && self.tx_irq.should_notify(&mut self.tx, &self.mem) {
                self.interrupt.notify_queue();
            }
            if n == BATCH {
                break;
            }
            if !notify::ask_kick_after(&self.tx, &self.mem, self.tx.next_avail(), self.event_idx)? {
                return Ok(());
            }
        }
        // More may be waiting: come back after the other events, as if kicked.
        let _ = self.tx_evt.write(1);
        Ok(())
    }

    /// The header and frame of the tap's frame in `rx_buf[..len]`: the tap's own header, or
    /// an empty one for a tap without headers. `None`: not a frame the guest may get.
    fn split_rx(&self, len: usize) -> Option<(VnetHdr, std::ops::Range<usize>)> {
        if !self.tap.vnet_hdr() {
            return Some((VnetHdr::default(), 0..len));
        }
        let raw: &[u8; VNET_HDR_LEN] = self.rx_buf.get(..VNET_HDR_LEN)?.try_into().ok()?;
        if len < VNET_HDR_LEN {
            return None;
        }
        let h = hdr::check_rx(&VnetHdr::parse(raw), self.features)?;
        Some((h, VNET_HDR_LEN..len))
    }

    /// Moves frames from the tap to the guest until either side runs dry (or a batch).
    fn rx(&mut self, ep: &EpollSet) -> Result<(), virtio_queue::Error> {
        let mergeable = self.features & hdr::F_MRG_RXBUF != 0;
        let mut used = false;
        let mut budget = BATCH;
        // The driver's avail index when a held frame last found too few buffers.
        let mut asked_at: Option<u16> = None;
        loop {
            while budget > 0 {
                budget -= 1;
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
                let Some((h, range)) = self.split_rx(len) else {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    self.rx_len = None;
                    continue;
                };
                match deliver_rx(
                    &mut self.rx,
                    &self.mem,
                    &h,
                    &self.rx_buf[range],
                    mergeable,
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
            if self.rx_len.is_some() {
                // Out of buffers with a frame held: ask for a kick once the driver posts past
                // what it has now, and look again if it already has (or has since the frame
                // found too few).
                let seen = notify::avail_idx(&self.rx, &self.mem)?;
                let moved = notify::ask_kick_after(&self.rx, &self.mem, seen, self.event_idx)?;
                if asked_at != Some(seen) || moved {
                    asked_at = Some(seen);
                    if budget > 0 {
                        continue;
                    }
                    // No budget left: come back after the other events.
                    let _ = self.rx_evt.write(1);
                }
            }
            break;
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
        if used && self.rx_irq.should_notify(&mut self.rx, &self.mem) {
            self.interrupt.notify_queue();
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

impl Net {
    fn spawn_userspace(
        &self,
        mem: GuestMemoryMmap,
        features: u64,
        rxq: ActiveQueue,
        txq: ActiveQueue,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Worker> {
        let event_idx = features & hdr::F_EVENT_IDX != 0;
        let (mut rx, mut tx) = (rxq.queue, txq.queue);
        let rx_irq = notify::Suppress::new(&mut rx, event_idx);
        let tx_irq = notify::Suppress::new(&mut tx, event_idx);
        let mut lp = NetLoop {
            mem,
            features,
            rx,
            tx,
            event_idx,
            rx_irq,
            tx_irq,
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
        Worker::spawn(
            "virtio-net",
            crate::seccomp::ThreadKind::Net,
            move |mut ev| {
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
            },
        )
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
        self.features
    }
    fn config_bytes(&self) -> Vec<u8> {
        self.mac.to_vec()
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        // The host hands over what the guest accepted, nothing more.
        let offloads = if self.tap.vnet_hdr() {
            hdr::apply_offloads(self.tap.as_ref(), features).map_err(|e| {
                ActivateError::Backend {
                    what: format!("TUNSETOFFLOAD on tap {}", self.tap.name()),
                    source: std::io::Error::other(e),
                }
            })?
        } else {
            0
        };
        self.negotiated = (features, offloads);
        match &mut self.backend {
            Backend::Vhost(v) => v.activate(
                &mem,
                features,
                &self.tap,
                queues,
                interrupt,
                self.counters.clone(),
            ),
            Backend::Userspace { .. } => {
                let [rxq, txq]: [ActiveQueue; 2] =
                    queues
                        .try_into()
                        .map_err(|q: Vec<ActiveQueue>| ActivateError::QueueCount {
                            expected: 2,
                            got: q.len(),
                        })?;
                let w = self
                    .spawn_userspace(mem, features, rxq, txq, interrupt)
                    .map_err(|source| ActivateError::Backend {
                        what: "virtio-net worker thread".into(),
                        source,
                    })?;
                self.backend = Backend::Userspace { worker: Some(w) };
                Ok(())
            }
        }
    }
    fn reset(&mut self) {
        match &mut self.backend {
            Backend::Userspace { worker } => {
                if let Some(mut w) = worker.take() {
                    w.stop();
                }
            }
            Backend::Vhost(v) => v.reset(),
        }
    }
    fn metrics(&self) -> DeviceMetrics {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceMetrics::Net(NetMetrics {
            backend: match self.backend {
                Backend::Userspace { .. } => "userspace",
                Backend::Vhost(_) => "vhost-net",
            },
            features: self.negotiated.0,
            rx_buffers: l(&c.rx_buffers),
            rx_bytes: l(&c.rx_bytes),
            rx_dropped: l(&c.rx_dropped),
            rx_frames: l(&c.rx_frames),
            rx_gso_frames: l(&c.rx_gso_frames),
            rx_no_buffer: l(&c.rx_no_buffer),
            tap: self.tap.name().to_owned(),
            tap_offloads: self.negotiated.1,
            tx_bad: l(&c.tx_bad),
            tx_bad_hdr: l(&c.tx_bad_hdr),
            tx_bytes: l(&c.tx_bytes),
            tx_csum_partial: l(&c.tx_csum_partial),
            tx_errors: l(&c.tx_errors),
            tx_frames: l(&c.tx_frames),
            tx_gso_frames: l(&c.tx_gso_frames),
            vhost_interrupts: l(&c.vhost_interrupts),
        })
    }
}

/// The network device's state and counters in the metrics API (see [`NetCounters`]; the
/// frame counters stay 0 with vhost-net, where the host kernel moves the frames).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NetMetrics {
    /// `"userspace"` or `"vhost-net"`.
    pub backend: &'static str,
    /// Features the guest accepted at the last activation (0 before).
    pub features: u64,
    pub rx_buffers: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_frames: u64,
    pub rx_gso_frames: u64,
    pub rx_no_buffer: u64,
    /// The tap's interface name.
    pub tap: String,
    /// `TUN_F_*` flags set on the tap at the last activation.
    pub tap_offloads: u32,
    pub tx_bad: u64,
    pub tx_bad_hdr: u64,
    pub tx_bytes: u64,
    pub tx_csum_partial: u64,
    pub tx_errors: u64,
    pub tx_frames: u64,
    pub tx_gso_frames: u64,
    pub vhost_interrupts: u64,
}
