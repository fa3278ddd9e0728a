//! Persisted sandbox state: `<root>/<id>/state.json`.
//!
//! The state directory also holds the sandbox's sockets, and a socket's path must fit a
//! socket address (107 bytes). Runc's callers name the root (docker: `--root
//! /var/run/docker/runtime-runc/moby`) and use 64-character ids, which do not fit: a
//! sandbox whose `<root>/<id>` is too long lives in `<root>/~<hash of the id>` instead (the
//! id also written to `.id` in it), found from the id by the same computation.
//!
//! Every CLI call is a new process, and a restarted shim must take over a sandbox it did
//! not start, so everything needed to find and control a sandbox lives in this file: the
//! pids of the helper processes together with their start times (a pid alone could have
//! been reused by an unrelated process by the time it is read back), the socket paths, the
//! bundle and the lifecycle status. Writes go to a temporary file that is renamed over
//! `state.json`, so a reader never sees a half-written file.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::process::ProcessRecord;

/// Name of the state file inside a sandbox directory.
pub const STATE_FILE: &str = "state.json";
/// The OCI runtime-spec version our `state` output and `features` speak.
pub const OCI_VERSION: &str = "1.2.0";
/// Longest accepted sandbox / container id.
pub const MAX_ID_LEN: usize = 128;
/// The longest path of a socket inside a sandbox's state directory, relative to it
/// (`jail/vsock.sock`; `sandbox::SandboxPaths` checks its sockets against it).
pub const LONGEST_SOCKET: usize = 15;
/// The longest socket path the kernel takes (`sun_path` holds 108 bytes with its NUL).
const SOCKET_PATH_MAX: usize = 107;
/// First character of a hashed state directory's name (never in an id).
const HASHED: char = '~';
/// Hex digits of the id's SHA-256 in a hashed directory's name (128 bits).
const HASH_DIGITS: usize = 32;
/// The file naming the id in a hashed state directory.
const ID_FILE: &str = ".id";

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The id cannot name a sandbox.
    #[error(
        "invalid container id {id:?}: {reason} (allowed: 1-{MAX_ID_LEN} characters of \
         A-Z a-z 0-9 _ . + -, not starting with . or -)"
    )]
    InvalidId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A sandbox with this id already exists.
    #[error("container {id} already exists (state directory {dir})")]
    Exists {
        /// The id.
        id: String,
        /// Its state directory.
        dir: PathBuf,
    },
    /// No sandbox with this id.
    #[error("container {id} does not exist (no {path})")]
    NotFound {
        /// The id.
        id: String,
        /// The state file looked for.
        path: PathBuf,
    },
    /// Not even a hashed state directory under the root fits the sandbox's sockets.
    #[error(
        "the state root {root} is too long: a sandbox's sockets under it would not fit a \
         socket address ({max} bytes); choose a shorter --root or runtime.state_dir"
    )]
    RootTooLong {
        /// The root.
        root: PathBuf,
        /// The longest socket path.
        max: usize,
    },
    /// Reading or writing state failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not what this version writes.
    #[error("corrupt state file {path}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// An exclusive lock on one sandbox's state.
#[derive(Debug)]
pub struct StateLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// Lifecycle status, as the OCI runtime spec names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The sandbox is being set up (`create` has not finished).
    Creating,
    /// The container exists in the guest but its process has not been started.
    Created,
    /// The container's process was started and has not been seen to exit.
    Running,
    /// The container's process exited, or the sandbox VM is gone.
    Stopped,
}

impl Status {
    /// The OCI name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }
}

/// A host mount the runtime made for the sandbox (undone on delete).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRecord {
    /// The bind-mount source on the host.
    pub source: PathBuf,
    /// The mount point inside the sandbox's shared directory.
    pub target: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
    /// A work directory the runtime made for an overlay it mounted anew from idmapped
    /// layers (beside the upper layer, on its file system): removed once unmounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<PathBuf>,
}

/// How the container's init process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitRecord {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// The signal that killed it, 0 when it exited.
    pub signal: i32,
}

