//! Lifecycle tests with fakes at the seams. The fake daemons are real processes (`sleep`,
//! or a shell that fails), so starting, detecting death and stopping them is the real code;
//! the fake agent and mounter record calls and inject failures.

use super::*;
use crate::agent::{Chunk, Stream};
use crate::mounts::{BindOptions, make_mount_point};
use std::collections::BTreeSet;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::agent::{AgentApi, Session, Share};
use crate::launcher::{FsRequest, VmRequest};
use crate::network::{AttachRecord, Attached, NetworkError, NetworkPlan};
use crate::oci::{Bundle, SHARED_FS_TAG};
use std::time::Instant;

/// The async runtime API driven from plain tests: each call runs on a fresh current-thread
/// runtime, the way the CLI drives it.
#[derive(Debug, Clone)]
struct Blocking(Runtime);

impl std::ops::Deref for Blocking {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        &self.0
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

impl std::ops::DerefMut for Blocking {
    fn deref_mut(&mut self) -> &mut Runtime {
        &mut self.0
    }
}

impl Blocking {
    fn create(&self, id: &str, bundle: &Path) -> Result<SandboxState, SandboxError> {
        block_on(async {
            let b = Bundle::load(bundle)?;
            self.0.create(id, &b).await.map(|(st, _)| st)
        })
    }
    fn create_in_sandbox(
        &self,
        sandbox_id: &str,
        cid: &str,
        bundle: &Path,
    ) -> Result<SandboxState, SandboxError> {
        block_on(async {
            let b = Bundle::load(bundle)?;
            self.0
                .create_in_sandbox(sandbox_id, cid, &b, None)
                .await
                .map(|(st, _)| st)
        })
    }
    fn start(&self, id: &str) -> Result<u32, SandboxError> {
        block_on(self.0.start(id, None))
    }
    fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), SandboxError> {
        block_on(self.0.kill(id, signal, all, None))
    }
    fn ps(&self, id: &str) -> Result<Vec<u32>, SandboxError> {
        block_on(self.0.ps(id, None))
    }
    fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
    ) -> Result<(Session, u32), SandboxError> {
        block_on(self.0.exec(id, exec_id, process, None))
    }
    fn delete(&self, id: &str, force: bool) -> Result<(), SandboxError> {
        block_on(self.0.delete(id, force, None))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Ok,
    SpawnFails,
    ExitsAtOnce,
}

#[derive(Debug)]
struct FakeLauncher {
    fsd: Daemon,
    vmm: Daemon,
    events: Arc<Mutex<Vec<String>>>,
    started: Mutex<Vec<ProcessRecord>>,
    sockets: Mutex<Vec<UnixListener>>,
}

impl FakeLauncher {
    fn spawn(
        &self,
        what: &'static str,
        how: Daemon,
        log: &Path,
    ) -> Result<ProcessRecord, ProcessError> {
        let mut cmd = Command::new("sh");
        match how {
            Daemon::Ok => cmd.args(["-c", "exec sleep 600"]),
            Daemon::ExitsAtOnce => cmd.args([
                "-c",
                &format!("echo '{what}: fatal: injected failure' >&2; exit 1"),
            ]),
            Daemon::SpawnFails => {
                cmd = Command::new("/nonexistent/daemon");
                &mut cmd
            }
        };
        let rec = crate::process::spawn_detached(what, cmd, log)?;
        self.started.lock().unwrap().push(rec);
        Ok(rec)
    }

    fn listen(&self, path: &Path) {
        self.sockets
            .lock()
            .unwrap()
            .push(UnixListener::bind(path).unwrap());
    }
}

impl Launcher for FakeLauncher {
    fn start_fs_daemon(&self, req: &FsRequest) -> Result<ProcessRecord, ProcessError> {
        self.events.lock().unwrap().push("fsd".into());
        // <state>/<id>/shared
        let id = req.shared_dir.parent().unwrap().file_name().unwrap();
        assert!(
            req.shared_dir.join(id).join("rootfs").exists(),
            "rootfs bound before fsd starts"
        );
        let rec = self.spawn("fs daemon", self.fsd, &req.log)?;
        if self.fsd == Daemon::Ok {
            self.listen(&req.socket);
        }
        Ok(rec)
    }

    fn start_vmm(&self, req: &VmRequest<'_>) -> Result<ProcessRecord, ProcessError> {
        self.events.lock().unwrap().push("vmm".into());
        let desc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&req.description).unwrap()).unwrap();
        let fs_sock = PathBuf::from(desc["fs"][0]["socket"].as_str().unwrap());
        assert!(
            fs_sock.exists(),
            "fs daemon socket exists before the VMM starts"
        );
        let nics = desc["net"].as_array().map_or(0, Vec::len);
        assert_eq!(nics, req.taps.len(), "one tap per NIC of the description");
        // A jailed VMM: its vsock socket inside the jail directory (the VMM refuses
        // otherwise), which exists, and an id of the configured range.
        let vsock = PathBuf::from(desc["vsock"]["uds_path"].as_str().unwrap());
        if let Some(jail) = desc.get("jail") {
            let root = PathBuf::from(jail["root"].as_str().unwrap());
            assert!(root.is_dir() && vsock.starts_with(&root), "{desc}");
            let uid = jail["uid"].as_u64().unwrap();
            assert!(
                uid >= 0x7000_0000 && jail["gid"].as_u64() == Some(uid),
                "{desc}"
            );
        }
        let rec = self.spawn("VMM", self.vmm, &req.log)?;
        if self.vmm == Daemon::Ok {
            self.listen(Path::new(desc["vsock"]["uds_path"].as_str().unwrap()));
        }
        Ok(rec)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentMode {
    Answers,
    NeverAnswers,
    Incompatible,
}

#[derive(Debug)]
struct FakeConnector {
    /// Connection attempts made.
    connects: Arc<AtomicUsize>,
    mode: AgentMode,
    fail_on: Option<&'static str>,
    events: Arc<Mutex<Vec<String>>>,
}

struct FakeAgent {
    fail_on: Option<&'static str>,
    events: Arc<Mutex<Vec<String>>>,
}

