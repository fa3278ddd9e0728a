//! The task logic against a scripted in-memory agent and a recording backend.

use super::*;
use crate::backend::BackendError;
use carapace_runtime::agent::{AgentApi, Chunk, ExitInfo, Share, Stream};
use carapace_runtime::sandbox::Helper;
use std::collections::VecDeque;
use std::sync::Condvar;
use std::time::Duration;

/// How often the fake agent's blocking calls (wait, read, OOM events) look again.
const POLL: Duration = Duration::from_millis(2);

/// How a fake process behaves.
#[derive(Debug, Clone)]
enum Script {
    /// Prints `out` and exits with `code`.
    Print { out: Vec<u8>, code: i32 },
    /// Runs until signalled.
    UntilSignal,
    /// Echoes stdin to stdout, exits 0 when stdin closes.
    Echo,
}

#[derive(Debug, Default)]
struct FakeProc {
    stdout: VecDeque<u8>,
    exit: Option<ExitInfo>,
    echo: bool,
    paused: bool,
}

#[derive(Default)]
struct FakeAgent {
    scripts: Mutex<HashMap<String, Script>>,
    procs: Mutex<HashMap<String, FakeProc>>,
    changed: Condvar,
    next_pid: Mutex<u32>,
    /// `update_resources` calls: container and JSON.
    updates: Mutex<Vec<(String, String)>>,
    /// OOM kills to report, in order.
    ooms: Mutex<VecDeque<String>>,
    oom_added: Condvar,
    /// While set, `wait` does not return: the exit stays unseen by the shim.
    hold_exits: Mutex<bool>,
    /// While set, signals get no answer (a hung or starved guest).
    hung: Mutex<bool>,
}

fn key(cid: &str, exec_id: &str) -> String {
    format!("{cid}/{exec_id}")
}

fn exited(code: i32, signal: i32) -> ExitInfo {
    ExitInfo {
        exit_code: code,
        signal,
        exit_status: if signal != 0 {
            128 + signal as u32
        } else {
            code as u32
        },
    }
}

impl FakeAgent {
    fn script(&self, cid: &str, exec_id: &str, s: Script) {
        self.scripts
            .lock()
            .expect("lock")
            .insert(key(cid, exec_id), s);
    }

    fn launch(&self, cid: &str, exec_id: &str) -> u32 {
        let script = self
            .scripts
            .lock()
            .expect("lock")
            .get(&key(cid, exec_id))
            .cloned()
            .unwrap_or(Script::UntilSignal);
        let mut p = FakeProc::default();
        match script {
            Script::Print { out, code } => {
                p.stdout.extend(out);
                p.exit = Some(exited(code, 0));
            }
            Script::UntilSignal => {}
            Script::Echo => p.echo = true,
        }
        self.procs
            .lock()
            .expect("lock")
            .insert(key(cid, exec_id), p);
        self.changed.notify_all();
        let mut pid = self.next_pid.lock().expect("lock");
        *pid += 1;
        100 + *pid
    }

    /// The next chunk of `stream` of process `k`, if there is one yet.
    fn next_chunk(&self, k: &str, stream: Stream) -> Result<Option<Chunk>, AgentError> {
        let mut procs = self.procs.lock().expect("lock");
        let p = procs
            .get_mut(k)
            .ok_or_else(|| AgentError::Other("gone".into()))?;
        let end = Chunk {
            data: vec![],
            eof: true,
        };
        Ok(if stream == Stream::Stderr {
            p.exit.is_some().then_some(end)
        } else if !p.stdout.is_empty() {
            Some(Chunk {
                data: p.stdout.drain(..).collect(),
                eof: false,
            })
        } else {
            p.exit.is_some().then_some(end)
        })
    }

    fn with<T>(&self, k: &str, f: impl FnOnce(&mut FakeProc) -> T) -> Result<T, AgentError> {
        let mut procs = self.procs.lock().expect("lock");
        let p = procs
            .get_mut(k)
            .ok_or_else(|| AgentError::Other(format!("no process {k}")))?;
        let r = f(p);
        self.changed.notify_all();
        Ok(r)
    }
}

