//! The sandbox's host cgroup: the VMM and the fs daemon join the cgroup the sandbox's spec
//! names (`linux.cgroupsPath`; under Kubernetes, a cgroup of the pod's), so the pod's limits
//! and its accounting — node allocatable, eviction, `kubectl top` — cover the VM's real
//! memory and CPU, guest memory included.
//!
//! Both forms containerd passes are understood: cgroupfs (`/kubepods/burstable/pod<uid>/<id>`)
//! and systemd (`kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`, the slice expanded
//! into its parents as systemd lays them out, the leaf `<prefix>-<name>.scope`). On a
//! cgroup v2 host there is one directory; on a v1 host one per mounted hierarchy (a new
//! cpuset directory gets its parent's `cpuset.cpus`/`cpuset.mems`, without which no process
//! could join it).
//!
//! A helper joins in its forked child before exec, by writing `0` to the `cgroup.procs`
//! files opened here ([`Joined`]), so everything it ever allocates is charged to the
//! sandbox's cgroup. The directories created are recorded and removed at teardown, deepest
//! first; ones that existed before (the pod's, made by the kubelet) are left alone.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Most hierarchies joined (v1 hosts mount about a dozen).
pub const MAX_HIERARCHIES: usize = 16;
/// How long teardown waits for a cgroup whose processes were just stopped to empty.
const EMPTY_GRACE: Duration = Duration::from_secs(2);

/// Errors placing the sandbox in its cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `linux.cgroupsPath` is not a path we can place anything at.
    #[error("linux.cgroupsPath {path:?}: {reason}")]
    InvalidPath {
        /// As given.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// No cgroup file system is mounted.
    #[error("no cgroup file system is mounted at {0}")]
    NotMounted(PathBuf),
    /// A file system operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The sandbox's cgroup as made on the host, kept in its state for teardown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCgroup {
    /// The leaf directory in each hierarchy (one on cgroup v2).
    pub dirs: Vec<PathBuf>,
    /// The directories this sandbox created, deepest first: removed at teardown.
    pub created: Vec<PathBuf>,
}

/// `cgroups_path` relative to a hierarchy's root: the cgroupfs form as is (a leading `/`
/// taken off), the systemd form `slice:prefix:name` expanded.
pub fn relative(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: cgroups_path.to_owned(),
        reason,
    };
    let rel = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
        [one] => PathBuf::from(one.trim_start_matches('/')),
        [slice, prefix, name] => {
            if name.is_empty() || slice.contains('/') || prefix.contains('/') || name.contains('/')
            {
                return Err(invalid(
                    "systemd form is slice:prefix:name, without slashes",
                ));
            }
            let mut p = expand_slice(slice).ok_or_else(|| invalid("not a systemd slice name"))?;
            p.push(if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            });
            p
        }
        _ => return Err(invalid("neither a path nor slice:prefix:name")),
    };
    if rel.as_os_str().is_empty() {
        return Err(invalid("names the root cgroup"));
    }
    let dotted = cgroups_path
        .split(['/', ':'])
        .any(|s| s == "." || s == "..");
    if dotted || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(invalid("has . or .. components"));
    }
    Ok(rel)
}

/// `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice` (systemd's layout); `-.slice` or empty →
/// the root.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    if slice.is_empty() || slice == "-.slice" {
        return Some(PathBuf::new());
    }
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return None;
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// The hierarchies under `root` a process joins: `root` itself on cgroup v2, each mounted
/// v1 hierarchy (a directory with `cgroup.procs`, symlinked aliases skipped) otherwise.
pub fn hierarchies(root: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    if root.join("cgroup.controllers").exists() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io("listing", root))? {
        let entry = entry.map_err(io("listing", root))?;
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir && path.join("cgroup.procs").exists() {
            found.push(path);
        }
    }
    found.sort();
    found.truncate(MAX_HIERARCHIES);
    if found.is_empty() {
        return Err(CgroupError::NotMounted(root.to_path_buf()));
    }
    Ok(found)
}

