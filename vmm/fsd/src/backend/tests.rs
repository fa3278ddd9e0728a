//! The vhost-user device driven through a mock split virtqueue (virtio-queue's test
//! utilities) in real guest-memory mappings: FUSE requests are written by the test as a
//! driver would, `handle_event` is called as the library's epoll thread does, and the
//! replies are read back from the used ring.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fsd_fuse_backend_rs::abi::fuse_abi::{
    FsOptions, GetattrIn, InHeader, InitIn, InitOut, KERNEL_MINOR_VERSION, KERNEL_VERSION, Opcode,
    OutHeader, stat64,
};
use fsd_fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem};
use fsd_vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use fsd_virtio_queue::desc::RawDescriptor;
use fsd_virtio_queue::desc::split::Descriptor as SplitDescriptor;
use fsd_virtio_queue::mock::MockSplitQueue;
use fsd_vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vmm_sys_util::epoll::EventSet;

use super::{FsBackend, NUM_QUEUES};
use crate::config::{CacheMode, FsConfig};
use crate::daemon::open_fs;

const QUEUE_SIZE: u16 = 64;
const REQ_BASE: u64 = 0x10_0000;
const REPLY_BASE: u64 = 0x80_0000;
const SLOT: u64 = 0x1000;

/// Guest memory, the request vring over a mock queue in it, and the call eventfd.
struct Rig {
    mem: GuestMemoryMmap,
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    vrings: Vec<VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>>,
    call: File,
    next: u16,
}

impl Rig {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let (desc, avail, used) = (mock.desc_table_addr(), mock.avail_addr(), mock.used_addr());
        drop(mock);
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let call = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // Only the request queue (1) is set up; the hiprio queue stays not ready.
        let vrings: Vec<_> = (0..NUM_QUEUES)
            .map(|i| {
                let v = VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap();
                if i == 0 {
                    return v;
                }
                v.set_queue_info(desc.raw_value(), avail.raw_value(), used.raw_value())
                    .unwrap();
                v.set_queue_size(QUEUE_SIZE);
                v.set_queue_ready(true);
                v.set_enabled(true);
                v.set_call(Some(call.try_clone().unwrap()));
                v
            })
            .collect();
        Rig {
            mem,
            atomic,
            desc,
            avail,
            used,
            vrings,
            call,
            next: 0,
        }
    }

    /// Adds one request (header + body) with a writable reply buffer; returns its slot.
    fn push(&mut self, opcode: Opcode, unique: u64, body: &[u8]) -> u16 {
        let slot = self.next;
        self.next += 1;
        let req = GuestAddress(REQ_BASE + u64::from(slot) * SLOT);
        let header = InHeader {
            len: u32::try_from(std::mem::size_of::<InHeader>() + body.len()).unwrap(),
            opcode: opcode as u32,
            unique,
            nodeid: 1,
            ..Default::default()
        };
        self.mem.write_obj(header, req).unwrap();
        self.mem
            .write_slice(
                body,
                req.unchecked_add(std::mem::size_of::<InHeader>() as u64),
            )
            .unwrap();
        let d0 = SplitDescriptor::new(
            req.raw_value(),
            header.len,
            VRING_DESC_F_NEXT as u16,
            2 * slot + 1,
        );
        let d1 = SplitDescriptor::new(
            REPLY_BASE + u64::from(slot) * SLOT,
            SLOT as u32,
            VRING_DESC_F_WRITE as u16,
            0,
        );
        for (i, d) in [(2 * slot, d0), (2 * slot + 1, d1)] {
            self.mem
                .write_obj(
                    RawDescriptor::from(d),
                    self.desc.unchecked_add(16 * u64::from(i)),
                )
                .unwrap();
        }
        // The driver's side: the head in the next avail slot, then the avail index.
        let idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
        self.mem
            .write_obj(
                2 * slot,
                self.avail
                    .unchecked_add(4 + 2 * u64::from(idx % QUEUE_SIZE)),
            )
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
        slot
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// Waits until `n` chains are in the used ring.
    fn wait_used(&self, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.used_idx() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} replies",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn reply<T: ByteValued>(&self, slot: u16) -> (OutHeader, T) {
        let at = GuestAddress(REPLY_BASE + u64::from(slot) * SLOT);
        let h: OutHeader = self.mem.read_obj(at).unwrap();
        let body: T = self
            .mem
            .read_obj(at.unchecked_add(std::mem::size_of::<OutHeader>() as u64))
            .unwrap();
        (h, body)
    }

    fn kick<F: FileSystem + Send + Sync + 'static>(&self, backend: &FsBackend<F>) {
        backend
            .handle_event(1, EventSet::IN, &self.vrings, 0)
            .unwrap();
    }

    /// How many times the guest was signalled since the last call (0 if never).
    fn calls(&self) -> u64 {
        let mut b = [0u8; 8];
        match std::io::Read::read(&mut &self.call, &mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }
}

