//! Unit tests of the vsock muxer against virtio-queue's mock rings and real unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EpollEvent;

use super::muxer::*;
use super::packet::*;
use crate::virtio::event::EpollSet;

const CID: u64 = 3;
/// Ring size of the mock queues (room for a flood past [`MAX_RX_CTRL`]).
const QSIZE: u16 = 1024;

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    rxq: MockSplitQueue<'a, GuestMemoryMmap>,
    txq: MockSplitQueue<'a, GuestMemoryMmap>,
    rx: Queue,
    tx: Queue,
    rx_descs: u16,
    tx_descs: u16,
    next_buf: u64,
    rx_bufs: std::collections::HashMap<u16, (u64, u64)>,
    mux: Muxer,
    dir: tempfile::TempDir,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mux = Muxer::new(
            CID,
            path,
            listener,
            EpollSet::new().unwrap(),
            Arc::new(VsockCounters::default()),
        )
        .unwrap();
        let rxq = MockSplitQueue::create(mem, GuestAddress(0x10000), QSIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x20000), QSIZE);
        let rx = rxq.create_queue().unwrap();
        let tx = txq.create_queue().unwrap();
        Rig {
            mem,
            rxq,
            txq,
            rx,
            tx,
            rx_descs: 0,
            tx_descs: 0,
            next_buf: 0x10_0000,
            rx_bufs: Default::default(),
            mux,
            dir,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += len.next_multiple_of(0x1000);
        a
    }

    fn uds(&self) -> std::path::PathBuf {
        self.dir.path().join("v.sock")
    }

    /// Queues one guest->host packet (header and payload in separate descriptors).
    fn send(&mut self, h: Header, payload: &[u8]) {
        let ha = self.alloc(HDR_SIZE as u64);
        self.mem.write_obj(h, GuestAddress(ha)).unwrap();
        let mut descs = vec![];
        if payload.is_empty() {
            descs.push(RawDescriptor::from(Descriptor::new(
                ha,
                HDR_SIZE as u32,
                0,
                0,
            )));
        } else {
            let da = self.alloc(payload.len() as u64);
            self.mem.write_slice(payload, GuestAddress(da)).unwrap();
            descs.push(RawDescriptor::from(Descriptor::new(
                ha,
                HDR_SIZE as u32,
                VRING_DESC_F_NEXT as u16,
                self.tx_descs + 1,
            )));
            descs.push(RawDescriptor::from(Descriptor::new(
                da,
                payload.len() as u32,
                0,
                0,
            )));
        }
        let n = descs.len() as u16;
        self.txq.add_desc_chains(&descs, self.tx_descs).unwrap();
        self.tx_descs += n;
        self.mux.process_tx(&mut self.tx, self.mem).unwrap();
    }

    /// Offers `n` RX buffers (header + 4 KiB like Linux 6.1), returns their addresses.
    fn offer_rx(&mut self, n: usize, payload: u32) -> Vec<(u64, u64)> {
        let mut out = vec![];
        for _ in 0..n {
            let ha = self.alloc(HDR_SIZE as u64);
            let da = self.alloc(u64::from(payload));
            let w = VRING_DESC_F_WRITE as u16;
            let descs = [
                RawDescriptor::from(Descriptor::new(
                    ha,
                    HDR_SIZE as u32,
                    w | VRING_DESC_F_NEXT as u16,
                    self.rx_descs + 1,
                )),
                RawDescriptor::from(Descriptor::new(da, payload, w, 0)),
            ];
            self.rxq.add_desc_chains(&descs, self.rx_descs).unwrap();
            self.rx_bufs.insert(self.rx_descs, (ha, da));
            self.rx_descs += 2;
            out.push((ha, da));
        }
        out
    }

    /// Runs socket events until quiet, then fills RX; returns the packets the guest got.
    fn pump(&mut self) -> Vec<(Header, Vec<u8>)> {
        let before = self.rx.next_used();
        let mut events = vec![EpollEvent::default(); 16];
        for _ in 0..20 {
            self.mux.update_interests();
            let n = self.mux.epoll().wait(20, &mut events).unwrap();
            for e in &events[..n] {
                self.mux.handle_event(e.data(), e.event_set());
            }
            self.mux.fill_rx(&mut self.rx, self.mem).unwrap();
            if n == 0 && !self.mux.rx_pending() {
                break;
            }
        }
        let after = self.rx.next_used();
        let mut out = vec![];
        let mut i = before;
        while i != after {
            let elem = self
                .rxq
                .used()
                .ring()
                .ref_at(usize::from(i % QSIZE))
                .unwrap()
                .load();
            i = i.wrapping_add(1);
            let (ha, da) = self.rx_bufs[&(elem.id() as u16)];
            let h: Header = self.mem.read_obj(GuestAddress(ha)).unwrap();
            let mut d = vec![0u8; h.len as usize];
            self.mem.read_slice(&mut d, GuestAddress(da)).unwrap();
            assert_eq!(elem.len() as usize, HDR_SIZE + d.len());
            out.push((h, d));
        }
        out
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
}

