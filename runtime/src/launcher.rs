//! Starting the sandbox's helper daemons: the virtio-fs daemon and the VMM.
//!
//! [`Launcher`] is the seam the sandbox logic uses; [`BinaryLauncher`] runs the configured
//! binaries (`fs.path`, `hypervisor.path`) detached, each logging to its own file in the
//! sandbox directory. The VM is described to the VMM by a JSON file (`vm.json`, the format
//! of `carapace-vmm`'s `VmConfig`), written by [`vm_description`].

use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_config::{Config, VmResources};
use serde_json::{Value, json};

use crate::process::{ProcessError, ProcessRecord, spawn_detached};

/// What the fs daemon serves and where.
#[derive(Debug, Clone)]
pub struct FsRequest {
    /// The directory exported to the guest.
    pub shared_dir: PathBuf,
    /// The vhost-user socket the daemon creates.
    pub socket: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

/// How to start the VMM.
#[derive(Debug, Clone)]
pub struct VmRequest {
    /// The VM description file.
    pub description: PathBuf,
    /// The hybrid-vsock socket the description names (where the agent is reached).
    pub vsock: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

/// Starts the helper daemons.
pub trait Launcher: Send + Sync + std::fmt::Debug {
    /// Starts the virtio-fs daemon (it must create `req.socket`).
    fn start_fs_daemon(&self, req: &FsRequest) -> Result<ProcessRecord, ProcessError>;
    /// Starts the VMM (it must create the description's vsock socket).
    fn start_vmm(&self, req: &VmRequest) -> Result<ProcessRecord, ProcessError>;
}

/// Runs the configured binaries.
#[derive(Debug, Clone)]
pub struct BinaryLauncher {
    /// The effective configuration.
    pub config: Config,
}

impl BinaryLauncher {
    /// The fs daemon's command line (both carapace-fsd and virtiofsd take the common flags;
    /// `--layout` and `--allow-setid` are carapace-fsd's).
    pub fn fs_command(&self, req: &FsRequest) -> Command {
        let fs = &self.config.fs;
        let mut cmd = Command::new(&fs.path);
        cmd.arg("--socket-path")
            .arg(&req.socket)
            .arg("--shared-dir")
            .arg(&req.shared_dir)
            .arg("--cache")
            .arg(fs.cache.as_flag());
        if fs.daemon == carapace_config::FsDaemon::CarapaceFsd {
            // The export is a sandbox's shared directory: file privileges only in rootfs
            // trees (vmm/fsd, zones.rs).
            cmd.arg("--layout").arg("sandbox");
            if fs.allow_setid {
                cmd.arg("--allow-setid");
            }
        }
        cmd.args(&fs.extra_args);
        cmd
    }

    /// The VMM's command line.
    pub fn vmm_command(&self, req: &VmRequest) -> Command {
        let mut cmd = Command::new(&self.config.hypervisor.path);
        cmd.arg("--config").arg(&req.description);
        cmd.env("RUST_LOG", self.config.debug.log_level.as_str());
        cmd
    }
}

impl Launcher for BinaryLauncher {
    fn start_fs_daemon(&self, req: &FsRequest) -> Result<ProcessRecord, ProcessError> {
        let mut cmd = self.fs_command(req);
        cmd.env("RUST_LOG", self.config.debug.log_level.as_str());
        spawn_detached("fs daemon", cmd, &req.log)
    }

    fn start_vmm(&self, req: &VmRequest) -> Result<ProcessRecord, ProcessError> {
        spawn_detached("VMM", self.vmm_command(req), &req.log)
    }
}

/// Runs the agent on the host instead of a VM (`carapace-agent --host-mode`): the "VMM"
/// is the agent itself, listening on the sandbox's vsock socket path as a plain unix
/// socket. The fs daemon is still the configured one. For testing the runtime end to end
/// on hosts that cannot boot guests; containers then run on the host, not in a VM.
#[derive(Debug, Clone)]
pub struct HostAgentLauncher {
    /// The carapace-agent binary.
    pub agent: PathBuf,
    /// Starts the fs daemon.
    pub inner: BinaryLauncher,
}

impl Launcher for HostAgentLauncher {
    fn start_fs_daemon(&self, req: &FsRequest) -> Result<ProcessRecord, ProcessError> {
        self.inner.start_fs_daemon(req)
    }

