//! Streaming a guest process's stdio to and from host files.
//!
//! The agent API is pull-based: `ReadStdout`/`ReadStderr` return the next chunk (or end of
//! stream), `WriteStdin` pushes data. One task per output stream copies chunks to the host
//! writer; host stdin is read by a detached thread (reading a terminal or a FIFO blocks and
//! cannot be interrupted) that hands chunks through a small bounded channel to a task
//! writing them to the agent; the caller waits for the exit. All of them share the
//! caller's agent session.
//! Output tasks get a short grace period after the exit to deliver what the process wrote
//! last.

use std::sync::Arc;
use std::time::Duration;

use std::io::Read;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::agent::{AgentApi, AgentError, ExitInfo, Session, Stream};

/// Size of one read of host stdin.
const STDIN_CHUNK: usize = 32 * 1024;
/// Chunks of host stdin read ahead of the agent taking them.
const STDIN_QUEUE: usize = 4;

/// After the process exits, how long output still drains before we give up on it (a
/// grandchild may hold the pipe open forever).
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Host ends of a process's stdio.
pub struct HostIo {
    /// Copied to the process's stdin (closed at its end); None: stdin stays untouched.
    /// Read by a thread of its own: a blocking source (terminal, FIFO, file).
    pub stdin: Option<Box<dyn Read + Send>>,
    /// Run once the process has exited, to end a `stdin` read that may block for ever (a
    /// FIFO whose writer never comes or already left: the reading thread is stuck in
    /// open(2) or read(2) otherwise). None: nothing to release.
    pub stdin_release: Option<Box<dyn FnOnce() + Send>>,
    /// Receives stdout.
    pub stdout: Box<dyn AsyncWrite + Send + Unpin>,
    /// Receives stderr.
    pub stderr: Box<dyn AsyncWrite + Send + Unpin>,
}

impl std::fmt::Debug for HostIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIo")
            .field("stdin", &self.stdin.is_some())
            .finish_non_exhaustive()
    }
}

async fn copy_out(
    agent: Session,
    cid: String,
    exec_id: String,
    stream: Stream,
    mut out: Box<dyn AsyncWrite + Send + Unpin>,
) {
    loop {
        match agent.read(&cid, &exec_id, stream).await {
            Ok(chunk) => {
                if !chunk.data.is_empty()
                    && (out.write_all(&chunk.data).await.is_err() || out.flush().await.is_err())
                {
                    break;
                }
                if chunk.eof {
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(?stream, error = %carapace_errors::Chain(&e), "output stream ended");
                break;
            }
        }
    }
}

fn copy_in(agent: Session, cid: String, exec_id: String, mut input: Box<dyn Read + Send>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(STDIN_QUEUE);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if tx.blocking_send(buf[..n].to_vec()).is_err() {
                return; // the writer gave up: the process is gone
            }
        }
    });
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            let mut data = &chunk[..];
            while !data.is_empty() {
                match agent.write_stdin(&cid, &exec_id, data).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => data = &data[k.min(data.len())..],
                }
            }
        }
        let _ = agent.close_stdin(&cid, &exec_id).await;
    });
}

/// Streams the stdio of process `exec_id` (empty: the init) of `cid` until it exits;
/// returns how it ended.
pub async fn stream_until_exit(
    agent: &Session,
    cid: &str,
    exec_id: &str,
    io: HostIo,
) -> Result<ExitInfo, AgentError> {
    let out = |stream, w| {
        tokio::spawn(copy_out(
            agent.clone(),
            cid.to_owned(),
            exec_id.to_owned(),
            stream,
            w,
        ))
    };
    let outputs = [
        out(Stream::Stdout, io.stdout),
        out(Stream::Stderr, io.stderr),
    ];
    if let Some(stdin) = io.stdin {
        copy_in(agent.clone(), cid.to_owned(), exec_id.to_owned(), stdin);
    }
    let exit = agent.wait(cid, exec_id).await;
    if let Some(release) = io.stdin_release {
        release();
    }
    let exit = exit?;
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        for o in outputs {
            let _ = o.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            cid,
            exec_id,
            "output still open after the process exited; stop copying"
        );
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
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    size_of_terminal(stdout.as_fd())
}

