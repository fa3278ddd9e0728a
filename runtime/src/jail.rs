//! The VMM's jail on the runtime's side (`[jail]`, carapace-vmm's `jail` section): a
//! root-owned directory per sandbox that becomes the VMM's `/`, and a uid (= gid) per
//! sandbox from the configured range.
//!
//! Ids are claimed with one file per id in `<runtime.state_dir>/.jail-uids/` (created
//! with `O_CREAT|O_EXCL`, holding the claiming sandbox's absolute state directory), so
//! that every runtime process of the configuration — CLI calls with any `--root`, shims —
//! gives each live sandbox a different id. The search starts at a hash of the sandbox id and probes linearly; a claim
//! whose sandbox directory no longer exists (a crash between create and delete) is taken
//! over. Claims and releases hold an exclusive lock on `.jail-uids/.lock`, so taking over
//! a stale claim cannot race a fresh one; the release of the last claim removes the lock
//! and the directory, so nothing is left once no sandbox holds an id. The id is recorded in the sandbox's state and
//! given back by its teardown, on delete and on every failed create.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use carapace_vm_config::{JailConfig, JailRlimits};
use serde::{Deserialize, Serialize};

pub mod probe;

/// The jail directory's name inside a sandbox directory.
pub const JAIL_DIR: &str = "jail";
/// The claims directory's name inside `runtime.state_dir` (starts with a dot: never taken
/// for a sandbox by [`crate::state::StateStore::ids`]).
pub const CLAIMS_DIR: &str = ".jail-uids";
const LOCK_FILE: &str = ".lock";

/// Errors of the jail's host side.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Every id of the range is claimed by a live sandbox.
    #[error(
        "no free uid for the VMM's jail: all {count} ids of {base}..={last} (jail.uid_base, \
         jail.uid_count) are claimed by sandboxes that still exist (claims in {claims}); \
         delete sandboxes or raise jail.uid_count"
    )]
    Exhausted {
        /// First id of the range.
        base: u32,
        /// Ids in the range.
        count: u32,
        /// Last id of the range.
        last: u64,
        /// The claims directory.
        claims: PathBuf,
    },
    /// A file operation on the jail directory or the claims failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Io { op, path, source }
}

/// The jail of one sandbox's VMM, as recorded in its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailRecord {
    /// The uid the VMM runs as (claimed in [`UidClaims`]).
    pub uid: u32,
    /// Its gid (the same number).
    pub gid: u32,
    /// The directory that is its `/`.
    pub root: PathBuf,
    /// The fs daemon's id block under `[jail] fs_daemon` (absent: it runs as root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsBlock>,
}

/// The block of host ids a jailed fs daemon serves through: namespace ids `0 .. count`
/// are host ids `base .. base + count`, and the daemon runs as `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsBlock {
    /// First host id (the daemon's uid and gid).
    pub base: u32,
    /// How many ids.
    pub count: u32,
}

impl FsBlock {
    /// The id mapping of the block.
    pub fn idmap(&self) -> carapace_idmap::IdMap {
        carapace_idmap::IdMap {
            host_base: self.base,
            count: self.count,
        }
    }
}

/// The ids jailed VMMs may run as: `base .. base + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    /// First id.
    pub base: u32,
    /// How many.
    pub count: u32,
}

impl UidRange {
    /// The range of `[jail]`.
    pub fn of(jail: &carapace_config::Jail) -> Self {
        UidRange {
            base: jail.uid_base,
            count: jail.uid_count,
        }
    }

    /// Whether `uid` is in the range.
    pub fn contains(&self, uid: u64) -> bool {
        uid >= u64::from(self.base) && uid < u64::from(self.base) + u64::from(self.count)
    }

    /// The last id.
    pub fn last(&self) -> u64 {
        u64::from(self.base) + u64::from(self.count) - 1
    }

    /// Where the search for `sandbox_id`'s id starts (FNV-1a of the id): different
    /// sandboxes mostly start apart, so a claim seldom probes.
    fn start(&self, sandbox_id: &str) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in sandbox_id.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (h % u64::from(self.count.max(1))) as u32
    }
}

/// How many ids of a range are taken (for `carapace check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Claims whose sandbox exists.
    pub live: u32,
    /// Claims whose sandbox is gone (taken over by the next claim that meets them).
    pub stale: u32,
}

/// The claims of one configuration (its `runtime.state_dir`).
#[derive(Debug, Clone)]
pub struct UidClaims {
    dir: PathBuf,
}

/// An exclusive lock on the claims directory, held while claims change.
struct ClaimsLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

impl UidClaims {
    /// The claims under `state_dir` (`runtime.state_dir`; the directory is made on first
    /// claim).
    pub fn new(state_dir: &Path) -> Self {
        UidClaims {
            dir: state_dir.join(CLAIMS_DIR),
        }
    }