#[async_trait::async_trait]
impl AgentApi for FakeAgent {
    async fn create_sandbox(&self, _: &str, _: &str, _: &[Share]) -> Result<(), AgentError> {
        Ok(())
    }
    async fn create_container(&self, _: &str, _: &[u8]) -> Result<(), AgentError> {
        Ok(())
    }
    async fn start_container(&self, cid: &str) -> Result<u32, AgentError> {
        Ok(self.launch(cid, ""))
    }
    async fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process: &[u8],
    ) -> Result<u32, AgentError> {
        serde_json::from_slice::<serde_json::Value>(process)
            .map_err(|e| AgentError::Other(e.to_string()))?;
        Ok(self.launch(cid, exec_id))
    }
    async fn signal(
        &self,
        cid: &str,
        exec_id: &str,
        signal: u32,
        _all: bool,
    ) -> Result<(), AgentError> {
        if *self.hung.lock().expect("lock") {
            return Err(AgentError::Other("Request deadline elapsed".into()));
        }
        // as the agent: a process that has ended cannot be signalled
        let ended = self.with(&key(cid, exec_id), |p| {
            p.exit.is_some() || {
                p.exit = Some(exited(0, signal as i32));
                false
            }
        })?;
        if ended {
            return Err(AgentError::Rpc {
                method: "SignalProcess",
                target: key(cid, exec_id),
                source: carapace_runtime::agent::RpcFailure(ttrpc::Error::RpcStatus(
                    ttrpc::get_status(
                        ttrpc::Code::FAILED_PRECONDITION,
                        "is stopped, signal needs a live process",
                    ),
                )),
            });
        }
        Ok(())
    }
    async fn wait(&self, cid: &str, exec_id: &str) -> Result<ExitInfo, AgentError> {
        let k = key(cid, exec_id);
        loop {
            {
                let procs = self.procs.lock().expect("lock");
                if !procs.contains_key(&k) {
                    return Err(AgentError::Other("the VM is gone".into()));
                }
                if let Some(e) = procs.get(&k).and_then(|p| p.exit)
                    && !*self.hold_exits.lock().expect("lock")
                {
                    return Ok(e);
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
    async fn write_stdin(
        &self,
        cid: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, AgentError> {
        self.with(&key(cid, exec_id), |p| {
            if p.echo {
                p.stdout.extend(data);
            }
            data.len()
        })
    }
    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<(), AgentError> {
        self.with(&key(cid, exec_id), |p| {
            if p.echo {
                p.exit.get_or_insert(exited(0, 0));
            }
        })
    }
    async fn read(&self, cid: &str, exec_id: &str, stream: Stream) -> Result<Chunk, AgentError> {
        let k = key(cid, exec_id);
        loop {
            if let Some(chunk) = self.next_chunk(&k, stream)? {
                return Ok(chunk);
            }
            tokio::time::sleep(POLL).await;
        }
    }
    async fn resize(&self, cid: &str, exec_id: &str, _: u32, _: u32) -> Result<(), AgentError> {
        self.with(&key(cid, exec_id), |_| ())
    }
    async fn list_processes(&self, cid: &str) -> Result<Vec<u32>, AgentError> {
        let n = self
            .procs
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, p)| k.starts_with(&format!("{cid}/")) && p.exit.is_none())
            .count();
        Ok((1..=n as u32).collect())
    }
    async fn remove_container(&self, _: &str) -> Result<(), AgentError> {
        Ok(())
    }
    async fn destroy_sandbox(&self, _: &str) -> Result<(), AgentError> {
        Ok(())
    }
    async fn pause(&self, cid: &str) -> Result<(), AgentError> {
        self.with(&key(cid, ""), |p| p.paused = true)
    }
    async fn resume(&self, cid: &str) -> Result<(), AgentError> {
        self.with(&key(cid, ""), |p| p.paused = false)
    }
    async fn update_resources(&self, cid: &str, json: &[u8]) -> Result<(), AgentError> {
        self.updates
            .lock()
            .expect("lock")
            .push((cid.into(), String::from_utf8_lossy(json).into_owned()));
        Ok(())
    }
    async fn stats(
        &self,
        cid: &str,
    ) -> Result<carapace_runtime::agent::ContainerStats, AgentError> {
        let pids = self.list_processes(cid).await?.len() as u64;
        let mut s = carapace_runtime::agent::ContainerStats::default();
        s.pids.mut_or_insert_default().current = pids;
        s.memory.mut_or_insert_default().usage = 4096 * pids;
        Ok(s)
    }
    async fn set_online_cpus(&self, count: u32) -> Result<u32, AgentError> {
        Ok(count)
    }
    async fn next_oom_event(&self) -> Result<String, AgentError> {
        loop {
            if let Some(id) = self.ooms.lock().expect("lock").pop_front() {
                return Ok(id);
            }
            tokio::time::sleep(POLL).await;
        }
    }
    async fn configure_network(
        &self,
        _: &carapace_runtime::network::NetworkPlan,
    ) -> Result<(), AgentError> {
        Ok(())
    }
}

#[derive(Default)]
struct FakeBackend {
    agent: Arc<FakeAgent>,
    calls: Mutex<Vec<String>>,
    fail_create: bool,
    /// Ends `helper_exited` for the fs daemon (one waiter per notification).
    fsd_gone: tokio::sync::Notify,
    /// Ends `helper_exited` for the VMM (every waiter).
    vmm_gone: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Backend for FakeBackend {
    async fn create(
        &self,
        id: &str,
        _bundle: &Bundle,
        rootfs: &[RootfsMount],
        role: &Role,
        pod: Option<&Session>,
    ) -> Result<Session, BackendError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("create {id} {role:?} mounts={}", rootfs.len()));
        if let Some(pod) = pod {
            let ours: Session = self.agent.clone();
            assert!(Arc::ptr_eq(pod, &ours), "a pod's session is the VM's");
            self.calls
                .lock()
                .expect("lock")
                .push(format!("joined {id} over the pod's session"));
        }
        if self.fail_create {
            return Err(BackendError::new(
                "booting the VM of",
                id,
                "VMM exited with status 3",
            ));
        }
        Ok(self.agent.clone())
    }
    async fn start(&self, id: &str, _role: &Role, _: &Session) -> Result<u32, BackendError> {
        self.calls.lock().expect("lock").push(format!("start {id}"));
        Ok(self.agent.launch(id, ""))
    }
    fn record_exit(&self, id: &str, _role: &Role, exit: ExitInfo) {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("exit {id} {}", exit.exit_status));
    }
    async fn delete(
        &self,
        id: &str,
        _bundle: &Path,
        role: &Role,
        _: Option<&Session>,
    ) -> Result<(), BackendError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("delete {id} {role:?}"));
        Ok(())
    }
    async fn update(
        &self,
        id: &str,
        resources_json: &[u8],
        session: &Session,
    ) -> Result<(), BackendError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("update {id}"));
        // the runtime resizes the VM, then updates the guest through the session
        session
            .update_resources(id, resources_json)
            .await
            .map_err(|e| BackendError::new("updating", id, e))
    }

    async fn kill_vm(&self, id: &str) -> Result<(), BackendError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("kill_vm {id}"));
        // every process of the VM is gone with it
        self.agent.procs.lock().expect("lock").clear();
        self.agent.changed.notify_all();
        Ok(())
    }

    async fn helper_exited(&self, _: &str, helper: Helper) -> Result<(), BackendError> {
        match helper {
            Helper::FsDaemon => self.fsd_gone.notified().await,
            Helper::Vmm => self.vmm_gone.notified().await,
        }
        Ok(())
    }

    fn fault_point(&self, id: &str, point: carapace_runtime::faults::Point) {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("fault {} {id}", point.name()));
    }

    fn vm_post_mortem(&self, id: &str) -> Option<String> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("vm_post_mortem {id}"));
        Some("vmm.log ends with: guest triple fault".into())
    }

    async fn cleanup(&self, id: &str, _bundle: &Path) -> Result<(), BackendError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("cleanup {id}"));
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    backend: Arc<FakeBackend>,
    tasks: Arc<Tasks>,
    events: mpsc::UnboundedReceiver<Event>,
}

