//! virtio-vsock with a hybrid (unix socket) host side; see [`muxer`] for the protocol.

pub mod muxer;
pub mod packet;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::event::{EpollSet, EventHandler, EventLoop, LoopError};
use super::worker::{Worker, rescue_period};
use super::{
    ActivateError, ActiveQueue, DeviceMetrics, Interrupt, IrqWatch, VIRTIO_F_VERSION_1,
    VirtioDevice, device_type,
};
use muxer::{Muxer, MuxerError, VsockCounters};

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host socket could not be bound.
    #[error("cannot listen on vsock socket {path}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// `<connect_base>_<port>` is where guest connections to host port P go: `uds_path`,
    /// or the same socket's path inside the VMM's jail.
    connect_base: PathBuf,
    listener: UnixListener,
    counters: Arc<VsockCounters>,
    worker: Option<Worker>,
}

impl Vsock {
    /// Binds `uds_path` (a stale socket file there is replaced) for guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if let Ok(m) = std::fs::symlink_metadata(uds_path)
            && std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())
        {
            let _ = std::fs::remove_file(uds_path);
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_owned(),
            source,
        })?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_owned(),
            connect_base: uds_path.to_owned(),
            listener,
            counters: Arc::default(),
            worker: None,
        })
    }
}

impl Vsock {
    /// Guest connections to host port P go to `<base>_P` instead of `<uds_path>_P` (the
    /// same place as seen from inside the VMM's jail).
    pub fn set_connect_base(&mut self, base: PathBuf) {
        self.connect_base = base;
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// The worker's handler: the muxer's sockets and the three queues.
struct VsockLoop {
    mux: Muxer,
    queues: Vec<ActiveQueue>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    watch: IrqWatch,
    /// TX chains were used since the last interrupt decision.
    tx_used: bool,
}

impl EventHandler for VsockLoop {
    type Error = MuxerError;

    fn on_event(&mut self, _: &EpollSet, token: u64, events: EventSet) -> Result<(), MuxerError> {
        match token {
            t if t == RXQ as u64 || t == EVQ as u64 => {
                let _ = self.queues[t as usize].event.read();
            }
            t if t == TXQ as u64 => {
                let _ = self.queues[TXQ].event.read();
                self.tx_used |= self
                    .mux
                    .process_tx(&mut self.queues[TXQ].queue, &self.mem)?;
            }
            t => self.mux.handle_event(t, events),
        }
        Ok(())
    }

    /// The rings are served after every wake-up anyway ([`Self::after_events`]), so a lost
    /// kick is served by the tick's wake-up at the latest; an interrupt the guest never
    /// acknowledged is raised again.
    fn on_timer(&mut self, _: &EpollSet) -> Result<(), MuxerError> {
        self.interrupt.rescue(&mut self.watch);
        Ok(())
    }

    fn after_events(&mut self, _: &EpollSet) -> Result<(), MuxerError> {
        let (mux, mem) = (&mut self.mux, &self.mem);
        let [rxq, txq, _] = &mut self.queues[..] else {
            unreachable!("activate checked three queues");
        };
        // TX may have been notified while we were busy; the ring is the truth.
        let mut notify = std::mem::take(&mut self.tx_used);
        notify |= mux.process_tx(&mut txq.queue, mem)?;
        mux.update_interests();
        let mut rx_used = mux.fill_rx(&mut rxq.queue, mem)?;
        while rx_used && mux.rx_pending() {
            // Drain as long as the guest has buffers and we have data (bounded by the ring).
            if !mux.fill_rx(&mut rxq.queue, mem)? {
                break;
            }
            rx_used = true;
        }
        // TX held back while the control queue was full ([`Muxer::tx_blocked`]) goes on
        // now that the guest took some: its TX chains are still in the ring, unkicked.
        if rx_used && !mux.tx_blocked() {
            notify |= mux.process_tx(&mut txq.queue, mem)?;
            rx_used |= mux.fill_rx(&mut rxq.queue, mem)?;
        }
        mux.update_interests();
        let q_notify = |q: &mut virtio_queue::Queue| q.needs_notification(mem).unwrap_or(true);
        if (notify && q_notify(&mut txq.queue)) || (rx_used && q_notify(&mut rxq.queue)) {
            self.interrupt.notify_queue();
        }
        Ok(())
    }
}

fn run(
    mut lp: EventLoop,
    mux: Muxer,
    queues: Vec<ActiveQueue>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
) -> Result<(), MuxerError> {
    for (i, q) in queues.iter().enumerate() {
        lp.epoll()
            .add(q.event.as_raw_fd(), i as u64, EventSet::IN)
            .map_err(MuxerError::Epoll)?;
    }
    lp.set_timer(rescue_period());
    let mut handler = VsockLoop {
        mux,
        queues,
        mem,
        interrupt,
        watch: IrqWatch::default(),
        tx_used: false,
    };
    lp.run(&mut handler).map_err(|e| match e {
        LoopError::Wait(e) => MuxerError::Epoll(e),
        LoopError::Handler(e) => e,
    })
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn config_bytes(&self) -> Vec<u8> {
        self.guest_cid.to_le_bytes().to_vec()
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        let backend = |what: &str| {
            let what = what.to_string();
            move |source| ActivateError::Backend { what, source }
        };
        let listener = self
            .listener
            .try_clone()
            .map_err(backend("listener clone"))?;
        let (cid, path, counters) = (
            self.guest_cid,
            self.connect_base.clone(),
            self.counters.clone(),
        );
        let worker = Worker::spawn(
            "virtio-vsock",
            crate::seccomp::ThreadKind::Vsock,
            move |lp| {
                let mux = match Muxer::new(cid, path, listener, lp.epoll().clone(), counters) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(error = %e, "vsock backend failed to start");
                        interrupt.fail("backend start");
                        return;
                    }
                };
                if let Err(e) = run(lp, mux, queues, mem, interrupt.clone()) {
                    crate::guest_warn!(error = %e, "vsock device stopped");
                    interrupt.fail("vsock queue error");
                }
            },
        )
        .map_err(backend("worker thread"))?;
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
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        DeviceMetrics::Vsock(VsockMetrics {
            bad_packets: l(&c.bad_packets),
            conns_opened: l(&c.conns_opened),
            conns_reset: l(&c.conns_reset),
            rx_bytes: l(&c.rx_bytes),
            rx_packets: l(&c.rx_packets),
            tx_bytes: l(&c.tx_bytes),
            tx_packets: l(&c.tx_packets),
        })
    }
}

/// The vsock device's counters in the metrics API (see [`VsockCounters`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VsockMetrics {
    pub bad_packets: u64,
    pub conns_opened: u64,
    pub conns_reset: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

#[cfg(test)]
mod tests;
