//! OCI hooks: the programs a spec's `hooks` names, run on the host at the points of the
//! lifecycle the runtime spec gives them, each with the container's state JSON on stdin.
//!
//! Where they run, for a container whose namespaces live inside a VM:
//! - `prestart`, `createRuntime`: on the host, in the runtime's namespaces, once `create`
//!   has the container created in the guest (status `creating`), as runc runs them;
//! - `createContainer`: the spec runs it in the container's namespaces with a path resolved
//!   in the runtime's; those namespaces are inside the guest, out of the host's reach, so it
//!   runs on the host, in the runtime's namespaces, right after `createRuntime`;
//! - `startContainer`: its path resolves inside the container, which only the guest can
//!   see: the guest runs it (the spec the guest gets keeps this list only; the container's
//!   init runs each hook in the container's namespaces, with its identity, after `start` and
//!   before the process is executed; a failing hook fails the start);
//! - `poststart` (status `running`) after `start`, `poststop` (status `stopped`) once
//!   `delete` removed everything: a failing one is logged and the rest still run.
//!
//! Hooks come from the spec's author (containerd, the kubelet's configuration, an admin),
//! never from the guest: they are trusted like the runtime itself. Each runs with exactly
//! the environment it names, its own process group, no inherited descriptor above stderr,
//! and its `timeout` (none if the spec gives none, as runc); its output is kept (the last
//! [`OUTPUT_TAIL`] bytes) for the log and the error.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use oci_spec::runtime::{Hook, Hooks};

use crate::state::OciState;

/// How much of a hook's stdout and stderr is kept for the log and the error.
pub const OUTPUT_TAIL: usize = 4096;

/// The points of the lifecycle hooks run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    /// `prestart` (deprecated by the spec, still used: Docker, NVIDIA's toolkit).
    Prestart,
    /// `createRuntime`.
    CreateRuntime,
    /// `createContainer` (on the host: see the module doc).
    CreateContainer,
    /// `poststart`.
    Poststart,
    /// `poststop`.
    Poststop,
}

impl HookKind {
    /// The spec's name of the list.
    pub fn name(self) -> &'static str {
        match self {
            Self::Prestart => "prestart",
            Self::CreateRuntime => "createRuntime",
            Self::CreateContainer => "createContainer",
            Self::Poststart => "poststart",
            Self::Poststop => "poststop",
        }
    }

    /// The hooks of this kind in `hooks`.
    pub fn of(self, hooks: &Hooks) -> &[Hook] {
        let list = match self {
            Self::Prestart => hooks.prestart(),
            Self::CreateRuntime => hooks.create_runtime(),
            Self::CreateContainer => hooks.create_container(),
            Self::Poststart => hooks.poststart(),
            Self::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }
}

/// A hook that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The pid hooks would be given lives in the host's network namespace.
    #[error(
        "the spec's hooks would be given pid {pid} as the container's, a process in the host's \
         network namespace (the VMM runs without its jail): a hook setting up the container's \
         network there (docker's does) would change the host's; turn [jail] enabled back on"
    )]
    HostNetwork {
        /// The pid in the state.
        pid: i32,
    },
    /// The program could not be started.
    #[error("{kind} hook {path} could not be started")]
    Spawn {
        /// Which list.
        kind: &'static str,
        /// The program.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// It exited unsuccessfully.
    #[error("{kind} hook {path} failed ({status}){}", output_suffix(.output))]
    Failed {
        /// Which list.
        kind: &'static str,
        /// The program.
        path: PathBuf,
        /// How it ended.
        status: ExitStatus,
        /// The end of what it printed.
        output: String,
    },
    /// It ran past its timeout and was killed.
    #[error("{kind} hook {path} did not finish within its timeout of {secs} s; killed{}", output_suffix(.output))]
    TimedOut {
        /// Which list.
        kind: &'static str,
        /// The program.
        path: PathBuf,
        /// The timeout.
        secs: u64,
        /// The end of what it printed.
        output: String,
    },
}

fn output_suffix(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", output.trim())
    }
}

/// What is wrong with a spec's `hooks`, for the spec error naming the field.
pub fn check(hooks: &Hooks) -> Result<(), (String, String)> {
    let kinds = [
        HookKind::Prestart,
        HookKind::CreateRuntime,
        HookKind::CreateContainer,
        HookKind::Poststart,
        HookKind::Poststop,
    ];
    let start = (
        "startContainer",
        hooks.start_container().as_deref().unwrap_or_default(),
    );
    let lists = kinds.iter().map(|k| (k.name(), k.of(hooks))).chain([start]);
    for (name, list) in lists {
        for (i, hook) in list.iter().enumerate() {
            let field = format!("hooks.{name}[{i}]");
            if !hook.path().is_absolute() {
                return Err((
                    format!("{field}.path"),
                    format!("{} is not an absolute path", hook.path().display()),
                ));
            }
            if hook.timeout().is_some_and(|t| t <= 0) {
                return Err((
                    format!("{field}.timeout"),
                    "must be greater than zero".into(),
                ));
            }
            if let Some(bad) = hook
                .env()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|e| !e.contains('=') || e.contains('\0'))
            {
                return Err((format!("{field}.env"), format!("{bad:?} is not KEY=VALUE")));
            }
        }
    }
    Ok(())
}

