//! The event loop of the device workers: one [`EventLoop`] per worker thread, one
//! [`EventHandler`] per device.
//!
//! A device registers its file descriptors (queue notification eventfds, sockets, a tap,
//! vhost-user call eventfds) with tokens of its choice on the loop's [`EpollSet`], then
//! hands its handler to [`EventLoop::run`]. On every wake-up the loop
//!
//! 1. returns when the worker's stop eventfd ([`STOP_TOKEN`]) is among the ready events
//!    (a reset or the VMM's exit: nothing else of that batch is handled);
//! 2. calls [`EventHandler::on_timer`] when the device asked for a timer
//!    ([`EventLoop::set_timer`]) and it is due;
//! 3. calls [`EventHandler::on_event`] for each ready descriptor, in the order epoll gave;
//! 4. calls [`EventHandler::after_events`] once (a device that serves its rings after a
//!    batch of socket events, such as vsock, does it there).
//!
//! A handler error ends the loop and is returned; the device decides what it means
//! (normally DEVICE_NEEDS_RESET). Without a timer the loop blocks in `epoll_wait` with no
//! timeout: an idle device costs no wake-ups ([`EventLoop::wakeups`] counts them). The
//! only timer today is the lab-only rescue tick (`irq_rescue_ms`, off by default; see
//! [`super::worker`]). The timer is due by the clock (every period from when it was set,
//! however busy the device was in between), not "after a period of silence".
//!
//! Cloud Hypervisor's `EpollHelper` was the model (a per-device thread with a stop event
//! and a handler called per ready token); this is our own code.
//!
//! Not `event-manager` (rust-vmm, 0.4), which the workspace used to declare:
//! * 0.4 pins `vmm-sys-util` to `<= 0.14`; the VMM uses 0.15, so its `EventSet`s and
//!   `EventFd`s would be a second copy of the crate, incompatible with ours;
//! * its subscribers change their registrations only through the `EventOps` passed into a
//!   callback, while the vsock muxer opens a connection (and registers its socket) while it
//!   walks the guest's TX ring, outside any epoll callback; it would need a deferred
//!   registration queue in front of it;
//! * its per-event user data is a `u32`, the muxer's tokens are `u64` (the listener is
//!   `1 << 32`, connections above);
//! * it has no end-of-batch hook ([`EventHandler::after_events`]) and no timer: each
//!   device would carry its own deadline and loop around `run_with_timeout` again, which is
//!   what this module replaces.
//!
//! So this is a small helper over `vmm-sys-util`'s epoll, and event-manager is gone from
//! the workspace.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Token reserved for the worker's stop eventfd.
pub const STOP_TOKEN: u64 = u64::MAX;

/// Ready events taken from one `epoll_wait`; more wait for the next wake-up.
const MAX_EVENTS: usize = 64;

/// An epoll instance; clones share it (the vsock muxer keeps one to register its
/// connections, the loop waits on the same instance).
#[derive(Debug, Clone)]
pub struct EpollSet {
    epoll: Arc<Epoll>,
}

