//! Drops the executable's clean code pages from the daemon's page tables once it serves a
//! guest: most of the text (argument parsing, sandbox and seccomp setup, vhost-user
//! negotiation) never runs again, yet stays mapped and counts in the daemon's RSS/PSS
//! (the kernel maps up to 64 KiB around every page fault). `MADV_DONTNEED` on a private
//! file mapping that was never written only removes the mappings: the pages stay in the
//! page cache (clean, reclaimable), and the code that still runs faults its pages back
//! from there. Nothing is lost or changed, only what is counted as this process's memory.

//!
//! [`one_malloc_arena`] is the other half of the daemon's footprint work: glibc gives every
//! thread that allocates its own malloc arena (a separate heap whose touched pages, free
//! lists and per-thread cache stay resident); the daemon's few threads allocate little
//! and rarely at the same time, so one shared arena is enough.

use std::io;

/// Limits glibc malloc to one arena (`mallopt(M_ARENA_MAX, 1)`). Call before any thread
/// exists. Without glibc (another libc) this does nothing.
pub fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called before threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

// SAFETY: the GNU linkers define these two symbols for every executable: the start of
// the first loaded segment and the end of `.text`. Only their addresses are used.
unsafe extern "C" {
    static __executable_start: u8;
    static etext: u8;
}

/// Drops the pages of `[__executable_start, etext)` (ELF headers, read-only data placed
/// before the code, and the code) from this process's page tables; returns the length.
pub fn drop_text_mappings() -> io::Result<usize> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .map_err(|_| io::Error::other("page size"))?;
    let start = (&raw const __executable_start) as usize & !(page - 1);
    let end = ((&raw const etext) as usize).div_ceil(page) * page;
    let len = end.saturating_sub(start);
    // SAFETY: the range covers only this executable's own read-only, never-written file
    // mappings (headers, .rodata before the code, .text); MADV_DONTNEED on such private
    // file mappings discards page-table entries only, later accesses fault the same
    // file contents back in. No Rust object lives in that range.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if r == 0 {
        Ok(len)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn code_keeps_running_after_its_pages_are_dropped() {
        let len = super::drop_text_mappings().expect("madvise");
        assert!(len > 4096);
        // Run code again: its pages fault back in from the file.
        let v: Vec<String> = (0..100).map(|i| format!("{i}")).collect();
        assert_eq!(v[42], "42");
        assert!(super::drop_text_mappings().is_ok());
    }
}
