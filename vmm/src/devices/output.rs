//! Bounded, non-blocking console output: the vCPU thread never waits on a slow consumer.
//!
//! Bytes written by the guest go into a ring capped at [`CAPACITY`]; a writer thread drains it
//! into the destination (file, fd, stdout). When the destination stalls and the ring is full,
//! new bytes are dropped and counted, so a guest printing fast cannot stall or bloat the VMM.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Bytes buffered at most before output is dropped.
pub const CAPACITY: usize = 1 << 20;

#[derive(Debug, Default)]
struct Ring {
    buf: VecDeque<u8>,
}

#[derive(Debug, Default)]
struct Shared {
    ring: Mutex<Ring>,
    wake: Condvar,
    drained: Condvar,
    dropped: AtomicU64,
    written: AtomicU64,
}

/// The guest-facing end: implements `Write` and never blocks on the destination.
#[derive(Debug, Clone, Default)]
pub struct BoundedOutput {
    shared: Arc<Shared>,
}

/// Counters of a [`BoundedOutput`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutputStats {
    /// Bytes handed to the destination.
    pub written: u64,
    /// Bytes dropped because the buffer was full.
    pub dropped: u64,
}

impl BoundedOutput {
    /// Starts a writer thread draining into `dest`.
    pub fn spawn(dest: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let out = Self::new();
        out.start_writer(dest)?;
        Ok(out)
    }

    /// An output whose bytes wait in the ring until [`BoundedOutput::start_writer`] (the VMM
    /// opens the destination early and starts the thread once its jail is in place).
    pub fn new() -> Self {
        BoundedOutput {
            shared: Arc::new(Shared::default()),
        }
    }

    /// Starts the writer thread draining into `dest` (once).
    pub fn start_writer(&self, mut dest: Box<dyn Write + Send>) -> std::io::Result<()> {
        let s = self.shared.clone();
        std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Console);
                loop {
                    let chunk: Vec<u8> = {
                        let mut r = s.ring.lock().unwrap_or_else(|p| p.into_inner());
                        while r.buf.is_empty() {
                            r = s
                                .wake
                                .wait_timeout(r, Duration::from_millis(50))
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                        r.buf.drain(..).collect()
                    };
                    // A failing destination drops output; the guest must not notice.
                    let _ = dest.write_all(&chunk).and_then(|()| dest.flush());
                    s.written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    let r = s.ring.lock().unwrap_or_else(|p| p.into_inner());
                    if r.buf.is_empty() {
                        s.drained.notify_all();
                    }
                }
            })?;
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> OutputStats {
        OutputStats {
            written: self.shared.written.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
        }
    }

    /// Waits (bounded) until everything buffered was handed to the destination.
    pub fn drain(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut r = self.shared.ring.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.wake.notify_all();
        while !r.buf.is_empty() {
            let now = std::time::Instant::now();
            if now >= deadline {
                return;
            }
            r = self
                .shared
                .drained
                .wait_timeout(r, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        // The last chunk may still be in the writer's hands; give it a moment.
        drop(r);
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Write for BoundedOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut r = self.shared.ring.lock().unwrap_or_else(|p| p.into_inner());
        let room = CAPACITY.saturating_sub(r.buf.len());
        let take = room.min(data.len());
        r.buf.extend(&data[..take]);
        if take < data.len() {
            self.shared
                .dropped
                .fetch_add((data.len() - take) as u64, Ordering::Relaxed);
        }
        if data.contains(&b'\n') || r.buf.len() >= 4096 {
            self.shared.wake.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.shared.wake.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Slow(Arc<Mutex<Vec<u8>>>, Arc<Mutex<()>>);
    impl Write for Slow {
        fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
            let _gate = self.1.lock().unwrap();
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn delivers_and_bounds() {
        let sink = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Mutex::new(()));
        let mut out = BoundedOutput::spawn(Box::new(Slow(sink.clone(), gate.clone()))).unwrap();
        out.write_all(b"hello\n").unwrap();
        out.drain(Duration::from_secs(5));
        assert_eq!(&*sink.lock().unwrap(), b"hello\n");
        // Block the destination; writes beyond CAPACITY are dropped, not buffered.
        let held = gate.lock().unwrap();
        out.write_all(b"x\n").unwrap();
        std::thread::sleep(Duration::from_millis(100)); // writer now blocked in write()
        let big = vec![b'a'; CAPACITY + 1000];
        out.write_all(&big).unwrap();
        assert_eq!(out.stats().dropped, 1000);
        drop(held);
        out.drain(Duration::from_secs(5));
        assert_eq!(sink.lock().unwrap().len(), 6 + 2 + CAPACITY);
    }
}
