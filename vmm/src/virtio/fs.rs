//! virtio-fs through a vhost-user backend (carapace-fsd, or the crates.io `virtiofsd`).
//!
//! The VMM only owns the transport: at activation it hands the backend the guest memory
//! (memfd regions, so guest RAM must be created shared), the ring addresses (translated to
//! this process's virtual addresses, as vhost-user wants), the queue ioeventfds as kick fds
//! and one call eventfd per queue. A worker ([`super::vhost_irq`]) turns call events into
//! virtio-mmio interrupts (the driver reads InterruptStatus, so the VRING bit must be set
//! by us).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::worker::Worker;
use super::{
    ActivateError, ActiveQueue, DeviceMetrics, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice,
    device_type,
};

/// Bytes of the tag in the config space.
pub const TAG_LEN: usize = 36;
const QUEUE_SIZE: u16 = 1024;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Ring features we let the guest negotiate when the backend offers them.
const RING_FEATURES: u64 = (1 << 28) | (1 << 29); // INDIRECT_DESC, EVENT_IDX

/// Errors setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Invalid tag.
    #[error("virtio-fs tag {0:?} must be 1..=36 bytes")]
    Tag(String),
    /// The backend socket could not be used.
    #[error("vhost-user backend {path}: {what}")]
    Backend {
        /// Socket path.
        path: PathBuf,
        /// Step.
        what: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks VIRTIO_F_VERSION_1.
    #[error("vhost-user backend {0} does not offer VIRTIO_F_VERSION_1")]
    NotModern(PathBuf),
}

/// The virtio-fs device.
pub struct VhostUserFs {
    path: PathBuf,
    tag: String,
    frontend: Frontend,
    backend_features: u64,
    protocol: bool,
    num_queues: usize,
    sizes: Vec<u16>,
    worker: Option<Worker>,
    interrupts: Arc<AtomicU64>,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("path", &self.path)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl VhostUserFs {
    /// Connects to the backend at `path` (one high-priority + `request_queues` queues).
    pub fn connect(path: &Path, tag: &str, request_queues: usize) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.into()));
        }
        let err = |what| {
            let path = path.to_owned();
            move |source| FsError::Backend { path, what, source }
        };
        let num_queues = 1 + request_queues.max(1);
        let mut frontend = Frontend::connect(path, num_queues as u64).map_err(err("connect"))?;
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::NotModern(path.to_owned()));
        }
        let protocol = backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            let want =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(want)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
        }
        Ok(VhostUserFs {
            path: path.to_owned(),
            tag: tag.into(),
            frontend,
            backend_features,
            protocol,
            num_queues,
            sizes: vec![QUEUE_SIZE; num_queues],
            worker: None,
            interrupts: Arc::default(),
        })
    }

    fn setup_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &[ActiveQueue],
        calls: &[EventFd],
    ) -> Result<(), vhost::Error> {
        let f = &mut self.frontend;
        let proto = if self.protocol {
            VHOST_USER_F_PROTOCOL_FEATURES
        } else {
            0
        };
        f.set_features(features | proto)?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let Some(fo) = r.file_offset() else {
                return Err(vhost::Error::InvalidGuestMemory);
            };
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| vhost::Error::InvalidGuestMemory)?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: host as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            });
        }
        f.set_mem_table(&regions)?;
        let hva = |gpa: u64| -> Result<u64, vhost::Error> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| vhost::Error::InvalidGuestMemory)
        };
        for (i, (q, call)) in queues.iter().zip(calls).enumerate() {
            let qq = &q.queue;
            f.set_vring_num(i, qq.size())?;
            f.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: qq.max_size(),
                    queue_size: qq.size(),
                    flags: 0,
                    desc_table_addr: hva(qq.desc_table())?,
                    used_ring_addr: hva(qq.used_ring())?,
                    avail_ring_addr: hva(qq.avail_ring())?,
                    log_addr: None,
                },
            )?;
            f.set_vring_base(i, 0)?;
            f.set_vring_call(i, call)?;
            f.set_vring_kick(i, &q.event)?;
        }
        if self.protocol {
            for i in 0..queues.len() {
                f.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        self.backend_features & (VIRTIO_F_VERSION_1 | RING_FEATURES)
    }
    fn config_bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; TAG_LEN + 4];
        c[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        c[TAG_LEN..].copy_from_slice(&((self.num_queues - 1) as u32).to_le_bytes());
        c
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| ActivateError::Backend { what, source }
        };
        let calls = super::vhost_irq::call_fds(queues.len()).map_err(io("call eventfd"))?;
        if let Err(e) = self.setup_backend(&mem, features, &queues, &calls) {
            return Err(ActivateError::Backend {
                what: format!("vhost-user setup with {}", self.path.display()),
                source: std::io::Error::other(e.to_string()),
            });
        }
        let worker = super::vhost_irq::spawn_relay(
            "virtio-fs-irq",
            calls,
            queues,
            self.interrupts.clone(),
            interrupt,
        )
        .map_err(io("virtio-fs interrupt worker"))?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        if self.protocol {
            for i in 0..self.num_queues {
                let _ = self.frontend.set_vring_enable(i, false);
            }
        }
        for i in 0..self.num_queues {
            let _ = self.frontend.get_vring_base(i);
        }
    }
    fn metrics(&self) -> DeviceMetrics {
        DeviceMetrics::Fs(FsMetrics {
            backend: self.path.clone(),
            interrupts: self.interrupts.load(Ordering::Relaxed),
            tag: self.tag.clone(),
        })
    }
}

/// The virtio-fs device's counters in the metrics API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FsMetrics {
    /// The vhost-user backend's socket.
    pub backend: PathBuf,
    /// Backend calls turned into guest interrupts.
    pub interrupts: u64,
    /// The mount tag.
    pub tag: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_backend_is_reported() {
        let e = VhostUserFs::connect(Path::new("/nonexistent/fs.sock"), "tag", 1).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/fs.sock"), "{e}");
        let e = VhostUserFs::connect(Path::new("/x"), "", 1).unwrap_err();
        assert!(matches!(e, FsError::Tag(_)));
        let e = VhostUserFs::connect(Path::new("/x"), &"t".repeat(37), 1).unwrap_err();
        assert!(matches!(e, FsError::Tag(_)));
    }
}
