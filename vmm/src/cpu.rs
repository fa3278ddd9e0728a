//! vCPU register setup: CPUID, MSRs, LAPIC, FPU, segments and the boot-protocol registers.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::BootEntry;
use crate::layout::*;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// Which step.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than we set.
    #[error("vCPU {id}: KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// Accepted.
        set: usize,
        /// Requested.
        wanted: usize,
    },
    /// Writing the GDT or page tables failed.
    #[error("cannot write {what} to guest memory")]
    GuestWrite {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WB: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// CPUID as supported by KVM, adjusted per vCPU (APIC id, topology, hypervisor bit).
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| CpuError::Kvm {
            id: 0,
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })
}

fn patch_cpuid(cpuid: &mut CpuId, id: u8, count: u8, tsc_deadline: bool) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                if tsc_deadline {
                    // KVM emulates the TSC-deadline timer with the in-kernel LAPIC but does not
                    // report it in KVM_GET_SUPPORTED_CPUID; without it Linux calibrates the
                    // LAPIC timer against the PIT, slowly and (under emulation) unreliably.
                    e.ecx |= 1 << 24;
                }
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count in ebx[23:16] is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            6 => e.ecx &= !(1 << 3), // no energy-performance-bias MSR
            _ => {}
        }
    }
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { id, what, source }
}

/// Sets CPUID, MSRs, FPU and LAPIC of vCPU `id` (all vCPUs).
/// `tsc_deadline`: advertise the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
pub fn setup_common(
    vcpu: &VcpuFd,
    base_cpuid: &CpuId,
    id: u8,
    count: u8,
    tsc_deadline: bool,
) -> Result<(), CpuError> {
    let mut cpuid = base_cpuid.clone();
    patch_cpuid(&mut cpuid, id, count, tsc_deadline);
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;

    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ];
    let list: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&list).map_err(|_| CpuError::Msrs {
        id,
        set: 0,
        wanted: list.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if set != list.len() {
        return Err(CpuError::Msrs {
            id,
            set,
            wanted: list.len(),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = get_apic_reg(&lapic.regs, reg);
        set_apic_reg(&mut lapic.regs, reg, (v & !0x700) | (mode << 8));
    }
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    Ok(())
}

fn get_apic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| regs[off + i] as u8);
    u32::from_le_bytes(b)
}

fn set_apic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Sets the registers of the boot vCPU for `entry` (and writes GDT / page tables).
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), CpuError> {
    let gw = |what| move |source| CpuError::GuestWrite { what, source };
    let long = matches!(entry, BootEntry::Linux64 { .. });
    let code = if long {
        gdt_entry(0xa09b, 0, 0xfffff)
    } else {
        gdt_entry(0xc09b, 0, 0xfffff)
    };
    let gdt = [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(gw("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(gw("IDT"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err(0, "KVM_GET_SREGS"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(gdt[2], 2);
    let data = segment(gdt[3], 3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[4], 4);
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_START_INFO;
        }
        BootEntry::Linux64 { entry } => {
            // Identity-map the first GiB with 2 MiB pages.
            mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
                .map_err(gw("PML4"))?;
            mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR))
                .map_err(gw("PDPT"))?;
            for i in 0..512u64 {
                mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))
                    .map_err(gw("page directory"))?;
            }
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = ZERO_PAGE;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err(0, "KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_err(0, "KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_roundtrip() {
        let code = gdt_entry(0xc09b, 0, 0xfffff);
        let s = segment(code, 2);
        assert_eq!((s.selector, s.type_, s.db, s.l, s.g), (0x10, 0xb, 1, 0, 1));
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.present, 1);
        let l = segment(gdt_entry(0xa09b, 0, 0xfffff), 2);
        assert_eq!((l.l, l.db), (1, 0));
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 4);
        assert_eq!((tss.limit, tss.g, tss.s), (0x67, 0, 0));
    }

    #[test]
    fn apic_reg_helpers() {
        let mut r = [0 as std::os::raw::c_char; 1024];
        set_apic_reg(&mut r, APIC_LVT0, 0xdead_beef);
        assert_eq!(get_apic_reg(&r, APIC_LVT0), 0xdead_beef);
    }
}
