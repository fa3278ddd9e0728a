//! Hybrid vsock backend: guest vsock streams <-> host unix sockets.
//!
//! - Host-initiated: a host process connects to the device's unix socket and writes
//!   `CONNECT <port>\n`; we send the guest a REQUEST from a fresh host port and, when the guest
//!   answers RESPONSE, write `OK <host port>\n` back; from then on the unix stream is the vsock
//!   stream. A guest RST (nobody listening) closes the unix stream.
//! - Guest-initiated: a REQUEST to host port P connects to the unix socket `<uds>_<P>`;
//!   RESPONSE on success, RST otherwise.
//! - Flow control: we advertise [`BUF_ALLOC`] bytes per stream and never buffer more than that
//!   from the guest (a guest that overruns its credit gets RST); we never send the guest more
//!   than its advertised credit.
//!
//! All guest fields (ports, lengths, ops, flags) are validated; bad packets are counted and
//! answered with RST or dropped.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::packet::*;
use crate::virtio::event::EpollSet;

/// Receive buffer we advertise (and bound) per stream.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Maximum simultaneous streams (host- and guest-initiated).
pub const MAX_CONNS: usize = 1024;
/// Maximum length of the `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First host port handed out for host-initiated streams.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Epoll token of the listening socket.
pub const LISTENER_TOKEN: u64 = 1 << 32;
const FIRST_CONN_TOKEN: u64 = (1 << 32) + 1;

/// Counters.
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Packets read from the TX queue.
    pub tx_packets: AtomicU64,
    /// Payload bytes from the guest.
    pub tx_bytes: AtomicU64,
    /// Packets written to the RX queue.
    pub rx_packets: AtomicU64,
    /// Payload bytes to the guest.
    pub rx_bytes: AtomicU64,
    /// Malformed or unexpected packets from the guest.
    pub bad_packets: AtomicU64,
    /// Connections opened (both directions).
    pub conns_opened: AtomicU64,
    /// Connections refused or reset.
    pub conns_reset: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum ConnState {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// We sent SHUTDOWN to the guest after the host closed; waiting for RST.
    Closing,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    local_port: u32,
    peer_port: u32,
    state: ConnState,
    /// Data from the guest waiting to be written to the host socket.
    to_host: VecDeque<u8>,
    /// Bytes written to the host socket (our fwd_cnt).
    fwd_cnt: Wrapping<u32>,
    /// fwd_cnt last reported to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Guest said it sends no more data: shut the host socket's write side after draining.
    peer_shut_send: bool,
    /// Guest said it receives no more data.
    peer_shut_rcv: bool,
    /// Host closed its side (EOF).
    host_eof: bool,
    /// Currently in the readable round-robin.
    readable: bool,
    interest: Option<EventSet>,
    /// Removed from epoll after a hang-up.
    detached: bool,
}

impl Conn {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Conn {
            stream,
            local_port,
            peer_port,
            state,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shut_send: false,
            peer_shut_rcv: false,
            host_eof: false,
            readable: false,
            interest: None,
            detached: false,
        }
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.peer_credit() > 0
    }

    fn desired_interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.wants_read() && !self.readable {
            e |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !self.to_host.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }
}

#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Control packets (RST, RESPONSE, credit updates, host REQUESTs) queued for the guest at
/// most before TX is held back ([`Muxer::tx_blocked`]). A TX packet adds at most one, and
/// host-side events one per connection, so the queue stays within this plus the number of
/// connections.
pub const MAX_RX_CTRL: usize = 256;

/// The connection multiplexer of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: EpollSet,
    conns: HashMap<u64, Conn>,
    /// (local_port, peer_port) -> token.
    by_ports: HashMap<(u32, u32), u64>,
    pending: HashMap<u64, Pending>,
    rx_ctrl: VecDeque<Header>,
    readable: VecDeque<u64>,
    next_token: u64,
    next_local_port: u32,
    buf: Vec<u8>,
    counters: std::sync::Arc<VsockCounters>,
}

