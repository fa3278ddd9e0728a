//! Carapace's typed configuration.
//!
//! One TOML file, `/etc/carapace/configuration.toml` unless a flag or the `CARAPACE_CONFIG`
//! environment variable names another. Every key has a default (the shipped
//! `config/configuration.toml` documents them and is checked against [`Config::default`] by
//! a test); unknown keys are rejected, and [`Config::validate`] names the offending key and
//! file.

pub mod annotations;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the configuration is read from when nothing else is said.
pub const DEFAULT_PATH: &str = "/etc/carapace/configuration.toml";
/// Environment variable naming the configuration file.
pub const ENV_VAR: &str = "CARAPACE_CONFIG";
/// The shipped, documented default configuration.
pub const SHIPPED: &str = include_str!("../configuration.toml");

/// Smallest guest memory a sandbox can boot with (kernel, agent, one small container).
pub const MIN_MEMORY_MIB: u32 = 64;
/// Largest vCPU count the VMM supports (its VM description's limit).
pub const MAX_VCPUS_LIMIT: u32 = carapace_vm_config::MAX_VCPUS as u32;
/// Largest guest memory the VMM accepts (its VM description's limit).
pub const MAX_MEMORY_LIMIT_MIB: u32 = carapace_vm_config::MAX_MEMORY_MIB;

/// Errors from loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error("invalid configuration file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line, column and key.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration in {origin}: {key}: {reason}")]
    Invalid {
        /// The file, or "built-in defaults".
        origin: Origin,
        /// The dotted key, e.g. `hypervisor.default_vcpus`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Where a configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file.
    File(PathBuf),
    /// No file: the built-in defaults.
    Defaults,
    /// A sandbox's annotations applied over a configuration.
    Annotations,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Defaults => f.write_str("built-in defaults"),
            Origin::Annotations => f.write_str("the sandbox's annotations"),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The VMM, the guest image and sandbox sizing.
    pub hypervisor: Hypervisor,
    /// The virtio-fs daemon.
    pub fs: Fs,
    /// The guest agent.
    pub agent: Agent,
    /// Logging and the guest console.
    pub debug: Debug,
    /// Host-side state.
    pub runtime: Runtime,
    /// The sandbox VMs' NICs.
    pub network: Network,
    /// How each sandbox's VMM is confined.
    pub jail: Jail,
}

/// `[hypervisor]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hypervisor {
    /// The VMM binary.
    pub path: PathBuf,
    /// Guest kernel (PVH vmlinux).
    pub kernel: PathBuf,
    /// Guest initramfs holding the agent.
    pub initrd: PathBuf,
    /// Extra guest kernel parameters.
    pub kernel_params: String,
    /// vCPUs before container limits.
    pub default_vcpus: u32,
    /// Memory (MiB) before container limits.
    pub default_memory_mib: u32,
    /// Upper bound on a sandbox's vCPUs.
    pub max_vcpus: u32,
    /// Upper bound on a sandbox's memory (MiB).
    pub max_memory_mib: u32,
    /// Give memory the guest frees back to the host (virtio-balloon free page reporting).
    pub free_page_reporting: bool,
}

impl Default for Hypervisor {
    fn default() -> Self {
        Self {
            path: "/usr/local/bin/carapace-vmm".into(),
            kernel: "/var/lib/carapace/guest/vmlinux".into(),
            initrd: "/var/lib/carapace/guest/initramfs.cpio.gz".into(),
            kernel_params: String::new(),
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 16384,
            free_page_reporting: true,
        }
    }
}

/// Which virtio-fs daemon serves the shared directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsDaemon {
    /// Ours.
    #[serde(rename = "carapace-fsd")]
    CarapaceFsd,
    /// The reference daemon from crates.io.
    #[serde(rename = "virtiofsd")]
    Virtiofsd,
}

/// Guest caching of shared files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// No caching: every access goes to the host.
    Never,
    /// Cache with timeouts (close-to-open consistency).
    Auto,
    /// Cache without expiry: only for data the host does not change.
    Always,
}

impl CacheMode {
    /// The value of the daemon's `--cache` flag.
    pub fn as_flag(self) -> &'static str {
        match self {
            CacheMode::Never => "never",
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
        }
    }
}

