//! Footprint settings for Carapace's long-lived host processes (see README.md): one
//! malloc arena, and a cap on what a log may grow to.

pub mod logcap;

/// Limits glibc malloc to one arena (`mallopt(M_ARENA_MAX, 1)`). Call before any thread
/// exists. Without glibc (another libc) this does nothing.
pub fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; callers run it first thing in `main`,
    // before any thread exists, so no allocation runs concurrently.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
