//! How the VMM confines itself: the `seccomp` section of the description (per-thread
//! syscall allow-lists, on by default) and the `jail` section (namespaces, a new root, an
//! unprivileged uid, no capabilities, resource limits; off unless given).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// What the kernel does when a VMM thread makes a syscall its allow-list does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SeccompAction {
    /// Kill the whole VMM process at once (`SECCOMP_RET_KILL_PROCESS`): it dies with
    /// SIGSYS, and the kernel's audit log (`dmesg`, `type=1326`) names the thread and the
    /// syscall. The default.
    #[default]
    Kill,
    /// Debugging: the syscall is refused with SIGSYS (`SECCOMP_RET_TRAP`); the VMM writes
    /// the thread kind, thread name and syscall number to its log (stderr) and exits with
    /// status 159 (128 + SIGSYS).
    Trap,
    /// Debugging only: the syscall is allowed and the kernel logs it (`SECCOMP_RET_LOG`,
    /// audit `type=1326` in `dmesg`), so one run lists every syscall a list misses.
    Log,
    /// No filters at all (debugging only; the VMM warns at start).
    Off,
}

impl SeccompAction {
    /// The name in the description (`"kill"`, `"trap"`, `"log"`, `"off"`).
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompAction::Kill => "kill",
            SeccompAction::Trap => "trap",
            SeccompAction::Log => "log",
            SeccompAction::Off => "off",
        }
    }
}

impl std::str::FromStr for SeccompAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(SeccompAction::Kill),
            "trap" => Ok(SeccompAction::Trap),
            "log" => Ok(SeccompAction::Log),
            "off" => Ok(SeccompAction::Off),
            _ => Err(format!("{s:?} is not one of kill, trap, log, off")),
        }
    }
}

/// The `seccomp` section: every VMM thread runs under the allow-list of its kind (vCPU,
/// each device worker kind, API, console, main, ...), installed before it touches guest
/// state. Absent from the description means the default, filters on with `kill`: a
/// runtime that does not know the section gets the filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SeccompConfig {
    /// What a syscall outside the thread's allow-list does (default `kill`).
    #[serde(default)]
    pub action: SeccompAction,
}

/// Default `jail.rlimits.nofile`: descriptors the VMM may hold (devices, eventfds, up to
/// 1024 vsock connections, API clients).
pub const DEFAULT_JAIL_NOFILE: u64 = 4096;
/// Default `jail.rlimits.nproc`: processes and threads of the jail's uid (vCPUs, workers,
/// API clients); the VMM cannot fork.
pub const DEFAULT_JAIL_NPROC: u64 = 512;

/// Resource limits the jailed VMM runs under (soft = hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailRlimits {
    /// RLIMIT_NOFILE (default [`DEFAULT_JAIL_NOFILE`]).
    #[serde(default = "default_nofile")]
    pub nofile: u64,
    /// RLIMIT_NPROC, counted per uid (default [`DEFAULT_JAIL_NPROC`]).
    #[serde(default = "default_nproc")]
    pub nproc: u64,
    /// RLIMIT_FSIZE in bytes: no write may reach past this offset of any file, so it must
    /// exceed every writable block image. Absent: the VMM takes the larger of 64 MiB and
    /// its largest writable block image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsize: Option<u64>,
}

fn default_nofile() -> u64 {
    DEFAULT_JAIL_NOFILE
}
fn default_nproc() -> u64 {
    DEFAULT_JAIL_NPROC
}

