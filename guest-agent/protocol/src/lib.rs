//! See README.md.

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    missing_debug_implementations,
    missing_docs,
    dead_code,
    unused_imports,
    unused_mut,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unsafe_code,
    unknown_lints
)]
pub mod agent {
    //! Protobuf messages generated from `proto/agent.proto`.
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    missing_debug_implementations,
    missing_docs,
    dead_code,
    unused_imports,
    unused_mut,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unsafe_code,
    unknown_lints
)]
pub mod agent_ttrpc {
    //! ttrpc client and server trait generated from `proto/agent.proto`.
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod client;

/// Version of this API. Bumped on every incompatible change of `proto/agent.proto`
/// (removed/renumbered fields, changed semantics); the host refuses an agent that
/// reports a different value.
///
/// - 1: the first API;
/// - 2: Health, CopyFile and Shutdown removed (no host caller; Version is the probe);
/// - 3: ConfigureNetwork added (the pod's network in the guest: interfaces found by MAC,
///   routes, neighbours); CreateSandbox brings `lo` up in the guest;
/// - 4: SetOnlineCpus added (the runtime sizes a pod's VM to its containers: vCPUs
///   brought online and offline in the guest).
pub const PROTOCOL_VERSION: u32 = 4;

/// The guest vsock port the agent listens on: a privileged port (≤ 1023, binding it needs
/// CAP_NET_BIND_SERVICE in the guest), so no container process can take it over.
pub const AGENT_VSOCK_PORT: u32 = 1023;

/// The host's vsock CID: the only peer the agent accepts.
pub const HOST_CID: u32 = 2;

/// Upper bound the agent applies to `ReadStreamRequest.max_len` (the ttrpc message
/// limit is 4 MiB; one read stays well below it).
pub const MAX_READ_CHUNK: u32 = 1 << 20;

/// Upper bound on bytes in one `WriteStdin` request.
pub const MAX_WRITE_CHUNK: usize = 2 << 20;

/// The mount options (`mounts[].options`) the agent applies as mount flags or propagation
/// in the guest; any other option is passed to the filesystem as data. The runtime's
/// `features` lists exactly these.
pub const MOUNT_OPTIONS: &[&str] = &[
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "private",
    "rbind",
    "relatime",
    "remount",
    "ro",
    "rprivate",
    "rshared",
    "rslave",
    "runbindable",
    "rw",
    "shared",
    "slave",
    "strictatime",
    "suid",
    "sync",
    "unbindable",
];
