//! The agent's few raw system calls, each in a small function with its SAFETY reasoning.

use std::os::fd::{AsRawFd, BorrowedFd};

/// I/O port our VMM watches for the boot-done marker.
pub const BOOT_MARKER_PORT: u16 = 0x3f0;
/// Value written to [`BOOT_MARKER_PORT`] once the agent serves requests.
pub const BOOT_MARKER_VALUE: u8 = 123;
/// Value written before the reset that powers the VM off (our VMM's convention: the guest
/// has no ACPI, so power-off is "announce on the marker port, then reset").
pub const POWER_OFF_MARKER_VALUE: u8 = 124;

/// Writes the boot-done marker byte to I/O port 0x3f0. Errors when `ioperm` is refused
/// (not root, or not on x86_64); callers ignore that outside a VM.
pub fn write_boot_marker() -> std::io::Result<()> {
    write_marker(BOOT_MARKER_VALUE)
}

/// Writes `value` to the marker port 0x3f0.
pub fn write_marker(value: u8) -> std::io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ioperm only changes this thread's I/O permission bitmap; the arguments
        // are plain integers and no memory is passed.
        let rc = unsafe { libc::ioperm(libc::c_ulong::from(BOOT_MARKER_PORT), 1, 1) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: ioperm above granted this thread access to exactly this port, so `out`
        // cannot fault; the instruction touches no memory and clobbers no other register.
        unsafe {
            std::arch::asm!(
                "out dx, al",
                in("dx") BOOT_MARKER_PORT,
                in("al") value,
                options(nomem, nostack, preserves_flags)
            );
        }
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = value;
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// Sets the window size of the terminal `fd` (TIOCSWINSZ).
pub fn set_winsize(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is a live descriptor borrowed for the call, and `ws` is a valid winsize
    // that the kernel only reads for TIOCSWINSZ.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the terminal on `fd` the controlling terminal of the calling session leader.
pub fn set_controlling_tty(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: `fd` is a live descriptor; TIOCSCTTY takes an integer argument (0: do not
    // steal a terminal that is another session's) and reads no memory.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Clears FD_CLOEXEC on `fd` so it survives exec. Only called in a freshly forked child
/// before exec (async-signal-safe: fcntl only).
pub fn clear_cloexec(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl(F_SETFD) on an integer descriptor touches no memory; a bad fd is
    // reported as EBADF.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// fork(2) for the single-threaded `__init` helper.
pub fn fork_single_threaded() -> nix::Result<nix::unistd::ForkResult> {
    // SAFETY: only called from the `__init` helper, a freshly exec'd process that never
    // starts a thread, so the child may run arbitrary (non-async-signal-safe) code.
    unsafe { nix::unistd::fork() }
}

/// Makes `fds` survive the exec of `cmd` (they are close-on-exec in the agent so that no
/// other child inherits them).
pub fn keep_fds_on_exec(cmd: &mut std::process::Command, fds: Vec<i32>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec in the child and only calls fcntl,
    // which is async-signal-safe; it iterates the vector it owns (no allocation) and
    // touches no shared state.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                clear_cloexec(fd)?;
            }
            Ok(())
        });
    }
}

/// Installs a classic BPF seccomp filter on the calling thread with seccomp(2). Unlike
/// seccompiler's `apply_filter`, it does not set no_new_privs: the caller either holds
/// CAP_SYS_ADMIN or has set no_new_privs itself, as the process spec says.
pub fn install_seccomp_filter(prog: &[libc::sock_filter]) -> std::io::Result<()> {
    let len = u16::try_from(prog.len())
        .ok()
        .filter(|l| *l > 0)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points to `prog` (exactly `len` instructions), both alive for the
    // duration of the call; the kernel copies the program and does not write to it or keep
    // a reference.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
