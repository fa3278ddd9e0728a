//! Device worker threads: one thread per activated device running an
//! [`EventLoop`], stopped through an eventfd; the lab-only rescue
//! tick's period.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use super::event::{EpollSet, STOP_TOKEN};
use super::event::{EventHandler, EventLoop, LoopError};
use super::{ActiveQueue, Interrupt, IrqWatch};
use crate::seccomp::ThreadKind;

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

/// The rescue tick every device worker asks its event loop for
/// ([`EventLoop::set_timer`]): `None` (no timer, the loop blocks without timeout) unless
/// [`set_rescue_period_ms`] set one. The tick is due by the clock, whether the worker was
/// idle or busy in between (a busy device can lose a kick on another of its queues, or an
/// interrupt, just as well). On it a worker serves its rings as if kicked and raises again
/// an interrupt left unacknowledged for a whole tick ([`Interrupt::rescue`], counted as
/// `irq_resent` and warned about).
pub fn rescue_period() -> Option<Duration> {
    match RESCUE_PERIOD_MS.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// A running device worker.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Spawns `body(event_loop)` on a thread named `name` (created by the spawner,
    /// `spawner.rs`), which first installs the seccomp filter of `kind`. The loop already
    /// ends on the worker's stop eventfd ([`STOP_TOKEN`]) and has no timer; `body`
    /// registers the device's descriptors, asks for a timer if it wants one and runs its
    /// handler.
    pub fn spawn<F>(name: &str, kind: ThreadKind, body: F) -> std::io::Result<Self>
    where
        F: FnOnce(EventLoop) + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let lp = EventLoop::new()?;
        lp.stop_on(stop.as_raw_fd())?;
        let handle = crate::spawner::spawn(name, move || {
            crate::seccomp::install_or_exit(kind);
            body(lp)
        })?;
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
    /// Spawns the worker of a one-queue device (blk, rng, mem): `process` serves the
    /// queue's available chains and says whether the used ring changed; it runs on every
    /// kick and on every rescue tick (a kick may have been lost), and an interrupt left
    /// unacknowledged for a whole tick is raised again. A queue error fails the device
    /// (DEVICE_NEEDS_RESET). [`Worker::spawn_queues`] with one queue.
    pub fn spawn_single_queue<E, F>(
        name: &'static str,
        kind: ThreadKind,
        active: ActiveQueue,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        mut process: F,
    ) -> std::io::Result<Self>
    where
        E: std::error::Error + 'static,
        F: FnMut(&mut Queue, &GuestMemoryMmap) -> Result<bool, E> + Send + 'static,
    {
        Self::spawn_queues(name, kind, vec![active], mem, interrupt, move |_, q, m| {
            process(q, m)
        })
    }
}

/// The handler of a device whose queues are served independently (blk, rng, mem with one
/// queue; balloon with three): each queue's kick serves that queue.
struct MultiQueue<F> {
    queues: Vec<(Queue, EventFd)>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    process: F,
    /// Per queue: kicked or rescue tick since it was last served.
    serve: Vec<bool>,
    watch: IrqWatch,
}

impl<E, F> EventHandler for MultiQueue<F>
where
    E: std::error::Error + 'static,
    F: FnMut(usize, &mut Queue, &GuestMemoryMmap) -> Result<bool, E>,
{
    type Error = E;

    fn on_event(&mut self, _: &EpollSet, token: u64, _: EventSet) -> Result<(), E> {
        if let Some((_, event)) = usize::try_from(token).ok().and_then(|i| self.queues.get(i)) {
            let _ = event.read();
            self.serve[token as usize] = true;
        }
        Ok(())
    }

    fn on_timer(&mut self, _: &EpollSet) -> Result<(), E> {
        self.interrupt.rescue(&mut self.watch);
        self.serve.fill(true);
        Ok(())
    }

    fn after_events(&mut self, _: &EpollSet) -> Result<(), E> {
        let mut notify = false;
        for (i, (queue, _)) in self.queues.iter_mut().enumerate() {
            if std::mem::take(&mut self.serve[i])
                && (self.process)(i, queue, &self.mem)?
                && queue.needs_notification(&self.mem).unwrap_or(true)
            {
                notify = true;
            }
        }
        if notify {
            self.interrupt.notify_queue();
        }
        Ok(())
    }
}

