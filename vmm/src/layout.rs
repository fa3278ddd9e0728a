//! Guest physical memory layout (x86_64) shared by the loader, the vCPU setup and the devices.

/// GDT written for the boot vCPU (PVH: flat 32-bit; bzImage: 64-bit).
pub const GDT_ADDR: u64 = 0x500;
/// Empty IDT for the boot vCPU.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map (e820-like entries).
pub const PVH_MEMMAP: u64 = 0x7000;
/// Maximum number of memory map entries we ever write.
pub const MAX_MEMMAP_ENTRIES: usize = 8;
/// bzImage: zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// bzImage: identity page tables (PML4, PDPT, PD).
pub const PML4_ADDR: u64 = 0x9000;
/// bzImage page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// bzImage page directory (2 MiB pages, first GiB).
pub const PD_ADDR: u64 = 0xb000;
/// Initial stack pointer for the bzImage 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Maximum kernel command line length (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// End of the low RAM usable below the EBDA.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory (kernel load address lower bound).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM above this is relocated above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Alignment of the memory hot-plug (virtio-mem) region: 1 GiB, a multiple of Linux's
/// 128 MiB memory block on x86_64 and of every block size we accept.
pub const HOTPLUG_ALIGN: u64 = 1 << 30;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IRQ (IOAPIC pin) given to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable IOAPIC pin.
pub const IRQ_MAX: u32 = 23;
/// KVM TSS address (3 pages inside the MMIO hole, below the LAPIC/IOAPIC).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// COM1 I/O base and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1 IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard IRQ.
pub const KBD_IRQ: u32 = 1;
/// i8042 controller: data port 0x60 .. command port 0x64.
pub const I8042_PORT: u16 = 0x60;
/// Boot-done / power-intent marker port.
pub const MARKER_PORT: u16 = 0x3f0;

/// End (exclusive) of guest RAM of `ram_bytes`: RAM above [`MMIO_GAP_START`] is moved above
/// 4 GiB (see `memory::ram_ranges`).
pub fn ram_end(ram_bytes: u64) -> u64 {
    if ram_bytes > MMIO_GAP_START {
        MMIO_GAP_END + (ram_bytes - MMIO_GAP_START)
    } else {
        ram_bytes
    }
}

/// Guest address of the memory hot-plug region of a VM with `ram_bytes` of RAM: above RAM
/// and above the 32-bit MMIO hole, aligned to [`HOTPLUG_ALIGN`]. Not in the e820/PVH map.
pub fn hotplug_base(ram_bytes: u64) -> u64 {
    ram_end(ram_bytes)
        .max(MMIO_GAP_END)
        .next_multiple_of(HOTPLUG_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hotplug_region_is_above_ram_and_the_mmio_hole_and_aligned() {
        assert_eq!(hotplug_base(256 << 20), 4 << 30);
        assert_eq!(hotplug_base(3 << 30), 4 << 30);
        // 3.5 GiB of RAM: 0.5 GiB moved to 4 GiB..4.5 GiB; the region starts at 5 GiB.
        assert_eq!(ram_end(7 << 29), 9 << 29);
        assert_eq!(hotplug_base(7 << 29), 5 << 30);
        assert_eq!(hotplug_base(4 << 30), 5 << 30);
        assert_eq!(hotplug_base(5 << 30), 6 << 30);
    }
}