fn backend_for<F: FileSystem + Send + Sync + 'static>(
    rig: &Rig,
    fs: Arc<F>,
    pool: usize,
    event_idx: bool,
) -> FsBackend<F> {
    let backend = FsBackend::new(fs, pool).unwrap();
    backend.update_memory(rig.atomic.clone()).unwrap();
    backend.set_event_idx(event_idx);
    for v in &rig.vrings {
        v.set_queue_event_idx(event_idx);
    }
    backend
}

fn init_body(flags: u32) -> Vec<u8> {
    InitIn {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        max_readahead: 128 << 10,
        flags,
    }
    .as_slice()
    .to_vec()
}

/// What a Linux 6.1 guest offers at FUSE_INIT (without INIT_EXT, which would add a
/// second flags word).
fn linux_offer() -> u32 {
    let o = FsOptions::ASYNC_READ
        | FsOptions::POSIX_LOCKS
        | FsOptions::ATOMIC_O_TRUNC
        | FsOptions::EXPORT_SUPPORT
        | FsOptions::BIG_WRITES
        | FsOptions::DONT_MASK
        | FsOptions::SPLICE_WRITE
        | FsOptions::SPLICE_MOVE
        | FsOptions::SPLICE_READ
        | FsOptions::FLOCK_LOCKS
        | FsOptions::HAS_IOCTL_DIR
        | FsOptions::AUTO_INVAL_DATA
        | FsOptions::DO_READDIRPLUS
        | FsOptions::READDIRPLUS_AUTO
        | FsOptions::ASYNC_DIO
        | FsOptions::WRITEBACK_CACHE
        | FsOptions::ZERO_MESSAGE_OPEN
        | FsOptions::PARALLEL_DIROPS
        | FsOptions::HANDLE_KILLPRIV
        | FsOptions::POSIX_ACL
        | FsOptions::ABORT_ERROR
        | FsOptions::MAX_PAGES
        | FsOptions::CACHE_SYMLINKS
        | FsOptions::ZERO_MESSAGE_OPENDIR
        | FsOptions::EXPLICIT_INVAL_DATA
        | FsOptions::HANDLE_KILLPRIV_V2;
    u32::try_from(o.bits()).unwrap()
}

