//! The real backend: sandboxes from `carapace-runtime` (fs daemon + VMM + guest agent),
//! configured by Carapace's configuration file.

use carapace_runtime::sandbox::Helper;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use carapace_runtime::agent::{ExitInfo, Session};
use carapace_runtime::mounts::{Mounter, SysMounter};
use carapace_runtime::oci::Bundle;
use carapace_runtime::sandbox::Runtime;

use crate::backend::{Backend, BackendError, RootfsMount, rootfs_dir};
use crate::options;
use crate::pod::Role;

/// Environment variable naming a `carapace-agent` binary to run in host mode instead of
/// booting VMs (containers then run on the host): for testing the shim with a real
/// containerd on hosts that cannot boot guests. Never set in production.
pub const HOST_AGENT_ENV: &str = "CARAPACE_SHIM_HOST_AGENT";

/// Sandboxes through `carapace-runtime`, each built from the configuration its handler's
/// runtime options name ([`crate::options`]), else `CARAPACE_CONFIG`, else
/// `/etc/carapace/configuration.toml`.
#[derive(Debug)]
pub struct RuntimeBackend {
    /// `CARAPACE_CONFIG`, read once.
    env_config: Option<PathBuf>,
    host_agent: Option<PathBuf>,
    /// One runtime per configuration file used so far (`None`: the default one).
    runtimes: Mutex<HashMap<Option<PathBuf>, Runtime>>,
    /// The runtime each live container was created with.
    by_id: Mutex<HashMap<String, Runtime>>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the Carapace configuration")]
struct ConfigUnusable(#[source] carapace_config::ConfigError);

impl RuntimeBackend {
    /// Reads the environment; configurations are loaded when a container needs one. Fails
    /// when the default configuration does not load (the shim would be of no use).
    pub fn from_env() -> Result<Self, String> {
        let backend = Self {
            env_config: std::env::var_os(carapace_config::ENV_VAR).map(PathBuf::from),
            host_agent: std::env::var_os(HOST_AGENT_ENV).map(PathBuf::from),
            runtimes: Mutex::new(HashMap::new()),
            by_id: Mutex::new(HashMap::new()),
        };
        backend
            .runtime_for(None)
            .map_err(|e| carapace_errors::chain(&e))?;
        Ok(backend)
    }

    /// The runtime of configuration `path` (`None`: `CARAPACE_CONFIG` or the default).
    fn runtime_for(&self, path: Option<&Path>) -> Result<Runtime, ConfigUnusable> {
        let key = path.map(Path::to_path_buf);
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = runtimes.get(&key) {
            return Ok(rt.clone());
        }
        let loaded =
            carapace_config::load(path, self.env_config.as_deref()).map_err(ConfigUnusable)?;
        let config = loaded.config;
        tracing::info!(config = %loaded.origin, "configuration loaded");
        let root = config.runtime.state_dir.clone();
        let rt = Runtime::from_config(config, root, self.host_agent.clone());
        runtimes.insert(key, rt.clone());
        Ok(rt)
    }

    /// The runtime recorded for `bundle` at create.
    fn runtime_of_bundle(&self, id: &str, bundle: &Path) -> Result<Runtime, BackendError> {
        let choice = options::recorded(bundle)
            .map_err(|e| BackendError::new("reading the options of", id, e))?;
        self.runtime_for(choice.config_path.as_deref())
            .map_err(|e| BackendError::new("configuring", id, e))
    }

    /// The runtime container `id` was created with.
    fn runtime_of(&self, id: &str) -> Option<Runtime> {
        let by_id = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        by_id.get(id).cloned()
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
        let runtime = self.runtime_of_bundle(id, &bundle.dir)?;
        let target = rootfs_dir(&bundle.dir);
        for m in rootfs {
            let fstype = Some(m.fstype.as_str()).filter(|s| !s.is_empty());
            let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
            containerd_shim::mount::mount_rootfs(fstype, source, &m.options, &target)
                .map_err(|e| BackendError::new("mounting the rootfs of", id, e.to_string()))?;
        }
        let created = match role {
            Role::Container { sandbox_id } => {
                runtime.create_in_sandbox(sandbox_id, id, bundle, pod).await
            }
            Role::Sandbox | Role::Standalone => runtime.create(id, bundle).await,
        };
        match created {
            Ok((_, session)) => {
                let mut by_id = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
                by_id.insert(id.to_owned(), runtime);
                Ok(session)
            }
            Err(e) => {
                let _ = runtime.delete(id, true, None).await;
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
        let runtime = self
            .runtime_of(id)
            .ok_or_else(|| BackendError::new("starting", id, "not created by this shim"))?;
        runtime
            .start(id, Some(session))
            .await
            .map_err(|e| BackendError::new("starting", id, e))
    }

    fn record_exit(&self, id: &str, _role: &Role, exit: ExitInfo) {
        let Some(runtime) = self.runtime_of(id) else {
            tracing::warn!(id, "cannot record the exit: not created by this shim");
            return;
        };
        if let Err(e) = runtime.record_exit(id, exit) {
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
        let runtime = match self.runtime_of(id) {
            Some(rt) => rt,
            None => self.runtime_of_bundle(id, bundle)?,
        };
        let result = runtime.delete(id, true, session).await;
        if result.is_ok() {
            let mut by_id = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
            by_id.remove(id);
        }
        self.unmount_rootfs(bundle);
        result.map_err(|e| BackendError::new("deleting", id, e))
    }

    async fn update(
        &self,
        id: &str,
        resources_json: &[u8],
        session: &Session,
    ) -> Result<(), BackendError> {
        let runtime = self
            .runtime_of(id)
            .ok_or_else(|| BackendError::new("updating", id, "not created by this shim"))?;
        runtime
            .update_resources(id, resources_json, Some(session))
            .await
            .map_err(|e| BackendError::new("updating the resources of", id, e))
    }

    async fn kill_vm(&self, id: &str) -> Result<(), BackendError> {
        let runtime = self.runtime_of(id).ok_or_else(|| {
            BackendError::new("killing the VM of", id, "not created by this shim")
        })?;
        runtime
            .kill_vm(id)
            .map_err(|e| BackendError::new("killing the VM of", id, e))
    }

    async fn helper_exited(&self, id: &str, helper: Helper) -> Result<(), BackendError> {
        let runtime = self.runtime_of(id).ok_or_else(|| {
            BackendError::new("watching the VM of", id, "not created by this shim")
        })?;
        runtime
            .helper_exited(id, helper)
            .await
            .map_err(|e| BackendError::new("watching the VM of", id, e))
    }

    fn fault_point(&self, id: &str, point: carapace_runtime::faults::Point) {
        if let Some(runtime) = self.runtime_of(id) {
            runtime.fault_point(point, id);
        }
    }

    fn vm_post_mortem(&self, id: &str) -> Option<String> {
        self.runtime_of(id)?.vm_post_mortem(id)
    }

    async fn cleanup(&self, id: &str, bundle: &Path) -> Result<(), BackendError> {
        self.delete(id, bundle, &Role::Standalone, None).await
    }
}