impl Default for JailRlimits {
    fn default() -> Self {
        JailRlimits {
            nofile: DEFAULT_JAIL_NOFILE,
            nproc: DEFAULT_JAIL_NPROC,
            fsize: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// The `jail` section: once it has opened everything the description names (KVM, kernel,
/// initrd, images, taps, vhost devices, sockets) and before any of its threads exists or
/// the guest runs, the VMM enters new mount, IPC, UTS and (by default) network
/// namespaces, makes `root` its `/` (read-only, nosuid, nodev, noexec), drops to
/// `uid`/`gid` with no supplementary groups and no capabilities, sets no_new_privs and
/// the resource limits. Needs root (CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID, CAP_SETPCAP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// An existing directory (absolute path) that becomes the VMM's `/`. The VMM creates
    /// nothing in it. When the VM has vsock, `vsock.uds_path` must be inside it (guest
    /// connections to host port P reach `<uds_path>_P` from inside the jail).
    pub root: PathBuf,
    /// The uid the VMM runs as (not 0).
    pub uid: u32,
    /// The gid the VMM runs as (not 0).
    pub gid: u32,
    /// Enter a new network namespace (default true). Taps and vhost-net are opened before,
    /// so they keep working; unix sockets are reached by path, not through the namespace.
    #[serde(default = "default_true")]
    pub net_namespace: bool,
    /// Resource limits.
    #[serde(default)]
    pub rlimits: JailRlimits,
}

impl JailConfig {
    /// Checks the values; `vsock_uds` is the VM's vsock socket, if any.
    pub fn validate(&self, vsock_uds: Option<&Path>) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        if !self.root.is_absolute() || self.root == Path::new("/") {
            return invalid(
                "jail.root",
                format!("{} is not an absolute path below /", self.root.display()),
            );
        }
        match std::fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return invalid(
                    "jail.root",
                    format!("{} is not a directory", self.root.display()),
                );
            }
            Err(source) => {
                return Err(ConfigError::Path {
                    field: "jail.root",
                    path: self.root.clone(),
                    source,
                });
            }
        }
        if self.uid == 0 || self.gid == 0 {
            return invalid("jail.uid", "the jail's uid and gid must not be 0".into());
        }
        let r = &self.rlimits;
        if r.nofile < 64 || r.nproc < 16 || r.fsize == Some(0) {
            return invalid(
                "jail.rlimits",
                format!("{r:?}: nofile must be at least 64, nproc at least 16, fsize above 0"),
            );
        }
        if let Some(uds) = vsock_uds
            && self.inside(uds).is_none()
        {
            return invalid(
                "vsock.uds_path",
                format!(
                    "{} is outside jail.root {}: guest connections to the host could not reach it",
                    uds.display(),
                    self.root.display()
                ),
            );
        }
        Ok(())
    }

    /// `path` as the jailed VMM sees it (`/` + the part below `root`), if it is below root.
    pub fn inside(&self, path: &Path) -> Option<PathBuf> {
        let rest = path.strip_prefix(&self.root).ok()?;
        (!rest.as_os_str().is_empty()).then(|| Path::new("/").join(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_or_empty_means_kill_and_unknown_fields_are_refused() {
        let c: SeccompConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.action, SeccompAction::Kill);
        let c: SeccompConfig = serde_json::from_str(r#"{"action":"trap"}"#).unwrap();
        assert_eq!(c.action, SeccompAction::Trap);
        assert!(serde_json::from_str::<SeccompConfig>(r#"{"action":"allow"}"#).is_err());
        assert!(serde_json::from_str::<SeccompConfig>(r#"{"mode":"kill"}"#).is_err());
        for a in ["kill", "trap", "log", "off"] {
            assert_eq!(a.parse::<SeccompAction>().unwrap().as_str(), a);
        }
        assert!("KILL".parse::<SeccompAction>().is_err());
    }

    #[test]
    fn jail_defaults_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("jail");
        std::fs::create_dir(&root).unwrap();
        let j: JailConfig = serde_json::from_value(serde_json::json!({
            "root": root, "uid": 1000, "gid": 1000
        }))
        .unwrap();
        assert!(j.net_namespace);
        assert_eq!(j.rlimits, JailRlimits::default());
        j.validate(None).unwrap();
        j.validate(Some(&root.join("vsock.sock"))).unwrap();
        assert_eq!(
            j.inside(&root.join("vsock.sock")),
            Some(PathBuf::from("/vsock.sock"))
        );
        let e = j
            .validate(Some(&dir.path().join("vsock.sock")))
            .unwrap_err();
        assert!(e.to_string().contains("vsock.uds_path"), "{e}");
        assert_eq!(j.inside(&root), None);
        for bad in [
            JailConfig {
                uid: 0,
                ..j.clone()
            },
            JailConfig {
                gid: 0,
                ..j.clone()
            },
            JailConfig {
                root: "jail".into(),
                ..j.clone()
            },
            JailConfig {
                root: "/".into(),
                ..j.clone()
            },
            JailConfig {
                root: dir.path().join("missing"),
                ..j.clone()
            },
            JailConfig {
                rlimits: JailRlimits {
                    nofile: 3,
                    ..JailRlimits::default()
                },
                ..j.clone()
            },
        ] {
            assert!(bad.validate(None).is_err(), "{bad:?}");
        }
        assert!(
            serde_json::from_value::<JailConfig>(serde_json::json!({
                "root": root, "uid": 1, "gid": 1, "chroot": true
            }))
            .is_err()
        );
    }
}
