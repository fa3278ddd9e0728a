//! Which namespaces a container gets, from the spec's `linux.namespaces`.
//!
//! - `ipc`, `uts`, `cgroup`: created when listed without a path, joined when listed with a
//!   `path` (a guest path such as `/proc/<pid>/ns/ipc`: how a second container shares the
//!   first one's namespaces), shared with the VM (the agent's) when not listed;
//! - `pid`: the same, except that a container never shares the agent's: one that lists no
//!   pid namespace (a host-PID request, which in a VM can only mean the VM's) gets a new one,
//!   and joining the agent's own by path is refused. From the agent's pid namespace a
//!   container could signal PID 1 (the agent) and stop the pod, or ptrace it;
//! - `mount`: required and always created (the rootfs is set up with pivot_root, which
//!   must not happen in the agent's mount namespace); joining one by path is refused;
//! - `network`: ignored, with or without a path: the VM is the pod, its network namespace
//!   is every container's;
//! - `user`, `time`: refused (not supported: no id mappings, no clock offsets).

use std::path::PathBuf;

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

/// A namespace type the agent can create or join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsType {
    Cgroup,
    Ipc,
    Uts,
    Pid,
    Mount,
}

impl NsType {
    /// Every type, in the order they are joined (mount last: after it, /proc paths of
    /// the agent's view may be gone).
    pub const ALL: [NsType; 5] = [Self::Cgroup, Self::Ipc, Self::Uts, Self::Pid, Self::Mount];

    /// The clone/setns flag.
    pub fn flag(self) -> CloneFlags {
        match self {
            Self::Cgroup => CloneFlags::CLONE_NEWCGROUP,
            Self::Ipc => CloneFlags::CLONE_NEWIPC,
            Self::Uts => CloneFlags::CLONE_NEWUTS,
            Self::Pid => CloneFlags::CLONE_NEWPID,
            Self::Mount => CloneFlags::CLONE_NEWNS,
        }
    }

    /// The entry name under /proc/<pid>/ns.
    pub fn proc_name(self) -> &'static str {
        match self {
            Self::Cgroup => "cgroup",
            Self::Ipc => "ipc",
            Self::Uts => "uts",
            Self::Pid => "pid",
            Self::Mount => "mnt",
        }
    }
}

/// One namespace of a new container: created (`path: None`) or joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsPlan {
    pub ns: NsType,
    pub path: Option<PathBuf>,
}

/// Why `linux.namespaces` was refused.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("{typ} namespaces are not supported in the guest")]
    Unsupported { typ: String },
    #[error("{typ} namespace listed twice")]
    Duplicate { typ: String },
    #[error("a mount namespace is required (the rootfs is set up with pivot_root in a new one)")]
    MountRequired,
    #[error("joining an existing mount namespace ({path}) is not supported")]
    MountJoin { path: PathBuf },
    #[error(
        "hostname {hostname:?} needs a uts namespace (listed, or joined by path): the VM's is shared otherwise"
    )]
    HostnameNeedsUts { hostname: String },
    #[error(
        "sysctl {key} needs the container to have its own {typ} namespace (listed, or joined by path): the VM's is shared otherwise"
    )]
    SysctlNeeds { key: String, typ: &'static str },
    #[error("pid namespace path {path} is the agent's own: containers never share it")]
    AgentPidJoin { path: PathBuf },
    #[error("{typ} namespace path {path} is not absolute")]
    RelativePath { typ: String, path: PathBuf },
    #[error("{typ} namespace path {path} cannot be used")]
    BadPath {
        typ: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn type_name(t: LinuxNamespaceType) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{t:?}"))
}

/// The namespaces to create or join for `spec` (see the module documentation).
pub fn plan(spec: &Spec) -> Result<Vec<NsPlan>, NamespaceError> {
    let mut out: Vec<NsPlan> = Vec::new();
    let mut network_seen = false;
    let list = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    for n in list.into_iter().flatten() {
        let typ = type_name(n.typ());
        let ns = match n.typ() {
            LinuxNamespaceType::Network => {
                if network_seen {
                    return Err(NamespaceError::Duplicate { typ });
                }
                network_seen = true;
                tracing::debug!("network namespace ignored: the VM's is shared");
                continue;
            }
            LinuxNamespaceType::User | LinuxNamespaceType::Time => {
                return Err(NamespaceError::Unsupported { typ });
            }
            LinuxNamespaceType::Cgroup => NsType::Cgroup,
            LinuxNamespaceType::Ipc => NsType::Ipc,
            LinuxNamespaceType::Uts => NsType::Uts,
            LinuxNamespaceType::Pid => NsType::Pid,
            LinuxNamespaceType::Mount => NsType::Mount,
        };
        if out.iter().any(|p| p.ns == ns) {
            return Err(NamespaceError::Duplicate { typ });
        }
        let path = n.path().clone();
        if let Some(p) = &path {
            if ns == NsType::Mount {
                return Err(NamespaceError::MountJoin { path: p.clone() });
            }
            if !p.is_absolute() {
                return Err(NamespaceError::RelativePath {
                    typ,
                    path: p.clone(),
                });
            }
        }
        out.push(NsPlan { ns, path });
    }
    if !out.iter().any(|p| p.ns == NsType::Mount) {
        return Err(NamespaceError::MountRequired);
    }
    if !out.iter().any(|p| p.ns == NsType::Pid) {
        tracing::debug!("no pid namespace listed: a new one (the agent's is never shared)");
        out.push(NsPlan {
            ns: NsType::Pid,
            path: None,
        });
    }
    if let Some(h) = spec.hostname().as_ref().filter(|h| !h.is_empty())
        && !out.iter().any(|p| p.ns == NsType::Uts)
    {
        return Err(NamespaceError::HostnameNeedsUts {
            hostname: h.clone(),
        });
    }
    for key in spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flat_map(|m| m.keys())
    {
        if let Some(ns) = sysctl_namespace(key)
            && !out.iter().any(|p| p.ns == ns)
        {
            return Err(NamespaceError::SysctlNeeds {
                key: key.clone(),
                typ: ns.proc_name(),
            });
        }
    }
    Ok(out)
}

/// The namespace a sysctl belongs to, for those that must not reach the VM's own:
/// System V IPC and POSIX message queue limits (ipc), host and domain name (uts). Network
/// sysctls apply to the VM's network namespace, the pod's; others are the VM kernel's.
fn sysctl_namespace(key: &str) -> Option<NsType> {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        Some(NsType::Ipc)
    } else if key == "kernel.hostname" || key == "kernel.domainname" {
        Some(NsType::Uts)
    } else {
        None
    }
}

