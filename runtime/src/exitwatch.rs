//! Waiting, without polling, for a process that is not our child to end: a pidfd becomes
//! readable when its process exits.

use std::io;

use rustix::process::{Pid, PidfdFlags, pidfd_open};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::process::ProcessRecord;

/// Resolves once the process `rec` names has ended (at once when it is gone already, or
/// its pid now names another process).
pub async fn exited(rec: ProcessRecord) -> io::Result<()> {
    let Some(pid) = Pid::from_raw(rec.pid) else {
        return Ok(());
    };
    let fd = match pidfd_open(pid, PidfdFlags::NONBLOCK) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // Opened after the pid could have been reused: the record's start time says whether
    // the pidfd names the process meant.
    if !rec.is_alive() {
        return Ok(());
    }
    // SAFETY: the pidfd is moved into the AsyncFd, which owns it from here on: nothing
    // else closes or replaces it while it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let _ready = fd.readable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn resolves_when_the_process_ends_and_not_before() {
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let rec = ProcessRecord::of(child.id() as i32).unwrap();
        let mut waiting = Box::pin(exited(rec));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut waiting)
                .await
                .is_err(),
            "resolved while the process runs"
        );
        child.kill().unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("resolves once it ended")
            .unwrap();
        let _ = child.wait();
        // gone already: at once
        tokio::time::timeout(Duration::from_secs(1), exited(rec))
            .await
            .expect("at once")
            .unwrap();
    }
}
