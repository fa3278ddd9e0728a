#![no_main]
//! virtio-mmio register accesses in any order (the input is a list of accesses), with an
//! rng device behind the transport and guest memory the accesses may point queues into.

use carapace_vmm::virtio::mmio::MmioTransport;
use carapace_vmm::virtio::rng::Rng;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mem = common::guest(data);
    let irq = EventFd::new(libc_nonblock()).expect("eventfd");
    let mut t = MmioTransport::new(Box::new(Rng::new()), mem, irq).expect("transport");
    // Each access: [kind, offset_lo, offset_hi, len, v0, v1, v2, v3]
    for a in data.chunks_exact(8).take(256) {
        let offset = u64::from(u16::from_le_bytes([a[1], a[2]]) & 0x1fff);
        let len = [1usize, 2, 4, 8][usize::from(a[3] & 3)];
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&a[4..8]);
        if a[0] & 1 == 0 {
            t.read(offset, &mut buf[..len]);
        } else {
            t.write(offset, &buf[..len]);
        }
    }
});

fn libc_nonblock() -> i32 {
    0o4000 // O_NONBLOCK / EFD_NONBLOCK
}