/// Checks that the paths to join exist now (a typed error at create rather than a
/// failed helper); the helper checks the namespace type again with setns.
pub fn check_paths(plan: &[NsPlan]) -> Result<(), NamespaceError> {
    use std::os::unix::fs::MetadataExt;
    for p in plan {
        if let Some(path) = &p.path {
            let m = std::fs::metadata(path).map_err(|source| NamespaceError::BadPath {
                typ: p.ns.proc_name().to_owned(),
                path: path.clone(),
                source,
            })?;
            if p.ns == NsType::Pid
                && let Ok(own) = std::fs::metadata("/proc/self/ns/pid")
                && (own.dev(), own.ino()) == (m.dev(), m.ino())
            {
                return Err(NamespaceError::AgentPidJoin { path: path.clone() });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ns: serde_json::Value) -> Spec {
        let mut s = Spec::default();
        s.set_hostname(None);
        let mut linux = s.linux().clone().unwrap_or_default();
        linux.set_namespaces(Some(serde_json::from_value(ns).unwrap()));
        s.set_linux(Some(linux));
        s
    }

    #[test]
    fn creates_joins_and_ignores_network() {
        let p = plan(&spec(serde_json::json!([
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"},
            {"type": "ipc", "path": "/proc/7/ns/ipc"}, {"type": "mount"}, {"type": "cgroup"}
        ])))
        .unwrap();
        assert_eq!(
            p,
            vec![
                NsPlan {
                    ns: NsType::Pid,
                    path: None
                },
                NsPlan {
                    ns: NsType::Ipc,
                    path: Some("/proc/7/ns/ipc".into())
                },
                NsPlan {
                    ns: NsType::Mount,
                    path: None
                },
                NsPlan {
                    ns: NsType::Cgroup,
                    path: None
                },
            ]
        );
    }

    #[test]
    fn a_container_without_a_pid_namespace_gets_its_own() {
        let p = plan(&spec(serde_json::json!([{"type": "mount"}]))).unwrap();
        assert!(p.contains(&NsPlan {
            ns: NsType::Pid,
            path: None
        }));
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let err = |v| plan(&spec(v)).unwrap_err();
        assert!(matches!(
            err(serde_json::json!([{"type": "pid"}])),
            NamespaceError::MountRequired
        ));
        let own = plan(&spec(
            serde_json::json!([{"type": "mount"}, {"type": "pid", "path": "/proc/self/ns/pid"}]),
        ))
        .unwrap();
        assert!(matches!(
            check_paths(&own),
            Err(NamespaceError::AgentPidJoin { .. })
        ));
        assert!(matches!(
            err(serde_json::json!([{"type": "mount"}, {"type": "user"}])),
            NamespaceError::Unsupported { .. }
        ));
        assert!(matches!(
            err(serde_json::json!([{"type": "mount"}, {"type": "time"}])),
            NamespaceError::Unsupported { .. }
        ));
        assert!(matches!(
            err(serde_json::json!([{"type": "mount", "path": "/proc/1/ns/mnt"}])),
            NamespaceError::MountJoin { .. }
        ));
        assert!(matches!(
            err(serde_json::json!([{"type": "mount"}, {"type": "uts"}, {"type": "uts"}])),
            NamespaceError::Duplicate { .. }
        ));
        assert!(matches!(
            err(serde_json::json!([{"type": "mount"}, {"type": "uts", "path": "x/ns"}])),
            NamespaceError::RelativePath { .. }
        ));
        let p = plan(&spec(
            serde_json::json!([{"type": "mount"}, {"type": "uts", "path": "/nonexistent/ns/uts"}]),
        ))
        .unwrap();
        assert!(matches!(
            check_paths(&p),
            Err(NamespaceError::BadPath { .. })
        ));
    }
}
