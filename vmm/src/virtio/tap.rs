//! Host tap devices for virtio-net: opening `/dev/net/tun` by interface name, or adopting a
//! tap descriptor opened by the caller. All ioctls (and their `unsafe`) live here.
//!
//! A tap opened by name carries a 12-byte virtio-net header (`IFF_VNET_HDR`,
//! `TUNSETVNETHDRSZ` 12, as VERSION_1 wants); an adopted descriptor may or may not. Either
//! way it starts with no offloads (`TUNSETOFFLOAD 0`): the device sets them from the
//! features the guest accepted, through [`TapControl`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of the virtio-net header (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains a NUL byte.
    #[error("tap name {name:?} is not a valid interface name (1..=15 bytes, no NUL)")]
    Name {
        /// The name.
        name: String,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An ioctl on the tap failed.
    #[error("{call} on tap {tap} failed")]
    Ioctl {
        /// Which ioctl.
        call: &'static str,
        /// Interface name or `fd N`.
        tap: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The passed descriptor is not usable.
    #[error("tap fd {fd}: {reason}")]
    BadFd {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong.
        reason: String,
    },
}

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name and the flags short.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn zeroed() -> Self {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }
}

/// The one tap setting that depends on the guest: which offloads the reader (the guest,
/// through us or vhost-net) takes from the host. A trait so the mapping from negotiated
/// features to `TUN_F_*` flags is unit-testable without a tap.
pub trait TapControl {
    /// `TUNSETOFFLOAD` with `TUN_F_*` flags.
    fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError>;
}

/// An open tap queue (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// The tap carries a virtio-net header of [`VNET_HDR_LEN`] bytes before each frame.
    vnet_hdr: bool,
}

fn ioctl_ptr<T>(
    file: &File,
    req: libc::Ioctl,
    arg: *mut T,
    call: &'static str,
    tap: &str,
) -> Result<(), TapError> {
    // SAFETY: callers pass a pointer to a live value of the type the ioctl `req` expects
    // (an `IfReq` for TUNSETIFF/TUNGETIFF, a c_int for TUNSETVNETHDRSZ); the kernel reads or
    // writes at most that many bytes during the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(TapError::Ioctl {
            call,
            tap: tap.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn ioctl_val(
    file: &File,
    req: libc::Ioctl,
    arg: libc::c_ulong,
    call: &'static str,
    tap: &str,
) -> Result<(), TapError> {
    // SAFETY: the ioctl takes its argument by value (TUNSETOFFLOAD); no memory is passed.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(TapError::Ioctl {
            call,
            tap: tap.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl Tap {
    /// Attaches to (or creates) the tap interface `name` without packet information and
    /// without offloads.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name { name: name.into() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun { source })?;
        let mut req = IfReq::zeroed();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        ioctl_ptr(&file, libc::TUNSETIFF, &raw mut req, "TUNSETIFF", name)?;
        set_vnet_hdr_size(&file, name)?;
        let tap = Tap {
            file,
            name: name.into(),
            vnet_hdr: true,
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Adopts an inherited tap descriptor (duplicated; the original stays open). It must be a
    /// tap (not tun) without packet information; a virtio-net header is accepted.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        let file = crate::fdio::file_from_fd(fd).map_err(|e| TapError::BadFd {
            fd,
            reason: format!("not an open descriptor: {e}"),
        })?;
        let label = format!("fd {fd}");
        let mut req = IfReq::zeroed();
        ioctl_ptr(&file, libc::TUNGETIFF, &raw mut req, "TUNGETIFF", &label)?;
        let flags = libc::c_int::from(req.flags);
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::BadFd {
                fd,
                reason: "is a tun (layer 3) device, a tap is needed".into(),
            });
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::BadFd {
                fd,
                reason: "carries packet information (open it with IFF_NO_PI)".into(),
            });
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        let vnet_hdr = flags & libc::IFF_VNET_HDR != 0;
        if vnet_hdr {
            set_vnet_hdr_size(&file, &name)?;
        }
        // The duplicate shares the open file description: the caller's descriptor becomes
        // non-blocking too.
        // SAFETY: F_GETFL only reads the open file's status flags.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: F_SETFL only changes the open file's status flags; `fl` came from F_GETFL.
        let set = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
        if fl < 0 || set < 0 {
            return Err(TapError::BadFd {
                fd,
                reason: format!(
                    "cannot make it non-blocking: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
        let tap = Tap {
            file,
            name,
            vnet_hdr,
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The open tap (vhost-net's backend descriptor).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether frames carry a virtio-net header on the tap side.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Reads one frame (with the tap's header if any) into `buf`; `WouldBlock` when empty.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (with the tap's header if any).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

/// The header size VERSION_1 (and mergeable RX buffers) need: 12 bytes, not the tap's
/// default of 10.
fn set_vnet_hdr_size(file: &File, name: &str) -> Result<(), TapError> {
    let mut size: libc::c_int = VNET_HDR_LEN as libc::c_int;
    ioctl_ptr(
        file,
        libc::TUNSETVNETHDRSZ,
        &raw mut size,
        "TUNSETVNETHDRSZ",
        name,
    )
}

impl TapControl for Tap {
    fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        ioctl_val(
            &self.file,
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
            "TUNSETOFFLOAD",
            &self.name,
        )
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
