#![no_main]
//! vsock TX parsing and RX filling on fuzzer-built guest memory: arbitrary packets
//! (ops, ports, lengths, credit) from the guest, then the muxer answers on the RX queue.

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (mut mux, _dir, _peer) = common::vsock_muxer();
    let mem = common::guest(data);
    let mut tx = common::queue(0x1000);
    let mut rx = common::queue(0x2000);
    for _ in 0..2 {
        let _ = mux.process_tx(&mut tx, &mem);
        mux.update_interests();
        let _ = mux.fill_rx(&mut rx, &mem);
    }
});