/// Everything persisted about one sandbox (one VM holding one container).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxState {
    /// Sandbox id, which is also the container id.
    pub id: String,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// Lifecycle status as last recorded (see [`crate::sandbox`] for the live view).
    pub status: Status,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The spec's annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The fs daemon.
    #[serde(default)]
    pub fsd: Option<ProcessRecord>,
    /// The VMM.
    #[serde(default)]
    pub vmm: Option<ProcessRecord>,
    /// The init's keeper (`create`'s `carapace __keep ID`, [`crate::keeper`]): relays the
    /// init's stdio, stands for it towards the caller (its pid is the OCI state's `pid`)
    /// and exits with its status. Once it is gone the container counts as stopped.
    #[serde(default)]
    pub io_relay: Option<ProcessRecord>,
    /// Keepers of processes started by `exec --detach` ([`crate::keeper`]), stopped by
    /// `delete`; the ones gone are dropped at the next exec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec_keepers: Vec<ProcessRecord>,
    /// The container is frozen (`carapace pause`, [`crate::freezer`]); its OCI status is
    /// then `paused`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Host bind mounts made into the shared directory, in the order made.
    #[serde(default)]
    pub mounts: Vec<MountRecord>,
    /// The container init's pid inside the guest, once started.
    #[serde(default)]
    pub guest_pid: Option<u32>,
    /// How the container's init ended, once known.
    #[serde(default)]
    pub exit: Option<ExitRecord>,
    /// For a container of a pod: the sandbox whose VM runs it (this state then has no fs
    /// daemon or VMM of its own, and its mounts are in that sandbox's shared directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// The pod's network as mirrored into the VM (a sandbox whose spec named a network
    /// namespace): what the guest was given and what was made on the host for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetwork>,
    /// The spec's OCI hooks still to run after create (`poststart`, `poststop`; see
    /// [`crate::hooks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<oci_spec::runtime::Hooks>,
    /// The sandbox's cgroup on the host, which its VMM and fs daemon joined
    /// ([`crate::cgroup`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cgroup: Option<crate::cgroup::HostCgroup>,
    /// What this container adds to its VM's size ([`crate::sizing`]), from its limits at
    /// create or at its last update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand: Option<crate::sizing::Demand>,
    /// For a sandbox that owns a VM: its shape and current size, so that a later CLI call
    /// or a restarted shim resizes from what the VM really is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmRecord>,
    /// For a sandbox whose VMM is jailed: the uid claimed for it and its jail directory
    /// ([`crate::jail`]), given back by the teardown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<crate::jail::JailRecord>,
}

/// A VM's shape (fixed at boot) and its current size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// vCPUs the VMM created (the most the guest can bring online).
    pub created_vcpus: u32,
    /// Memory the VM booted with (MiB); hot-plugged memory comes on top.
    pub boot_memory_mib: u32,
    /// Size of the memory hot-plug region (MiB); 0: no hot-plug device.
    pub hotplug_region_mib: u32,
    /// Hot-plug block size (MiB).
    pub hotplug_block_mib: u32,
    /// The size before any container: the sandbox's `default_vcpus` and
    /// `default_memory_mib` (its annotations may have changed the configuration's).
    pub base: crate::sizing::Size,
    /// The size applied last: vCPUs online in the guest, boot plus plugged memory.
    pub size: crate::sizing::Size,
}

/// A sandbox's network: the plan read from its network namespace and, once made, the taps
/// and filters there ([`crate::network`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNetwork {
    /// The interfaces, routes and neighbours the guest gets.
    pub plan: crate::network::NetworkPlan,
    /// What `attach` made (taps, qdiscs, filters); `None` until then.
    #[serde(default)]
    pub attached: Option<crate::network::AttachRecord>,
}

/// The JSON `state` prints, exactly the OCI runtime spec's state object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciState {
    /// Spec version.
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    /// Container id.
    pub id: String,
    /// created, running, paused, stopped (creating while `create` runs).
    pub status: String,
    /// The host pid representing the container (its init's keeper, else the VMM's): 0
    /// once stopped.
    pub pid: i32,
    /// Absolute bundle path.
    pub bundle: String,
    /// The container's root filesystem on the host (absolute), as runc prints it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rootfs: String,
    /// Creation time, RFC 3339 UTC, as runc prints it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created: String,
    /// The user owning the container's state (runc's `owner`).
    #[serde(default)]
    pub owner: String,
    /// The spec's annotations (omitted when empty, as runc does).
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub annotations: BTreeMap<String, String>,
}

/// `secs` since the Unix epoch as an RFC 3339 UTC timestamp (`2026-11-21T17:15:00Z`), as
/// runc prints a container's creation time.
pub fn rfc3339_utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian), by 400-year eras.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// Checks an id that will name a directory.
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let invalid = |reason| StateError::InvalidId {
        id: id.to_owned(),
        reason,
    };
    if id.is_empty() {
        return Err(invalid("empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid("too long"));
    }
    if id.starts_with('.') || id.starts_with('-') {
        return Err(invalid("starts with . or -"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'+' | b'-'))
    {
        return Err(invalid("contains a character outside the allowed set"));
    }
    Ok(())
}

/// The name of `id`'s hashed state directory.
fn hashed_name(id: &str) -> String {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(id.as_bytes()));
    format!("{HASHED}{}", &digest[..HASH_DIGITS])
}

fn is_hashed(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(HASHED))
}

