//! Device worker threads: an epoll loop per activated device, stopped through an eventfd.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, Interrupt, IrqWatch};

/// Token reserved for the stop eventfd.
pub const STOP_TOKEN: u64 = u64::MAX;

/// How often device workers look at their queues and interrupts whatever happened in
/// between (ms; 0: never, the default). Set once per VMM process from the VM description's
/// `irq_rescue_ms` before devices start. Only the lab turns it on: nested KVM inside
/// QEMU-TCG's emulated SVM has lost notifications and interrupts between guest and VMM
/// (tests/README.md, "Choosing the lab"); on a real host nothing is lost and a timer would
/// only wake idle devices for nothing.
static RESCUE_PERIOD_MS: AtomicU64 = AtomicU64::new(0);

/// Sets the rescue period of device workers started from now on (0: off).
pub fn set_rescue_period_ms(ms: u32) {
    RESCUE_PERIOD_MS.store(u64::from(ms), Ordering::Relaxed);
}

/// The rescue tick of one device worker: due every rescue period by the clock, whether the
/// worker was idle or busy in between (a busy device can lose a kick on another of its
/// queues, or an interrupt, just as well). The worker waits for events at most until the
/// next tick ([`RescueTick::timeout_ms`]; forever when rescue is off) and, when
/// [`RescueTick::poll`] says so, serves its rings as if kicked.
#[derive(Debug)]
pub struct RescueTick {
    period: Option<Duration>,
    next: Instant,
    watch: IrqWatch,
}

impl Default for RescueTick {
    /// The process-wide setting ([`set_rescue_period_ms`]).
    fn default() -> Self {
        match RESCUE_PERIOD_MS.load(Ordering::Relaxed) {
            0 => RescueTick {
                period: None,
                next: Instant::now(),
                watch: IrqWatch::default(),
            },
            ms => Self::every(Duration::from_millis(ms)),
        }
    }
}

impl RescueTick {
    /// A tick every `period`, the first one `period` from now.
    pub fn every(period: Duration) -> Self {
        RescueTick {
            period: Some(period),
            next: Instant::now() + period,
            watch: IrqWatch::default(),
        }
    }

    /// The epoll timeout that wakes the worker at the next tick (ms, rounded up; -1, no
    /// timeout, when rescue is off).
    pub fn timeout_ms(&self) -> i32 {
        if self.period.is_none() {
            return -1;
        }
        let left = self.next.saturating_duration_since(Instant::now());
        i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    }

    /// When a tick is due: raises `interrupt` again if the guest left it unacknowledged
    /// since the previous tick ([`Interrupt::rescue`]) and returns `true`, telling the
    /// worker to serve its rings as if kicked. `false` between ticks, and always when rescue
    /// is off.
    pub fn poll(&mut self, interrupt: &Interrupt) -> bool {
        let Some(period) = self.period else {
            return false;
        };
        let now = Instant::now();
        if now < self.next {
            return false;
        }
        self.next = now + period;
        interrupt.rescue(&mut self.watch);
        true
    }
}

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
    /// every rescue tick (a kick may have been lost), and an interrupt left unacknowledged for
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
            let mut tick = RescueTick::default();
            loop {
                let Ok(n) = ep.wait(tick.timeout_ms(), &mut events) else {
                    return;
                };
                if events[..n].iter().any(|e| e.data() == STOP_TOKEN) {
                    return;
                }
                let kicked = n > 0;
                if kicked {
                    let _ = event.read();
                }
                if !tick.poll(&interrupt) && !kicked {
                    continue;
                }
                match process(&mut queue, &mem) {
                    Ok(true) => {
                        if queue.needs_notification(&mem).unwrap_or(true) {
                            interrupt.notify_queue();
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        crate::guest_warn!(device = name, error = %e, "queue error");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_rescue_period_a_worker_waits_without_timeout_and_never_rescues() {
        // The process-wide default (nothing set it in this test binary) is off.
        let i = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut tick = RescueTick::default();
        assert_eq!(tick.timeout_ms(), -1, "epoll must block without a timeout");
        i.notify_queue();
        let _ = i.irq().read();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!tick.poll(&i));
        assert!(!tick.poll(&i));
        assert_eq!(i.resent(), 0);
    }

    #[test]
    fn rescue_tick_is_due_by_the_clock_and_raises_a_lost_interrupt() {
        let i = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut tick = RescueTick::every(Duration::from_millis(40));
        assert!(!tick.poll(&i), "due before its period");
        let t = tick.timeout_ms();
        assert!((1..=40).contains(&t), "timeout {t}");
        i.notify_queue();
        let _ = i.irq().read();
        // However often the worker wakes in between (busy), the tick comes by the clock.
        let start = Instant::now();
        while !tick.poll(&i) {
            assert!(start.elapsed() < Duration::from_secs(5), "tick never due");
        }
        // First tick: pending, seen once. Second: still unacknowledged, raised again.
        std::thread::sleep(Duration::from_millis(tick.timeout_ms() as u64 + 1));
        assert!(tick.poll(&i));
        assert_eq!(i.resent(), 1);
        assert_eq!(i.irq().read().unwrap(), 1);
        assert!(!tick.poll(&i), "the next tick is a period away");
    }
}
