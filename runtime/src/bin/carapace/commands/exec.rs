//! `exec`: run a new process in a running container. In the foreground this command
//! relays its stdio, forwards signals and exits with its status; with `--detach` a keeper
//! (`__keep --exec`, [`carapace_runtime::keeper`]) does, and `--pid-file` names it. Never
//! is a guest pid handed out.

use anyhow::{Context, bail};
use carapace_runtime::console;
use carapace_runtime::exec_identity::{self, Identity};
use carapace_runtime::keeper::{self, KeeperStdio, Signals};
use carapace_runtime::sandbox::{ExecOptions, Runtime};
use carapace_runtime::stdio::{HostIo, RawMode, forward_resizes, terminal_size};

use super::{host_io, reexec_keeper, write_pid_file};
use crate::cli::{ExecArgs, Global};

pub(super) async fn exec(g: &Global, rt: &Runtime, a: &ExecArgs) -> anyhow::Result<u8> {
    let mut process = match &a.process {
        Some(p) => {
            let text = std::fs::read(p)
                .with_context(|| format!("reading process file {}", p.display()))?;
            serde_json::from_slice::<serde_json::Value>(&text)
                .with_context(|| format!("parsing process file {}", p.display()))?
        }
        None => {
            if a.command.is_empty() {
                bail!("exec needs a command (or --process FILE)");
            }
            rt.exec_process(
                &a.id,
                &ExecOptions {
                    args: a.command.clone(),
                    env: a.env.clone(),
                    cwd: a.cwd.clone(),
                    tty: a.tty,
                },
            )?
        }
    };
    exec_identity::apply(
        &mut process,
        &Identity {
            user: a.user.clone(),
            additional_gids: a.additional_gids.clone(),
            caps: a.caps.clone(),
            no_new_privileges: a.no_new_privs,
            preserve_fds: a.preserve_fds,
        },
    )?;
    let tty = process
        .get("terminal")
        .and_then(|t| t.as_bool())
        .unwrap_or(false);
    if let Some(sock) = &a.console_socket
        && !tty
    {
        bail!(
            "--console-socket {} given but the process has no terminal (use -t, or \
             terminal: true in --process)",
            sock.display()
        );
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let exec_id = format!("exec-{}-{nanos}", std::process::id());
    let terminal = match &a.console_socket {
        Some(sock) => Some(console::hand_off(sock)?),
        None => None,
    };
    if a.detach {
        let stdio = match terminal {
            Some(t) => KeeperStdio::Terminal(t),
            None => KeeperStdio::Inherit,
        };
        let mut command = reexec_keeper(g, rt, &a.id)?;
        command
            .arg("__keep")
            .arg(&a.id)
            .arg("--exec")
            .arg(&exec_id)
            .arg("--process");
        let (keeper_rec, guest_pid) =
            keeper::spawn_exec_keeper(rt, &a.id, &exec_id, &process, command, stdio).await?;
        tracing::info!(
            id = a.id,
            exec_id,
            guest_pid,
            keeper = keeper_rec.pid,
            "exec started"
        );
        if let Some(p) = &a.pid_file
            && let Err(e) = write_pid_file(p, keeper_rec.pid)
        {
            // Nobody would know the process: its keeper goes, and its guard kills it.
            let _ = keeper_rec.signal("exec keeper", nix::sys::signal::Signal::SIGKILL);
            return Err(e);
        }
        return Ok(0);
    }
    let mut signals = Signals::catch()?;
    let (agent, _guest_pid) = rt.exec(&a.id, &exec_id, &process, None).await?;
    // Once the process runs (as runc): this command stands for it.
    if let Some(p) = &a.pid_file
        && let Err(e) = write_pid_file(p, std::process::id())
    {
        let kill = nix::sys::signal::Signal::SIGKILL as u32;
        let _ = agent.signal(&a.id, &exec_id, kill, false).await;
        return Err(e);
    }
    let io = match terminal {
        Some(t) => terminal_io(t)?,
        None => {
            let _raw = if tty { RawMode::stdin() } else { None };
            if tty && let Some((rows, cols)) = terminal_size() {
                let _ = agent.resize(&a.id, &exec_id, rows, cols).await;
                forward_resizes(agent.clone(), a.id.clone(), exec_id.clone());
            }
            let exit = keeper::relay(&agent, &a.id, &exec_id, host_io(), &mut signals).await?;
            return Ok(keeper::exit_code(&exit));
        }
    };
    let exit = keeper::relay(&agent, &a.id, &exec_id, io, &mut signals).await?;
    Ok(keeper::exit_code(&exit))
}

/// The console socket's terminal as a process's stdio.
fn terminal_io(t: std::os::fd::OwnedFd) -> anyhow::Result<HostIo> {
    let dup = || t.try_clone().context("duplicating the terminal");
    Ok(HostIo {
        stdin_release: None,
        stdin: Some(Box::new(std::fs::File::from(dup()?))),
        stdout: Box::new(tokio::fs::File::from_std(std::fs::File::from(dup()?))),
        stderr: Box::new(tokio::fs::File::from_std(std::fs::File::from(t))),
    })
}
