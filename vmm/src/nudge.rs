//! vCPU nudges, a lab workaround that is off unless `vcpu_nudge_ms` turns it on: a vCPU that
//! stayed inside KVM_RUN for a whole period is interrupted once.
//!
//! In the old lab (KVM inside QEMU 7.2's emulated SVM) a guest's timer interrupt was lost
//! now and then: a guest stopped mid-boot, both vCPUs halted in `kvm_vcpu_block` for
//! minutes, no device request outstanding. Interrupting KVM_RUN with a signal makes KVM look
//! at the vCPU's timers again when it re-enters. A busy vCPU exits often and is never
//! nudged; an idle one costs one exit per period. Each nudge is counted (`exits.nudged`) and
//! warned about (rate-limited): on a real host it never should be needed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When each vCPU last entered KVM_RUN (ms since `start`; `u64::MAX` while outside it).
#[derive(Debug)]
pub struct Entries {
    start: Instant,
    last: Box<[AtomicU64]>,
}

/// Marker for a vCPU that is not inside KVM_RUN.
const OUTSIDE: u64 = u64::MAX;

impl Entries {
    /// `n` vCPUs, none inside KVM_RUN yet.
    pub fn new(n: usize) -> Self {
        Entries {
            start: Instant::now(),
            last: (0..n).map(|_| AtomicU64::new(OUTSIDE)).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(OUTSIDE - 1)
    }

    /// vCPU `id` enters KVM_RUN.
    pub fn enter(&self, id: usize) {
        if let Some(e) = self.last.get(id) {
            e.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// vCPU `id` is back in the VMM.
    pub fn leave(&self, id: usize) {
        if let Some(e) = self.last.get(id) {
            e.store(OUTSIDE, Ordering::Relaxed);
        }
    }

    /// The vCPUs that entered KVM_RUN at least `period` ago and are still inside.
    pub fn stuck_for(&self, period: Duration) -> Vec<usize> {
        self.stuck_at(self.now_ms(), period)
    }

    fn stuck_at(&self, now_ms: u64, period: Duration) -> Vec<usize> {
        let period = u64::try_from(period.as_millis()).unwrap_or(OUTSIDE);
        self.last
            .iter()
            .enumerate()
            .filter_map(|(id, e)| {
                let t = e.load(Ordering::Relaxed);
                (t != OUTSIDE && now_ms.saturating_sub(t) >= period).then_some(id)
            })
            .collect()
    }
}

/// The nudge period for a configured `vcpu_nudge_ms` (0: off).
pub fn period(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(u64::from(ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_vcpus_inside_kvm_run_for_a_whole_period_are_stuck() {
        let e = Entries::new(3);
        let p = Duration::from_millis(1000);
        assert!(e.stuck_at(5000, p).is_empty(), "none entered yet");
        e.last[0].store(1000, Ordering::Relaxed);
        e.last[1].store(4500, Ordering::Relaxed);
        assert_eq!(e.stuck_at(5000, p), [0]);
        assert_eq!(e.stuck_at(5500, p), [0, 1]);
        e.leave(0);
        assert_eq!(e.stuck_at(5500, p), [1]);
        e.enter(1);
        assert!(e.stuck_for(p).is_empty(), "just entered");
        e.enter(7); // no such vCPU: ignored
    }

    #[test]
    fn nudges_are_off_unless_configured() {
        assert_eq!(period(0), None);
        assert_eq!(period(250), Some(Duration::from_millis(250)));
    }
}
