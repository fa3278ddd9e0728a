#![no_main]
//! virtio-balloon (free page reporting) on fuzzer-built guest memory: the first byte picks
//! the queue (inflate, deflate, reporting), the rest is guest RAM with the rings and the
//! reported ranges wherever the input says. Every range the guest names is checked before
//! it is discarded: afterwards no discard failed (nothing outside guest memory was tried)
//! and what was given back is whole pages.

use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

use carapace_vmm::virtio::balloon::{BalloonCounters, PAGE, process_queue};

fuzz_target!(|data: &[u8]| {
    let (index, data) = match data.split_first() {
        Some((i, rest)) => (usize::from(*i % 3), rest),
        None => (0, data),
    };
    let mem = common::guest(data);
    let mut q = common::queue(0);
    let c = BalloonCounters::default();
    let _ = process_queue(index, &mut q, &mem, &c);
    assert_eq!(c.discard_failures.load(Ordering::Relaxed), 0);
    assert_eq!(c.reported_bytes.load(Ordering::Relaxed) % PAGE, 0);
    assert!(
        c.reported_bytes.load(Ordering::Relaxed)
            <= c.ranges.load(Ordering::Relaxed) * common::MEM_SIZE as u64
    );
});
