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
