//! Guest memory: anonymous, or memfd-backed and shared when a vhost-user backend must map it.
//!
//! With memory hot-plug the VM also gets a region above RAM (`layout::hotplug_base`) that
//! the virtio-mem device hands out block by block. The whole region is mapped, registered
//! with KVM and part of the [`GuestMemoryMmap`] every device and vhost backend sees from
//! the start, sparsely (MAP_NORESERVE, nothing allocated until touched) and with the same
//! backing as RAM, so a buffer the guest puts in hot-plugged memory is reachable by
//! vhost-user and vhost-net like any other; the device only tracks which blocks are
//! plugged and gives unplugged blocks back to the host ([`HotplugRegion::discard`]).

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, hotplug_base};

/// Errors creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create a memfd of {size} bytes for guest memory")]
    Memfd {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Mapping failed.
    #[error("cannot map {size} bytes of guest memory")]
    Mmap {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot} at {addr:#x}")]
    Register {
        /// Slot number.
        slot: u32,
        /// Guest address.
        addr: u64,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A region has no host address (cannot happen with mmap regions).
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostAddress(u64),
    /// The hot-plug region could not be split off the guest memory (cannot happen).
    #[error("cannot separate the hot-plug region from guest RAM")]
    Split(#[source] vm_memory::GuestRegionCollectionError),
}

/// Errors giving hot-plug memory back to the host.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is not inside the region.
    #[error("range {offset:#x}+{len:#x} is outside the memory region of {size:#x} bytes")]
    OutOfRange {
        /// Offset in the region.
        offset: u64,
        /// Length.
        len: u64,
        /// Region size.
        size: u64,
    },
    /// The guest-physical range is not inside one region of guest memory.
    #[error("guest range {addr:#x}+{len:#x} is not inside one region of guest memory")]
    NotGuestMemory {
        /// Guest-physical start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// fallocate(PUNCH_HOLE) or madvise(MADV_DONTNEED) failed.
    #[error("{what} failed")]
    Os {
        /// The call.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Guest memory of a VM: everything (RAM and the hot-plug region: what KVM, the devices and
/// vhost backends see), RAM alone (what the loader and the e820/PVH map describe), and the
/// hot-plug region.
#[derive(Debug)]
pub struct GuestMemory {
    /// RAM and the hot-plug region.
    pub all: GuestMemoryMmap,
    /// RAM only.
    pub ram: GuestMemoryMmap,
    /// The hot-plug region, when the VM has one.
    pub hotplug: Option<HotplugRegion>,
}

/// The memory hot-plug region: mapped whole, backed sparsely like RAM.
#[derive(Debug, Clone)]
pub struct HotplugRegion {
    region: Arc<GuestRegionMmap>,
}

impl HotplugRegion {
    /// Guest physical address of the region.
    pub fn addr(&self) -> u64 {
        self.region.start_addr().raw_value()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.region.len()
    }

    /// Gives `[offset, offset + len)` of the region back to the host
    /// ([`discard_in_region`]); the range reads as zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DiscardError> {
        discard_in_region(&self.region, offset, len)
    }

    /// The host address of `offset` in the region (for tests that measure what is resident).
    pub fn host_address(&self, offset: u64) -> Option<*mut u8> {
        self.region
            .get_host_address(vm_memory::MemoryRegionAddress(offset))
            .ok()
    }

    /// The backing memfd, when the region is shared.
    pub fn file(&self) -> Option<&File> {
        self.region.file_offset().map(FileOffset::file)
    }
}

/// Gives `[offset, offset + len)` of `region` back to the host: a hole punched in the
/// memfd when the region is shared (vhost-user backends map the same file, so the pages
/// leave their mappings too), MADV_DONTNEED on the anonymous mapping otherwise. The range
/// reads as zeros afterwards; the guest touching it again gets fresh pages.
pub fn discard_in_region(
    region: &GuestRegionMmap,
    offset: u64,
    len: u64,
) -> Result<(), DiscardError> {
    let size = region.len();
    let out = || DiscardError::OutOfRange { offset, len, size };
    let end = offset.checked_add(len).ok_or_else(out)?;
    if end > size {
        return Err(out());
    }
    if len == 0 {
        return Ok(());
    }
    // Every range given back, for matching against a guest fault (off by default:
    // RUST_LOG=carapace_vmm::discard=debug).
    tracing::debug!(
        target: "carapace_vmm::discard",
        gpa = format_args!("{:#x}", region.start_addr().raw_value().saturating_add(offset)),
        len,
        "guest memory range discarded"
    );
    if let Some(fo) = region.file_offset() {
        let start = fo.start().checked_add(offset).ok_or_else(out)?;
        rustix::fs::fallocate(
            fo.file(),
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            start,
            len,
        )
        .map_err(|e| DiscardError::Os {
            what: "fallocate(PUNCH_HOLE) on the guest memory memfd",
            source: e.into(),
        })?;
        return Ok(());
    }
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(offset))
        .map_err(|_| out())?;
    let len = usize::try_from(len).map_err(|_| out())?;
    // SAFETY: [host, host + len) lies inside the region's own anonymous private mapping
    // (checked above), which `region` keeps alive. MADV_DONTNEED only drops its pages (they
    // read as zeros afterwards); no Rust reference points into guest memory (all access
    // goes through vm-memory's volatile accessors).
    unsafe { rustix::mm::madvise(host.cast(), len, rustix::mm::Advice::LinuxDontNeed) }.map_err(
        |e| DiscardError::Os {
            what: "madvise(MADV_DONTNEED) on guest memory",
            source: e.into(),
        },
    )
}

/// Gives the guest-physical range `[addr, addr + len)` back to the host
/// ([`discard_in_region`]); it must lie inside one region of `mem`.
pub fn discard_guest_range(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
) -> Result<(), DiscardError> {
    let bad = || DiscardError::NotGuestMemory {
        addr: addr.raw_value(),
        len,
    };
    let region = mem.find_region(addr).ok_or_else(bad)?;
    let offset = addr.raw_value() - region.start_addr().raw_value();
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad());
    }
    discard_in_region(region, offset, len)
}

/// Guest RAM ranges `(start, size)` for `size_bytes` of memory, leaving the 32-bit MMIO hole.
pub fn ram_ranges(size_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = size_bytes.min(MMIO_GAP_START);
    let mut v = vec![(GuestAddress(0), low as usize)];
    if size_bytes > MMIO_GAP_START {
        v.push((
            GuestAddress(MMIO_GAP_END),
            (size_bytes - MMIO_GAP_START) as usize,
        ));
    }
    v
}

/// e820 map `(start, size)` of usable RAM given to the guest (E820_RAM entries).
pub fn e820_ram(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let start = r.start_addr().raw_value();
        let end = start + r.len();
        if start == 0 {
            out.push((0, EBDA_START.min(end)));
            if end > HIMEM_START {
                out.push((HIMEM_START, end - HIMEM_START));
            }
        } else {
            out.push((start, end - start));
        }
    }
    out
}

