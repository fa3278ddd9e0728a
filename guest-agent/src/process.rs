//! Spawning the `__init` helper and tracking one process's stdio and exit.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::fcntl::OFlag;
use tokio::io::AsyncReadExt;
use tokio::sync::{Mutex, watch};

use crate::init::InitConfig;
use crate::reaper::{Exit, Reaper};
use crate::stream::FdStream;

/// Longest status line read from a helper.
const MAX_STATUS_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("container setup failed: {0}")]
    Setup(String),
    #[error("helper ended without reporting {expected}")]
    Protocol { expected: &'static str },
    #[error("receiving the container's terminal")]
    Console(#[source] crate::console::ConsoleError),
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> SpawnError {
    move |source| SpawnError::Io { op, source }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SpawnError::Io {
        op: "pipe2",
        source: e.into(),
    })
}

/// Reads status lines from a helper.
#[derive(Debug)]
pub struct StatusReader {
    rx: tokio::net::unix::pipe::Receiver,
    buf: Vec<u8>,
    /// The child's `R` arrived before its parent's `P<pid>` line (they race on the pipe).
    ready_early: bool,
}

impl StatusReader {
    /// Reads the status lines arriving on `fd`, the read end of a pipe (inside a tokio
    /// runtime).
    pub fn new(fd: OwnedFd) -> Result<Self, SpawnError> {
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
            .map_err(io("registering status pipe"))?;
        Ok(Self {
            rx,
            buf: Vec::new(),
            ready_early: false,
        })
    }

    /// Next line, or None at EOF.
    pub async fn next(&mut self) -> Result<Option<String>, SpawnError> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..i]).into_owned()));
            }
            if self.buf.len() > MAX_STATUS_LINE {
                return Err(SpawnError::Setup("helper status line too long".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .rx
                .read(&mut chunk)
                .await
                .map_err(io("reading helper status"))?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Waits until the helper reports `R` (ready) or an error.
    pub async fn expect_ready(&mut self) -> Result<(), SpawnError> {
        if std::mem::take(&mut self.ready_early) {
            return Ok(());
        }
        match self.next().await? {
            Some(l) if l == "R" => Ok(()),
            Some(l) if l.starts_with('E') => Err(SpawnError::Setup(l[1..].to_owned())),
            _ => Err(SpawnError::Protocol { expected: "ready" }),
        }
    }

    /// Waits for EOF (exec succeeded) or an error line.
    pub async fn expect_exec(&mut self) -> Result<(), SpawnError> {
        match self.next().await? {
            None => Ok(()),
            Some(l) if l.starts_with('E') => Err(SpawnError::Setup(l[1..].to_owned())),
            Some(_) => Err(SpawnError::Protocol { expected: "exec" }),
        }
    }
}

/// Stdio of a process as the agent sees it.
#[derive(Debug)]
pub struct Stdio3 {
    pub stdin: Option<FdStream>,
    pub stdout: Option<FdStream>,
    pub stderr: Option<FdStream>,
    pub tty: Option<OwnedFd>,
}

/// A running (or exited) container process.
#[derive(Debug)]
pub struct Proc {
    pub pid: i32,
    pub exit: watch::Receiver<Option<Exit>>,
    pub stdin: Mutex<Option<FdStream>>,
    pub stdout: Mutex<Option<FdStream>>,
    pub stderr: Mutex<Option<FdStream>>,
    pub tty: Option<OwnedFd>,
}

impl Proc {
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // Sender dropped without a value cannot happen (the reaper sends before
                // dropping); treat as killed.
                return Exit { code: 0, signal: 9 };
            }
        }
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

/// A helper spawned and reported the workload pid; not yet started.
#[derive(Debug)]
pub struct Spawned {
    pub proc: Arc<Proc>,
    pub status: StatusReader,
    pub start: Option<OwnedFd>,
}

/// Spawns `carapace-agent __init` with `cfg`; returns once the workload pid is known and
/// setup finished (the process then waits for start when `cfg.wait_start`).
pub async fn spawn(cfg: &InitConfig, reaper: &Reaper) -> Result<Spawned, SpawnError> {
    let (cfg_r, cfg_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
    // With a terminal, the helper allocates the pty inside the container and sends the
    // master back on `console` (see crate::console); until then its stdio is /dev/null.
    let mut console = None;
    let (child_stdio, mut ours) = if cfg.tty {
        let (agent_end, helper_end) = crate::console::socket_pair().map_err(SpawnError::Console)?;
        console = Some((agent_end, helper_end));
        let null = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(io("opening /dev/null"))
        };
        let ours = Stdio3 {
            stdin: None,
            stdout: None,
            stderr: None,
            tty: None,
        };
        ([null()?, null()?, null()?], ours)
    } else {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let ours = Stdio3 {
            stdin: Some(FdStream::new(in_w).map_err(io("registering pipe"))?),
            stdout: Some(FdStream::new(out_r).map_err(io("registering pipe"))?),
            stderr: Some(FdStream::new(err_r).map_err(io("registering pipe"))?),
            tty: None,
        };
        ([in_r, out_w, err_w], ours)
    };
    let [c_in, c_out, c_err] = child_stdio;
    let mut fds = vec![cfg_r.as_raw_fd(), status_w.as_raw_fd(), start_r.as_raw_fd()];
    if let Some((_, helper_end)) = &console {
        fds.push(helper_end.as_raw_fd());
    }
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("__init")
        .args(fds.iter().map(ToString::to_string))
        .stdin(Stdio::from(c_in))
        .stdout(Stdio::from(c_out))
        .stderr(Stdio::from(c_err))
        .env_clear();
    crate::sys::keep_fds_on_exec(&mut cmd, fds);
    cmd.spawn().map_err(io("spawning carapace-agent __init"))?;
    drop((cfg_r, status_w, start_r));
    // Only the helper (and its child) may hold the other end: EOF then means it is gone.
    let console = console.map(|(agent_end, _helper_end)| agent_end);
    let text = serde_json::to_vec(cfg)
        .map_err(|e| SpawnError::Setup(format!("encoding init config: {e}")))?;
    let writer = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::from(cfg_w);
        f.write_all(&text)
    });
    let mut status = StatusReader::new(status_r)?;
    // The forked child may report ready before its parent reports the child's pid.
    let mut line = status.next().await?;
    while line.as_deref() == Some("R") && !status.ready_early {
        status.ready_early = true;
        line = status.next().await?;
    }
    // A write error means the helper died early; its status line says why.
    let _ = writer.await;
    let pid: i32 = match line {
        Some(l) if l.starts_with('P') => l[1..]
            .parse()
            .map_err(|_| SpawnError::Setup(format!("bad pid line {l:?}")))?,
        Some(l) if l.starts_with('E') => return Err(SpawnError::Setup(l[1..].to_owned())),
        _ => return Err(SpawnError::Protocol { expected: "pid" }),
    };
    if let Some(sock) = console {
        match receive_terminal(sock).await {
            Ok(master) => ours = terminal_stdio(master)?,
            Err(e) => {
                // The child reports why it sent nothing on its status line (an `R` cannot
                // come first: the terminal is sent before it).
                let why = match status.next().await {
                    Ok(Some(l)) if l.starts_with('E') => SpawnError::Setup(l[1..].to_owned()),
                    _ => e,
                };
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(why);
            }
        }
    }
    let exit = reaper.register(pid);
    let proc = Arc::new(Proc {
        pid,
        exit,
        stdin: Mutex::new(ours.stdin.take()),
        stdout: Mutex::new(ours.stdout.take()),
        stderr: Mutex::new(ours.stderr.take()),
        tty: ours.tty.take(),
    });
    Ok(Spawned {
        proc,
        status,
        start: Some(start_w),
    })
}

/// Waits (off the reactor: a blocking recvmsg) for the pty master the helper's child sends.
async fn receive_terminal(sock: OwnedFd) -> Result<OwnedFd, SpawnError> {
    tokio::task::spawn_blocking(move || crate::console::recv_tty(std::os::fd::AsFd::as_fd(&sock)))
        .await
        .map_err(|e| SpawnError::Io {
            op: "receiving the terminal",
            source: std::io::Error::other(e),
        })?
        .map_err(SpawnError::Console)
}

/// The agent's side of a terminal process: stdin and stdout both on the master.
fn terminal_stdio(master: OwnedFd) -> Result<Stdio3, SpawnError> {
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(io("dup pty"));
    Ok(Stdio3 {
        stdin: Some(FdStream::new(dup(&master)?).map_err(io("registering pty"))?),
        stdout: Some(FdStream::new(dup(&master)?).map_err(io("registering pty"))?),
        stderr: None,
        tty: Some(master),
    })
}

/// Parses the helper's fd arguments.
pub fn parse_fd(s: &str) -> Option<i32> {
    s.parse().ok().filter(|fd| *fd > 2)
}
