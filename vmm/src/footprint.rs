//! The VMM process's own memory, apart from guest RAM.
//!
//! Each thread that allocates gets a glibc malloc arena of its own unless told otherwise:
//! a 64 MiB reservation whose touched part stays resident and which, aligned as it is, the
//! kernel may back with a 2 MiB transparent huge page on first touch (seen as a VMM now and
//! then 2 MiB bigger than the others in the benchmarks). The vCPU and device threads
//! allocate little, so one shared arena is enough.

/// Limits glibc malloc to one arena. Call first thing in `main`, before any thread starts;
/// without glibc this does nothing.
pub fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator, and `main` calls this before starting any
    // thread, so nothing allocates concurrently.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
