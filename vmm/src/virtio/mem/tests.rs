//! virtio-mem through virtio-queue's mock split queue: requests as a driver sends them,
//! hostile ones, the config space, the config interrupt and memory given back to the host.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::request::*;
use super::*;
use crate::memory::{self, GuestMemory};
use crate::virtio::INT_CONFIG;

const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
const BASE: u64 = 4 << 30;
const REQ_AT: u64 = 0x10_0000;
const RESP_AT: u64 = 0x20_0000;

fn setup(shared: bool) -> (GuestMemory, Arc<MemControl>) {
    let g = memory::create_with_hotplug(16 << 20, shared, 128 << 20).unwrap();
    let ctl = Arc::new(MemControl::new(g.hotplug.clone().unwrap(), 2 << 20));
    (g, ctl)
}

fn request(kind: u16, addr: u64, nb_blocks: u16) -> [u8; REQ_LEN] {
    let mut b = [0xeeu8; REQ_LEN]; // padding is ignored
    b[..2].copy_from_slice(&kind.to_le_bytes());
    b[8..16].copy_from_slice(&addr.to_le_bytes());
    b[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    b
}

/// One chain per request: the request (readable) then a 10-byte response (writable).
/// Returns, per request, (used length, response type, state).
fn run(g: &GuestMemory, ctl: &MemControl, reqs: &[(u16, u64, u16)]) -> Vec<(u32, u16, u16)> {
    let m = &g.all;
    let mut descs = Vec::new();
    for (i, &(kind, addr, nb)) in reqs.iter().enumerate() {
        let at = REQ_AT + i as u64 * 0x100;
        let resp = RESP_AT + i as u64 * 0x100;
        m.write_slice(&request(kind, addr, nb), GuestAddress(at))
            .unwrap();
        m.write_slice(&[0xff; RESP_LEN], GuestAddress(resp))
            .unwrap();
        let idx = descs.len() as u16;
        descs.push(RawDescriptor::from(Descriptor::new(
            at,
            REQ_LEN as u32,
            N,
            idx + 1,
        )));
        descs.push(RawDescriptor::from(Descriptor::new(
            resp,
            RESP_LEN as u32,
            W,
            0,
        )));
    }
    submit(g, ctl, &descs, reqs.len())
}

fn submit(
    g: &GuestMemory,
    ctl: &MemControl,
    descs: &[RawDescriptor],
    chains: usize,
) -> Vec<(u32, u16, u16)> {
    let m = &g.all;
    let vq = MockSplitQueue::new(m, 64);
    vq.add_desc_chains(descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(process_queue(&mut q, m, ctl).unwrap());
    (0..chains)
        .map(|i| {
            let used = vq.used().ring().ref_at(i).unwrap().load();
            let resp = RESP_AT + i as u64 * 0x100;
            let kind: u16 = m.read_obj(GuestAddress(resp)).unwrap();
            let state: u16 = m.read_obj(GuestAddress(resp + 8)).unwrap();
            (used.len(), kind, state)
        })
        .collect()
}

const MIB: u64 = 1 << 20;
const ACK: (u32, u16, u16) = (RESP_LEN as u32, RESP_ACK, 0);
const NACK: (u32, u16, u16) = (RESP_LEN as u32, RESP_NACK, 0);
const ERROR: (u32, u16, u16) = (RESP_LEN as u32, RESP_ERROR, 0);
const fn state(s: u16) -> (u32, u16, u16) {
    (RESP_LEN as u32, RESP_ACK, s)
}

#[test]
fn plug_unplug_state_and_unplug_all_through_the_queue() {
    let (g, ctl) = setup(false);
    ctl.set_requested(8).unwrap();
    let r = run(
        &g,
        &ctl,
        &[
            (REQ_PLUG, BASE, 2),
            (REQ_STATE, BASE, 2),
            (REQ_STATE, BASE, 3),
            (REQ_PLUG, BASE + 4 * MIB, 3), // 10 MiB > 8 requested
            (REQ_PLUG, BASE + 4 * MIB, 2),
            (REQ_UNPLUG, BASE + 2 * MIB, 1),
            (REQ_STATE, BASE + 64 * MIB, 32),
        ],
    );
    assert_eq!(
        r,
        vec![
            ACK,
            state(STATE_PLUGGED),
            state(STATE_MIXED),
            NACK,
            ACK,
            ACK,
            state(STATE_UNPLUGGED),
        ]
    );
    let s = ctl.status();
    assert_eq!((s.plugged, s.requested), (6 * MIB, 8 * MIB));
    // Config space follows.
    let c = ctl.config_bytes();
    let field = |at: usize| u64::from_le_bytes(c[at..at + 8].try_into().unwrap());
    assert_eq!(field(0), 2 * MIB);
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 0);
    assert_eq!(field(16), BASE);
    assert_eq!(field(24), 128 * MIB);
    assert_eq!(field(32), 128 * MIB);
    assert_eq!(field(40), 6 * MIB);
    assert_eq!(field(48), 8 * MIB);
    let r = run(&g, &ctl, &[(REQ_UNPLUG_ALL, 0, 0), (REQ_STATE, BASE, 64)]);
    assert_eq!(r, vec![ACK, state(STATE_UNPLUGGED)]);
    assert_eq!(ctl.status().plugged, 0);
    let m = ctl.metrics();
    assert_eq!(
        (m.plug_requests, m.unplug_requests, m.unplug_all_requests),
        (3, 1, 1)
    );
    assert_eq!((m.state_requests, m.nacks, m.errors), (4, 1, 0));
}

#[test]
fn hostile_ranges_are_answered_with_error_and_change_nothing() {
    let (g, ctl) = setup(false);
    ctl.set_requested(128).unwrap();
    let r = run(
        &g,
        &ctl,
        &[
            (REQ_PLUG, BASE + 4096, 1),           // misaligned
            (REQ_PLUG, BASE - 2 * MIB, 1),        // below the region
            (REQ_PLUG, BASE + 128 * MIB, 1),      // just past it
            (REQ_PLUG, BASE + 126 * MIB, 2),      // straddles the end
            (REQ_PLUG, BASE, 0),                  // no blocks
            (REQ_PLUG, 0, 1),                     // guest RAM
            (REQ_PLUG, !(2 * MIB - 1), u16::MAX), // wraps around
            (REQ_UNPLUG, BASE, 1),                // not plugged
            (REQ_STATE, BASE + MIB, 1),           // misaligned
            (7, BASE, 1),                         // unknown type
            (REQ_PLUG, BASE + 126 * MIB, 1),      // the last block: fine
            (REQ_PLUG, BASE + 126 * MIB, 1),      // twice
        ],
    );
    let mut want = vec![ERROR; 10];
    want.extend([ACK, ERROR]);
    assert_eq!(r, want);
    assert_eq!(ctl.status().plugged, 2 * MIB);
    assert_eq!(ctl.metrics().errors, 11);
}

#[test]
fn malformed_chains_do_not_panic() {
    let (g, ctl) = setup(false);
    ctl.set_requested(128).unwrap();
    let m = &g.all;
    m.write_slice(&request(REQ_PLUG, BASE, 1), GuestAddress(REQ_AT))
        .unwrap();
    let d = |a, l, f, n| RawDescriptor::from(Descriptor::new(a, l, f, n));
    let descs = [
        // 0: request too short (16 of 24 bytes), room for the answer: ERROR.
        d(REQ_AT, 16, N, 1),
        d(RESP_AT, RESP_LEN as u32, W, 0),
        // 1: a valid PLUG with no room for the answer: returned unanswered, not executed.
        d(REQ_AT, REQ_LEN as u32, N, 3),
        d(RESP_AT + 0x100, 4, W, 0),
        // 2: the answer buffer outside guest memory.
        d(REQ_AT, REQ_LEN as u32, N, 5),
        d(0x7_0000_0000, RESP_LEN as u32, W, 0),
        // 3: the request outside guest memory: ERROR.
        d(0x7_0000_0000, REQ_LEN as u32, N, 7),
        d(RESP_AT + 0x300, RESP_LEN as u32, W, 0),
        // 4: a 4 GiB request length: virtio-queue stops walking the chain at it, so
        // there is no room for an answer either: returned unanswered.
        d(REQ_AT, u32::MAX, N, 9),
        d(RESP_AT + 0x400, RESP_LEN as u32, W, 0),
    ];
    let vq = MockSplitQueue::new(m, 64);
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(process_queue(&mut q, m, &ctl).unwrap());
    let used = |i| vq.used().ring().ref_at(i).unwrap().load().len();
    let kind = |i: u64| {
        m.read_obj::<u16>(GuestAddress(RESP_AT + i * 0x100))
            .unwrap()
    };
    assert_eq!(vq.used().idx().load(), 5);
    assert_eq!((used(0), kind(0)), (RESP_LEN as u32, RESP_ERROR));
    assert_eq!(used(1), 0);
    assert_eq!(used(2), 0);
    assert_eq!((used(3), kind(3)), (RESP_LEN as u32, RESP_ERROR));
    assert_eq!(used(4), 0);
    assert_eq!(
        ctl.status().plugged,
        0,
        "unanswerable requests are not executed"
    );
    assert_eq!(ctl.metrics().malformed, 5);
}

#[test]
fn requested_size_is_checked_and_a_change_raises_a_config_interrupt() {
    let (g, ctl) = setup(false);
    assert_eq!(
        ctl.set_requested(3),
        Err(SizeError::NotBlockMultiple {
            requested_mib: 3,
            block_mib: 2
        })
    );
    assert_eq!(
        ctl.set_requested(130),
        Err(SizeError::TooLarge {
            requested_mib: 130,
            region_mib: 128
        })
    );
    // Before a driver runs: only the config space changes.
    let gen0 = ctl.generation();
    ctl.set_requested(64).unwrap();
    assert_ne!(ctl.generation(), gen0);
    let mut dev = VirtioMem::new(ctl.clone());
    assert_eq!(dev.device_type(), 24);
    assert_eq!(&dev.config_bytes()[48..56], &(64 * MIB).to_le_bytes());

    // A running device: the change raises a config interrupt (once per change).
    let vq = MockSplitQueue::new(&g.all, 64);
    let queue: Queue = vq.create_queue().unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick_fd = kick.try_clone().unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    dev.activate(
        g.all.clone(),
        VIRTIO_F_VERSION_1,
        vec![ActiveQueue { queue, event: kick }],
        irq.clone(),
    )
    .unwrap();
    assert!(irq.irq().read().is_err(), "no interrupt yet");
    let s = ctl.set_requested(32).unwrap();
    assert_eq!(s.requested, 32 * MIB);
    assert_eq!(irq.irq().read().unwrap(), 1);
    assert_eq!(irq.status() & INT_CONFIG, INT_CONFIG);
    ctl.set_requested(32).unwrap();
    assert!(irq.irq().read().is_err(), "no change, no interrupt");
    assert_eq!(ctl.metrics().config_changes, 1);

    // The worker serves the queue when kicked.
    let at = GuestAddress(REQ_AT);
    g.all.write_slice(&request(REQ_PLUG, BASE, 16), at).unwrap();
    vq.add_desc_chains(
        &[
            RawDescriptor::from(Descriptor::new(REQ_AT, REQ_LEN as u32, N, 1)),
            RawDescriptor::from(Descriptor::new(RESP_AT, RESP_LEN as u32, W, 0)),
        ],
        0,
    )
    .unwrap();
    assert!(kick_fd.as_raw_fd() >= 0);
    kick_fd.write(1).unwrap();
    let start = Instant::now();
    while vq.used().idx().load() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "worker never answered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(ctl.status().plugged, 32 * MIB);
    // Reset keeps what is plugged (a new driver unplugs all first) and drops the interrupt.
    dev.reset();
    ctl.set_requested(0).unwrap();
    let _ = irq.irq().read();
    assert_eq!(ctl.status().plugged, 32 * MIB);
}

fn unplug_gives_memory_back(shared: bool) {
    let (g, ctl) = setup(shared);
    let h = g.hotplug.clone().unwrap();
    let host = h.host_address(0).unwrap();
    ctl.set_requested(32).unwrap();
    assert_eq!(run(&g, &ctl, &[(REQ_PLUG, BASE, 16)]), vec![ACK]);
    // The guest uses its 32 MiB.
    for off in (0..32 * MIB).step_by(4096) {
        g.all
            .write_obj(1u8, GuestAddress(BASE).unchecked_add(off))
            .unwrap();
    }
    let full = memory::tests::resident_bytes(host, h.size());
    assert!(full >= 32 * MIB, "{full}");
    assert_eq!(run(&g, &ctl, &[(REQ_UNPLUG, BASE, 8)]), vec![ACK]);
    let half = memory::tests::resident_bytes(host, h.size());
    assert!(half <= full - 16 * MIB, "{full} -> {half}");
    assert_eq!(
        g.all.read_obj::<u8>(GuestAddress(BASE)).unwrap(),
        0,
        "unplugged memory is gone"
    );
    // A guest that touched blocks it never plugged loses them on UNPLUG_ALL as well.
    g.all
        .write_obj(1u8, GuestAddress(BASE + 100 * MIB))
        .unwrap();
    assert_eq!(run(&g, &ctl, &[(REQ_UNPLUG_ALL, 0, 0)]), vec![ACK]);
    assert_eq!(memory::tests::resident_bytes(host, h.size()), 0);
    if let Some(f) = h.file() {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(f.metadata().unwrap().blocks(), 0);
    }
    let m = ctl.metrics();
    assert_eq!(m.discarded_bytes, 16 * MIB + 128 * MIB);
    assert_eq!(m.discard_failures, 0);
}

#[test]
fn unplugged_anonymous_memory_goes_back_to_the_host() {
    unplug_gives_memory_back(false);
}

#[test]
fn unplugged_shared_memory_goes_back_to_the_host() {
    unplug_gives_memory_back(true);
}
