//! TX: guest chains to tap frames. Each chain's readable part is a virtio-net header and one
//! Ethernet frame (a GSO frame up to [`MAX_FRAME`] bytes when HOST_TSO* was negotiated).
//! The header is checked ([`hdr::check_tx`]) and written to the tap in front of the frame
//! when the tap takes headers; a tap without them gets the bare frame (no offloads were
//! offered then, so a header asking for one is refused).

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT, Reader};
use vm_memory::GuestMemoryMmap;

use super::hdr::{self, VnetHdr};
use super::{MAX_FRAME, MIN_FRAME, NetCounters};
use crate::virtio::tap::VNET_HDR_LEN;

/// Where TX frames go (the tap; a vector in tests).
pub trait FrameSink {
    /// Whether the sink takes the virtio-net header in front of each frame.
    fn takes_header(&self) -> bool;
    /// Sends one frame: `data` is header + frame when [`FrameSink::takes_header`], else
    /// the frame alone.
    fn send(&mut self, data: &[u8]) -> std::io::Result<()>;
}

/// Frames with their header, as a vnet_hdr tap would get them.
impl FrameSink for Vec<Vec<u8>> {
    fn takes_header(&self) -> bool {
        true
    }
    fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.push(data.to_vec());
        Ok(())
    }
}

/// Reads one chain (header + frame) into `buf` and sends it; the chain is not returned here.
fn send_chain(
    r: &mut Reader<'_>,
    features: u64,
    sink: &mut dyn FrameSink,
    buf: &mut Vec<u8>,
    counters: &NetCounters,
) {
    let total = r.available_bytes();
    if !(VNET_HDR_LEN + MIN_FRAME..=VNET_HDR_LEN + MAX_FRAME).contains(&total) {
        counters.tx_bad.fetch_add(1, Ordering::Relaxed);
        return;
    }
    buf.resize(total, 0);
    if std::io::Read::read_exact(r, &mut buf[..]).is_err() {
        counters.tx_bad.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let len = total - VNET_HDR_LEN;
    let mut raw = [0u8; VNET_HDR_LEN];
    raw.copy_from_slice(&buf[..VNET_HDR_LEN]);
    let h = match hdr::check_tx(&VnetHdr::parse(&raw), len, features) {
        Ok(h) => h,
        Err(e) => {
            crate::guest_warn!(error = %e, "virtio-net: TX header refused");
            counters.tx_bad_hdr.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let data = if sink.takes_header() {
        buf[..VNET_HDR_LEN].copy_from_slice(&h.bytes());
        &buf[..]
    } else {
        &buf[VNET_HDR_LEN..]
    };
    match sink.send(data) {
        Ok(()) => {
            counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            counters.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
            if h.is_gso() {
                counters.tx_gso_frames.fetch_add(1, Ordering::Relaxed);
            }
            if h.flags & hdr::FLAG_NEEDS_CSUM != 0 {
                counters.tx_csum_partial.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "tap refused a frame");
            counters.tx_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends the available TX chains to `sink`, at most `limit` of them; returns how many were
/// taken (`limit`: there may be more). Every chain is returned to the guest, sent or
/// refused.
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    features: u64,
    sink: &mut dyn FrameSink,
    buf: &mut Vec<u8>,
    counters: &NetCounters,
    limit: usize,
) -> Result<usize, virtio_queue::Error> {
    super::super::check_avail(queue, mem)?;
    let mut used = 0;
    while used < limit
        && let Some(chain) = queue.pop_descriptor_chain(mem)
    {
        let head = chain.head_index();
        match Reader::new(mem, chain) {
            Ok(mut r) => send_chain(&mut r, features, sink, buf, counters),
            Err(_) => {
                counters.tx_bad.fetch_add(1, Ordering::Relaxed);
            }
        }
        queue.add_used(mem, head, 0)?;
        used += 1;
    }
    Ok(used)
}
