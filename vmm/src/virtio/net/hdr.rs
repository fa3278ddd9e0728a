//! The virtio-net header (`virtio_net_hdr_v1`, 12 bytes), feature bits, and what the device
//! accepts from the guest and gives it.
//!
//! TX headers come from the guest and are hostile: every field the host kernel acts on
//! (flags, GSO type, `hdr_len`, `gso_size`, `csum_start`/`csum_offset`) is checked against
//! the negotiated features and bounded by the frame before the header reaches the tap.
//! RX headers come from the tap (the host kernel, which only sends the offloads that
//! `TUNSETOFFLOAD` allowed); they are still checked against what the guest accepted.

use super::super::VIRTIO_F_VERSION_1;
use crate::virtio::tap::{TapControl, TapError, VNET_HDR_LEN};

/// VIRTIO_NET_F_CSUM: the device takes frames with a partial checksum (TX).
pub const F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_GUEST_CSUM: the driver takes frames with a partial checksum (RX).
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// VIRTIO_NET_F_MAC: config space holds the MAC address.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_GUEST_TSO4: the driver takes TCPv4 GSO frames.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// VIRTIO_NET_F_GUEST_TSO6: the driver takes TCPv6 GSO frames.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// VIRTIO_NET_F_GUEST_ECN: the driver takes TSO frames with ECN.
pub const F_GUEST_ECN: u64 = 1 << 9;
/// VIRTIO_NET_F_HOST_TSO4: the device takes TCPv4 GSO frames.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// VIRTIO_NET_F_HOST_TSO6: the device takes TCPv6 GSO frames.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// VIRTIO_NET_F_HOST_ECN: the device takes TSO frames with ECN.
pub const F_HOST_ECN: u64 = 1 << 13;
/// VIRTIO_NET_F_MRG_RXBUF: one RX frame may span several buffers (`num_buffers`).
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Offload features, offered only when the tap carries a virtio-net header.
pub const OFFLOADS: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN;

/// The features the userspace device offers.
pub fn offered(tap_vnet_hdr: bool) -> u64 {
    let base = VIRTIO_F_VERSION_1 | F_MAC | F_MRG_RXBUF | F_INDIRECT_DESC | F_EVENT_IDX;
    if tap_vnet_hdr { base | OFFLOADS } else { base }
}

/// `flags`: the checksum from `csum_start` on is still to be computed.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `flags` (RX only): the checksum was validated.
pub const FLAG_DATA_VALID: u8 = 2;
/// `gso_type`: not a GSO frame.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: TCPv6 segmentation.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type` bit: TCP with ECN.
pub const GSO_ECN: u8 = 0x80;

/// `virtio_net_hdr_v1`, decoded (little endian on the wire, VERSION_1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    /// Decodes the 12 header bytes.
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> Self {
        let w = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: w(2),
            gso_size: w(4),
            csum_start: w(6),
            csum_offset: w(8),
            num_buffers: w(10),
        }
    }

    /// Encodes it.
    pub fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Whether this is a GSO frame.
    pub fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }
}

/// Why a guest's TX header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HdrError {
    /// A flag other than NEEDS_CSUM (or NEEDS_CSUM without VIRTIO_NET_F_CSUM).
    #[error("flags {0:#x} not allowed by the negotiated features")]
    Flags(u8),
    /// `csum_start + csum_offset + 2` lies beyond the frame.
    #[error("checksum at {start}+{offset} outside a {len}-byte frame")]
    Csum {
        /// csum_start.
        start: u16,
        /// csum_offset.
        offset: u16,
        /// Frame length.
        len: usize,
    },
    /// A GSO type that was not negotiated (UDP, TCP without HOST_TSO*, ECN without
    /// HOST_ECN, unknown values).
    #[error("GSO type {0:#x} not negotiated")]
    GsoType(u8),
    /// GSO without NEEDS_CSUM, a zero segment size, or sizes beyond the frame.
    #[error("GSO frame of {len} bytes with gso_size {gso_size}, hdr_len {hdr_len}")]
    GsoSizes {
        /// gso_size.
        gso_size: u16,
        /// hdr_len.
        hdr_len: u16,
        /// Frame length.
        len: usize,
    },
    /// `hdr_len` beyond the frame.
    #[error("hdr_len {hdr_len} beyond a {len}-byte frame")]
    HdrLen {
        /// hdr_len.
        hdr_len: u16,
        /// Frame length.
        len: usize,
    },
}

