//! Carapace runtime: sandboxes (one microVM each) from OCI bundles. See README.md.
//!
//! Modules, from the bottom up: [`state`] (persisted state, OCI state JSON), [`process`]
//! (helper daemons identified across pid reuse), [`mounts`] (binds into the shared
//! directory), [`oci`] (bundle spec checks and guest translation), [`launcher`] (fs daemon
//! and VMM), [`agent`] (the guest agent over ttrpc), [`sandbox`] (the lifecycle),
//! [`stdio`] (streaming a process's IO), [`check`] (can this host run sandboxes),
//! [`features`] (the runc `features` document), [`network`] (a pod's CNI network
//! namespace mirrored into the VM: inspection, taps and tc redirects), [`sizing`] (how big a
//! pod's VM is), [`vmm_api`] (the VMM's control API: VM info, memory hot-plug), [`jail`] (the VMM's
//! jail directory and its uid per sandbox). For the
//! CLI: [`keeper`] (the host processes that stand for container processes towards runc's
//! callers), [`freezer`] (pause/resume), [`events`] (runc's stats and OOM events).

pub mod agent;
pub mod cgroup;
pub mod check;
pub mod console;
pub mod containerd_config;
pub mod events;
pub mod exec_identity;
pub mod exitwatch;
pub mod faults;
pub mod features;
pub mod freezer;
pub mod hooks;
pub mod jail;
pub mod keeper;
pub mod launcher;
pub mod mounts;
pub mod network;
pub mod oci;
mod passfd;
pub mod process;
pub mod sandbox;
pub mod sizing;
pub mod state;
pub mod stdio;
pub mod vmm_api;
