//! virtio-blk backed by a raw image file (optionally read-only).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::worker::Worker;
use super::{
    ActivateError, ActiveQueue, DeviceMetrics, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice,
    device_type,
};

const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Largest data transfer per request (bounds the host buffer per descriptor chain).
pub const MAX_REQUEST: usize = 4 << 20;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_LEN: usize = 20;

/// Errors opening the backing file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file cannot be opened.
    #[error("cannot open block device image {path}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Counters.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Read requests.
    pub reads: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Flushes.
    pub flushes: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Requests failed (bad chains, out of range, I/O errors, writes to a read-only disk).
    pub errors: AtomicU64,
}

/// The block device.
#[derive(Debug)]
pub struct Block {
    file: Arc<File>,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    counters: Arc<BlockCounters>,
    worker: Option<Worker>,
}

impl Block {
    /// Opens `path`; the size must be a multiple of 512 (a partial last sector is ignored).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or(b"disk");
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name[..n]);
        Ok(Block {
            file: Arc::new(file),
            read_only,
            capacity_sectors: len / SECTOR,
            id,
            counters: Arc::default(),
            worker: None,
        })
    }
}

/// Request context shared with the worker.
#[derive(Debug)]
pub struct BlockBackend {
    /// Image.
    pub file: Arc<File>,
    /// Read-only.
    pub read_only: bool,
    /// Size in sectors.
    pub capacity_sectors: u64,
    /// GET_ID answer.
    pub id: [u8; ID_LEN],
    /// Counters.
    pub counters: Arc<BlockCounters>,
}

