//! `carapace-image`: builds the Carapace guest image (a minimal PVH kernel and an
//! initramfs whose `/init` is the agent), caches it by content and validates it.
//! See README.md for the design.

pub mod agent;
pub mod cache;
pub mod cpio;
pub mod elf;
pub mod fragment;
pub mod image;
pub mod initramfs;
pub mod kernel;

/// Our kernel config fragment, compiled in so the binary is self-contained.
pub const DEFAULT_FRAGMENT: &str = include_str!("../kernel/carapace.fragment");
