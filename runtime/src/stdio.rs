//! Streaming a guest process's stdio to and from host files.
//!
//! The agent API is pull-based: `ReadStdout`/`ReadStderr` return the next chunk (or end of
//! stream), `WriteStdin` pushes data. One thread per output stream copies chunks to the host
//! writer, one (detached, since reading a terminal cannot be interrupted) copies host stdin
//! in, and the caller's thread waits for the exit. Output threads get a short grace period
//! after the exit to deliver what the process wrote last.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use crate::agent::{AgentApi, AgentError, ExitInfo, Stream};

/// After the process exits, how long output still drains before we give up on it (a
/// grandchild may hold the pipe open forever).
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Host ends of a process's stdio.
pub struct HostIo {
    /// Copied to the process's stdin (closed at its end); None: stdin stays untouched.
    pub stdin: Option<Box<dyn Read + Send>>,
    /// Receives stdout.
    pub stdout: Box<dyn Write + Send>,
    /// Receives stderr.
    pub stderr: Box<dyn Write + Send>,
}

impl std::fmt::Debug for HostIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIo")
            .field("stdin", &self.stdin.is_some())
            .finish_non_exhaustive()
    }
}

fn copy_out(
    agent: Arc<dyn AgentApi>,
    cid: String,
    exec_id: String,
    stream: Stream,
    mut out: Box<dyn Write + Send>,
    done: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        loop {
            match agent.read(&cid, &exec_id, stream) {
                Ok(chunk) => {
                    if !chunk.data.is_empty()
                        && (out.write_all(&chunk.data).is_err() || out.flush().is_err())
                    {
                        break;
                    }
                    if chunk.eof {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(?stream, error = %e, "output stream ended");
                    break;
                }
            }
        }
        let _ = done.send(());
    });
}

fn copy_in(
    agent: Arc<dyn AgentApi>,
    cid: String,
    exec_id: String,
    mut input: Box<dyn Read + Send>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut data = &buf[..n];
            while !data.is_empty() {
                match agent.write_stdin(&cid, &exec_id, data) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => data = &data[k.min(data.len())..],
                }
            }
        }
        let _ = agent.close_stdin(&cid, &exec_id);
    });
}

/// Streams the stdio of process `exec_id` (empty: the init) of `cid` until it exits;
/// returns how it ended.
pub fn stream_until_exit(
    agent: &Arc<dyn AgentApi>,
    cid: &str,
    exec_id: &str,
    io: HostIo,
) -> Result<ExitInfo, AgentError> {
    let (tx, rx) = mpsc::channel();
    copy_out(
        agent.clone(),
        cid.to_owned(),
        exec_id.to_owned(),
        Stream::Stdout,
        io.stdout,
        tx.clone(),
    );
    copy_out(
        agent.clone(),
        cid.to_owned(),
        exec_id.to_owned(),
        Stream::Stderr,
        io.stderr,
        tx,
    );
    if let Some(stdin) = io.stdin {
        copy_in(agent.clone(), cid.to_owned(), exec_id.to_owned(), stdin);
    }
    let exit = agent.wait(cid, exec_id)?;
    let deadline = std::time::Instant::now() + DRAIN_GRACE;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if rx.recv_timeout(left).is_err() {
            tracing::warn!(
                cid,
                exec_id,
                "output still open after the process exited; stop copying"
            );
            break;
        }
    }
    Ok(exit)
}

/// Puts a terminal in raw mode and restores it on drop.
#[derive(Debug)]
pub struct RawMode {
    fd: std::os::fd::OwnedFd,
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    /// Raw mode on stdin if it is a terminal; None otherwise.
    pub fn stdin() -> Option<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let fd = std::io::stdin().as_fd_owned()?;
        let saved = tcgetattr(&fd).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&fd, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ =
            nix::sys::termios::tcsetattr(&self.fd, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

trait AsFdOwned {
    fn as_fd_owned(&self) -> Option<std::os::fd::OwnedFd>;
}

impl AsFdOwned for std::io::Stdin {
    fn as_fd_owned(&self) -> Option<std::os::fd::OwnedFd> {
        use std::io::IsTerminal;
        use std::os::fd::AsFd;
        if !self.is_terminal() {
            return None;
        }
        self.as_fd().try_clone_to_owned().ok()
    }
}

nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);

/// The (rows, columns) of the terminal on stdout, if it is one.
pub fn terminal_size() -> Option<(u32, u32)> {
    use std::io::IsTerminal;
    use std::os::fd::AsRawFd;
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points to a live
    // local of exactly that type; the fd is stdout's, open for the whole call.
    unsafe { tiocgwinsz(stdout.as_raw_fd(), &mut ws) }.ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then(|| (u32::from(ws.ws_row), u32::from(ws.ws_col)))
}

/// Blocks SIGWINCH in the calling thread and the threads it starts later, so that
/// [`forward_resizes`] can collect it with `sigwait`. Call first thing in `main`.
pub fn block_sigwinch() {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGWINCH);
    let _ = set.thread_block();
}