/// `[fs]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fs {
    /// Which daemon.
    pub daemon: FsDaemon,
    /// Its binary.
    pub path: PathBuf,
    /// Its cache mode.
    pub cache: CacheMode,
    /// Extra arguments.
    pub extra_args: Vec<String>,
    /// Let the guest set setuid/setgid bits and file capabilities in volumes too (by
    /// default only in a container's own rootfs; carapace-fsd only).
    pub allow_setid: bool,
}

impl Default for Fs {
    fn default() -> Self {
        Self {
            daemon: FsDaemon::CarapaceFsd,
            path: "/usr/local/bin/carapace-fsd".into(),
            cache: CacheMode::Auto,
            extra_args: Vec::new(),
            allow_setid: false,
        }
    }
}

/// `[agent]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Agent {
    /// How long the agent may take to answer after the VMM starts (ms).
    pub boot_timeout_ms: u64,
    /// Deadline for one request (ms).
    pub request_timeout_ms: u64,
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            boot_timeout_ms: 30_000,
            request_timeout_ms: 10_000,
        }
    }
}

/// Log levels, as `tracing` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// And warnings.
    Warn,
    /// And progress.
    Info,
    /// And details.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The level's name, as accepted by `tracing`'s filters and our daemons' `--log-level`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `[debug]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Debug {
    /// Log level of every component.
    pub log_level: LogLevel,
    /// Keep the guest console in the sandbox's `console.log`.
    pub console: bool,
    /// For fault tests only: a file naming points of create, start, exec and delete at
    /// which the runtime kills one of its own processes (the VMM, the fs daemon, itself);
    /// read each time such a point is reached. Absent by default.
    pub fault_plan: Option<PathBuf>,
}

impl Default for Debug {
    fn default() -> Self {
        Self {
            log_level: LogLevel::Info,
            console: false,
            fault_plan: None,
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Runtime {
    /// Directory holding one state directory per sandbox.
    pub state_dir: PathBuf,
    /// Configuration keys a sandbox's `io.carapace.config.<key>` annotations may set
    /// ([`annotations`]); none by default.
    pub enable_annotations: Vec<String>,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            state_dir: "/run/carapace".into(),
            enable_annotations: Vec::new(),
        }
    }
}

/// `[network]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// Whether the VMs' NICs move frames through the host kernel's vhost-net.
    pub vhost_net: VhostNetMode,
}

/// `network.vhost_net`: where a VM's NIC frames are moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VhostNetMode {
    /// vhost-net when `/dev/vhost-net` can be opened, else the VMM's own (userspace)
    /// virtio-net.
    #[default]
    Auto,
    /// Always vhost-net: a sandbox fails to start when `/dev/vhost-net` cannot be opened.
    On,
    /// Never: the VMM's userspace virtio-net.
    Off,
}

impl VhostNetMode {
    /// The value as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            VhostNetMode::Auto => "auto",
            VhostNetMode::On => "on",
            VhostNetMode::Off => "off",
        }
    }
}

/// First uid (and gid) of the default jail range: 0x70000000. It lies above the
/// subordinate ranges `useradd` hands out (/etc/subuid, 100000..600100000 by default) and
/// above systemd's container range (524288..1879048191, `systemd-nspawn
/// --private-users=pick`), below systemd's "foreign" range (0x7FFE0000..) and below 2^31,
/// which some tools mishandle as a negative id.
pub const DEFAULT_JAIL_UID_BASE: u32 = 0x7000_0000;
/// Ids in the default jail range: one per running sandbox, so at most this many jailed
/// sandboxes at once (each also takes an id block of the fs daemon's range).
pub const DEFAULT_JAIL_UID_COUNT: u32 = 4_000;
/// First id of the default fs daemon range: right after the VMMs' 65536-id slot.
pub const DEFAULT_JAIL_FS_UID_BASE: u32 = 0x7001_0000;
/// Ids in each sandbox's fs daemon block: the container ids a jailed fs daemon can serve
/// (0 .. 65535, what Kubernetes' user namespaces give a pod too).
pub const DEFAULT_JAIL_FS_IDS: u32 = 65_536;
/// The jail range must end at or below this id (2^31: ids from there on are read as
/// negative by some tools, and `(uid_t)-1` means "unchanged" to the kernel).
pub const JAIL_UID_END_LIMIT: u64 = 1 << 31;

