//! OOM events: on each wake-up from `crate::oom` (inotify on memory.events, or a timer),
//! compares every container's `oom_kill` count with the one already reported and queues
//! one event per container whose count grew; GetOomEvent takes them in order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Core;

/// Events queued at most (a host that never asks must not grow the agent).
const MAX_QUEUED: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct OomQueue {
    events: Mutex<VecDeque<String>>,
    notify: tokio::sync::Notify,
}

impl OomQueue {
    fn events(&self) -> MutexGuard<'_, VecDeque<String>> {
        // A queue of whole strings: a panic cannot leave it half-written.
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, id: String) {
        let mut q = self.events();
        if q.len() < MAX_QUEUED {
            q.push_back(id);
        }
        drop(q);
        self.notify.notify_one();
    }

    async fn pop(&self) -> String {
        loop {
            let notified = self.notify.notified();
            if let Some(id) = self.events().pop_front() {
                return id;
            }
            notified.await;
        }
    }
}

/// Starts the task that turns wake-ups into events; it ends with the core.
pub(super) fn spawn_poller(core: &Arc<Core>) {
    let weak = Arc::downgrade(core);
    let watcher = core.oom_watch.clone();
    tokio::spawn(async move {
        loop {
            // Woken by a change of some container's memory.events (inotify), or
            // periodically without inotify.
            watcher.wait().await;
            let Some(core) = weak.upgrade() else { return };
            core.poll_oom();
        }
    });
}

impl Core {
    fn poll_oom(&self) {
        for c in self.containers.all() {
            let Some(cg) = &c.cgroup else { continue };
            let kills = cg.oom_kills();
            let mut seen = c.oom_seen.lock().unwrap_or_else(|p| p.into_inner());
            if kills > *seen {
                *seen = kills;
                drop(seen);
                tracing::info!(container = %c.id, "OOM kill");
                self.oom.push(c.id.clone());
            }
        }
    }

    /// The id of the next container with an OOM kill (waits for one).
    pub async fn next_oom_event(&self) -> String {
        self.oom.pop().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn events_come_out_in_order_and_the_queue_is_bounded() {
        let q = OomQueue::default();
        for i in 0..MAX_QUEUED + 5 {
            q.push(format!("c{i}"));
        }
        assert_eq!(q.events().len(), MAX_QUEUED);
        assert_eq!(q.pop().await, "c0");
        assert_eq!(q.pop().await, "c1");
        let q = Arc::new(OomQueue::default());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        q.push("late".into());
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .unwrap()
                .unwrap(),
            "late"
        );
    }
}
