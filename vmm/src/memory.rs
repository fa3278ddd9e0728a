//! Guest memory: anonymous, or memfd-backed and shared when a vhost-user backend must map it.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

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
    let ranges = ram_ranges(size_bytes);
    let result = if shared {
        let file = memfd(size_bytes)?;
        let file = std::sync::Arc::new(file);
        let mut offset = 0u64;
        let mut with_files = Vec::new();
        for (addr, len) in ranges {
            with_files.push((addr, len, Some(FileOffset::from_arc(file.clone(), offset))));
            offset += len as u64;
        }
        GuestMemoryMmap::from_ranges_with_files(with_files)
    } else {
        GuestMemoryMmap::from_ranges(&ranges)
    };
    let mem = result.map_err(|source| MemoryError::Mmap {
        size: size_bytes,
        source,
    })?;
    advise_hugepages(&mem);
    Ok(mem)
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
mod tests {
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
}
