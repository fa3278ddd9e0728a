//! `exec`: run a new process in a running container and exit with its status.

use anyhow::{Context, bail};
use carapace_runtime::sandbox::{ExecOptions, Runtime};
use carapace_runtime::stdio::{RawMode, forward_resizes, stream_until_exit, terminal_size};

use super::{host_io, status_code, write_pid_file};
use crate::cli::ExecArgs;

pub(super) async fn exec(rt: &Runtime, a: &ExecArgs) -> anyhow::Result<u8> {
    let process = match &a.process {
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
    let tty = process
        .get("terminal")
        .and_then(|t| t.as_bool())
        .unwrap_or(false);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let exec_id = format!("exec-{}-{nanos}", std::process::id());
    let (agent, pid) = rt.exec(&a.id, &exec_id, &process, None).await?;
    if let Some(p) = &a.pid_file {
        write_pid_file(p, pid)?;
    }
    if a.detach {
        return Ok(0);
    }
    let _raw = if tty { RawMode::stdin() } else { None };
    if tty && let Some((rows, cols)) = terminal_size() {
        let _ = agent.resize(&a.id, &exec_id, rows, cols).await;
        forward_resizes(agent.clone(), a.id.clone(), exec_id.clone());
    }
    let exit = stream_until_exit(&agent, &a.id, &exec_id, host_io()).await?;
    Ok(status_code(exit.exit_status))
}
