//! A writer and reader for the cpio "newc" format, the format the Linux kernel unpacks
//! as an initramfs.
//!
//! Written here rather than by running `cpio(1)`: the archive needs device nodes
//! (`/dev/console`), which `cpio` can only copy from a real file system (creating them
//! needs root), and the output must be reproducible (fixed inode numbers, owners and
//! times) so its hash is a stable cache key.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";
/// Longest path we write or accept (the kernel's own limit is PATH_MAX).
pub const MAX_NAME: usize = 4095;
/// Upper bound on entries when reading an archive (ours has about ten).
const MAX_ENTRIES: usize = 100_000;

pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFCHR: u32 = 0o020_000;
pub const S_IFLNK: u32 = 0o120_000;
const S_IFMT: u32 = 0o170_000;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("writing the archive")]
    Io(#[source] io::Error),
    #[error("invalid entry name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("entry {name:?} is too large ({size} bytes)")]
    TooLarge { name: String, size: usize },
    #[error("malformed archive at offset {offset}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
}

/// Writes a newc archive with deterministic metadata (owner root, mtime 0).
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    written: usize,
    next_ino: u32,
}

fn check_name(name: &str) -> Result<(), CpioError> {
    let bad = |reason| {
        Err(CpioError::BadName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return bad("empty or too long");
    }
    if name.starts_with('/') {
        return bad("must be relative to the archive root");
    }
    if name.contains('\0') {
        return bad("contains NUL");
    }
    if name
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("empty, '.' or '..' component");
    }
    if name == TRAILER {
        return bad("reserved name");
    }
    Ok(())
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    fn put(&mut self, b: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(b).map_err(CpioError::Io)?;
        self.written += b.len();
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = self.written.next_multiple_of(4) - self.written;
        self.put(&[0u8; 3][..n])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_owned(),
            size: data.len(),
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check (unused by newc)
        ];
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.put(&header)?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    /// A directory; `perm` holds the permission bits (e.g. 0o755).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        check_name(name)?;
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file with the given contents.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        check_name(name)?;
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A character device node.
    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        check_name(name)?;
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        check_name(name)?;
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        self.out.flush().map_err(CpioError::Io)?;
        Ok(self.out)
    }
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: &'a [u8],
}

impl Entry<'_> {
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_char_dev(&self) -> bool {
        self.mode & S_IFMT == S_IFCHR
    }
}

fn hex_field(b: &[u8], offset: usize) -> Result<u32, CpioError> {
    let bad = CpioError::Malformed {
        offset,
        reason: "header field is not 8 hex digits",
    };
    let s = std::str::from_utf8(b).map_err(|_| CpioError::Malformed {
        offset,
        reason: "header field is not 8 hex digits",
    })?;
    u32::from_str_radix(s, 16).map_err(|_| bad)
}

/// Reads every entry of an uncompressed newc archive, up to the trailer.
pub fn read(archive: &[u8]) -> Result<Vec<Entry<'_>>, CpioError> {
    let mut out = Vec::new();
    let mut off = 0usize;
    loop {
        if out.len() >= MAX_ENTRIES {
            return Err(CpioError::Malformed {
                offset: off,
                reason: "too many entries",
            });
        }
        let h = archive
            .get(off..off + HEADER_LEN)
            .ok_or(CpioError::Malformed {
                offset: off,
                reason: "truncated header (no trailer)",
            })?;
        if &h[..6] != MAGIC {
            return Err(CpioError::Malformed {
                offset: off,
                reason: "bad magic (not newc)",
            });
        }
        let field = |i: usize| hex_field(&h[6 + 8 * i..14 + 8 * i], off + 6 + 8 * i);
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        if namesize == 0 || namesize > MAX_NAME + 1 {
            return Err(CpioError::Malformed {
                offset: off,
                reason: "bad name size",
            });
        }
        let name_start = off + HEADER_LEN;
        let name_bytes =
            archive
                .get(name_start..name_start + namesize)
                .ok_or(CpioError::Malformed {
                    offset: off,
                    reason: "truncated name",
                })?;
        let name = name_bytes
            .strip_suffix(&[0])
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or(CpioError::Malformed {
                offset: name_start,
                reason: "name not NUL-terminated UTF-8",
            })?;
        let data_start = (name_start + namesize).next_multiple_of(4);
        let data = archive
            .get(data_start..data_start.saturating_add(size))
            .ok_or(CpioError::Malformed {
                offset: data_start,
                reason: "truncated data",
            })?;
        if name == TRAILER {
            return Ok(out);
        }
        out.push(Entry {
            name,
            mode,
            rdev,
            data,
        });
        off = (data_start + size).next_multiple_of(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"#!hello").unwrap();
        w.symlink("sbin", "/").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let a = sample();
        assert_eq!(a.len() % 4, 0);
        let e = read(&a).unwrap();
        let names: Vec<_> = e.iter().map(|e| e.name).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "sbin", "empty"]);
        assert!(e[0].is_dir());
        assert!(e[1].is_char_dev());
        assert_eq!(e[1].rdev, (5, 1));
        assert!(e[2].is_file());
        assert_eq!(e[2].data, b"#!hello");
        assert_eq!(e[2].mode & 0o7777, 0o755);
        assert_eq!(e[3].data, b"/");
        // Deterministic output.
        assert_eq!(a, sample());
    }

    #[test]
    fn gnu_cpio_lists_our_archive() {
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cpio(1) is installed by scripts/setup.sh");
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<_> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"));
        assert!(lines[1].starts_with("crw-------") && lines[1].contains("5,"));
        assert!(lines[1].ends_with(" dev/console"));
        assert!(lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"));
        assert!(lines[3].starts_with("lrwxrwxrwx") && lines[3].ends_with("sbin -> /"));
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = Writer::new(Vec::new());
        for n in ["", "/init", "a/../b", "a//b", "./x", "TRAILER!!!", "a\0b"] {
            assert!(
                matches!(w.file(n, 0o644, b""), Err(CpioError::BadName { .. })),
                "{n:?}"
            );
        }
    }

    #[test]
    fn reader_rejects_garbage_and_truncation() {
        let a = sample();
        for n in 0..a.len() - 1 {
            assert!(read(&a[..n]).is_err(), "truncated at {n} accepted");
        }
        let mut bad = a.clone();
        bad[0] = b'1';
        assert!(read(&bad).is_err());
        let mut bad = a;
        bad[6 + 8 * 6] = b'z';
        assert!(read(&bad).is_err());
    }
}
