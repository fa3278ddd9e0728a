//! The virtio-vsock packet header and protocol constants.

use vm_memory::ByteValued;

/// Host context id.
pub const HOST_CID: u64 = 2;
/// Stream socket type.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload of one packet we accept from the guest or send to it.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// Operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset / refused.
    pub const RST: u16 = 3;
    /// Shutdown (flags say which direction).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit update.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Credit request.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr` (little endian, packed, 44 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender consumed from its receive buffer.
    pub fwd_cnt: u32,
}

/// Header size on the wire.
pub const HDR_SIZE: usize = std::mem::size_of::<Header>();

const _: () = assert!(HDR_SIZE == 44);

// SAFETY: Header is repr(C, packed) made only of integers: every byte pattern is a valid value
// and there is no padding. (The host is little endian, as virtio-vsock is.)
unsafe impl ByteValued for Header {}
