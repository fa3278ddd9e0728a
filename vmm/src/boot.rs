//! Loading the guest kernel (PVH ELF `vmlinux`, or `bzImage` via the 64-bit boot protocol),
//! the initrd and the command line, and writing the boot structures the kernel reads.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::layout::*;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors loading the kernel, initrd or command line.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}")]
    KernelRead {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF nor a bzImage.
    #[error(
        "kernel {path} is neither a PVH ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" \
         setup header)"
    )]
    UnknownFormat {
        /// Path.
        path: PathBuf,
    },
    /// The kernel is an ELF without a PVH entry note.
    #[error(
        "kernel {path} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build the \
         kernel with CONFIG_PVH=y or pass a bzImage"
    )]
    NoPvhEntry {
        /// Path.
        path: PathBuf,
    },
    /// linux-loader rejected the kernel.
    #[error("cannot load kernel {path}")]
    Load {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    InitrdRead {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit in low memory above the kernel.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge {
        /// Path.
        path: PathBuf,
        /// Size.
        size: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong {
        /// Length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Kernel image kinds we can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF with a PVH entry note.
    Elf,
    /// bzImage (x86 boot protocol).
    BzImage,
}

/// How the boot vCPU must start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `ebx` = start_info address.
    Pvh {
        /// Entry point.
        entry: u64,
    },
    /// Linux 64-bit boot protocol: long mode, identity paging, `rsi` = zero page.
    Linux64 {
        /// Entry point.
        entry: u64,
    },
}

/// Detects the kernel format from its first bytes.
pub fn detect_format(path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let mut head = [0u8; 0x206];
    let n = read_up_to(&mut f, &mut head).map_err(read_err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat {
        path: path.to_owned(),
    })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Result of loading: where to start and what was placed where.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// How the boot vCPU starts.
    pub entry: BootEntry,
    /// First byte after the kernel image.
    pub kernel_end: u64,
    /// Initrd placement `(addr, size)`.
    pub initrd: Option<(u64, u64)>,
}

/// Loads kernel, initrd and command line into `mem` and writes the boot structures.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LoadedKernel, BootError> {
    let format = detect_format(kernel)?;
    let read_err = |source| BootError::KernelRead {
        path: kernel.to_owned(),
        source,
    };
    let mut f = File::open(kernel).map_err(read_err)?;
    f.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let load_err = |source| BootError::Load {
        path: kernel.to_owned(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let (result, entry) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut f, himem).map_err(load_err)?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => {
                    let e = BootEntry::Pvh {
                        entry: a.raw_value(),
                    };
                    (r, e)
                }
                _ => {
                    return Err(BootError::NoPvhEntry {
                        path: kernel.to_owned(),
                    });
                }
            }
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut f, himem).map_err(load_err)?;
            let e = BootEntry::Linux64 {
                entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
            };
            (r, e)
        }
    };
    let kernel_end = result.kernel_load.raw_value() + result.kernel_end;

    write_cmdline(mem, cmdline)?;

    let initrd_limit = match &result.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max) + 1,
        _ => MMIO_GAP_START,
    };
    let initrd = match initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end, initrd_limit)?),
        None => None,
    };

    match entry {
        BootEntry::Pvh { .. } => write_pvh_start_info(mem, initrd)?,
        BootEntry::Linux64 { .. } => {
            let hdr = result.setup_header.unwrap_or_default();
            write_zero_page(mem, hdr, cmdline.len(), initrd)?;
        }
    }
    Ok(LoadedKernel {
        entry,
        kernel_end,
        initrd,
    })
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootError::GuestWrite {
            what: "kernel command line",
            source,
        })
}

fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map(|r| r.len())
        .unwrap_or(0)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let top = low_ram_end(mem).min(limit);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|source| BootError::GuestWrite {
            what: "initrd",
            source,
        })?;
    Ok((addr, size))
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let w = |what| move |source| BootError::GuestWrite { what, source };
    let e820 = crate::memory::e820_ram(mem);
    for (i, (addr, size)) in e820.iter().take(MAX_MEMMAP_ENTRIES).enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: E820_RAM,
            reserved: 0,
        };
        let at = PVH_MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(w("PVH memory map"))?;
    }
    let mut si = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: e820.len().min(MAX_MEMMAP_ENTRIES) as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST))
            .map_err(w("PVH module list"))?;
        si.nr_modules = 1;
        si.modlist_paddr = PVH_MODLIST;
    }
    mem.write_obj(si, GuestAddress(PVH_START_INFO))
        .map_err(w("PVH start_info"))
}

