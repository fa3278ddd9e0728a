//! virtio-net through the host kernel's vhost-net: the VMM opens `/dev/vhost-net` (in
//! [`open_device`] only, so a jail can later pass the descriptor instead), hands it the
//! guest memory table, the rings, the queue ioeventfds as kick fds and one call eventfd
//! per queue, and the tap as each queue's backend. The kernel then moves frames between
//! the rings and the tap; the VMM relays its calls as virtio-mmio interrupts
//! ([`crate::virtio::vhost_irq`]: the InterruptStatus VRING bit must be set by us).
//!
//! The virtio-net header: with a tap that carries one (`IFF_VNET_HDR`, size 12 as VERSION_1
//! and mergeable buffers need), the tap makes and takes it and vhost-net passes it through
//! (VHOST_NET_F_VIRTIO_NET_HDR off), so the checksum/TSO offloads work; the tap's
//! `TUNSETOFFLOAD` follows the guest's features as in userspace. A tap without one gets
//! VHOST_NET_F_VIRTIO_NET_HDR (vhost-net adds and strips the header) and no offloads.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use vhost::vhost_kern::VhostKernBackend;
use vhost::vhost_kern::vhost_binding::{VHOST_NET_SET_BACKEND, vhost_vring_file};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::NetCounters;
use super::hdr::{self, F_EVENT_IDX, F_INDIRECT_DESC, F_MRG_RXBUF};
use crate::virtio::tap::Tap;
use crate::virtio::worker::Worker;
use crate::virtio::{ActivateError, ActiveQueue, Interrupt, VIRTIO_F_VERSION_1};

/// The vhost-net device node.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";
/// VHOST_NET_F_VIRTIO_NET_HDR: vhost-net adds/strips the header (the tap has none).
const F_VHOST_NET_HDR: u64 = 1 << 27;
/// Ring and virtio features vhost-net itself implements, offered when it reports them.
const VHOST_RING_FEATURES: u64 = VIRTIO_F_VERSION_1 | F_MRG_RXBUF | F_EVENT_IDX | F_INDIRECT_DESC;

/// Errors opening or driving vhost-net.
#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    /// The device node cannot be opened.
    #[error("cannot open {VHOST_NET_PATH} (load the vhost_net module, or turn vhost-net off)")]
    Open(#[source] std::io::Error),
    /// A vhost ioctl failed.
    #[error("vhost-net {what} failed")]
    Ioctl {
        /// Which step.
        what: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// vhost-net lacks VIRTIO_F_VERSION_1 (kernels before 4.0).
    #[error("vhost-net does not offer VIRTIO_F_VERSION_1")]
    NotModern,
}

/// Opens `/dev/vhost-net`: the one place the VMM opens it.
pub fn open_device() -> Result<File, VhostNetError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(VHOST_NET_PATH)
        .map_err(VhostNetError::Open)
}

/// The vhost-net descriptor seen with a guest memory map, as the `vhost` crate's ioctls
/// want it (it translates ring addresses through the map).
struct Handle<'a> {
    fd: &'a File,
    mem: &'a GuestMemoryMmap,
}

impl AsRawFd for Handle<'_> {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl<'a> VhostKernBackend for Handle<'a> {
    type AS = &'a GuestMemoryMmap;
    fn mem(&self) -> &Self::AS {
        &self.mem
    }
}

impl Handle<'_> {
    /// VHOST_NET_SET_BACKEND: `tap` serves queue `index` (`None`: detach).
    fn set_backend(&self, index: usize, tap: Option<&File>) -> Result<(), VhostNetError> {
        let arg = vhost_vring_file {
            index: index as u32,
            fd: tap.map_or(-1, AsRawFd::as_raw_fd),
        };
        // SAFETY: the descriptor is an open vhost-net device and `arg` a live
        // `vhost_vring_file`, the type VHOST_NET_SET_BACKEND reads during the call.
        let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(self, VHOST_NET_SET_BACKEND(), &arg) };
        if r < 0 {
            return Err(VhostNetError::Ioctl {
                what: "SET_BACKEND",
                source: vhost::Error::IoctlError(std::io::Error::last_os_error()),
            });
        }
        Ok(())
    }
}

