//! The real backend: sandboxes from `carapace-runtime` (fs daemon + VMM + guest agent),
//! configured by Carapace's configuration file.

use std::path::Path;

use carapace_runtime::agent::{ExitInfo, Session};
use carapace_runtime::mounts::{Mounter, SysMounter};
use carapace_runtime::oci::Bundle;
use carapace_runtime::sandbox::Runtime;

use crate::backend::{Backend, BackendError, RootfsMount, rootfs_dir};
use crate::pod::Role;

/// Environment variable naming a `carapace-agent` binary to run in host mode instead of
/// booting VMs (containers then run on the host): for testing the shim with a real
/// containerd on hosts that cannot boot guests. Never set in production.
pub const HOST_AGENT_ENV: &str = "CARAPACE_SHIM_HOST_AGENT";

/// Sandboxes through `carapace-runtime`.
#[derive(Debug)]
pub struct RuntimeBackend {
    runtime: Runtime,
}

impl RuntimeBackend {
    /// Loads the configuration (`CARAPACE_CONFIG` or `/etc/carapace/configuration.toml`)
    /// and builds the runtime.
    pub fn from_env() -> Result<Self, String> {
        let env = std::env::var_os(carapace_config::ENV_VAR).map(std::path::PathBuf::from);
        let loaded =
            carapace_config::load(None, env.as_deref()).map_err(|e| carapace_errors::chain(&e))?;
        let config = loaded.config;
        let root = config.runtime.state_dir.clone();
        let host_agent = std::env::var_os(HOST_AGENT_ENV).map(std::path::PathBuf::from);
        Ok(Self {
            runtime: Runtime::from_config(config, root, host_agent),
        })
    }

    fn unmount_rootfs(&self, bundle: &Path) {
        let rootfs = rootfs_dir(bundle);
        if SysMounter
            .mounts_under(&rootfs)
            .iter()
            .any(|m| m == &rootfs)
            && let Err(e) = SysMounter.unmount(&rootfs)
        {
            tracing::warn!(rootfs = %rootfs.display(), error = %carapace_errors::Chain(&e), "cannot unmount the rootfs");
        }
    }
}

#[async_trait::async_trait]
impl Backend for RuntimeBackend {
    async fn create(
        &self,
        id: &str,
        bundle: &Bundle,
        rootfs: &[RootfsMount],
        role: &Role,
        pod: Option<&Session>,
    ) -> Result<Session, BackendError> {
        let target = rootfs_dir(&bundle.dir);
        for m in rootfs {
            let fstype = Some(m.fstype.as_str()).filter(|s| !s.is_empty());
            let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
            containerd_shim::mount::mount_rootfs(fstype, source, &m.options, &target)
                .map_err(|e| BackendError::new("mounting the rootfs of", id, e.to_string()))?;
        }
        let created = match role {
            Role::Container { sandbox_id } => {
                self.runtime
                    .create_in_sandbox(sandbox_id, id, bundle, pod)
                    .await
            }
            Role::Sandbox | Role::Standalone => self.runtime.create(id, bundle).await,
        };
        match created {
            Ok((_, session)) => Ok(session),
            Err(e) => {
                let _ = self.runtime.delete(id, true, None).await;
                self.unmount_rootfs(&bundle.dir);
                let op = if role.owns_vm() {
                    "creating the sandbox of"
                } else {
                    "creating in its pod's VM"
                };
                Err(BackendError::new(op, id, e))
            }
        }
    }

    async fn start(&self, id: &str, _role: &Role, session: &Session) -> Result<u32, BackendError> {
        self.runtime
            .start(id, Some(session))
            .await
            .map_err(|e| BackendError::new("starting", id, e))
    }

    fn record_exit(&self, id: &str, _role: &Role, exit: ExitInfo) {
        if let Err(e) = self.runtime.record_exit(id, exit) {
            tracing::warn!(id, error = %carapace_errors::Chain(&e), "cannot record the exit");
        }
    }

    async fn delete(
        &self,
        id: &str,
        bundle: &Path,
        _role: &Role,
        session: Option<&Session>,
    ) -> Result<(), BackendError> {
        let result = self.runtime.delete(id, true, session).await;
        self.unmount_rootfs(bundle);
        result.map_err(|e| BackendError::new("deleting", id, e))
    }

    async fn cleanup(&self, id: &str, bundle: &Path) -> Result<(), BackendError> {
        self.delete(id, bundle, &Role::Standalone, None).await
    }
}
