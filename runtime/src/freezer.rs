//! `pause` and `resume` of a container from the CLI: the agent freezes or thaws the
//! container's cgroup in the guest (every process of it; the VM and the keepers go on),
//! and the state records it, so that `state` reports `paused`.
//!
//! Only a running container can be paused and only a paused one resumed; both hold the
//! container's state lock, so two concurrent calls cannot both see it running. Signals
//! still reach a paused container (delivered when it is thawed; SIGKILL at once), and
//! `delete --force` removes it (the agent thaws before it kills).

use crate::agent::Session;
use crate::sandbox::{Runtime, SandboxError};
use crate::state::Status;

/// Freezes or thaws container `id` through `session` (or a new one).
async fn set_frozen(
    rt: &Runtime,
    id: &str,
    frozen: bool,
    session: Option<&Session>,
) -> Result<(), SandboxError> {
    let op = if frozen { "pause" } else { "resume" };
    let _lock = rt.store.lock(id)?;
    let mut st = rt.store.load(id)?;
    let status = rt.live_status(&st);
    let is = match status {
        Status::Running if st.paused => "paused",
        s => s.as_str(),
    };
    let want = if frozen { "running" } else { "paused" };
    if is != want {
        return Err(SandboxError::WrongStatus {
            id: id.to_owned(),
            status: is,
            op,
        });
    }
    let agent = match session {
        Some(s) => s.clone(),
        None => rt.connect(&st).await?,
    };
    if frozen {
        agent.pause(id).await?;
    } else {
        agent.resume(id).await?;
    }
    st.paused = frozen;
    rt.store.save(&st)?;
    tracing::info!(id, op, "done");
    Ok(())
}

/// Freezes running container `id` (`carapace pause`).
pub async fn pause(rt: &Runtime, id: &str, session: Option<&Session>) -> Result<(), SandboxError> {
    set_frozen(rt, id, true, session).await
}

/// Thaws paused container `id` (`carapace resume`).
pub async fn resume(rt: &Runtime, id: &str, session: Option<&Session>) -> Result<(), SandboxError> {
    set_frozen(rt, id, false, session).await
}

#[cfg(test)]
mod tests;
