//! containerd-shim-carapace-v2: the containerd shim v2 Task service for Carapace.
//!
//! containerd starts one shim per pod (or per standalone container); the shim boots the
//! pod's microVM through `carapace-runtime` and runs every container of the pod in it
//! through the guest agent. [`tasks`] holds the logic (processes, states, stdio, events),
//! [`service`] maps it to containerd's ttrpc API, [`backend`] is the seam to sandboxes.

pub mod backend;
pub mod options;
pub mod pod;
pub mod runtime_backend;
pub mod service;
pub mod stdio;
pub mod tasks;