/// Creates guest memory of `size_bytes`; `shared` backs it with a memfd mapped MAP_SHARED so a
/// vhost-user backend can map the same pages.
pub fn create(size_bytes: u64, shared: bool) -> Result<GuestMemoryMmap, MemoryError> {
    Ok(create_with_hotplug(size_bytes, shared, 0)?.all)
}

/// Creates guest RAM of `ram_bytes` and, when `hotplug_bytes` > 0, the hot-plug region of
/// that size at `layout::hotplug_base`, with the same backing (a memfd of its own when
/// `shared`). Both are mapped MAP_NORESERVE: nothing is allocated until the guest touches
/// it.
pub fn create_with_hotplug(
    ram_bytes: u64,
    shared: bool,
    hotplug_bytes: u64,
) -> Result<GuestMemory, MemoryError> {
    let mut ranges = ram_ranges(ram_bytes);
    let hotplug_addr = GuestAddress(hotplug_base(ram_bytes));
    let total = ram_bytes.saturating_add(hotplug_bytes);
    let map_err = |source| MemoryError::Mmap {
        size: total,
        source,
    };
    let hotplug_len = usize::try_from(hotplug_bytes)
        .map_err(|_| map_err(vm_memory::mmap::FromRangesError::InvalidGuestRegion))?;
    let result = if shared {
        let file = Arc::new(memfd(ram_bytes)?);
        let mut offset = 0u64;
        let mut with_files = Vec::new();
        for (addr, len) in ranges {
            with_files.push((addr, len, Some(FileOffset::from_arc(file.clone(), offset))));
            offset += len as u64;
        }
        if hotplug_bytes > 0 {
            let file = memfd(hotplug_bytes)?;
            with_files.push((hotplug_addr, hotplug_len, Some(FileOffset::new(file, 0))));
        }
        GuestMemoryMmap::from_ranges_with_files(with_files)
    } else {
        if hotplug_bytes > 0 {
            ranges.push((hotplug_addr, hotplug_len));
        }
        GuestMemoryMmap::from_ranges(&ranges)
    };
    let all = result.map_err(map_err)?;
    advise_hugepages(&all);
    if hotplug_bytes == 0 {
        return Ok(GuestMemory {
            ram: all.clone(),
            all,
            hotplug: None,
        });
    }
    let (ram, region) = all
        .remove_region(hotplug_addr, hotplug_bytes)
        .map_err(MemoryError::Split)?;
    Ok(GuestMemory {
        all,
        ram,
        hotplug: Some(HotplugRegion { region }),
    })
}