/// `[jail]`: each sandbox's VMM runs jailed (carapace-vmm's `jail`, vmm/README.md
/// "Confinement"): new mount, IPC, UTS and network namespaces, its own directory as `/`,
/// an unprivileged uid and gid of its own from `uid_base..uid_base + uid_count`, no
/// capabilities, no_new_privs, resource limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Jail {
    /// Jail every sandbox's VMM (the default). Off: VMMs run as root with the host's view
    /// (still under their seccomp filters).
    pub enabled: bool,
    /// First uid (= gid) of the range jailed VMMs run as.
    pub uid_base: u32,
    /// How many ids the range has: at most this many sandboxes run at once.
    pub uid_count: u32,
    /// RLIMIT_NOFILE of a jailed VMM.
    pub nofile: u64,
    /// RLIMIT_NPROC of a jailed VMM (threads of its uid: one uid per sandbox).
    pub nproc: u64,
    /// Jail the fs daemon too (carapace-fsd only, on by default; with virtiofsd it must be
    /// set false): it serves the sandbox's files as root of a user namespace that
    /// maps the sandbox's block of `fs_ids` ids, through idmapped mounts of the rootfs
    /// layers and volumes.
    pub fs_daemon: bool,
    /// First id of the fs daemons' blocks: the sandbox whose VMM has uid `uid_base + k`
    /// gets `fs_uid_base + k * fs_ids .. + fs_ids`.
    pub fs_uid_base: u32,
    /// Ids per fs daemon block: container files and processes may use ids below this.
    pub fs_ids: u32,
}

impl Default for Jail {
    fn default() -> Self {
        Self {
            enabled: true,
            uid_base: DEFAULT_JAIL_UID_BASE,
            uid_count: DEFAULT_JAIL_UID_COUNT,
            nofile: carapace_vm_config::DEFAULT_JAIL_NOFILE,
            nproc: carapace_vm_config::DEFAULT_JAIL_NPROC,
            fs_daemon: true,
            fs_uid_base: DEFAULT_JAIL_FS_UID_BASE,
            fs_ids: DEFAULT_JAIL_FS_IDS,
        }
    }
}

impl Jail {
    /// One past the last id of the range.
    pub fn uid_end(&self) -> u64 {
        u64::from(self.uid_base) + u64::from(self.uid_count)
    }

    /// One past the last id of the fs daemons' blocks.
    pub fn fs_end(&self) -> u64 {
        u64::from(self.fs_uid_base) + u64::from(self.uid_count) * u64::from(self.fs_ids)
    }

    /// The fs daemon's block (first host id, count) of the sandbox whose VMM runs as
    /// `vmm_uid`, or None when that uid is not in the range.
    pub fn fs_block(&self, vmm_uid: u32) -> Option<(u32, u32)> {
        let k = vmm_uid.checked_sub(self.uid_base)?;
        if k >= self.uid_count {
            return None;
        }
        let base = u64::from(self.fs_uid_base) + u64::from(k) * u64::from(self.fs_ids);
        Some((u32::try_from(base).ok()?, self.fs_ids))
    }
}

/// A loaded, validated configuration and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Its origin.
    pub origin: Origin,
}

/// Which file to read: the flag's, else the environment variable's, else [`DEFAULT_PATH`].
/// An explicitly named file must exist; the default file may be absent (then the built-in
/// defaults apply).
pub fn locate(flag: Option<&Path>, env: Option<&Path>) -> (PathBuf, bool) {
    match flag.or(env) {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    }
}