    fn start_vmm(&self, req: &VmRequest) -> Result<ProcessRecord, ProcessError> {
        let dir = req.vsock.parent().unwrap_or(Path::new("/"));
        let mut cmd = Command::new(&self.agent);
        cmd.arg("--host-mode")
            .arg("--listen")
            .arg(format!("unix://{}", req.vsock.display()))
            .arg("--shared-dir")
            .arg(dir.join("agent-files"))
            .arg("--log")
            .arg(self.inner.config.debug.log_level.as_str());
        spawn_detached("host-mode agent", cmd, &req.log)
    }
}

/// Paths the VM description refers to.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// Hybrid-vsock socket.
    pub vsock: PathBuf,
    /// Control API socket.
    pub api: PathBuf,
    /// virtio-fs vhost-user socket.
    pub fs_socket: PathBuf,
    /// Guest console file, when kept.
    pub console: Option<PathBuf>,
}

/// The VM description (`carapace-vmm`'s `VmConfig` as JSON).
pub fn vm_description(config: &Config, res: VmResources, paths: &VmPaths) -> Value {
    let h = &config.hypervisor;
    let mut cmdline = format!(
        "console=ttyS0 carapace.log={}",
        config.debug.log_level.as_str()
    );
    if paths.console.is_none() {
        // Nobody keeps the console: the kernel's boot messages would only cost time (two
        // port I/O exits per character, each a trip to the VMM); warnings still go out.
        cmdline.push_str(" quiet");
    }
    if !h.kernel_params.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&h.kernel_params);
    }
    let serial = match &paths.console {
        Some(p) => json!({ "file": p }),
        None => json!("none"),
    };
    json!({
        "kernel": h.kernel,
        "initrd": h.initrd,
        "cmdline": cmdline,
        "memory_mib": res.memory_mib,
        "vcpus": res.vcpus.min(u32::from(u8::MAX)),
        "serial": serial,
        "vsock": { "guest_cid": 3, "uds_path": paths.vsock },
        "fs": [{ "tag": crate::oci::SHARED_FS_TAG, "socket": paths.fs_socket }],
        "rng": true,
        "api_socket": paths.api,
    })
}

/// Checks the guest image files exist before anything is started.
pub fn check_image(config: &Config) -> Result<(), ImageError> {
    for (key, path) in [
        ("hypervisor.kernel", &config.hypervisor.kernel),
        ("hypervisor.initrd", &config.hypervisor.initrd),
    ] {
        if let Err(source) = std::fs::metadata(path) {
            return Err(ImageError {
                key,
                path: path.clone(),
                source,
            });
        }
    }
    Ok(())
}

/// A guest image file is missing.
#[derive(Debug, thiserror::Error)]
#[error("guest image file {path} ({key}) is not usable; build it with `carapace-image build`")]
pub struct ImageError {
    /// The configuration key naming it.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// `true` if `path` is an executable regular file.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_command_has_the_shared_flags() {
        let mut config = Config::default();
        config.fs.extra_args = vec!["--thread-pool-size=2".into()];
        let l = BinaryLauncher { config };
        let cmd = l.fs_command(&FsRequest {
            shared_dir: "/run/carapace/x/shared".into(),
            socket: "/run/carapace/x/fsd.sock".into(),
            log: "/run/carapace/x/fsd.log".into(),
        });
        assert_eq!(cmd.get_program(), "/usr/local/bin/carapace-fsd");
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--socket-path",
                "/run/carapace/x/fsd.sock",
                "--shared-dir",
                "/run/carapace/x/shared",
                "--cache",
                "auto",
                "--thread-pool-size=2"
            ]
        );
    }

    #[test]
    fn vm_description_uses_config_and_sizing() {
        let mut config = Config::default();
        config.hypervisor.kernel_params = "quiet".into();
        let v = vm_description(
            &config,
            VmResources {
                vcpus: 2,
                memory_mib: 512,
            },
            &VmPaths {
                vsock: "/r/x/vsock.sock".into(),
                api: "/r/x/api.sock".into(),
                fs_socket: "/r/x/fsd.sock".into(),
                console: Some("/r/x/console.log".into()),
            },
        );
        assert_eq!(v["kernel"], "/var/lib/carapace/guest/vmlinux");
        assert_eq!(v["memory_mib"], 512);
        assert_eq!(v["vcpus"], 2);
        assert_eq!(v["vsock"]["uds_path"], "/r/x/vsock.sock");
        assert_eq!(v["serial"]["file"], "/r/x/console.log");
        assert_eq!(v["fs"][0]["tag"], "carapace");
        assert!(v["cmdline"].as_str().unwrap().ends_with(" quiet"));
        assert_eq!(v["cmdline"].as_str().unwrap().matches("quiet").count(), 1);
        // no console kept: the kernel boots quietly
        let v = vm_description(
            &Config::default(),
            VmResources {
                vcpus: 1,
                memory_mib: 256,
            },
            &VmPaths {
                vsock: "/r/x/vsock.sock".into(),
                api: "/r/x/api.sock".into(),
                fs_socket: "/r/x/fsd.sock".into(),
                console: None,
            },
        );
        assert_eq!(v["serial"], "none");
        assert!(
            v["cmdline"]
                .as_str()
                .unwrap()
                .split(' ')
                .any(|w| w == "quiet")
        );
    }

    #[test]
    fn missing_image_names_key_and_fix() {
        let mut config = Config::default();
        config.hypervisor.kernel = "/nonexistent/vmlinux".into();
        let e = check_image(&config).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
        assert!(msg.contains("hypervisor.kernel"), "{msg}");
        assert!(msg.contains("carapace-image build"), "{msg}");
    }
}
