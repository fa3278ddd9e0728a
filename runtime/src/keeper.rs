//! Keepers: the host process that stands for one container process (the init, or one
//! exec'd process) towards runc-style callers.
//!
//! A runc caller (containerd's runc shim, conmon) reads the pid that `create --pid-file` or
//! `exec --pid-file` wrote, reaps that process as a subreaper and takes its exit status
//! for the container process's, and may signal it directly. The container's processes
//! live in the guest, so the pid handed out is a host process of ours, the **keeper**:
//!
//! - it lives exactly as long as its guest process: the init's keeper from `create`
//!   (the init exists, waiting for `start`) until the init exited, an exec's keeper from
//!   the moment the process started;
//! - it relays the process's stdio to its own stdio (what the caller gave, or the console
//!   socket's terminal), so nothing blocks on a full pipe;
//! - it exits with the process's status: the exit code, or 128 + the signal that killed
//!   it (what runc's callers compute from a signalled init); the init's exit is recorded
//!   in `state.json` first, so `state` says `stopped`;
//! - every signal it can catch ([`FORWARDED`]) is sent on to its guest process;
//! - SIGKILL cannot be caught: each keeper starts a **guard** child (`__guard`) that holds
//!   the read end of a pipe only the keeper writes. A keeper that ends normally tells the
//!   guard so and waits for it; a keeper that was killed leaves the guard an end of file
//!   without that word, and the guard then kills the keeper's guest process with SIGKILL
//!   (for the init: every process of the container) and records the init's exit (137).
//!   So a caller killing the pid it was given kills the container process, as with runc.
//!
//! A keeper whose VM is gone (deleted, VMM killed) exits with 137: its process was killed
//! with the VM. The init's keeper is recorded in `state.json` (`io_relay`), exec keepers in
//! `exec_keepers`; `delete` stops those still running.
//!
//! The binary provides the commands that re-execute it (`__keep`, `__guard`); this module
//! owns what they do and how they are started.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::agent::{AgentError, ExitInfo, Session};
use crate::process::ProcessRecord;
use crate::sandbox::{Runtime, SandboxError};
use crate::state::{StateError, Status};
use crate::stdio::{HostIo, stream_until_exit};

/// Signals a keeper catches and sends on to its guest process. Not SIGCHLD, SIGWINCH,
/// SIGURG (about the keeper itself), SIGPIPE (a write of the keeper's own to a closed
/// pipe), SIGCONT/SIGTSTP/SIGTTIN/SIGTTOU (job control of the keeper's terminal).
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTERM,
    Signal::SIGALRM,
];

/// The environment variable naming the descriptor on which an exec keeper reports the
/// guest pid of the process it started (see [`spawn_exec_keeper`]).
pub const READY_FD_ENV: &str = "CARAPACE_KEEPER_READY_FD";

/// What the keeper writes to its guard when it ends normally.
const RELEASE: &[u8] = b"done";
/// How often the init's keeper looks whether the container was started.
const START_POLL: Duration = Duration::from_millis(20);
/// How long a released guard may take to exit.
const GUARD_EXIT: Duration = Duration::from_secs(2);
/// How often a keeper whose stdin is a terminal looks at its size.
const TERMINAL_POLL: Duration = Duration::from_millis(200);
/// How long a guard waits for the init it killed to be reported gone.
const GUARD_WAIT: Duration = Duration::from_secs(10);
/// The status of a process killed by SIGKILL (its VM destroyed, its keeper killed).
pub const KILLED: ExitInfo = ExitInfo {
    exit_code: 0,
    signal: Signal::SIGKILL as i32,
    exit_status: 128 + Signal::SIGKILL as u32,
};

