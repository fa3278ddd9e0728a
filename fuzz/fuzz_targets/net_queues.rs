#![no_main]
//! virtio-net TX and RX queue handling on fuzzer-built guest memory: TX chains (with
//! fuzzer-made virtio-net headers) go to an in-memory sink under fuzzer-chosen negotiated
//! features, RX delivers frames of fuzzer-chosen sizes and headers into the guest's chains,
//! with and without mergeable buffers.

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

use carapace_vmm::virtio::net::hdr::{self, VnetHdr};
use carapace_vmm::virtio::net::{self, NetCounters, RxOutcome};

fuzz_target!(|data: &[u8]| {
    let mem = common::guest(data);
    let counters = NetCounters::default();
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    // Negotiated features: a fuzzer-chosen subset of what the device offers.
    let mask = u64::from_le_bytes([byte(2), byte(3), 0, 0, 0, 0, 0, 0]) | (1 << 32);
    let features = hdr::offered(true) & mask;
    let mut tx = common::queue(0);
    let mut sink: Vec<Vec<u8>> = Vec::new();
    let mut buf = Vec::new();
    let _ = net::process_tx(&mut tx, &mem, features, &mut sink, &mut buf, &counters, 64);
    for f in &sink {
        // Every frame that reached the "tap" is bounded and carries a header that passes
        // the checks again.
        assert!(f.len() <= 12 + net::MAX_FRAME && f.len() >= 12 + net::MIN_FRAME);
        let h = VnetHdr::parse(f[..12].try_into().unwrap());
        assert!(hdr::check_tx(&h, f.len() - 12, features).is_ok());
        assert_eq!(h.num_buffers, 0);
    }
    let mut rx = common::queue(0x1000);
    let len = usize::from(byte(1)) * 64;
    let frame = vec![0x5a; len.max(net::MIN_FRAME)];
    let raw: [u8; 12] = std::array::from_fn(|i| byte(4 + i));
    let mergeable = features & hdr::F_MRG_RXBUF != 0;
    if let Some(h) = hdr::check_rx(&VnetHdr::parse(&raw), features) {
        for _ in 0..common::QUEUE_SIZE + 1 {
            match net::deliver_rx(&mut rx, &mem, &h, &frame, mergeable, &counters) {
                Ok(RxOutcome::NoBuffer) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
});
