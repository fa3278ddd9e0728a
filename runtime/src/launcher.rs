//! Starting the sandbox's helper daemons: the virtio-fs daemon and the VMM.
//!
//! [`Launcher`] is the seam the sandbox logic uses; [`BinaryLauncher`] runs the configured
//! binaries (`fs.path`, `hypervisor.path`) detached, each logging to its own file in the
//! sandbox directory. The VM is described to the VMM by a JSON file (`vm.json`, the format
//! of `carapace-vmm`'s `VmConfig`), written by [`vm_description`].

use std::path::{Path, PathBuf};
use std::process::Command;

use carapace_config::{Config, VhostNetMode, VmResources};
use carapace_vm_config::{
    FsConfig, MemoryHotplug, NetConfig, SerialOutput, VmConfig, VsockConfig, format_mac,
};

use crate::process::{ProcessError, ProcessRecord, spawn_detached_in};

/// What the fs daemon serves and where.
#[derive(Debug, Clone)]
pub struct FsRequest {
    /// The directory exported to the guest.
    pub shared_dir: PathBuf,
    /// The vhost-user socket the daemon creates.
    pub socket: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// The sandbox's host cgroup, joined before exec.
    pub cgroup: Option<std::sync::Arc<crate::cgroup::Joined>>,
    /// The jailed daemon's id block (`--idmap`): it serves as root of a user namespace
    /// mapping it. None: it runs as root.
    pub idmap: Option<carapace_idmap::IdMap>,
}

/// How to start the VMM.
#[derive(Debug, Clone)]
pub struct VmRequest<'a> {
    /// The VM description file.
    pub description: PathBuf,
    /// The hybrid-vsock socket the description names (where the agent is reached).
    pub vsock: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// The taps of the VM's NICs, handed to the VMM as descriptors 3, 4, ... (the
    /// description's `tap_fd`s, in [`VmPaths::nics`] order).
    pub taps: &'a [std::os::fd::BorrowedFd<'a>],
    /// The sandbox's host cgroup, joined before exec.
    pub cgroup: Option<std::sync::Arc<crate::cgroup::Joined>>,
    /// Start it as PID 1 of a PID namespace of its own (a jailed VMM).
    pub pid_namespace: bool,
}

/// Starts the helper daemons.
pub trait Launcher: Send + Sync + std::fmt::Debug {
    /// Starts the virtio-fs daemon (it must create `req.socket`).
    fn start_fs_daemon(&self, req: &FsRequest) -> Result<ProcessRecord, ProcessError>;
    /// Starts the VMM (it must create the description's vsock socket).
    fn start_vmm(&self, req: &VmRequest<'_>) -> Result<ProcessRecord, ProcessError>;
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
            if let Some(map) = req.idmap {
                cmd.arg("--idmap").arg(map.to_string());
            }
        }
        cmd.args(&fs.extra_args);
        cmd
    }

    /// The VMM's command line.
    pub fn vmm_command(&self, req: &VmRequest) -> Command {
        let mut cmd = Command::new(&self.config.hypervisor.path);
        cmd.arg("--config").arg(&req.description);
        let extra = std::env::var(VMM_LOG_ENV).ok();
        cmd.env(
            "RUST_LOG",
            vmm_log_filter(self.config.debug.log_level.as_str(), extra.as_deref()),
        );
        cmd
    }
}

/// The environment variable whose `tracing` directives are added to the VMM's log level
/// (e.g. `carapace_vmm::discard=debug`: every guest memory range the VMM gives back),
/// for looking into one subsystem without the whole VMM at debug level.
pub const VMM_LOG_ENV: &str = "CARAPACE_VMM_LOG";

/// The VMM's `RUST_LOG`: the configured level, then the directives of [`VMM_LOG_ENV`]
/// (`extra`) if set.
fn vmm_log_filter(level: &str, extra: Option<&str>) -> String {
    match extra.map(str::trim) {
        Some(extra) if !extra.is_empty() => format!("{level},{extra}"),
        _ => level.to_owned(),
    }
}

impl Launcher for BinaryLauncher {
    fn start_fs_daemon(&self, req: &FsRequest) -> Result<ProcessRecord, ProcessError> {
        let mut cmd = self.fs_command(req);
        cmd.env("RUST_LOG", self.config.debug.log_level.as_str());
        spawn_detached_in(
            "fs daemon",
            cmd,
            &req.log,
            &[],
            req.cgroup.as_deref(),
            false,
        )
    }

