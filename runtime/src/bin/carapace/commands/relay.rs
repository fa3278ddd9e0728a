//! `__relay` (internal): waits for `start`, then relays the container's stdio until it
//! exits and records the exit.

use std::time::Duration;

use carapace_runtime::sandbox::Runtime;
use carapace_runtime::state::{StateError, Status};
use carapace_runtime::stdio::stream_until_exit;

use super::host_io;

/// How often the relay looks whether the container was started.
const START_POLL: Duration = Duration::from_millis(20);

pub(super) async fn relay(rt: &Runtime, id: &str) -> anyhow::Result<()> {
    // Wait for `start` (or for the container to disappear).
    loop {
        match rt.store.load(id) {
            Ok(st) if st.status == Status::Running => break,
            Ok(st) if rt.live_status(&st) == Status::Stopped => {
                tracing::info!(id, "container stopped before it started; relay exits");
                return Ok(());
            }
            Ok(_) => tokio::time::sleep(START_POLL).await,
            Err(StateError::NotFound { .. }) => {
                tracing::info!(id, "container deleted; relay exits");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    }
    let agent = rt.session(id).await?;
    tracing::info!(id, "relaying stdio");
    let exit = stream_until_exit(&agent, id, "", host_io()).await?;
    tracing::info!(id, status = exit.exit_status, "container exited");
    rt.record_exit(id, exit)?;
    Ok(())
}