impl BlockBackend {
    fn range_ok(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR)?;
        let end = off.checked_add(len as u64)?;
        (end <= self.capacity_sectors * SECTOR).then_some(off)
    }

    /// Executes one request; returns (status, bytes written into guest buffers).
    fn execute(&self, r: &mut Reader<'_>, data_w: &mut Writer<'_>) -> (u8, usize) {
        let c = &self.counters;
        let mut hdr = [0u8; 16];
        if r.read_exact(&mut hdr).is_err() {
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
        match kind {
            T_IN => {
                let len = data_w.available_bytes();
                if len > MAX_REQUEST || !(len as u64).is_multiple_of(SECTOR) {
                    return (S_IOERR, 0);
                }
                let Some(off) = self.range_ok(sector, len) else {
                    return (S_IOERR, 0);
                };
                let mut buf = vec![0u8; len];
                if self.file.read_exact_at(&mut buf, off).is_err()
                    || data_w.write_all(&buf).is_err()
                {
                    return (S_IOERR, 0);
                }
                c.reads.fetch_add(1, Ordering::Relaxed);
                c.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
                (S_OK, len)
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                let len = r.available_bytes();
                if len > MAX_REQUEST || !(len as u64).is_multiple_of(SECTOR) {
                    return (S_IOERR, 0);
                }
                let Some(off) = self.range_ok(sector, len) else {
                    return (S_IOERR, 0);
                };
                let mut buf = vec![0u8; len];
                if r.read_exact(&mut buf).is_err() || self.file.write_all_at(&buf, off).is_err() {
                    return (S_IOERR, 0);
                }
                c.writes.fetch_add(1, Ordering::Relaxed);
                c.write_bytes.fetch_add(len as u64, Ordering::Relaxed);
                (S_OK, 0)
            }
            T_FLUSH => {
                c.flushes.fetch_add(1, Ordering::Relaxed);
                if self.read_only || self.file.sync_data().is_ok() {
                    (S_OK, 0)
                } else {
                    (S_IOERR, 0)
                }
            }
            T_GET_ID => {
                let n = data_w.available_bytes().min(ID_LEN);
                if data_w.write_all(&self.id[..n]).is_err() {
                    return (S_IOERR, 0);
                }
                (S_OK, n)
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// Serves every available request; returns whether the used ring changed.
    pub fn process_queue(
        &self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, virtio_queue::Error> {
        super::check_avail(q, mem)?;
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
                (Ok(mut r), Ok(mut w)) if w.available_bytes() >= 1 => {
                    let status_at = w.available_bytes() - 1;
                    match w.split_at(status_at) {
                        Ok(mut status_w) => {
                            let (status, n) = self.execute(&mut r, &mut w);
                            if status != S_OK {
                                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                            }
                            if status_w.write_all(&[status]).is_ok() {
                                n + 1
                            } else {
                                0
                            }
                        }
                        Err(_) => {
                            self.counters.errors.fetch_add(1, Ordering::Relaxed);
                            0
                        }
                    }
                }
                _ => {
                    // No status byte to report into: complete with nothing written.
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            q.add_used(mem, head, len as u32)?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }
    fn config_bytes(&self) -> Vec<u8> {
        self.capacity_sectors.to_le_bytes().to_vec()
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        mut queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let backend = BlockBackend {
            file: self.file.clone(),
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            id: self.id,
            counters: self.counters.clone(),
        };
        let worker = Worker::spawn_single_queue(
            "virtio-blk",
            crate::seccomp::ThreadKind::Block,
            queues.remove(0),
            mem,
            interrupt,
            move |q, m| backend.process_queue(q, m),
        )
        .map_err(|source| ActivateError::Backend {
            what: "virtio-blk worker thread".into(),
            source,
        })?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
    fn metrics(&self) -> DeviceMetrics {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceMetrics::Blk(BlkMetrics {
            capacity_sectors: self.capacity_sectors,
            errors: l(&c.errors),
            flushes: l(&c.flushes),
            read_bytes: l(&c.read_bytes),
            read_only: self.read_only,
            reads: l(&c.reads),
            write_bytes: l(&c.write_bytes),
            writes: l(&c.writes),
        })
    }
}

/// The block device's counters in the metrics API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlkMetrics {
    /// Size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Failed requests.
    pub errors: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Whether the disk is read-only.
    pub read_only: bool,
    /// Read requests.
    pub reads: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Write requests.
    pub writes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn setup(read_only: bool) -> (tempfile::TempDir, BlockBackend) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let mut img = vec![0u8; 8 * 512];
        for (i, b) in img.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        std::fs::write(&p, img).unwrap();
        let b = Block::open(&p, read_only).unwrap();
        let be = BlockBackend {
            file: b.file.clone(),
            read_only,
            capacity_sectors: b.capacity_sectors,
            id: b.id,
            counters: Arc::default(),
        };
        (dir, be)
    }

    fn req(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn status(m: &GuestMemoryMmap, at: u64) -> u8 {
        m.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn read_write_flush_id_and_errors() {
        let (_d, be) = setup(false);
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&m, 32);
        req(&m, 0x10_0000, T_IN, 3); // read sector 3
        req(&m, 0x11_0000, T_OUT, 1); // write sector 1
        m.write_slice(&[0xaa; 512], GuestAddress(0x11_1000))
            .unwrap();
        req(&m, 0x12_0000, T_IN, 8); // past the end
        req(&m, 0x13_0000, T_GET_ID, 0);
        req(&m, 0x14_0000, 99, 0); // unsupported
        let d = |a, l, f, n| RawDescriptor::from(Descriptor::new(a, l, f, n));
        let descs = [
            d(0x10_0000, 16, N, 1),
            d(0x10_1000, 512, W | N, 2),
            d(0x10_2000, 1, W, 0),
            d(0x11_0000, 16, N, 4),
            d(0x11_1000, 512, N, 5),
            d(0x11_2000, 1, W, 0),
            d(0x12_0000, 16, N, 7),
            d(0x12_1000, 512, W | N, 8),
            d(0x12_2000, 1, W, 0),
            d(0x13_0000, 16, N, 10),
            d(0x13_1000, 20, W | N, 11),
            d(0x13_2000, 1, W, 0),
            d(0x14_0000, 16, N, 13),
            d(0x14_2000, 1, W, 0),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(be.process_queue(&mut q, &m).unwrap());
        let mut buf = [0u8; 512];
        m.read_slice(&mut buf, GuestAddress(0x10_1000)).unwrap();
        assert!(buf.iter().all(|&b| b == 3));
        assert_eq!(status(&m, 0x10_2000), S_OK);
        assert_eq!(status(&m, 0x11_2000), S_OK);
        let mut disk = [0u8; 512];
        be.file.read_exact_at(&mut disk, 512).unwrap();
        assert!(disk.iter().all(|&b| b == 0xaa));
        assert_eq!(status(&m, 0x12_2000), S_IOERR);
        let mut id = [0u8; 8];
        m.read_slice(&mut id, GuestAddress(0x13_1000)).unwrap();
        assert_eq!(&id, b"disk.img");
        assert_eq!(status(&m, 0x14_2000), S_UNSUPP);
        assert_eq!(be.counters.errors.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn read_only_refuses_writes_and_bad_chains_survive() {
        let (_d, be) = setup(true);
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&m, 32);
        req(&m, 0x11_0000, T_OUT, 0);
        let d = |a, l, f, n| RawDescriptor::from(Descriptor::new(a, l, f, n));
        let descs = [
            d(0x11_0000, 16, N, 1),
            d(0x11_1000, 512, N, 2),
            d(0x11_2000, 1, W, 0),
            // header only, no status byte
            d(0x11_0000, 16, 0, 0),
            // status byte outside guest memory
            d(0x11_0000, 16, N, 5),
            d(0xdead_0000_0000, 1, W, 0),
            // sector number that overflows when multiplied
            d(0x12_0000, 16, N, 7),
            d(0x12_2000, 1, W, 0),
        ];
        req(&m, 0x12_0000, T_IN, u64::MAX);
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        be.process_queue(&mut q, &m).unwrap();
        assert_eq!(status(&m, 0x11_2000), S_IOERR);
        assert_eq!(status(&m, 0x12_2000), S_IOERR, "sector * 512 overflows");
        assert_eq!(be.counters.writes.load(Ordering::Relaxed), 0);
    }
}
