//! The OCI bundle: loading and checking `config.json`, translating it for the guest, and
//! the default spec `carapace spec` writes.
//!
//! In the guest the sandbox's shared directory is a virtio-fs mount at
//! [`GUEST_SHARED_DIR`]; inside it, container `<cid>` has its rootfs at `<cid>/rootfs` and
//! its bind-mount sources at `<cid>/mounts/<n>`. The host makes those paths real with bind
//! mounts into the shared directory (see [`crate::mounts`]); the spec sent to the agent has
//! every host path replaced by its guest path. The spec is validated by deserialising it
//! into `oci_spec`'s types, but edited as JSON so fields we do not know pass through.

use std::path::{Path, PathBuf};

use carapace_config::ContainerLimits;
use serde_json::Value;

/// Where the guest agent mounts the sandbox's virtio-fs share.
pub const GUEST_SHARED_DIR: &str = "/run/carapace/shared";
/// The virtio-fs tag of the sandbox's share.
pub const SHARED_FS_TAG: &str = "carapace";
/// Largest config.json accepted.
const MAX_SPEC_BYTES: u64 = 4 << 20;

/// Errors about the bundle and its spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// config.json could not be read.
    #[error("cannot read OCI spec {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// config.json is too big to be a spec.
    #[error("OCI spec {path} is {size} bytes, more than the {MAX_SPEC_BYTES} accepted")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// config.json is not a valid spec.
    #[error("invalid OCI spec {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (field and position).
        #[source]
        source: serde_json::Error,
    },
    /// A field is missing or unusable.
    #[error("invalid OCI spec {path}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The JSON path of the field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// `spec` would overwrite an existing file.
    #[error("{path} exists; remove it first")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Writing the default spec failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A host directory or file to bind into the shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindPlan {
    /// Absolute host source.
    pub source: PathBuf,
    /// Target relative to the shared directory.
    pub target: PathBuf,
    /// Read-only (the whole tree).
    pub read_only: bool,
    /// With the mounts beneath the source (`rbind`, and the rootfs); `bind` is not.
    pub recursive: bool,
}

impl BindPlan {
    /// The mount options for [`crate::mounts::Mounter::bind`], idmapped with `idmap`
    /// when the fs daemon is jailed.
    pub fn options(&self, idmap: Option<carapace_idmap::IdMap>) -> crate::mounts::BindOptions {
        crate::mounts::BindOptions {
            read_only: self.read_only,
            recursive: self.recursive,
            idmap,
        }
    }
}

/// A bundle's spec, checked and translated for the guest.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// The spec to send to the agent (guest paths).
    pub json: Value,
    /// Host binds to make, rootfs first.
    pub binds: Vec<BindPlan>,
    /// The spec's annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Resource limits, to size the VM.
    pub limits: ContainerLimits,
    /// The number of CPUs in the spec's host CPU set (`linux.resources.cpu.cpus`), which is
    /// taken out of the guest's spec ([`guest_resources`]) and sizes the VM instead.
    pub cpuset_cpus: Option<u32>,
    /// Hostname, if the spec sets one.
    pub hostname: Option<String>,
    /// Whether the process wants a terminal.
    pub terminal: bool,
    /// The host network namespace the spec names (CRI: the one its CNI plugins set up):
    /// the VM gets its interfaces and every container of the VM runs in the guest's own
    /// network namespace, so the spec sent to the agent has no network entry then.
    pub netns: Option<PathBuf>,
    /// The spec has no network namespace at all: it asks for the host's network.
    pub host_network: bool,
    /// The spec's OCI hooks, checked ([`crate::hooks`]); they run on the host.
    pub hooks: Option<oci_spec::runtime::Hooks>,
    /// `linux.cgroupsPath`: the sandbox's VMM and fs daemon join it on the host
    /// ([`crate::cgroup`]); the guest agent uses it for the container inside.
    pub cgroups_path: Option<String>,
}

/// A bundle whose `config.json` was read and schema-checked once; everything that needs the
/// spec during a create (the shim's pod role, the guest translation) reads this value.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory, canonical.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub spec_path: PathBuf,
    /// The parsed spec.
    pub spec: Value,
}