/// Errors of keepers and guards.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// A sandbox operation (state, connecting, exec).
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The state store.
    #[error(transparent)]
    State(#[from] StateError),
    /// An agent request.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A signal could not be caught for forwarding.
    #[error("cannot catch {signal} to forward it to the container process")]
    Catch {
        /// The signal.
        signal: Signal,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A keeper or guard process could not be started.
    #[error("cannot start the {what}")]
    Spawn {
        /// Which process.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The descriptor named by [`READY_FD_ENV`] is not usable.
    #[error("{READY_FD_ENV}={value:?} does not name a descriptor")]
    ReadyFd {
        /// The variable's value.
        value: String,
    },
    /// Reporting to the parent or reading the guard's pipe failed.
    #[error("{op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An exec keeper exited before it reported the process started (it printed why on
    /// its stderr, which is the caller's).
    #[error("the keeper of exec {exec_id} exited with status {code} before the process started")]
    KeeperFailed {
        /// The exec.
        exec_id: String,
        /// The keeper's exit code (its own error's exit code).
        code: i32,
    },
    /// A blocking step panicked or was cancelled.
    #[error("a blocking keeper step did not complete")]
    Blocking(#[source] tokio::task::JoinError),
}

/// The exit code a keeper (or a foreground `run`/`exec`) exits with for `exit`: the exit
/// code, or 128 + signal; 255 when that does not fit a byte.
pub fn exit_code(exit: &ExitInfo) -> u8 {
    u8::try_from(exit.exit_status).unwrap_or(u8::MAX)
}

/// The signals of [`FORWARDED`], caught from the moment this is made: received signal
/// numbers come out of [`Signals::recv`].
#[derive(Debug)]
pub struct Signals {
    rx: tokio::sync::mpsc::UnboundedReceiver<Signal>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Signals {
    /// Catches [`FORWARDED`] (replacing their default actions for this process's life).
    /// Call from within a tokio runtime.
    pub fn catch() -> Result<Self, KeeperError> {
        use tokio::signal::unix::{SignalKind, signal};
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for sig in FORWARDED {
            let mut stream =
                signal(SignalKind::from_raw(sig as i32)).map_err(|source| KeeperError::Catch {
                    signal: sig,
                    source,
                })?;
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(sig).is_err() {
                        return;
                    }
                }
            }));
        }
        Ok(Self { rx, tasks })
    }

    /// The next caught signal (never `None` while this value lives).
    pub async fn recv(&mut self) -> Option<Signal> {
        self.rx.recv().await
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a keeper holds from its first moment: the signals it forwards and its guard.
#[derive(Debug)]
pub struct Keeping {
    /// Caught signals, forwarded to the guest process.
    pub signals: Signals,
    /// The guard, released when the process ended (None: unguarded, in tests).
    pub guard: Option<Guard>,
}

/// Streams the stdio of process `exec_id` (empty: the init) of `cid` until it exits,
/// sending every signal `signals` catches on to it. For keepers and for the foreground
/// `run`/`exec`.
pub async fn relay(
    agent: &Session,
    cid: &str,
    exec_id: &str,
    io: HostIo,
    signals: &mut Signals,
) -> Result<ExitInfo, AgentError> {
    let streaming = stream_until_exit(agent, cid, exec_id, io);
    tokio::pin!(streaming);
    loop {
        tokio::select! {
            r = &mut streaming => return r,
            Some(sig) = signals.recv() => forward(agent, cid, exec_id, sig).await,
        }
    }
}

/// When this process's stdin is a terminal (a console socket's pty, whose master the
/// caller resizes): sends its size to process `exec_id` of `cid` now and whenever it
/// changes, until the returned task is aborted. A keeper gets no SIGWINCH (the pty is not
/// its controlling terminal), so it looks every [`TERMINAL_POLL`].
fn follow_terminal_size(
    agent: &Session,
    cid: &str,
    exec_id: &str,
) -> Option<tokio::task::JoinHandle<()>> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return None;
    }
    let (agent, cid, exec_id) = (agent.clone(), cid.to_owned(), exec_id.to_owned());
    Some(tokio::spawn(async move {
        use std::os::fd::AsFd;
        let mut sent = None;
        loop {
            let size = crate::stdio::size_of_terminal(std::io::stdin().as_fd());
            if let Some((rows, cols)) = size
                && size != sent
            {
                match agent.resize(&cid, &exec_id, rows, cols).await {
                    Ok(()) => sent = size,
                    Err(e) => {
                        tracing::debug!(cid, exec_id, error = %carapace_errors::Chain(&e), "resize refused")
                    }
                }
            }
            tokio::time::sleep(TERMINAL_POLL).await;
        }
    }))
}

