//! Reaping: the agent is PID 1 (guest) or a child subreaper (host mode), so every
//! container process ends up as its child. One task drains `waitpid(-1)` on SIGCHLD and
//! hands each exit to whoever registered the pid; exits of pids not registered yet (a
//! process that died before its helper reported it) are kept, bounded, until claimed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub signal: i32,
}

impl Exit {
    /// containerd-style status: code, or 128 + signal.
    pub fn status(&self) -> u32 {
        if self.signal != 0 {
            128 + self.signal as u32
        } else {
            self.code as u32
        }
    }
}

/// Exits of unregistered pids kept at most.
const MAX_UNCLAIMED: usize = 4096;

#[derive(Debug, Default)]
struct State {
    watchers: HashMap<i32, watch::Sender<Option<Exit>>>,
    unclaimed: HashMap<i32, Exit>,
    order: VecDeque<i32>,
}

#[derive(Debug, Default, Clone)]
pub struct Reaper {
    state: Arc<Mutex<State>>,
}

impl Reaper {
    /// Starts the reaping task (call once, inside the runtime).
    pub fn start(&self) -> std::io::Result<()> {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                this.reap_all();
                // Also poll now and then: signals coalesce, and a missed one must not
                // leave a zombie.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sig.recv()).await;
            }
        });
        Ok(())
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.record(pid.as_raw(), Exit { code, signal: 0 })
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.record(
                    pid.as_raw(),
                    Exit {
                        code: 0,
                        signal: sig as i32,
                    },
                ),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn record(&self, pid: i32, exit: Exit) {
        tracing::debug!(pid, ?exit, "reaped");
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = st.watchers.remove(&pid) {
            let _ = tx.send(Some(exit));
            return;
        }
        st.unclaimed.insert(pid, exit);
        st.order.push_back(pid);
        while st.order.len() > MAX_UNCLAIMED {
            if let Some(old) = st.order.pop_front() {
                st.unclaimed.remove(&old);
            }
        }
    }

    /// Watches for the exit of `pid`.
    pub fn register(&self, pid: i32) -> watch::Receiver<Option<Exit>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(exit) = st.unclaimed.remove(&pid) {
            st.order.retain(|p| *p != pid);
            return watch::channel(Some(exit)).1;
        }
        let (tx, rx) = watch::channel(None);
        st.watchers.insert(pid, tx);
        rx
    }
}