fn step(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostNetError {
    move |source| VhostNetError::Ioctl { what, source }
}

/// One NIC's vhost-net instance.
#[derive(Debug)]
pub struct VhostNet {
    fd: File,
    /// Features vhost-net reported.
    backend_features: u64,
    /// Whether the tap carries the header (else vhost-net does).
    tap_hdr: bool,
    /// The memory and queue count of the running instance (for reset), and the relay.
    running: Option<(GuestMemoryMmap, usize, Worker)>,
    /// VHOST_SET_OWNER was done (at the first activation).
    owned: bool,
}

impl VhostNet {
    /// Takes an open vhost-net descriptor and reads its features. `VHOST_SET_OWNER` waits
    /// for the first activation: it makes the kernel's vhost worker, since Linux 6.4 a
    /// thread of this process, which must be born inside the jail (the jail needs a
    /// single-threaded VMM, and a worker made before it would keep root's credentials,
    /// namespaces and root).
    pub fn new(fd: File, tap_hdr: bool) -> Result<Self, VhostNetError> {
        let none = GuestMemoryMmap::default();
        let h = Handle {
            fd: &fd,
            mem: &none,
        };
        let backend_features = h.get_features().map_err(step("GET_FEATURES"))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostNetError::NotModern);
        }
        Ok(VhostNet {
            fd,
            backend_features,
            tap_hdr,
            running: None,
            owned: false,
        })
    }

    /// Features the device offers the guest: vhost-net's ring features, the MAC and, when
    /// the tap carries headers, the offloads (the tap implements them).
    pub fn offered(&self) -> u64 {
        let ring = self.backend_features & VHOST_RING_FEATURES;
        let offloads = if self.tap_hdr { hdr::OFFLOADS } else { 0 };
        ring | hdr::F_MAC | offloads
    }

    /// The features set on vhost-net for the guest's `features`: its own bits only (the
    /// offloads are the tap's), plus VHOST_NET_F_VIRTIO_NET_HDR when the tap has no header.
    pub fn vhost_features(&self, features: u64) -> u64 {
        let own = features & self.backend_features & VHOST_RING_FEATURES;
        if self.tap_hdr {
            own
        } else {
            own | (self.backend_features & F_VHOST_NET_HDR)
        }
    }

    fn setup(
        &self,
        mem: &GuestMemoryMmap,
        features: u64,
        tap: &Tap,
        queues: &[ActiveQueue],
        calls: &[vmm_sys_util::eventfd::EventFd],
    ) -> Result<(), VhostNetError> {
        let h = Handle { fd: &self.fd, mem };
        h.set_features(self.vhost_features(features))
            .map_err(step("SET_FEATURES"))?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| step("SET_MEM_TABLE")(vhost::Error::InvalidGuestMemory))?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: host as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            });
        }
        h.set_mem_table(&regions).map_err(step("SET_MEM_TABLE"))?;
        for (i, (q, call)) in queues.iter().zip(calls).enumerate() {
            let qq = &q.queue;
            h.set_vring_num(i, qq.size())
                .map_err(step("SET_VRING_NUM"))?;
            h.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: qq.max_size(),
                    queue_size: qq.size(),
                    flags: 0,
                    desc_table_addr: qq.desc_table(),
                    used_ring_addr: qq.used_ring(),
                    avail_ring_addr: qq.avail_ring(),
                    log_addr: None,
                },
            )
            .map_err(step("SET_VRING_ADDR"))?;
            h.set_vring_base(i, qq.next_avail())
                .map_err(step("SET_VRING_BASE"))?;
            h.set_vring_call(i, call).map_err(step("SET_VRING_CALL"))?;
            h.set_vring_kick(i, &q.event)
                .map_err(step("SET_VRING_KICK"))?;
        }
        for i in 0..queues.len() {
            h.set_backend(i, Some(tap.file()))?;
        }
        Ok(())
    }

    /// Starts the kernel on the rings: setup, then the interrupt relay.
    pub fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        tap: &Tap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
        counters: Arc<NetCounters>,
    ) -> Result<(), ActivateError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| ActivateError::Backend { what, source }
        };
        if !self.owned {
            let h = Handle { fd: &self.fd, mem };
            h.set_owner().map_err(|e| ActivateError::Backend {
                what: format!("vhost-net SET_OWNER for tap {}", tap.name()),
                source: std::io::Error::other(step("SET_OWNER")(e)),
            })?;
            self.owned = true;
        }
        let calls = crate::virtio::vhost_irq::call_fds(queues.len()).map_err(io("call eventfd"))?;
        let n = queues.len();
        if let Err(e) = self.setup(mem, features, tap, &queues, &calls) {
            self.detach(mem, n);
            return Err(ActivateError::Backend {
                what: format!("vhost-net on tap {}", tap.name()),
                source: std::io::Error::other(e),
            });
        }
        let worker = crate::virtio::vhost_irq::spawn_relay(
            "virtio-net-irq",
            calls,
            queues,
            counters.vhost_interrupts.clone(),
            interrupt,
        );
        let worker = match worker {
            Ok(w) => w,
            Err(e) => {
                self.detach(mem, n);
                return Err(io("virtio-net interrupt worker")(e));
            }
        };
        self.running = Some((mem.clone(), n, worker));
        Ok(())
    }

    /// Stops the kernel on the rings (the tap stays open).
    fn detach(&self, mem: &GuestMemoryMmap, n: usize) {
        let h = Handle { fd: &self.fd, mem };
        for i in 0..n {
            let _ = h.set_backend(i, None);
            let _ = h.get_vring_base(i);
        }
    }

    /// Driver reset: stop the relay, detach the tap, read back the ring positions.
    pub fn reset(&mut self) {
        if let Some((mem, n, mut worker)) = self.running.take() {
            worker.stop();
            self.detach(&mem, n);
        }
    }
}