/// [`relay`] for a keeper: its terminal's size followed too.
async fn keeper_relay(
    agent: &Session,
    cid: &str,
    exec_id: &str,
    io: HostIo,
    signals: &mut Signals,
) -> Result<ExitInfo, AgentError> {
    let sizes = follow_terminal_size(agent, cid, exec_id);
    let r = relay(agent, cid, exec_id, io, signals).await;
    if let Some(t) = sizes {
        t.abort();
    }
    r
}

async fn forward(agent: &Session, cid: &str, exec_id: &str, sig: Signal) {
    tracing::info!(cid, exec_id, %sig, "forwarding a signal to the container process");
    if let Err(e) = agent.signal(cid, exec_id, sig as u32, false).await {
        tracing::warn!(cid, exec_id, %sig, error = %carapace_errors::Chain(&e), "forwarding the signal failed");
    }
}

/// Whether the VM running container `id` is gone (its state too, or its VMM).
fn vm_gone(rt: &Runtime, id: &str) -> bool {
    match rt.store.load(id) {
        Ok(st) => !rt.vm_of(&st).is_some_and(|v| v.is_alive()),
        Err(_) => true,
    }
}

/// The init's keeper (`create` starts it): waits for `start` (forwarding what `signals`
/// catches to the created init meanwhile), relays the init's stdio until it exits, records
/// the exit, releases `guard` and returns the exit. A container deleted, or whose VM died,
/// before or while it ran, ended with [`KILLED`]; one whose exit someone else recorded,
/// with that. On an error the guard is not released: it kills the container.
pub async fn keep_init(
    rt: &Runtime,
    id: &str,
    io: HostIo,
    keeping: Keeping,
) -> Result<ExitInfo, KeeperError> {
    let Keeping { mut signals, guard } = keeping;
    let exit = init_until_exit(rt, id, io, &mut signals).await?;
    tracing::info!(id, status = exit.exit_status, "container exited");
    match rt.record_exit(id, exit) {
        Ok(()) | Err(SandboxError::State(StateError::NotFound { .. })) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(g) = guard {
        g.release();
    }
    Ok(exit)
}

async fn init_until_exit(
    rt: &Runtime,
    id: &str,
    io: HostIo,
    signals: &mut Signals,
) -> Result<ExitInfo, KeeperError> {
    let session = loop {
        match rt.store.load(id) {
            Ok(st) if st.status == Status::Running => match rt.connect(&st).await {
                Ok(session) => break session,
                // The VM died between the start and now: the init went with it.
                Err(_) if vm_gone(rt, id) => return Ok(recorded_or_killed(st.exit)),
                Err(e) => return Err(e.into()),
            },
            Ok(st) if rt.live_status(&st) == Status::Stopped => {
                tracing::info!(id, "container stopped before it started; keeper exits");
                return Ok(recorded_or_killed(st.exit));
            }
            Ok(_) => {}
            Err(StateError::NotFound { .. }) => {
                tracing::info!(id, "container deleted before it started; keeper exits");
                return Ok(KILLED);
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = tokio::time::sleep(START_POLL) => {}
            Some(sig) = signals.recv() => {
                tracing::info!(id, %sig, "forwarding a signal to the created init");
                if let Err(e) = rt.kill(id, sig as u32, false, None).await {
                    tracing::warn!(id, %sig, error = %carapace_errors::Chain(&e), "forwarding the signal failed");
                }
            }
        }
    };
    tracing::info!(id, "relaying the init's stdio");
    match keeper_relay(&session, id, "", io, signals).await {
        Ok(exit) => Ok(exit),
        Err(e) => {
            // The VM was destroyed under us (delete, a killed VMM): the init went with it.
            let recorded = rt.store.load(id).ok().and_then(|st| st.exit);
            if recorded.is_none() && !vm_gone(rt, id) {
                return Err(e.into());
            }
            tracing::info!(id, error = %carapace_errors::Chain(&e), "the VM is gone");
            Ok(recorded_or_killed(recorded))
        }
    }
}

fn recorded_or_killed(recorded: Option<crate::state::ExitRecord>) -> ExitInfo {
    match recorded {
        Some(r) => ExitInfo {
            exit_code: if r.signal == 0 { r.status as i32 } else { 0 },
            signal: r.signal,
            exit_status: r.status,
        },
        None => KILLED,
    }
}

/// An exec keeper (`exec --detach` starts it): starts `process` as `exec_id` in container
/// `id`, reports its guest pid on `ready` (see [`spawn_exec_keeper`]), relays its stdio
/// until it exits (forwarding what `signals` catches), releases `guard` and returns how
/// the process ended. On an error once the process runs, the guard is not released: it
/// kills the process.
pub async fn keep_exec(
    rt: &Runtime,
    id: &str,
    exec_id: &str,
    process: &serde_json::Value,
    io: HostIo,
    keeping: Keeping,
    ready: Option<OwnedFd>,
) -> Result<ExitInfo, KeeperError> {
    let Keeping { mut signals, guard } = keeping;
    let (session, guest_pid) = match rt.exec(id, exec_id, process, None).await {
        Ok(started) => started,
        Err(e) => {
            // nothing to guard
            if let Some(g) = guard {
                g.release();
            }
            return Err(e.into());
        }
    };
    tracing::info!(id, exec_id, guest_pid, "exec started; relaying its stdio");
    if let Some(fd) = ready {
        let mut f = std::fs::File::from(fd);
        // The parent may be gone (killed): the process runs on, and so does its keeper.
        if let Err(e) = writeln!(f, "{guest_pid}") {
            tracing::warn!(id, exec_id, error = %e, "cannot report to the exec command");
        }
    }
    let exit = match keeper_relay(&session, id, exec_id, io, &mut signals).await {
        Ok(exit) => exit,
        Err(_) if vm_gone(rt, id) => {
            tracing::info!(id, exec_id, "the VM is gone");
            KILLED
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(id, exec_id, status = exit.exit_status, "exec exited");
    if let Some(g) = guard {
        g.release();
    }
    Ok(exit)
}

/// The descriptor an exec keeper reports on, from [`READY_FD_ENV`] (taken once).
pub fn ready_fd_from_env() -> Result<Option<OwnedFd>, KeeperError> {
    let Some(value) = std::env::var_os(READY_FD_ENV) else {
        return Ok(None);
    };
    let value = value.to_string_lossy().into_owned();
    let fd: i32 = value
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| KeeperError::ReadyFd {
            value: value.clone(),
        })?;
    // The descriptor must be open and a pipe (what spawn_exec_keeper hands over).
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one `stat` into the pointed-to buffer, which is exactly that
    // size and lives for the call; an invalid descriptor only makes it fail.
    let ok = unsafe { libc::fstat(fd, st.as_mut_ptr()) } == 0;
    // SAFETY: fstat succeeded, so it initialised the buffer.
    if !ok || unsafe { st.assume_init() }.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(KeeperError::ReadyFd { value });
    }
    // SAFETY: the descriptor is open (fstat succeeded), was handed to this process by its
    // parent for this purpose only, and nothing else in this process owns it; it is taken
    // once, since callers read the variable once at start.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Where a keeper's stdio comes from.
#[derive(Debug)]
pub enum KeeperStdio {
    /// The caller's stdio, inherited.
    Inherit,
    /// A terminal (the console socket's pty slave) for stdin, stdout and stderr.
    Terminal(OwnedFd),
}

fn prepare(cmd: &mut Command, stdio: KeeperStdio) -> Result<(), KeeperError> {
    if let KeeperStdio::Terminal(t) = stdio {
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| KeeperError::Spawn {
                what: "keeper (duplicating the terminal)",
                source,
            })
        };
        cmd.stdin(dup(&t)?).stdout(dup(&t)?).stderr(t);
    }
    // Its own process group: a terminal's ^C or a signal to the caller's group is the
    // caller's, not the container's.
    cmd.process_group(0).env_remove(READY_FD_ENV);
    crate::process::hygiene(cmd);
    Ok(())
}

/// Starts the init's keeper `cmd` (the binary's `__keep ID`) for created container `id`
/// on `stdio` and records it in the state (`io_relay`); returns it.
pub fn spawn_init_keeper(
    rt: &Runtime,
    id: &str,
    mut cmd: Command,
    stdio: KeeperStdio,
) -> Result<ProcessRecord, KeeperError> {
    prepare(&mut cmd, stdio)?;
    let child = cmd.spawn().map_err(|source| KeeperError::Spawn {
        what: "keeper of the container's init",
        source,
    })?;
    let rec = record_of(&child);
    // It outlives this handle; its parent's subreaper (or init) reaps it.
    drop(child);
    rt.store.update(id, |st| st.io_relay = Some(rec))?;
    Ok(rec)
}

fn record_of(child: &std::process::Child) -> ProcessRecord {
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    ProcessRecord::of(pid).unwrap_or(ProcessRecord { pid, start_time: 0 })
}

/// Starts an exec keeper for `process` (the OCI process object) as `exec_id` of
/// container `id`: `command` is the binary's `__keep ID --exec EXEC_ID --process`, to
/// which the path of the process file is appended; the process is written to that file in
/// the container's state directory, and the keeper reads and removes it
/// ([`take_process_file`]). Waits until the
/// keeper reports that the process started in the guest; the keeper is recorded in the
/// state (`exec_keepers`, for `delete`) and returned with the process's guest pid. A
/// keeper that exits first printed its error on its stderr (the caller's):
/// [`KeeperError::KeeperFailed`] with its exit code.
pub async fn spawn_exec_keeper(
    rt: &Runtime,
    id: &str,
    exec_id: &str,
    process: &serde_json::Value,
    mut command: Command,
    stdio: KeeperStdio,
) -> Result<(ProcessRecord, u32), KeeperError> {
    crate::state::validate_id(exec_id)?;
    let file = rt.store.dir(id)?.join(format!("exec-{exec_id}.json"));
    let bytes = serde_json::to_vec(process).unwrap_or_default();
    std::fs::write(&file, bytes).map_err(|source| KeeperError::Io {
        op: "writing the exec's process file",
        source,
    })?;
    command.arg(&file);
    let r = start_exec_keeper(rt, id, exec_id, command, stdio).await;
    if r.is_err() {
        let _ = std::fs::remove_file(&file);
    }
    r
}

/// Reads and removes the process file [`spawn_exec_keeper`] wrote.
pub fn take_process_file(path: &Path) -> Result<serde_json::Value, KeeperError> {
    let bytes = std::fs::read(path).map_err(|source| KeeperError::Io {
        op: "reading the exec's process file",
        source,
    })?;
    let _ = std::fs::remove_file(path);
    serde_json::from_slice(&bytes).map_err(|e| KeeperError::Io {
        op: "parsing the exec's process file",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

async fn start_exec_keeper(
    rt: &Runtime,
    id: &str,
    exec_id: &str,
    mut cmd: Command,
    stdio: KeeperStdio,
) -> Result<(ProcessRecord, u32), KeeperError> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| KeeperError::Spawn {
            what: "exec keeper (its report pipe)",
            source: e.into(),
        })?;
    prepare(&mut cmd, stdio)?;
    let raw = write.as_raw_fd();
    cmd.env(READY_FD_ENV, raw.to_string());
    let clear_cloexec = move || -> std::io::Result<()> {
        // SAFETY: one fcntl call (async-signal-safe) on a descriptor the parent keeps open
        // across the fork (`write`); it only changes that descriptor's flags.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec, after the hygiene hook marked
    // every inherited descriptor close-on-exec, and only clears the flag on the report
    // pipe (one async-signal-safe system call, no allocation).
    unsafe {
        cmd.pre_exec(clear_cloexec);
    }
    let mut child = cmd.spawn().map_err(|source| KeeperError::Spawn {
        what: "exec keeper",
        source,
    })?;
    drop(write);
    let rec = record_of(&child);
    // One line: the guest pid (the keeper may keep the pipe open; it need not close it).
    let report = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut text = String::new();
        let read = std::io::BufReader::new(std::fs::File::from(read)).read_line(&mut text);
        (read, text)
    })
    .await
    .map_err(KeeperError::Blocking)?;
    let guest_pid = match report {
        (Ok(_), text) if !text.trim().is_empty() => text.trim().parse::<u32>().ok(),
        _ => None,
    };
    let Some(guest_pid) = guest_pid else {
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .map_err(KeeperError::Blocking)?
            .map_err(|source| KeeperError::Io {
                op: "waiting for the exec keeper",
                source,
            })?;
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(255);
        return Err(KeeperError::KeeperFailed {
            exec_id: exec_id.to_owned(),
            code,
        });
    };
    drop(child);
    rt.store.update(id, |st| {
        st.exec_keepers.retain(|k| k.is_alive());
        st.exec_keepers.push(rec);
    })?;
    Ok((rec, guest_pid))
}

/// A keeper's guard (see the module documentation): a child holding the read end of a
/// pipe whose write end only the keeper has.
#[derive(Debug)]
pub struct Guard {
    child: std::process::Child,
    release: Option<OwnedFd>,
}

impl Guard {
    /// Starts the guard `cmd` (the binary's `__guard ID [--exec EXEC_ID]`): the pipe
    /// becomes its stdin, its stdout and stderr are /dev/null (it must not hold the
    /// caller's pipes), its own process group.
    pub fn spawn(mut cmd: Command) -> Result<Self, KeeperError> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| KeeperError::Spawn {
                what: "guard (its pipe)",
                source: e.into(),
            })?;
        cmd.stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .env_remove(READY_FD_ENV);
        crate::process::hygiene(&mut cmd);
        let child = cmd.spawn().map_err(|source| KeeperError::Spawn {
            what: "guard",
            source,
        })?;
        Ok(Self {
            child,
            release: Some(write),
        })
    }

    /// The keeper ends normally: tells the guard, and waits (bounded) for it to exit, so
    /// that nothing of the keeper outlives it.
    pub fn release(mut self) {
        if let Some(fd) = self.release.take() {
            let mut f = std::fs::File::from(fd);
            let _ = f.write_all(RELEASE);
        }
        let rec = record_of(&self.child);
        if !rec.wait_gone(GUARD_EXIT) {
            tracing::warn!(
                pid = rec.pid,
                "the guard did not exit when released; killing it"
            );
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The guard's work: waits until its keeper ends; if the keeper did not release it (it
/// was killed), kills the keeper's guest process — `exec_id` empty: every process of
/// container `id`, recording the init's exit.
pub async fn guard(
    rt: &Runtime,
    id: &str,
    exec_id: &str,
    mut input: impl Read + Send + 'static,
) -> Result<(), KeeperError> {
    let got = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        input.read_to_end(&mut buf).map(|_| buf)
    })
    .await
    .map_err(KeeperError::Blocking)?
    .map_err(|source| KeeperError::Io {
        op: "reading the keeper's pipe",
        source,
    })?;
    if got == RELEASE {
        return Ok(());
    }
    tracing::warn!(
        id,
        exec_id,
        "the keeper was killed: killing its process in the guest"
    );
    kill_orphan(rt, id, exec_id).await
}

/// Kills the guest process whose keeper is gone (SIGKILL; the init: the whole container)
/// and records the init's exit.
async fn kill_orphan(rt: &Runtime, id: &str, exec_id: &str) -> Result<(), KeeperError> {
    let st = match rt.store.load(id) {
        Ok(st) => st,
        Err(StateError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let init = exec_id.is_empty();
    if (init && st.exit.is_some()) || vm_gone(rt, id) {
        return Ok(());
    }
    let session = rt.connect(&st).await?;
    if let Err(e) = session
        .signal(id, exec_id, Signal::SIGKILL as u32, init)
        .await
    {
        tracing::info!(id, exec_id, error = %carapace_errors::Chain(&e), "SIGKILL not delivered (process gone?)");
    }
    if !init {
        return Ok(());
    }
    let exit = if st.status == Status::Running {
        match tokio::time::timeout(GUARD_WAIT, session.wait(id, "")).await {
            Ok(Ok(exit)) => exit,
            _ => KILLED,
        }
    } else {
        KILLED
    };
    match rt.record_exit(id, exit) {
        Ok(()) | Err(SandboxError::State(StateError::NotFound { .. })) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