/// Forwards the host terminal's size to process `exec_id` of `cid` on every SIGWINCH
/// (which [`block_sigwinch`] must have blocked), from a detached thread.
pub fn forward_resizes(agent: Arc<dyn AgentApi>, cid: String, exec_id: String) {
    std::thread::spawn(move || {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGWINCH);
        while set.wait().is_ok() {
            if let Some((rows, cols)) = terminal_size()
                && agent.resize(&cid, &exec_id, rows, cols).is_err()
            {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{Chunk, Share};
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// An agent whose process echoes stdin to stdout and says bye on stderr.
    #[derive(Default)]
    struct Echo {
        stdout: Mutex<VecDeque<Chunk>>,
        stdin: Mutex<Vec<u8>>,
        closed: Mutex<bool>,
    }

    impl AgentApi for Echo {
        fn create_sandbox(&self, _: &str, _: &str, _: &[Share]) -> Result<(), AgentError> {
            unreachable!()
        }
        fn create_container(&self, _: &str, _: &[u8]) -> Result<(), AgentError> {
            unreachable!()
        }
        fn start_container(&self, _: &str) -> Result<u32, AgentError> {
            unreachable!()
        }
        fn exec_process(&self, _: &str, _: &str, _: &[u8]) -> Result<u32, AgentError> {
            unreachable!()
        }
        fn signal(&self, _: &str, _: &str, _: u32, _: bool) -> Result<(), AgentError> {
            unreachable!()
        }
        fn wait(&self, _: &str, _: &str) -> Result<ExitInfo, AgentError> {
            while !*self.closed.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(ExitInfo {
                exit_code: 3,
                signal: 0,
                exit_status: 3,
            })
        }
        fn write_stdin(&self, _: &str, _: &str, d: &[u8]) -> Result<usize, AgentError> {
            // Take at most 4 bytes per call: the pump must handle partial writes.
            let n = d.len().min(4);
            self.stdin.lock().unwrap().extend_from_slice(&d[..n]);
            Ok(n)
        }
        fn close_stdin(&self, _: &str, _: &str) -> Result<(), AgentError> {
            let data = std::mem::take(&mut *self.stdin.lock().unwrap());
            let mut q = self.stdout.lock().unwrap();
            q.push_back(Chunk { data, eof: false });
            q.push_back(Chunk {
                data: Vec::new(),
                eof: true,
            });
            *self.closed.lock().unwrap() = true;
            Ok(())
        }
        fn read(&self, _: &str, _: &str, s: Stream) -> Result<Chunk, AgentError> {
            if s == Stream::Stderr {
                return Ok(Chunk {
                    data: b"bye\n".to_vec(),
                    eof: true,
                });
            }
            loop {
                if let Some(c) = self.stdout.lock().unwrap().pop_front() {
                    return Ok(c);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        fn resize(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), AgentError> {
            unreachable!()
        }
        fn list_processes(&self, _: &str) -> Result<Vec<u32>, AgentError> {
            unreachable!()
        }
        fn remove_container(&self, _: &str) -> Result<(), AgentError> {
            unreachable!()
        }
        fn destroy_sandbox(&self, _: &str) -> Result<(), AgentError> {
            unreachable!()
        }
        fn pause(&self, _: &str) -> Result<(), AgentError> {
            unreachable!()
        }
        fn resume(&self, _: &str) -> Result<(), AgentError> {
            unreachable!()
        }
        fn update_resources(&self, _: &str, _: &[u8]) -> Result<(), AgentError> {
            unreachable!()
        }
        fn stats(&self, _: &str) -> Result<crate::agent::ContainerStats, AgentError> {
            unreachable!()
        }
        fn next_oom_event(&self) -> Result<String, AgentError> {
            unreachable!()
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn stdin_reaches_the_process_and_output_and_exit_come_back() {
        let agent: Arc<dyn AgentApi> = Arc::new(Echo::default());
        let (out, err) = (Shared::default(), Shared::default());
        let exit = stream_until_exit(
            &agent,
            "c",
            "",
            HostIo {
                stdin: Some(Box::new(std::io::Cursor::new(b"hello, guest\n".to_vec()))),
                stdout: Box::new(out.clone()),
                stderr: Box::new(err.clone()),
            },
        )
        .unwrap();
        assert_eq!(exit.exit_status, 3);
        assert_eq!(&*out.0.lock().unwrap(), b"hello, guest\n");
        assert_eq!(&*err.0.lock().unwrap(), b"bye\n");
    }
}
