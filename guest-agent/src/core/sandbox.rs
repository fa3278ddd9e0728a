//! The sandbox (the pod the VM is): its virtio-fs shares, hostname and sysctls, `lo` up;
//! its network (ConfigureNetwork, applied by `crate::network`); its destruction and the
//! power-off that follows; the guest clock.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use nix::sys::time::TimeSpec;

use super::{Core, CoreError, Mode, Result, ShutdownKind};
use crate::ids::validate_id;
use crate::network::{NetworkConfig, NetworkRequest};
use carapace_errors::chain;

/// One virtio-fs share to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub mount_point: String,
    pub read_only: bool,
}

/// What CreateSandbox asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxSpec {
    pub id: String,
    pub hostname: String,
    pub shares: Vec<Share>,
    /// `kernel.x.y` -> value.
    pub sysctls: Vec<(String, String)>,
}

/// The clock value SetGuestTime asks for, checked.
pub(super) fn guest_time(sec: i64, nsec: u32) -> Result<TimeSpec> {
    if nsec >= 1_000_000_000 || sec < 0 {
        return Err(CoreError::Invalid {
            field: "sec/nsec",
            reason: "negative seconds or nsec >= 1e9".into(),
        });
    }
    Ok(TimeSpec::new(sec, i64::from(nsec)))
}

impl Core {
    fn sandbox_id(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // One plain value: a panic cannot leave it half-written.
        self.sandbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the sandbox (one per agent): `lo` up, hostname, shares, sysctls. In host
    /// mode only an empty one (they would change the host).
    pub async fn create_sandbox(&self, spec: &SandboxSpec) -> Result<()> {
        validate_id("sandbox id", &spec.id)?;
        {
            let mut sb = self.sandbox_id();
            if let Some(existing) = &*sb {
                return Err(CoreError::Exists {
                    what: "sandbox",
                    id: existing.clone(),
                });
            }
            *sb = Some(spec.id.clone());
        }
        if let Err(e) = self.set_up_sandbox(spec).await {
            *self.sandbox_id() = None;
            return Err(e);
        }
        tracing::info!(sandbox = %spec.id, "sandbox created");
        Ok(())
    }

    async fn set_up_sandbox(&self, spec: &SandboxSpec) -> Result<()> {
        if self.config.mode == Mode::Host {
            if !spec.shares.is_empty() || !spec.sysctls.is_empty() || !spec.hostname.is_empty() {
                return Err(CoreError::HostMode(
                    "CreateSandbox with shares, sysctls or hostname",
                ));
            }
            return Ok(());
        }
        // Every sandbox has a loopback, networked or not (the kernel leaves it down).
        crate::network::loopback_up().await?;
        if !spec.hostname.is_empty() {
            nix::unistd::sethostname(&spec.hostname).map_err(|e| CoreError::Io {
                op: format!("sethostname({:?})", spec.hostname),
                source: e.into(),
            })?;
        }
        for s in &spec.shares {
            crate::pid1::mount_virtiofs(&s.tag, Path::new(&s.mount_point), s.read_only).map_err(
                |e| CoreError::Invalid {
                    field: "shares",
                    reason: chain(&e),
                },
            )?;
            self.shares
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(PathBuf::from(&s.mount_point));
        }
        for (k, v) in &spec.sysctls {
            let path = crate::ids::relative_inside(Path::new("/proc/sys"), &k.replace('.', "/"))?;
            std::fs::write(&path, v).map_err(|source| CoreError::Io {
                op: format!("setting sysctl {k}"),
                source,
            })?;
        }
        Ok(())
    }

    /// Configures the guest network (ConfigureNetwork): once per sandbox, after
    /// CreateSandbox, before any container (the runtime's order). The request is parsed
    /// and checked whole before netlink is touched. Refused in host mode, before
    /// anything else: it would change the host's network.
    pub async fn configure_network(&self, req: &NetworkRequest) -> Result<()> {
        if self.config.mode == Mode::Host {
            return Err(CoreError::HostMode("ConfigureNetwork"));
        }
        let config = NetworkConfig::parse(req)?;
        if self.sandbox_id().is_none() {
            return Err(CoreError::Order(
                "ConfigureNetwork needs a sandbox: CreateSandbox comes first",
            ));
        }
        if self.network.swap(true, Ordering::AcqRel) {
            return Err(CoreError::Order(
                "the network is configured already (ConfigureNetwork is called once per sandbox)",
            ));
        }
        let r = crate::network::configure(&config).await;
        if r.is_err() {
            // A later attempt may complete what this one left (its error names the step).
            self.network.store(false, Ordering::Release);
        }
        Ok(r?)
    }

    /// Removes every container; in the guest, then unmounts the shares and powers off.
    pub async fn destroy_sandbox(&self, id: &str) -> Result<()> {
        validate_id("sandbox id", id)?;
        let current = self.sandbox_id().clone();
        if current.as_deref() != Some(id) {
            return Err(CoreError::NoSandbox(id.to_owned()));
        }
        self.destroy_all().await;
        *self.sandbox_id() = None;
        self.network.store(false, Ordering::Release);
        tracing::info!(sandbox = %id, "sandbox destroyed");
        if self.config.mode == Mode::Guest {
            self.unmount_shares();
            let _ = self.shutdown.send(ShutdownKind::PowerOff);
        }
        Ok(())
    }

    /// Sets the guest's realtime clock (guest only). For the host to call after a VM-level
    /// pause or a snapshot restore (warm start), neither of which exists yet.
    pub fn set_guest_time(&self, sec: i64, nsec: u32) -> Result<()> {
        if self.config.mode == Mode::Host {
            return Err(CoreError::HostMode("SetGuestTime"));
        }
        let ts = guest_time(sec, nsec)?;
        (self.set_clock)(ts).map_err(|e| CoreError::Io {
            op: "clock_settime(CLOCK_REALTIME)".into(),
            source: e.into(),
        })
    }

    /// Makes `count` vCPUs online in the guest (SetOnlineCpus; guest only); returns how
    /// many are online afterwards. The sysfs writes run off the executor: bringing a CPU
    /// up waits for it to boot.
    pub async fn set_online_cpus(&self, count: u32) -> Result<u32> {
        if self.config.mode == Mode::Host {
            return Err(CoreError::HostMode("SetOnlineCpus"));
        }
        let root = self.config.cpu_sysfs.clone();
        let online = tokio::task::spawn_blocking(move || crate::cpus::set_online(&root, count))
            .await
            .map_err(|e| CoreError::Io {
                op: "SetOnlineCpus".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
        tracing::info!(asked = count, online, "online vCPUs set");
        Ok(online)
    }

    /// Flushes and unmounts the sandbox's virtio-fs shares (last mounted first), so that
    /// the host's file system daemon sees every write before the VM goes away. A busy
    /// share (a process that could not be killed) is detached instead.
    pub fn unmount_shares(&self) {
        nix::unistd::sync();
        let shares = std::mem::take(&mut *self.shares.lock().unwrap_or_else(|p| p.into_inner()));
        for mp in shares.iter().rev() {
            let r = nix::mount::umount2(mp, nix::mount::MntFlags::empty()).or_else(|e| {
                tracing::warn!(mount_point = %mp.display(), error = %e, "unmounting share; detaching it");
                nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH)
            });
            match r {
                Ok(()) => tracing::info!(mount_point = %mp.display(), "share unmounted"),
                Err(e) => {
                    tracing::warn!(mount_point = %mp.display(), error = %e, "cannot unmount share")
                }
            }
        }
    }
}