fn hdr(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

#[test]
fn guest_initiated_stream_both_ways() {
    let m = mem();
    let mut r = Rig::new(&m);
    let host = UnixListener::bind(r.dir.path().join("v.sock_5000")).unwrap();
    r.send(hdr(1234, 5000, op::REQUEST, 0), &[]);
    let (mut s, _) = host.accept().unwrap();
    let _bufs = r.offer_rx(8, 4096);
    let got = r.pump();
    assert_eq!(got.len(), 1);
    let (h, _) = &got[0];
    assert_eq!({ h.op }, op::RESPONSE);
    assert_eq!(
        ({ h.src_port }, { h.dst_port }, { h.dst_cid }),
        (5000, 1234, CID)
    );
    assert_eq!({ h.buf_alloc }, BUF_ALLOC);

    r.send(hdr(1234, 5000, op::RW, 5), b"hello");
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");

    s.write_all(b"world").unwrap();
    let got = r.pump();
    assert_eq!(got.len(), 1);
    assert_eq!({ got[0].0.op }, op::RW);
    assert_eq!(got[0].1, b"world");

    // Host closes: the guest gets a full SHUTDOWN, then RST from the guest ends the stream.
    drop(s);
    let got = r.pump();
    assert_eq!({ got[0].0.op }, op::SHUTDOWN);
    assert_eq!({ got[0].0.flags }, SHUTDOWN_RCV | SHUTDOWN_SEND);
    r.send(hdr(1234, 5000, op::RST, 0), &[]);
    assert_eq!(r.mux.connections(), 0);
}

#[test]
fn guest_connect_to_missing_socket_is_reset() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.send(hdr(1234, 7777, op::REQUEST, 0), &[]);
    let _bufs = r.offer_rx(2, 4096);
    let got = r.pump();
    assert_eq!({ got[0].0.op }, op::RST);
    assert_eq!(r.mux.connections(), 0);
}

