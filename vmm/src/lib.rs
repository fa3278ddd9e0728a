//! carapace-vmm: a small KVM virtual machine monitor for Carapace guests.
//!
//! See README.md for what this crate owns and the design choices.

pub mod api;
pub mod boot;
/// The VM description (crate `carapace-vm-config`, shared with the runtime).
pub use carapace_vm_config as config;
pub mod cpu;
pub mod devices;
pub mod exit;
pub mod fdio;
pub mod hostcheck;
pub mod jail;
pub mod kick;
pub mod layout;
pub mod lograte;
pub mod memory;
pub mod mptable;
pub mod nudge;
pub mod seccomp;
pub mod spawner;
pub mod state;
pub mod term;
pub mod virtio;
pub mod vmm;
