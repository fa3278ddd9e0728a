//! The vhost-user device: two virtqueues (hiprio + one request queue) whose descriptor
//! chains carry FUSE requests, handed to fuse-backend-rs's protocol server.
//!
//! Guest memory is only ever referenced, never copied into daemon-owned buffers: requests
//! are parsed in place (fuse-backend-rs's `Reader`/`VirtioFsWriter` over the chain) and
//! the server refuses any request longer than its 1 MiB buffer limit. The worker pool (if
//! any) takes chains through a channel bounded by the queue size, so nothing the guest
//! sends grows daemon memory without bound.

use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;

use fsd_fuse_backend_rs::api::filesystem::FileSystem;
use fsd_fuse_backend_rs::api::server::Server;
use fsd_fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use fsd_vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use fsd_vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use fsd_virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use fsd_vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::timerfd::TimerFd;

/// Guest memory as the vhost-user library hands it to us.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;
type Chain = DescriptorChain<MemGuard>;

/// hiprio queue + one request queue, as QEMU's vhost-user-fs device and our VMM expect.
pub const NUM_QUEUES: usize = 2;
/// Largest queue the driver may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Epoll token of the watchdog timer (the library uses `NUM_QUEUES` for its exit event).
pub const WATCHDOG_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Errors of the vhost-user device.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A queue event arrived before the frontend sent the memory table.
    #[error("queue {queue}: event before guest memory was set")]
    NoMemory {
        /// Queue index.
        queue: u16,
    },
    /// An event for a queue this device does not have.
    #[error("event for unknown queue {queue}")]
    UnknownQueue {
        /// Queue index.
        queue: u16,
    },
    /// Unexpected epoll event set.
    #[error("queue {queue}: unexpected event set {events:?}")]
    BadEvent {
        /// Queue index.
        queue: u16,
        /// Event bits.
        events: EventSet,
    },
    /// The available ring could not be read.
    #[error("queue {queue}: cannot iterate the available ring")]
    Queue {
        /// Queue index.
        queue: u16,
        /// Underlying error.
        #[source]
        source: fsd_virtio_queue::Error,
    },
    /// The used ring could not be updated.
    #[error("queue {queue}: cannot add descriptor {head} to the used ring")]
    AddUsed {
        /// Queue index.
        queue: u16,
        /// Descriptor head index.
        head: u16,
        /// Underlying error.
        #[source]
        source: fsd_virtio_queue::Error,
    },
    /// The guest could not be notified.
    #[error("queue {queue}: cannot signal the guest")]
    Signal {
        /// Queue index.
        queue: u16,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The watchdog timer could not be read.
    #[error("cannot read the watchdog timer")]
    Watchdog(#[source] io::Error),
    /// Guest memory holding a ring could not be read.
    #[error("queue {queue}: cannot read the ring's {field} in guest memory")]
    RingMemory {
        /// Queue index.
        queue: u16,
        /// Which field.
        field: &'static str,
    },
    /// The exit event could not be created.
    #[error("cannot create the queue thread's exit event")]
    ExitEvent(#[source] io::Error),
    /// A worker thread could not be started.
    #[error("cannot start request worker thread {index}")]
    SpawnWorker {
        /// Worker index.
        index: usize,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

impl From<BackendError> for io::Error {
    fn from(e: BackendError) -> Self {
        io::Error::other(e)
    }
}

struct Work {
    queue: u16,
    mem: MemGuard,
    chain: Chain,
    vring: VringRwLock<Mem>,
}

struct Shared<F: FileSystem + Send + Sync> {
    server: Server<Arc<F>>,
    event_idx: AtomicBool,
    /// Per queue, the used index at our last signal (for the watchdog's diagnosis).
    signalled: [AtomicU16; NUM_QUEUES],
}

/// The virtio-fs vhost-user backend over a FUSE filesystem `F`.
pub struct FsBackend<F: FileSystem + Send + Sync> {
    shared: Arc<Shared<F>>,
    mem: RwLock<Option<Mem>>,
    pool: Option<SyncSender<Work>>,
    /// Tells the queue thread to stop; the library signals it when the frontend is gone
    /// and joins the thread (without it the daemon would hang on exit).
    exit: (EventConsumer, EventNotifier),
    /// Periodic timer on the queue thread's epoll (see [`FsBackend::with_watchdog`]).
    watchdog: Option<Mutex<TimerFd>>,
    /// Per queue, what the last watchdog tick saw.
    watched: Mutex<[RingSnapshot; NUM_QUEUES]>,
}

/// Ring positions seen by one watchdog tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RingSnapshot {
    /// The driver's avail index.
    avail: u16,
    /// Our next avail position (requests taken).
    next_avail: u16,
    /// Our used index (replies published).
    next_used: u16,
    /// The driver's used_event (EVENT_IDX: where it wants its next interrupt).
    used_event: u16,
}

impl<F: FileSystem + Send + Sync> std::fmt::Debug for FsBackend<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsBackend")
            .field("pool", &self.pool.is_some())
            .finish_non_exhaustive()
    }
}

impl<F: FileSystem + Send + Sync + 'static> FsBackend<F> {
    /// A backend serving `fs`; with `thread_pool_size > 0`, requests of the request queue
    /// are handled by that many worker threads instead of the queue thread.
    pub fn new(fs: Arc<F>, thread_pool_size: usize) -> Result<Self, BackendError> {
        let shared = Arc::new(Shared {
            server: Server::new(fs),
            event_idx: AtomicBool::new(false),
            signalled: [const { AtomicU16::new(0) }; NUM_QUEUES],
        });
        let pool = if thread_pool_size > 0 {
            let (tx, rx) = sync_channel::<Work>(MAX_QUEUE_SIZE);
            let rx = Arc::new(Mutex::new(rx));
            for index in 0..thread_pool_size {
                let rx = Arc::clone(&rx);
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("fsd-worker-{index}"))
                    .spawn(move || worker(&shared, &rx))
                    .map_err(|source| BackendError::SpawnWorker { index, source })?;
            }
            Some(tx)
        } else {
            None
        };
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(BackendError::ExitEvent)?;
        Ok(FsBackend {
            shared,
            mem: RwLock::new(None),
            pool,
            exit,
            watchdog: None,
            watched: Mutex::new([RingSnapshot::default(); NUM_QUEUES]),
        })
    }

    /// Adds a watchdog: `timer` (armed periodically by the caller, created before the
    /// seccomp filter) is registered on the queue thread's epoll with [`WATCHDOG_EVENT`].
    /// On each tick, a queue whose rings did not move since the previous tick is checked
    /// for a lost notification in either direction: requests the driver published that
    /// no kick announced are served, and with EVENT_IDX, replies past the driver's
    /// `used_event` that it has not consumed are signalled again. Both are logged as
    /// warnings: they mean a notification was lost somewhere (frontend, guest or here),
    /// and the guest would otherwise wait forever.
    pub fn with_watchdog(mut self, timer: TimerFd) -> Self {
        self.watchdog = Some(Mutex::new(timer));
        self
    }

    /// The watchdog timer's fd, to register with the library's epoll handler.
    pub fn watchdog_fd(&self) -> Option<RawFd> {
        self.watchdog
            .as_ref()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).as_raw_fd())
    }

    fn snapshot(
        queue: u16,
        mem: &MemGuard,
        vring: &VringRwLock<Mem>,
    ) -> Result<Option<RingSnapshot>, BackendError> {
        let guard = vring.get_ref();
        let q = guard.get_queue();
        if !q.ready() {
            return Ok(None);
        }
        let avail = q
            .avail_idx(&**mem, Ordering::Acquire)
            .map_err(|source| BackendError::Queue { queue, source })?;
        // used_event sits after the avail ring's entries.
        let at = q.avail_ring() + 4 + 2 * u64::from(q.size());
        let used_event: u16 =
            mem.read_obj(GuestAddress(at))
                .map_err(|_| BackendError::RingMemory {
                    queue,
                    field: "used_event",
                })?;
        Ok(Some(RingSnapshot {
            avail: avail.0,
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            used_event: u16::from_le(used_event),
        }))
    }

    fn watchdog_tick(&self, vrings: &[VringRwLock<Mem>]) -> Result<(), BackendError> {
        if let Some(t) = &self.watchdog {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .wait()
                .map_err(|e| BackendError::Watchdog(io::Error::from_raw_os_error(e.errno())))?;
        }
        let Some(mem) = self
            .mem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(GuestMemoryAtomic::memory)
        else {
            return Ok(());
        };
        let event_idx = self.shared.event_idx.load(Ordering::Relaxed);
        for (i, vring) in vrings.iter().enumerate().take(NUM_QUEUES) {
            let queue = i as u16;
            let Some(now) = Self::snapshot(queue, &mem, vring)? else {
                continue;
            };
            let before = std::mem::replace(
                &mut self.watched.lock().unwrap_or_else(|p| p.into_inner())[i],
                now,
            );
            if now != before {
                continue;
            }
            let waiting = (Wrapping(now.avail) - Wrapping(now.next_avail)).0;
            if waiting != 0 {
                tracing::warn!(
                    queue,
                    waiting,
                    "requests published without a kick for a whole tick; serving them"
                );
                self.process_queue(queue, vring)?;
            }
            // The driver asked for an interrupt at used_event, which we passed, and did
            // not consume since: it never got (or lost) that interrupt.
            let unseen = (Wrapping(now.next_used) - Wrapping(now.used_event)).0;
            if event_idx && unseen != 0 && unseen < 0x8000 {
                // Did we signal past used_event? Then the interrupt was lost after our
                // call eventfd (frontend or guest); otherwise we never sent it.
                let signalled = self.shared.signalled[i].load(Ordering::Relaxed);
                let sent = (Wrapping(signalled) - Wrapping(now.used_event)).0;
                let lost_by = if sent != 0 && sent < 0x8000 {
                    "after our signal (frontend or guest)"
                } else {
                    "here: no signal was sent past used_event"
                };
                tracing::warn!(
                    queue,
                    used = now.next_used,
                    used_event = now.used_event,
                    signalled,
                    lost_by,
                    "replies not consumed by the guest for a whole tick; signalling again"
                );
                vring
                    .signal_used_queue()
                    .map_err(|source| BackendError::Signal { queue, source })?;
            }
        }
        Ok(())
    }

    fn process_queue(&self, queue: u16, vring: &VringRwLock<Mem>) -> Result<(), BackendError> {
        let mem = self
            .mem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .ok_or(BackendError::NoMemory { queue })?
            .memory();
        let event_idx = self.shared.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(|source| BackendError::Queue { queue, source })?;
            }
            let chains: Vec<Chain> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(|source| BackendError::Queue { queue, source })?
                .collect();
            for chain in chains {
                // The hiprio queue (FORGET, INTERRUPT) is always served inline.
                match (&self.pool, queue) {
                    (Some(tx), q) if q != 0 => {
                        let work = Work {
                            queue,
                            mem: mem.clone(),
                            chain,
                            vring: vring.clone(),
                        };
                        if let Err(e) = tx.send(work) {
                            // Workers are gone (cannot happen while self lives): serve inline.
                            let w = e.0;
                            self.shared
                                .handle_chain(w.queue, &w.mem, w.chain, &w.vring)?;
                        }
                    }
                    _ => self.shared.handle_chain(queue, &mem, chain, vring)?,
                }
            }
            if !event_idx {
                break;
            }
            if !vring
                .enable_notification()
                .map_err(|source| BackendError::Queue { queue, source })?
            {
                break;
            }
        }
        Ok(())
    }
}

