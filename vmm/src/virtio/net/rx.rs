//! RX: tap frames into guest buffers.
//!
//! Without VIRTIO_NET_F_MRG_RXBUF a frame (header + Ethernet frame) must fit one chain (the
//! guest then posts 64 KiB chains if it accepted TSO). With it, one frame spreads over as
//! many chains as it needs, the header's `num_buffers` says how many, and all of them
//! become visible to the guest at once (one used-index update), so the driver never sees
//! half a frame. When the guest has posted too few buffers the chains taken so far go
//! back (`next_avail` rolls back), the frame is kept and the device waits for a kick.
//! A frame that can never fit (it needs more chains than the queue holds, or a chain is
//! unusable) is dropped and the chains are returned empty.

use std::io::Write;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::hdr::VnetHdr;
use super::{MAX_FRAME, NetCounters};
use crate::virtio::tap::VNET_HDR_LEN;

/// What happened to a frame offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into guest buffers.
    Delivered,
    /// The guest's buffers were unusable: the frame is dropped, the buffers returned empty.
    Dropped,
    /// Not enough RX buffers are posted: keep the frame and wait for the guest.
    NoBuffer,
}

/// Makes `(head, len)` pairs used with one used-index update: all entries but the last are
/// written past the published index (invisible to the driver), then `add_used` writes the
/// last one and publishes the index with release ordering. The queue's own count of added
/// entries misses the ones written here, so interrupt decisions use [`super::notify`].
fn add_used_batch(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    used: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), rest)) = used.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    let start = queue.next_used();
    for (i, &(head, len)) in rest.iter().enumerate() {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        let addr = queue
            .used_ring()
            .checked_add(4 + slot * 8)
            .map(GuestAddress)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    queue.set_next_used(start.wrapping_add(rest.len() as u16));
    queue.add_used(mem, last_head, last_len)
}

/// Offers one frame with its header `hdr` to the guest's RX queue; `mergeable` when
/// VIRTIO_NET_F_MRG_RXBUF was negotiated.
pub fn deliver_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    hdr: &VnetHdr,
    frame: &[u8],
    mergeable: bool,
    counters: &NetCounters,
) -> Result<RxOutcome, virtio_queue::Error> {
    if frame.len() > MAX_FRAME {
        counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
        return Ok(RxOutcome::Dropped);
    }
    let total = VNET_HDR_LEN + frame.len();
    let start = queue.next_avail();
    // At most one chain without mergeable buffers, at most the whole ring with them.
    let max_chains = if mergeable {
        usize::from(queue.size())
    } else {
        1
    };
    let mut chains: Vec<(u16, Writer<'_>)> = Vec::new();
    let mut room = 0usize;
    let mut usable = true;
    while room < total && chains.len() < max_chains {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            super::super::check_avail(queue, mem)?;
            // Too few buffers: give back what was taken, keep the frame.
            queue.set_next_avail(start);
            counters.rx_no_buffer.fetch_add(1, Ordering::Relaxed);
            return Ok(RxOutcome::NoBuffer);
        };
        let head = chain.head_index();
        match Writer::new(mem, chain) {
            // Each buffer holds at least a header (the spec's rule for mergeable buffers;
            // without them the single chain must hold the whole frame anyway).
            Ok(w) if w.available_bytes() >= VNET_HDR_LEN => {
                room += w.available_bytes();
                chains.push((head, w));
            }
            Ok(w) => {
                chains.push((head, w));
                usable = false;
                break;
            }
            Err(_) => {
                // An unusable chain (bad address, read-only): returned empty.
                add_used_batch(queue, mem, &[(head, 0)])?;
                usable = false;
                break;
            }
        }
    }
    let n = chains.len();
    let mut used: Vec<(u16, u32)> = Vec::with_capacity(n);
    let delivered = usable && room >= total && {
        let h = VnetHdr {
            num_buffers: n as u16,
            ..*hdr
        };
        let head = h.bytes();
        let mut parts: [&[u8]; 2] = [&head, frame];
        let mut ok = true;
        for (id, w) in &mut chains {
            for part in &mut parts {
                let k = part.len().min(w.available_bytes());
                if w.write_all(&part[..k]).is_err() {
                    ok = false;
                }
                *part = &part[k..];
            }
            used.push((*id, w.bytes_written() as u32));
        }
        ok && parts.iter().all(|p| p.is_empty())
    };
    if !delivered {
        used.clear();
        used.extend(chains.iter().map(|(id, _)| (*id, 0)));
        add_used_batch(queue, mem, &used)?;
        counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
        return Ok(RxOutcome::Dropped);
    }
    add_used_batch(queue, mem, &used)?;
    counters.rx_frames.fetch_add(1, Ordering::Relaxed);
    counters
        .rx_bytes
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    counters.rx_buffers.fetch_add(n as u64, Ordering::Relaxed);
    if hdr.is_gso() {
        counters.rx_gso_frames.fetch_add(1, Ordering::Relaxed);
    }
    Ok(RxOutcome::Delivered)
}