/// Refuses to give hooks a pid in the runtime's own (the host's) network namespace. Hooks
/// take `/proc/<pid>/ns/net` for the container's network (docker's prestart hook configures
/// its networks there): with the jail on, the VMM's pid names a namespace of its own; with
/// it off, the host's.
pub fn check_pid_isolated(state: &OciState) -> Result<(), HookError> {
    use std::os::unix::fs::MetadataExt;
    let ns = |path: String| std::fs::metadata(path).map(|m| (m.dev(), m.ino()));
    match (
        ns(format!("/proc/{}/ns/net", state.pid)),
        ns("/proc/self/ns/net".into()),
    ) {
        (Ok(theirs), Ok(ours)) if theirs != ours => Ok(()),
        // the same namespace, or one that cannot be told apart: not isolated
        _ => Err(HookError::HostNetwork { pid: state.pid }),
    }
}

/// Runs the hooks of `kind` in order with `state` on their stdin; stops at the first that
/// fails.
pub fn run(kind: HookKind, hooks: &Hooks, state: &OciState) -> Result<(), HookError> {
    let list = kind.of(hooks);
    if list.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec(state).unwrap_or_default();
    for hook in list {
        run_one(kind, hook, &json)?;
    }
    Ok(())
}

/// Runs the hooks of `kind` where a failure must not stop the lifecycle (`poststart`,
/// `poststop`): each one that fails is logged, the next still runs.
pub fn run_logged(kind: HookKind, hooks: &Hooks, state: &OciState) {
    let json = serde_json::to_vec(state).unwrap_or_default();
    for hook in kind.of(hooks) {
        if let Err(e) = run_one(kind, hook, &json) {
            tracing::warn!(id = state.id, error = %carapace_errors::chain(&e), "hook failed; going on");
        }
    }
}

fn run_one(kind: HookKind, hook: &Hook, state: &[u8]) -> Result<(), HookError> {
    let path = hook.path().clone();
    let mut cmd = Command::new(&path);
    let args = hook.args().as_deref().unwrap_or_default();
    if let Some((argv0, rest)) = args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().as_deref().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir("/")
        .process_group(0);
    crate::process::hygiene(&mut cmd);
    tracing::info!(hook = kind.name(), path = %path.display(), "running hook");
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        kind: kind.name(),
        path: path.clone(),
        source,
    })?;
    let pid = child.id();
    // stdin in a thread of its own: a hook that does not read it must not block us, and
    // one that exits early closes it (EPIPE is then expected).
    let stdin = child.stdin.take().map(|mut w| {
        let state = state.to_vec();
        std::thread::spawn(move || drop(w.write_all(&state)))
    });
    let output = Tail::collect(child.stdout.take(), child.stderr.take());
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let timeout = hook
        .timeout()
        .and_then(|t| u64::try_from(t).ok())
        .map(Duration::from_secs);
    let waited = match timeout {
        Some(t) => rx.recv_timeout(t).ok(),
        None => rx.recv().ok(),
    };
    let Some(status) = waited else {
        // Timed out: the whole process group goes, then its exit is reaped.
        if let Ok(pgid) = i32::try_from(pid) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = waiter.join();
        let secs = timeout.map_or(0, |t| t.as_secs());
        return Err(HookError::TimedOut {
            kind: kind.name(),
            path,
            secs,
            output: output.finish(),
        });
    };
    let _ = waiter.join();
    if let Some(t) = stdin {
        let _ = t.join();
    }
    let output = output.finish();
    match status {
        Ok(s) if s.success() => {
            if !output.trim().is_empty() {
                tracing::debug!(hook = kind.name(), path = %path.display(), output = output.trim(), "hook output");
            }
            Ok(())
        }
        Ok(status) => Err(HookError::Failed {
            kind: kind.name(),
            path,
            status,
            output,
        }),
        Err(source) => Err(HookError::Spawn {
            kind: kind.name(),
            path,
            source,
        }),
    }
}

/// The last [`OUTPUT_TAIL`] bytes of a hook's stdout and of its stderr, read by two threads.
struct Tail {
    rx: mpsc::Receiver<(usize, Vec<u8>)>,
    streams: usize,
}

/// How long, once a hook exited, its output may take to reach its end: a descendant it left
/// running with the pipes open is not waited for past this.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

impl Tail {
    fn collect(
        stdout: Option<std::process::ChildStdout>,
        stderr: Option<std::process::ChildStderr>,
    ) -> Self {
        fn keep_tail(mut r: impl Read) -> Vec<u8> {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        kept.extend_from_slice(&buf[..n]);
                        if kept.len() > OUTPUT_TAIL {
                            kept.drain(..kept.len() - OUTPUT_TAIL);
                        }
                    }
                }
            }
            kept
        }
        let (tx, rx) = mpsc::channel();
        let mut streams = 0;
        if let Some(o) = stdout {
            let tx = tx.clone();
            std::thread::spawn(move || drop(tx.send((0, keep_tail(o)))));
            streams += 1;
        }
        if let Some(e) = stderr {
            std::thread::spawn(move || drop(tx.send((1, keep_tail(e)))));
            streams += 1;
        }
        Self { rx, streams }
    }

    /// Both tails, stdout first, as far as they arrive within [`OUTPUT_GRACE`].
    fn finish(self) -> String {
        let deadline = std::time::Instant::now() + OUTPUT_GRACE;
        let mut parts = [Vec::new(), Vec::new()];
        for _ in 0..self.streams {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((i, bytes)) => parts[i] = bytes,
                Err(_) => break,
            }
        }
        parts
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
}

#[cfg(test)]
mod tests;
