#![no_main]
//! vsock TX parsing and RX filling on fuzzer-built guest memory: arbitrary packets
//! (ops, ports, lengths, credit) from the guest, then the muxer answers on the RX queue.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use carapace_vmm::virtio::vsock::muxer::{Muxer, VsockCounters};
use carapace_vmm::virtio::worker::EpollSet;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    // A peer for guest-initiated connections to port 1024.
    let _peer = UnixListener::bind(dir.path().join("v.sock_1024")).expect("bind peer");
    let mut mux = Muxer::new(
        3,
        path,
        listener,
        EpollSet::new().expect("epoll"),
        Arc::new(VsockCounters::default()),
    )
    .expect("muxer");
    let mem = common::guest(data);
    let mut tx = common::queue(0x1000);
    let mut rx = common::queue(0x2000);
    for _ in 0..2 {
        let _ = mux.process_tx(&mut tx, &mem);
        mux.update_interests();
        let _ = mux.fill_rx(&mut rx, &mem);
    }
});