/// Makes the sandbox's cgroup `cgroups_path` in every hierarchy under `root`. On error,
/// whatever was created is removed again.
pub fn create(root: &Path, cgroups_path: &str) -> Result<HostCgroup, CgroupError> {
    let rel = relative(cgroups_path)?;
    let mut made = HostCgroup::default();
    let result = (|| {
        for h in hierarchies(root)? {
            let leaf = h.join(&rel);
            let mut missing = Vec::new();
            let mut p = leaf.as_path();
            while p != h && !p.exists() {
                missing.push(p.to_path_buf());
                p = p.parent().unwrap_or(&h);
            }
            for dir in missing.iter().rev() {
                match std::fs::create_dir(dir) {
                    Ok(()) => made.created.insert(0, dir.clone()),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io("creating", dir)(e)),
                }
                inherit_cpuset(&h, dir)?;
            }
            delegate_controllers(&h, &leaf);
            made.dirs.push(leaf);
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(made),
        Err(e) => {
            remove(&made);
            Err(e)
        }
    }
}

/// cgroup v2: every directory above `leaf` (from the hierarchy's root down) passes the
/// controllers it has on to its children (`cgroup.subtree_control`), as runc does for the
/// cgroups it makes; without that the leaf has no `memory.current` or `cpu.max`, the pod's
/// limits do not apply to the VM and `PodSandboxStats` reads zeros. A host whose init
/// delegates them already (systemd, a kubelet) needs no write. Best effort: a level that
/// refuses (e.g. it holds processes itself) is logged and the helpers still join.
fn delegate_controllers(hierarchy: &Path, leaf: &Path) {
    if !hierarchy.join("cgroup.controllers").exists() {
        return;
    }
    let mut levels: Vec<&Path> = leaf.ancestors().skip(1).collect();
    levels.retain(|p| p.starts_with(hierarchy));
    for dir in levels.into_iter().rev() {
        let Ok(available) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
            continue;
        };
        let control = dir.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&control).unwrap_or_default();
        let missing: Vec<String> = available
            .split_whitespace()
            .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
            .map(|c| format!("+{c}"))
            .collect();
        if missing.is_empty() {
            continue;
        }
        if let Err(e) = std::fs::write(&control, missing.join(" ")) {
            tracing::warn!(
                cgroup = %dir.display(),
                controllers = %missing.join(" "),
                error = %e,
                "cannot pass cgroup controllers on to the sandbox's cgroup; its limits and \
                 statistics may not cover the VM"
            );
        }
    }
}

/// A new v1 cpuset directory starts with no CPUs and no memory nodes: copy its parent's.
/// On v2 an empty `cpuset.cpus` means "the parent's" (and the root has no such file):
/// nothing to copy.
fn inherit_cpuset(hierarchy: &Path, dir: &Path) -> Result<(), CgroupError> {
    if hierarchy.join("cgroup.controllers").exists() {
        return Ok(());
    }
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        let Some(parent) = dir.parent() else { continue };
        if !own.exists() || std::fs::read_to_string(&own).is_ok_and(|s| !s.trim().is_empty()) {
            continue;
        }
        let value = std::fs::read_to_string(parent.join(file))
            .map_err(io("reading", &parent.join(file)))?;
        std::fs::write(&own, value.trim()).map_err(io("writing", &own))?;
    }
    Ok(())
}

/// Removes what `cg` created, deepest first, waiting briefly for processes that were just
/// stopped to leave. Returns what could not be removed.
pub fn remove(cg: &HostCgroup) -> Vec<String> {
    let mut problems = Vec::new();
    for dir in &cg.created {
        let deadline = Instant::now() + EMPTY_GRACE;
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                // A parent this sandbox made first that now holds another sandbox's cgroup
                // (two containers under ctr's /<namespace>/): it is theirs too, left as it is.
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::ENOTEMPTY))
                        && holds_child_cgroup(dir) =>
                {
                    tracing::debug!(dir = %dir.display(), "cgroup holds another cgroup: left");
                    break;
                }
                // still holds a process that is exiting (or a child cgroup someone else made)
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    problems.push(format!("cannot remove cgroup {}: {e}", dir.display()));
                    break;
                }
            }
        }
    }
    problems
}

/// Whether the cgroup directory `dir` has a child cgroup (a subdirectory).
fn holds_child_cgroup(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
}

/// The `cgroup.procs` files of a [`HostCgroup`], open for the helpers to join.
#[derive(Debug)]
pub struct Joined {
    files: Vec<File>,
}

impl Joined {
    /// Opens every leaf's `cgroup.procs`.
    pub fn open(cg: &HostCgroup) -> Result<Self, CgroupError> {
        let files = cg
            .dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(io("opening", &p))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { files })
    }

    /// The descriptors to write to in the child.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.files.iter().map(|f| f.as_fd()).collect()
    }
}

#[cfg(test)]
mod tests;
