//! OCI `startContainer` hooks, run by the container's init in the container's namespaces
//! (its mount namespace: the program is the container's, its path resolved in the
//! container's root) after `start` and before the container's process is executed, with
//! the process's identity, as runc runs them. Each gets the container's state on stdin
//! (status `created`, the init's pid in the guest, `bundle` the guest directory above the
//! container's root) and writes to the container's stdout and stderr. A hook that fails, or
//! outlives its `timeout`, fails the start: the process is never executed.
//!
//! The runtime checked the list (absolute paths, positive timeouts, KEY=VALUE env) before
//! it sent the spec; a spec reaching the agent some other way is held to the same.

use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Spec};

use crate::init::InitError;

/// How often a hook with a timeout is looked at.
const POLL: Duration = Duration::from_millis(10);

/// The state a hook gets on stdin.
pub fn state(spec: &Spec, id: &str) -> serde_json::Value {
    let bundle = spec
        .root()
        .as_ref()
        .and_then(|r| r.path().parent().map(Path::to_path_buf))
        .unwrap_or_default();
    serde_json::json!({
        "ociVersion": spec.version(),
        "id": id,
        "status": "created",
        "pid": std::process::id(),
        "bundle": bundle,
        "annotations": spec.annotations().clone().unwrap_or_default(),
    })
}

/// Runs `spec`'s startContainer hooks in order, each with `state` on stdin; stops at the
/// first that fails.
pub fn run(spec: &Spec, state: &serde_json::Value) -> Result<(), InitError> {
    let hooks = spec
        .hooks()
        .as_ref()
        .and_then(|h| h.start_container().clone())
        .unwrap_or_default();
    let input = serde_json::to_vec(state).unwrap_or_default();
    for (i, hook) in hooks.iter().enumerate() {
        run_one(i, hook, &input)?;
    }
    Ok(())
}

fn run_one(i: usize, hook: &Hook, input: &[u8]) -> Result<(), InitError> {
    let path = hook.path();
    let what = format!("hooks.startContainer[{i}] {}", path.display());
    if !path.is_absolute() {
        return Err(InitError::Config(format!("{what}: not an absolute path")));
    }
    let mut cmd = Command::new(path);
    if let Some((argv0, rest)) = hook.args().as_deref().and_then(<[String]>::split_first) {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for e in hook.env().as_deref().unwrap_or_default() {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| InitError::Config(format!("{what}: env {e:?} is not KEY=VALUE")))?;
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| InitError::Io {
            op: format!("running {what}"),
            source,
        })?;
    // stdin from a thread of its own: a hook that does not read a state larger than the
    // pipe's buffer must not keep its timeout from being enforced (a hook that closes
    // stdin is no error)
    let writer = child.stdin.take().map(|mut stdin| {
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        })
    });
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t.unsigned_abs()));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                return Err(InitError::Io {
                    op: format!("waiting for {what}"),
                    source,
                });
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(InitError::Hook(format!(
                "{what} did not finish within its timeout of {} s; killed",
                hook.timeout().unwrap_or_default()
            )));
        }
        std::thread::sleep(POLL);
    };
    // the hook exited: its end of the pipe is gone, so the writer has returned
    if let Some(w) = writer {
        let _ = w.join();
    }
    if status.success() {
        return Ok(());
    }
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => status.to_string(),
    };
    Err(InitError::Hook(format!("{what} {how}")))
}