impl Bundle {
    /// Resolves `dir` and loads its spec ([`load_bundle_spec`]).
    pub fn load(dir: &Path) -> Result<Self, SpecError> {
        let dir = std::fs::canonicalize(dir).map_err(|source| SpecError::Read {
            path: dir.join("config.json"),
            source,
        })?;
        let (spec_path, spec) = load_bundle_spec(&dir)?;
        Ok(Self {
            dir,
            spec_path,
            spec,
        })
    }
}

/// Reads `<bundle>/config.json`, bounded in size, and checks it against the OCI schema.
pub fn load_bundle_spec(bundle: &Path) -> Result<(PathBuf, Value), SpecError> {
    let path = bundle.join("config.json");
    let read = |source| SpecError::Read {
        path: path.clone(),
        source,
    };
    let size = std::fs::metadata(&path).map_err(read)?.len();
    if size > MAX_SPEC_BYTES {
        return Err(SpecError::TooLarge { path, size });
    }
    let text = std::fs::read(&path).map_err(read)?;
    let value: Value = serde_json::from_slice(&text).map_err(|source| SpecError::Parse {
        path: path.clone(),
        source,
    })?;
    // Schema check: every field we forward must have the type the spec defines.
    serde_json::from_value::<oci_spec::runtime::Spec>(value.clone()).map_err(|source| {
        SpecError::Parse {
            path: path.clone(),
            source,
        }
    })?;
    Ok((path, value))
}

fn is_bind(mount: &Value) -> bool {
    mount.get("type").and_then(Value::as_str) == Some("bind")
        || options(mount).any(|o| o == "bind" || o == "rbind")
}

