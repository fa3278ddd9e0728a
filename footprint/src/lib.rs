//! Memory footprint settings for Carapace's long-lived host processes (see README.md):
//! one malloc arena, and dropping the executable's code pages once they went idle.

pub mod logcap;

use std::io;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Limits glibc malloc to one arena (`mallopt(M_ARENA_MAX, 1)`). Call before any thread
/// exists. Without glibc (another libc) this does nothing.
pub fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; callers run it first thing in `main`,
    // before any thread exists, so no allocation runs concurrently.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

// SAFETY: the GNU linkers define these two symbols for every executable: the start of
// the first loaded segment and the end of `.text`. Only their addresses are used.
unsafe extern "C" {
    static __executable_start: u8;
    static etext: u8;
}

/// Drops the pages of `[__executable_start, etext)` (ELF headers, read-only data placed
/// before the code, and the code) from this process's page tables; returns the length.
pub fn drop_text_mappings() -> io::Result<usize> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .map_err(|_| io::Error::other("page size"))?;
    let start = (&raw const __executable_start) as usize & !(page - 1);
    let end = ((&raw const etext) as usize).div_ceil(page) * page;
    let len = end.saturating_sub(start);
    // SAFETY: the range covers only this executable's own read-only, never-written file
    // mappings (headers, .rodata before the code, .text; no text relocations, RELRO and
    // data lie after `etext`); MADV_DONTNEED on such private file mappings discards
    // page-table entries only, later accesses fault the same file contents back in. No
    // Rust object lives in that range.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if r == 0 {
        Ok(len)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Drops the code pages ([`drop_text_mappings`]) at each of a list of delays after the
/// last [`Trimmer::activity`], on a thread of its own.
#[derive(Debug)]
pub struct Trimmer {
    state: Mutex<Schedule>,
    wake: Condvar,
}

#[derive(Debug)]
struct Schedule {
    delays: Vec<Duration>,
    /// The last activity, and how many of the delays after it were served.
    since: Instant,
    served: usize,
    /// Drops done (for tests and logs).
    drops: u64,
}

impl Schedule {
    /// When the next drop is due, if any delay is left.
    fn next_due(&self) -> Option<Instant> {
        self.delays.get(self.served).map(|d| self.since + *d)
    }
}

impl Trimmer {
    /// A schedule of `delays` (ascending) counted from now; call [`Trimmer::run`] on a
    /// thread to serve it.
    pub fn new(delays: &[Duration]) -> Self {
        let mut delays = delays.to_vec();
        delays.sort_unstable();
        Trimmer {
            state: Mutex::new(Schedule {
                delays,
                since: Instant::now(),
                served: 0,
                drops: 0,
            }),
            wake: Condvar::new(),
        }
    }

    /// Work started: the schedule begins again from now.
    pub fn activity(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.since = Instant::now();
        s.served = 0;
        self.wake.notify_one();
    }

    /// Drops done so far.
    pub fn drops(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).drops
    }

    /// Serves the schedule forever (the thread's body): sleeps until the next delay after
    /// the last activity, drops the code pages, and sleeps until activity once all delays
    /// were served.
    pub fn run(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match s.next_due() {
                None => s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(due) => {
                    let now = Instant::now();
                    if now < due {
                        s = self
                            .wake
                            .wait_timeout(s, due - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        continue;
                    }
                    s.served += 1;
                    s.drops += 1;
                    match drop_text_mappings() {
                        Ok(len) => tracing::debug!(len, "dropped idle code pages"),
                        Err(e) => tracing::debug!(error = %e, "cannot drop idle code pages"),
                    }
                }
            }
        }
    }
}

/// The schedule the shim and the VMM use: once start-up work is probably done, once the
/// guest is surely up (seconds under emulation), and once more a minute later.
pub const SETTLE_DELAYS: [Duration; 3] = [
    Duration::from_secs(2),
    Duration::from_secs(10),
    Duration::from_secs(60),
];

static TRIMMER: OnceLock<&'static Trimmer> = OnceLock::new();

/// Starts this process's trimmer thread (`trim`) with `delays` counted from now and from
/// every later [`activity`]. Only the first call does anything.
pub fn trim_after_activity(delays: &[Duration]) -> io::Result<()> {
    if TRIMMER.get().is_some() {
        return Ok(());
    }
    let t: &'static Trimmer = Box::leak(Box::new(Trimmer::new(delays)));
    if TRIMMER.set(t).is_err() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("trim".into())
        .stack_size(64 * 1024)
        .spawn(move || t.run())
        .map(drop)
}

/// Work started in this process: the trimmer's schedule begins again (nothing without
/// [`trim_after_activity`]).
pub fn activity() {
    if let Some(t) = TRIMMER.get() {
        t.activity();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_keeps_running_after_its_pages_are_dropped() {
        let len = drop_text_mappings().expect("madvise");
        assert!(len > 4096);
        // Run code again: its pages fault back in from the file.
        let v: Vec<String> = (0..100).map(|i| format!("{i}")).collect();
        assert_eq!(v[42], "42");
        assert!(drop_text_mappings().is_ok());
    }

    fn wait_for_drops(t: &Trimmer, n: u64) {
        let start = Instant::now();
        while t.drops() < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} drops",
                t.drops()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn trimmer_drops_after_each_delay_and_starts_again_on_activity() {
        let t: &'static Trimmer = Box::leak(Box::new(Trimmer::new(&[
            Duration::from_millis(60),
            Duration::from_millis(20),
        ])));
        std::thread::spawn(move || t.run());
        wait_for_drops(t, 2);
        // All delays served: nothing more until activity.
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(t.drops(), 2);
        t.activity();
        wait_for_drops(t, 4);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(t.drops(), 4);
    }
}