/// `boot_params` as plain bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a repr(C) struct of integers and arrays of integers (the Linux zero
// page); every bit pattern is valid and it has no implicit padding.
unsafe impl ByteValued for ZeroPage {}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    hdr: linux_loader::loader::bootparam::setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut zp = ZeroPage::default();
    let p = &mut zp.0;
    p.hdr = hdr;
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let e820 = crate::memory::e820_ram(mem);
    for (i, (addr, size)) in e820.iter().take(p.e820_table.len()).enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    p.e820_entries = e820.len().min(p.e820_table.len()) as u8;
    mem.write_obj(zp, GuestAddress(ZERO_PAGE))
        .map_err(|source| BootError::GuestWrite {
            what: "zero page",
            source,
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF64 executable whose single PT_LOAD segment holds `code` at physical
    /// address `paddr`, with a PVH entry note pointing at `paddr` (used by tests that run it).
    pub(crate) fn pvh_elf(code: &[u8], paddr: u64) -> Vec<u8> {
        let ehsize = 64u64;
        let phentsize = 56u64;
        let note_off = ehsize + 2 * phentsize;
        // note: namesz=4 "Xen\0", descsz=4, type=18 (XEN_ELFNOTE_PHYS32_ENTRY), desc=u32 entry
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(paddr as u32).to_le_bytes());
        let code_off = (note_off + note.len() as u64).next_multiple_of(16);
        let mut f = vec![0u8; code_off as usize];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&ehsize.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&(ehsize as u16).to_le_bytes());
        f[54..56].copy_from_slice(&(phentsize as u16).to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        let ph = |f: &mut Vec<u8>, i: u64, ty: u32, off: u64, addr: u64, len: u64| {
            let b = (ehsize + i * phentsize) as usize;
            f[b..b + 4].copy_from_slice(&ty.to_le_bytes());
            f[b + 4..b + 8].copy_from_slice(&5u32.to_le_bytes());
            f[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
            f[b + 16..b + 24].copy_from_slice(&addr.to_le_bytes());
            f[b + 24..b + 32].copy_from_slice(&addr.to_le_bytes());
            f[b + 32..b + 40].copy_from_slice(&len.to_le_bytes());
            f[b + 40..b + 48].copy_from_slice(&len.to_le_bytes());
            f[b + 48..b + 56].copy_from_slice(&4u64.to_le_bytes());
        };
        ph(&mut f, 0, 1, code_off, paddr, code.len() as u64); // PT_LOAD
        ph(&mut f, 1, 4, note_off, 0, note.len() as u64); // PT_NOTE
        f[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn pvh_elf_loads_with_start_info_and_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, pvh_elf(&[0xf4; 16], 0x100_0000)).unwrap();
        let i = dir.path().join("initrd");
        std::fs::write(&i, vec![7u8; 10_000]).unwrap();
        let mem = crate::memory::create(64 << 20, false).unwrap();
        let l = load(&mem, &k, Some(&i), "console=ttyS0").unwrap();
        assert_eq!(l.entry, BootEntry::Pvh { entry: 0x100_0000 });
        let (ia, isz) = l.initrd.unwrap();
        assert_eq!(isz, 10_000);
        assert_eq!(ia % 4096, 0);
        assert!(ia + isz <= 64 << 20);
        let si: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC);
        assert_eq!(si.nr_modules, 1);
        assert_eq!(si.memmap_entries, 2);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST)).unwrap();
        assert_eq!((m.paddr, m.size), (ia, isz));
        let mut c = [0u8; 14];
        mem.read_slice(&mut c, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&c, b"console=ttyS0\0");
    }

    #[test]
    fn rejects_unknown_formats_and_non_pvh_elf() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("junk");
        std::fs::write(&k, b"not a kernel").unwrap();
        let e = detect_format(&k).unwrap_err().to_string();
        assert!(e.contains("neither a PVH ELF vmlinux nor a bzImage"), "{e}");
        // An ELF whose note is not a PVH note.
        let mut elf = pvh_elf(&[0xf4], 0x100_0000);
        let pos = elf.windows(4).position(|w| w == b"Xen\0").unwrap();
        elf[pos..pos + 4].copy_from_slice(b"Foo\0");
        std::fs::write(&k, elf).unwrap();
        let mem = crate::memory::create(64 << 20, false).unwrap();
        let e = load(&mem, &k, None, "").unwrap_err().to_string();
        assert!(e.contains("without a PVH entry note"), "{e}");
    }

    #[test]
    fn initrd_too_large_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, pvh_elf(&[0xf4; 16], 0x100_0000)).unwrap();
        let i = dir.path().join("initrd");
        std::fs::File::create(&i)
            .unwrap()
            .set_len(80 << 20)
            .unwrap();
        let mem = crate::memory::create(64 << 20, false).unwrap();
        let e = load(&mem, &k, Some(&i), "").unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn cmdline_limit() {
        let mem = crate::memory::create(64 << 20, false).unwrap();
        assert!(write_cmdline(&mem, &"x".repeat(CMDLINE_MAX)).is_err());
        write_cmdline(&mem, &"x".repeat(CMDLINE_MAX - 1)).unwrap();
    }
}
