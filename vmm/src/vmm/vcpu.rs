//! The vCPU thread: KVM_RUN, exits dispatched to the port and MMIO buses, pause and stop
//! through kicks (`kick.rs`). The one `unsafe` binds the kick handler to this thread's
//! `kvm_run` mapping.

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::MmioBus;
use crate::devices::legacy::PioBus;
use crate::exit::ExitReason;
use crate::kick;
use crate::nudge;
use crate::state::{ExitCounters, VmState};

/// Runs vCPU `id` until the VM stops or the guest halts, resets or crashes.
pub(super) fn run(
    id: usize,
    mut fd: VcpuFd,
    state: &VmState,
    pio: &PioBus,
    mmio: &MmioBus,
    entries: &nudge::Entries,
) {
    let c = &state.exits;
    // SAFETY: `fd` lives in this function until it returns, and `_kick` is declared after
    // it, so the binding is dropped (cleared) before the vCPU's kvm_run mapping goes away.
    let _kick = unsafe { kick::Bound::bind(&mut fd) };
    // Before the first KVM_RUN: from here on only the vCPU's allow-list.
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
        state.request_exit(ExitReason::VmmError(format!(
            "vCPU {id}: {}",
            carapace_errors::Chain(&e)
        )));
        return;
    }
    // KVM_RUN entries of this vCPU, for the triple-fault report
    let mut runs: u64 = 0;
    loop {
        // Re-arm before looking at the flags: a kick that came before this is seen as its
        // flag; one that comes after ends the next KVM_RUN at once.
        kick::rearm(&mut fd);
        if state.stopping() {
            return;
        }
        let running = state.vcpu_running();
        if state.paused() {
            drop(running);
            state.wait_while_paused();
            continue;
        }
        #[cfg(test)]
        state.test_hooks.before_run(id);
        entries.enter(id);
        runs += 1;
        let exit = fd.run();
        entries.leave(id);
        // `running` lives until the exit is handled (and counted): a pause that saw no
        // vCPU running sees its exits too.
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                ExitCounters::bump(&c.io_in);
                pio.read(port, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ExitCounters::bump(&c.io_out);
                pio.write(port, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ExitCounters::bump(&c.mmio_read);
                if !mmio.read(addr, data) {
                    ExitCounters::bump(&c.unhandled);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ExitCounters::bump(&c.mmio_write);
                if !mmio.write(addr, data) {
                    ExitCounters::bump(&c.unhandled);
                }
            }
            Ok(VcpuExit::Hlt) => {
                ExitCounters::bump(&c.hlt);
                state.guest_halted();
                return;
            }
            Ok(VcpuExit::Shutdown) => {
                log_shutdown(id, &fd, runs);
                state.guest_reset(true);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                        state.request_exit(ExitReason::PowerOff)
                    }
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => state.guest_reset(false),
                    other => state.request_exit(ExitReason::GuestCrash(format!(
                        "vCPU {id}: KVM system event {other}"
                    ))),
                }
                return;
            }
            Ok(VcpuExit::InternalError) => {
                state.request_exit(ExitReason::GuestCrash(format!(
                    "vCPU {id}: KVM internal error (emulation failure)"
                )));
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                state.request_exit(ExitReason::GuestCrash(format!(
                    "vCPU {id}: VM entry failed on host CPU {cpu}, reason {reason:#x}"
                )));
                return;
            }
            Ok(VcpuExit::Intr) => ExitCounters::bump(&c.interrupted),
            Ok(other) => {
                ExitCounters::bump(&c.other);
                tracing::debug!(vcpu = id, exit = ?other, "unhandled vCPU exit");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ExitCounters::bump(&c.interrupted);
            }
            Err(e) => {
                state.request_exit(ExitReason::VmmError(format!("vCPU {id}: KVM_RUN: {e}")));
                return;
            }
        }
    }
}

/// Says where vCPU `id` was when KVM reported a shutdown (a triple fault, or the guest's
/// own reset through one): its MP state (a vCPU the guest never started is
/// `UNINITIALIZED`/`INIT_RECEIVED`), instruction pointer and control registers, and how
/// many times it entered KVM_RUN. Best effort: a register read that fails is left out.
fn log_shutdown(id: usize, fd: &VcpuFd, runs: u64) {
    let mp = fd.get_mp_state().map(|m| m.mp_state).ok();
    let regs = fd.get_regs().ok();
    let sregs = fd.get_sregs().ok();
    tracing::warn!(
        vcpu = id,
        mp_state = ?mp,
        rip = ?regs.map(|r| format!("{:#x}", r.rip)),
        rsp = ?regs.map(|r| format!("{:#x}", r.rsp)),
        cr0 = ?sregs.map(|s| format!("{:#x}", s.cr0)),
        cr3 = ?sregs.map(|s| format!("{:#x}", s.cr3)),
        cr4 = ?sregs.map(|s| format!("{:#x}", s.cr4)),
        efer = ?sregs.map(|s| format!("{:#x}", s.efer)),
        runs,
        "KVM shutdown exit (triple fault) on this vCPU"
    );
}
