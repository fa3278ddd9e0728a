#![no_main]
//! virtio-net TX and RX queue handling on fuzzer-built guest memory: TX chains go to an
//! in-memory sink, RX delivers frames of fuzzer-chosen sizes into the guest's chains.

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

use carapace_vmm::virtio::net::{self, NetCounters, RxOutcome};

fuzz_target!(|data: &[u8]| {
    let mem = common::guest(data);
    let counters = NetCounters::default();
    let mut tx = common::queue(0);
    let mut sink: Vec<Vec<u8>> = Vec::new();
    let mut buf = Vec::new();
    let _ = net::process_tx(&mut tx, &mem, &mut sink, &mut buf, &counters);
    assert!(sink.iter().all(|f| f.len() <= net::MAX_FRAME));
    let mut rx = common::queue(0x1000);
    let len = data.get(1).map_or(60, |&b| usize::from(b) * 16);
    let frame = vec![0x5a; len.max(net::MIN_FRAME)];
    for _ in 0..common::QUEUE_SIZE + 1 {
        match net::deliver_rx(&mut rx, &mem, &frame, &counters) {
            Ok(RxOutcome::NoBuffer) | Err(_) => break,
            Ok(_) => {}
        }
    }
});
