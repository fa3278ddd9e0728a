//! A cap on the bytes a host process writes to one log: the VMM's console file (what the
//! guest prints) and the daemons' own logs live under `/run` (RAM), and a guest must not
//! be able to fill it. Past the cap a single notice is written and the rest is dropped
//! (and counted); writers never see an error, so nothing else changes.

use std::io::{self, Write};

/// Default cap of a sandbox's log files.
pub const DEFAULT_LOG_CAP: u64 = 16 << 20;

/// A writer that passes through at most `cap` bytes of what it is given.
#[derive(Debug)]
pub struct CappedWriter<W> {
    inner: W,
    cap: u64,
    written: u64,
    dropped: u64,
    what: &'static str,
}

impl<W: Write> CappedWriter<W> {
    /// Wraps `inner`; `what` names the log in the notice.
    pub fn new(inner: W, cap: u64, what: &'static str) -> Self {
        CappedWriter {
            inner,
            cap,
            written: 0,
            dropped: 0,
            what,
        }
    }

    /// Bytes dropped past the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written >= self.cap {
            self.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        let room = usize::try_from(self.cap - self.written).unwrap_or(usize::MAX);
        let take = room.min(buf.len());
        let n = self.inner.write(&buf[..take])?;
        self.written += n as u64;
        if self.written >= self.cap {
            let _ = write!(
                self.inner,
                "\n[{}: log capped at {} bytes; the rest is dropped]\n",
                self.what, self.cap
            );
            let _ = self.inner.flush();
            self.dropped += (buf.len() - n) as u64;
            return Ok(buf.len());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_up_to_the_cap_then_one_notice_then_nothing() {
        let mut w = CappedWriter::new(Vec::new(), 10, "test");
        w.write_all(b"12345678").unwrap();
        w.write_all(b"abcdef").unwrap();
        for _ in 0..1000 {
            w.write_all(b"more and more").unwrap();
        }
        assert_eq!(w.dropped(), 4 + 13 * 1000);
        let out = String::from_utf8(w.inner).unwrap();
        assert!(
            out.starts_with("12345678ab\n[test: log capped at 10 bytes"),
            "{out}"
        );
        assert_eq!(out.matches("log capped").count(), 1);
    }
}
