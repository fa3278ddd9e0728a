//! Building the guest kernel: Debian's `linux-source-*` tarball, `make tinyconfig`, our
//! fragment merged on top, a check that every fragment option survived, `make vmlinux`.
//! The result is cached by [`KernelKey`]; a cache hit costs a directory lookup.

use crate::cache::{Cache, KernelKey};
use crate::elf;
use crate::fragment::{self, Fragment, FragmentError};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// Disk space a kernel build needs in the cache (sources ~1.4 GiB + objects), checked
/// before starting so a full disk is reported up front rather than 5 minutes in.
pub const NEEDED_DISK_MIB: u64 = 3 * 1024;
/// How many log lines to show when a step fails.
const TAIL_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "kernel source package {package} is not installed; install it with \
         `sudo apt-get install {package}` (or run `make setup`)"
    )]
    SourceNotInstalled { package: String },
    #[error(
        "kernel source package {package} is installed but {path} is missing; \
         reinstall it with `sudo apt-get install --reinstall {package}`"
    )]
    SourceTarballMissing { package: String, path: PathBuf },
    #[error("running dpkg-query to find the version of {package}")]
    Dpkg {
        package: String,
        #[source]
        source: io::Error,
    },
    #[error("kernel config fragment {origin}")]
    Fragment {
        origin: String,
        #[source]
        source: FragmentError,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "not enough disk space for the kernel build in {path}: {available_mib} MiB free, \
         about {needed_mib} MiB needed{detail}"
    )]
    DiskFull {
        path: PathBuf,
        available_mib: u64,
        needed_mib: u64,
        detail: String,
    },
    #[error(
        "kernel build step `{step}` failed ({status}); full log: {log}\n--- last lines ---\n{tail}"
    )]
    StepFailed {
        step: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "{count} option(s) of the fragment did not survive the merge (unmet dependencies?); \
         merged config: {config}\n{list}"
    )]
    OptionsDropped {
        count: usize,
        list: String,
        config: PathBuf,
    },
    #[error("built kernel {path} is not a valid ELF")]
    Elf {
        path: PathBuf,
        #[source]
        source: elf::ElfError,
    },
    #[error("built kernel {path} has no PVH entry note (is CONFIG_PVH set?)")]
    NoPvhNote { path: PathBuf },
    #[error("locking {path} (another build running?)")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

impl KernelError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// The Debian kernel source package we build from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSource {
    pub package: String,
    pub version: String,
    pub tarball: PathBuf,
}

impl KernelSource {
    /// Finds an installed `linux-source-*` package and its tarball in /usr/src.
    pub fn locate(package: &str) -> Result<Self, KernelError> {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f", "${db:Status-Abbrev} ${Version}", package])
            .env("LC_ALL", "C")
            .output()
            .map_err(|source| KernelError::Dpkg {
                package: package.to_owned(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "ii  6.1.192-2" for an installed package.
        let mut parts = text.split_whitespace();
        let status = parts.next().unwrap_or_default();
        let version = parts.next().unwrap_or_default();
        if !out.status.success() || status != "ii" || version.is_empty() {
            return Err(KernelError::SourceNotInstalled {
                package: package.to_owned(),
            });
        }
        let tarball = PathBuf::from(format!("/usr/src/{package}.tar.xz"));
        if !tarball.is_file() {
            return Err(KernelError::SourceTarballMissing {
                package: package.to_owned(),
                path: tarball,
            });
        }
        Ok(Self {
            package: package.to_owned(),
            version: version.to_owned(),
            tarball,
        })
    }
}

/// Options of one kernel build.
#[derive(Debug, Clone)]
pub struct KernelBuild<'a> {
    pub source: &'a KernelSource,
    /// Fragment text, and where it came from (for messages).
    pub fragment: &'a str,
    pub fragment_origin: &'a str,
    pub cache: &'a Cache,
    pub jobs: usize,
    /// Rebuild even if the cache holds this key.
    pub force: bool,
}

/// A kernel in the cache.
#[derive(Debug, Clone)]
pub struct BuiltKernel {
    pub key: KernelKey,
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    /// True when it came from the cache without building.
    pub cached: bool,
}

/// Free space (MiB) on the file system holding `path`.
pub fn available_mib(path: &Path) -> Result<u64, KernelError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| KernelError::Io {
        action: "checking free space on",
        path: path.to_owned(),
        source: io::Error::from(e),
    })?;
    Ok(st.blocks_available() * st.fragment_size() / (1024 * 1024))
}

