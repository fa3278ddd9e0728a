//! The VM description carapace-vmm accepts: loaded from JSON or TOML (file or stdin),
//! merged with CLI flags, validated before anything is created. The runtime builds the same
//! type and writes it as `vm.json` (see README.md).

pub mod api;
mod confine;

pub use confine::{
    DEFAULT_JAIL_NOFILE, DEFAULT_JAIL_NPROC, JailConfig, JailRlimits, SeccompAction, SeccompConfig,
};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Smallest guest memory we accept: a minimal kernel plus initramfs needs more than this.
pub const MIN_MEMORY_MIB: u32 = 32;
/// Largest guest memory we accept (sanity bound, not a host capacity check).
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// Maximum number of vCPUs.
pub const MAX_VCPUS: u8 = 32;
/// Maximum number of virtio-mmio devices (bounded by free IOAPIC pins).
pub const MAX_VIRTIO_DEVICES: usize = 16;
/// Linux's memory block size on x86_64: the hot-plug region is a whole number of them.
pub const HOTPLUG_ALIGN_MIB: u32 = 128;
/// Largest hot-plug region we accept (sanity bound, like [`MAX_MEMORY_MIB`]).
pub const MAX_HOTPLUG_REGION_MIB: u32 = MAX_MEMORY_MIB;
/// Largest virtio-mem block we accept (a block is the unit the guest plugs and unplugs).
pub const MAX_HOTPLUG_BLOCK_MIB: u32 = 1024;

/// Errors loading or validating a VM description.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The description file could not be read.
    #[error("cannot read VM description {path}")]
    Read {
        /// File path (`-` for stdin).
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The description is not valid JSON.
    #[error("VM description {path} is not valid JSON")]
    Json {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The description is not valid TOML.
    #[error("VM description {path} is not valid TOML")]
    Toml {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
    /// A field has an invalid value.
    #[error("invalid VM description: field `{field}`: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A file named by the description does not exist or cannot be accessed.
    #[error("field `{field}`: cannot access {path}")]
    Path {
        /// Field name.
        field: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where the 8250 serial console output goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Discard guest console output (the port still works).
    None,
    /// Append to a file (created if missing).
    File(PathBuf),
    /// An inherited file descriptor.
    Fd(i32),
}

/// Hybrid vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context id (>= 3).
    #[serde(default = "default_cid")]
    pub guest_cid: u64,
    /// Host unix socket the VMM listens on (`CONNECT <port>\n`); guest-initiated connections
    /// to port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

fn default_cid() -> u64 {
    3
}

/// virtio-blk device backed by a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Backing file (raw image).
    pub path: PathBuf,
    /// Expose the device read-only (VIRTIO_BLK_F_RO); the file is opened read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// virtio-fs device served by a vhost-user backend (carapace-fsd or virtiofsd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The backend's vhost-user unix socket.
    pub socket: PathBuf,
    /// Mount tag seen by the guest (`mount -t virtiofs <tag> /mnt`), 1..=36 bytes.
    pub tag: String,
    /// Request queues (1..=8).
    #[serde(default = "default_request_queues")]
    pub request_queues: usize,
}

fn default_request_queues() -> usize {
    1
}

/// virtio-net device on a host tap interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Tap interface to attach to (created if missing, which needs CAP_NET_ADMIN).
    #[serde(default)]
    pub tap: Option<String>,
    /// An already open tap descriptor inherited from the caller (IFF_TAP | IFF_NO_PI;
    /// IFF_VNET_HDR is accepted). Exactly one of `tap` and `tap_fd`.
    #[serde(default)]
    pub tap_fd: Option<i32>,
    /// Guest MAC address `xx:xx:xx:xx:xx:xx` (unicast); random locally administered if unset.
    #[serde(default)]
    pub mac: Option<String>,
    /// Frames move through the host kernel's vhost-net (`/dev/vhost-net`, opened by the
    /// VMM) instead of the VMM's own worker. Works with `tap` and `tap_fd` alike; default
    /// false.
    #[serde(default)]
    pub vhost: bool,
}

/// Parses a unicast MAC address `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not of the form xx:xx:xx:xx:xx:xx"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!("{s:?}: octet {p:?} is not two hex digits"));
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?}: octet {p:?} is not hex"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s:?} is a multicast address"));
    }
    if mac == [0; 6] {
        return Err(format!("{s:?} is the zero address"));
    }
    Ok(mac)
}

