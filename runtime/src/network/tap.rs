//! Creating a tap device: `/dev/net/tun` and its ioctls, the only `unsafe` of the network
//! module (neither rustix nor nix wraps the tun ioctls).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// The virtio-net header length the VMM uses (`virtio_net_hdr_v1` with `num_buffers`,
/// `carapace-vmm`'s `virtio::tap::VNET_HDR_LEN`); set on the tap so that the descriptor
/// behaves the same before and after the VMM adopts it.
pub const VNET_HDR_LEN: usize = 12;

/// The flags a tap is created with: a tap (Ethernet frames), no packet-information
/// prefix, a virtio-net header before each frame, and failing if the name exists already
/// (so that what we delete later is what we made).
const TAP_FLAGS: libc::c_int =
    libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL;

/// `struct ifreq` as TUNSETIFF uses it: the name, then the flags short.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the tap `name` in the calling thread's network namespace and returns its
/// descriptor (close-on-exec, blocking). The tap is not persistent: it disappears when
/// its last descriptor closes. On failure, says which step failed.
pub fn create(name: &str) -> Result<OwnedFd, (&'static str, io::Error)> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err((
            "naming",
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a valid interface name (1..=15 bytes, no NUL)",
            ),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| ("opening /dev/net/tun for", e))?;
    let fd = OwnedFd::from(file);
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: TAP_FLAGS as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a live, properly laid
    // out `IfReq` (name, flags, padding to the union's size) for the whole call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
    if r < 0 {
        return Err(("creating (TUNSETIFF)", io::Error::last_os_error()));
    }
    let mut size = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which points to `size`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &raw mut size) };
    if r < 0 {
        return Err((
            "setting the virtio-net header size (TUNSETVNETHDRSZ) of",
            io::Error::last_os_error(),
        ));
    }
    // No offloads: the VMM negotiates none with the guest, so frames must reach the tap
    // complete (segmented, checksums filled in); the VMM sets the same again.
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
    if r < 0 {
        return Err((
            "turning offloads off (TUNSETOFFLOAD) on",
            io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}