fn options(mount: &Value) -> impl Iterator<Item = &str> {
    mount
        .get("options")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// Whether `path` is `/proc/<pod_init_pid>/ns/<kind>` for a namespace a pod shares
/// (network is handled apart: see [`translate`]).
fn is_pod_namespace(path: &str, pod_init_pid: u32, kind: &str) -> bool {
    matches!(kind, "ipc" | "uts" | "pid") && path == format!("/proc/{pod_init_pid}/ns/{kind}")
}

/// Translates the spec of container `cid` from `bundle` for a guest that sees the shared
/// directory at `guest_shared_dir` (normally [`GUEST_SHARED_DIR`]).
///
/// `pod_init_pid` is, for a container joining a pod's VM, the guest pid of the pod sandbox's
/// init (the pid containerd was given for the sandbox task). containerd's CRI points a pod
/// container's ipc, uts and (with a shared process namespace) pid namespaces at
/// `/proc/<that pid>/ns/<type>`: those paths name the same namespaces inside the guest and
/// are kept, so the pod's containers share them as on runc. Any other namespace path is a
/// host namespace the guest cannot join: the spec is refused, naming it (runc would join
/// it; silently making a fresh one would hand the caller isolation it did not ask for).
///
/// A network namespace with a path is the pod's network (CRI: the sandbox's names the CNI
/// namespace, its containers' name the sandbox's): it becomes [`GuestSpec::netns`] and the
/// entry leaves the spec, so every container of the VM shares the guest's own network
/// namespace, where the VM's interfaces are. Without a path (`ctr run`), the container gets
/// a fresh namespace with loopback only, as on runc.
pub fn translate(
    bundle: &Bundle,
    cid: &str,
    guest_shared_dir: &Path,
    pod_init_pid: Option<u32>,
) -> Result<GuestSpec, SpecError> {
    let path = bundle.spec_path.clone();
    let mut spec = bundle.spec.clone();
    let bundle = bundle.dir.as_path();
    let invalid = |field: &str, reason: String| SpecError::Invalid {
        path: path.clone(),
        field: field.to_owned(),
        reason,
    };

    let args_ok = spec
        .pointer("/process/args")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if !args_ok {
        return Err(invalid(
            "process.args",
            "missing or empty: the container needs a command".into(),
        ));
    }
    let terminal = spec
        .pointer("/process/terminal")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let root = spec
        .pointer("/root/path")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("root.path", "missing".into()))?;
    let root_host = if Path::new(root).is_absolute() {
        PathBuf::from(root)
    } else {
        bundle.join(root)
    };
    if !root_host.is_dir() {
        return Err(invalid(
            "root.path",
            format!("{} is not a directory", root_host.display()),
        ));
    }
    // The rootfs is shared writable even when `root.readonly` is set: like runc, the agent
    // creates the spec's mount points inside it (e.g. /etc/resolv.conf, which a CRI pod's
    // read-only sandbox image lacks) and only then remounts the container's / read-only.
    // The rootfs is the container's own snapshot, so nothing else is exposed by this.
    let guest_base = guest_shared_dir.join(cid);
    let mut binds = vec![BindPlan {
        source: root_host,
        target: Path::new(cid).join("rootfs"),
        read_only: false,
        recursive: true,
    }];
    spec["root"]["path"] = Value::String(guest_base.join("rootfs").display().to_string());

    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for (i, m) in mounts.iter_mut().enumerate() {
            if !is_bind(m) {
                continue;
            }
            let field = format!("mounts[{i}].source");
            let source = m
                .get("source")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(&field, "a bind mount needs a source".into()))?;
            let source = if Path::new(source).is_absolute() {
                PathBuf::from(source)
            } else {
                bundle.join(source)
            };
            if !source.exists() {
                return Err(invalid(
                    &field,
                    format!("{} does not exist", source.display()),
                ));
            }
            let rel = Path::new(cid).join("mounts").join(i.to_string());
            let read_only = options(m).any(|o| o == "ro");
            // `rbind` takes the mounts beneath the source along; `bind` (or a bind type
            // with neither option, as runc reads it) does not.
            let recursive = options(m).any(|o| o == "rbind");
            m["source"] = Value::String(
                guest_base
                    .join("mounts")
                    .join(i.to_string())
                    .display()
                    .to_string(),
            );
            binds.push(BindPlan {
                source,
                target: rel,
                read_only,
                recursive,
            });
        }
    }

    // Hooks run on the host (crate::hooks), except startContainer's, which run in the
    // container: the guest's spec keeps that list only.
    let hooks = match spec.as_object_mut().and_then(|o| o.remove("hooks")) {
        None | Some(Value::Null) => None,
        Some(h) => {
            let hooks: oci_spec::runtime::Hooks =
                serde_json::from_value(h).map_err(|e| invalid("hooks", e.to_string()))?;
            crate::hooks::check(&hooks).map_err(|(field, reason)| invalid(&field, reason))?;
            if let Some(start) = hooks.start_container().as_ref().filter(|l| !l.is_empty()) {
                spec["hooks"] = serde_json::json!({ "startContainer": start });
            }
            Some(hooks)
        }
    };
    let mut netns = None;
    let host_network = !spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.get("type").and_then(Value::as_str) == Some("network"))
        });
    if let Some(ns) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        ns.retain(|n| {
            let network = n.get("type").and_then(Value::as_str) == Some("network");
            match n.get("path").and_then(Value::as_str) {
                Some(path) if network => {
                    tracing::debug!(cid, path, "the pod's network: the guest's own namespace");
                    netns = Some(PathBuf::from(path));
                    false
                }
                _ => true,
            }
        });
        for n in ns.iter_mut() {
            let Some(o) = n.as_object_mut() else { continue };
            let kind = o
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let Some(path) = o.get("path").and_then(Value::as_str).map(str::to_owned) else {
                continue;
            };
            if pod_init_pid.is_some_and(|pid| is_pod_namespace(&path, pid, &kind)) {
                tracing::debug!(cid, kind, path, "joins the pod sandbox's namespace");
                continue;
            }
            return Err(invalid(
                "linux.namespaces",
                format!(
                    "the {kind} namespace at {path} is the host's (or another pod's): a \
                     container in a VM cannot join it; leave out its path for a namespace of \
                     its own, or create the container in the pod that owns it"
                ),
            ));
        }
    }

    let annotations = spec
        .get("annotations")
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let cpuset_cpus = match spec.pointer_mut("/linux/resources") {
        Some(resources) => guest_resources(cid, resources),
        None => None,
    };
    let limits = ContainerLimits {
        cpu_quota_us: spec
            .pointer("/linux/resources/cpu/quota")
            .and_then(Value::as_i64),
        cpu_period_us: spec
            .pointer("/linux/resources/cpu/period")
            .and_then(Value::as_u64),
        memory_limit_bytes: spec
            .pointer("/linux/resources/memory/limit")
            .and_then(Value::as_i64),
    };
    let hostname = spec
        .get("hostname")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let cgroups_path = spec
        .pointer("/linux/cgroupsPath")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    Ok(GuestSpec {
        cgroups_path,
        json: spec,
        binds,
        annotations,
        limits,
        cpuset_cpus,
        hostname,
        terminal,
        netns,
        host_network,
        hooks,
    })
}

