//! Unit tests of the userspace data path with virtio-queue's mock rings.

use std::cell::RefCell;

use super::hdr::*;
use super::*;
use crate::virtio::tap::TapControl;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const V1: u64 = crate::virtio::VIRTIO_F_VERSION_1;
const ALL: u64 = V1 | OFFLOADS | F_MRG_RXBUF;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fn d(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

fn tx(q: &mut Queue, m: &GuestMemoryMmap, f: u64, sink: &mut Vec<Vec<u8>>, c: &NetCounters) {
    process_tx(q, m, f, sink, &mut Vec::new(), c, BATCH).unwrap();
}

/// A TX chain: `hdr` then `frame`, one descriptor each, at `at`.
fn tx_chain(m: &GuestMemoryMmap, at: u64, h: &VnetHdr, frame: &[u8]) -> [RawDescriptor; 2] {
    m.write_slice(&h.bytes(), GuestAddress(at)).unwrap();
    m.write_slice(frame, GuestAddress(at + 0x100)).unwrap();
    [
        d(at, VNET_HDR_LEN as u32, VRING_DESC_F_NEXT, 0),
        d(at + 0x100, frame.len() as u32, 0, 0),
    ]
}

fn tso4() -> VnetHdr {
    VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 7,
    }
}

#[test]
fn tx_passes_the_checked_header_to_the_tap() {
    let m = mem();
    let frame: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let vq = MockSplitQueue::new(&m, 16);
    let mut descs = Vec::new();
    let good = tso4();
    let mut c0 = tx_chain(&m, 0x10_0000, &good, &frame);
    c0[0] = d(0x10_0000, VNET_HDR_LEN as u32, VRING_DESC_F_NEXT, 1);
    descs.extend(c0);
    vq.build_multiple_desc_chains(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    let mut sink = Vec::new();
    tx(&mut q, &m, ALL, &mut sink, &c);
    assert_eq!(sink.len(), 1);
    let sent = &sink[0];
    let h = VnetHdr::parse(sent[..VNET_HDR_LEN].try_into().unwrap());
    // Passed through, except num_buffers (meaningless on TX).
    assert_eq!(
        h,
        VnetHdr {
            num_buffers: 0,
            ..good
        }
    );
    assert_eq!(&sent[VNET_HDR_LEN..], &frame[..]);
    assert_eq!(c.tx_gso_frames.load(Ordering::Relaxed), 1);
    assert_eq!(c.tx_csum_partial.load(Ordering::Relaxed), 1);
    assert_eq!(c.tx_bytes.load(Ordering::Relaxed), 3000);
}

#[test]
fn hostile_tx_headers_are_refused_and_counted() {
    let len = 1000usize;
    let base = VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 500,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    assert!(check_tx(&base, len, ALL).is_ok());
    let bad = [
        // flags beyond NEEDS_CSUM; DATA_VALID is RX only
        VnetHdr {
            flags: 0x2,
            gso_type: 0,
            ..base
        },
        VnetHdr {
            flags: 0x81,
            ..base
        },
        // checksum field beyond the frame, and overflowing u16 sums
        VnetHdr {
            csum_start: 990,
            csum_offset: 16,
            ..base
        },
        VnetHdr {
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..base
        },
        // GSO: UDP (UFO never offered), unknown type, ECN only, zero or huge size
        VnetHdr {
            gso_type: 3,
            ..base
        },
        VnetHdr {
            gso_type: 0x7f,
            ..base
        },
        VnetHdr {
            gso_type: GSO_ECN,
            ..base
        },
        VnetHdr {
            gso_size: 0,
            ..base
        },
        VnetHdr {
            gso_size: 5000,
            ..base
        },
        // GSO without a partial checksum
        VnetHdr { flags: 0, ..base },
        // hdr_len past the frame (with and without GSO)
        VnetHdr {
            hdr_len: 1000,
            ..base
        },
        VnetHdr {
            hdr_len: 1001,
            gso_type: 0,
            gso_size: 0,
            ..base
        },
    ];
    for h in &bad {
        assert!(check_tx(h, len, ALL).is_err(), "{h:?} accepted");
    }
    // Offloads not negotiated: a header asking for them is refused.
    let plain = V1 | F_MRG_RXBUF;
    assert!(check_tx(&base, len, plain).is_err());
    assert!(
        check_tx(
            &VnetHdr {
                gso_type: 0,
                gso_size: 0,
                ..base
            },
            len,
            plain
        )
        .is_err()
    );
    assert!(check_tx(&base, len, ALL & !F_HOST_TSO4).is_err());
    let ecn = VnetHdr {
        gso_type: GSO_TCPV6 | GSO_ECN,
        ..base
    };
    assert!(check_tx(&ecn, len, ALL).is_ok());
    assert!(check_tx(&ecn, len, ALL & !F_HOST_ECN).is_err());
    assert!(check_tx(&VnetHdr::default(), len, plain).is_ok());

    // Through the ring: refused chains are returned and counted, the good one is sent.
    let m = mem();
    let frame = vec![0x55u8; len];
    let vq = MockSplitQueue::new(&m, 32);
    let mut descs = Vec::new();
    for (i, h) in bad.iter().chain([&base]).enumerate() {
        let mut c = tx_chain(&m, 0x10_0000 + (i as u64) * 0x1000, h, &frame);
        c[0] = d(
            0x10_0000 + (i as u64) * 0x1000,
            VNET_HDR_LEN as u32,
            VRING_DESC_F_NEXT,
            (2 * i + 1) as u16,
        );
        descs.extend(c);
    }
    vq.build_multiple_desc_chains(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    let mut sink = Vec::new();
    tx(&mut q, &m, ALL, &mut sink, &c);
    assert_eq!(sink.len(), 1);
    assert_eq!(c.tx_bad_hdr.load(Ordering::Relaxed), bad.len() as u64);
    assert_eq!(vq.used().idx().load(), bad.len() as u16 + 1);
}

#[test]
fn tx_bounds_chains_and_strips_headers_for_a_plain_tap() {
    struct Plain(Vec<Vec<u8>>);
    impl FrameSink for Plain {
        fn takes_header(&self) -> bool {
            false
        }
        fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
            self.0.push(data.to_vec());
            Ok(())
        }
    }
    let m = mem();
    let frame: Vec<u8> = (0..100u8).collect();
    m.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x10_0000))
        .unwrap();
    m.write_slice(&frame, GuestAddress(0x11_0000)).unwrap();
    let vq = MockSplitQueue::new(&m, 16);
    let descs = [
        d(0x10_0000, VNET_HDR_LEN as u32, VRING_DESC_F_NEXT, 1),
        d(0x11_0000, 100, 0, 0),
        // shorter than a header plus an Ethernet header
        d(0x10_0000, 20, 0, 0),
        // longer than header + MAX_FRAME
        d(0x10_0000, (VNET_HDR_LEN + MAX_FRAME + 1) as u32, 0, 0),
        // outside guest memory
        d(0xffff_0000, 200, 0, 0),
        // only a writable descriptor (nothing to send)
        d(0x10_0000, 200, VRING_DESC_F_WRITE, 0),
    ];
    vq.build_multiple_desc_chains(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    let mut sink = Plain(Vec::new());
    let n = process_tx(
        &mut q,
        &m,
        hdr::offered(false),
        &mut sink,
        &mut Vec::new(),
        &c,
        BATCH,
    )
    .unwrap();
    assert_eq!(n, 5);
    assert_eq!(sink.0, vec![frame]);
    assert_eq!(c.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(c.tx_bad.load(Ordering::Relaxed), 4);
    assert_eq!(vq.used().idx().load(), 5);
}

#[test]
fn tx_takes_at_most_a_batch() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 8);
    let descs: Vec<_> = (0..6).map(|_| d(0x10_0000, 100, 0, 0)).collect();
    vq.build_multiple_desc_chains(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    let mut sink = Vec::new();
    let n = process_tx(&mut q, &m, ALL, &mut sink, &mut Vec::new(), &c, 4).unwrap();
    assert_eq!(n, 4);
    let n = process_tx(&mut q, &m, ALL, &mut sink, &mut Vec::new(), &c, 4).unwrap();
    assert_eq!(n, 2);
}