/// Formats a MAC address as [`parse_mac`] reads it: `xx:xx:xx:xx:xx:xx`, lower case.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Memory the VM can grow by at run time: a virtio-mem device managing a region of
/// `region_mib` above RAM, which the guest plugs and unplugs in blocks of `block_mib` as the
/// API's `memory` request asks it to. Nothing is plugged at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplug {
    /// Size of the hot-plug region (the most the VM can grow by), a multiple of 128 MiB
    /// and of `block_mib`.
    pub region_mib: u32,
    /// Plug/unplug granularity: a power of two, at least 2 MiB (default 2).
    #[serde(default = "default_block_mib")]
    pub block_mib: u32,
}

fn default_block_mib() -> u32 {
    2
}

impl MemoryHotplug {
    /// Checks the sizes (see the field docs).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let b = self.block_mib;
        if b < 2 || !b.is_power_of_two() || b > MAX_HOTPLUG_BLOCK_MIB {
            return invalid(
                "memory_hotplug.block_mib",
                format!("{b} is not a power of two in 2..={MAX_HOTPLUG_BLOCK_MIB}"),
            );
        }
        let r = self.region_mib;
        if r == 0 || r > MAX_HOTPLUG_REGION_MIB {
            return invalid(
                "memory_hotplug.region_mib",
                format!("{r} is not in 1..={MAX_HOTPLUG_REGION_MIB}"),
            );
        }
        if !r.is_multiple_of(HOTPLUG_ALIGN_MIB) || !r.is_multiple_of(b) {
            return invalid(
                "memory_hotplug.region_mib",
                format!(
                    "{r} is not a multiple of {HOTPLUG_ALIGN_MIB} (Linux's memory block) and of \
                     block_mib ({b})"
                ),
            );
        }
        Ok(())
    }
}

/// A complete VM description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: PVH ELF `vmlinux` (preferred) or `bzImage`.
    pub kernel: PathBuf,
    /// Optional initrd / initramfs.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended after the VMM's own arguments.
    #[serde(default)]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Serial console output.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Hybrid vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-blk devices.
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    /// virtio-fs devices (vhost-user); guest memory becomes memfd-backed and shared.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// Attach a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Attach a virtio-balloon device for free page reporting: memory the guest frees goes
    /// back to the host (absent: false).
    #[serde(default)]
    pub free_page_reporting: bool,
    /// virtio-net devices on host taps.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Control API unix socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Seconds the API `shutdown` waits for the guest before forcing the VM off.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u32,
    /// Lab workaround, off (0) by default: interrupt a vCPU that stayed inside KVM_RUN this
    /// long (ms), so that a timer interrupt lost by an emulated host CPU cannot leave it
    /// halted for good (see `nudge.rs`). Counted as `exits.nudged`, with a warning.
    #[serde(default)]
    pub vcpu_nudge_ms: u32,
    /// Lab workaround, off (0) by default: device workers look at their rings and raise an
    /// interrupt the guest left unacknowledged every this many ms (see `virtio::worker`).
    /// Counted per device as `irq_resent`, with a warning.
    #[serde(default)]
    pub irq_rescue_ms: u32,
    /// Memory hot-plug (a virtio-mem device); absent: none, the VM keeps `memory_mib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_hotplug: Option<MemoryHotplug>,
    /// Per-thread seccomp allow-lists; absent: on, violations kill the VMM (see
    /// [`SeccompConfig`]).
    #[serde(default)]
    pub seccomp: SeccompConfig,
    /// Confine the VMM before the guest runs (see [`JailConfig`]); absent: no jail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailConfig>,
}

fn default_memory() -> u32 {
    256
}
fn default_vcpus() -> u8 {
    1
}
fn default_shutdown_timeout() -> u32 {
    10
}