#[test]
fn init_negotiates_one_mib_requests_and_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = FsConfig::new(dir.path(), CacheMode::Never, false, true, false, 0).unwrap();
    let fs = open_fs(&cfg, &cfg.shared_dir).unwrap();
    let mut rig = Rig::new();
    let backend = backend_for(&rig, Arc::new(fs), 0, true);
    let slot = rig.push(Opcode::Init, 7, &init_body(linux_offer()));
    rig.kick(&backend);
    rig.wait_used(1);
    let (h, out): (OutHeader, InitOut) = rig.reply(slot);
    assert_eq!((h.error, h.unique), (0, 7));
    // Before: max_write 8 KiB and 32 pages, i.e. ~128 requests per MiB written.
    assert_eq!(out.max_write, 1 << 20);
    assert_eq!(out.max_pages, 256);
    let flags = FsOptions::from_bits_truncate(u64::from(out.flags));
    for want in [
        FsOptions::BIG_WRITES,
        FsOptions::MAX_PAGES,
        FsOptions::ASYNC_READ,
        FsOptions::ASYNC_DIO,
        FsOptions::PARALLEL_DIROPS,
        FsOptions::ATOMIC_O_TRUNC,
    ] {
        assert!(flags.contains(want), "{want:?} not in {flags:?}");
    }
    // --cache never: no READDIRPLUS (zero timeouts, see GuardedFs::with_readdirplus).
    for never in [
        FsOptions::DO_READDIRPLUS,
        FsOptions::ZERO_MESSAGE_OPEN,
        FsOptions::ZERO_MESSAGE_OPENDIR,
        FsOptions::WRITEBACK_CACHE,
        FsOptions::HANDLE_KILLPRIV_V2,
        FsOptions::POSIX_LOCKS,
        FsOptions::FLOCK_LOCKS,
    ] {
        assert!(!flags.contains(never), "{never:?} in {flags:?}");
    }
    // With EVENT_IDX and used_event 0 (the driver's initial value), the first reply is
    // signalled.
    assert_eq!(rig.calls(), 1);
}

/// A filesystem whose getattr waits (bounded) until `expected` getattrs have arrived,
/// recording how many ran at the same time.
struct Gate {
    expected: usize,
    wait: Duration,
    state: Mutex<(usize, usize, usize)>, // active, max active, arrived
    cv: Condvar,
}

impl Gate {
    fn new(expected: usize, wait: Duration) -> Self {
        Gate {
            expected,
            wait,
            state: Mutex::new((0, 0, 0)),
            cv: Condvar::new(),
        }
    }
}

impl FileSystem for Gate {
    type Inode = u64;
    type Handle = u64;

    fn lookup(&self, _: &Context, _: u64, _: &CStr) -> io::Result<Entry> {
        Err(io::Error::from_raw_os_error(libc::ENOENT))
    }

    fn getattr(&self, _: &Context, _: u64, _: Option<u64>) -> io::Result<(stat64, Duration)> {
        let deadline = Instant::now() + self.wait;
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        s.1 = s.1.max(s.0);
        s.2 += 1;
        self.cv.notify_all();
        while s.2 < self.expected {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self.cv.wait_timeout(s, left).unwrap().0;
        }
        s.0 -= 1;
        // SAFETY: stat64 is plain integers; all zeroes is a valid value.
        let st: stat64 = unsafe { std::mem::zeroed() };
        Ok((st, Duration::ZERO))
    }
}

fn getattr_body() -> Vec<u8> {
    GetattrIn::default().as_slice().to_vec()
}

#[test]
fn thread_pool_serves_requests_concurrently() {
    const N: usize = 4;
    let mut rig = Rig::new();
    let gate = Arc::new(Gate::new(N, Duration::from_secs(20)));
    let backend = backend_for(&rig, Arc::clone(&gate), N, false);
    let slots: Vec<u16> = (0..N)
        .map(|i| rig.push(Opcode::Getattr, 100 + i as u64, &getattr_body()))
        .collect();
    let t = Instant::now();
    rig.kick(&backend);
    rig.wait_used(N as u16);
    // Every getattr waited for the others: only possible if N ran at once.
    let max_active = gate.state.lock().unwrap().1;
    assert_eq!(max_active, N, "requests were not served concurrently");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    for (i, slot) in slots.into_iter().enumerate() {
        let (h, _): (OutHeader, [u8; 16]) = rig.reply(slot);
        assert_eq!((h.error, h.unique), (0, 100 + i as u64));
    }
    // Without EVENT_IDX every used buffer is signalled (the eventfd counts them).
    assert_eq!(rig.calls(), N as u64);
}