fn read_used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let e = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
    (e.id(), e.len())
}

#[test]
fn rx_single_chain_passes_the_tap_header() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let descs = [
        d(0x10_0000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
        d(0x11_0000, 2000, VRING_DESC_F_WRITE, 0),
        // too small for the frame
        d(0x12_0000, 40, VRING_DESC_F_WRITE, 0),
        // read-only
        d(0x13_0000, 2000, 0, 0),
    ];
    vq.build_multiple_desc_chains(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    let frame: Vec<u8> = (0..60u8).collect();
    let h = VnetHdr {
        flags: FLAG_DATA_VALID,
        ..VnetHdr::default()
    };
    assert_eq!(
        deliver_rx(&mut q, &m, &h, &frame, false, &c).unwrap(),
        RxOutcome::Delivered
    );
    assert_eq!(read_used(&vq, 0).1 as usize, VNET_HDR_LEN + 60);
    let mut got = [0u8; VNET_HDR_LEN + 60];
    m.read_slice(&mut got[..8], GuestAddress(0x10_0000))
        .unwrap();
    m.read_slice(&mut got[8..], GuestAddress(0x11_0000))
        .unwrap();
    let back = VnetHdr::parse(got[..VNET_HDR_LEN].try_into().unwrap());
    assert_eq!(
        back,
        VnetHdr {
            num_buffers: 1,
            ..h
        }
    );
    assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
    for _ in 0..2 {
        assert_eq!(
            deliver_rx(&mut q, &m, &h, &frame, false, &c).unwrap(),
            RxOutcome::Dropped
        );
    }
    assert_eq!(
        deliver_rx(&mut q, &m, &h, &frame, false, &c).unwrap(),
        RxOutcome::NoBuffer
    );
    assert_eq!(vq.used().idx().load(), 3);
    assert_eq!(c.rx_dropped.load(Ordering::Relaxed), 2);
    assert_eq!(c.rx_no_buffer.load(Ordering::Relaxed), 1);
}

#[test]
fn mergeable_rx_spreads_a_gso_frame_over_chains() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 64);
    // 40 chains of 1536 bytes: room for 61440 bytes.
    let descs: Vec<_> = (0..40u64)
        .map(|i| d(0x10_0000 + i * 0x1000, 1536, VRING_DESC_F_WRITE, 0))
        .collect();
    vq.build_multiple_desc_chains(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    let frame: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
    let h = tso4();
    assert_eq!(
        deliver_rx(&mut q, &m, &h, &frame, true, &c).unwrap(),
        RxOutcome::Delivered
    );
    // ceil((12 + 20000) / 1536) = 14 chains, published at once.
    assert_eq!(vq.used().idx().load(), 14);
    let mut got = Vec::new();
    for i in 0..14u16 {
        let (id, len) = read_used(&vq, i);
        assert_eq!(id, u32::from(i));
        let mut b = vec![0u8; len as usize];
        m.read_slice(&mut b, GuestAddress(0x10_0000 + u64::from(i) * 0x1000))
            .unwrap();
        got.extend(b);
    }
    let back = VnetHdr::parse(got[..VNET_HDR_LEN].try_into().unwrap());
    assert_eq!(
        back,
        VnetHdr {
            num_buffers: 14,
            ..h
        }
    );
    assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
    assert_eq!(c.rx_buffers.load(Ordering::Relaxed), 14);
    assert_eq!(c.rx_gso_frames.load(Ordering::Relaxed), 1);
    // The next frame starts at the next chain.
    assert_eq!(
        deliver_rx(&mut q, &m, &VnetHdr::default(), &frame[..100], true, &c).unwrap(),
        RxOutcome::Delivered
    );
    assert_eq!(read_used(&vq, 14), (14, (VNET_HDR_LEN + 100) as u32));
}