/// Asks for transparent huge pages on guest RAM: every first touch of guest memory is a
/// nested page fault, and 2 MiB pages make a booting guest take 512 times fewer of them.
/// Best effort (THP may be disabled on the host).
fn advise_hugepages(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        let Ok(host) = r.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: [host, host+len) is exactly one mapping owned by `mem`; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents or validity.
        let rc = unsafe { libc::madvise(host.cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "MADV_HUGEPAGE refused for guest memory"
            );
        }
    }
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    let err = |source| MemoryError::Memfd { size, source };
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"carapace-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(err)?;
    Ok(file)
}

/// Registers every region of `mem` with the VM as consecutive memory slots.
pub fn register(vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let start = region.start_addr().raw_value();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::NoHostAddress(start))?;
        let slot = slot as u32;
        let desc = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: start,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping [host, host+len) belongs to `mem`, which the caller keeps alive
        // (it is stored in the Vm for as long as the VM fd exists), and slots do not overlap
        // because the regions of a GuestMemoryMmap do not overlap.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::Register {
            slot,
            addr: start,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_skip_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
    }

    #[test]
    fn shared_memory_is_memfd_backed_and_usable() {
        let m = create(64 << 20, true).unwrap();
        assert!(m.iter().next().unwrap().file_offset().is_some());
        m.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let e = e820_ram(&m);
        assert_eq!(
            e,
            vec![(0, EBDA_START), (HIMEM_START, (64 << 20) - HIMEM_START)]
        );
    }

    /// Resident bytes of `[host, host + len)` (mincore: exactly that range, whatever
    /// mapping the kernel merged it into; smaps' per-mapping Rss counted a neighbouring
    /// guest RAM mapping merged with the region, and a test failed in CI).
    pub(crate) fn resident_bytes(host: *mut u8, len: u64) -> u64 {
        const PAGE: usize = 4096;
        let len = usize::try_from(len).unwrap();
        let mut vec = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: [host, host + len) is a live mapping of guest memory the caller owns, and
        // `vec` has one byte per page of it for the kernel to fill; mincore reads nothing.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count() as u64 * PAGE as u64
    }

    fn hotplug_region_is_mapped_registered_and_gives_memory_back(shared: bool) {
        let g = create_with_hotplug(64 << 20, shared, 256 << 20).unwrap();
        let h = g.hotplug.as_ref().unwrap();
        assert_eq!((h.addr(), h.size()), (4 << 30, 256 << 20));
        assert_eq!(h.file().is_some(), shared);
        // The devices and KVM see RAM and the region; the guest's memory map only RAM.
        assert_eq!(g.all.num_regions(), 2);
        assert_eq!(g.ram.num_regions(), 1);
        assert_eq!(
            e820_ram(&g.ram),
            e820_ram(&create(64 << 20, shared).unwrap())
        );
        let base = GuestAddress(4 << 30);
        let host = h.host_address(0).unwrap();
        assert_eq!(resident_bytes(host, h.size()), 0, "sparse until touched");
        // Touch 16 MiB, then give back the first 8 MiB.
        for off in (0..16 << 20).step_by(4096) {
            g.all.write_obj(0x5a_u8, base.unchecked_add(off)).unwrap();
        }
        let touched = resident_bytes(host, h.size());
        assert!(touched >= 16 << 20, "{touched}");
        let allocated = || {
            use std::os::unix::fs::MetadataExt;
            h.file().map(|f| f.metadata().unwrap().blocks() * 512)
        };
        let before = allocated();
        h.discard(0, 8 << 20).unwrap();
        let after = resident_bytes(host, h.size());
        assert!(after <= touched - (8 << 20), "{touched} -> {after}");
        if let (Some(before), Some(after)) = (before, allocated()) {
            assert!(before >= 16 << 20, "{before}");
            assert!(after <= before - (8 << 20), "memfd: {before} -> {after}");
        }
        assert_eq!(g.all.read_obj::<u8>(base).unwrap(), 0);
        assert_eq!(
            g.all.read_obj::<u8>(base.unchecked_add(8 << 20)).unwrap(),
            0x5a
        );
        // Ranges outside the region are refused, overflow included.
        assert!(h.discard(256 << 20, 1).is_err());
        assert!(h.discard(u64::MAX, 2).is_err());
        h.discard(256 << 20, 0).unwrap();
    }

    #[test]
    fn anonymous_hotplug_region() {
        hotplug_region_is_mapped_registered_and_gives_memory_back(false);
    }

    #[test]
    fn shared_hotplug_region() {
        hotplug_region_is_mapped_registered_and_gives_memory_back(true);
    }

    fn guest_ranges_are_given_back(shared: bool) {
        let m = create(64 << 20, shared).unwrap();
        let host = m
            .find_region(GuestAddress(0))
            .unwrap()
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        for off in (0..32 << 20).step_by(4096) {
            m.write_obj(0x77_u8, GuestAddress(off)).unwrap();
        }
        let touched = resident_bytes(host, 64 << 20);
        assert!(touched >= 32 << 20, "{touched}");
        discard_guest_range(&m, GuestAddress(8 << 20), 16 << 20).unwrap();
        let after = resident_bytes(host, 64 << 20);
        assert!(after <= touched - (16 << 20), "{touched} -> {after}");
        assert_eq!(m.read_obj::<u8>(GuestAddress(8 << 20)).unwrap(), 0);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress((24 << 20) - 4096)).unwrap(),
            0
        );
        assert_eq!(m.read_obj::<u8>(GuestAddress(24 << 20)).unwrap(), 0x77);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress((8 << 20) - 4096)).unwrap(),
            0x77
        );
        // Outside guest memory, across its end, overflowing: refused, nothing changes.
        for (addr, len) in [
            (64 << 20, 4096),
            ((64 << 20) - 4096, 8192),
            (4096, u64::MAX),
        ] {
            assert!(
                matches!(
                    discard_guest_range(&m, GuestAddress(addr), len),
                    Err(DiscardError::NotGuestMemory { .. })
                ),
                "{addr:#x}+{len:#x}"
            );
        }
        assert_eq!(m.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0x77);
    }

    #[test]
    fn anonymous_guest_ranges_are_given_back() {
        guest_ranges_are_given_back(false);
    }

    #[test]
    fn shared_guest_ranges_are_given_back() {
        guest_ranges_are_given_back(true);
    }
}