impl VmConfig {
    /// A description with defaults for everything except the kernel.
    pub fn with_kernel(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            memory_mib: default_memory(),
            vcpus: default_vcpus(),
            serial: SerialOutput::default(),
            vsock: None,
            block: Vec::new(),
            fs: Vec::new(),
            rng: false,
            free_page_reporting: false,
            net: Vec::new(),
            api_socket: None,
            shutdown_timeout_secs: default_shutdown_timeout(),
            vcpu_nudge_ms: 0,
            irq_rescue_ms: 0,
            memory_hotplug: None,
            seccomp: SeccompConfig::default(),
            jail: None,
        }
    }

    /// Parses a description; TOML when `path` ends in `.toml`, JSON otherwise; `path` is
    /// only used for errors and to pick the format.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(text).map_err(|source| ConfigError::Toml {
                path: path.to_owned(),
                source,
            })
        } else {
            serde_json::from_str(text).map_err(|source| ConfigError::Json {
                path: path.to_owned(),
                source,
            })
        }
    }

    /// Reads a description from a file, or stdin when `path` is `-` (JSON, or TOML when the
    /// text starts like TOML is not guessed: stdin is JSON unless `stdin_toml`).
    pub fn load(path: &Path, stdin_toml: bool) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        if path == Path::new("-") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(read_err)?;
            let fake = if stdin_toml {
                "stdin.toml"
            } else {
                "stdin.json"
            };
            Self::parse(&text, Path::new(fake))
        } else {
            let text = std::fs::read_to_string(path).map_err(read_err)?;
            Self::parse(&text, path)
        }
    }

    /// Checks values and that the named files exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.memory_mib < MIN_MEMORY_MIB {
            return invalid(
                "memory_mib",
                format!(
                    "{} MiB is too small; a Linux guest needs at least {MIN_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            );
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return invalid(
                "memory_mib",
                format!(
                    "{} MiB exceeds the limit of {MAX_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            );
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return invalid("vcpus", format!("{} is not in 1..={MAX_VCPUS}", self.vcpus));
        }
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return invalid(
                    "vsock.guest_cid",
                    format!(
                        "{} is reserved or out of range (use 3..=2^32-1)",
                        v.guest_cid
                    ),
                );
            }
            if v.uds_path.as_os_str().is_empty() {
                return invalid("vsock.uds_path", "must not be empty".into());
            }
        }
        for b in &self.block {
            check_file("block.path", &b.path)?;
        }
        for f in &self.fs {
            if f.tag.is_empty() || f.tag.len() > 36 {
                return invalid("fs.tag", format!("{:?} must be 1..=36 bytes", f.tag));
            }
            if !(1..=8).contains(&f.request_queues) {
                return invalid(
                    "fs.request_queues",
                    format!("{} is not in 1..=8", f.request_queues),
                );
            }
        }
        for n in &self.net {
            match (&n.tap, n.tap_fd) {
                (Some(_), Some(_)) | (None, None) => {
                    return invalid("net", "give exactly one of `tap` and `tap_fd`".into());
                }
                (Some(name), None) => {
                    if name.is_empty() || name.len() > 15 || name.contains(['\0', '/']) {
                        return invalid(
                            "net.tap",
                            format!("{name:?} is not an interface name (1..=15 bytes)"),
                        );
                    }
                }
                (None, Some(fd)) => {
                    if fd < 0 {
                        return invalid("net.tap_fd", format!("{fd} is not a file descriptor"));
                    }
                }
            }
            if let Some(m) = &n.mac {
                parse_mac(m).map_err(|reason| ConfigError::Invalid {
                    field: "net.mac",
                    reason,
                })?;
            }
        }
        if let Some(h) = &self.memory_hotplug {
            h.validate()?;
        }
        if let Some(j) = &self.jail {
            j.validate(self.vsock.as_ref().map(|v| v.uds_path.as_path()))?;
        }
        let n = self.block.len()
            + self.fs.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.memory_hotplug.is_some());
        if n > MAX_VIRTIO_DEVICES {
            return invalid(
                "block",
                format!("{n} virtio devices requested, at most {MAX_VIRTIO_DEVICES} are supported"),
            );
        }
        if self.cmdline.contains('\0') {
            return invalid("cmdline", "contains a NUL byte".into());
        }
        if let SerialOutput::Fd(fd) = self.serial
            && fd < 0
        {
            return invalid("serial.fd", format!("{fd} is not a file descriptor"));
        }
        Ok(())
    }
}

