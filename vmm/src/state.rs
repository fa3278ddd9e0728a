//! State shared by vCPU threads, devices, the control API and the main thread: how and when
//! the VM ends, the boot-done time, pause, and exit counters.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::exit::ExitReason;

/// Value the guest writes to the marker port when it finished booting.
pub const MARKER_BOOT_DONE: u8 = 123;
/// Value the guest writes before `reboot(RB_POWER_OFF)`: the following reset means power-off.
pub const MARKER_POWER_OFF: u8 = 124;
/// Value the guest writes before `reboot(RB_AUTOBOOT)`: the following reset means reboot.
pub const MARKER_REBOOT: u8 = 125;

const INTENT_NONE: u8 = 0;
const INTENT_POWER_OFF: u8 = 1;
const INTENT_REBOOT: u8 = 2;

/// VM exit counters by kind.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// KVM_EXIT_IO (in).
    pub io_in: AtomicU64,
    /// KVM_EXIT_IO (out).
    pub io_out: AtomicU64,
    /// KVM_EXIT_MMIO reads.
    pub mmio_read: AtomicU64,
    /// KVM_EXIT_MMIO writes.
    pub mmio_write: AtomicU64,
    /// KVM_EXIT_HLT.
    pub hlt: AtomicU64,
    /// KVM_RUN interrupted (EINTR / KVM_EXIT_INTR).
    pub interrupted: AtomicU64,
    /// Accesses to ports or addresses no device claims.
    pub unhandled: AtomicU64,
    /// Any other exit.
    pub other: AtomicU64,
    /// vCPUs interrupted after a whole nudge period inside KVM_RUN (see `nudge.rs`).
    pub nudged: AtomicU64,
}

/// Snapshot of [`ExitCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExitCountersSnapshot {
    /// KVM_EXIT_IO (in).
    pub io_in: u64,
    /// KVM_EXIT_IO (out).
    pub io_out: u64,
    /// KVM_EXIT_MMIO reads.
    pub mmio_read: u64,
    /// KVM_EXIT_MMIO writes.
    pub mmio_write: u64,
    /// KVM_EXIT_HLT.
    pub hlt: u64,
    /// KVM_RUN interrupted.
    pub interrupted: u64,
    /// Unclaimed accesses.
    pub unhandled: u64,
    /// Others.
    pub other: u64,
    /// Nudges.
    pub nudged: u64,
}

impl ExitCounters {
    /// Increments a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Snapshot.
    pub fn snapshot(&self) -> ExitCountersSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCountersSnapshot {
            io_in: l(&self.io_in),
            io_out: l(&self.io_out),
            mmio_read: l(&self.mmio_read),
            mmio_write: l(&self.mmio_write),
            hlt: l(&self.hlt),
            interrupted: l(&self.interrupted),
            unhandled: l(&self.unhandled),
            other: l(&self.other),
            nudged: l(&self.nudged),
        }
    }
}

/// Shared VM state.
#[derive(Debug)]
pub struct VmState {
    /// When the VMM process started (or the VM object was created, whichever the caller chose).
    pub start: Instant,
    boot_done: OnceLock<Duration>,
    intent: AtomicU8,
    shutdown_requested: AtomicBool,
    exit: Mutex<Option<ExitReason>>,
    exit_cv: Condvar,
    paused: Mutex<bool>,
    pause_cv: Condvar,
    stopping: AtomicBool,
    running: Mutex<usize>,
    running_cv: Condvar,
    /// Exit counters.
    pub exits: ExitCounters,
    /// Test-only hooks into the vCPU loop.
    #[cfg(test)]
    pub(crate) test_hooks: TestHooks,
}

/// A callback a test runs on a vCPU thread.
#[cfg(test)]
type Hook = std::sync::Arc<dyn Fn(usize) + Send + Sync>;

/// Points in the vCPU loop where a unit test can hold a vCPU (to widen a race window).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct TestHooks {
    before_run: Mutex<Option<Hook>>,
}

#[cfg(test)]
impl std::fmt::Debug for TestHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHooks")
    }
}

#[cfg(test)]
impl TestHooks {
    /// Runs `hook(vcpu)` after the vCPU looked at the pause and stop flags and before it
    /// enters KVM_RUN.
    pub(crate) fn set_before_run(&self, hook: impl Fn(usize) + Send + Sync + 'static) {
        *self.before_run.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::sync::Arc::new(hook));
    }

    pub(crate) fn before_run(&self, vcpu: usize) {
        let hook = self
            .before_run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(h) = hook {
            h(vcpu);
        }
    }
}

impl VmState {
    /// New state; `start` is the reference for the boot-done time.
    pub fn new(start: Instant) -> Self {
        VmState {
            start,
            boot_done: OnceLock::new(),
            intent: AtomicU8::new(INTENT_NONE),
            shutdown_requested: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_cv: Condvar::new(),
            paused: Mutex::new(false),
            pause_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            running: Mutex::new(0),
            running_cv: Condvar::new(),
            exits: ExitCounters::default(),
            #[cfg(test)]
            test_hooks: TestHooks::default(),
        }
    }

