//! vCPU nudges: a vCPU that stayed inside KVM_RUN for a whole period is interrupted once.
//!
//! Under nested virtualization a guest's timer interrupt is lost now and then (seen in the
//! lab, KVM inside QEMU-TCG's emulated SVM: a guest stopped in the middle of its boot, both
//! vCPUs halted in `kvm_vcpu_block` for minutes, no device request outstanding). A halted
//! vCPU whose wake-up was lost stays halted for good. Interrupting KVM_RUN with a signal
//! makes the host wake the vCPU thread's CPU and KVM look at the vCPU's timers again when it
//! re-enters. A busy vCPU exits often and is never nudged; an idle one costs one exit per
//! period. On a host that is not itself a VM the default is off (`vcpu_nudge_ms`).

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

/// The nudge period for a configured `vcpu_nudge_ms` (`None`: the default for this host,
/// 1 s when `/proc/cpuinfo` says it runs under a hypervisor, else off).
pub fn period(configured: Option<u32>, cpuinfo: &str) -> Option<Duration> {
    let ms = configured.unwrap_or_else(|| {
        let nested = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
        if nested { 1000 } else { 0 }
    });
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
    fn default_period_is_on_only_under_a_hypervisor() {
        let nested = "processor\t: 0\nflags\t\t: fpu sse2 hypervisor svm\n";
        let bare = "processor\t: 0\nflags\t\t: fpu sse2 svm\n";
        assert_eq!(period(None, nested), Some(Duration::from_secs(1)));
        assert_eq!(period(None, bare), None);
        assert_eq!(period(Some(0), nested), None);
        assert_eq!(period(Some(250), bare), Some(Duration::from_millis(250)));
    }
}