/// The directory holding every sandbox's state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

impl StateStore {
    /// A store under `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The state directory of `id` (not checked for existence): `<root>/<id>`, or
    /// `<root>/~<hash>` where that would not leave room for the sandbox's sockets.
    pub fn dir(&self, id: &str) -> Result<PathBuf, StateError> {
        validate_id(id)?;
        let fits = |dir: &Path| dir.as_os_str().len() + 1 + LONGEST_SOCKET <= SOCKET_PATH_MAX;
        let plain = self.root.join(id);
        if fits(&plain) {
            return Ok(plain);
        }
        let hashed = self.root.join(hashed_name(id));
        if fits(&hashed) {
            return Ok(hashed);
        }
        Err(StateError::RootTooLong {
            root: self.root.clone(),
            max: SOCKET_PATH_MAX,
        })
    }

    /// Creates the state directory of a new sandbox; fails if it exists.
    pub fn create_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        let dir = self.dir(id)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.root)
            .map_err(|source| StateError::Io {
                op: "creating state root",
                path: self.root.clone(),
                source,
            })?;
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) if is_hashed(&dir) => {
                let path = dir.join(ID_FILE);
                fs::write(&path, id).map_err(|source| StateError::Io {
                    op: "writing",
                    path,
                    source,
                })?;
                Ok(dir)
            }
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StateError::Exists {
                id: id.to_owned(),
                dir,
            }),
            Err(source) => Err(StateError::Io {
                op: "creating state directory",
                path: dir,
                source,
            }),
        }
    }

    /// Writes `state` atomically (temporary file, fsync, rename).
    pub fn save(&self, state: &SandboxState) -> Result<(), StateError> {
        let dir = self.dir(&state.id)?;
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(".state.json.tmp");
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { op, path, source }
        };
        let json = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("writing", &tmp))?;
        f.write_all(&json).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("renaming into place", &path))?;
        Ok(())
    }

    /// Reads the state of `id`.
    pub fn load(&self, id: &str) -> Result<SandboxState, StateError> {
        let path = self.dir(id)?.join(STATE_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound {
                    id: id.to_owned(),
                    path,
                });
            }
            Err(source) => {
                return Err(StateError::Io {
                    op: "reading",
                    path,
                    source,
                });
            }
        };
        serde_json::from_slice(&text).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Ids of every sandbox directory under the root, sorted (an absent root is empty).
    pub fn ids(&self) -> Result<Vec<String>, StateError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Io {
                    op: "listing",
                    path: self.root.clone(),
                    source,
                });
            }
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StateError::Io {
                op: "listing",
                path: self.root.clone(),
                source,
            })?;
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if validate_id(&name).is_ok() {
                ids.push(name);
            } else if name.starts_with(HASHED) {
                // the id it holds, if that id's directory is this one
                let id = fs::read_to_string(entry.path().join(ID_FILE)).unwrap_or_default();
                if self.dir(&id).is_ok_and(|d| d == entry.path()) {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Takes the sandbox's exclusive lock (released when the guard drops): every
    /// read-modify-write of a sandbox's state holds it, so concurrent CLI calls and the IO
    /// relay do not lose each other's updates.
    pub fn lock(&self, id: &str) -> Result<StateLock, StateError> {
        let path = self.dir(id)?.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    return StateError::NotFound {
                        id: id.to_owned(),
                        path: path.clone(),
                    };
                }
                StateError::Io {
                    op: "opening lock",
                    path: path.clone(),
                    source,
                }
            })?;
        let lock =
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
                StateError::Io {
                    op: "locking",
                    path: path.clone(),
                    source: std::io::Error::from(e),
                }
            })?;
        Ok(StateLock { _lock: lock })
    }

    /// Loads, changes and saves the state of `id` under its lock.
    pub fn update<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut SandboxState) -> R,
    ) -> Result<(SandboxState, R), StateError> {
        let _guard = self.lock(id)?;
        let mut st = self.load(id)?;
        let r = f(&mut st);
        self.save(&st)?;
        Ok((st, r))
    }

    /// Removes the state directory of `id`; an absent directory is not an error.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let dir = self.dir(id)?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io {
                op: "removing state directory",
                path: dir,
                source,
            }),
        }
    }
}