fn worker<F: FileSystem + Send + Sync>(shared: &Shared<F>, rx: &Mutex<Receiver<Work>>) {
    loop {
        let work = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            guard.recv()
        };
        let Ok(work) = work else { return };
        if let Err(e) = shared.handle_chain(work.queue, &work.mem, work.chain, &work.vring) {
            tracing::error!(error = %e, "request worker failed");
        }
    }
}

impl<F: FileSystem + Send + Sync> Shared<F> {
    fn handle_chain(
        &self,
        queue: u16,
        mem: &MemGuard,
        chain: Chain,
        vring: &VringRwLock<Mem>,
    ) -> Result<(), BackendError> {
        let head = chain.head_index();
        let len = match self.serve(mem, chain) {
            Ok(n) => n,
            Err(e) => {
                // A malformed request gets an empty reply; the guest sees an I/O error.
                tracing::warn!(queue, head, error = %e, "bad request from the guest");
                0
            }
        };
        // One lock for add_used, the EVENT_IDX check and the signal, so `signalled`
        // records exactly the used index the guest was told about.
        let mut state = vring.get_mut();
        state
            .add_used(head, u32::try_from(len).unwrap_or(u32::MAX))
            .map_err(|source| BackendError::AddUsed {
                queue,
                head,
                source,
            })?;
        let notify = state
            .needs_notification()
            .map_err(|source| BackendError::Queue { queue, source })?;
        if notify {
            state
                .signal_used_queue()
                .map_err(|source| BackendError::Signal { queue, source })?;
            if let Some(s) = self.signalled.get(usize::from(queue)) {
                s.store(state.get_queue().next_used(), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn serve(&self, mem: &MemGuard, chain: Chain) -> Result<usize, String> {
        let reader =
            Reader::from_descriptor_chain(&**mem, chain.clone()).map_err(|e| e.to_string())?;
        let writer = VirtioFsWriter::new(&**mem, chain).map_err(|e| e.to_string())?;
        self.server
            .handle_message(reader, writer.into(), None, None)
            .map_err(|e| e.to_string())
    }
}

impl<F: FileSystem + Send + Sync + 'static> VhostUserBackend for FsBackend<F> {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let consumer = self.exit.0.try_clone().ok()?;
        let notifier = self.exit.1.try_clone().ok()?;
        Some((consumer, notifier))
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if device_event == WATCHDOG_EVENT && self.watchdog.is_some() {
            self.watchdog_tick(vrings)?;
            return Ok(());
        }
        if evset != EventSet::IN {
            return Err(BackendError::BadEvent {
                queue: device_event,
                events: evset,
            }
            .into());
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or(BackendError::UnknownQueue {
                queue: device_event,
            })?;
        self.process_queue(device_event, vring)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