#[test]
fn mergeable_rx_rolls_back_when_buffers_run_short() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let descs: Vec<_> = (0..3u64)
        .map(|i| d(0x10_0000 + i * 0x1000, 1000, VRING_DESC_F_WRITE, 0))
        .collect();
    vq.build_multiple_desc_chains(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    let frame = vec![0xabu8; 5000];
    let h = VnetHdr::default();
    assert_eq!(
        deliver_rx(&mut q, &m, &h, &frame, true, &c).unwrap(),
        RxOutcome::NoBuffer
    );
    // Nothing used, nothing consumed: the three chains are still available.
    assert_eq!(vq.used().idx().load(), 0);
    assert_eq!(q.next_avail(), 0);
    assert_eq!(c.rx_no_buffer.load(Ordering::Relaxed), 1);
    // The guest posts three more: the kept frame now fits in six.
    for i in 3..6u16 {
        vq.desc_table()
            .store(
                i,
                d(
                    0x10_0000 + u64::from(i) * 0x1000,
                    1000,
                    VRING_DESC_F_WRITE,
                    0,
                ),
            )
            .unwrap();
        vq.avail().ring().ref_at(usize::from(i)).unwrap().store(i);
    }
    vq.avail().idx().store(6);
    assert_eq!(
        deliver_rx(&mut q, &m, &h, &frame, true, &c).unwrap(),
        RxOutcome::Delivered
    );
    assert_eq!(vq.used().idx().load(), 6);
    assert_eq!(c.rx_frames.load(Ordering::Relaxed), 1);
}

