#![no_main]
//! virtio-mem request handling on fuzzer-built guest memory: the first 8 bytes set the
//! requested size, the rest is guest RAM (rings, requests and answers wherever the input
//! says); the hot-plug region (128 MiB at 4 GiB, anonymous, nothing touched) is shared by
//! all runs, its plugged-block bitmap is fresh per run. Afterwards the plugged size must be
//! within the region and consistent with the requested size.

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

#[path = "common.rs"]
mod common;

use carapace_vmm::memory::{self, GuestMemory};
use carapace_vmm::virtio::mem::{MemControl, request};

fn guest() -> &'static GuestMemory {
    static G: OnceLock<GuestMemory> = OnceLock::new();
    G.get_or_init(|| {
        memory::create_with_hotplug(common::MEM_SIZE as u64, false, 128 << 20)
            .expect("guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    let (requested, data) = match data.split_first_chunk::<8>() {
        Some((r, rest)) => (u64::from_le_bytes(*r) % 130, rest),
        None => (0, data),
    };
    let g = guest();
    let mut ram = vec![0u8; common::MEM_SIZE];
    let n = data.len().min(common::MEM_SIZE);
    ram[..n].copy_from_slice(&data[..n]);
    g.all
        .write_slice(&ram, GuestAddress(0))
        .expect("copy input");
    let ctl = MemControl::new(g.hotplug.clone().expect("hot-plug region"), 2 << 20);
    let _ = ctl.set_requested(requested);
    let mut q = common::queue(0);
    let _ = request::process_queue(&mut q, &g.all, &ctl);
    let s = ctl.status();
    assert!(s.plugged <= s.region);
    assert!(s.plugged <= s.requested, "{s:?}");
});