impl SandboxState {
    /// A fresh state in [`Status::Creating`].
    pub fn new(id: &str, bundle: &Path, annotations: BTreeMap<String, String>) -> Self {
        let created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            id: id.to_owned(),
            bundle: bundle.to_path_buf(),
            status: Status::Creating,
            created_unix,
            annotations,
            fsd: None,
            vmm: None,
            io_relay: None,
            exec_keepers: Vec::new(),
            paused: false,
            mounts: Vec::new(),
            guest_pid: None,
            exit: None,
            sandbox_id: None,
            network: None,
            hooks: None,
            host_cgroup: None,
            demand: None,
            vm: None,
            jail: None,
        }
    }

    /// The OCI state object for a sandbox whose live status is `status` and whose VMM is
    /// alive (`vmm_alive`): pid is the init's keeper's while it lives (a sandbox without a
    /// keeper — the shim's — the VMM's while it runs), 0 once stopped (as runc reports 0
    /// for a stopped container).
    pub fn oci(&self, status: Status, vmm_alive: bool) -> OciState {
        let pid = match (status, self.io_relay, &self.vmm) {
            (Status::Stopped, _, _) => 0,
            // the init's keeper stands for the container as long as it lives
            (_, Some(keeper), _) if keeper.is_alive() => keeper.pid,
            (_, Some(_), _) => 0,
            (_, None, Some(vmm)) if vmm_alive => vmm.pid,
            _ => 0,
        };
        let status_name = if self.paused && status == Status::Running {
            "paused"
        } else {
            status.as_str()
        };
        OciState {
            oci_version: OCI_VERSION.to_owned(),
            id: self.id.clone(),
            status: status_name.to_owned(),
            pid,
            bundle: self.bundle.display().to_string(),
            rootfs: self
                .rootfs()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            created: rfc3339_utc(self.created_unix),
            owner: String::new(),
            annotations: self.annotations.clone(),
        }
    }

    /// The host directory bound as the container's root filesystem: the source of the
    /// recorded mount onto `stage/<id>/rootfs`.
    pub fn rootfs(&self) -> Option<&Path> {
        let target = Path::new("stage").join(&self.id).join("rootfs");
        self.mounts
            .iter()
            .find(|m| m.target.ends_with(&target))
            .map(|m| m.source.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_times_print_as_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339_utc(1_735_689_600), "2025-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(4_102_444_800), "2100-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_795_280_161), "2026-11-21T16:56:01Z");
    }

    #[test]
    fn ids_are_validated() {
        for ok in ["a", "abc-1", "A.b_c+d", &"x".repeat(MAX_ID_LEN)] {
            validate_id(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "-x",
            "a/b",
            "a b",
            "a\0",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let err = validate_id(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid container id"), "{err}");
        }
    }

    #[test]
    fn a_long_root_and_id_get_a_hashed_directory_that_fits_the_sockets() {
        let tmp = tempfile::tempdir().unwrap();
        // docker's root for its runc-style runtimes, under the temporary directory
        let root = tmp.path().join("var/run/docker/runtime-runc/moby");
        let store = StateStore::new(&root);
        let id = "7003e27d1bbdb0dcb63f651381e85e046e8765f92293f453ed9ab13629662a23";
        let short = "c1";
        let dir = store.create_dir(id).unwrap();
        assert_eq!(dir.parent(), Some(root.as_path()));
        let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            name.starts_with(HASHED) && name.len() == 1 + HASH_DIGITS,
            "{name}"
        );
        assert!(dir.as_os_str().len() + 1 + LONGEST_SOCKET <= SOCKET_PATH_MAX);
        // the same id finds the same directory; a short id keeps its plain one
        assert_eq!(store.dir(id).unwrap(), dir);
        assert_eq!(store.create_dir(short).unwrap(), root.join(short));
        let st = SandboxState::new(id, Path::new("/b"), BTreeMap::new());
        store.save(&st).unwrap();
        assert_eq!(store.load(id).unwrap().id, id);
        assert_eq!(store.ids().unwrap(), vec![id.to_owned(), short.to_owned()]);
        // a hashed-looking directory that is not its id's is no sandbox
        fs::create_dir(root.join(format!("{HASHED}{}", "0".repeat(HASH_DIGITS)))).unwrap();
        fs::write(
            root.join(format!("{HASHED}{}", "0".repeat(HASH_DIGITS)))
                .join(ID_FILE),
            short,
        )
        .unwrap();
        assert_eq!(store.ids().unwrap().len(), 2);
        store.remove(id).unwrap();
        assert_eq!(store.ids().unwrap(), vec![short.to_owned()]);

        // a root too long for even a hashed directory: a clear error naming it
        let long = StateStore::new(tmp.path().join("r".repeat(80)));
        let err = long.create_dir(id).unwrap_err();
        assert!(matches!(err, StateError::RootTooLong { .. }), "{err}");
        assert!(err.to_string().contains("--root"), "{err}");
    }

    #[test]
    fn save_load_list_remove_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("root"));
        assert_eq!(store.ids().unwrap(), Vec::<String>::new());
        let dir = store.create_dir("c1").unwrap();
        assert_eq!(dir, tmp.path().join("root/c1"));
        let err = store.create_dir("c1").unwrap_err();
        assert!(matches!(err, StateError::Exists { .. }), "{err}");

        let mut st = SandboxState::new("c1", Path::new("/b"), BTreeMap::new());
        st.vmm = Some(ProcessRecord {
            pid: 42,
            start_time: 7,
        });
        st.mounts.push(MountRecord {
            source: "/b/rootfs".into(),
            target: dir.join("shared/c1/rootfs"),
            read_only: true,
            scratch: None,
        });
        store.save(&st).unwrap();
        assert_eq!(store.load("c1").unwrap(), st);
        st.status = Status::Running;
        store.save(&st).unwrap();
        assert_eq!(store.load("c1").unwrap().status, Status::Running);
        assert!(!dir.join(".state.json.tmp").exists());

        store.create_dir("c0").unwrap();
        fs::create_dir(tmp.path().join("root/.hidden")).unwrap();
        assert_eq!(store.ids().unwrap(), vec!["c0", "c1"]);

        store.remove("c1").unwrap();
        store.remove("c1").unwrap();
        let err = store.load("c1").unwrap_err();
        assert!(matches!(err, StateError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("c1"));
    }

    #[test]
    fn corrupt_and_foreign_state_is_refused_with_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        let dir = store.create_dir("c").unwrap();
        fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        let err = store.load("c").unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }));
        assert!(err.to_string().contains("state.json"), "{err}");
        let mut v =
            serde_json::to_value(SandboxState::new("c", Path::new("/b"), BTreeMap::new())).unwrap();
        v["surprise"] = serde_json::json!(1);
        fs::write(dir.join(STATE_FILE), v.to_string()).unwrap();
        assert!(matches!(
            store.load("c").unwrap_err(),
            StateError::Corrupt { .. }
        ));
    }

    #[test]
    fn oci_state_json_has_runc_shape() {
        let mut st = SandboxState::new(
            "c1",
            Path::new("/bundles/c1"),
            BTreeMap::from([("a".to_owned(), "b".to_owned())]),
        );
        st.vmm = Some(ProcessRecord {
            pid: 1234,
            start_time: 1,
        });
        st.created_unix = 1_795_280_161;
        st.mounts.push(MountRecord {
            source: "/bundles/c1/rootfs".into(),
            target: "/run/carapace/c1/stage/c1/rootfs".into(),
            read_only: false,
            scratch: None,
        });
        let v = serde_json::to_value(st.oci(Status::Running, true)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ociVersion": OCI_VERSION,
                "id": "c1",
                "status": "running",
                "pid": 1234,
                "bundle": "/bundles/c1",
                "rootfs": "/bundles/c1/rootfs",
                "created": "2026-11-21T16:56:01Z",
                "owner": "",
                "annotations": {"a": "b"}
            })
        );
        // with a keeper, the keeper stands for the container (0 once it is gone)
        st.io_relay = ProcessRecord::of(std::process::id() as i32);
        let v = serde_json::to_value(st.oci(Status::Running, true)).unwrap();
        assert_eq!(v["pid"], std::process::id());
        st.io_relay = Some(ProcessRecord {
            pid: i32::MAX,
            start_time: 1,
        });
        let v = serde_json::to_value(st.oci(Status::Running, true)).unwrap();
        assert_eq!(v["pid"], 0);
        st.io_relay = None;
        st.paused = true;
        let v = serde_json::to_value(st.oci(Status::Running, true)).unwrap();
        assert_eq!(v["status"], "paused");
        // once stopped, a frozen container is stopped
        assert_eq!(st.oci(Status::Stopped, true).status, "stopped");
        st.paused = false;
        st.annotations.clear();
        let v = serde_json::to_value(st.oci(Status::Stopped, true)).unwrap();
        assert_eq!(v["pid"], 0);
        assert_eq!(v["status"], "stopped");
        assert!(v.get("annotations").is_none());
        let v = serde_json::to_value(st.oci(Status::Created, false)).unwrap();
        assert_eq!(v["pid"], 0);
    }
}