impl EpollSet {
    /// New epoll instance.
    pub fn new() -> std::io::Result<Self> {
        Ok(EpollSet {
            epoll: Arc::new(Epoll::new()?),
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

/// A periodic timer, due by the clock: every `period` from when it was armed.
#[derive(Debug, Clone)]
pub struct Timer {
    period: Duration,
    next: Instant,
}

impl Timer {
    /// A timer due every `period`, the first time `period` from now.
    pub fn every(period: Duration) -> Self {
        Timer {
            period,
            next: Instant::now() + period,
        }
    }

    /// Milliseconds until it is due, rounded up (0 when due).
    pub fn timeout_ms(&self) -> i32 {
        let left = self.next.saturating_duration_since(Instant::now());
        i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    }

    /// Whether it is due; if so, the next time is a period from now.
    pub fn fire(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next {
            return false;
        }
        self.next = now + self.period;
        true
    }
}

/// What a device does with its events. Each method may change the registrations through
/// `ep` (e.g. stop polling a tap while the guest has no RX buffer).
pub trait EventHandler {
    /// What ends the loop from inside the device.
    type Error: std::error::Error + 'static;

    /// One ready descriptor registered with `token`.
    fn on_event(&mut self, ep: &EpollSet, token: u64, events: EventSet) -> Result<(), Self::Error>;

    /// The timer is due (only with [`EventLoop::set_timer`]); called before the ready
    /// events of the same wake-up.
    fn on_timer(&mut self, ep: &EpollSet) -> Result<(), Self::Error> {
        let _ = ep;
        Ok(())
    }

    /// After every wake-up's events (also a wake-up for the timer only).
    fn after_events(&mut self, ep: &EpollSet) -> Result<(), Self::Error> {
        let _ = ep;
        Ok(())
    }
}

/// Why [`EventLoop::run`] ended other than through the stop eventfd.
#[derive(Debug, thiserror::Error)]
pub enum LoopError<E: std::error::Error + 'static> {
    /// `epoll_wait` failed.
    #[error("epoll_wait failed")]
    Wait(#[source] std::io::Error),
    /// The handler failed.
    #[error("device event handler failed")]
    Handler(#[source] E),
}

/// The event loop of one worker thread.
#[derive(Debug)]
pub struct EventLoop {
    ep: EpollSet,
    timer: Option<Timer>,
    wakeups: u64,
}

impl EventLoop {
    /// A loop over a new epoll instance, with no timer.
    pub fn new() -> std::io::Result<Self> {
        Ok(EventLoop {
            ep: EpollSet::new()?,
            timer: None,
            wakeups: 0,
        })
    }

    /// The epoll set to register the device's descriptors with (tokens other than
    /// [`STOP_TOKEN`]).
    pub fn epoll(&self) -> &EpollSet {
        &self.ep
    }

    /// Ends the loop when `fd` becomes readable (an eventfd the owner writes to).
    pub fn stop_on(&self, fd: RawFd) -> std::io::Result<()> {
        self.ep.add(fd, STOP_TOKEN, EventSet::IN)
    }

    /// Asks for [`EventHandler::on_timer`] every `period`, the first a period from now;
    /// `None`: no timer, `epoll_wait` blocks with no timeout.
    pub fn set_timer(&mut self, period: Option<Duration>) {
        self.timer = period.map(Timer::every);
    }

    /// The `epoll_wait` timeout of the next wait (ms; -1: none).
    pub fn timeout_ms(&self) -> i32 {
        self.timer.as_ref().map_or(-1, Timer::timeout_ms)
    }

    /// How many times `epoll_wait` returned.
    pub fn wakeups(&self) -> u64 {
        self.wakeups
    }

    /// Runs `handler` until the stop eventfd fires (`Ok`), `epoll_wait` fails or the
    /// handler fails.
    pub fn run<H: EventHandler>(&mut self, handler: &mut H) -> Result<(), LoopError<H::Error>> {
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        loop {
            let n = self
                .ep
                .wait(self.timeout_ms(), &mut events)
                .map_err(LoopError::Wait)?;
            self.wakeups += 1;
            let ready = &events[..n];
            if ready.iter().any(|e| e.data() == STOP_TOKEN) {
                return Ok(());
            }
            if let Some(t) = &mut self.timer
                && t.fire()
            {
                handler.on_timer(&self.ep).map_err(LoopError::Handler)?;
            }
            for e in ready {
                handler
                    .on_event(&self.ep, e.data(), e.event_set())
                    .map_err(LoopError::Handler)?;
            }
            handler.after_events(&self.ep).map_err(LoopError::Handler)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EventFd;

    /// Counts what the loop called; reads its eventfd on each event.
    #[derive(Debug, Default)]
    struct Counting {
        fd: Option<Arc<EventFd>>,
        seen: Arc<std::sync::atomic::AtomicU64>,
        events: Vec<u64>,
        timers: u64,
        batches: u64,
    }

    impl EventHandler for Counting {
        type Error = std::io::Error;
        fn on_event(&mut self, _: &EpollSet, token: u64, _: EventSet) -> std::io::Result<()> {
            if let Some(fd) = &self.fd {
                let _ = fd.read();
            }
            self.events.push(token);
            self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn on_timer(&mut self, _: &EpollSet) -> std::io::Result<()> {
            self.timers += 1;
            Ok(())
        }
        fn after_events(&mut self, _: &EpollSet) -> std::io::Result<()> {
            self.batches += 1;
            Ok(())
        }
    }

    fn efd() -> Arc<EventFd> {
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    /// Runs `lp` with `h` on a thread; `during` runs meanwhile; then stops it.
    fn run_for(mut lp: EventLoop, mut h: Counting, during: impl FnOnce()) -> (EventLoop, Counting) {
        let stop = efd();
        lp.stop_on(stop.as_raw_fd()).unwrap();
        let t = std::thread::spawn(move || {
            lp.run(&mut h).unwrap();
            (lp, h)
        });
        during();
        stop.write(1).unwrap();
        t.join().unwrap()
    }

    #[test]
    fn a_registered_fd_wakes_its_handler_with_its_token() {
        let lp = EventLoop::new().unwrap();
        let kick = efd();
        lp.epoll().add(kick.as_raw_fd(), 7, EventSet::IN).unwrap();
        let h = Counting {
            fd: Some(kick.clone()),
            ..Counting::default()
        };
        let seen = h.seen.clone();
        let (lp, h) = run_for(lp, h, || {
            kick.write(1).unwrap();
            let start = Instant::now();
            while seen.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                assert!(start.elapsed() < Duration::from_secs(5), "never woke");
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        assert_eq!(h.events, vec![7]);
        assert_eq!(h.timers, 0);
        assert!(h.batches >= 1);
        // One wake-up per kick at most, plus the stop.
        assert!(lp.wakeups() <= h.batches + 1);
    }

    #[test]
    fn without_a_timer_the_loop_blocks_with_no_wakeups() {
        let mut lp = EventLoop::new().unwrap();
        lp.set_timer(None);
        assert_eq!(lp.timeout_ms(), -1, "epoll must block without a timeout");
        let quiet = efd();
        lp.epoll().add(quiet.as_raw_fd(), 1, EventSet::IN).unwrap();
        let (lp, h) = run_for(lp, Counting::default(), || {
            std::thread::sleep(Duration::from_millis(300));
        });
        // The stop is the only wake-up in 300 ms, and it calls nothing.
        assert_eq!(lp.wakeups(), 1);
        assert_eq!((h.events.len(), h.timers, h.batches), (0, 0, 0));
    }

    #[test]
    fn a_timer_fires_by_the_clock_and_ends_each_wakeup_with_after_events() {
        let mut lp = EventLoop::new().unwrap();
        lp.set_timer(Some(Duration::from_millis(20)));
        let t = lp.timeout_ms();
        assert!((1..=20).contains(&t), "timeout {t}");
        let (lp, h) = run_for(lp, Counting::default(), || {
            std::thread::sleep(Duration::from_millis(250));
        });
        // 250 ms at 20 ms: about 12 ticks; a loaded machine may run late, never early.
        assert!((2..=13).contains(&h.timers), "timers {}", h.timers);
        assert!(h.events.is_empty());
        assert_eq!(h.batches, lp.wakeups() - 1);
        assert!(h.batches >= h.timers);
    }

    #[test]
    fn a_handler_error_ends_the_loop() {
        #[derive(Debug)]
        struct Failing;
        impl EventHandler for Failing {
            type Error = std::io::Error;
            fn on_event(&mut self, _: &EpollSet, _: u64, _: EventSet) -> std::io::Result<()> {
                Err(std::io::Error::other("broken ring"))
            }
        }
        let mut lp = EventLoop::new().unwrap();
        let kick = efd();
        lp.epoll().add(kick.as_raw_fd(), 3, EventSet::IN).unwrap();
        kick.write(1).unwrap();
        let e = lp.run(&mut Failing).unwrap_err();
        assert!(matches!(e, LoopError::Handler(_)), "{e:?}");
        assert_eq!(lp.wakeups(), 1);
    }

    #[test]
    fn clones_share_one_epoll_instance() {
        let ep = EpollSet::new().unwrap();
        let other = ep.clone();
        let fd = efd();
        other.add(fd.as_raw_fd(), 9, EventSet::IN).unwrap();
        fd.write(1).unwrap();
        let mut ev = [EpollEvent::default(); 2];
        assert_eq!(ep.wait(0, &mut ev).unwrap(), 1);
        assert_eq!(ev[0].data(), 9);
    }
}