fn check_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| ConfigError::Path {
            field,
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_formatted_mac_parses_back() {
        let mac = [0x0a, 0x58, 0x0a, 0xd5, 0x00, 0x05];
        assert_eq!(format_mac(&mac), "0a:58:0a:d5:00:05");
        assert_eq!(parse_mac(&format_mac(&mac)), Ok(mac));
    }

    #[test]
    fn json_defaults_and_unknown_fields() {
        let c = VmConfig::parse(r#"{"kernel":"/k"}"#, Path::new("x.json")).unwrap();
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.serial, SerialOutput::Stdout);
        assert_eq!(
            c.seccomp.action,
            SeccompAction::Kill,
            "filters on when absent"
        );
        let e = VmConfig::parse(r#"{"kernel":"/k","bogus":1}"#, Path::new("x.json")).unwrap_err();
        assert!(format!("{:?}", e).contains("bogus"), "{e:?}");
    }

    #[test]
    fn toml_with_devices() {
        let c = VmConfig::parse(
            "kernel = \"/k\"\nserial = { file = \"/tmp/s\" }\nrng = true\n\
             [vsock]\nuds_path = \"/tmp/v.sock\"\n[[block]]\npath = \"/d\"\nread_only = true\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.serial, SerialOutput::File("/tmp/s".into()));
        assert_eq!(c.vsock.unwrap().guest_cid, 3);
        assert!(c.block[0].read_only);
        assert!(c.rng);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"x").unwrap();
        let mut c = VmConfig::with_kernel(&k);
        c.validate().unwrap();
        c.memory_mib = 8;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("memory_mib") && e.contains("too small"), "{e}");
        c.memory_mib = 128;
        c.kernel = dir.path().join("missing");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("kernel") && e.contains("missing"), "{e}");
        c.kernel = k;
        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: "/tmp/x".into(),
        });
        assert!(c.validate().unwrap_err().to_string().contains("guest_cid"));
        c.vsock = None;
        c.net = vec![NetConfig {
            tap: Some("tap0".into()),
            tap_fd: Some(3),
            mac: None,
            vhost: false,
        }];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("exactly one"), "{e}");
        c.net[0].tap_fd = None;
        c.net[0].mac = Some("03:00:00:00:00:01".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("net.mac") && e.contains("multicast"), "{e}");
        c.net[0].mac = Some("52:54:00:12:34:56".into());
        c.validate().unwrap();
        // vhost-net with a tap name or an inherited descriptor
        c.net[0].vhost = true;
        c.validate().unwrap();
        c.net[0].tap = None;
        c.net[0].tap_fd = Some(0);
        c.validate().unwrap();
        c.net[0].tap_fd = None;
        c.net[0].tap = Some("a-name-far-too-long".into());
        assert!(c.validate().unwrap_err().to_string().contains("net.tap"));
    }

    #[test]
    fn net_vhost_defaults_to_off() {
        let n: NetConfig = serde_json::from_str(r#"{"tap_fd":3}"#).unwrap();
        assert!(!n.vhost);
        let n: NetConfig = serde_json::from_str(r#"{"tap":"t0","vhost":true}"#).unwrap();
        assert!(n.vhost);
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"t0","vhost_net":true}"#).is_err());
    }

    #[test]
    fn memory_hotplug_parses_defaults_and_validates() {
        let c = VmConfig::parse(
            r#"{"kernel":"/k","memory_hotplug":{"region_mib":512}}"#,
            Path::new("x.json"),
        )
        .unwrap();
        let h = c.memory_hotplug.clone().unwrap();
        assert_eq!((h.region_mib, h.block_mib), (512, 2));
        h.validate().unwrap();
        // Absent: none, and not written back either (existing descriptions unchanged).
        let c = VmConfig::parse(r#"{"kernel":"/k"}"#, Path::new("x.json")).unwrap();
        assert_eq!(c.memory_hotplug, None);
        assert!(
            !serde_json::to_string(&c)
                .unwrap()
                .contains("memory_hotplug")
        );
        assert!(
            VmConfig::parse(
                r#"{"kernel":"/k","memory_hotplug":{"region_mib":512,"bogus":1}}"#,
                Path::new("x.json"),
            )
            .is_err()
        );
        let v = |region_mib, block_mib| {
            MemoryHotplug {
                region_mib,
                block_mib,
            }
            .validate()
            .map_err(|e| e.to_string())
        };
        v(128, 2).unwrap();
        v(1024, 128).unwrap();
        v(MAX_HOTPLUG_REGION_MIB, 1024).unwrap();
        for (r, b, field) in [
            (0, 2, "region_mib"),
            (100, 2, "region_mib"),
            (MAX_HOTPLUG_REGION_MIB + 128, 2, "region_mib"),
            (384, 256, "region_mib"),
            (512, 1, "block_mib"),
            (512, 0, "block_mib"),
            (512, 6, "block_mib"),
            (4096, 2048, "block_mib"),
        ] {
            let e = v(r, b).unwrap_err();
            assert!(e.contains(field), "{r}/{b}: {e}");
        }
        // Through the whole description, and counted as a virtio device.
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"x").unwrap();
        let mut c = VmConfig::with_kernel(&k);
        c.memory_hotplug = Some(MemoryHotplug {
            region_mib: 96,
            block_mib: 2,
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("memory_hotplug.region_mib"), "{e}");
        c.memory_hotplug = Some(MemoryHotplug {
            region_mib: 128,
            block_mib: 2,
        });
        c.validate().unwrap();
        c.block = (0..MAX_VIRTIO_DEVICES)
            .map(|_| BlockConfig {
                path: k.clone(),
                read_only: true,
            })
            .collect();
        assert!(c.validate().is_err());
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:ef").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "5:54:00:ab:cd:eef",
            "zz:54:00:ab:cd:ef",
            "00:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
