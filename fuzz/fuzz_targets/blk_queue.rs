#![no_main]
//! virtio-blk request handling (read, write, flush, get-id, unknown) on fuzzer-built guest
//! memory, against a small writable image.

use std::sync::{Arc, OnceLock};

use carapace_vmm::virtio::blk::BlockBackend;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn image() -> Arc<std::fs::File> {
    static IMG: OnceLock<Arc<std::fs::File>> = OnceLock::new();
    IMG.get_or_init(|| {
        let f = tempfile::tempfile().expect("image");
        f.set_len(64 * 512).expect("size");
        Arc::new(f)
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let mem = common::guest(data);
    let mut q = common::queue(0);
    let be = BlockBackend {
        file: image(),
        read_only: data.first().is_some_and(|b| b & 1 == 1),
        capacity_sectors: 64,
        id: *b"fuzz-disk\0\0\0\0\0\0\0\0\0\0\0",
        counters: Arc::default(),
    };
    let _ = be.process_queue(&mut q, &mem);
});
