//! carapace-fsd: a virtio-fs vhost-user backend that serves one host directory to a guest.
//!
//! Layers, outermost first:
//! - [`daemon`]: wires CLI options, the socket, the sandbox and the vhost-user loop.
//! - [`backend`]: the vhost-user device (queues, guest memory, descriptor chains).
//! - [`guard`]: a FUSE filesystem wrapper that enforces our safety rules (name validation,
//!   read-only export, no device nodes) in front of fuse-backend-rs's passthrough.
//! - [`sandbox`] and [`seccomp`]: the daemon's own confinement (mount namespace, pivot_root,
//!   seccomp allow-list, no_new_privs, capability drop).
//!
//! See README.md for the design choices.

pub mod backend;
pub mod config;
pub mod daemon;
pub mod guard;
pub mod sandbox;
pub mod seccomp;
pub mod socket;
pub mod zones;