fn fixture_with(backend: FakeBackend, annotations: serde_json::Value) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::json!({"annotations": annotations}).to_string(),
    )
    .expect("config.json");
    let backend = Arc::new(backend);
    let (tx, events) = mpsc::unbounded_channel();
    let tasks = Arc::new(Tasks::new(backend.clone(), tx));
    Fixture {
        dir,
        backend,
        tasks,
        events,
    }
}

fn fixture() -> Fixture {
    fixture_with(FakeBackend::default(), serde_json::json!({}))
}

impl Fixture {
    fn fifo(&self, name: &str) -> String {
        let p = self.dir.path().join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        p.display().to_string()
    }

    /// A reader of a FIFO, as containerd would hold it; yields what was written.
    fn read_fifo(path: &str) -> std::thread::JoinHandle<Vec<u8>> {
        let p = path.to_owned();
        std::thread::spawn(move || std::fs::read(p).expect("read fifo"))
    }

    fn request(&self, id: &str, stdio: StdioPaths) -> CreateRequest {
        CreateRequest {
            id: id.into(),
            bundle: self.dir.path().to_path_buf(),
            rootfs: vec![],
            stdio,
        }
    }

    async fn next_event(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(10), self.events.recv())
            .await
            .expect("an event within 10 s")
            .expect("channel open")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn run_to_exit_delivers_output_before_the_one_exit_event() {
    let mut f = fixture();
    f.backend.agent.script(
        "c1",
        "",
        Script::Print {
            out: b"hello\n".to_vec(),
            code: 3,
        },
    );
    let out = f.fifo("out");
    let reader = Fixture::read_fifo(&out);
    let stdio = StdioPaths {
        stdout: out,
        ..Default::default()
    };
    assert_eq!(
        f.tasks
            .create(f.request("c1", stdio.clone()))
            .await
            .expect("create"),
        0
    );
    assert_eq!(
        f.tasks.state("c1", "").expect("state").state,
        ProcState::Created
    );
    let pid = f.tasks.start("c1", "").await.expect("start");
    let exit = f.tasks.wait("c1", "").await.expect("wait");
    assert_eq!(exit.status, 3);
    assert_eq!(reader.join().expect("reader"), b"hello\n");

    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(f.next_event().await);
    }
    assert!(matches!(&seen[0], Event::Create { id, stdio: s, .. } if id == "c1" && *s == stdio));
    assert_eq!(
        seen[1],
        Event::Start {
            id: "c1".into(),
            pid
        }
    );
    assert!(
        matches!(&seen[2], Event::Exit { id, exec_id, exit, .. } if id == "c1" && exec_id.is_empty() && exit.status == 3)
    );