/// Loads and validates the configuration (see [`locate`] for which file).
pub fn load(flag: Option<&Path>, env: Option<&Path>) -> Result<Loaded, ConfigError> {
    let (path, explicit) = locate(flag, env);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let config = Config::parse(&text, &path)?;
            config.validate(&Origin::File(path.clone()))?;
            Ok(Loaded {
                config,
                origin: Origin::File(path),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            let config = Config::default();
            config.validate(&Origin::Defaults)?;
            Ok(Loaded {
                config,
                origin: Origin::Defaults,
            })
        }
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

impl Config {
    /// Parses TOML text read from `path` (named in errors). Does not validate.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Checks ranges and consistency; the error names the key and the origin.
    pub fn validate(&self, origin: &Origin) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            origin: origin.clone(),
            key,
            reason,
        };
        let h = &self.hypervisor;
        for (key, path) in [
            ("hypervisor.path", &h.path),
            ("hypervisor.kernel", &h.kernel),
            ("hypervisor.initrd", &h.initrd),
            ("fs.path", &self.fs.path),
            ("runtime.state_dir", &self.runtime.state_dir),
        ]
        .into_iter()
        .chain(
            self.debug
                .fault_plan
                .as_ref()
                .map(|p| ("debug.fault_plan", p)),
        ) {
            if !path.is_absolute() {
                return Err(invalid(
                    key,
                    format!(
                        "must be an absolute path, got {:?}",
                        path.display().to_string()
                    ),
                ));
            }
        }
        if h.max_vcpus == 0 || h.max_vcpus > MAX_VCPUS_LIMIT {
            return Err(invalid(
                "hypervisor.max_vcpus",
                format!(
                    "must be between 1 and {MAX_VCPUS_LIMIT}, got {}",
                    h.max_vcpus
                ),
            ));
        }
        if h.default_vcpus == 0 || h.default_vcpus > h.max_vcpus {
            return Err(invalid(
                "hypervisor.default_vcpus",
                format!(
                    "must be between 1 and hypervisor.max_vcpus ({}), got {}",
                    h.max_vcpus, h.default_vcpus
                ),
            ));
        }
        if h.default_memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "hypervisor.default_memory_mib",
                format!(
                    "must be at least {MIN_MEMORY_MIB} MiB, got {}",
                    h.default_memory_mib
                ),
            ));
        }
        if h.max_memory_mib > MAX_MEMORY_LIMIT_MIB {
            return Err(invalid(
                "hypervisor.max_memory_mib",
                format!(
                    "must be at most {MAX_MEMORY_LIMIT_MIB} MiB (the VMM's limit), got {}",
                    h.max_memory_mib
                ),
            ));
        }
        if h.max_memory_mib < h.default_memory_mib {
            return Err(invalid(
                "hypervisor.max_memory_mib",
                format!(
                    "must be at least hypervisor.default_memory_mib ({}), got {}",
                    h.default_memory_mib, h.max_memory_mib
                ),
            ));
        }
        if let Some(k) = self
            .runtime
            .enable_annotations
            .iter()
            .find(|k| !annotations::ANNOTATABLE.contains(&k.as_str()))
        {
            return Err(invalid(
                "runtime.enable_annotations",
                format!(
                    "{k:?} cannot be set by annotations (these can: {})",
                    annotations::ANNOTATABLE.join(", ")
                ),
            ));
        }
        if h.kernel_params.contains('\n') {
            return Err(invalid(
                "hypervisor.kernel_params",
                "must be a single line".into(),
            ));
        }
        self.validate_jail(&invalid)?;
        for (key, ms) in [
            ("agent.boot_timeout_ms", self.agent.boot_timeout_ms),
            ("agent.request_timeout_ms", self.agent.request_timeout_ms),
        ] {
            if ms == 0 || ms > 600_000 {
                return Err(invalid(
                    key,
                    format!("must be between 1 and 600000 ms, got {ms}"),
                ));
            }
        }
        Ok(())
    }

    /// The `[jail]` checks (made whether or not it is enabled, so that turning it on later
    /// cannot reveal a bad range).
    fn validate_jail(
        &self,
        invalid: &impl Fn(&'static str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let j = &self.jail;
        if j.uid_base < 1000 {
            return Err(invalid(
                "jail.uid_base",
                format!(
                    "must be at least 1000 (ids below belong to the system's own accounts), got {}",
                    j.uid_base
                ),
            ));
        }
        if j.uid_count == 0 {
            return Err(invalid(
                "jail.uid_count",
                "must be at least 1 (one id per running sandbox)".into(),
            ));
        }
        if j.uid_end() > JAIL_UID_END_LIMIT {
            return Err(invalid(
                "jail.uid_count",
                format!(
                    "the range {}..{} passes 2^31 ({JAIL_UID_END_LIMIT}); lower jail.uid_base or jail.uid_count",
                    j.uid_base,
                    j.uid_end()
                ),
            ));
        }
        if j.fs_uid_base < 1000 {
            return Err(invalid(
                "jail.fs_uid_base",
                format!("must be at least 1000, got {}", j.fs_uid_base),
            ));
        }
        if j.fs_ids < 1000 {
            return Err(invalid(
                "jail.fs_ids",
                format!(
                    "must be at least 1000 (container files and users need the low ids), got {}",
                    j.fs_ids
                ),
            ));
        }
        if j.fs_end() > JAIL_UID_END_LIMIT {
            return Err(invalid(
                "jail.fs_ids",
                format!(
                    "the fs daemons' blocks {}..{} (jail.uid_count blocks of jail.fs_ids ids from jail.fs_uid_base) pass 2^31 ({JAIL_UID_END_LIMIT}); lower jail.uid_count, jail.fs_ids or jail.fs_uid_base",
                    j.fs_uid_base,
                    j.fs_end()
                ),
            ));
        }
        if u64::from(j.fs_uid_base) < j.uid_end() && u64::from(j.uid_base) < j.fs_end() {
            return Err(invalid(
                "jail.fs_uid_base",
                format!(
                    "the fs daemons' blocks {}..{} overlap the VMMs' range {}..{}",
                    j.fs_uid_base,
                    j.fs_end(),
                    j.uid_base,
                    j.uid_end()
                ),
            ));
        }
        if j.enabled && j.fs_daemon && self.fs.daemon == FsDaemon::Virtiofsd {
            return Err(invalid(
                "jail.fs_daemon",
                "only carapace-fsd runs jailed; with fs.daemon = \"virtiofsd\" set jail.fs_daemon = false".into(),
            ));
        }
        if j.nofile < 64 {
            return Err(invalid(
                "jail.nofile",
                format!("must be at least 64, got {}", j.nofile),
            ));
        }
        if j.nproc < 16 {
            return Err(invalid(
                "jail.nproc",
                format!("must be at least 16, got {}", j.nproc),
            ));
        }
        Ok(())
    }

    /// A rough size of a VM holding containers with these limits, silently capped by the
    /// configured maxima (for tools and tests that boot a VM by hand). Sandboxes are sized
    /// by the runtime's policy (`carapace_runtime::sizing`), which refuses past the maxima
    /// instead of capping and resizes the VM as containers join and leave.
    pub fn vm_resources(&self, limits: &[ContainerLimits]) -> VmResources {
        let h = &self.hypervisor;
        let mut millicpus: u64 = 0;
        let mut memory_bytes: u64 = 0;
        for l in limits {
            if let (Some(quota @ 1..), Some(period @ 1..)) = (l.cpu_quota_us, l.cpu_period_us) {
                millicpus = millicpus.saturating_add((quota as u64).saturating_mul(1000) / period);
            }
            if let Some(mem @ 1..) = l.memory_limit_bytes {
                memory_bytes = memory_bytes.saturating_add(mem as u64);
            }
        }
        let extra_vcpus = u32::try_from(millicpus.div_ceil(1000)).unwrap_or(u32::MAX);
        let extra_mib = u32::try_from(memory_bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX);
        VmResources {
            vcpus: h.default_vcpus.saturating_add(extra_vcpus).min(h.max_vcpus),
            memory_mib: h
                .default_memory_mib
                .saturating_add(extra_mib)
                .min(h.max_memory_mib),
        }
    }
}

/// The resource limits of one container, as its OCI spec gives them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerLimits {
    /// `linux.resources.cpu.quota` (µs per period).
    pub cpu_quota_us: Option<i64>,
    /// `linux.resources.cpu.period` (µs).
    pub cpu_period_us: Option<u64>,
    /// `linux.resources.memory.limit` (bytes).
    pub memory_limit_bytes: Option<i64>,
}

/// vCPUs and memory of a sandbox VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmResources {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
}

#[cfg(test)]
mod tests;
