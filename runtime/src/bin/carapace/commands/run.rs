//! `run`: create, start, stream the stdio, wait and delete; exits with the container's
//! status. With `--detach` (or a console socket) the init's keeper carries the stdio.

use std::time::Duration;

use carapace_runtime::keeper::{self, Signals};
use carapace_runtime::sandbox::Runtime;
use carapace_runtime::state::Status;
use carapace_runtime::stdio::{RawMode, forward_resizes, terminal_size};

use super::{create::create, host_io};
use crate::cli::{Global, RunArgs};

/// How often an attached `run` with a keeper looks whether the container stopped.
const EXIT_POLL: Duration = Duration::from_millis(50);

pub(super) async fn run(g: &Global, rt: &Runtime, a: &RunArgs) -> anyhow::Result<u8> {
    let id = &a.create.id;
    if a.detach || a.create.console_socket.is_some() {
        // The keeper carries the stdio (or the console socket's terminal).
        let (_, session) = create(g, rt, &a.create, true).await?;
        if let Err(e) = rt.start(id, Some(&session)).await {
            let _ = rt.delete(id, true, Some(&session)).await;
            return Err(e.into());
        }
        if a.detach {
            return Ok(0);
        }
        let exit = loop {
            let st = rt.store.load(id)?;
            if rt.live_status(&st) == Status::Stopped {
                break st.exit.map(|e| e.status).unwrap_or(255);
            }
            tokio::time::sleep(EXIT_POLL).await;
        };
        rt.delete(id, true, Some(&session)).await?;
        return Ok(u8::try_from(exit).unwrap_or(u8::MAX));
    }
    let (st, agent) = create(g, rt, &a.create, false).await?;
    let result = async {
        // the container's own process (exec_process would override `terminal`)
        let guest_spec = rt.paths(&st.id)?.guest_spec;
        let tty = std::fs::read(&guest_spec)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.pointer("/process/terminal").and_then(|t| t.as_bool()))
            .unwrap_or(false);
        // The terminal exists from create on: size it before the process runs, so its
        // first look at the window size sees the real one (retried after start if the
        // agent refuses a not yet started process).
        let size = if tty { terminal_size() } else { None };
        let sized = match size {
            Some((rows, cols)) => agent.resize(id, "", rows, cols).await.is_ok(),
            None => false,
        };
        // From the start on, signals to `run` go to the container's init, as runc does.
        let mut signals = Signals::catch()?;
        rt.start(id, Some(&agent)).await?;
        let _raw = if tty { RawMode::stdin() } else { None };
        if let Some((rows, cols)) = size {
            if !sized {
                let _ = agent.resize(id, "", rows, cols).await;
            }
            forward_resizes(agent.clone(), id.clone(), String::new());
        }
        let exit = keeper::relay(&agent, id, "", host_io(), &mut signals).await?;
        rt.record_exit(id, exit)?;
        anyhow::Ok(keeper::exit_code(&exit))
    }
    .await;
    // No longer its keeper: the delete must not stop this very process.
    let _ = rt.store.update(id, |st| st.io_relay = None);
    let deleted = rt.delete(id, true, Some(&agent)).await;
    let code = result?;
    deleted?;
    Ok(code)
}
