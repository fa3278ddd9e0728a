//! A process's stdio as the host drives it: pulled reads of stdout/stderr (the agent reads
//! the pipe only when asked, so a slow host back-pressures the process), stdin writes and
//! close, the terminal's size.

use std::os::fd::AsFd;

use carapace_protocol::{MAX_READ_CHUNK, MAX_WRITE_CHUNK};

use super::{Core, CoreError, Result};

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What one read gave: data, or the end of the stream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub data: Vec<u8>,
    pub eof: bool,
}

impl Chunk {
    fn eof() -> Self {
        Self {
            data: Vec::new(),
            eof: true,
        }
    }
}

impl Core {
    /// Reads up to `max_len` bytes (1..=[`MAX_READ_CHUNK`]) of a process's output, waiting
    /// for some; data written before the process exited is read to EOF after it.
    pub async fn read_output(
        &self,
        cid: &str,
        exec_id: &str,
        stream: Stream,
        max_len: u32,
    ) -> Result<Chunk> {
        let (_c, p) = self.process(cid, exec_id)?;
        let max = max_len.clamp(1, MAX_READ_CHUNK) as usize;
        let lock = match stream {
            Stream::Stdout => &p.stdout,
            Stream::Stderr => &p.stderr,
        };
        let mut guard = lock.lock().await;
        let Some(fd) = guard.as_ref() else {
            return Ok(Chunk::eof());
        };
        let mut buf = vec![0u8; max];
        let n = fd.read(&mut buf).await.map_err(|source| CoreError::Io {
            op: "reading process output".into(),
            source,
        })?;
        if n == 0 {
            *guard = None;
            return Ok(Chunk::eof());
        }
        buf.truncate(n);
        Ok(Chunk {
            data: buf,
            eof: false,
        })
    }

    /// Writes all of `data` (at most [`MAX_WRITE_CHUNK`] bytes) to a process's stdin;
    /// returns how much it wrote.
    pub async fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        if data.len() > MAX_WRITE_CHUNK {
            return Err(CoreError::Invalid {
                field: "data",
                reason: format!(
                    "{} bytes exceed the {MAX_WRITE_CHUNK}-byte limit",
                    data.len()
                ),
            });
        }
        let (_c, p) = self.process(cid, exec_id)?;
        let guard = p.stdin.lock().await;
        let Some(stdin) = guard.as_ref() else {
            return Err(CoreError::Process {
                id: cid.to_owned(),
                state: "stdin closed",
                op: "write stdin",
                needed: "open stdin",
            });
        };
        let mut done = 0;
        while done < data.len() {
            done += stdin
                .write(&data[done..])
                .await
                .map_err(|source| CoreError::Io {
                    op: "writing stdin".into(),
                    source,
                })?;
        }
        Ok(done)
    }

    /// Closes a process's stdin (on a terminal: sends the EOF character).
    pub async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<()> {
        let (_c, p) = self.process(cid, exec_id)?;
        let mut guard = p.stdin.lock().await;
        if let (Some(s), true) = (guard.as_ref(), p.tty.is_some()) {
            // A terminal has no half-close: send the EOF character (VEOF, ^D).
            let _ = s.write(&[4]).await;
        }
        *guard = None;
        Ok(())
    }

    /// Sets the size of a process's terminal.
    pub fn resize_tty(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let (_c, p) = self.process(cid, exec_id)?;
        let tty = p.tty.as_ref().ok_or(CoreError::Invalid {
            field: "exec_id",
            reason: "the process has no terminal".into(),
        })?;
        let rows = u16::try_from(rows).map_err(|_| CoreError::Invalid {
            field: "rows",
            reason: "above 65535".into(),
        })?;
        let cols = u16::try_from(cols).map_err(|_| CoreError::Invalid {
            field: "cols",
            reason: "above 65535".into(),
        })?;
        crate::sys::set_winsize(tty.as_fd(), rows, cols).map_err(|source| CoreError::Io {
            op: "TIOCSWINSZ".into(),
            source,
        })
    }
}