#[test]
fn without_a_pool_requests_are_served_one_at_a_time() {
    let mut rig = Rig::new();
    let gate = Arc::new(Gate::new(2, Duration::from_millis(100)));
    let backend = backend_for(&rig, Arc::clone(&gate), 0, false);
    rig.push(Opcode::Getattr, 1, &getattr_body());
    rig.push(Opcode::Getattr, 2, &getattr_body());
    rig.kick(&backend);
    // Inline: handle_event returns after both were served.
    assert_eq!(rig.used_idx(), 2);
    assert_eq!(gate.state.lock().unwrap().1, 1);
}

#[test]
fn event_idx_rearms_the_avail_event_after_a_batch() {
    let mut rig = Rig::new();
    let gate = Arc::new(Gate::new(1, Duration::ZERO));
    let backend = backend_for(&rig, gate, 0, true);
    for i in 0..3 {
        rig.push(Opcode::Getattr, i, &getattr_body());
    }
    rig.kick(&backend);
    assert_eq!(rig.used_idx(), 3);
    // avail_event (after the used ring's entries) tells the driver to kick for entry 3.
    let avail_event: u16 = rig
        .mem
        .read_obj(rig.used.unchecked_add(4 + 8 * u64::from(QUEUE_SIZE)))
        .unwrap();
    assert_eq!(avail_event, 3);
    // used_event is 0: only the first completion crossed it, one signal for the batch.
    assert_eq!(rig.calls(), 1);
}

fn expired_timer() -> vmm_sys_util::timerfd::TimerFd {
    let mut t = vmm_sys_util::timerfd::TimerFd::new().unwrap();
    t.reset(Duration::from_nanos(1), Some(Duration::from_nanos(1)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1));
    t
}

fn tick<F: FileSystem + Send + Sync + 'static>(rig: &Rig, backend: &FsBackend<F>) {
    backend
        .handle_event(super::WATCHDOG_EVENT, EventSet::IN, &rig.vrings, 0)
        .unwrap();
}

#[test]
fn watchdog_serves_requests_that_no_kick_announced() {
    let mut rig = Rig::new();
    let gate = Arc::new(Gate::new(1, Duration::ZERO));
    let backend = backend_for(&rig, gate, 0, true).with_watchdog(expired_timer());
    assert!(backend.watchdog_fd().is_some());
    rig.push(Opcode::Getattr, 1, &getattr_body());
    // The kick is lost: only ticks run. The first one only takes a snapshot; a request
    // still waiting, unchanged, at the next one is served.
    tick(&rig, &backend);
    assert_eq!(rig.used_idx(), 0);
    tick(&rig, &backend);
    assert_eq!(rig.used_idx(), 1);
    let (h, _): (OutHeader, [u8; 16]) = rig.reply(0);
    assert_eq!((h.error, h.unique), (0, 1));
}

#[test]
fn watchdog_signals_again_when_the_guest_did_not_consume_replies() {
    let mut rig = Rig::new();
    let gate = Arc::new(Gate::new(1, Duration::ZERO));
    let backend = backend_for(&rig, gate, 0, true).with_watchdog(expired_timer());
    rig.push(Opcode::Getattr, 1, &getattr_body());
    rig.kick(&backend);
    assert_eq!((rig.used_idx(), rig.calls()), (1, 1));
    // Recorded for the diagnosis: the guest was signalled up to used index 1.
    assert_eq!(
        backend.shared.signalled[1].load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The interrupt got lost: used_event stays 0 while the used index is 1.
    tick(&rig, &backend);
    assert_eq!(rig.calls(), 0);
    tick(&rig, &backend);
    assert_eq!(rig.calls(), 1, "no second signal");
    // Once the driver consumed it (used_event = 1), ticks stay quiet.
    let used_event_at = rig.avail.unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
    rig.mem.write_obj(1u16, used_event_at).unwrap();
    tick(&rig, &backend);
    tick(&rig, &backend);
    tick(&rig, &backend);
    assert_eq!(rig.calls(), 0);
    assert_eq!(rig.used_idx(), 1);
}
