//! The `"trap"` action's report: a refused syscall raises SIGSYS in the thread that made
//! it; the handler writes which kind of thread and which syscall to stderr (the VMM's log)
//! and ends the process with [`super::TRAP_EXIT`]. Only async-signal-safe work in the
//! handler: a fixed buffer, one `write`, `_exit`.

use std::cell::Cell;

use super::ThreadKind;

thread_local! {
    /// The kind whose filter this thread installed (for the report).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Records the calling thread's kind for the report.
pub(super) fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

/// Offset of `si_syscall` in x86_64's `siginfo_t` (`_sigsys`: `si_call_addr` at 16, then
/// the syscall number as an `int`).
const SI_SYSCALL_OFFSET: usize = 24;

/// A byte buffer that never allocates.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = room.min(s.len());
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report line for a refused `syscall` in a thread of `kind`.
fn report(kind: Option<ThreadKind>, syscall: i32) -> Line {
    let mut l = Line {
        buf: [0; 192],
        len: 0,
    };
    l.push(b"carapace-vmm: seccomp: a ");
    l.push(kind.map_or("unfiltered", |k| k.name()).as_bytes());
    l.push(b" thread made syscall ");
    l.push_num(u64::from(syscall.unsigned_abs()));
    l.push(b", which its allow-list does not have; exiting\n");
    l
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let field = info.cast::<u8>().wrapping_add(SI_SYSCALL_OFFSET);
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; for SIGSYS
    // from seccomp its union holds `_sigsys`, whose syscall number is an int at
    // SI_SYSCALL_OFFSET, inside the 128-byte structure.
    let syscall = unsafe { field.cast::<libc::c_int>().read_unaligned() };
    let kind = KIND.try_with(Cell::get).ok().flatten();
    let l = report(kind, syscall);
    // SAFETY: write(2) is async-signal-safe; the buffer lives on this stack.
    unsafe { libc::write(libc::STDERR_FILENO, l.buf.as_ptr().cast(), l.len) };
    // SAFETY: _exit(2) is async-signal-safe and ends the process here.
    unsafe { libc::_exit(super::TRAP_EXIT) }
}

/// Installs the SIGSYS handler.
pub(super) fn install_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_kind_and_the_syscall() {
        let l = report(Some(ThreadKind::Vcpu), 59);
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).unwrap(),
            "carapace-vmm: seccomp: a vcpu thread made syscall 59, which its allow-list does not have; exiting\n"
        );
        let l = report(None, 0);
        assert!(
            std::str::from_utf8(&l.buf[..l.len])
                .unwrap()
                .contains("unfiltered thread made syscall 0,")
        );
    }
}
