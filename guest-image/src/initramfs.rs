//! The initramfs: a gzip-compressed newc archive whose `/init` is the agent.
//!
//! It holds only what the agent needs before it mounts the real pseudo file systems
//! itself: mount points (`/dev`, `/proc`, `/sys`, `/run`, `/tmp`) and `/dev/console`,
//! which the kernel opens as the agent's stdin/stdout/stderr *before* running `/init`
//! (devtmpfs is not yet mounted at that point when booting from an initramfs).

use crate::cpio::{self, CpioError};
use crate::elf;
use flate2::Compression;
use flate2::read::GzDecoder;
use std::io::{self, Read, Write};

/// Upper bound on the uncompressed archive we accept when inspecting.
pub const MAX_UNCOMPRESSED: u64 = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("building the cpio archive")]
    Cpio(#[source] CpioError),
    #[error("gzip")]
    Gzip(#[source] io::Error),
    #[error("uncompressed archive is larger than {MAX_UNCOMPRESSED} bytes")]
    TooLarge,
    #[error("reading the archive")]
    Read(#[source] CpioError),
    #[error("the archive has no /init regular file")]
    NoInit,
    #[error("/init is not executable (mode {mode:o})")]
    InitNotExecutable { mode: u32 },
    #[error("/init is not a valid x86-64 ELF")]
    InitElf(#[source] elf::ElfError),
    #[error("/init is dynamically linked (interpreter {0}) but the archive has no libraries")]
    InitNotStatic(String),
    #[error("the archive has no /dev/console character device (5,1); /init would have no console")]
    NoConsole,
}

/// Builds the compressed archive. Output is deterministic for a given agent.
pub fn build(agent: &[u8]) -> Result<Vec<u8>, InitramfsError> {
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    let mut w = cpio::Writer::new(gz);
    let c = |r: Result<(), CpioError>| r.map_err(InitramfsError::Cpio);
    c(w.dir("dev", 0o755))?;
    c(w.char_dev("dev/console", 0o600, 5, 1))?;
    c(w.char_dev("dev/null", 0o666, 1, 3))?;
    c(w.dir("proc", 0o555))?;
    c(w.dir("sys", 0o555))?;
    c(w.dir("run", 0o755))?;
    c(w.dir("tmp", 0o1777))?;
    c(w.file("init", 0o755, agent))?;
    let gz = w.finish().map_err(InitramfsError::Cpio)?;
    gz.finish().map_err(InitramfsError::Gzip)
}

/// What [`inspect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub uncompressed_bytes: usize,
    pub entries: Vec<String>,
    pub init_bytes: usize,
    pub init_sha256: String,
}

/// Decompresses (gzip) or takes as is (plain newc) an initramfs and checks it: a static
/// executable `/init` and a `/dev/console`.
pub fn inspect(data: &[u8]) -> Result<Contents, InitramfsError> {
    let raw;
    let archive: &[u8] = if data.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(data)
            .take(MAX_UNCOMPRESSED + 1)
            .read_to_end(&mut out)
            .map_err(InitramfsError::Gzip)?;
        if out.len() as u64 > MAX_UNCOMPRESSED {
            return Err(InitramfsError::TooLarge);
        }
        raw = out;
        &raw
    } else {
        data
    };
    let entries = cpio::read(archive).map_err(InitramfsError::Read)?;
    let init = entries
        .iter()
        .find(|e| e.name == "init" && e.is_file())
        .ok_or(InitramfsError::NoInit)?;
    if init.mode & 0o111 == 0 {
        return Err(InitramfsError::InitNotExecutable { mode: init.mode });
    }
    let info = elf::parse(init.data).map_err(InitramfsError::InitElf)?;
    if let Some(i) = info.interpreter {
        return Err(InitramfsError::InitNotStatic(i));
    }
    if !entries
        .iter()
        .any(|e| e.name == "dev/console" && e.is_char_dev() && e.rdev == (5, 1))
    {
        return Err(InitramfsError::NoConsole);
    }
    Ok(Contents {
        uncompressed_bytes: archive.len(),
        entries: entries.iter().map(|e| e.name.to_owned()).collect(),
        init_bytes: init.data.len(),
        init_sha256: crate::cache::sha256_hex(init.data),
    })
}

/// Writes `data` to `path` atomically (temporary file in the same directory, then rename).
pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::synth::{Seg, elf};

    fn static_exe() -> Vec<u8> {
        elf(&[Seg {
            p_type: 1,
            data: vec![0x90; 64],
        }])
    }

    #[test]
    fn built_archive_passes_inspection_and_is_reproducible() {
        let agent = static_exe();
        let gz = build(&agent).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        let c = inspect(&gz).unwrap();
        assert_eq!(
            c.entries,
            [
                "dev",
                "dev/console",
                "dev/null",
                "proc",
                "sys",
                "run",
                "tmp",
                "init"
            ]
        );
        assert_eq!(c.init_bytes, agent.len());
        assert_eq!(c.init_sha256, crate::cache::sha256_hex(&agent));
        assert_eq!(gz, build(&agent).unwrap());
    }

    #[test]
    fn gnu_cpio_extracts_init_intact() {
        let agent = static_exe();
        let gz = build(&agent).unwrap();
        let mut raw = Vec::new();
        GzDecoder::new(&gz[..]).read_to_end(&mut raw).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-i", "--quiet", "--no-absolute-filenames", "init"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&raw).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.path().join("init")).unwrap(), agent);
    }

    #[test]
    fn inspection_rejects_bad_images() {
        let dynamic = elf(&[Seg {
            p_type: 3,
            data: b"/lib/ld.so\0".to_vec(),
        }]);
        assert!(matches!(
            inspect(&build(&dynamic).unwrap()),
            Err(InitramfsError::InitNotStatic(_))
        ));
        assert!(matches!(
            inspect(&build(b"#!/bin/sh\n").unwrap()),
            Err(InitramfsError::InitElf(_))
        ));
        let mut w = cpio::Writer::new(Vec::new());
        w.file("init", 0o644, &static_exe()).unwrap();
        assert!(matches!(
            inspect(&w.finish().unwrap()),
            Err(InitramfsError::InitNotExecutable { .. })
        ));
        let mut w = cpio::Writer::new(Vec::new());
        w.file("init", 0o755, &static_exe()).unwrap();
        assert!(matches!(
            inspect(&w.finish().unwrap()),
            Err(InitramfsError::NoConsole)
        ));
        let w = cpio::Writer::new(Vec::new());
        assert!(matches!(
            inspect(&w.finish().unwrap()),
            Err(InitramfsError::NoInit)
        ));
        assert!(matches!(
            inspect(&[0x1f, 0x8b, 0, 0]),
            Err(InitramfsError::Gzip(_))
        ));
    }
}
