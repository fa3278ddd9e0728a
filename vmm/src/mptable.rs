//! Intel MultiProcessor table: how a guest without ACPI finds its vCPUs and the IOAPIC.
//!
//! Placed at 639 KiB (the last KiB of base memory, which Linux scans for `_MP_`), outside the
//! RAM given in the e820 map. Interrupt entries follow KVM's default GSI routing: ISA IRQ 0
//! (the PIT) arrives on IOAPIC pin 2, every other IRQ n on pin n.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_START, IRQ_MAX};

const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// CPU signature / feature flags reported per processor entry (family 6, FPU + APIC).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many vCPUs for the space reserved.
    #[error("{0} vCPUs do not fit in the MP table area")]
    TooManyCpus(u8),
    /// Guest memory write failed.
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the table for `cpus` vCPUs as located at `base`.
pub fn build(base: u64, cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[0, id, APIC_VERSION]);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    let mut intsrc = |kind: u8, src: u8, pin: u8| {
        entries.extend_from_slice(&[3, kind, 0, 0, 0, src, ioapic_id, pin]);
        count += 1;
    };
    intsrc(MP_EXTINT, 0, 0);
    intsrc(MP_INT, 0, 2);
    for irq in 1..=IRQ_MAX as u8 {
        if irq != 2 {
            intsrc(MP_INT, irq, irq);
        }
    }
    for (kind, lint) in [(MP_EXTINT, 0u8), (MP_NMI, 1u8)] {
        entries.extend_from_slice(&[4, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let fp_len = 16usize;
    let table_addr = base + fp_len as u64;
    let mut table: Vec<u8> = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"CARAPACE");
    table.extend_from_slice(b"microVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp: Vec<u8> = Vec::new();
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

/// Writes the table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let t = build(EBDA_START, cpus);
    if t.len() > 0x400 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    mem.write_slice(&t, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_layout() {
        let t = build(EBDA_START, 4);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let physptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        assert_eq!(u64::from(physptr), EBDA_START + 16);
        // 4 cpus + bus + ioapic + 24 intsrc (ExtINT + 23) + 2 lint
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn fits_for_max_vcpus() {
        let mem = crate::memory::create(64 << 20, false).unwrap();
        write(&mem, crate::config::MAX_VCPUS).unwrap();
    }
}