    /// Handles a byte the guest wrote to the marker port.
    pub fn marker_write(&self, value: u8) {
        match value {
            MARKER_BOOT_DONE => {
                let t = self.start.elapsed();
                if self.boot_done.set(t).is_ok() {
                    tracing::info!(
                        boot_done_ms = t.as_secs_f64() * 1000.0,
                        "guest reported boot done"
                    );
                }
            }
            MARKER_POWER_OFF => self.intent.store(INTENT_POWER_OFF, Ordering::SeqCst),
            MARKER_REBOOT => self.intent.store(INTENT_REBOOT, Ordering::SeqCst),
            other => tracing::debug!(value = other, "ignored unknown marker value"),
        }
    }

    /// Time from start to the guest's boot-done marker, if it was written.
    pub fn boot_done(&self) -> Option<Duration> {
        self.boot_done.get().copied()
    }

    /// The guest reset the machine (i8042 or triple fault).
    pub fn guest_reset(&self, triple_fault: bool) {
        if self.shutdown_requested() && !triple_fault {
            self.request_exit(ExitReason::PowerOff);
            return;
        }
        let reason = match self.intent.load(Ordering::SeqCst) {
            INTENT_POWER_OFF => ExitReason::PowerOff,
            INTENT_REBOOT => ExitReason::Reboot,
            _ if triple_fault => ExitReason::TripleFault,
            _ => ExitReason::Reboot,
        };
        self.request_exit(reason);
    }

    /// The host asked the guest to shut down (API `shutdown`): from now on a guest reset or
    /// halt means "powered off", whatever the guest announced on the marker port.
    pub fn request_shutdown(&self) {
        self.shutdown_requested.store(true, Ordering::SeqCst);
    }

    /// Whether [`Self::request_shutdown`] was called.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown_requested.load(Ordering::SeqCst)
    }

    /// Ends the VM with `reason` (the first reason wins).
    pub fn request_exit(&self, reason: ExitReason) {
        let mut e = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            tracing::info!(%reason, "VM is stopping");
            *e = Some(reason);
            self.stopping.store(true, Ordering::SeqCst);
            self.exit_cv.notify_all();
        }
        drop(e);
        // Wake paused vCPUs so they can observe the stop.
        let _p = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        self.pause_cv.notify_all();
    }

    /// Whether an exit was requested.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Waits for the exit reason, up to `timeout` (forever when `None`).
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut e = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = e.clone() {
                return Some(r);
            }
            match deadline {
                None => e = self.exit_cv.wait(e).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    e = self
                        .exit_cv
                        .wait_timeout(e, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Sets the pause flag (vCPUs must be kicked out of KVM_RUN separately).
    pub fn set_paused(&self, paused: bool) {
        let mut p = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        *p = paused;
        self.pause_cv.notify_all();
    }

    /// Whether the VM is paused.
    pub fn paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a vCPU as (about to be) running guest code until the guard drops. A vCPU takes
    /// the guard *before* it looks at the pause flag, so once [`Self::wait_none_running`]
    /// saw none, every vCPU that enters KVM_RUN later has seen the flag.
    pub fn vcpu_running(&self) -> RunningGuard<'_> {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        RunningGuard(self)
    }

    /// vCPUs currently between "about to enter KVM_RUN" and "back in the VMM".
    pub fn running_vcpus(&self) -> usize {
        *self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no vCPU runs guest code, up to `timeout`; whether that happened.
    pub fn wait_none_running(&self, timeout: Duration) -> bool {
        let r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let (r, _) = self
            .running_cv
            .wait_timeout_while(r, timeout, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *r == 0
    }

    /// A vCPU executed HLT with interrupts off (KVM_EXIT_HLT): the guest is dead.
    pub fn guest_halted(&self) {
        if self.intent.load(Ordering::SeqCst) == INTENT_POWER_OFF || self.shutdown_requested() {
            self.request_exit(ExitReason::PowerOff);
        } else {
            self.request_exit(ExitReason::GuestCrash("vCPU halted (KVM_EXIT_HLT)".into()));
        }
    }

    /// Called by a vCPU thread between runs: blocks while paused (returns early on stop).
    pub fn wait_while_paused(&self) {
        let mut p = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        while *p && !self.stopping() {
            p = self.pause_cv.wait(p).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// See [`VmState::vcpu_running`].
#[derive(Debug)]
pub struct RunningGuard<'a>(&'a VmState);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut n = self.0.running.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.running_cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_meaning_follows_intent() {
        let s = VmState::new(Instant::now());
        s.guest_reset(false);
        assert_eq!(s.wait_exit(None), Some(ExitReason::Reboot));
        let s = VmState::new(Instant::now());
        s.guest_reset(true);
        assert_eq!(s.wait_exit(None), Some(ExitReason::TripleFault));
        let s = VmState::new(Instant::now());
        s.marker_write(MARKER_POWER_OFF);
        s.guest_reset(true);
        assert_eq!(s.wait_exit(None), Some(ExitReason::PowerOff));
        assert_eq!(s.wait_exit(None).unwrap().code(), 0);
    }

    #[test]
    fn boot_done_recorded_once() {
        let s = VmState::new(Instant::now());
        assert!(s.boot_done().is_none());
        s.marker_write(MARKER_BOOT_DONE);
        let t = s.boot_done().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        s.marker_write(MARKER_BOOT_DONE);
        assert_eq!(s.boot_done(), Some(t));
        assert_eq!(s.wait_exit(Some(Duration::from_millis(1))), None);
    }
}