impl FakeAgent {
    fn call(&self, name: &'static str) -> Result<(), AgentError> {
        self.events.lock().unwrap().push(name.into());
        if self.fail_on == Some(name) {
            return Err(AgentError::Other(format!("injected failure of {name}")));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl AgentApi for FakeAgent {
    async fn create_sandbox(&self, _: &str, _: &str, shares: &[Share]) -> Result<(), AgentError> {
        assert_eq!(shares[0].tag, SHARED_FS_TAG);
        self.call("create_sandbox")
    }
    async fn create_container(&self, cid: &str, spec: &[u8]) -> Result<(), AgentError> {
        let v: serde_json::Value = serde_json::from_slice(spec).unwrap();
        assert_eq!(
            v["root"]["path"],
            format!("/run/carapace/shared/{cid}/rootfs")
        );
        self.call("create_container")
    }
    async fn start_container(&self, _: &str) -> Result<u32, AgentError> {
        self.call("start_container").map(|()| 7)
    }
    async fn exec_process(&self, _: &str, _: &str, _: &[u8]) -> Result<u32, AgentError> {
        self.call("exec_process").map(|()| 8)
    }
    async fn signal(&self, _: &str, _: &str, sig: u32, _: bool) -> Result<(), AgentError> {
        assert_eq!(sig, 15);
        self.call("signal")
    }
    async fn wait(&self, _: &str, _: &str) -> Result<ExitInfo, AgentError> {
        self.call("wait").map(|()| ExitInfo {
            exit_code: 0,
            signal: 15,
            exit_status: 143,
        })
    }
    async fn write_stdin(&self, _: &str, _: &str, d: &[u8]) -> Result<usize, AgentError> {
        self.call("write_stdin").map(|()| d.len())
    }
    async fn close_stdin(&self, _: &str, _: &str) -> Result<(), AgentError> {
        self.call("close_stdin")
    }
    async fn read(&self, _: &str, _: &str, _: Stream) -> Result<Chunk, AgentError> {
        self.call("read").map(|()| Chunk {
            data: Vec::new(),
            eof: true,
        })
    }
    async fn resize(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), AgentError> {
        self.call("resize")
    }
    async fn list_processes(&self, _: &str) -> Result<Vec<u32>, AgentError> {
        self.call("list_processes").map(|()| vec![1, 7])
    }
    async fn remove_container(&self, _: &str) -> Result<(), AgentError> {
        self.call("remove_container")
    }
    async fn destroy_sandbox(&self, _: &str) -> Result<(), AgentError> {
        self.call("destroy_sandbox")
    }
    async fn pause(&self, _: &str) -> Result<(), AgentError> {
        self.call("pause")
    }
    async fn resume(&self, _: &str) -> Result<(), AgentError> {
        self.call("resume")
    }
    async fn update_resources(&self, _: &str, _: &[u8]) -> Result<(), AgentError> {
        self.call("update_resources")
    }
    async fn stats(&self, _: &str) -> Result<crate::agent::ContainerStats, AgentError> {
        self.call("stats").map(|()| Default::default())
    }
    async fn next_oom_event(&self) -> Result<String, AgentError> {
        self.call("next_oom_event").map(|()| "c1".into())
    }
    async fn set_online_cpus(&self, count: u32) -> Result<u32, AgentError> {
        self.events
            .lock()
            .unwrap()
            .push(format!("set_online_cpus {count}"));
        self.call("set_online_cpus").map(|()| count)
    }
    async fn configure_network(&self, plan: &NetworkPlan) -> Result<(), AgentError> {
        assert_eq!(plan.interfaces[0].name, "eth0");
        self.call("configure_network")
    }
}

/// The pod network seam: records calls, hands out real descriptors as taps.
#[derive(Debug, Default)]
struct FakeNetwork {
    events: Arc<Mutex<Vec<String>>>,
    fail_inspect: bool,
    fail_attach: bool,
}

fn fake_plan() -> NetworkPlan {
    NetworkPlan {
        interfaces: vec![crate::network::PlannedInterface {
            name: "eth0".into(),
            mac: [0x0a, 0x58, 10, 213, 0, 5],
            mtu: 1500,
            kind: Some("veth".into()),
            addresses: vec![("10.213.0.5".parse().unwrap(), 16)],
        }],
        routes: vec![crate::network::PlannedRoute {
            destination: None,
            gateway: Some("10.213.0.1".parse().unwrap()),
            device: "eth0".into(),
            source: None,
            scope: 0,
            metric: None,
            onlink: false,
        }],
        neighbors: vec![],
    }
}

impl PodNetwork for FakeNetwork {
    fn inspect(&self, netns: &Path) -> Result<NetworkPlan, NetworkError> {
        self.events.lock().unwrap().push("inspect".into());
        if self.fail_inspect {
            return Err(NetworkError::NoNetns {
                path: netns.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        Ok(fake_plan())
    }
    fn attach(
        &self,
        netns: &Path,
        plan: &NetworkPlan,
        sandbox_id: &str,
    ) -> Result<Attached, NetworkError> {
        self.events.lock().unwrap().push("attach".into());
        if self.fail_attach {
            return Err(NetworkError::BadPlan {
                netns: netns.to_path_buf(),
                reason: "injected failure".into(),
            });
        }
        let tap: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        Ok(Attached {
            record: AttachRecord {
                sandbox_id: sandbox_id.into(),
                netns: netns.to_path_buf(),
                netns_id: crate::network::NetnsId { dev: 1, ino: 2 },
                links: vec![],
            },
            taps: vec![crate::network::AttachedTap {
                interface: plan.interfaces[0].name.clone(),
                name: "tap0_carapace".into(),
                fd: tap,
            }],
        })
    }
    fn detach(&self, _: &AttachRecord) -> Result<(), NetworkError> {
        self.events.lock().unwrap().push("detach".into());
        Ok(())
    }
}

#[async_trait::async_trait]
impl AgentConnector for FakeConnector {
    async fn connect(&self, socket: &Path, _: Duration) -> Result<Session, AgentError> {
        assert!(socket.ends_with("vsock.sock"));
        self.connects.fetch_add(1, Ordering::SeqCst);
        // Like a real connect: nothing answers where the VMM made no socket.
        if !socket.exists() {
            return Err(AgentError::Other(format!(
                "{}: no such socket",
                socket.display()
            )));
        }
        match self.mode {
            AgentMode::Answers => Ok(Arc::new(FakeAgent {
                fail_on: self.fail_on,
                events: self.events.clone(),
            })),
            AgentMode::NeverAnswers => Err(AgentError::Other("connection refused (fake)".into())),
            AgentMode::Incompatible => Err(AgentError::Connect {
                socket: socket.to_path_buf(),
                source: carapace_protocol::client::ClientError::IncompatibleAgent {
                    agent_version: "0.0.1".into(),
                    agent_protocol: 99,
                    host_protocol: carapace_protocol::PROTOCOL_VERSION,
                },
            }),
        }
    }
}

#[derive(Debug, Default)]
struct FakeMounter {
    mounted: Mutex<BTreeSet<PathBuf>>,
    /// (stage, export) of the last `prepare_export`: binds under the stage "propagate" to
    /// the export (mount point made and recorded there too), and so do unmounts.
    export: Mutex<Option<(PathBuf, PathBuf)>>,
    fail_bind_of: Option<&'static str>,
    stuck: bool,
    /// A directory removed at the first unmount (another process finishing its own delete
    /// in the middle of ours).
    vanish_on_unmount: Mutex<Option<PathBuf>>,
    /// An idmapped rootfs bind makes a work directory beside its source, as the real
    /// remount of an overlay does (`crate::mounts::WORK_PREFIX`).
    work_beside_rootfs: bool,
}

impl Mounter for FakeMounter {
    fn prepare_export(&self, stage: &Path, export: &Path) -> Result<(), MountError> {
        // The real export is a read-only bind of the stage: the same directory tree.
        std::fs::create_dir(stage).unwrap();
        std::os::unix::fs::symlink(stage, export).unwrap();
        for d in [stage, export] {
            self.mounted.lock().unwrap().insert(d.to_path_buf());
        }
        *self.export.lock().unwrap() = Some((stage.to_path_buf(), export.to_path_buf()));
        Ok(())
    }
    fn bind(
        &self,
        source: &Path,
        stage: &Path,
        rel: &Path,
        opts: BindOptions,
    ) -> Result<crate::mounts::Bound, MountError> {
        drop(make_mount_point(source, stage, rel)?);
        let target = stage.join(rel);
        if self.fail_bind_of.is_some_and(|s| target.ends_with(s)) {
            return Err(MountError::Bind {
                source_path: source.to_path_buf(),
                target,
                read_only: opts.read_only,
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        self.mounted.lock().unwrap().insert(target.clone());
        if let Some((st, export)) = self.export.lock().unwrap().clone()
            && st == stage
        {
            self.mounted.lock().unwrap().insert(export.join(rel));
        }
        let scratch = (self.work_beside_rootfs && opts.idmap.is_some() && rel.ends_with("rootfs"))
            .then(|| {
                let work = source
                    .parent()
                    .unwrap()
                    .join(format!("{}fake", crate::mounts::WORK_PREFIX));
                std::fs::create_dir(&work).unwrap();
                work
            });
        Ok(crate::mounts::Bound { target, scratch })
    }
    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        if let Some(dir) = self.vanish_on_unmount.lock().unwrap().take() {
            std::fs::remove_dir_all(dir).unwrap();
        }
        if self.stuck {
            return Err(MountError::Unmount {
                target: target.to_path_buf(),
                source: nix::Error::EBUSY,
            });
        }
        self.mounted.lock().unwrap().remove(target);
        if let Some((stage, export)) = self.export.lock().unwrap().clone()
            && let Ok(rel) = target.strip_prefix(&stage)
            && !rel.as_os_str().is_empty()
        {
            self.mounted.lock().unwrap().remove(&export.join(rel));
        }
        Ok(())
    }

    fn mounts_under(&self, dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = self
            .mounted
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
        v.reverse();
        v
    }
}

struct Fixture {
    tmp: tempfile::TempDir,
    rt: Blocking,
    connects: Arc<AtomicUsize>,
    launcher: Arc<FakeLauncher>,
    mounter: Arc<FakeMounter>,
    events: Arc<Mutex<Vec<String>>>,
    bundle: PathBuf,
}

struct Setup {
    fsd: Daemon,
    vmm: Daemon,
    agent: AgentMode,
    fail_on: Option<&'static str>,
    mounter: FakeMounter,
    /// The spec names a network namespace and this is the network seam.
    network: Option<FakeNetwork>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            fsd: Daemon::Ok,
            vmm: Daemon::Ok,
            agent: AgentMode::Answers,
            fail_on: None,
            mounter: FakeMounter::default(),
            network: None,
        }
    }
}

fn fixture(s: Setup) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
    std::fs::write(bundle.join("rootfs/bin/precious"), b"keep me").unwrap();
    let vol = tmp.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    let mut spec = crate::oci::default_spec();
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["mounts"] = serde_json::json!([{"destination": "/vol", "type": "bind", "source": vol, "options": ["rbind", "ro"]}]);
    if s.network.is_some() {
        spec["linux"]["namespaces"] =
            serde_json::json!([{"type": "network", "path": "/var/run/netns/cni-test"}]);
    }
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let mut config = Config::default();
    for (name, field) in [
        ("vmlinux", &mut config.hypervisor.kernel),
        ("initrd", &mut config.hypervisor.initrd),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, b"image").unwrap();
        *field = p;
    }
    config.agent.boot_timeout_ms = 300;
    // the jail's uid claims live under the configured state directory
    config.runtime.state_dir = tmp.path().join("run");
    let events = Arc::new(Mutex::new(Vec::new()));
    let launcher = Arc::new(FakeLauncher {
        fsd: s.fsd,
        vmm: s.vmm,
        events: events.clone(),
        started: Mutex::new(Vec::new()),
        sockets: Mutex::new(Vec::new()),
    });
    let mounter = Arc::new(s.mounter);
    let connects = Arc::new(AtomicUsize::new(0));
    let network = match s.network {
        Some(n) => FakeNetwork {
            events: events.clone(),
            ..n
        },
        None => FakeNetwork::default(),
    };
    let rt = Runtime {
        placement: Placement::Vm,
        config,
        store: StateStore::new(tmp.path().join("run")),
        launcher: launcher.clone(),
        connector: Arc::new(FakeConnector {
            connects: connects.clone(),
            mode: s.agent,
            fail_on: s.fail_on,
            events: events.clone(),
        }),
        mounter: mounter.clone(),
        network: Arc::new(network),
    };
    Fixture {
        tmp,
        rt: Blocking(rt),
        connects,
        launcher,
        mounter,
        events,
        bundle,
    }
}

impl Fixture {
    /// The jail uids claimed under the state root.
    fn jail_claims(&self) -> Vec<u32> {
        let dir = self.tmp.path().join("run").join(crate::jail::CLAIMS_DIR);
        let mut uids: Vec<u32> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        uids.sort();
        uids
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    /// Nothing left: no live process, no mount, no state directory.
    fn assert_clean(&self) {
        for p in self.launcher.started.lock().unwrap().iter() {
            assert!(!p.is_alive(), "process {} leaked", p.pid);
        }
        assert!(
            self.mounter.mounted.lock().unwrap().is_empty(),
            "mount leaked"
        );
        assert_eq!(self.rt.store.ids().unwrap(), Vec::<String>::new());
        assert!(!self.tmp.path().join("run/c1").exists());
        assert_eq!(self.jail_claims(), Vec::<u32>::new(), "jail uid leaked");
        let claims = self.tmp.path().join("run").join(crate::jail::CLAIMS_DIR);
        assert!(!claims.exists(), "{} left", claims.display());
        assert_eq!(
            std::fs::read(self.bundle.join("rootfs/bin/precious")).unwrap(),
            b"keep me"
        );
    }
}

#[test]
fn create_start_kill_delete_in_order_and_nothing_left() {
    let f = fixture(Setup::default());
    let st = f.rt.create("c1", &f.bundle).unwrap();
    assert_eq!(st.status, Status::Created);
    assert_eq!(
        f.events(),
        ["fsd", "vmm", "create_sandbox", "create_container"]
    );
    let dir = f.tmp.path().join("run/c1");
    assert!(dir.join("vm.json").exists() && dir.join("config.json").exists());
    let saved = f.rt.store.load("c1").unwrap();
    // the stage, its read-only export, the rootfs, the read-only volume
    assert_eq!(saved.mounts.len(), 4);
    assert_eq!(saved.mounts[0].target, dir.join("stage"));
    assert_eq!(saved.mounts[1].target, dir.join("shared"));
    assert!(saved.mounts[1].read_only);
    assert_eq!(saved.mounts[2].target, dir.join("stage/c1/rootfs"));
    assert!(saved.mounts[3].read_only);
    assert!(saved.fsd.unwrap().is_alive() && saved.vmm.unwrap().is_alive());

    let oci = f.rt.state("c1").unwrap();
    assert_eq!(oci.status, "created");
    assert_eq!(oci.pid, saved.vmm.unwrap().pid);
    assert_eq!(
        oci.bundle,
        f.bundle.canonicalize().unwrap().display().to_string()
    );

    let err = f.rt.create("c1", &f.bundle).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    assert_eq!(f.rt.start("c1").unwrap(), 7);
    assert_eq!(f.rt.state("c1").unwrap().status, "running");
    let err = f.rt.start("c1").unwrap_err();
    assert!(
        err.to_string().contains("is running: cannot start"),
        "{err}"
    );
    f.rt.kill("c1", 15, false).unwrap();
    assert_eq!(f.rt.ps("c1").unwrap(), [1, 7]);

    let err = f.rt.delete("c1", false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    f.rt.delete("c1", true).unwrap();
    assert_eq!(f.events().last().unwrap(), "destroy_sandbox");
    f.assert_clean();

    // Idempotent: deleting again is "does not exist", or success with --force.
    let err = f.rt.delete("c1", false).unwrap_err();
    assert!(
        matches!(err, SandboxError::State(StateError::NotFound { .. })),
        "{err}"
    );
    f.rt.delete("c1", true).unwrap();
}

#[test]
fn exited_container_is_stopped_and_deletes_without_force() {
    let f = fixture(Setup::default());
    f.rt.create("c1", &f.bundle).unwrap();
    f.rt.start("c1").unwrap();
    f.rt.record_exit(
        "c1",
        ExitInfo {
            exit_code: 0,
            signal: 9,
            exit_status: 137,
        },
    )
    .unwrap();
    let oci = f.rt.state("c1").unwrap();
    assert_eq!((oci.status.as_str(), oci.pid), ("stopped", 0));
    let err = f.rt.kill("c1", 15, false).unwrap_err();
    assert!(err.to_string().contains("is stopped"), "{err}");
    f.rt.delete("c1", false).unwrap();
    f.assert_clean();
}

#[test]
fn vmm_killed_midway_shows_stopped_and_delete_cleans_up() {
    let f = fixture(Setup::default());
    let st = f.rt.create("c1", &f.bundle).unwrap();
    f.rt.start("c1").unwrap();
    assert_eq!(f.rt.vm_post_mortem("c1"), None, "the VM runs");
    let log = f.rt.paths("c1").unwrap().vmm_log;
    std::fs::write(
        &log,
        "vmm: exiting: guest triple fault (KVM shutdown exit)\nforged\r\x1b[2K level=error msg=ok\n",
    )
    .unwrap();
    st.vmm
        .unwrap()
        .terminate("VMM", Duration::from_secs(5))
        .unwrap();
    let told = f.rt.vm_post_mortem("c1").expect("the VM is gone");
    assert!(
        told.contains(&format!("pid {}", st.vmm.unwrap().pid)) && told.contains("triple fault"),
        "{told}"
    );
    // what the log holds is quoted: no line of it passes for a record of the caller's log
    assert!(
        told.contains("\n  | forged??[2K level=error msg=ok"),
        "{told}"
    );
    assert!(
        told.lines().skip(1).all(|l| l.starts_with("  | ")),
        "{told}"
    );
    assert_eq!(f.rt.state("c1").unwrap().status, "stopped");
    let err = f.rt.kill("c1", 15, false).unwrap_err();
    assert!(err.to_string().contains("stopped"), "{err}");
    f.rt.delete("c1", false).unwrap();
    f.assert_clean();
}

fn create_fails(s: Setup, expect: &[&str]) -> Fixture {
    let f = fixture(s);
    let err = f.rt.create("c1", &f.bundle).unwrap_err();
    let chain = carapace_errors::chain(&err);
    for e in expect {
        assert!(chain.contains(e), "expected {e:?} in: {chain}");
    }
    f.assert_clean();
    f
}

#[test]
fn failing_bind_leaves_nothing() {
    let f = create_fails(
        Setup {
            mounter: FakeMounter {
                fail_bind_of: Some("mounts/0"),
                ..Default::default()
            },
            ..Default::default()
        },
        &["cannot bind-mount", "mounts/0", "read-only"],
    );
    assert!(f.events().is_empty(), "no daemon started: {:?}", f.events());
}

/// The fs daemon is jailed by default: its rootfs is bound idmapped, and the work
/// directory that remount makes beside the upper layer is recorded and removed at delete,
/// and when the create fails after it.
#[test]
fn the_rootfs_remount_work_directory_goes_with_the_sandbox() {
    let setup = |fsd| Setup {
        fsd,
        mounter: FakeMounter {
            work_beside_rootfs: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let f = fixture(setup(Daemon::Ok));
    assert!(f.rt.config.jail.fs_daemon);
    let work = f.bundle.join(format!("{}fake", crate::mounts::WORK_PREFIX));
    f.rt.create("c1", &f.bundle).unwrap();
    let saved = f.rt.store.load("c1").unwrap();
    let jail = saved.jail.as_ref().expect("jailed");
    let fs = jail.fs.expect("an fs block");
    assert_eq!(
        f.rt.config.jail.fs_block(jail.uid),
        Some((fs.base, fs.count))
    );
    let rootfs = &saved.mounts[2];
    assert_eq!(rootfs.scratch.as_deref(), Some(work.as_path()));
    assert!(work.is_dir());
    f.rt.delete("c1", true).unwrap();
    assert!(!work.exists(), "{} left", work.display());
    f.assert_clean();

    let f = create_fails(setup(Daemon::SpawnFails), &["cannot start fs daemon"]);
    let work = f.bundle.join(format!("{}fake", crate::mounts::WORK_PREFIX));
    assert!(!work.exists(), "{} left", work.display());
}

#[test]
fn fs_daemon_that_cannot_start_or_dies_leaves_nothing() {
    create_fails(
        Setup {
            fsd: Daemon::SpawnFails,
            ..Default::default()
        },
        &["cannot start fs daemon", "/nonexistent/daemon"],
    );
    let f = create_fails(
        Setup {
            fsd: Daemon::ExitsAtOnce,
            ..Default::default()
        },
        &["fs daemon", "exited before creating", "injected failure"],
    );
    assert_eq!(f.events(), ["fsd"]);
}

#[test]
fn fs_daemon_dying_once_the_vmm_runs_fails_the_create_and_leaves_nothing() {
    let mut f = fixture(Setup::default());
    let plan = f.tmp.path().join("faults");
    std::fs::write(&plan, "create.vmm-started fsd\n").unwrap();
    f.rt.config.debug.fault_plan = Some(plan.clone());
    let err = f.rt.create("c1", &f.bundle).unwrap_err();
    let chain = carapace_errors::chain(&err);
    assert!(
        chain.contains("the fs daemon") && chain.contains("exited while the VM was being set up"),
        "{chain}"
    );
    assert_eq!(
        std::fs::read_to_string(&plan).unwrap(),
        "",
        "the fault fired"
    );
    f.assert_clean();
}

#[test]
fn vmm_dying_at_boot_is_reported_with_its_log_and_leaves_nothing() {
    let f = create_fails(
        Setup {
            vmm: Daemon::ExitsAtOnce,
            ..Default::default()
        },
        &["the VMM", "exited", "VMM: fatal: injected failure"],
    );
    assert_eq!(f.events(), ["fsd", "vmm"]);
}

#[test]
fn agent_never_answering_times_out_and_leaves_nothing() {
    create_fails(
        Setup {
            agent: AgentMode::NeverAnswers,
            ..Default::default()
        },
        &[
            "did not answer",
            "vsock.sock",
            "300ms",
            "connection refused (fake)",
        ],
    );
}

#[test]
fn incompatible_agent_fails_fast() {
    let started = Instant::now();
    create_fails(
        Setup {
            agent: AgentMode::Incompatible,
            ..Default::default()
        },
        &["incompatible guest agent", "protocol 99"],
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn agent_refusing_the_container_leaves_nothing() {
    create_fails(
        Setup {
            fail_on: Some("create_container"),
            ..Default::default()
        },
        &["injected failure of create_container"],
    );
}

#[test]
fn bad_spec_and_missing_kernel_fail_before_anything_starts() {
    let f = fixture(Setup::default());
    std::fs::write(f.bundle.join("config.json"), b"{\"process\": 5}").unwrap();
    let err = f.rt.create("c1", &f.bundle).unwrap_err();
    assert!(err.to_string().contains("invalid OCI spec"), "{err}");
    f.assert_clean();

    let mut f = fixture(Setup::default());
    f.rt.config.hypervisor.kernel = f.tmp.path().join("missing-vmlinux");
    let err = f.rt.create("c1", &f.bundle).unwrap_err();
    assert!(err.to_string().contains("missing-vmlinux"), "{err}");
    assert!(f.events().is_empty());
    f.assert_clean();
}

#[test]
fn stuck_mount_keeps_the_directory_and_never_deletes_through_it() {
    let f = fixture(Setup::default());
    f.rt.create("c1", &f.bundle).unwrap();
    let stuck = Blocking(Runtime {
        mounter: Arc::new(FakeMounter {
            mounted: Mutex::new(f.mounter.mounted.lock().unwrap().clone()),
            stuck: true,
            ..Default::default()
        }),
        ..f.rt.0.clone()
    });
    let err = stuck.delete("c1", true).unwrap_err();
    assert!(
        err.to_string().contains("teardown of c1 incomplete"),
        "{err}"
    );
    assert!(f.tmp.path().join("run/c1/state.json").exists());
    assert!(f.bundle.join("rootfs/bin/precious").exists());
    // Once unmounting works again, delete --force finishes the job.
    f.rt.delete("c1", true).unwrap();
    f.assert_clean();
}

#[test]
fn delete_force_cleans_a_directory_without_state() {
    let f = fixture(Setup::default());
    let dir = f.rt.store.create_dir("c1").unwrap();
    std::fs::write(dir.join(crate::state::STATE_FILE), b"garbage").unwrap();
    assert!(f.rt.delete("c1", false).is_err());
    f.rt.delete("c1", true).unwrap();
    f.assert_clean();
}

#[test]
fn exec_inherits_the_container_process_and_applies_options() {
    let f = fixture(Setup::default());
    f.rt.create("c1", &f.bundle).unwrap();
    let opts = ExecOptions {
        args: vec!["ls".into(), "-l".into()],
        env: vec!["TERM=dumb".into(), "X=1".into()],
        cwd: Some("/tmp".into()),
        tty: false,
    };
    let p = f.rt.exec_process("c1", &opts).unwrap();
    assert_eq!(p["args"], serde_json::json!(["ls", "-l"]));
    assert_eq!(p["cwd"], "/tmp");
    assert_eq!(p["terminal"], false);
    let env: Vec<String> = serde_json::from_value(p["env"].clone()).unwrap();
    assert!(env.contains(&"TERM=dumb".to_owned()) && env.contains(&"X=1".to_owned()));
    assert!(!env.contains(&"TERM=xterm".to_owned()));
    assert!(env.iter().any(|e| e.starts_with("PATH=")));
    assert!(p.get("user").is_some());
    // Not running yet: exec is refused.
    let Err(err) = f.rt.exec("c1", "e1", &p) else {
        panic!("exec before start succeeded")
    };
    assert!(err.to_string().contains("is created: cannot exec"), "{err}");
    f.rt.start("c1").unwrap();
    let (_agent, pid) = f.rt.exec("c1", "e1", &p).unwrap();
    assert_eq!(pid, 8);
    f.rt.delete("c1", true).unwrap();
    f.assert_clean();
}

#[test]
fn a_pod_container_joins_the_sandbox_vm_and_leaves_it_running() {
    let f = fixture(Setup::default());
    f.rt.create("c1", &f.bundle).unwrap();
    f.rt.start("c1").unwrap();
    let st = f.rt.create_in_sandbox("c1", "c2", &f.bundle).unwrap();
    assert_eq!(st.status, Status::Created);
    assert_eq!(st.sandbox_id.as_deref(), Some("c1"));
    assert!(st.fsd.is_none() && st.vmm.is_none());
    // no second fs daemon or VMM; the agent of the pod's VM created the container
    assert_eq!(f.launcher.started.lock().unwrap().len(), 2);
    assert_eq!(f.events().last().unwrap(), "create_container");
    // its binds are in the sandbox's shared directory, under its own id
    let shared = f.tmp.path().join("run/c1/shared");
    let mounted = f.mounter.mounts_under(&shared.join("c2"));
    assert_eq!(mounted.len(), 2, "{mounted:?}");
    assert!(shared.join("c2/rootfs/bin").exists() || shared.join("c2/rootfs").exists());
    assert!(f.tmp.path().join("run/c2/config.json").exists());
    assert_eq!(f.rt.members("c1").unwrap(), ["c2"]);

    // it lives as long as the sandbox's VM
    assert_eq!(f.rt.state("c2").unwrap().status, "created");
    assert_eq!(f.rt.start("c2").unwrap(), 7);
    assert_eq!(f.rt.state("c2").unwrap().status, "running");
    assert_eq!(
        f.rt.state("c2").unwrap().pid,
        f.rt.store.load("c1").unwrap().vmm.unwrap().pid
    );

    // the sandbox cannot go first without force
    f.rt.record_exit(
        "c1",
        ExitInfo {
            exit_code: 0,
            signal: 0,
            exit_status: 0,
        },
    )
    .unwrap();
    let err = f.rt.delete("c1", false).unwrap_err();
    assert!(
        err.to_string().contains("hosting other containers"),
        "{err}"
    );

    // deleting the container removes it from the guest and undoes its binds only
    let err = f.rt.delete("c2", false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    f.rt.delete("c2", true).unwrap();
    assert_eq!(f.events().last().unwrap(), "remove_container");
    assert!(f.mounter.mounts_under(&shared.join("c2")).is_empty());
    assert!(!shared.join("c2").exists());
    assert!(!f.tmp.path().join("run/c2").exists());
    assert!(f.rt.store.load("c1").unwrap().vmm.unwrap().is_alive());
    assert!(f.rt.members("c1").unwrap().is_empty());

    f.rt.delete("c1", false).unwrap();
    f.assert_clean();
}

#[test]
fn force_deleting_a_sandbox_takes_its_containers_along() {
    let f = fixture(Setup::default());
    f.rt.create("c1", &f.bundle).unwrap();
    f.rt.create_in_sandbox("c1", "c2", &f.bundle).unwrap();
    f.rt.create_in_sandbox("c1", "c3", &f.bundle).unwrap();
    f.rt.delete("c1", true).unwrap();
    assert_eq!(f.events().last().unwrap(), "destroy_sandbox");
    f.assert_clean();
}

#[test]
fn force_deleting_a_sandbox_skips_a_container_deleted_meanwhile() {
    // containerd runs `shim delete` for every task of a killed shim at once: the pod's
    // forced teardown can find a member whose own delete just finished.
    let f = fixture(Setup::default());
    f.rt.create("c1", &f.bundle).unwrap();
    f.rt.create_in_sandbox("c1", "c2", &f.bundle).unwrap();
    f.rt.create_in_sandbox("c1", "c3", &f.bundle).unwrap();
    let c3 = f.rt.store.dir("c3").unwrap();
    *f.mounter.vanish_on_unmount.lock().unwrap() = Some(c3.clone());
    f.rt.delete("c1", true).unwrap();
    assert!(!c3.exists());
    f.assert_clean();
}

#[test]
fn joining_fails_cleanly_and_leaves_the_sandbox_alone() {
    let f = fixture(Setup {
        mounter: FakeMounter {
            fail_bind_of: Some("c2/mounts/0"),
            ..Default::default()
        },
        ..Setup::default()
    });
    // no such sandbox
    let err = f.rt.create_in_sandbox("nope", "c2", &f.bundle).unwrap_err();
    assert!(
        matches!(err, SandboxError::State(StateError::NotFound { .. })),
        "{err}"
    );
    assert!(!f.tmp.path().join("run/c2").exists());

    f.rt.create("c1", &f.bundle).unwrap();
    // a bind fails midway: the rootfs bind made before it is undone
    let err = f.rt.create_in_sandbox("c1", "c2", &f.bundle).unwrap_err();
    assert!(err.to_string().contains("c2/mounts/0"), "{err}");
    let shared = f.tmp.path().join("run/c1/shared");
    assert!(f.mounter.mounts_under(&shared.join("c2")).is_empty());
    assert!(!shared.join("c2").exists());
    assert_eq!(f.rt.store.ids().unwrap(), ["c1"]);
    assert!(f.rt.store.load("c1").unwrap().vmm.unwrap().is_alive());

    // a member cannot host containers, a dead VM cannot either
    let vmm = f.rt.store.load("c1").unwrap().vmm.unwrap();
    vmm.terminate("VMM", Duration::from_secs(3)).unwrap();
    let err = f.rt.create_in_sandbox("c1", "c3", &f.bundle).unwrap_err();
    assert!(err.to_string().contains("without a running VM"), "{err}");
    f.rt.delete("c1", true).unwrap();
    f.assert_clean();
}

#[test]
fn one_session_serves_a_whole_pod_from_create_to_delete() {
    let f = fixture(Setup::default());
    block_on(async {
        let bundle = Bundle::load(&f.bundle).unwrap();
        let (_, session) = f.rt.0.create("c1", &bundle).await.unwrap();
        assert_eq!(f.rt.0.start("c1", Some(&session)).await.unwrap(), 7);
        let (_, joined) =
            f.rt.0
                .create_in_sandbox("c1", "c2", &bundle, Some(&session))
                .await
                .unwrap();
        assert!(
            Arc::ptr_eq(&session, &joined),
            "the pod's session is reused"
        );
        f.rt.0.start("c2", Some(&session)).await.unwrap();
        f.rt.0.kill("c2", 15, true, Some(&session)).await.unwrap();
        assert_eq!(f.rt.0.ps("c1", Some(&session)).await.unwrap(), [1, 7]);
        let (_, pid) =
            f.rt.0
                .exec(
                    "c1",
                    "e1",
                    &serde_json::json!({"args": ["true"]}),
                    Some(&session),
                )
                .await
                .unwrap();
        assert_eq!(pid, 8);
        f.rt.0.delete("c2", true, Some(&session)).await.unwrap();
        f.rt.0.delete("c1", true, Some(&session)).await.unwrap();
    });
    // Booting tries until the fake VMM's socket exists (one attempt here); nothing after
    // the create reconnects.
    assert_eq!(f.connects.load(Ordering::SeqCst), 1, "{:?}", f.events());
    assert_eq!(f.events().last().unwrap(), "destroy_sandbox");
    f.assert_clean();
}

#[test]
fn a_pod_network_is_mirrored_into_the_vm_and_undone_at_delete() {
    let f = fixture(Setup {
        network: Some(FakeNetwork::default()),
        ..Default::default()
    });
    let st = f.rt.create("c1", &f.bundle).unwrap();
    let net = st.network.as_ref().expect("recorded");
    assert_eq!(net.plan, fake_plan());
    assert!(net.attached.is_some(), "the attach record is in the state");
    let desc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.rt.paths("c1").unwrap().vm_json).unwrap()).unwrap();
    assert_eq!(
        desc["net"][0]["mac"], "0a:58:0a:d5:00:05",
        "the CNI interface's MAC"
    );
    assert_eq!(desc["net"][0]["tap_fd"], 3);
    // the taps are made before the VMM, the guest is configured before the container
    let ev = f.events();
    let pos = |e: &str| {
        ev.iter()
            .position(|x| x == e)
            .unwrap_or_else(|| panic!("{e} in {ev:?}"))
    };
    assert!(
        pos("inspect") < pos("attach") && pos("attach") < pos("vmm"),
        "{ev:?}"
    );
    assert!(
        pos("create_sandbox") < pos("configure_network")
            && pos("configure_network") < pos("create_container"),
        "{ev:?}"
    );
    f.rt.delete("c1", true).unwrap();
    assert_eq!(f.events().last().unwrap(), "detach");
    f.assert_clean();
}

#[test]
fn a_network_that_cannot_be_mirrored_fails_the_create_and_leaves_nothing() {
    for (network, expect, detaches) in [
        (
            FakeNetwork {
                fail_inspect: true,
                ..Default::default()
            },
            "network namespace /var/run/netns/cni-test does not exist",
            false,
        ),
        (
            FakeNetwork {
                fail_attach: true,
                ..Default::default()
            },
            "injected failure",
            false,
        ),
    ] {
        let f = fixture(Setup {
            network: Some(network),
            ..Default::default()
        });
        let err = f.rt.create("c1", &f.bundle).unwrap_err();
        let chain = carapace_errors::chain(&err);
        assert!(chain.contains(expect), "{chain}");
        assert!(matches!(err, SandboxError::Network(_)), "{err:?}");
        let ev = f.events();
        assert!(!ev.contains(&"vmm".to_string()), "no VMM started: {ev:?}");
        assert_eq!(ev.contains(&"detach".to_string()), detaches, "{ev:?}");
        f.assert_clean();
    }
}

#[test]
fn the_guest_refusing_the_network_tears_it_down() {
    let f = fixture(Setup {
        network: Some(FakeNetwork::default()),
        fail_on: Some("configure_network"),
        ..Default::default()
    });
    let err = f.rt.create("c1", &f.bundle).unwrap_err();
    assert!(err.to_string().contains("configure_network"), "{err}");
    let ev = f.events();
    assert!(ev.contains(&"detach".to_string()), "{ev:?}");
    assert!(!ev.contains(&"create_container".to_string()), "{ev:?}");
    f.assert_clean();
}

#[test]
fn a_spec_asking_for_the_host_network_is_refused_before_anything_starts() {
    let f = fixture(Setup::default());
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.bundle.join("config.json")).unwrap()).unwrap();
    let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
    ns.retain(|n| n["type"] != "network");
    std::fs::write(f.bundle.join("config.json"), spec.to_string()).unwrap();
    let err = f.rt.create("c1", &f.bundle).unwrap_err();
    let msg = carapace_errors::chain(&err);
    assert!(
        msg.contains("linux.namespaces") && msg.contains("host's network"),
        "{msg}"
    );
    assert!(f.events().is_empty(), "nothing started: {:?}", f.events());
    f.assert_clean();
}

/// Writes `f.bundle`'s spec with these CPU (quota per 100 ms period) and memory limits.
fn set_limits(f: &Fixture, quota_us: i64, memory: i64) {
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.bundle.join("config.json")).unwrap()).unwrap();
    spec["linux"]["resources"] = serde_json::json!({
        "cpu": {"quota": quota_us, "period": 100_000, "cpus": "0-1"},
        "memory": {"limit": memory},
    });
    std::fs::write(f.bundle.join("config.json"), spec.to_string()).unwrap();
}

#[test]
fn the_pods_vm_grows_as_containers_join_and_refuses_past_its_maximum() {
    let f = fixture(Setup::default());
    f.rt.create("c1", &f.bundle).unwrap();
    // deterministic whatever this host's CPUs: the VM was created with 3 vCPUs
    f.rt.store
        .update("c1", |st| st.vm.as_mut().unwrap().created_vcpus = 3)
        .unwrap();
    let vm = f.rt.store.load("c1").unwrap().vm.unwrap();
    assert_eq!(
        vm.size,
        crate::sizing::Size {
            vcpus: 1,
            memory_mib: 256
        }
    );
    assert_eq!(vm.boot_memory_mib, 256);
    // the VMM gets a hot-plug region up to max_memory_mib
    assert_eq!(vm.hotplug_region_mib, 16384 - 256);

    // 1.5 CPUs: 2 more vCPUs, online before the guest creates the container; no memory
    set_limits(&f, 150_000, 0);
    f.rt.create_in_sandbox("c1", "c2", &f.bundle).unwrap();
    let events = f.events();
    assert_eq!(
        events[events.len() - 3..],
        ["set_online_cpus 3", "set_online_cpus", "create_container"],
        "{events:?}"
    );
    assert_eq!(f.rt.store.load("c1").unwrap().vm.unwrap().size.vcpus, 3);
    // the host CPU set stays on the host
    let guest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.tmp.path().join("run/c2/config.json")).unwrap())
            .unwrap();
    assert!(
        guest["linux"]["resources"]["cpu"].get("cpus").is_none(),
        "{guest}"
    );

    // one more CPU is past the VM's 3 vCPUs: refused naming it, nothing of it left
    set_limits(&f, 100_000, 0);
    let before = f.events().len();
    let err = f.rt.create_in_sandbox("c1", "c3", &f.bundle).unwrap_err();
    let msg = carapace_errors::chain(&err);
    assert!(
        msg.contains("c3") && msg.contains("4 vCPUs") && msg.contains("maximum of 3"),
        "{msg}"
    );
    assert!(!f.tmp.path().join("run/c3").exists());
    assert_eq!(f.rt.members("c1").unwrap(), ["c2"]);
    assert!(
        !f.events()[before..].contains(&"create_container".to_string()),
        "{:?}",
        f.events()
    );

    // c2 leaves: the VM shrinks back to the default
    f.rt.delete("c2", true).unwrap();
    assert_eq!(f.events().last().unwrap(), "set_online_cpus");
    assert!(f.events().contains(&"set_online_cpus 1".to_string()));
    assert_eq!(f.rt.store.load("c1").unwrap().vm.unwrap().size.vcpus, 1);
    f.rt.delete("c1", true).unwrap();
    f.assert_clean();
}

#[test]
fn a_sandbox_too_large_to_boot_is_refused_before_anything_exists() {
    let f = fixture(Setup::default());
    set_limits(&f, 100_000, 20 << 30);
    let err = f.rt.create("c1", &f.bundle).unwrap_err();
    let msg = carapace_errors::chain(&err);
    assert!(
        msg.contains("c1") && msg.contains("memory") && msg.contains("16384"),
        "{msg}"
    );
    assert!(f.events().is_empty(), "{:?}", f.events());
    f.assert_clean();
}

mod jail;

#[test]
fn the_state_store_leaves_room_for_every_socket_of_a_sandbox() {
    let p = SandboxPaths::new(Path::new(""));
    for sock in [&p.vsock, &p.api, &p.fsd_socket] {
        assert!(
            sock.as_os_str().len() <= crate::state::LONGEST_SOCKET,
            "{} is longer than state::LONGEST_SOCKET",
            sock.display()
        );
    }
    assert_eq!(p.vsock.as_os_str().len(), crate::state::LONGEST_SOCKET);
}

/// The fake VMM is a host process in the host's network namespace, as an unjailed VMM is:
/// a spec with creation hooks is refused rather than run with its pid, and nothing is left.
#[test]
fn creation_hooks_are_refused_a_pid_in_the_hosts_network_namespace() {
    let f = fixture(Setup::default());
    let path = f.bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let marker = f.tmp.path().join("hook-ran");
    spec["hooks"] = serde_json::json!({"prestart": [{
        "path": "/bin/sh",
        "args": ["sh", "-c", format!("touch {}", marker.display())]
    }]});
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let err = f.rt.create("c1", &f.bundle).unwrap_err();
    let chain = carapace_errors::chain(&err);
    assert!(chain.contains("host's network namespace"), "{chain}");
    assert!(!marker.exists(), "the hook ran");
    f.assert_clean();
}
