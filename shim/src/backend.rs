//! The seam between the shim's task logic and the sandboxes: creating a container (booting
//! its VM, or joining its pod's VM), starting and deleting it. Everything else the shim
//! does through the agent session the backend hands out, which the shim keeps for the VM's
//! life: every container of a pod, every stream and wait share it.

use carapace_runtime::sandbox::Helper;
use std::path::{Path, PathBuf};

use carapace_runtime::agent::{ExitInfo, Session};
use carapace_runtime::oci::Bundle;

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

/// Creates, starts and deletes containers in sandboxes.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Creates container `id` from `bundle` (mounting `rootfs` at `<bundle>/rootfs` first
    /// when given): a new VM for a sandbox or standalone container, or a place in the VM of
    /// its pod, reached through `pod` when the shim holds that VM's session. Returns the
    /// session to the agent that runs it. On error nothing is left behind.
    async fn create(
        &self,
        id: &str,
        bundle: &Bundle,
        rootfs: &[RootfsMount],
        role: &Role,
        pod: Option<&Session>,
    ) -> Result<Session, BackendError>;

    /// Starts the container's init through `session`; returns its pid.
    async fn start(&self, id: &str, role: &Role, session: &Session) -> Result<u32, BackendError>;

    /// Records how the container's init ended (for `state` callers outside the shim).
    fn record_exit(&self, id: &str, role: &Role, exit: ExitInfo);

    /// Deletes the container, stopping its VM when it owns one (through `session` when
    /// given), and undoes its rootfs mounts. Idempotent.
    async fn delete(
        &self,
        id: &str,
        bundle: &Path,
        role: &Role,
        session: Option<&Session>,
    ) -> Result<(), BackendError>;

    /// Applies an OCI `linux.resources` object (JSON) to container `id`: its VM is
    /// resized first (refused when the pod would pass its maxima), then the guest's cgroup
    /// is updated, through `session`.
    async fn update(
        &self,
        id: &str,
        resources_json: &[u8],
        session: &Session,
    ) -> Result<(), BackendError>;

    /// Kills the VM that runs `id` at once (an agent that no longer answers cannot deliver
    /// a SIGKILL); the session to it breaks. Its state stays for `delete`.
    async fn kill_vm(&self, id: &str) -> Result<(), BackendError>;

    /// Resolves once `helper` of the VM of `id` has exited; never when it has none.
    async fn helper_exited(&self, id: &str, helper: Helper) -> Result<(), BackendError>;

    /// Fires fault point `point` for `id` when the configuration names a fault plan
    /// (fault tests only; `carapace_runtime::faults`).
    fn fault_point(&self, id: &str, point: carapace_runtime::faults::Point);

    /// What is left to tell of the VM of `id` when it ended without the shim stopping it
    /// (the end of the VMM's log and of the guest console); `None` while it runs.
    fn vm_post_mortem(&self, id: &str) -> Option<String>;

    /// Cleans up after a shim that was killed (`shim delete`): whatever is left of `id`.
    async fn cleanup(&self, id: &str, bundle: &Path) -> Result<(), BackendError>;
}

/// `<bundle>/rootfs`.
pub fn rootfs_dir(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}