/// Builds (or finds in the cache) the kernel described by `b`.
pub fn build(b: &KernelBuild<'_>) -> Result<BuiltKernel, KernelError> {
    let frag = Fragment::parse(b.fragment).map_err(|source| KernelError::Fragment {
        origin: b.fragment_origin.to_owned(),
        source,
    })?;
    let key = KernelKey::new(&b.source.package, &b.source.version, b.fragment.as_bytes());
    let dir = b.cache.kernel_dir(&key);
    let vmlinux = dir.join("vmlinux");
    let kernels = b.cache.root.join("kernel");
    fs::create_dir_all(&kernels).map_err(KernelError::io("creating", &kernels))?;

    // One build per key at a time; a second caller waits, then finds the result.
    let lock_path = b.cache.lock_path(&dir);
    let lock_file = File::create(&lock_path).map_err(KernelError::io("creating", &lock_path))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, e)| KernelError::Lock {
            path: lock_path.clone(),
            source: e,
        },
    )?;

    if !b.force && vmlinux.is_file() {
        tracing::info!(key = %key.id(), "kernel: cache hit, not rebuilding");
        return Ok(BuiltKernel {
            key,
            dir,
            vmlinux,
            cached: true,
        });
    }

    let avail = available_mib(&kernels)?;
    if avail < NEEDED_DISK_MIB {
        return Err(KernelError::DiskFull {
            path: kernels,
            available_mib: avail,
            needed_mib: NEEDED_DISK_MIB,
            detail: String::new(),
        });
    }

    let work = b.cache.kernel_work_dir(&key);
    if work.exists() {
        fs::remove_dir_all(&work).map_err(KernelError::io("removing stale", &work))?;
    }
    fs::create_dir_all(&work).map_err(KernelError::io("creating", &work))?;
    let src = work.join("src");
    fs::create_dir_all(&src).map_err(KernelError::io("creating", &src))?;
    let log_path = work.join("build.log");
    let mut log = Log::create(&log_path)?;
    let started = Instant::now();
    tracing::info!(
        source = %b.source.version, key = %key.id(), jobs = b.jobs,
        "kernel: building (a few minutes); log: {}", log_path.display()
    );

    tracing::info!("kernel: extracting {}", b.source.tarball.display());
    let mut tar = Command::new("tar");
    tar.arg("-xJf")
        .arg(&b.source.tarball)
        .arg("-C")
        .arg(&src)
        .arg("--strip-components=1");
    run_step("extract sources", tar, &mut log, &kernels, None)?;

    run_step(
        "make tinyconfig",
        make(&src, &["tinyconfig"]),
        &mut log,
        &kernels,
        None,
    )?;
    let frag_path = work.join("carapace.fragment");
    fs::write(&frag_path, b.fragment).map_err(KernelError::io("writing", &frag_path))?;
    let mut merge = Command::new("scripts/kconfig/merge_config.sh");
    merge
        .current_dir(&src)
        .args(["-m", ".config"])
        .arg(&frag_path);
    clean_env(&mut merge);
    run_step("merge fragment", merge, &mut log, &kernels, None)?;
    run_step(
        "make olddefconfig",
        make(&src, &["olddefconfig"]),
        &mut log,
        &kernels,
        None,
    )?;

    let config_path = src.join(".config");
    let config =
        fs::read_to_string(&config_path).map_err(KernelError::io("reading", &config_path))?;
    let missing = frag.verify(&fragment::parse_config(&config));
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|m| format!("  {m}")).collect();
        return Err(KernelError::OptionsDropped {
            count: missing.len(),
            list: list.join("\n"),
            config: config_path,
        });
    }
    tracing::info!(
        "kernel: config merged, all {} fragment options verified",
        frag.settings.len()
    );

    let jobs = format!("-j{}", b.jobs.max(1));
    let mut progress = Progress::new(started);
    run_step(
        "make vmlinux",
        make(&src, &[jobs.as_str(), "vmlinux"]),
        &mut log,
        &kernels,
        Some(&mut progress),
    )?;

    let built = src.join("vmlinux");
    let bytes = fs::read(&built).map_err(KernelError::io("reading", &built))?;
    let info = elf::parse(&bytes).map_err(|source| KernelError::Elf {
        path: built.clone(),
        source,
    })?;
    if info.pvh_entry.is_none() {
        return Err(KernelError::NoPvhNote { path: built });
    }
    drop(bytes);

    // Assemble the cache entry beside the final name, then rename it into place.
    let staging = work.join("out");
    fs::create_dir_all(&staging).map_err(KernelError::io("creating", &staging))?;
    copy(&built, &staging.join("vmlinux"))?;
    copy(&config_path, &staging.join("config"))?;
    let key_json = serde_json::to_vec_pretty(&key).map_err(|e| KernelError::Io {
        action: "serialising",
        path: staging.join("key.json"),
        source: io::Error::other(e),
    })?;
    let kj = staging.join("key.json");
    fs::write(&kj, key_json).map_err(KernelError::io("writing", &kj))?;
    log.line(&format!(
        "carapace-image: kernel built in {:.0?}",
        started.elapsed()
    ))?;
    drop(log);
    copy(&log_path, &staging.join("build.log"))?;
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(KernelError::io("removing old", &dir))?;
    }
    fs::rename(&staging, &dir).map_err(KernelError::io("moving into place", &dir))?;
    fs::remove_dir_all(&work).map_err(KernelError::io("removing", &work))?;
    tracing::info!(
        "kernel: built in {:.0?}, cached in {}",
        started.elapsed(),
        dir.display()
    );
    Ok(BuiltKernel {
        key,
        vmlinux: dir.join("vmlinux"),
        dir,
        cached: false,
    })
}

