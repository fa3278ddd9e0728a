#![no_main]
//! The vsock muxer's control path under a hostile guest: a stream of control packets
//! (REQUEST, RESPONSE, RST, SHUTDOWN, credit update/request, empty RW) to ports the input
//! chooses, with RX buffers offered only when the input says so. Whatever the order, the
//! control packets waiting for the guest stay bounded ([`MAX_RX_CTRL`] plus one per
//! connection) and the muxer never panics.

use carapace_vmm::virtio::vsock::muxer::MAX_RX_CTRL;
use carapace_vmm::virtio::vsock::packet::{HDR_SIZE, HOST_CID, Header, TYPE_STREAM, op};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[path = "common.rs"]
mod common;

const QSIZE: u16 = 1024;
const OPS: [u16; 7] = [
    op::REQUEST,
    op::RESPONSE,
    op::RST,
    op::SHUTDOWN,
    op::RW,
    op::CREDIT_UPDATE,
    op::CREDIT_REQUEST,
];

fuzz_target!(|data: &[u8]| {
    let (mut mux, _dir, _peer) = common::vsock_muxer();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("memory");
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), QSIZE);
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), QSIZE);
    let mut tx: Queue = txq.create_queue().expect("tx queue");
    let mut rx: Queue = rxq.create_queue().expect("rx queue");
    let (mut tx_descs, mut rx_descs) = (0u16, 0u16);
    let mut buf = 0x10_0000u64;
    for step in data.chunks_exact(4).take(usize::from(QSIZE) - 8) {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: u32::from(step[1] & 0x0f) + 2000,
            dst_port: if step[2] & 0x80 != 0 {
                1024
            } else {
                u32::from(step[2]) + 5000
            },
            len: 0,
            type_: TYPE_STREAM,
            op: OPS[usize::from(step[0]) % OPS.len()],
            flags: u32::from(step[0] >> 4) & 3,
            buf_alloc: u32::from(step[3]) << 8,
            fwd_cnt: 0,
        };
        mem.write_obj(h, GuestAddress(buf)).expect("header");
        txq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                buf,
                HDR_SIZE as u32,
                0,
                0,
            ))],
            tx_descs,
        )
        .expect("tx chain");
        tx_descs += 1;
        buf += 0x100;
        let _ = mux.process_tx(&mut tx, &mem);
        // Now and then the guest offers one RX buffer (header + 256 bytes).
        if step[3] & 0x07 == 0 && rx_descs + 2 <= QSIZE {
            let w = VRING_DESC_F_WRITE as u16;
            rxq.add_desc_chains(
                &[
                    RawDescriptor::from(Descriptor::new(
                        buf,
                        HDR_SIZE as u32,
                        w | VRING_DESC_F_NEXT as u16,
                        rx_descs + 1,
                    )),
                    RawDescriptor::from(Descriptor::new(buf + 0x100, 256, w, 0)),
                ],
                rx_descs,
            )
            .expect("rx chain");
            rx_descs += 2;
            buf += 0x200;
        }
        mux.update_interests();
        let _ = mux.fill_rx(&mut rx, &mem);
        assert!(
            mux.rx_ctrl_len() <= MAX_RX_CTRL + 1 + mux.connections(),
            "control queue at {} with {} connections",
            mux.rx_ctrl_len(),
            mux.connections()
        );
    }
});
