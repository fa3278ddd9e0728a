//! The seam between the shim's task logic and the sandboxes: creating a container (booting
//! its VM, or joining its pod's VM) and deleting it. Everything else the shim does through
//! the guest agent the backend hands out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use carapace_runtime::agent::{AgentApi, ExitInfo};

use crate::pod::Role;

/// A mount containerd asks the shim to make at `<bundle>/rootfs` (the container's image
/// snapshot, usually overlayfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    /// Filesystem type.
    pub fstype: String,
    /// Source.
    pub source: String,
    /// Options.
    pub options: Vec<String>,
}

/// A backend failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{op} {id}")]
pub struct BackendError {
    /// What was being done.
    pub op: &'static str,
    /// Which container.
    pub id: String,
    /// Why it failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl BackendError {
    /// Wraps `source`.
    pub fn new(
        op: &'static str,
        id: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            op,
            id: id.to_owned(),
            source: source.into(),
        }
    }
}

/// Creates and deletes containers in sandboxes. Calls block; the shim runs them off the
/// async executor.
pub trait Backend: Send + Sync + 'static {
    /// Creates container `id` from `bundle` (mounting `rootfs` at `<bundle>/rootfs` first
    /// when given): a new VM for a sandbox or standalone container, or a place in the VM of
    /// its pod. Returns the agent that runs it. On error nothing is left behind.
    fn create(
        &self,
        id: &str,
        bundle: &Path,
        rootfs: &[RootfsMount],
        role: &Role,
    ) -> Result<Arc<dyn AgentApi>, BackendError>;

    /// Starts the container's init; returns its pid.
    fn start(&self, id: &str, role: &Role) -> Result<u32, BackendError>;

    /// Records how the container's init ended (for `state` callers outside the shim).
    fn record_exit(&self, id: &str, role: &Role, exit: ExitInfo);

    /// Deletes the container, stopping its VM when it owns one, and undoes its rootfs
    /// mounts. Idempotent.
    fn delete(&self, id: &str, bundle: &Path, role: &Role) -> Result<(), BackendError>;

    /// Cleans up after a shim that was killed (`shim delete`): whatever is left of `id`.
    fn cleanup(&self, id: &str, bundle: &Path) -> Result<(), BackendError>;
}

/// `<bundle>/rootfs`.
pub fn rootfs_dir(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}
