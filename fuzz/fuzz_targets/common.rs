#![allow(dead_code)]
// Shared by the queue targets: the fuzz input *is* guest memory.
//
// Layout of the 1 MiB guest: the input is copied from address 0 (descriptor tables, rings
// and buffers are wherever the input says); queues of size 16 are placed at fixed
// addresses inside it, so every descriptor, index and length comes from the fuzzer.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use carapace_vmm::virtio::vsock::muxer::{Muxer, VsockCounters};
use carapace_vmm::virtio::worker::EpollSet;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 1 << 20;
pub const QUEUE_SIZE: u16 = 16;

pub fn guest(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("copy input");
    mem
}

/// A ready queue with its rings at `base` (descriptors), `base+0x100` (avail),
/// `base+0x200` (used).
pub fn queue(base: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
    q.set_ready(true);
    q
}

/// A vsock muxer for guest CID 3 on a fresh socket, with a host peer listening on port
/// 1024 (so guest REQUESTs there open real connections). Keep the returned values alive.
pub fn vsock_muxer() -> (Muxer, tempfile::TempDir, UnixListener) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let peer = UnixListener::bind(dir.path().join("v.sock_1024")).expect("bind peer");
    let mux = Muxer::new(
        3,
        path,
        listener,
        EpollSet::new().expect("epoll"),
        Arc::new(VsockCounters::default()),
    )
    .expect("muxer");
    (mux, dir, peer)
}
