//! TEST-ONLY: guest memory integrity under free page reporting churn, for the lab's
//! triple-fault hunt (`tests/lab/memstress`, tests/README.md "Where the boot CPU was").
//!
//! ```text
//! carapace-memcheck SECS CHURN_MIB HOLD_MIB
//! ```
//!
//! Fills a long-lived buffer of HOLD_MIB with a pattern, then for SECS seconds: allocates
//! CHURN_MIB, fills it with a pattern of its own, runs `/bin/true` eight times (fresh page
//! tables), checks the churn buffer and frees it (the guest reports freed memory to the
//! host, which discards it), checks the long-lived buffer, and every third round sleeps
//! 2.5 s so that reports go out. A word that changed is printed (`CORRUPT ...`: which
//! buffer, how many words, how many read zero, the first one) and the program exits 1;
//! otherwise it prints `OK rounds=N` and exits 0.

use std::time::{Duration, Instant};

fn pattern(i: usize, seed: u64) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed
}

fn fill(v: &mut [u64], seed: u64) {
    for (i, w) in v.iter_mut().enumerate() {
        // SAFETY: `w` is a valid, aligned, exclusive reference into `v`; the volatile
        // write only keeps the compiler from eliding the store.
        unsafe { std::ptr::write_volatile(w, pattern(i, seed)) }
    }
}

/// Whether every word of `v` still holds its pattern; prints the damage if not.
fn intact(name: &str, v: &[u64], seed: u64) -> bool {
    let (mut bad, mut zeros, mut first) = (0usize, 0usize, None);
    for (i, w) in v.iter().enumerate() {
        // SAFETY: `w` is a valid, aligned reference into `v`; the volatile read makes the
        // check read memory, not a value the compiler remembers.
        let got = unsafe { std::ptr::read_volatile(w) };
        if got != pattern(i, seed) {
            bad += 1;
            zeros += usize::from(got == 0);
            first.get_or_insert((i, got));
        }
    }
    match first {
        None => true,
        Some((i, got)) => {
            println!(
                "CORRUPT {name} words={bad} zeros={zeros} first_index={i} address={:p} \
                 expected={:#x} got={got:#x}",
                &v[i],
                pattern(i, seed)
            );
            false
        }
    }
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or(0))
        .collect();
    let [secs, churn_mib, hold_mib] = args[..] else {
        eprintln!("usage: carapace-memcheck SECS CHURN_MIB HOLD_MIB");
        std::process::exit(2);
    };
    let words = |mib: u64| (mib as usize) << 17; // MiB / 8 bytes
    let mut hold = vec![0u64; words(hold_mib)];
    fill(&mut hold, 7);
    let start = Instant::now();
    let (mut rounds, mut ok) = (0u64, true);
    while ok && start.elapsed() < Duration::from_secs(secs) {
        let seed = rounds.wrapping_mul(31) + 1;
        let mut churn = vec![0u64; words(churn_mib)];
        fill(&mut churn, seed);
        for _ in 0..8 {
            let _ = std::process::Command::new("/bin/true").status();
        }
        ok &= intact("churn", &churn, seed);
        drop(churn);
        ok &= intact("hold", &hold, 7);
        if rounds % 3 == 2 {
            std::thread::sleep(Duration::from_millis(2500));
        }
        rounds += 1;
    }
    println!("{} rounds={rounds}", if ok { "OK" } else { "FAILED" });
    std::process::exit(if ok { 0 } else { 1 });
}