#[test]
fn mergeable_rx_drops_what_can_never_fit() {
    let m = mem();
    // The whole ring of 4 tiny chains cannot hold the frame: dropped, chains returned.
    let vq = MockSplitQueue::new(&m, 4);
    let descs: Vec<_> = (0..4u64)
        .map(|i| d(0x10_0000 + i * 0x1000, 64, VRING_DESC_F_WRITE, 0))
        .collect();
    vq.build_multiple_desc_chains(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    assert_eq!(
        deliver_rx(&mut q, &m, &VnetHdr::default(), &[1u8; 1000], true, &c).unwrap(),
        RxOutcome::Dropped
    );
    assert_eq!(vq.used().idx().load(), 4);
    assert!((0..4).all(|i| read_used(&vq, i).1 == 0));
    // A chain smaller than a header, or unusable, drops the frame too.
    let vq = MockSplitQueue::new(&m, 4);
    let descs = [
        d(0x10_0000, 2000, VRING_DESC_F_WRITE, 0),
        d(0x11_0000, 8, VRING_DESC_F_WRITE, 0),
        d(0x12_0000, 2000, 0, 0),
    ];
    vq.build_multiple_desc_chains(&descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert_eq!(
        deliver_rx(&mut q, &m, &VnetHdr::default(), &[1u8; 3000], true, &c).unwrap(),
        RxOutcome::Dropped
    );
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(
        deliver_rx(&mut q, &m, &VnetHdr::default(), &[1u8; 100], true, &c).unwrap(),
        RxOutcome::Dropped
    );
    assert_eq!(vq.used().idx().load(), 3);
    // An oversized frame never touches the ring.
    assert_eq!(
        deliver_rx(
            &mut q,
            &m,
            &VnetHdr::default(),
            &vec![0u8; MAX_FRAME + 1],
            true,
            &c
        )
        .unwrap(),
        RxOutcome::Dropped
    );
    assert_eq!(vq.used().idx().load(), 3);
}

#[test]
fn rx_headers_follow_what_the_guest_accepted() {
    let gso = tso4();
    assert_eq!(check_rx(&gso, ALL), Some(gso));
    assert_eq!(check_rx(&gso, ALL & !F_GUEST_TSO4), None);
    assert_eq!(check_rx(&gso, ALL & !F_GUEST_CSUM), None);
    let valid = VnetHdr {
        flags: FLAG_DATA_VALID,
        ..VnetHdr::default()
    };
    assert_eq!(check_rx(&valid, 0), Some(VnetHdr::default()));
    assert_eq!(check_rx(&valid, ALL), Some(valid));
    let ecn = VnetHdr {
        gso_type: GSO_TCPV6 | GSO_ECN,
        ..gso
    };
    assert_eq!(check_rx(&ecn, ALL & !F_GUEST_ECN), None);
}

#[derive(Default)]
struct FakeTap(RefCell<Vec<libc::c_uint>>);

impl TapControl for FakeTap {
    fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        self.0.borrow_mut().push(flags);
        Ok(())
    }
}

#[test]
fn negotiated_features_set_the_tap_offloads() {
    let t = FakeTap::default();
    let cases = [
        (0, 0),
        (F_CSUM | F_HOST_TSO4 | F_HOST_TSO6, 0),
        (F_GUEST_TSO4 | F_GUEST_TSO6, 0),
        (F_GUEST_CSUM, libc::TUN_F_CSUM),
        (
            F_GUEST_CSUM | F_GUEST_TSO4,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4,
        ),
        (
            F_GUEST_CSUM | F_GUEST_TSO6 | F_GUEST_ECN,
            libc::TUN_F_CSUM | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
        ),
        (F_GUEST_CSUM | F_GUEST_ECN, libc::TUN_F_CSUM),
        (
            ALL,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
        ),
    ];
    for (features, want) in cases {
        assert_eq!(apply_offloads(&t, features).unwrap(), want, "{features:#x}");
    }
    assert_eq!(*t.0.borrow(), cases.iter().map(|c| c.1).collect::<Vec<_>>());
    // Offered: offloads only with a header on the tap.
    assert_eq!(hdr::offered(true) & OFFLOADS, OFFLOADS);
    assert_eq!(hdr::offered(false) & OFFLOADS, 0);
}

#[test]
fn impossible_avail_index_is_an_error() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    vq.avail().idx().store(100);
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    assert!(process_tx(&mut q, &m, ALL, &mut Vec::new(), &mut Vec::new(), &c, BATCH).is_err());
    assert!(deliver_rx(&mut q, &m, &VnetHdr::default(), &[0u8; 60], true, &c).is_err());
}

#[test]
fn descriptor_loop_is_bounded() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 4);
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after the queue size.
    let descs = [
        d(0x10_0000, 100, VRING_DESC_F_NEXT, 1),
        d(0x11_0000, 100, VRING_DESC_F_NEXT, 0),
    ];
    for (i, desc) in descs.iter().enumerate() {
        vq.desc_table().store(i as u16, *desc).unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
    let mut q: Queue = vq.create_queue().unwrap();
    let c = NetCounters::default();
    let mut sink: Vec<Vec<u8>> = Vec::new();
    process_tx(&mut q, &m, ALL, &mut sink, &mut Vec::new(), &c, BATCH).unwrap();
    assert!(sink.len() <= 1);
    assert!(sink.iter().all(|f| f.len() <= 4 * 100));
}
