//! `start`, `state`, `kill`, `delete` and `ps`: one library call each, through a session
//! opened for the command.

use carapace_runtime::sandbox::Runtime;

use super::{parse_signal, print_json};
use crate::cli::Format;

/// `start`: start the created container's process.
pub(super) async fn start(rt: &Runtime, id: &str) -> anyhow::Result<()> {
    rt.start(id, None).await?;
    Ok(())
}

/// `state`: the OCI state JSON.
pub(super) fn state(rt: &Runtime, id: &str) -> anyhow::Result<()> {
    print_json(&rt.state(id)?)
}

/// `kill`: signal the init (or every process with `all`).
pub(super) async fn kill(rt: &Runtime, id: &str, signal: &str, all: bool) -> anyhow::Result<()> {
    rt.kill(id, parse_signal(signal)?, all, None).await?;
    Ok(())
}

/// `delete`: stop the VM (or leave the pod's), undo the mounts, remove the state.
pub(super) async fn delete(rt: &Runtime, id: &str, force: bool) -> anyhow::Result<()> {
    rt.delete(id, force, None).await?;
    Ok(())
}

/// `ps`: the guest pids of the container's processes.
pub(super) async fn ps(rt: &Runtime, id: &str, format: Format) -> anyhow::Result<()> {
    let pids = rt.ps(id, None).await?;
    match format {
        Format::Json => print_json(&pids)?,
        Format::Table => {
            println!("PID");
            for p in pids {
                println!("{p}");
            }
        }
    }
    Ok(())
}