    let info = f.tasks.state("c1", "").expect("state");
    assert_eq!(
        (info.state, info.exit.map(|e| e.status)),
        (ProcState::Stopped, Some(3))
    );
    let (dpid, dexit) = f.tasks.delete("c1", "").await.expect("delete");
    assert_eq!((dpid, dexit.status), (pid, 3));
    assert!(matches!(f.next_event().await, Event::Delete { id, .. } if id == "c1"));
    // exactly one exit event: nothing else was sent
    assert!(f.events.try_recv().is_err());
    assert!(f.tasks.is_empty());
    assert!(matches!(
        f.tasks.state("c1", ""),
        Err(TaskError::NotFound { .. })
    ));
    let calls = f.backend.calls.lock().expect("lock").clone();
    assert_eq!(
        calls,
        [
            "create c1 Standalone mounts=0",
            "start c1",
            "exit c1 3",
            "delete c1 Standalone"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_stops_a_running_init_with_128_plus_signal_and_delete_waits_for_it() {
    let mut f = fixture();
    f.tasks
        .create(f.request("c2", StdioPaths::default()))
        .await
        .expect("create");
    f.tasks.start("c2", "").await.expect("start");
    let err = f.tasks.delete("c2", "").await.expect_err("running");
    assert!(
        matches!(
            err,
            TaskError::WrongState {
                state: "running",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(f.tasks.pids("c2").await.expect("pids").len(), 1);
    f.tasks.kill("c2", "", 9, false).await.expect("kill");
    assert_eq!(f.tasks.wait("c2", "").await.expect("wait").status, 137);
    // as runc: a not-found, which containerd's CRI stop path accepts and moves on
    let err = f.tasks.kill("c2", "", 9, false).await.expect_err("stopped");
    assert!(matches!(err, TaskError::Finished { .. }), "{err}");
    assert_eq!(err.to_string(), "process c2 already finished");
    f.tasks.delete("c2", "").await.expect("delete");
    let mut exits = 0;
    while let Ok(ev) = f.events.try_recv() {
        exits += usize::from(matches!(ev, Event::Exit { .. }));
    }
    assert_eq!(exits, 1);
}

/// A guest whose agent no longer answers (starved, hung): SIGKILL still works — the shim
/// kills the VM and reports the process killed — so the container, and a pod being
/// stopped, can be removed. Other signals stay errors.
#[tokio::test(flavor = "multi_thread")]
async fn a_sigkill_the_agent_cannot_deliver_kills_the_vm() {
    let mut f = fixture();
    f.tasks
        .create(f.request("c7", StdioPaths::default()))
        .await
        .expect("create");
    f.tasks.start("c7", "").await.expect("start");
    *f.backend.agent.hung.lock().expect("lock") = true;
    let err = f
        .tasks
        .kill("c7", "", 15, false)
        .await
        .expect_err("TERM unanswered");
    assert!(matches!(err, TaskError::Agent { .. }), "{err}");
    assert!(
        !f.backend
            .calls
            .lock()
            .expect("lock")
            .iter()
            .any(|c| c.starts_with("kill_vm"))
    );
    f.tasks
        .kill("c7", "", 9, true)
        .await
        .expect("SIGKILL works");
    assert!(
        f.backend
            .calls
            .lock()
            .expect("lock")
            .contains(&"kill_vm c7".to_owned())
    );
    assert_eq!(f.tasks.wait("c7", "").await.expect("wait").status, 137);
    f.tasks.delete("c7", "").await.expect("delete");
    let mut exits = 0;
    while let Ok(ev) = f.events.try_recv() {
        exits += usize::from(matches!(ev, Event::Exit { .. }));
    }
    assert_eq!(exits, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_that_ends_on_its_own_is_reported_once_with_what_its_logs_say() {
    let f = fixture();
    f.tasks
        .create(f.request("c8", StdioPaths::default()))
        .await
        .expect("create");
    f.tasks.start("c8", "").await.expect("start");
    // the VM dies under the shim: every process of it is gone, nobody killed it
    f.backend.agent.procs.lock().expect("lock").clear();
    f.backend.agent.changed.notify_all();
    assert_eq!(
        f.tasks.wait("c8", "").await.expect("wait").status,
        LOST_EXIT_STATUS
    );
    let asked = |f: &Fixture| {
        f.backend
            .calls
            .lock()
            .expect("lock")
            .iter()
            .filter(|c| c.starts_with("vm_post_mortem"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(asked(&f), ["vm_post_mortem c8"]);
    f.tasks.delete("c8", "").await.expect("delete");
    assert_eq!(asked(&f).len(), 1, "asked once per VM");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_fs_daemon_that_exits_under_a_running_container_stops_its_vm() {
    let f = fixture();
    let kills = |f: &Fixture| {
        f.backend
            .calls
            .lock()
            .expect("lock")
            .iter()
            .filter(|c| c.starts_with("kill_vm"))
            .cloned()
            .collect::<Vec<_>>()
    };
    // a container whose init already ended: its fs daemon going is no news
    f.backend.agent.script(
        "c9",
        "",
        Script::Print {
            out: vec![],
            code: 0,
        },
    );
    f.tasks
        .create(f.request("c9", StdioPaths::default()))
        .await
        .expect("create");
    f.tasks.start("c9", "").await.expect("start");
    assert_eq!(f.tasks.wait("c9", "").await.expect("wait").status, 0);
    f.backend.fsd_gone.notify_one();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(kills(&f).is_empty(), "{:?}", kills(&f));
    f.tasks.delete("c9", "").await.expect("delete");

    // a running one: the VM is stopped, its init reported lost
    f.tasks
        .create(f.request("c10", StdioPaths::default()))
        .await
        .expect("create");
    f.tasks.start("c10", "").await.expect("start");
    f.backend.fsd_gone.notify_one();
    assert_eq!(
        f.tasks.wait("c10", "").await.expect("wait").status,
        LOST_EXIT_STATUS
    );
    assert_eq!(kills(&f), ["kill_vm c10"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_that_ends_before_its_container_starts_ends_the_container_once() {
    let mut f = fixture();
    f.tasks
        .create(f.request("c11", StdioPaths::default()))
        .await
        .expect("create");
    assert!(matches!(f.next_event().await, Event::Create { .. }));
    tokio::time::sleep(Duration::from_millis(100)).await; // the watcher waits
    f.backend.vmm_gone.notify_waiters();
    assert_eq!(
        f.tasks.wait("c11", "").await.expect("wait").status,
        LOST_EXIT_STATUS
    );
    assert!(
        matches!(f.next_event().await, Event::Exit { id, exit, .. } if id == "c11" && exit.status == LOST_EXIT_STATUS)
    );
    f.tasks.delete("c11", "").await.expect("delete");
    assert!(matches!(f.next_event().await, Event::Delete { .. }));
    assert!(f.events.try_recv().is_err(), "one exit only");
    let told = f
        .backend
        .calls
        .lock()
        .expect("lock")
        .iter()
        .filter(|c| c.starts_with("vm_post_mortem"))
        .count();
    assert_eq!(told, 1, "why the VM ended is logged once");
}

/// CRI stops a pod's containers right after they exit: the agent may refuse the signal
/// (the process is gone) before the shim has seen the exit. That is "already finished"
/// (NOT_FOUND), not a failure of the stop.
#[tokio::test(flavor = "multi_thread")]
async fn a_signal_that_races_the_exit_is_already_finished() {
    let f = fixture();
    f.tasks
        .create(f.request("c9", StdioPaths::default()))
        .await
        .expect("create");
    f.tasks.start("c9", "").await.expect("start");
    // the process ends in the guest; the shim does not hear of it yet
    *f.backend.agent.hold_exits.lock().expect("lock") = true;
    f.backend
        .agent
        .with(&key("c9", ""), |p| p.exit = Some(exited(3, 0)))
        .expect("ended");
    let agent = f.backend.agent.clone();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        *agent.hold_exits.lock().expect("lock") = false;
        agent.changed.notify_all();
    });
    let err = f.tasks.kill("c9", "", 15, false).await.expect_err("ended");
    assert!(matches!(err, TaskError::Finished { .. }), "{err}");
    release.join().expect("release");
    assert_eq!(f.tasks.wait("c9", "").await.expect("wait").status, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_is_registered_then_started_with_stdin_echoed_until_eof() {
    let mut f = fixture();
    f.tasks
        .create(f.request("c3", StdioPaths::default()))
        .await
        .expect("create");
    let spec = br#"{"args":["cat"]}"#.to_vec();
    let err = f
        .tasks
        .exec("c3", "e1", spec.clone(), StdioPaths::default())
        .expect_err("not running");
    assert!(
        matches!(
            err,
            TaskError::WrongState {
                state: "created",
                ..
            }
        ),
        "{err}"
    );
    f.tasks.start("c3", "").await.expect("start");

    f.backend.agent.script("c3", "e1", Script::Echo);
    let (inp, out) = (f.fifo("in"), f.fifo("out"));
    let reader = Fixture::read_fifo(&out);
    let stdio = StdioPaths {
        stdin: inp.clone(),
        stdout: out,
        ..Default::default()
    };
    f.tasks.exec("c3", "e1", spec.clone(), stdio).expect("exec");
    let err = f
        .tasks
        .exec("c3", "e1", spec, StdioPaths::default())
        .expect_err("dup");
    assert!(matches!(err, TaskError::AlreadyExists { .. }), "{err}");
    let err = f
        .tasks
        .kill("c3", "e1", 15, false)
        .await
        .expect_err("not started");
    assert!(matches!(err, TaskError::WrongState { .. }), "{err}");
    let pid = f.tasks.start("c3", "e1").await.expect("start exec");
    std::fs::write(&inp, b"ping\n").expect("write stdin"); // opens, writes, closes: EOF
    let exit = f.tasks.wait("c3", "e1").await.expect("wait exec");
    assert_eq!(exit.status, 0);
    assert_eq!(reader.join().expect("reader"), b"ping\n");
    let (dpid, _) = f.tasks.delete("c3", "e1").await.expect("delete exec");
    assert_eq!(dpid, pid);
    assert!(matches!(
        f.tasks.state("c3", "e1"),
        Err(TaskError::NotFound { .. })
    ));
    // the init is still running
    assert_eq!(
        f.tasks.state("c3", "").expect("init").state,
        ProcState::Running
    );

    let mut kinds = Vec::new();
    while let Ok(ev) = f.events.try_recv() {
        kinds.push(match ev {
            Event::Create { .. } => "create",
            Event::Start { .. } => "start",
            Event::ExecAdded { .. } => "exec-added",
            Event::ExecStarted { .. } => "exec-started",
            Event::Exit { .. } => "exit",
            Event::Delete { .. } => "delete",
            Event::Paused { .. } | Event::Resumed { .. } | Event::Oom { .. } => "other",
        });
    }
    assert_eq!(
        kinds,
        ["create", "start", "exec-added", "exec-started", "exit"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_roles_reach_the_backend_and_create_failures_leave_no_task() {
    let mut f = fixture_with(
        FakeBackend {
            fail_create: true,
            ..Default::default()
        },
        serde_json::json!({crate::pod::CONTAINER_TYPE: "container", crate::pod::SANDBOX_ID: "pod1"}),
    );
    let err = f
        .tasks
        .create(f.request("c4", StdioPaths::default()))
        .await
        .expect_err("fails");
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(
        chain.contains("booting the VM of c4") && chain.contains("VMM exited with status 3"),
        "{chain}"
    );
    assert!(f.tasks.is_empty());
    assert!(f.events.try_recv().is_err(), "no event for a failed create");
    let calls = f.backend.calls.lock().expect("lock").clone();
    assert_eq!(
        calls,
        ["create c4 Container { sandbox_id: \"pod1\" } mounts=0"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_ids_and_duplicates_are_typed_errors() {
    let f = fixture();
    assert!(matches!(
        f.tasks.start("nope", "").await,
        Err(TaskError::NotFound {
            kind: "container",
            ..
        })
    ));
    assert!(matches!(
        f.tasks.wait("nope", "").await,
        Err(TaskError::NotFound { .. })
    ));
    assert!(matches!(
        f.tasks.delete("nope", "").await,
        Err(TaskError::NotFound { .. })
    ));
    f.tasks
        .create(f.request("c5", StdioPaths::default()))
        .await
        .expect("create");
    assert!(matches!(
        f.tasks.create(f.request("c5", StdioPaths::default())).await,
        Err(TaskError::AlreadyExists { .. })
    ));
    assert!(matches!(
        f.tasks.state("c5", "ghost"),
        Err(TaskError::NotFound {
            kind: "process",
            ..
        })
    ));
    // a created, never started container deletes cleanly
    let (pid, exit) = f.tasks.delete("c5", "").await.expect("delete created");
    assert_eq!((pid, exit.status), (0, 0));
}

/// A bundle directory with these annotations, beside the fixture's.
fn pod_bundle(f: &Fixture, name: &str, annotations: serde_json::Value) -> PathBuf {
    let dir = f.dir.path().join(name);
    std::fs::create_dir(&dir).expect("bundle dir");
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({"annotations": annotations}).to_string(),
    )
    .expect("config.json");
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_vm_outlives_its_sandbox_until_the_last_container_is_deleted() {
    use crate::pod::{CONTAINER_TYPE, SANDBOX_ID};
    let f = fixture();
    let sandbox = pod_bundle(
        &f,
        "p1",
        serde_json::json!({CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1"}),
    );
    let member = serde_json::json!({CONTAINER_TYPE: "container", SANDBOX_ID: "p1"});
    for (id, bundle) in [
        ("p1", sandbox),
        ("c1", pod_bundle(&f, "c1", member.clone())),
        ("c2", pod_bundle(&f, "c2", member)),
    ] {
        f.tasks
            .create(CreateRequest {
                id: id.into(),
                bundle,
                rootfs: vec![],
                stdio: StdioPaths::default(),
            })
            .await
            .expect("create");
        f.tasks.start(id, "").await.expect("start");
    }
    // the pause process dies first: deleting the sandbox keeps the VM
    f.tasks.kill("p1", "", 9, false).await.expect("kill p1");
    f.tasks.wait("p1", "").await.expect("wait p1");
    f.tasks.delete("p1", "").await.expect("delete p1");
    assert!(!f.tasks.is_empty(), "the pod's containers remain");
    let calls = || f.backend.calls.lock().expect("lock").clone();
    // the pod's containers joined over the VM's session (no second connection)
    for id in ["c1", "c2"] {
        let joined = format!("joined {id} over the pod's session");
        assert!(calls().contains(&joined), "{:?}", calls());
    }
    assert!(
        !calls().iter().any(|c| c.starts_with("delete p1")),
        "{:?}",
        calls()
    );
    for id in ["c1", "c2"] {
        f.tasks.kill(id, "", 9, false).await.expect("kill");
        f.tasks.wait(id, "").await.expect("wait");
    }
    f.tasks.delete("c1", "").await.expect("delete c1");
    assert!(!calls().iter().any(|c| c.starts_with("delete p1")));
    f.tasks.delete("c2", "").await.expect("delete c2");
    let deletes: Vec<String> = calls()
        .into_iter()
        .filter(|c| c.starts_with("delete"))
        .collect();
    assert_eq!(
        deletes,
        [
            "delete c1 Container { sandbox_id: \"p1\" }",
            "delete c2 Container { sandbox_id: \"p1\" }",
            "delete p1 Sandbox",
        ]
    );
    assert!(f.tasks.is_empty(), "the shim may exit now");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_without_containers_left_stops_its_vm_at_once() {
    use crate::pod::{CONTAINER_TYPE, SANDBOX_ID};
    let f = fixture();
    let sandbox = pod_bundle(
        &f,
        "p2",
        serde_json::json!({CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p2"}),
    );
    f.tasks
        .create(CreateRequest {
            id: "p2".into(),
            bundle: sandbox,
            rootfs: vec![],
            stdio: StdioPaths::default(),
        })
        .await
        .expect("create");
    f.tasks.delete("p2", "").await.expect("delete");
    assert!(f.tasks.is_empty());
    let calls = f.backend.calls.lock().expect("lock").clone();
    assert_eq!(calls.last().map(String::as_str), Some("delete p2 Sandbox"));
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_update_and_stats_reach_the_agent_with_their_events() {
    let mut f = fixture();
    f.tasks
        .create(f.request("c5", StdioPaths::default()))
        .await
        .expect("create");
    let err = f.tasks.pause("c5").await.expect_err("not started");
    assert!(
        matches!(
            err,
            TaskError::WrongState {
                state: "created",
                ..
            }
        ),
        "{err}"
    );
    f.tasks.start("c5", "").await.expect("start");
    f.tasks.pause("c5").await.expect("pause");
    assert!(f.backend.agent.procs.lock().expect("lock")["c5/"].paused);
    assert_eq!(
        f.tasks.state("c5", "").expect("state").state,
        ProcState::Paused
    );
    let err = f.tasks.pause("c5").await.expect_err("paused twice");
    assert!(
        matches!(
            err,
            TaskError::WrongState {
                state: "paused",
                ..
            }
        ),
        "{err}"
    );
    let err = f.tasks.delete("c5", "").await.expect_err("paused");
    assert!(
        matches!(
            err,
            TaskError::WrongState {
                state: "paused",
                ..
            }
        ),
        "{err}"
    );
    f.tasks.resume("c5").await.expect("resume");
    assert!(!f.backend.agent.procs.lock().expect("lock")["c5/"].paused);
    assert_eq!(
        f.tasks.state("c5", "").expect("state").state,
        ProcState::Running
    );
    let err = f.tasks.resume("c5").await.expect_err("not paused");
    assert!(
        matches!(
            err,
            TaskError::WrongState {
                state: "running",
                ..
            }
        ),
        "{err}"
    );

    let json = br#"{"memory":{"limit":33554432}}"#.to_vec();
    f.tasks.update("c5", json).await.expect("update");
    assert!(
        f.backend
            .calls
            .lock()
            .expect("lock")
            .contains(&"update c5".to_owned())
    );
    assert_eq!(
        f.backend.agent.updates.lock().expect("lock").clone(),
        [(
            "c5".to_owned(),
            r#"{"memory":{"limit":33554432}}"#.to_owned()
        )]
    );
    let stats = f.tasks.stats("c5").await.expect("stats");
    assert_eq!(stats.pids.current, 1);
    assert_eq!(stats.memory.usage, 4096);
    assert!(matches!(
        f.tasks.stats("nope").await,
        Err(TaskError::NotFound { .. })
    ));

    f.tasks.kill("c5", "", 9, false).await.expect("kill");
    f.tasks.wait("c5", "").await.expect("wait");
    let err = f
        .tasks
        .update("c5", b"{}".to_vec())
        .await
        .expect_err("stopped");
    assert!(
        matches!(
            err,
            TaskError::WrongState {
                state: "stopped",
                ..
            }
        ),
        "{err}"
    );
    let mut names = Vec::new();
    while let Ok(ev) = f.events.try_recv() {
        names.push(match ev {
            Event::Paused { .. } => "paused",
            Event::Resumed { .. } => "resumed",
            Event::Exit { .. } => "exit",
            Event::Create { .. } => "create",
            Event::Start { .. } => "start",
            _ => "other",
        });
    }
    assert_eq!(names, ["create", "start", "paused", "resumed", "exit"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn oom_kills_the_agent_reports_become_oom_events_of_our_containers() {
    let mut f = fixture();
    f.tasks
        .create(f.request("c6", StdioPaths::default()))
        .await
        .expect("create");
    assert!(matches!(f.next_event().await, Event::Create { .. }));
    {
        let mut q = f.backend.agent.ooms.lock().expect("lock");
        q.push_back("not-ours".into());
        q.push_back("c6".into());
    }
    f.backend.agent.oom_added.notify_all();
    assert_eq!(f.next_event().await, Event::Oom { id: "c6".into() });
    assert!(
        f.events.try_recv().is_err(),
        "nothing for a container not ours"
    );
}