fn copy(from: &Path, to: &Path) -> Result<(), KernelError> {
    fs::copy(from, to).map(|_| ()).map_err(|source| {
        if source.kind() == io::ErrorKind::StorageFull {
            KernelError::DiskFull {
                path: to.to_owned(),
                available_mib: 0,
                needed_mib: 0,
                detail: format!(" (copying {})", from.display()),
            }
        } else {
            KernelError::Io {
                action: "copying into",
                path: to.to_owned(),
                source,
            }
        }
    })
}

/// Removes variables a parent `make` or `cargo` may have set, which would change how the
/// kernel's `make` schedules jobs.
fn clean_env(cmd: &mut Command) {
    for v in ["MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CARGO_MAKEFLAGS"] {
        cmd.env_remove(v);
    }
    cmd.env("LC_ALL", "C")
        .env("KBUILD_BUILD_USER", "carapace")
        .env("KBUILD_BUILD_HOST", "carapace")
        .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
        .env("KBUILD_BUILD_VERSION", "1");
}

fn make(src: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(src).args(args);
    clean_env(&mut cmd);
    cmd
}

/// The build log file, plus a bounded tail kept in memory for error messages.
struct Log {
    file: io::BufWriter<File>,
    path: PathBuf,
    tail: std::collections::VecDeque<String>,
}

impl Log {
    fn create(path: &Path) -> Result<Self, KernelError> {
        let file = File::create(path).map_err(KernelError::io("creating", path))?;
        Ok(Self {
            file: io::BufWriter::new(file),
            path: path.to_owned(),
            tail: Default::default(),
        })
    }

    fn line(&mut self, l: &str) -> Result<(), KernelError> {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(l.to_owned());
        writeln!(self.file, "{l}").map_err(KernelError::io("writing", &self.path))
    }

