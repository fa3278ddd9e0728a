//! Device worker threads: an epoll loop per activated device, stopped through an eventfd.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, Interrupt, IrqWatch};

/// Token reserved for the stop eventfd.
pub const STOP_TOKEN: u64 = u64::MAX;

/// How long a device worker waits for events before it looks at its queues and its interrupt
/// anyway. A notification or interrupt lost between guest and VMM (nested, emulated
/// virtualization loses them now and then) would otherwise stall the device for good; one
/// wake-up a second per device is the price.
pub const RESCUE_PERIOD_MS: i32 = 1000;

/// A running device worker.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Spawns `body(epoll)`; the epoll already watches the stop eventfd with [`STOP_TOKEN`], and
    /// `body` must return when it sees that token.
    pub fn spawn<F>(name: &str, body: F) -> std::io::Result<Self>
    where
        F: FnOnce(EpollSet) + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let set = EpollSet::new()?;
        set.add(stop.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(set))?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the worker and waits for it.
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.stop.write(1);
            if h.join().is_err() {
                tracing::error!("device worker panicked");
            }
        }
    }
}

impl Worker {
    /// Spawns the worker of a one-queue device (blk, rng): `process` serves the queue's
    /// available chains and says whether the used ring changed; it runs on every kick and on
    /// every idle tick (a kick may have been lost), and an interrupt left unacknowledged for
    /// a whole tick is raised again. A queue error fails the device (DEVICE_NEEDS_RESET).
    pub fn spawn_single_queue<E, F>(
        name: &'static str,
        active: ActiveQueue,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        mut process: F,
    ) -> std::io::Result<Self>
    where
        E: std::fmt::Display,
        F: FnMut(&mut Queue, &GuestMemoryMmap) -> Result<bool, E> + Send + 'static,
    {
        let ActiveQueue { mut queue, event } = active;
        Self::spawn(name, move |ep| {
            if ep.add(event.as_raw_fd(), 0, EventSet::IN).is_err() {
                interrupt.fail("epoll");
                return;
            }
            let mut events = [EpollEvent::default(); 4];
            let mut watch = IrqWatch::default();
            loop {
                let Ok(n) = ep.wait(RESCUE_PERIOD_MS, &mut events) else {
                    return;
                };
                if events[..n].iter().any(|e| e.data() == STOP_TOKEN) {
                    return;
                }
                if n == 0 {
                    interrupt.rescue(&mut watch);
                } else {
                    let _ = event.read();
                }
                match process(&mut queue, &mem) {
                    Ok(true) => {
                        if queue.needs_notification(&mem).unwrap_or(true) {
                            interrupt.notify_queue();
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(device = name, error = %e, "queue error");
                        interrupt.fail("queue error");
                        return;
                    }
                }
            }
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A thin epoll wrapper.
#[derive(Debug)]
pub struct EpollSet {
    epoll: Epoll,
}

impl EpollSet {
    /// New epoll instance.
    pub fn new() -> std::io::Result<Self> {
        Ok(EpollSet {
            epoll: Epoll::new()?,
        })
    }

    /// Watches `fd` for `events`, reporting `token`.
    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Changes the watched events of `fd`.
    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Waits for events (`timeout_ms` < 0: forever); retries on EINTR.
    pub fn wait(&self, timeout_ms: i32, out: &mut [EpollEvent]) -> std::io::Result<usize> {
        loop {
            match self.epoll.wait(timeout_ms, out) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}
