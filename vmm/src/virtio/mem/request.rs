//! The request queue's wire format (virtio 1.2, 5.15.6: `struct virtio_mem_req` in, `struct
//! virtio_mem_resp` out, little-endian) and the queue's service loop.
//!
//! A chain carries the request in its readable part and room for the response in its
//! writable part. A chain whose readable part is shorter than a request, or whose type is
//! unknown, is answered with ERROR; a chain with no room for a response cannot be answered
//! and is returned with nothing written. Both are counted and logged (rate-limited).

use std::io::{Read, Write};

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::MemControl;
use super::blocks::{RangeState, Request, Response};

/// `sizeof(struct virtio_mem_req)`: type, 3 × padding, then the largest union member
/// (addr, nb_blocks, 3 × padding).
pub const REQ_LEN: usize = 24;
/// `sizeof(struct virtio_mem_resp)`: type, 3 × padding, state.
pub const RESP_LEN: usize = 10;

/// VIRTIO_MEM_REQ_PLUG.
pub const REQ_PLUG: u16 = 0;
/// VIRTIO_MEM_REQ_UNPLUG.
pub const REQ_UNPLUG: u16 = 1;
/// VIRTIO_MEM_REQ_UNPLUG_ALL.
pub const REQ_UNPLUG_ALL: u16 = 2;
/// VIRTIO_MEM_REQ_STATE.
pub const REQ_STATE: u16 = 3;

/// VIRTIO_MEM_RESP_ACK.
pub const RESP_ACK: u16 = 0;
/// VIRTIO_MEM_RESP_NACK.
pub const RESP_NACK: u16 = 1;
/// VIRTIO_MEM_RESP_BUSY (never sent: nothing here is ever temporarily unavailable).
pub const RESP_BUSY: u16 = 2;
/// VIRTIO_MEM_RESP_ERROR.
pub const RESP_ERROR: u16 = 3;

/// VIRTIO_MEM_STATE_PLUGGED.
pub const STATE_PLUGGED: u16 = 0;
/// VIRTIO_MEM_STATE_UNPLUGGED.
pub const STATE_UNPLUGGED: u16 = 1;
/// VIRTIO_MEM_STATE_MIXED.
pub const STATE_MIXED: u16 = 2;

fn le16(b: &[u8; REQ_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Decodes a request (padding ignored, as the spec lets the device do).
pub fn decode(b: &[u8; REQ_LEN]) -> Request {
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&b[8..16]);
    let addr = u64::from_le_bytes(addr);
    let nb_blocks = le16(b, 16);
    match le16(b, 0) {
        REQ_PLUG => Request::Plug { addr, nb_blocks },
        REQ_UNPLUG => Request::Unplug { addr, nb_blocks },
        REQ_UNPLUG_ALL => Request::UnplugAll,
        REQ_STATE => Request::State { addr, nb_blocks },
        t => Request::Unknown(t),
    }
}

/// Encodes a response.
pub fn encode(r: Response) -> [u8; RESP_LEN] {
    let (kind, state) = match r {
        Response::Ack => (RESP_ACK, 0),
        Response::AckState(s) => (
            RESP_ACK,
            match s {
                RangeState::Plugged => STATE_PLUGGED,
                RangeState::Unplugged => STATE_UNPLUGGED,
                RangeState::Mixed => STATE_MIXED,
            },
        ),
        Response::Nack => (RESP_NACK, 0),
        Response::Error(_) => (RESP_ERROR, 0),
    };
    let mut b = [0u8; RESP_LEN];
    b[..2].copy_from_slice(&kind.to_le_bytes());
    b[8..].copy_from_slice(&state.to_le_bytes());
    b
}

/// Reads the request of a chain: `Err(why)` when the readable part cannot hold one.
fn read_request(r: Result<Reader<'_>, virtio_queue::Error>) -> Result<Request, &'static str> {
    let mut r = r.map_err(|_| "unusable readable descriptors")?;
    if r.available_bytes() < REQ_LEN {
        return Err("request shorter than struct virtio_mem_req");
    }
    let mut b = [0u8; REQ_LEN];
    r.read_exact(&mut b)
        .map_err(|_| "request not readable from guest memory")?;
    Ok(decode(&b))
}

/// Serves every available request on `queue`; returns whether the used ring changed.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    ctl: &MemControl,
) -> Result<bool, virtio_queue::Error> {
    crate::virtio::check_avail(queue, mem)?;
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let request = read_request(Reader::new(mem, chain.clone()));
        let mut written = 0u32;
        match Writer::new(mem, chain) {
            Ok(mut w) if w.available_bytes() >= RESP_LEN => {
                let resp = match request {
                    Ok(req) => ctl.execute(req),
                    Err(why) => {
                        ctl.count_malformed();
                        crate::guest_warn!(reason = why, "virtio-mem: malformed request");
                        Response::Error(why)
                    }
                };
                if w.write_all(&encode(resp)).is_ok() {
                    written = RESP_LEN as u32;
                } else {
                    ctl.count_malformed();
                    crate::guest_warn!("virtio-mem: response not writable to guest memory");
                }
            }
            _ => {
                ctl.count_malformed();
                crate::guest_warn!(
                    "virtio-mem: request without room for a response, returned unanswered"
                );
            }
        }
        queue.add_used(mem, head, written)?;
        used = true;
    }
    Ok(used)
}
