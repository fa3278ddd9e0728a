//! `create`: boot the sandbox VM and create the container in it; a background `__relay`
//! process carries its stdio (or the console socket's terminal) until it exits.

use std::path::Path;

use anyhow::{Context, bail};
use carapace_runtime::agent::Session;
use carapace_runtime::console;
use carapace_runtime::oci::Bundle;
use carapace_runtime::process::ProcessRecord;
use carapace_runtime::sandbox::Runtime;
use carapace_runtime::state::SandboxState;

use super::write_pid_file;
use crate::cli::{CreateArgs, Global, LogFormat};

/// Creates the container (with its relay when `relay`); returns its state and the session
/// to its agent. On error nothing is left.
pub(super) async fn create(
    g: &Global,
    rt: &Runtime,
    a: &CreateArgs,
    relay: bool,
) -> anyhow::Result<(SandboxState, Session)> {
    let bundle = Bundle::load(&a.bundle)?;
    if let Some(sock) = &a.console_socket
        && bundle
            .spec
            .pointer("/process/terminal")
            .and_then(|t| t.as_bool())
            != Some(true)
    {
        bail!(
            "--console-socket {} given but process.terminal is not true in {}",
            sock.display(),
            bundle.spec_path.display()
        );
    }
    let (st, session) = rt.create(&a.id, &bundle).await?;
    let finish = || -> anyhow::Result<()> {
        if relay {
            let terminal = match &a.console_socket {
                Some(sock) => Some(console::hand_off(sock)?),
                None => None,
            };
            spawn_relay(g, rt, &a.id, terminal)?;
        }
        if let Some(p) = &a.pid_file {
            write_pid_file(p, st.vmm.map(|v| v.pid).unwrap_or(0))?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        if let Err(d) = rt.delete(&a.id, true, Some(&session)).await {
            return Err(e.context(format!("cleanup after the failure also failed: {d}")));
        }
        return Err(e);
    }
    Ok((st, session))
}

/// Arguments that make a child `carapace` see the same runtime as this one.
fn global_args(g: &Global, root: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec!["--root".into(), root.into()];
    if let Some(c) = &g.config {
        a.extend(["--config".into(), c.into()]);
    }
    if let Some(l) = &g.log {
        a.extend(["--log".into(), l.into()]);
    }
    if g.log_format == LogFormat::Json {
        a.extend(["--log-format".into(), "json".into()]);
    }
    if g.debug {
        a.push("--debug".into());
    }
    if let Some(h) = &g.host_agent {
        a.extend(["--host-agent".into(), h.into()]);
    }
    a
}

/// Starts the stdio relay for a created container: on `terminal` (the console socket's
/// pty slave) if given, else on this process's stdio.
fn spawn_relay(
    g: &Global,
    rt: &Runtime,
    id: &str,
    terminal: Option<std::os::fd::OwnedFd>,
) -> anyhow::Result<ProcessRecord> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating the carapace binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(global_args(g, rt.store.root()))
        .arg("__relay")
        .arg(id)
        .process_group(0);
    if let Some(t) = terminal {
        let dup = |fd: &std::os::fd::OwnedFd| fd.try_clone().context("duplicating the terminal");
        cmd.stdin(dup(&t)?).stdout(dup(&t)?).stderr(t);
    }
    let child = cmd.spawn().context("starting the stdio relay")?;
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    drop(child);
    let rec = ProcessRecord::of(pid).unwrap_or(ProcessRecord { pid, start_time: 0 });
    rt.store.update(id, |st| st.io_relay = Some(rec))?;
    Ok(rec)
}
