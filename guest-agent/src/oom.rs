//! Wake-ups for OOM detection: inotify on each container's `memory.events` (cgroup v2
//! raises a file-modified event whenever a counter in it changes), so an OOM kill is seen
//! at once instead of at the next poll. The service still decides what an event is (it
//! compares `oom_kill` with the count already reported); this module only says "look
//! now". Without inotify (or for a file that cannot be watched) it falls back to a
//! periodic wake-up.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// Wake-up period when inotify is not available.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Errors watching a file.
#[derive(Debug, thiserror::Error)]
pub enum OomWatchError {
    #[error("inotify watch on {path}")]
    Watch {
        path: std::path::PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// nix's Inotify implements AsFd only; tokio's AsyncFd wants AsRawFd.
#[derive(Debug)]
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Source of "memory.events may have changed" wake-ups.
#[derive(Debug)]
pub struct OomWatcher {
    inotify: Option<AsyncFd<InotifyFd>>,
}

impl OomWatcher {
    /// An inotify-based watcher, or a polling one when inotify cannot be set up (logged).
    /// Must be called inside a tokio runtime.
    pub fn new() -> Self {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(std::io::Error::from)
            .and_then(|i| {
                // SAFETY: the Inotify is moved into the AsyncFd and owns its descriptor:
                // it stays open, refers to the same inotify instance and keeps its number
                // until the AsyncFd drops it.
                unsafe { AsyncFd::register(InotifyFd(i)) }.map_err(|e| e.into_parts().1)
            });
        match inotify {
            Ok(fd) => Self { inotify: Some(fd) },
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable: polling memory.events");
                Self { inotify: None }
            }
        }
    }

    /// Whether wake-ups come from inotify (else from a timer).
    pub fn uses_inotify(&self) -> bool {
        self.inotify.is_some()
    }

    /// Watches `file` for modifications. The watch goes away by itself when the file does
    /// (cgroup removal). Without inotify this is a no-op: the timer covers every file.
    pub fn watch(&self, file: &Path) -> Result<(), OomWatchError> {
        let Some(fd) = &self.inotify else {
            return Ok(());
        };
        fd.get_ref()
            .0
            .add_watch(file, AddWatchFlags::IN_MODIFY)
            .map(drop)
            .map_err(|source| OomWatchError::Watch {
                path: file.to_owned(),
                source,
            })
    }

    /// Waits until some watched file was modified (events are drained), or one poll
    /// interval without inotify.
    pub async fn wait(&self) {
        let Some(fd) = &self.inotify else {
            tokio::time::sleep(POLL_INTERVAL).await;
            return;
        };
        loop {
            let mut guard = match fd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "inotify wait failed; polling once");
                    tokio::time::sleep(POLL_INTERVAL).await;
                    return;
                }
            };
            match guard.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => {
                    // Drain what is queued so one burst gives one wake-up.
                    while let Ok(more) = guard.get_inner().0.read_events() {
                        if more.is_empty() {
                            break;
                        }
                    }
                    guard.clear_ready();
                    return;
                }
                Ok(_) | Err(nix::Error::EAGAIN) => guard.clear_ready(),
                Err(e) => {
                    tracing::warn!(error = %e, "reading inotify events; polling once");
                    guard.clear_ready();
                    tokio::time::sleep(POLL_INTERVAL).await;
                    return;
                }
            }
        }
    }
}

impl Default for OomWatcher {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_up_on_modification_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.events");
        std::fs::write(&file, "oom_kill 0\n").unwrap();
        let w = OomWatcher::new();
        assert!(w.uses_inotify());
        w.watch(&file).unwrap();
        // Nothing changed: no wake-up.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), w.wait())
                .await
                .is_err()
        );
        std::fs::write(&file, "oom_kill 1\n").unwrap();
        tokio::time::timeout(Duration::from_secs(10), w.wait())
            .await
            .expect("woken by the modification");
        // The burst was drained: quiet again.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), w.wait())
                .await
                .is_err()
        );
        assert!(matches!(
            w.watch(&dir.path().join("missing")),
            Err(OomWatchError::Watch { .. })
        ));
    }
}