/// Makes an OCI `linux.resources` object fit the guest: the host's CPU and memory-node
/// sets (`cpu.cpus`, `cpu.mems`) name host CPUs and NUMA nodes, which the guest does not
/// have, so they are taken out (the container may use every online vCPU of the one guest
/// node); returns the size of the CPU set, which sizes the VM instead
/// ([`crate::sizing::Demand::of`]). A set that does not parse counts as none.
pub fn guest_resources(cid: &str, resources: &mut Value) -> Option<u32> {
    let cpu = resources.get_mut("cpu")?.as_object_mut()?;
    let cpus = cpu.remove("cpus");
    if let Some(mems) = cpu.remove("mems") {
        tracing::debug!(cid, %mems, "host memory nodes are not the guest's: not applied in the guest");
    }
    let text = cpus.as_ref()?.as_str()?;
    let count = cpu_list_len(text);
    tracing::info!(
        cid,
        cpus = text,
        ?count,
        "host CPU set: sizes the VM, not applied in the guest"
    );
    count
}

/// The number of CPUs in a CPU list (`0-3,8`); `None` when malformed or empty.
fn cpu_list_len(text: &str) -> Option<u32> {
    let mut n: u32 = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
            None => {
                let c = part.trim().parse::<u32>().ok()?;
                (c, c)
            }
        };
        n = n.checked_add(hi.checked_sub(lo)?.checked_add(1)?)?;
    }
    (n > 0).then_some(n)
}

/// The default spec `carapace spec` writes: runc's shape (a `sh` with a terminal, rootfs
/// `rootfs`), with our hostname.
pub fn default_spec() -> Value {
    let mut spec = oci_spec::runtime::Spec::default();
    spec.set_hostname(Some("carapace".to_owned()));
    if let Some(p) = spec.process_mut() {
        p.set_terminal(Some(true));
    }
    if let Some(r) = spec.root_mut() {
        r.set_readonly(Some(true));
    }
    let mut v = serde_json::to_value(&spec).unwrap_or(Value::Null);
    v["ociVersion"] = Value::String(crate::state::OCI_VERSION.to_owned());
    v
}

