//! Allocator tuning for a long-lived, mostly idle process.
//!
//! glibc gives every thread that allocates a malloc arena of its own, whose touched pages
//! and free lists stay resident. The shim's threads (tokio's workers and blocking pool, the
//! agent connections' runtime, stdio relays) allocate little and seldom at once, so one
//! arena serves them all and the idle shim keeps less memory.

/// Limits glibc malloc to one arena. Call before any thread exists; a no-op without glibc.
pub fn one_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; it is called from `main` before the
    // process has started any thread, so no allocation runs concurrently.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
