//! The stdio containerd hands a task: FIFO paths (what `ctr` and CRI use), `file://` URIs,
//! or nothing. Opened into the runtime's [`HostIo`] so its streaming does the copying.

use std::fs::OpenOptions;
use std::io::{self, Read};

use std::path::PathBuf;
use tokio::io::AsyncWrite;

use carapace_runtime::stdio::HostIo;

/// Errors opening a task's stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The target could not be opened.
    #[error("cannot open {what} {path}")]
    Open {
        /// stdin, stdout or stderr.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A URI scheme we do not handle.
    #[error("{what}: unsupported stdio URI {uri:?} (FIFO paths and file:// are supported)")]
    Unsupported {
        /// stdin, stdout or stderr.
        what: &'static str,
        /// The URI.
        uri: String,
    },
}

/// The stdio of one process, as containerd names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// stdin FIFO, or empty.
    pub stdin: String,
    /// stdout FIFO or `file://` URI, or empty.
    pub stdout: String,
    /// stderr FIFO or `file://` URI, or empty (always empty with a terminal).
    pub stderr: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
}

enum Target {
    None,
    Path(PathBuf),
    File(PathBuf),
}

fn target(what: &'static str, s: &str) -> Result<Target, StdioError> {
    if s.is_empty() {
        return Ok(Target::None);
    }
    if let Some(path) = s.strip_prefix("file://") {
        return Ok(Target::File(PathBuf::from(path)));
    }
    if s.contains("://") {
        return Err(StdioError::Unsupported {
            what,
            uri: s.to_owned(),
        });
    }
    Ok(Target::Path(PathBuf::from(s)))
}

fn open_out(what: &'static str, s: &str) -> Result<Box<dyn AsyncWrite + Send + Unpin>, StdioError> {
    let open = |path: PathBuf, append: bool| {
        let mut o = OpenOptions::new();
        if append {
            o.create(true).append(true);
        } else {
            // a FIFO: containerd holds the read end open already
            o.write(true);
        }
        o.open(&path)
            .map(tokio::fs::File::from_std)
            .map_err(|source| StdioError::Open { what, path, source })
    };
    Ok(match target(what, s)? {
        Target::None => Box::new(tokio::io::sink()),
        Target::Path(p) => Box::new(open(p, false)?),
        Target::File(p) => Box::new(open(p, true)?),
    })
}

impl StdioPaths {
    /// Opens the outputs now and the input (which blocks until containerd opens its write
    /// end) inside the returned [`HostIo`] lazily, on the copying thread.
    pub fn open(&self) -> Result<HostIo, StdioError> {
        let (stdin, stdin_release): (Option<Box<dyn Read + Send>>, _) =
            match target("stdin", &self.stdin)? {
                Target::None => (None, None),
                Target::Path(path) | Target::File(path) => (
                    Some(Box::new(LazyFifo::new(path.clone())) as Box<dyn Read + Send>),
                    Some(Box::new(move || release_fifo(&path)) as Box<dyn FnOnce() + Send>),
                ),
            };
        Ok(HostIo {
            stdin,
            stdin_release,
            stdout: open_out("stdout", &self.stdout)?,
            stderr: open_out("stderr", &self.stderr)?,
        })
    }
}

/// Ends a read of the stdin FIFO at `path` that would otherwise wait for ever once the
/// process is gone: the reading thread sits in open(2) until a writer comes (containerd's
/// client may have closed its end before, or never open it) and in read(2) until every
/// writer left. Opening the FIFO for writing, without blocking, completes a waiting open;
/// closing it again gives the reader end-of-file when no other writer holds it. Without a
/// reader (it already finished) the open fails with ENXIO, which is fine.
fn release_fifo(path: &std::path::Path) {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    if !std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) {
        return;
    }
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

/// A FIFO opened for reading on first read, so that opening it cannot block the caller.
struct LazyFifo {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl LazyFifo {
    fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }
}

impl Read for LazyFifo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.file.is_none() {
            self.file = Some(std::fs::File::open(&self.path)?);
        }
        match &mut self.file {
            Some(f) => f.read(buf),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use tokio::io::AsyncWriteExt;

    /// A stdin FIFO nobody ever writes to: the copying thread waits in open(2) until the
    /// release after the process exited lets it finish (before, it stayed for ever: one
    /// thread per such process in the shim, found by the soak).
    #[test]
    fn a_stdin_fifo_without_a_writer_is_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("stdin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let out = dir.path().join("out");
        let io = StdioPaths {
            stdin: fifo.display().to_string(),
            stdout: format!("file://{}", out.display()),
            ..Default::default()
        }
        .open()
        .expect("open");
        let mut stdin = io.stdin.expect("stdin");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            tx.send(stdin.read(&mut buf).map_err(|e| e.to_string()))
                .expect("send");
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the read waits for a writer"
        );
        (io.stdin_release.expect("a FIFO has a release"))();
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the release ends the read");
        assert_eq!(got, Ok(0), "end of file");
    }

    #[test]
    fn empty_paths_discard_output_and_have_no_stdin() {
        let io = StdioPaths::default().open().expect("open");
        assert!(io.stdin.is_none());
    }

    #[tokio::test]
    async fn file_uris_append_and_unknown_schemes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("out.log");
        std::fs::write(&log, "before\n").expect("write");
        let paths = StdioPaths {
            stdout: format!("file://{}", log.display()),
            ..Default::default()
        };
        let mut io = paths.open().expect("open");
        io.stdout.write_all(b"after\n").await.expect("write");
        io.stdout.flush().await.expect("flush");
        drop(io);
        assert_eq!(
            std::fs::read_to_string(&log).expect("read"),
            "before\nafter\n"
        );

        let bad = StdioPaths {
            stderr: "binary:///usr/bin/logger".into(),
            ..Default::default()
        };
        let err = bad.open().expect_err("unsupported");
        assert!(
            err.to_string().contains("binary:///usr/bin/logger"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn fifos_carry_data_both_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (fin, fout) = (dir.path().join("in"), dir.path().join("out"));
        for p in [&fin, &fout] {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .expect("mkfifo");
        }
        // the reader of stdout, as containerd would hold it
        let reader = {
            let p = fout.clone();
            std::thread::spawn(move || std::fs::read_to_string(p).expect("read out"))
        };
        let writer = {
            let p = fin.clone();
            std::thread::spawn(move || std::fs::write(p, "typed\n").expect("write in"))
        };
        let paths = StdioPaths {
            stdin: fin.display().to_string(),
            stdout: fout.display().to_string(),
            ..Default::default()
        };
        let mut io = paths.open().expect("open");
        let mut got = String::new();
        io.stdin
            .as_mut()
            .expect("stdin")
            .read_to_string(&mut got)
            .expect("read");
        assert_eq!(got, "typed\n");
        io.stdout.write_all(b"shown\n").await.expect("write");
        io.stdout.flush().await.expect("flush");
        drop(io);
        writer.join().expect("writer");
        assert_eq!(reader.join().expect("reader"), "shown\n");
    }
}