/// Writes the default spec to `<bundle>/config.json`, refusing to overwrite.
pub fn write_default_spec(bundle: &Path) -> Result<PathBuf, SpecError> {
    let path = bundle.join("config.json");
    if path.exists() {
        return Err(SpecError::Exists { path });
    }
    let text = serde_json::to_string_pretty(&default_spec()).unwrap_or_default();
    std::fs::write(&path, text + "\n").map_err(|source| SpecError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    fn tr(
        dir: &Path,
        cid: &str,
        shared: &Path,
        pod_init_pid: Option<u32>,
    ) -> Result<GuestSpec, SpecError> {
        translate(&Bundle::load(dir)?, cid, shared, pod_init_pid)
    }

    use super::*;
    use serde_json::json;

    fn bundle(spec: &Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        dir
    }

    fn base() -> Value {
        let mut v = default_spec();
        v["process"]["args"] = json!(["echo", "hi"]);
        v
    }

    #[test]
    fn default_spec_is_a_valid_bundle_spec_and_spec_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        let p = write_default_spec(dir.path()).unwrap();
        let (_, v) = load_bundle_spec(dir.path()).unwrap();
        assert_eq!(v["root"]["path"], "rootfs");
        assert_eq!(v["process"]["args"], json!(["sh"]));
        assert_eq!(v["process"]["terminal"], true);
        let err = write_default_spec(dir.path()).unwrap_err();
        assert!(err.to_string().contains(&p.display().to_string()));
        tr(dir.path(), "c", Path::new(GUEST_SHARED_DIR), None).unwrap();
    }

    #[test]
    fn rootfs_and_bind_mounts_are_rewritten_to_guest_paths() {
        let vol = tempfile::tempdir().unwrap();
        let mut spec = base();
        spec["mounts"] = json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": vol.path(), "options": ["rbind", "ro"]},
            {"destination": "/rw", "source": vol.path(), "options": ["bind", "rw"]}
        ]);
        spec["annotations"] = json!({"k": "v"});
        spec["linux"]["resources"] =
            json!({"cpu": {"quota": 50000, "period": 100000}, "memory": {"limit": 1048576}});
        spec["linux"]["namespaces"] = json!([
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "pid"}
        ]);
        spec["hooks"] = json!({"prestart": [{"path": "/bin/true"}]});
        let b = bundle(&spec);
        let g = tr(b.path(), "c1", Path::new(GUEST_SHARED_DIR), None).unwrap();
        assert_eq!(g.json["root"]["path"], "/run/carapace/shared/c1/rootfs");
        assert_eq!(g.json["mounts"][0]["source"], "proc");
        assert_eq!(
            g.json["mounts"][1]["source"],
            "/run/carapace/shared/c1/mounts/1"
        );
        assert_eq!(
            g.json["mounts"][2]["source"],
            "/run/carapace/shared/c1/mounts/2"
        );
        assert_eq!(
            g.binds,
            vec![
                BindPlan {
                    source: b.path().join("rootfs"),
                    target: "c1/rootfs".into(),
                    read_only: false,
                    recursive: true
                },
                BindPlan {
                    source: vol.path().into(),
                    target: "c1/mounts/1".into(),
                    read_only: true,
                    recursive: true
                },
                BindPlan {
                    source: vol.path().into(),
                    target: "c1/mounts/2".into(),
                    read_only: false,
                    recursive: false
                },
            ]
        );
        assert_eq!(g.annotations.get("k").map(String::as_str), Some("v"));
        // read-only root: enforced by the agent in the guest, after its mount points exist
        assert_eq!(g.json["root"]["readonly"], true);
        assert_eq!(g.limits.cpu_quota_us, Some(50000));
        assert_eq!(g.limits.memory_limit_bytes, Some(1048576));
        // hooks run on the host: out of the guest spec, kept for the runtime
        assert!(g.json.get("hooks").is_none());
        let prestart = g.hooks.as_ref().and_then(|h| h.prestart().clone());
        assert_eq!(prestart.map(|l| l.len()), Some(1));
        // the pod's network is the VM's: out of the guest spec, recorded for the host
        assert_eq!(g.json["linux"]["namespaces"], json!([{"type": "pid"}]));
        assert_eq!(g.netns.as_deref(), Some(Path::new("/var/run/netns/cni-1")));
        assert_eq!(g.hostname.as_deref(), Some("carapace"));
        assert!(g.terminal);
        // startContainer hooks run in the container: the guest gets that list, only it
        let mut spec = default_spec();
        spec["hooks"] = json!({
            "prestart": [{"path": "/bin/true"}],
            "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "true"]}]
        });
        let b = bundle(&spec);
        let g = tr(b.path(), "c1", Path::new(GUEST_SHARED_DIR), None).unwrap();
        assert_eq!(
            g.json["hooks"],
            json!({"startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "true"]}]})
        );
        assert_eq!(
            g.hooks
                .as_ref()
                .map(|h| h.prestart().as_ref().map(Vec::len)),
            Some(Some(1))
        );
    }

    #[test]
    fn host_cpu_and_node_sets_leave_the_guest_spec_and_count_cpus() {
        let mut r = json!({"cpu": {"quota": 1000, "cpus": "2-3,6", "mems": "0"}, "memory": {}});
        assert_eq!(guest_resources("c", &mut r), Some(3));
        assert_eq!(r, json!({"cpu": {"quota": 1000}, "memory": {}}));
        for (set, n) in [
            ("0", Some(1)),
            ("", None),
            ("3-1", None),
            ("x", None),
            ("0-4294967295", None),
        ] {
            let mut r = json!({"cpu": {"cpus": set}});
            assert_eq!(guest_resources("c", &mut r), n, "{set:?}");
            assert_eq!(r, json!({"cpu": {}}));
        }
        assert_eq!(guest_resources("c", &mut json!({"memory": {}})), None);
    }

    #[test]
    fn hooks_that_cannot_run_are_refused_naming_the_field() {
        for (hooks, field) in [
            (
                json!({"startContainer": [{"path": "bin/true"}]}),
                "hooks.startContainer[0].path",
            ),
            (
                json!({"poststop": [{"path": "true"}]}),
                "hooks.poststop[0].path",
            ),
        ] {
            let mut spec = default_spec();
            spec["hooks"] = hooks;
            let b = bundle(&spec);
            let e = tr(b.path(), "c1", Path::new(GUEST_SHARED_DIR), None).unwrap_err();
            assert!(
                matches!(&e, SpecError::Invalid { field: f, .. } if f == field),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn pod_containers_keep_the_sandbox_namespaces_and_nothing_else_from_the_host() {
        let mut spec = base();
        spec["linux"]["namespaces"] = json!([
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts", "path": "/proc/42/ns/uts"},
            {"type": "pid", "path": "/proc/42/ns/pid"},
            {"type": "mount"},
            {"type": "cgroup"}
        ]);
        let b = bundle(&spec);
        let g = tr(b.path(), "c", Path::new(GUEST_SHARED_DIR), Some(42)).unwrap();
        assert_eq!(
            g.json["linux"]["namespaces"],
            json!([
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "pid", "path": "/proc/42/ns/pid"},
                {"type": "mount"},
                {"type": "cgroup"}
            ])
        );
        // another pod's pid, a mismatched type, a namespace a pod does not share, or no
        // pod at all: a namespace the guest cannot join, refused by name
        for (ns, pod) in [
            (json!({"type": "ipc", "path": "/proc/43/ns/ipc"}), Some(42)),
            (json!({"type": "uts", "path": "/proc/42/ns/ipc"}), Some(42)),
            (
                json!({"type": "cgroup", "path": "/proc/42/ns/cgroup"}),
                Some(42),
            ),
            (json!({"type": "ipc", "path": "/proc/42/ns/ipc"}), None),
        ] {
            spec["linux"]["namespaces"] = json!([ns.clone()]);
            let b = bundle(&spec);
            let e = tr(b.path(), "c", Path::new(GUEST_SHARED_DIR), pod).unwrap_err();
            let msg = e.to_string() + &format!("{e:?}");
            assert!(
                matches!(&e, SpecError::Invalid { field, .. } if field == "linux.namespaces")
                    && msg.contains(ns["path"].as_str().unwrap()),
                "{ns}: {msg}"
            );
        }
    }

    #[test]
    fn a_network_namespace_without_a_path_stays_a_fresh_one_with_loopback() {
        // `ctr run` without CNI: as on runc, the container gets a network namespace of its
        // own (loopback only); the VM gets no interface.
        let mut spec = base();
        spec["linux"]["namespaces"] = json!([{"type": "network"}, {"type": "mount"}]);
        let b = bundle(&spec);
        let g = tr(b.path(), "c", Path::new(GUEST_SHARED_DIR), None).unwrap();
        assert_eq!(
            g.json["linux"]["namespaces"],
            json!([{"type": "network"}, {"type": "mount"}])
        );
        assert_eq!(g.netns, None);
        // a pod's container names the sandbox's network: it shares the guest's namespace
        spec["linux"]["namespaces"] = json!([{"type": "network", "path": "/proc/42/ns/net"}]);
        let b = bundle(&spec);
        let g = tr(b.path(), "c", Path::new(GUEST_SHARED_DIR), Some(42)).unwrap();
        assert_eq!(g.json["linux"]["namespaces"], json!([]));
        assert_eq!(g.netns.as_deref(), Some(Path::new("/proc/42/ns/net")));
    }

    #[test]
    fn bad_specs_name_file_and_field() {
        let b = bundle(&json!({"ociVersion": "1.0.2", "process": {"args": "echo"}}));
        let err = tr(b.path(), "c", Path::new(GUEST_SHARED_DIR), None).unwrap_err();
        assert!(matches!(err, SpecError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("config.json"));

        let mut spec = base();
        spec["process"]["args"] = json!([]);
        let err = tr(bundle(&spec).path(), "c", Path::new(GUEST_SHARED_DIR), None).unwrap_err();
        assert!(err.to_string().contains("process.args"), "{err}");

        let mut spec = base();
        spec["root"]["path"] = json!("nope");
        let err = tr(bundle(&spec).path(), "c", Path::new(GUEST_SHARED_DIR), None).unwrap_err();
        assert!(err.to_string().contains("root.path"), "{err}");

        let mut spec = base();
        spec["mounts"] =
            json!([{"destination": "/x", "type": "bind", "source": "/nonexistent/vol"}]);
        let err = tr(bundle(&spec).path(), "c", Path::new(GUEST_SHARED_DIR), None).unwrap_err();
        assert!(err.to_string().contains("mounts[0].source"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        let err = tr(empty.path(), "c", Path::new(GUEST_SHARED_DIR), None).unwrap_err();
        assert!(matches!(err, SpecError::Read { .. }), "{err}");
    }
}