    fn start_vmm(&self, req: &VmRequest<'_>) -> Result<ProcessRecord, ProcessError> {
        spawn_detached_in(
            "VMM",
            self.vmm_command(req),
            &req.log,
            req.taps,
            req.cgroup.as_deref(),
            req.pid_namespace,
        )
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

    fn start_vmm(&self, req: &VmRequest<'_>) -> Result<ProcessRecord, ProcessError> {
        let mut cmd = Command::new(&self.agent);
        cmd.arg("--host-mode")
            .arg("--listen")
            .arg(format!("unix://{}", req.vsock.display()))
            .arg("--log")
            .arg(self.inner.config.debug.log_level.as_str());
        spawn_detached_in(
            "host-mode agent",
            cmd,
            &req.log,
            &[],
            req.cgroup.as_deref(),
            false,
        )
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
    /// MACs of the VM's NICs; the VMM gets their taps as descriptors 3, 4, ... in this
    /// order ([`VmRequest::taps`]).
    pub nics: Vec<[u8; 6]>,
}

/// The memory hot-plug region of a VM booting with `boot_mib` under `config`: what is left
/// up to `hypervisor.max_memory_mib`, rounded down to the 128 MiB Linux memory block
/// (none when nothing is left).
pub fn hotplug_region(config: &Config, boot_mib: u32) -> Option<MemoryHotplug> {
    let room = config.hypervisor.max_memory_mib.saturating_sub(boot_mib);
    let region_mib = room - room % carapace_vm_config::HOTPLUG_ALIGN_MIB;
    (region_mib > 0).then_some(MemoryHotplug {
        region_mib,
        block_mib: crate::sizing::DEFAULT_BLOCK_MIB,
    })
}

/// The VM description (`carapace-vmm`'s own `VmConfig`, crate `carapace-vm-config`) of a
/// VM that needs `res` at boot: it boots with `res.memory_mib` and a memory hot-plug
/// region up to `hypervisor.max_memory_mib`, and with every vCPU it may ever use
/// ([`crate::sizing::created_vcpus`]: `hypervisor.max_vcpus`), of which the guest kernel starts `res.vcpus` (`maxcpus=`); the others wait,
/// halted, until the agent brings them online (SetOnlineCpus).
pub fn vm_description(config: &Config, res: VmResources, paths: &VmPaths) -> VmConfig {
    let h = &config.hypervisor;
    // The VMM puts `console=ttyS0` first on every command line itself.
    let created = crate::sizing::created_vcpus(h, res.vcpus);
    let mut cmdline = format!(
        "carapace.log={} maxcpus={}",
        config.debug.log_level.as_str(),
        res.vcpus
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
    let mut vm = VmConfig::with_kernel(&h.kernel);
    vm.initrd = Some(h.initrd.clone());
    vm.cmdline = cmdline;
    vm.memory_mib = res.memory_mib;
    // The VMM adds the kernel parameters that online hot-plugged memory itself.
    vm.memory_hotplug = hotplug_region(config, res.memory_mib);
    // The configuration's bounds are the VM description's (`MAX_VCPUS_LIMIT`).
    vm.vcpus = u8::try_from(created).unwrap_or(carapace_vm_config::MAX_VCPUS);
    vm.serial = match &paths.console {
        Some(p) => SerialOutput::File(p.clone()),
        None => SerialOutput::None,
    };
    vm.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: paths.vsock.clone(),
    });
    vm.fs = vec![FsConfig {
        socket: paths.fs_socket.clone(),
        tag: crate::oci::SHARED_FS_TAG.into(),
        request_queues: 1,
    }];
    vm.rng = true;
    vm.free_page_reporting = h.free_page_reporting;
    vm.api_socket = Some(paths.api.clone());
    let vhost = !paths.nics.is_empty() && use_vhost_net(config.network.vhost_net, probe_vhost_net);
    vm.net = paths
        .nics
        .iter()
        .enumerate()
        .map(|(i, mac)| NetConfig {
            tap: None,
            tap_fd: Some(3 + i as i32),
            mac: Some(format_mac(mac)),
            vhost,
        })
        .collect();
    vm
}

/// The host's vhost-net device, which the VMM opens for NICs with `vhost`.
pub const VHOST_NET_DEV: &str = "/dev/vhost-net";

/// Whether `/dev/vhost-net` can be opened here (opened and closed again).
pub fn probe_vhost_net() -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_NET_DEV)
        .map(drop)
}

/// Whether the VM's NICs use vhost-net under `network.vhost_net = mode`; `probe` says
/// whether `/dev/vhost-net` can be opened. "on" is `true` whatever the probe says
/// ([`check_image`] refuses it before anything starts when the device is missing).
pub fn use_vhost_net(mode: VhostNetMode, probe: impl FnOnce() -> std::io::Result<()>) -> bool {
    match mode {
        VhostNetMode::Off => false,
        VhostNetMode::On => true,
        VhostNetMode::Auto => match probe() {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(
                    error = %e,
                    "{VHOST_NET_DEV} cannot be opened: the VM's NICs use the VMM's userspace \
                     virtio-net (network.vhost_net = \"auto\")"
                );
                false
            }
        },
    }
}

