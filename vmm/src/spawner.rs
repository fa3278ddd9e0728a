//! The thread that creates device worker threads.
//!
//! A device is activated on the vCPU thread whose MMIO write set DRIVER_OK, and its worker
//! thread would inherit that vCPU's seccomp filter; filters stack, so the vCPU's
//! allow-list would have to hold everything every worker does. Instead, once [`start`]ed
//! (the VMM does it before its vCPUs run, when seccomp filters are on), [`spawn`] hands
//! the new thread's body to this one thread, which runs under the union of the workers'
//! lists ([`ThreadKind::Spawner`]) and creates it; the worker then installs its own
//! narrower list. Without [`start`] (unit tests), [`spawn`] creates the thread directly.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;

use crate::seccomp::{self, ThreadKind};

type Body = Box<dyn FnOnce() + Send>;

struct Request {
    name: String,
    body: Body,
    reply: SyncSender<std::io::Result<JoinHandle<()>>>,
}

static SPAWNER: OnceLock<Sender<Request>> = OnceLock::new();

/// Threads the spawner thread created.
static SPAWNED: AtomicU64 = AtomicU64::new(0);

/// Starts the spawner thread (once per process; later calls do nothing). It installs the
/// [`ThreadKind::Spawner`] filter before it creates anything.
pub fn start() -> std::io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = channel::<Request>();
    std::thread::Builder::new()
        .name("spawner".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            seccomp::install_or_exit(ThreadKind::Spawner);
            for r in rx {
                let h = std::thread::Builder::new().name(r.name).spawn(r.body);
                SPAWNED.fetch_add(1, Ordering::Relaxed);
                let _ = r.reply.send(h);
            }
        })?;
    let _ = SPAWNER.set(tx);
    Ok(())
}

/// Creates a thread named `name` running `body`: through the spawner thread when it
/// runs, directly otherwise.
pub fn spawn<F>(name: &str, body: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let Some(tx) = SPAWNER.get() else {
        return std::thread::Builder::new().name(name.into()).spawn(body);
    };
    let (reply, answer) = sync_channel(1);
    let gone = || std::io::Error::other("the worker spawner thread is gone");
    tx.send(Request {
        name: name.into(),
        body: Box::new(body),
        reply,
    })
    .map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_come_from_the_spawner_once_it_runs() {
        let direct = spawn("direct", || {}).unwrap();
        direct.join().unwrap();
        start().unwrap();
        start().unwrap();
        let before = SPAWNED.load(Ordering::Relaxed);
        let (tx, rx) = channel();
        let h = spawn("through-spawner", move || {
            tx.send(std::thread::current().name().map(str::to_owned))
                .unwrap();
        })
        .unwrap();
        h.join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("through-spawner"));
        assert!(
            SPAWNED.load(Ordering::Relaxed) > before,
            "not created by the spawner"
        );
    }
}