/// The (rows, columns) of terminal `fd`; None when it is not a terminal or has no size.
pub fn size_of_terminal(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points to a live
    // local of exactly that type; the fd is borrowed, so open for the whole call.
    unsafe { tiocgwinsz(fd.as_raw_fd(), &mut ws) }.ok()?;
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
/// (which [`block_sigwinch`] must have blocked), from a detached thread (`sigwait` blocks)
/// that sends each resize through the caller's runtime. Call from within a runtime.
pub fn forward_resizes(agent: Arc<dyn AgentApi>, cid: String, exec_id: String) {
    let rt = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGWINCH);
        while set.wait().is_ok() {
            if let Some((rows, cols)) = terminal_size()
                && rt
                    .block_on(agent.resize(&cid, &exec_id, rows, cols))
                    .is_err()
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

    #[async_trait::async_trait]
    impl AgentApi for Echo {
        async fn create_sandbox(&self, _: &str, _: &str, _: &[Share]) -> Result<(), AgentError> {
            unreachable!()
        }
        async fn create_container(&self, _: &str, _: &[u8]) -> Result<(), AgentError> {
            unreachable!()
        }
        async fn start_container(&self, _: &str) -> Result<u32, AgentError> {
            unreachable!()
        }
        async fn exec_process(&self, _: &str, _: &str, _: &[u8]) -> Result<u32, AgentError> {
            unreachable!()
        }
        async fn signal(&self, _: &str, _: &str, _: u32, _: bool) -> Result<(), AgentError> {
            unreachable!()
        }
        async fn wait(&self, _: &str, _: &str) -> Result<ExitInfo, AgentError> {
            while !*self.closed.lock().unwrap() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(ExitInfo {
                exit_code: 3,
                signal: 0,
                exit_status: 3,
            })
        }
        async fn write_stdin(&self, _: &str, _: &str, d: &[u8]) -> Result<usize, AgentError> {
            // Take at most 4 bytes per call: the pump must handle partial writes.
            let n = d.len().min(4);
            self.stdin.lock().unwrap().extend_from_slice(&d[..n]);
            Ok(n)
        }
        async fn close_stdin(&self, _: &str, _: &str) -> Result<(), AgentError> {
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
        async fn read(&self, _: &str, _: &str, s: Stream) -> Result<Chunk, AgentError> {
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
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        async fn resize(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), AgentError> {
            unreachable!()
        }
        async fn list_processes(&self, _: &str) -> Result<Vec<u32>, AgentError> {
            unreachable!()
        }
        async fn remove_container(&self, _: &str) -> Result<(), AgentError> {
            unreachable!()
        }
        async fn destroy_sandbox(&self, _: &str) -> Result<(), AgentError> {
            unreachable!()
        }
        async fn pause(&self, _: &str) -> Result<(), AgentError> {
            unreachable!()
        }
        async fn resume(&self, _: &str) -> Result<(), AgentError> {
            unreachable!()
        }
        async fn update_resources(&self, _: &str, _: &[u8]) -> Result<(), AgentError> {
            unreachable!()
        }
        async fn stats(&self, _: &str) -> Result<crate::agent::ContainerStats, AgentError> {
            unreachable!()
        }
        async fn next_oom_event(&self) -> Result<String, AgentError> {
            unreachable!()
        }
        async fn set_online_cpus(&self, _: u32) -> Result<u32, AgentError> {
            unreachable!()
        }
        async fn configure_network(
            &self,
            _: &crate::network::NetworkPlan,
        ) -> Result<(), AgentError> {
            unreachable!()
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl AsyncWrite for Shared {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.lock().unwrap().extend_from_slice(b);
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn stdin_reaches_the_process_and_output_and_exit_come_back() {
        let agent: Arc<dyn AgentApi> = Arc::new(Echo::default());
        let (out, err) = (Shared::default(), Shared::default());
        let exit = stream_until_exit(
            &agent,
            "c",
            "",
            HostIo {
                stdin_release: None,
                stdin: Some(Box::new(std::io::Cursor::new(b"hello, guest\n".to_vec()))),
                stdout: Box::new(out.clone()),
                stderr: Box::new(err.clone()),
            },
        )
        .await
        .unwrap();
        assert_eq!(exit.exit_status, 3);
        assert_eq!(&*out.0.lock().unwrap(), b"hello, guest\n");
        assert_eq!(&*err.0.lock().unwrap(), b"bye\n");
    }
}