    /// The claims directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the lock, making the directory when needed. A release that gave back the last
    /// claim removes the lock file and the directory (nothing is left once no sandbox
    /// holds an id): a lock taken on a file that is gone by then is taken again.
    fn lock(&self) -> Result<ClaimsLock, JailError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(LOCK_FILE);
        loop {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(io("creating the uid claims directory", &self.dir))?;
            let f = match fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(f) => f,
                // the directory went between making it and opening the lock: again
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("opening", &path)(e)),
            };
            let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| io("locking", &path)(std::io::Error::from(e)))?;
            let held = lock.metadata().map_err(io("reading", &path))?;
            match fs::metadata(&path) {
                Ok(m) if (m.dev(), m.ino()) == (held.dev(), held.ino()) => {
                    return Ok(ClaimsLock { _lock: lock });
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("reading", &path)(e)),
            }
        }
    }

    /// With the lock held: removes the lock file and the directory when no claim is left.
    fn remove_if_unclaimed(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        if entries.flatten().any(|e| e.file_name() != LOCK_FILE) {
            return;
        }
        let lock = self.dir.join(LOCK_FILE);
        if let Err(e) = fs::remove_file(&lock).and_then(|()| fs::remove_dir(&self.dir)) {
            tracing::debug!(dir = %self.dir.display(), error = %e, "uid claims directory kept");
        }
    }

    /// The sandbox directory a claim names; `None` for an empty or unreadable claim (a
    /// crash between creating and writing it: claims are only made under the lock).
    fn holder(path: &Path) -> Option<PathBuf> {
        let text = fs::read_to_string(path).ok()?;
        let holder = text.trim_end_matches('\n');
        (!holder.is_empty()).then(|| PathBuf::from(holder))
    }

    /// Whether the claim at `path` is stale: its sandbox directory is gone.
    fn is_stale(path: &Path) -> bool {
        Self::holder(path).is_none_or(|dir| !dir.exists())
    }

    /// Claims a free id of `range` for the sandbox whose state directory is
    /// `sandbox_dir` (which must exist: a claim whose directory is gone is stale).
    pub fn claim(
        &self,
        range: UidRange,
        sandbox_id: &str,
        sandbox_dir: &Path,
    ) -> Result<u32, JailError> {
        let sandbox_dir = &absolute(sandbox_dir);
        let _lock = self.lock()?;
        let start = range.start(sandbox_id);
        for i in 0..range.count {
            let uid = range.base + (start + i) % range.count;
            let path = self.dir.join(uid.to_string());
            if self.try_create(&path, sandbox_dir)? {
                return Ok(uid);
            }
            if Self::is_stale(&path) {
                tracing::info!(
                    uid,
                    claim = %path.display(),
                    holder = ?Self::holder(&path),
                    "taking over the jail uid of a sandbox that no longer exists"
                );
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("removing the stale claim", &path)(e)),
                }
                if self.try_create(&path, sandbox_dir)? {
                    return Ok(uid);
                }
            }
        }
        Err(JailError::Exhausted {
            base: range.base,
            count: range.count,
            last: range.last(),
            claims: self.dir.clone(),
        })
    }

    /// Creates the claim `path` for `sandbox_dir`; false if it exists.
    fn try_create(&self, path: &Path, sandbox_dir: &Path) -> Result<bool, JailError> {
        let mut f = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io("creating the uid claim", path)(e)),
        };
        let mut text = sandbox_dir.as_os_str().as_encoded_bytes().to_vec();
        text.push(b'\n');
        let written = f.write_all(&text).and_then(|()| f.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(path);
            return Err(io("writing the uid claim", path)(e));
        }
        Ok(true)
    }

    /// Gives `uid` back if `sandbox_dir` holds it; true if a claim was removed. A claim
    /// that is gone or held by another sandbox is left as it is.
    pub fn release(&self, uid: u32, sandbox_dir: &Path) -> Result<bool, JailError> {
        let sandbox_dir = &absolute(sandbox_dir);
        let path = self.dir.join(uid.to_string());
        if !path.exists() {
            return Ok(false);
        }
        let _lock = self.lock()?;
        match Self::holder(&path) {
            Some(holder) if holder == *sandbox_dir => match fs::remove_file(&path) {
                Ok(()) => {
                    self.remove_if_unclaimed();
                    Ok(true)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io("removing the uid claim", &path)(e)),
            },
            Some(holder) => {
                tracing::warn!(
                    uid,
                    holder = %holder.display(),
                    sandbox = %sandbox_dir.display(),
                    "the jail uid is claimed by another sandbox now; leaving its claim"
                );
                Ok(false)
            }
            None => Ok(false),
        }
    }

    /// How many ids of `range` are claimed (an absent directory: none).
    pub fn usage(&self, range: UidRange) -> Result<Usage, JailError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Usage::default()),
            Err(e) => return Err(io("listing", &self.dir)(e)),
        };
        let mut usage = Usage::default();
        for entry in entries.flatten() {
            let Some(uid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if !range.contains(uid) {
                continue;
            }
            if Self::is_stale(&entry.path()) {
                usage.stale += 1;
            } else {
                usage.live += 1;
            }
        }
        Ok(usage)
    }
}

/// `path` made absolute (against the working directory) without touching the file system:
/// a claim names its sandbox for any process, wherever it runs.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Makes the sandbox's jail directory: `<sandbox_dir>/jail`, mode 0755, owned by the
/// runtime (root), empty. Beside `shared/` and `stage/`, never under anything the guest
/// can write. The VMM's vsock socket is made in it.
pub fn make_root(sandbox_dir: &Path) -> Result<PathBuf, JailError> {
    let root = sandbox_dir.join(JAIL_DIR);
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&root)
        .map_err(io("creating the jail directory", &root))?;
    // The umask may have taken bits away: the jail's uid must be able to enter it.
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
        .map_err(io("setting the mode of", &root))?;
    Ok(root)
}

/// The VM description's `jail` section for `record` under `[jail]`: a new network
/// namespace too (the VM's taps arrive as descriptors).
pub fn vm_section(jail: &carapace_config::Jail, record: &JailRecord) -> JailConfig {
    JailConfig {
        root: record.root.clone(),
        uid: record.uid,
        gid: record.gid,
        net_namespace: true,
        rlimits: JailRlimits {
            nofile: jail.nofile,
            nproc: jail.nproc,
            fsize: None,
        },
    }
}

#[cfg(test)]
mod tests;