#[test]
fn host_initiated_connect_ok_and_refused() {
    let m = mem();
    let mut r = Rig::new(&m);
    let mut s = UnixStream::connect(r.uds()).unwrap();
    s.write_all(b"CONNECT 1024\nearly").unwrap();
    let _bufs = r.offer_rx(8, 4096);
    let got = r.pump();
    assert_eq!(got.len(), 1);
    let req = got[0].0;
    assert_eq!(
        ({ req.op }, { req.dst_port }, { req.dst_cid }),
        (op::REQUEST, 1024, CID)
    );
    let local = req.src_port;
    r.send(hdr(1024, local, op::RESPONSE, 0), &[]);
    let mut line = [0u8; 14];
    s.read_exact(&mut line).unwrap();
    assert_eq!(std::str::from_utf8(&line).unwrap(), format!("OK {local}\n"));
    // Bytes written right after the CONNECT line are stream data.
    let got = r.pump();
    assert_eq!(got[0].1, b"early");

    // A second connection to a port nobody listens on in the guest: RST closes it.
    let mut s2 = UnixStream::connect(r.uds()).unwrap();
    s2.write_all(b"CONNECT 9\n").unwrap();
    let got = r.pump();
    let req = got[0].0;
    r.send(hdr(9, req.src_port, op::RST, 0), &[]);
    s2.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rest = vec![];
    assert_eq!(s2.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn bad_connect_line_is_rejected() {
    let m = mem();
    let mut r = Rig::new(&m);
    let mut s = UnixStream::connect(r.uds()).unwrap();
    s.write_all(b"HELLO there\n").unwrap();
    let _bufs = r.offer_rx(2, 4096);
    assert!(r.pump().is_empty());
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert_eq!(resp, "ERR\n");
}

#[test]
fn respects_guest_credit() {
    let m = mem();
    let mut r = Rig::new(&m);
    let host = UnixListener::bind(r.dir.path().join("v.sock_5000")).unwrap();
    let mut req = hdr(1234, 5000, op::REQUEST, 0);
    req.buf_alloc = 6000; // guest can take 6000 bytes
    r.send(req, &[]);
    let (mut s, _) = host.accept().unwrap();
    let _bufs = r.offer_rx(8, 4096);
    r.pump(); // RESPONSE
    s.write_all(&[7u8; 10000]).unwrap();
    let got = r.pump();
    let total: usize = got.iter().map(|g| g.1.len()).sum();
    assert_eq!(total, 6000, "must stop at the guest's credit");
    // The guest consumed everything: credit update lets the rest flow.
    let mut cu = hdr(1234, 5000, op::CREDIT_UPDATE, 0);
    cu.buf_alloc = 6000;
    cu.fwd_cnt = 6000;
    r.send(cu, &[]);
    let got = r.pump();
    let total: usize = got.iter().map(|g| g.1.len()).sum();
    assert_eq!(total, 4000);
}

#[test]
fn malformed_packets_are_contained() {
    let m = mem();
    let mut r = Rig::new(&m);
    let host = UnixListener::bind(r.dir.path().join("v.sock_5000")).unwrap();
    r.send(hdr(1234, 5000, op::REQUEST, 0), &[]);
    let (_s, _) = host.accept().unwrap();
    // len larger than the payload actually present
    r.send(hdr(1234, 5000, op::RW, 1000), b"short");
    // wrong source cid: dropped silently
    let mut h = hdr(1234, 5000, op::RW, 0);
    h.src_cid = 99;
    r.send(h, &[]);
    // unknown op on an unknown stream
    r.send(hdr(1, 2, 77, 0), &[]);
    // payload larger than the maximum packet
    r.send(
        hdr(1234, 5000, op::RW, (MAX_PKT_PAYLOAD + 1) as u32),
        &[0u8; 16],
    );
    // header truncated: a 10-byte chain
    let a = r.alloc(16);
    r.txq
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(a, 10, 0, 0))],
            r.tx_descs,
        )
        .unwrap();
    r.tx_descs += 1;
    r.mux.process_tx(&mut r.tx, &m).unwrap();
    // descriptor outside guest memory
    r.txq
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                0xffff_ff00_0000,
                44,
                0,
                0,
            ))],
            r.tx_descs,
        )
        .unwrap();
    r.tx_descs += 1;
    r.mux.process_tx(&mut r.tx, &m).unwrap();
    let _bufs = r.offer_rx(16, 4096);
    let got = r.pump();
    assert!(
        got.iter()
            .all(|g| g.0.op == op::RST || g.0.op == op::RESPONSE)
    );
    assert!(got.iter().filter(|g| g.0.op == op::RST).count() >= 2);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let m = mem();
    let mut r = Rig::new(&m);
    let host = UnixListener::bind(r.dir.path().join("v.sock_5000")).unwrap();
    r.send(hdr(1234, 5000, op::REQUEST, 0), &[]);
    let (_s, _) = host.accept().unwrap(); // never reads
    let chunk = vec![1u8; MAX_PKT_PAYLOAD];
    // The socket buffer takes some; BUF_ALLOC more is buffered; beyond that: RST.
    for _ in 0..64 {
        r.send(hdr(1234, 5000, op::RW, chunk.len() as u32), &chunk);
        if r.mux.connections() == 0 {
            break;
        }
    }
    assert_eq!(
        r.mux.connections(),
        0,
        "stream must be reset after credit overrun"
    );
}

#[test]
fn a_guest_flooding_requests_without_rx_buffers_stalls_its_own_tx() {
    let m = mem();
    let mut r = Rig::new(&m);
    // 400 REQUESTs to ports nobody listens on, each answered by a RST; no RX buffers.
    let flood = 400u32;
    for i in 0..flood {
        r.send(hdr(2000 + i, 9000 + i, op::REQUEST, 0), &[]);
        assert!(
            r.mux.rx_ctrl_len() <= MAX_RX_CTRL,
            "control queue grew past its bound"
        );
    }
    assert!(r.mux.tx_blocked());
    assert_eq!(
        usize::from(r.tx.next_used()),
        MAX_RX_CTRL,
        "TX packets past the bound stay in the guest's ring"
    );
    // The guest takes the RSTs; the held-back TX packets are served in turn.
    let mut resets = 0;
    while resets < flood as usize {
        r.offer_rx(64, 4096);
        let got = r.pump();
        assert!(!got.is_empty(), "no progress after {resets} resets");
        resets += got.iter().filter(|(h, _)| h.op == op::RST).count();
        r.mux.process_tx(&mut r.tx, r.mem).unwrap();
        assert!(r.mux.rx_ctrl_len() <= MAX_RX_CTRL);
    }
    assert_eq!(u32::from(r.tx.next_used()), flood);
    assert_eq!(r.mux.connections(), 0);
}

#[test]
fn parse_connect_lines() {
    assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
    assert_eq!(parse_connect(b"CONNECT 5\r"), Ok(5));
    assert!(parse_connect(b"CONNECT").is_err());
    assert!(parse_connect(b"CONNECT -1").is_err());
    assert!(parse_connect(b"connect 1").is_err());
}