/// Checks what a sandbox VM needs on the host before anything is started: the guest image
/// files, and `/dev/vhost-net` when `network.vhost_net = "on"`.
pub fn check_image(config: &Config) -> Result<(), ImageError> {
    check_vhost_net(config.network.vhost_net, probe_vhost_net)?;
    for (key, path) in [
        ("hypervisor.kernel", &config.hypervisor.kernel),
        ("hypervisor.initrd", &config.hypervisor.initrd),
    ] {
        if let Err(source) = std::fs::metadata(path) {
            return Err(ImageError::File {
                key,
                path: path.clone(),
                source,
            });
        }
    }
    Ok(())
}

/// `network.vhost_net = "on"` needs an openable `/dev/vhost-net`.
fn check_vhost_net(
    mode: VhostNetMode,
    probe: impl FnOnce() -> std::io::Result<()>,
) -> Result<(), ImageError> {
    if mode == VhostNetMode::On {
        probe().map_err(|source| ImageError::VhostNet { source })?;
    }
    Ok(())
}

/// Something a sandbox VM needs on the host is missing.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A guest image file.
    #[error("guest image file {path} ({key}) is not usable; build it with `carapace-image build`")]
    File {
        /// The configuration key naming it.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// vhost-net was asked for and is not there.
    #[error(
        "network.vhost_net = \"on\" but {VHOST_NET_DEV} cannot be opened; load the vhost_net \
         module or set network.vhost_net to \"auto\" or \"off\""
    )]
    VhostNet {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
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
    fn the_vmm_log_filter_adds_the_extra_directives_to_the_level() {
        assert_eq!(vmm_log_filter("info", None), "info");
        assert_eq!(vmm_log_filter("warn", Some("  ")), "warn");
        assert_eq!(
            vmm_log_filter("info", Some(" carapace_vmm::discard=debug ")),
            "info,carapace_vmm::discard=debug"
        );
    }

    #[test]
    fn fs_command_has_the_shared_flags() {
        let mut config = Config::default();
        config.fs.extra_args = vec!["--thread-pool-size=2".into()];
        let l = BinaryLauncher { config };
        let cmd = l.fs_command(&FsRequest {
            shared_dir: "/run/carapace/x/shared".into(),
            socket: "/run/carapace/x/fsd.sock".into(),
            log: "/run/carapace/x/fsd.log".into(),
            cgroup: None,
            idmap: None,
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
                "--layout",
                "sandbox",
                "--thread-pool-size=2"
            ]
        );
        // virtiofsd gets the common flags only (its file privileges are its own).
        let mut config = Config::default();
        config.fs.daemon = carapace_config::FsDaemon::Virtiofsd;
        config.fs.allow_setid = true;
        let l = BinaryLauncher { config };
        let cmd = l.fs_command(&FsRequest {
            shared_dir: "/s".into(),
            socket: "/f.sock".into(),
            log: "/f.log".into(),
            cgroup: None,
            idmap: None,
        });
        assert!(
            !cmd.get_args()
                .any(|a| a == "--layout" || a == "--allow-setid")
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
                nics: vec![[0x52, 0x54, 0, 0x12, 0x34, 0x56]],
            },
        );
        assert_eq!(v.kernel, Path::new("/var/lib/carapace/guest/vmlinux"));
        assert_eq!(v.memory_mib, 512);
        // every vCPU it may use (max_vcpus), the needed ones started
        assert_eq!(u32::from(v.vcpus), config.hypervisor.max_vcpus);
        assert!(v.cmdline.contains(" maxcpus=2"), "{}", v.cmdline);
        // memory grows up to max_memory_mib (16384) in a region of 128 MiB multiples
        let hp = v.memory_hotplug.as_ref().expect("hot-plug region");
        assert_eq!((hp.region_mib, hp.block_mib), (16384 - 512, 2));
        let mut small = Config::default();
        small.hypervisor.max_memory_mib = 512 + 200;
        assert_eq!(hotplug_region(&small, 512).map(|h| h.region_mib), Some(128));
        small.hypervisor.max_memory_mib = 512 + 100;
        assert_eq!(hotplug_region(&small, 512), None);
        assert_eq!(
            v.vsock.as_ref().unwrap().uds_path,
            Path::new("/r/x/vsock.sock")
        );
        assert_eq!(v.serial, SerialOutput::File("/r/x/console.log".into()));
        assert_eq!(v.fs[0].tag, "carapace");
        assert!(v.free_page_reporting, "on by default");
        let mut off = Config::default();
        off.hypervisor.free_page_reporting = false;
        let paths = VmPaths {
            vsock: "/v".into(),
            api: "/a".into(),
            fs_socket: "/f".into(),
            console: None,
            nics: Vec::new(),
        };
        assert!(
            !vm_description(
                &off,
                VmResources {
                    vcpus: 1,
                    memory_mib: 256
                },
                &paths
            )
            .free_page_reporting
        );
        assert!(v.cmdline.ends_with(" quiet"));
        assert_eq!(v.cmdline.matches("quiet").count(), 1);
        assert!(!v.cmdline.contains("console="), "the VMM adds it");
        // one NIC: its tap is the first descriptor after stderr
        assert_eq!(v.net.len(), 1);
        assert_eq!(v.net[0].tap_fd, Some(3));
        assert_eq!(v.net[0].mac.as_deref(), Some("52:54:00:12:34:56"));
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
                nics: vec![],
            },
        );
        assert_eq!(v.serial, SerialOutput::None);
        assert!(v.cmdline.split(' ').any(|w| w == "quiet"));
    }

    #[test]
    fn every_valid_configuration_gives_a_description_the_vmm_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, initrd) = (dir.path().join("vmlinux"), dir.path().join("initrd"));
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        let paths = VmPaths {
            vsock: dir.path().join("vsock.sock"),
            api: dir.path().join("api.sock"),
            fs_socket: dir.path().join("fsd.sock"),
            console: Some(dir.path().join("console.log")),
            // The VMM checks a tap_fd is open in its process: none here.
            nics: vec![],
        };
        // The corners of what the configuration accepts, and every container sizing in
        // between that the configuration's bounds let through.
        let mems = [
            carapace_config::MIN_MEMORY_MIB,
            256,
            4096,
            carapace_config::MAX_MEMORY_LIMIT_MIB,
        ];
        for max_vcpus in [1, 2, 8, carapace_config::MAX_VCPUS_LIMIT] {
            for max_memory_mib in mems {
                let mut config = Config::default();
                config.hypervisor.kernel = kernel.clone();
                config.hypervisor.initrd = initrd.clone();
                config.hypervisor.max_vcpus = max_vcpus;
                config.hypervisor.default_vcpus = 1;
                config.hypervisor.default_memory_mib = carapace_config::MIN_MEMORY_MIB;
                config.hypervisor.max_memory_mib = max_memory_mib;
                config
                    .validate(&carapace_config::Origin::Defaults)
                    .unwrap_or_else(|e| {
                        panic!("max_vcpus {max_vcpus}, max_memory {max_memory_mib}: {e}")
                    });
                // no limits, a huge container, a middling one
                for (quota, mem) in [
                    (None, None),
                    (Some(i64::MAX), Some(i64::MAX)),
                    (Some(250_000), Some(1 << 30)),
                ] {
                    let limits = carapace_config::ContainerLimits {
                        cpu_quota_us: quota,
                        cpu_period_us: Some(100_000),
                        memory_limit_bytes: mem,
                    };
                    let res = config.vm_resources(&[limits]);
                    let vm = vm_description(&config, res, &paths);
                    vm.validate().unwrap_or_else(|e| {
                        panic!(
                            "{res:?} from max_vcpus {max_vcpus}, max_memory {max_memory_mib}: {e}"
                        )
                    });
                    // What the runtime writes is what the VMM reads back.
                    let json = serde_json::to_string(&vm).unwrap();
                    let back = VmConfig::parse(&json, Path::new("vm.json")).unwrap();
                    assert_eq!(back, vm);
                }
            }
        }
    }

    #[test]
    fn vhost_net_mode_decides_per_host() {
        let missing = || Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        let there = || Ok(());
        assert!(!use_vhost_net(VhostNetMode::Off, there));
        assert!(use_vhost_net(VhostNetMode::Auto, there));
        assert!(!use_vhost_net(VhostNetMode::Auto, missing));
        assert!(use_vhost_net(VhostNetMode::On, there));
        // "on" without the device: refused before anything starts, naming option and device.
        assert!(check_vhost_net(VhostNetMode::On, there).is_ok());
        assert!(check_vhost_net(VhostNetMode::Auto, missing).is_ok());
        assert!(check_vhost_net(VhostNetMode::Off, missing).is_ok());
        let e = check_vhost_net(VhostNetMode::On, missing)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network.vhost_net") && e.contains("/dev/vhost-net"),
            "{e}"
        );
        // The description carries the choice to every NIC.
        let mut config = Config::default();
        let paths = VmPaths {
            vsock: "/r/x/vsock.sock".into(),
            api: "/r/x/api.sock".into(),
            fs_socket: "/r/x/fsd.sock".into(),
            console: None,
            nics: vec![[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]],
        };
        let res = VmResources {
            vcpus: 1,
            memory_mib: 256,
        };
        for (mode, want) in [(VhostNetMode::On, true), (VhostNetMode::Off, false)] {
            config.network.vhost_net = mode;
            let v = vm_description(&config, res, &paths);
            assert!(v.net.iter().all(|n| n.vhost == want), "{mode:?}");
        }
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