/// Errors from the muxer that stop the device (guest memory or queue corruption).
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// A queue operation failed.
    #[error("virtio queue error")]
    Queue(#[from] virtio_queue::Error),
    /// epoll failed.
    #[error("epoll error")]
    Epoll(#[source] std::io::Error),
}

impl Muxer {
    /// New muxer; `listener` is the device's unix socket (non-blocking is set here).
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        epoll: EpollSet,
        counters: std::sync::Arc<VsockCounters>,
    ) -> Result<Self, MuxerError> {
        listener.set_nonblocking(true).map_err(MuxerError::Epoll)?;
        epoll
            .add(listener.as_raw_fd(), LISTENER_TOKEN, EventSet::IN)
            .map_err(MuxerError::Epoll)?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            epoll,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            pending: HashMap::new(),
            rx_ctrl: VecDeque::new(),
            readable: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            buf: vec![0u8; MAX_PKT_PAYLOAD],
            counters,
        })
    }

    /// The epoll set (the worker waits on it).
    pub fn epoll(&self) -> &EpollSet {
        &self.epoll
    }

    /// Number of open streams (established or connecting).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.by_ports.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    fn header(&self, c: &Conn, op: u16, flags: u32, len: u32) -> Header {
        header(self.guest_cid, c, op, flags, len)
    }

    fn rst_for(&self, h: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn close(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            if !c.detached {
                let _ = self.epoll.remove(c.stream.as_raw_fd());
            }
            self.by_ports.remove(&(c.local_port, c.peer_port));
        }
        self.readable.retain(|t| *t != token);
    }

    fn reset_conn(&mut self, token: u64) {
        if let Some(c) = self.conns.get(&token) {
            let h = self.header(c, op::RST, 0, 0);
            self.rx_ctrl.push_back(h);
            bump(&self.counters.conns_reset, 1);
        }
        self.close(token);
    }

    /// Handles an epoll event for `token` (listener, pending handshake or stream).
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_all();
        } else if self.pending.contains_key(&token) {
            self.pending_readable(token);
        } else if self.conns.contains_key(&token) {
            if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                self.flush_to_host(token);
            }
            if events.intersects(EventSet::HANG_UP | EventSet::ERROR)
                && let Some(c) = self.conns.get_mut(&token)
            {
                // The host side is gone: epoll would report it forever, so stop watching;
                // update_interests schedules the final read (EOF) when credit allows.
                let _ = self.epoll.remove(c.stream.as_raw_fd());
                c.detached = true;
                c.interest = None;
            }
            if let Some(c) = self.conns.get_mut(&token)
                && events.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                )
                && !c.readable
            {
                c.readable = true;
                self.readable.push_back(token);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.conns.len() + self.pending.len() >= MAX_CONNS {
                        tracing::warn!("vsock: too many connections, refusing host connection");
                        continue;
                    }
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let t = self.alloc_token();
                    if self
                        .epoll
                        .add(s.as_raw_fd(), t, EventSet::IN | EventSet::READ_HANG_UP)
                        .is_ok()
                    {
                        self.pending.insert(
                            t,
                            Pending {
                                stream: s,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    fn pending_readable(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        // Byte by byte: bytes after the newline belong to the stream.
        let mut b = [0u8; 1];
        let verdict = loop {
            match p.stream.read(&mut b) {
                Ok(0) => break Err("closed before CONNECT line"),
                Ok(_) if b[0] == b'\n' => break Ok(()),
                Ok(_) => {
                    p.line.push(b[0]);
                    if p.line.len() > MAX_CONNECT_LINE {
                        break Err("CONNECT line too long");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break Err("read error"),
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let _ = self.epoll.remove(p.stream.as_raw_fd());
        let port = match verdict.and_then(|()| parse_connect(&p.line)) {
            Ok(port) => port,
            Err(why) => {
                tracing::debug!(reason = why, "vsock: rejected host connection");
                let mut s = p.stream;
                let _ = s.write_all(b"ERR\n");
                return;
            }
        };
        let local = self.alloc_local_port();
        let t = self.alloc_token();
        let c = Conn::new(p.stream, local, port, ConnState::Connecting);
        let h = self.header(&c, op::REQUEST, 0, 0);
        if self
            .epoll
            .add(c.stream.as_raw_fd(), t, EventSet::empty())
            .is_err()
        {
            return;
        }
        self.by_ports.insert((local, port), t);
        self.conns.insert(t, c);
        self.rx_ctrl.push_back(h);
    }

    fn flush_to_host(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut failed = false;
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.reset_conn(token);
            return;
        }
        if c.to_host.is_empty() && c.peer_shut_send {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        // Tell a waiting guest about freed buffer space once a quarter of it is free again.
        if (c.fwd_cnt - c.fwd_cnt_sent).0 >= BUF_ALLOC / 4 && c.state == ConnState::Established {
            let h = header(self.guest_cid, c, op::CREDIT_UPDATE, 0, 0);
            if let Some(c) = self.conns.get_mut(&token) {
                c.fwd_cnt_sent = c.fwd_cnt;
            }
            self.rx_ctrl.push_back(h);
        }
    }

    /// Processes every packet the guest queued on the TX queue.
    pub fn process_tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, MuxerError> {
        let mut used = false;
        while !self.tx_blocked()
            && let Some(chain) = q.pop_descriptor_chain(mem)
        {
            let head = chain.head_index();
            match Reader::new(mem, chain) {
                Ok(mut r) => self.tx_packet(&mut r),
                Err(_) => bump(&self.counters.bad_packets, 1),
            }
            q.add_used(mem, head, 0)?;
            used = true;
        }
        Ok(used)
    }

    fn tx_packet(&mut self, r: &mut Reader<'_>) {
        bump(&self.counters.tx_packets, 1);
        let Ok(h) = r.read_obj::<Header>() else {
            bump(&self.counters.bad_packets, 1);
            return;
        };
        let len = h.len as usize;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            bump(&self.counters.bad_packets, 1);
            return;
        }
        if h.type_ != TYPE_STREAM || len > MAX_PKT_PAYLOAD || len > r.available_bytes() {
            bump(&self.counters.bad_packets, 1);
            if h.op != op::RST {
                let rst = self.rst_for(&h);
                self.rx_ctrl.push_back(rst);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        let token = self.by_ports.get(&key).copied();
        if let Some(t) = token
            && let Some(c) = self.conns.get_mut(&t)
        {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        }
        match (h.op, token) {
            (op::REQUEST, None) => self.guest_connect(&h),
            (op::RESPONSE, Some(t)) => self.guest_response(t),
            (op::RW, Some(t)) => self.guest_data(t, r, len),
            (op::CREDIT_UPDATE, Some(_)) => {}
            (op::CREDIT_REQUEST, Some(t)) => {
                if let Some(c) = self.conns.get_mut(&t) {
                    c.fwd_cnt_sent = c.fwd_cnt;
                    let c = &self.conns[&t];
                    let u = self.header(c, op::CREDIT_UPDATE, 0, 0);
                    self.rx_ctrl.push_back(u);
                }
            }
            (op::SHUTDOWN, Some(t)) => self.guest_shutdown(t, h.flags),
            (op::RST, Some(t)) => {
                bump(&self.counters.conns_reset, 1);
                self.close(t);
            }
            (op::RST, None) => {}
            (_, _) => {
                bump(&self.counters.bad_packets, 1);
                let rst = self.rst_for(&h);
                self.rx_ctrl.push_back(rst);
                if let Some(t) = token {
                    self.close(t);
                }
            }
        }
    }

    fn guest_connect(&mut self, h: &Header) {
        if self.conns.len() + self.pending.len() >= MAX_CONNS {
            let rst = self.rst_for(h);
            self.rx_ctrl.push_back(rst);
            return;
        }
        let dst_port = h.dst_port;
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{dst_port}"));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                tracing::debug!(port = dst_port, "vsock: guest connect refused");
                bump(&self.counters.conns_reset, 1);
                let rst = self.rst_for(h);
                self.rx_ctrl.push_back(rst);
                return;
            }
        };
        let t = self.alloc_token();
        let mut c = Conn::new(stream, h.dst_port, h.src_port, ConnState::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if self
            .epoll
            .add(c.stream.as_raw_fd(), t, EventSet::empty())
            .is_err()
        {
            let rst = self.rst_for(h);
            self.rx_ctrl.push_back(rst);
            return;
        }
        let resp = self.header(&c, op::RESPONSE, 0, 0);
        self.by_ports.insert((c.local_port, c.peer_port), t);
        self.conns.insert(t, c);
        self.rx_ctrl.push_back(resp);
        bump(&self.counters.conns_opened, 1);
    }

    fn guest_response(&mut self, t: u64) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        if c.state != ConnState::Connecting {
            bump(&self.counters.bad_packets, 1);
            self.reset_conn(t);
            return;
        }
        c.state = ConnState::Established;
        // The OK line goes ahead of any stream data; it is not counted in fwd_cnt.
        let line = format!("OK {}\n", c.local_port);
        let ok = write_all_nonblocking(&mut c.stream, line.as_bytes());
        if !ok {
            self.reset_conn(t);
            return;
        }
        bump(&self.counters.conns_opened, 1);
    }

    fn guest_data(&mut self, t: u64, r: &mut Reader<'_>, len: usize) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        if c.state != ConnState::Established || c.peer_shut_send {
            bump(&self.counters.bad_packets, 1);
            self.reset_conn(t);
            return;
        }
        if c.to_host.len() + len > BUF_ALLOC as usize {
            crate::guest_warn!(port = c.local_port, "vsock: guest exceeded its credit");
            bump(&self.counters.bad_packets, 1);
            self.reset_conn(t);
            return;
        }
        let buf = &mut self.buf[..len];
        if r.read_exact(buf).is_err() {
            bump(&self.counters.bad_packets, 1);
            self.reset_conn(t);
            return;
        }
        bump(&self.counters.tx_bytes, len as u64);
        c.to_host.extend(buf.iter());
        self.flush_to_host(t);
    }

    fn guest_shutdown(&mut self, t: u64, flags: u32) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        c.peer_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        c.peer_shut_send |= flags & SHUTDOWN_SEND != 0;
        if (c.peer_shut_rcv && c.peer_shut_send) || c.state == ConnState::Closing {
            // Full close: flush what we can, then RST finishes it on both sides.
            self.flush_to_host(t);
            self.reset_conn(t);
        } else if c.peer_shut_send && c.to_host.is_empty() {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Whether the control packets waiting for guest RX buffers reached [`MAX_RX_CTRL`]: the
    /// muxer then takes no TX packets (each may answer with one) until the guest takes
    /// some. A guest that posts no RX buffers and floods REQUESTs or credit requests makes
    /// its own TX ring stall, never the VMM's memory grow.
    pub fn tx_blocked(&self) -> bool {
        self.rx_ctrl.len() >= MAX_RX_CTRL
    }

    /// Control packets waiting for guest RX buffers.
    pub fn rx_ctrl_len(&self) -> usize {
        self.rx_ctrl.len()
    }

    /// Fills RX buffers with control packets and host data; returns whether any was used.
    pub fn fill_rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, MuxerError> {
        let mut used = false;
        loop {
            if self.rx_ctrl.is_empty() && self.readable.is_empty() {
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut w = match Writer::new(mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_SIZE => w,
                _ => {
                    bump(&self.counters.bad_packets, 1);
                    q.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let written = self.next_rx_packet(&mut w);
            match written {
                Some(n) => {
                    q.add_used(mem, head, n as u32)?;
                    used = true;
                    bump(&self.counters.rx_packets, 1);
                }
                None => {
                    // Nothing to send after all: give the buffer back.
                    q.go_to_previous_position();
                    break;
                }
            }
        }
        Ok(used)
    }

    /// Writes one packet into `w`; `None` when there was nothing to send.
    fn next_rx_packet(&mut self, w: &mut Writer<'_>) -> Option<usize> {
        if let Some(h) = self.rx_ctrl.pop_front() {
            return w.write_obj(h).ok().map(|()| HDR_SIZE);
        }
        while let Some(t) = self.readable.pop_front() {
            let Some(c) = self.conns.get_mut(&t) else {
                continue;
            };
            c.readable = false;
            if !c.wants_read() {
                continue;
            }
            let room = (w.available_bytes() - HDR_SIZE)
                .min(c.peer_credit() as usize)
                .min(MAX_PKT_PAYLOAD);
            if room == 0 {
                continue;
            }
            match c.stream.read(&mut self.buf[..room]) {
                Ok(0) => {
                    c.host_eof = true;
                    let (h, state) = if c.state == ConnState::Established {
                        (
                            header(
                                self.guest_cid,
                                c,
                                op::SHUTDOWN,
                                SHUTDOWN_RCV | SHUTDOWN_SEND,
                                0,
                            ),
                            ConnState::Closing,
                        )
                    } else {
                        (header(self.guest_cid, c, op::RST, 0, 0), c.state)
                    };
                    if let Some(c) = self.conns.get_mut(&t) {
                        c.state = state;
                    }
                    return w.write_obj(h).ok().map(|()| HDR_SIZE);
                }
                Ok(n) => {
                    c.tx_cnt += Wrapping(n as u32);
                    c.fwd_cnt_sent = c.fwd_cnt;
                    // More may be waiting: stay in the round-robin.
                    c.readable = true;
                    self.readable.push_back(t);
                    let c = &self.conns[&t];
                    let h = self.header(c, op::RW, 0, n as u32);
                    bump(&self.counters.rx_bytes, n as u64);
                    if w.write_obj(h).is_err() || w.write_all(&self.buf[..n]).is_err() {
                        return Some(0);
                    }
                    return Some(HDR_SIZE + n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => {
                    c.readable = true;
                    self.readable.push_back(t);
                    continue;
                }
                Err(_) => {
                    let h = header(self.guest_cid, c, op::RST, 0, 0);
                    self.close(t);
                    return w.write_obj(h).ok().map(|()| HDR_SIZE);
                }
            }
        }
        None
    }

    /// Re-arms epoll interest of every stream after a round of work.
    pub fn update_interests(&mut self) {
        for (t, c) in self.conns.iter_mut() {
            if c.detached {
                if c.wants_read() && !c.readable {
                    c.readable = true;
                    self.readable.push_back(*t);
                }
                continue;
            }
            let want = c.desired_interest();
            if c.interest != Some(want) && self.epoll.modify(c.stream.as_raw_fd(), *t, want).is_ok()
            {
                c.interest = Some(want);
            }
        }
    }

    /// Whether RX work is waiting for guest buffers.
    pub fn rx_pending(&self) -> bool {
        !self.rx_ctrl.is_empty() || !self.readable.is_empty()
    }

    /// Drops every stream (device reset).
    pub fn reset(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for t in tokens {
            self.close(t);
        }
        for (_, p) in self.pending.drain() {
            let _ = self.epoll.remove(p.stream.as_raw_fd());
        }
        self.rx_ctrl.clear();
    }
}

fn header(guest_cid: u64, c: &Conn, op: u16, flags: u32, len: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt.0,
    }
}

fn write_all_nonblocking(s: &mut UnixStream, data: &[u8]) -> bool {
    // The OK line is tiny and goes to a fresh socket whose buffer is empty: a short write can
    // only mean the peer is gone.
    let mut off = 0;
    while off < data.len() {
        match s.write(&data[off..]) {
            Ok(0) => return false,
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let s = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8")?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s
        .strip_prefix("CONNECT ")
        .ok_or("expected `CONNECT <port>`")?;
    port.trim()
        .parse::<u32>()
        .map_err(|_| "invalid port number")
}