/// Checks a guest's TX header for a frame of `len` bytes under the negotiated `features`
/// and returns what goes to the tap (`num_buffers` zeroed: it means nothing on TX).
pub fn check_tx(h: &VnetHdr, len: usize, features: u64) -> Result<VnetHdr, HdrError> {
    if h.flags & !FLAG_NEEDS_CSUM != 0 || (h.flags & FLAG_NEEDS_CSUM != 0 && features & F_CSUM == 0)
    {
        return Err(HdrError::Flags(h.flags));
    }
    if usize::from(h.hdr_len) > len {
        return Err(HdrError::HdrLen {
            hdr_len: h.hdr_len,
            len,
        });
    }
    if h.flags & FLAG_NEEDS_CSUM != 0
        && usize::from(h.csum_start) + usize::from(h.csum_offset) + 2 > len
    {
        return Err(HdrError::Csum {
            start: h.csum_start,
            offset: h.csum_offset,
            len,
        });
    }
    if h.is_gso() {
        let ok = match h.gso_type & !GSO_ECN {
            GSO_TCPV4 => features & F_HOST_TSO4 != 0,
            GSO_TCPV6 => features & F_HOST_TSO6 != 0,
            _ => false,
        };
        if !ok || (h.gso_type & GSO_ECN != 0 && features & F_HOST_ECN == 0) {
            return Err(HdrError::GsoType(h.gso_type));
        }
        // The kernel segments at gso_size after hdr_len bytes of headers: there must be a
        // payload, and a segment size.
        if h.flags & FLAG_NEEDS_CSUM == 0
            || h.gso_size == 0
            || usize::from(h.gso_size) > len
            || usize::from(h.hdr_len) >= len
        {
            return Err(HdrError::GsoSizes {
                gso_size: h.gso_size,
                hdr_len: h.hdr_len,
                len,
            });
        }
    }
    Ok(VnetHdr {
        num_buffers: 0,
        ..*h
    })
}

/// Checks an RX header from the tap against what the guest accepted: `None` when the frame
/// must not reach the guest (a GSO type it did not accept). Flags it did not accept are
/// cleared (the tap sets DATA_VALID whatever the offloads).
pub fn check_rx(h: &VnetHdr, features: u64) -> Option<VnetHdr> {
    let mut out = *h;
    if features & F_GUEST_CSUM == 0 {
        if h.flags & FLAG_NEEDS_CSUM != 0 {
            return None;
        }
        out.flags = 0;
    } else {
        out.flags &= FLAG_NEEDS_CSUM | FLAG_DATA_VALID;
    }
    if h.is_gso() {
        let ok = match h.gso_type & !GSO_ECN {
            GSO_TCPV4 => features & F_GUEST_TSO4 != 0,
            GSO_TCPV6 => features & F_GUEST_TSO6 != 0,
            _ => false,
        };
        if !ok || (h.gso_type & GSO_ECN != 0 && features & F_GUEST_ECN == 0) {
            return None;
        }
    }
    Some(out)
}

/// `TUN_F_*` flags for the offloads the guest accepted on RX: the tap may then hand over
/// frames with partial checksums (GUEST_CSUM) and TSO frames (GUEST_TSO4/6, ECN) instead
/// of finishing them in the host kernel. TSO needs the checksum offload too (the kernel
/// ignores TSO flags without TUN_F_CSUM; so does this mapping).
pub fn tun_offloads(features: u64) -> libc::c_uint {
    if features & F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if features & F_GUEST_TSO4 != 0 {
        f |= libc::TUN_F_TSO4;
    }
    if features & F_GUEST_TSO6 != 0 {
        f |= libc::TUN_F_TSO6;
    }
    if features & F_GUEST_ECN != 0 && features & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0 {
        f |= libc::TUN_F_TSO_ECN;
    }
    f
}

/// Sets the tap's offloads from the negotiated features; returns the flags set.
pub fn apply_offloads(tap: &dyn TapControl, features: u64) -> Result<libc::c_uint, TapError> {
    let f = tun_offloads(features);
    tap.set_offload(f)?;
    Ok(f)
}
