//! Kicking a vCPU out of KVM_RUN so that no kick is ever lost.
//!
//! A kick is a real-time signal sent to a vCPU's thread after the VMM changed a flag the vCPU
//! must look at (pause, stop). The vCPU looks at the flags between two KVM_RUNs; a kick that
//! lands after that look but before the thread is inside KVM_RUN would interrupt nothing, and
//! the vCPU would run guest code with the flag set. To close that window the signal handler
//! sets the thread's `kvm_run.immediate_exit`: KVM_RUN then returns `EINTR` at once (after
//! completing any pending I/O), and the vCPU looks at the flags again. The vCPU re-arms
//! (clears `immediate_exit`) *before* it looks at the flags, so a kick that came earlier is
//! seen as the flag it announces, and one that comes later ends the next KVM_RUN.
//! The same design as Firecracker's vCPU kick.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null when no vCPU is bound to it.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread.
pub fn signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with` never panics: a signal handler must not unwind.
    let _ = IMMEDIATE_EXIT.try_with(|slot| {
        let p = slot.get();
        if !p.is_null() {
            // SAFETY: a non-null slot points at `immediate_exit` inside the kvm_run mapping of
            // the vCPU bound to this very thread ([`Bound`]); the binding is cleared before
            // that mapping goes away, and the handler runs on the thread that owns it.
            unsafe { ptr::write_volatile(p, 1) };
        }
    });
}

/// Installs the kick handler (process-wide; idempotent).
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(signal(), on_kick)
}

/// A vCPU bound to the current thread for kicks (see the module docs). Unbinds on drop.
#[derive(Debug)]
pub struct Bound {
    // Not Send: the binding lives in this thread's local storage.
    _thread: PhantomData<*mut u8>,
}

impl Bound {
    /// Binds `fd`'s `immediate_exit` to this thread's kick handler.
    ///
    /// # Safety
    /// `fd` must stay open (its kvm_run mapping alive) until the returned guard is dropped.
    pub unsafe fn bind(fd: &mut VcpuFd) -> Self {
        let run = fd.get_kvm_run();
        let p = ptr::addr_of_mut!(run.immediate_exit);
        IMMEDIATE_EXIT.with(|slot| slot.set(p));
        Bound {
            _thread: PhantomData,
        }
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _ = IMMEDIATE_EXIT.try_with(|slot| slot.set(ptr::null_mut()));
    }
}

/// Re-arms `fd` for the next kick: call before looking at the flags a kick announces.
pub fn rearm(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(0);
}
