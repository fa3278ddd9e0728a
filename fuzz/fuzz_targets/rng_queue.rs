#![no_main]
//! virtio-rng request handling on fuzzer-built guest memory.

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mem = common::guest(data);
    let mut q = common::queue(0);
    let counters = carapace_vmm::virtio::rng::RngCounters::default();
    let _ = carapace_vmm::virtio::rng::process_queue(&mut q, &mem, &counters);
});