    fn tail(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Reports compile progress: a line per [`Progress::EVERY`] objects or per
/// [`Progress::PERIOD`], whichever comes first.
struct Progress {
    started: Instant,
    last: Instant,
    objects: usize,
    last_objects: usize,
}

impl Progress {
    const EVERY: usize = 200;
    const PERIOD: Duration = Duration::from_secs(30);

    fn new(started: Instant) -> Self {
        Self {
            started,
            last: Instant::now(),
            objects: 0,
            last_objects: 0,
        }
    }

    fn line(&mut self, l: &str) {
        if is_object_line(l) {
            self.objects += 1;
        }
        if self.objects >= self.last_objects + Self::EVERY || self.last.elapsed() >= Self::PERIOD {
            self.last = Instant::now();
            self.last_objects = self.objects;
            tracing::info!(
                "kernel: {} objects built, {}s elapsed",
                self.objects,
                self.started.elapsed().as_secs()
            );
        }
    }
}

/// Kbuild prints one `  CC      path.o`-style line per object it builds.
pub(crate) fn is_object_line(l: &str) -> bool {
    let mut words = l.split_whitespace();
    matches!(words.next(), Some("CC" | "AS" | "LD" | "AR" | "HOSTCC"))
        && words
            .next()
            .is_some_and(|p| p.ends_with(".o") || p.ends_with(".a"))
}

/// Runs one build step with stdout and stderr merged into the log, line by line.
fn run_step(
    step: &str,
    mut cmd: Command,
    log: &mut Log,
    disk: &Path,
    mut progress: Option<&mut Progress>,
) -> Result<(), KernelError> {
    log.line(&format!("carapace-image: === {step}: {cmd:?}"))?;
    let (reader, writer) = io::pipe().map_err(KernelError::io("creating a pipe for", &log.path))?;
    let writer2 = writer
        .try_clone()
        .map_err(KernelError::io("creating a pipe for", &log.path))?;
    cmd.stdout(writer)
        .stderr(writer2)
        .stdin(std::process::Stdio::null());
    let mut child = cmd.spawn().map_err(|source| KernelError::StepFailed {
        step: step.to_owned(),
        status: format!("could not start: {source}"),
        log: log.path.clone(),
        tail: String::new(),
    })?;
    // Close our copies of the write end so EOF arrives when the child exits.
    drop(cmd);
    let mut no_space = false;
    for line in BufReader::new(reader).split(b'\n') {
        let line = line.map_err(KernelError::io("reading output of", Path::new(step)))?;
        let line = String::from_utf8_lossy(&line);
        no_space |= line.contains("No space left on device");
        log.line(&line)?;
        if let Some(p) = progress.as_deref_mut() {
            p.line(&line);
        }
    }
    let status: ExitStatus = child
        .wait()
        .map_err(KernelError::io("waiting for", Path::new(step)))?;
    if status.success() {
        return Ok(());
    }
    let _ = log.file.flush();
    if no_space {
        return Err(KernelError::DiskFull {
            path: disk.to_owned(),
            available_mib: available_mib(disk).unwrap_or(0),
            needed_mib: NEEDED_DISK_MIB,
            detail: format!(
                " (step `{step}` failed: No space left on device; log {})",
                log.path.display()
            ),
        });
    }
    Err(KernelError::StepFailed {
        step: step.to_owned(),
        status: status.to_string(),
        log: log.path.clone(),
        tail: log.tail(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_kbuild_object_lines() {
        assert!(is_object_line("  CC      kernel/fork.o"));
        assert!(is_object_line("  AS      arch/x86/entry/entry_64.o"));
        assert!(is_object_line("  AR      fs/built-in.a"));
        assert!(!is_object_line("  LD      vmlinux"));
        assert!(!is_object_line("  SYNC    include/config/auto.conf"));
        assert!(!is_object_line("make[1]: Entering directory"));
        assert!(!is_object_line(""));
    }

    #[test]
    fn missing_source_package_says_how_to_install() {
        let e = KernelSource::locate("linux-source-0.0-does-not-exist").unwrap_err();
        assert!(matches!(e, KernelError::SourceNotInstalled { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("apt-get install linux-source-0.0-does-not-exist"),
            "{msg}"
        );
    }

    #[test]
    fn installed_source_package_is_found() {
        // scripts/setup.sh installs linux-source-6.1.
        let s = KernelSource::locate("linux-source-6.1").unwrap();
        assert!(s.version.starts_with("6.1."), "{s:?}");
        assert!(s.tarball.is_file());
    }

    #[test]
    fn failed_step_reports_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::create(&dir.path().join("build.log")).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "for i in $(seq 1 100); do echo line$i; done; echo oops >&2; exit 3",
        ]);
        let e = run_step("demo", cmd, &mut log, dir.path(), None).unwrap_err();
        let KernelError::StepFailed { tail, status, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(status.contains('3'), "{status}");
        assert!(tail.ends_with("line100\noops"), "{tail}");
        assert!(!tail.contains("line50\n"));
        drop(log);
        let full = fs::read_to_string(dir.path().join("build.log")).unwrap();
        assert!(full.contains("line1\n") && full.contains("oops"));
    }

    #[test]
    fn enospc_in_output_is_reported_as_disk_full() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::create(&dir.path().join("build.log")).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'cc1: fatal error: x.o: No space left on device'; exit 1",
        ]);
        let e = run_step("make vmlinux", cmd, &mut log, dir.path(), None).unwrap_err();
        assert!(matches!(e, KernelError::DiskFull { .. }), "{e:?}");
        assert!(e.to_string().contains("No space left on device"));
    }
}