impl Worker {
    /// Spawns the worker of a device whose queues are served independently:
    /// `process(index, queue, mem)` serves one queue's available chains and says whether its
    /// used ring changed; it runs for each kicked queue, and for all of them on a rescue
    /// tick. A queue error fails the device (DEVICE_NEEDS_RESET).
    pub fn spawn_queues<E, F>(
        name: &'static str,
        kind: ThreadKind,
        active: Vec<ActiveQueue>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        process: F,
    ) -> std::io::Result<Self>
    where
        E: std::error::Error + 'static,
        F: FnMut(usize, &mut Queue, &GuestMemoryMmap) -> Result<bool, E> + Send + 'static,
    {
        let queues: Vec<(Queue, EventFd)> =
            active.into_iter().map(|a| (a.queue, a.event)).collect();
        Self::spawn(name, kind, move |mut lp| {
            for (i, (_, event)) in queues.iter().enumerate() {
                if lp
                    .epoll()
                    .add(event.as_raw_fd(), i as u64, EventSet::IN)
                    .is_err()
                {
                    interrupt.fail("epoll");
                    return;
                }
            }
            lp.set_timer(rescue_period());
            let mut h = MultiQueue {
                serve: vec![false; queues.len()],
                queues,
                mem,
                interrupt,
                process,
                watch: IrqWatch::default(),
            };
            match lp.run(&mut h) {
                Ok(()) | Err(LoopError::Wait(_)) => {}
                Err(LoopError::Handler(e)) => {
                    crate::guest_warn!(device = name, error = %e, "queue error");
                    h.interrupt.fail("queue error");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::event::Timer;
    use std::time::Instant;

    #[test]
    fn without_a_rescue_period_a_worker_waits_without_timeout_and_never_rescues() {
        // The process-wide default (nothing set it in this test binary) is off.
        assert_eq!(rescue_period(), None);
        let i = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let served = Arc::new(AtomicU64::new(0));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (i2, served2) = (i.clone(), served.clone());
        let mut w = Worker::spawn("test-worker", ThreadKind::Rng, move |mut lp| {
            let kick_fd = kick.as_raw_fd();
            lp.epoll().add(kick_fd, 0, EventSet::IN).unwrap();
            lp.set_timer(rescue_period());
            assert_eq!(lp.timeout_ms(), -1, "epoll must block without a timeout");
            let mut h = MultiQueue {
                queues: vec![(Queue::new(16).unwrap(), kick)],
                mem: GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 4096)]).unwrap(),
                interrupt: i2,
                process: move |_: usize, _: &mut Queue, _: &GuestMemoryMmap| {
                    served2.fetch_add(1, Ordering::SeqCst);
                    Ok::<bool, std::io::Error>(false)
                },
                serve: vec![false],
                watch: IrqWatch::default(),
            };
            lp.run(&mut h).unwrap();
            tx.send(lp.wakeups()).unwrap();
        })
        .unwrap();
        // An interrupt left pending, unacknowledged: with no rescue it is never raised again.
        i.notify_queue();
        let _ = i.irq().read();
        std::thread::sleep(Duration::from_millis(200));
        w.stop();
        assert_eq!(rx.recv().unwrap(), 1, "only the stop woke the worker");
        assert_eq!(served.load(Ordering::SeqCst), 0);
        assert_eq!(i.resent(), 0);
    }

    #[test]
    fn rescue_tick_is_due_by_the_clock_and_raises_a_lost_interrupt() {
        let i = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut watch = IrqWatch::default();
        let mut tick = Timer::every(Duration::from_millis(40));
        assert!(!tick.fire(), "due before its period");
        let t = tick.timeout_ms();
        assert!((1..=40).contains(&t), "timeout {t}");
        i.notify_queue();
        let _ = i.irq().read();
        // However often the worker wakes in between (busy), the tick comes by the clock.
        let start = Instant::now();
        while !tick.fire() {
            assert!(start.elapsed() < Duration::from_secs(5), "tick never due");
        }
        // First tick: pending, seen once. Second: still unacknowledged, raised again.
        assert!(!i.rescue(&mut watch));
        std::thread::sleep(Duration::from_millis(tick.timeout_ms() as u64 + 1));
        assert!(tick.fire());
        assert!(i.rescue(&mut watch));
        assert_eq!(i.resent(), 1);
        assert_eq!(i.irq().read().unwrap(), 1);
        assert!(!tick.fire(), "the next tick is a period away");
    }
}
