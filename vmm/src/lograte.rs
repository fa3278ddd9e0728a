//! Rate-limited log lines, for events a guest can cause as often as it likes.
//!
//! A guest must not be able to fill the host's logs: a call site that logs on a guest's
//! behalf keeps a [`LogLimit`] and logs at most one line per period, saying how many it
//! held back. What it counts stays exact in the metrics.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// How often one call site may log on a guest's behalf.
pub const GUEST_LOG_PERIOD: Duration = Duration::from_secs(10);

/// `tracing::warn!` for a line a guest can cause: at most one per [`GUEST_LOG_PERIOD`] from
/// this call site, with `held_back` saying how many were dropped since the previous one.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::lograte::LogLimit = $crate::lograte::LogLimit::new();
        if let Some(held_back) = LIMIT.check($crate::lograte::GUEST_LOG_PERIOD) {
            tracing::warn!(held_back, $($arg)+);
        }
    }};
}

/// One call site's budget: a line per period.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// When the next line may be logged (ms since the process's first use); 0: at once.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// A budget whose first line is allowed at once.
    pub const fn new() -> Self {
        LogLimit {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held back since the
    /// previous one; `None` (and one more held back) otherwise.
    pub fn check(&self, every: Duration) -> Option<u64> {
        let now = now_ms();
        let next = self.next_ms.load(Ordering::Relaxed);
        let period = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(period),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_counting_the_rest() {
        // A period far longer than the loop takes even on a loaded machine.
        let period = Duration::from_secs(2);
        let l = LogLimit::new();
        assert_eq!(l.check(period), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.check(period), None);
        }
        std::thread::sleep(period + Duration::from_millis(100));
        assert_eq!(l.check(period), Some(1000));
        assert_eq!(l.check(period), None);
    }
}
