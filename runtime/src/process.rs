//! Helper processes (fs daemon, VMM, IO relay): spawning them detached with their own log,
//! identifying them across pid reuse, waiting for their sockets, and stopping them.
//!
//! A process is identified by its pid *and* its start time (field 22 of `/proc/<pid>/stat`,
//! clock ticks since boot): a later CLI call that finds a recorded pid whose start time
//! differs knows the original process is gone and never signals the stranger.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// Poll interval while waiting for a socket or an exit.
const POLL: Duration = Duration::from_millis(10);
/// Bytes of a log's end quoted in errors.
const LOG_TAIL: u64 = 2048;

/// Errors about helper processes.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start {what} ({program})")]
    Spawn {
        /// Which helper.
        what: &'static str,
        /// Its binary.
        program: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Its log file could not be opened.
    #[error("cannot open log file {path} for {what}")]
    Log {
        /// Which helper.
        what: &'static str,
        /// The log.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The process exited before its socket appeared.
    #[error("{what} (pid {pid}) exited before creating {socket}; its log {log} ends with:\n{tail}")]
    ExitedEarly {
        /// Which helper.
        what: &'static str,
        /// Its pid.
        pid: i32,
        /// The socket waited for.
        socket: PathBuf,
        /// Its log.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// The socket did not appear in time.
    #[error("{what} (pid {pid}) did not create {socket} within {timeout:?}; see {log}")]
    SocketTimeout {
        /// Which helper.
        what: &'static str,
        /// Its pid.
        pid: i32,
        /// The socket waited for.
        socket: PathBuf,
        /// How long.
        timeout: Duration,
        /// Its log.
        log: PathBuf,
    },
    /// The process did not die even after SIGKILL.
    #[error("{what} (pid {pid}) did not exit after SIGKILL")]
    Unkillable {
        /// Which helper.
        what: &'static str,
        /// Its pid.
        pid: i32,
    },
    /// Signalling failed for another reason than the process being gone.
    #[error("cannot signal {what} (pid {pid})")]
    Signal {
        /// Which helper.
        what: &'static str,
        /// Its pid.
        pid: i32,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// Waiting for it to end failed (no pidfd).
    #[error("cannot watch {what} (pid {pid}) for its exit")]
    Watch {
        /// Which helper.
        what: &'static str,
        /// Its pid.
        pid: i32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A process as recorded in the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRecord {
    /// Its pid.
    pub pid: i32,
    /// Its start time (clock ticks after boot), from `/proc/<pid>/stat`.
    pub start_time: u64,
}

/// State letter and start time of `pid`, from `/proc/<pid>/stat`; None if no such process.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses a `/proc/<pid>/stat` line: the command is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted after the last `)`.
fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), starttime is field 22: 18 fields further.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Whether a thread other than the leader of process `pid` still exists.
fn other_threads_alive(pid: i32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let leader = pid.to_string();
    tasks
        .flatten()
        .any(|t| t.file_name().to_str().is_some_and(|n| n != leader))
}

impl ProcessRecord {
    /// Records the running process `pid`.
    pub fn of(pid: i32) -> Option<Self> {
        stat(pid).map(|(_, start_time)| Self { pid, start_time })
    }

    /// Whether this very process still runs (not a zombie, not a reused pid). Reaps it if
    /// it is our zombie child.
    pub fn is_alive(&self) -> bool {
        match stat(self.pid) {
            Some((state, start)) if start == self.start_time => {
                // A zombie leader whose other threads still run (a multi-threaded daemon
                // whose main thread returned first) still holds its files: alive.
                if (state == 'Z' || state == 'X') && !other_threads_alive(self.pid) {
                    // Our own child (e.g. in `run` or a test): collect it.
                    let _ = waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG));
                    false
                } else {
                    true
                }
            }
            _ => false,
        }
    }

    /// Sends `sig` if the process is still this one; a vanished process is not an error.
    pub fn signal(&self, what: &'static str, sig: Signal) -> Result<(), ProcessError> {
        if !self.is_alive() {
            return Ok(());
        }
        match kill(Pid::from_raw(self.pid), sig) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(source) => Err(ProcessError::Signal {
                what,
                pid: self.pid,
                source,
            }),
        }
    }

    /// Waits up to `timeout` for the process to be gone; true if it is.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, `grace` to exit, then SIGKILL. Idempotent: a gone process is fine.
    pub fn terminate(&self, what: &'static str, grace: Duration) -> Result<(), ProcessError> {
        self.signal(what, Signal::SIGTERM)?;
        if self.wait_gone(grace) {
            return Ok(());
        }
        tracing::warn!(what, pid = self.pid, "did not exit after SIGTERM, killing");
        self.signal(what, Signal::SIGKILL)?;
        if self.wait_gone(Duration::from_secs(5)) {
            Ok(())
        } else {
            Err(ProcessError::Unkillable {
                what,
                pid: self.pid,
            })
        }
    }
}

/// Starts `cmd` detached from the caller: its own process group, stdin from /dev/null,
/// stdout and stderr appended to `log`. The process outlives the CLI call that started it.
pub fn spawn_detached(
    what: &'static str,
    cmd: Command,
    log: &Path,
) -> Result<ProcessRecord, ProcessError> {
    spawn_detached_with_fds(what, cmd, log, &[])
}

/// Most descriptors a helper can be handed (one per NIC of a VM, with room).
pub const MAX_PASSED_FDS: usize = 32;

/// [`spawn_detached`], handing the child `fds` as descriptors 3, 4, ... in order (what the
/// VM description's `tap_fd` numbers refer to). Nothing else above stderr is inherited.
pub fn spawn_detached_with_fds(
    what: &'static str,
    cmd: Command,
    log: &Path,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<ProcessRecord, ProcessError> {
    spawn_detached_in(what, cmd, log, fds, None, false)
}

/// [`spawn_detached_with_fds`], the child joining the cgroup `cgroup` before exec (so all
/// it allocates is charged there) and, with `new_pid_ns`, running as PID 1 of a PID
/// namespace of its own ([`enter_new_pid_ns`]; the record is its pid in ours).
pub fn spawn_detached_in(
    what: &'static str,
    mut cmd: Command,
    log: &Path,
    fds: &[std::os::fd::BorrowedFd<'_>],
    cgroup: Option<&crate::cgroup::Joined>,
    new_pid_ns: bool,
) -> Result<ProcessRecord, ProcessError> {
    let log_err = |source| ProcessError::Log {
        what,
        path: log.to_path_buf(),
        source,
    };
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(log_err)?;
    let err = out.try_clone().map_err(log_err)?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let passed = crate::passfd::Passed::new(fds).map_err(|source| ProcessError::Spawn {
        what,
        program: PathBuf::from(cmd.get_program()),
        source,
    })?;
    let (raw, count) = passed.raw();
    let mut join = [-1; crate::cgroup::MAX_HIERARCHIES];
    for (slot, fd) in join
        .iter_mut()
        .zip(cgroup.map(|c| c.fds()).unwrap_or_default())
    {
        *slot = fd.as_raw_fd();
    }
    let program = PathBuf::from(cmd.get_program());
    let spawn_err = |source| ProcessError::Spawn {
        what,
        program: program.clone(),
        source,
    };
    // The pid of a process started in a new PID namespace comes back through this pipe
    // (close-on-exec: neither end reaches the program).
    let pid_pipe = if new_pid_ns {
        Some(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn_err(e.into()))?)
    } else {
        None
    };
    let report = pid_pipe.as_ref().map_or(-1, |(_, w)| w.as_raw_fd());
    exec_hygiene(&mut cmd, raw, count, join, report);
    tracing::debug!(what, ?cmd, new_pid_ns, "spawning");
    let mut child = cmd.spawn().map_err(spawn_err)?;
    drop(passed);
    let pid = match pid_pipe {
        None => {
            // The child is deliberately not waited on here: it outlives this handle.
            // `is_alive` reaps it if it becomes our zombie.
            let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
            drop(child);
            pid
        }
        Some((r, w)) => {
            drop(w);
            // The intermediate process writes the pid once the new child has exec'd (which
            // `spawn` waited for) and exits: then no write end is left.
            let mut buf = [0u8; 4];
            let read = std::io::Read::read_exact(&mut fs::File::from(r), &mut buf);
            // Reap the intermediate process. The caller may reap every child itself (the
            // shim does): then it is gone already (ECHILD), and the pipe alone tells.
            match child.wait() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {}
                Err(e) => return Err(spawn_err(e)),
            }
            match read {
                Ok(()) => i32::from_ne_bytes(buf),
                Err(e) => {
                    return Err(spawn_err(std::io::Error::other(format!(
                        "the process that makes its PID namespace did not report the pid: {e}"
                    ))));
                }
            }
        }
    };
    Ok(ProcessRecord::of(pid).unwrap_or(ProcessRecord { pid, start_time: 0 }))
}

/// [`exec_hygiene`] for a helper that is handed no descriptors (OCI hooks).
pub(crate) fn hygiene(cmd: &mut Command) {
    exec_hygiene(
        cmd,
        [0; MAX_PASSED_FDS],
        0,
        [-1; crate::cgroup::MAX_HIERARCHIES],
        -1,
    );
}

/// What every helper gets before exec:
/// - no signal blocked: the CLI blocks SIGWINCH in every thread of `run`/`exec` to collect
///   it with `sigwait`, and a signal mask survives fork and exec, so a daemon (and, for the
///   host-mode agent, every container process it starts) would otherwise never see SIGWINCH;
/// - no inherited descriptor but stdin, stdout, stderr and the passed ones (`passed`, which
///   become 3, 4, ...): every other one is marked close-on-exec
///   (`close_range(3 + passed, ~0, CLOSE_RANGE_CLOEXEC)`), so the VMM and the fs daemon
///   never hold whatever the shim or the CLI had open without `O_CLOEXEC` (sockets, other
///   sandboxes' files). Marking rather than closing keeps the pipe through which `Command`
///   learns that exec failed;
/// - with `report` (a descriptor, -1 for none), a PID namespace of its own
///   ([`enter_new_pid_ns`]), entered after the cgroup and before the descriptors are
///   placed.
fn exec_hygiene(
    cmd: &mut Command,
    passed: [i32; MAX_PASSED_FDS],
    count: usize,
    join: [i32; crate::cgroup::MAX_HIERARCHIES],
    report: i32,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec and only makes system calls
    // (write, pthread_sigmask through nix with a set built on the stack, unshare, fork,
    // _exit, dup2, close_range), all async-signal-safe; it allocates nothing (the
    // descriptors are copied arrays).
    unsafe {
        cmd.pre_exec(move || {
            // first, before passfd may reuse these numbers: join the cgroup
            for fd in join.into_iter().filter(|fd| *fd >= 0) {
                join_cgroup(fd)?;
            }
            nix::sys::signal::SigSet::empty()
                .thread_set_mask()
                .map_err(std::io::Error::from)?;
            if report >= 0 {
                enter_new_pid_ns(report)?;
            }
            crate::passfd::install(&passed[..count])?;
            mark_inherited_fds_cloexec(3 + count as u32)
        });
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is open as `fd`
/// (writing `0` names the writer). Async-signal-safe (one system call).
fn join_cgroup(fd: i32) -> std::io::Result<()> {
    // SAFETY: `fd` is a descriptor the parent opened and keeps open across the fork; the
    // buffer is a static byte string whose length is passed with it.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Goes on in a new PID namespace, for a process between fork and exec: `unshare
/// (CLONE_NEWPID)` places only the caller's *next* child there, so this forks once more.
/// The new child, PID 1 of the namespace, returns and goes on to exec. The first process
/// waits until the new child has exec'd or died (the end of a close-on-exec pipe), then
/// writes the child's pid (in its own namespace, the spawner's) to `report` and exits.
/// Waiting keeps `Command::spawn` sound when the exec fails: it then waits for the first
/// process, which must not be gone (reaped by a caller that reaps every child, as the
/// shim does) before the error arrives. The new child is adopted by the spawner's
/// subreaper (or init) like any orphan, and ends the namespace when it exits.
/// Async-signal-safe.
fn enter_new_pid_ns(report: i32) -> std::io::Result<()> {
    // SAFETY: unshare takes a flag word and touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut exec = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array it is given.
    if unsafe { libc::pipe2(exec.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Above where the passed descriptors go (3, 4, ...), so that placing them cannot close
    // the new child's end early.
    let high = |fd: i32| {
        // SAFETY: fcntl takes integers; `fd` is one of the pipe's, ours.
        let h = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, crate::passfd::FLOOR) };
        // SAFETY: closes the low original, ours, duplicated (or not) just before.
        unsafe { libc::close(fd) };
        h
    };
    let (r, w) = (high(exec[0]), high(exec[1]));
    if r < 0 || w < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: this process is the single-threaded child of a fork that has not exec'd yet
    // (a `pre_exec` hook): forking it again is sound, and both sides only go on with
    // async-signal-safe calls.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            // SAFETY: closes our copy of the read end; the write end closes at exec.
            unsafe { libc::close(r) };
            Ok(())
        }
        child => {
            // SAFETY: closes our copy of the write end, ours.
            unsafe { libc::close(w) };
            let mut byte = 0u8;
            // EOF: the child exec'd or died; nothing is ever written.
            loop {
                // SAFETY: reads at most one byte into a one-byte stack buffer.
                let n = unsafe { libc::read(r, (&raw mut byte).cast(), 1) };
                if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break;
                }
            }
            let bytes = child.to_ne_bytes();
            // SAFETY: writes `bytes.len()` bytes from a stack array to a descriptor the
            // spawner keeps open until this process has exited.
            let n = unsafe { libc::write(report, bytes.as_ptr().cast(), bytes.len()) };
            let ok = usize::try_from(n) == Ok(bytes.len());
            if !ok {
                // Nobody would know the child's pid: it must not run.
                // SAFETY: kill takes a pid and a signal; `child` is our own child.
                unsafe { libc::kill(child, libc::SIGKILL) };
            }
            // SAFETY: _exit ends this intermediate process at once, running nothing of the
            // spawner's copied state (no destructors, no atexit handlers).
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
    }
}

/// `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)`: every descriptor from `first` on is
/// closed at the next exec. Async-signal-safe (one system call).
fn mark_inherited_fds_cloexec(first: u32) -> std::io::Result<()> {
    // SAFETY: close_range takes three integers and touches no memory of ours; with
    // CLOSE_RANGE_CLOEXEC it only sets a flag on descriptors.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits until `socket` exists as a unix socket, failing early when `proc_` exits.
pub fn wait_for_socket(
    what: &'static str,
    proc_: &ProcessRecord,
    socket: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(), ProcessError> {
    let deadline = Instant::now() + timeout;
    loop {
        if fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            return Ok(());
        }
        if !proc_.is_alive() {
            return Err(ProcessError::ExitedEarly {
                what,
                pid: proc_.pid,
                socket: socket.to_path_buf(),
                log: log.to_path_buf(),
                tail: log_tail(log),
            });
        }
        if Instant::now() >= deadline {
            return Err(ProcessError::SocketTimeout {
                what,
                pid: proc_.pid,
                socket: socket.to_path_buf(),
                timeout,
                log: log.to_path_buf(),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// The last bytes of a log file, for error messages.
pub fn log_tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = fs::File::open(log) else {
        return "(no log)".to_owned();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).trim_end().to_owned();
    if text.is_empty() {
        "(empty log)".to_owned()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_inherit_no_descriptor_but_stdio() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        // A descriptor the caller holds without O_CLOEXEC, as a careless library might.
        let leaky = fs::File::open("/dev/null").unwrap();
        nix::fcntl::fcntl(
            leaky.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let log = dir.path().join("fds.log");
        let mut cmd = Command::new("ls");
        cmd.arg("/proc/self/fd");
        let rec = spawn_detached("fd lister", cmd, &log).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while rec.is_alive() {
            assert!(std::time::Instant::now() < deadline, "ls did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
        let listed = fs::read_to_string(&log).unwrap();
        let fds: Vec<&str> = listed.split_whitespace().collect();
        // 0-2, and the descriptor ls itself opened to read the directory.
        assert_eq!(
            fds,
            ["0", "1", "2", "3"],
            "the caller's descriptor {} (or another) reached the helper",
            leaky.as_raw_fd()
        );
    }

    /// Whether the test runs as root (a PID namespace needs CAP_SYS_ADMIN); says it skips
    /// otherwise.
    fn as_root() -> bool {
        let root = nix::unistd::Uid::effective().is_root();
        if !root {
            eprintln!("skipped: needs root");
        }
        root
    }

    /// A helper started with `new_pid_ns` is PID 1 of a namespace of its own, recorded by
    /// its pid in ours, with the passed descriptors and the log as without it; the
    /// intermediate process is reaped. Needs root (CAP_SYS_ADMIN for the namespace).
    #[test]
    fn a_helper_can_start_as_pid_1_of_its_own_namespace() {
        if !as_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("ns.log");
        let passed = fs::File::open("/dev/null").unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo pid=$$; readlink /proc/self/fd/3; exec sleep 60");
        let rec = spawn_detached_in(
            "namespaced",
            cmd,
            &log,
            &[std::os::fd::AsFd::as_fd(&passed)],
            None,
            true,
        )
        .unwrap();
        assert!(rec.start_time != 0 && rec.is_alive());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(&log).unwrap().contains("/dev/null") {
            assert!(
                Instant::now() < deadline,
                "{}",
                fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(POLL);
        }
        assert_eq!(fs::read_to_string(&log).unwrap(), "pid=1\n/dev/null\n");
        let status = fs::read_to_string(format!("/proc/{}/status", rec.pid)).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert_eq!(
            nspid.split_whitespace().skip(1).collect::<Vec<_>>(),
            [rec.pid.to_string().as_str(), "1"],
            "{nspid}"
        );
        let ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
        assert_ne!(ns(&rec.pid.to_string()), ns("self"));
        // The init of a namespace ignores SIGTERM it has no handler for; SIGKILL ends it.
        rec.signal("namespaced", Signal::SIGKILL).unwrap();
        assert!(rec.wait_gone(Duration::from_secs(10)));
    }

    /// A program that cannot be executed in its new PID namespace is a clear error
    /// (std waits for the intermediate process then, which is still there to be waited for).
    #[test]
    fn a_missing_program_in_a_new_pid_namespace_is_an_error() {
        if !as_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let err = spawn_detached_in(
            "nothing",
            Command::new("/nonexistent/helper"),
            &dir.path().join("log"),
            &[],
            None,
            true,
        )
        .unwrap_err();
        assert!(
            matches!(&err, ProcessError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
    }

    #[test]
    fn stat_parsing_counts_fields_after_the_command() {
        let line =
            "123 (a) b) c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(line), Some(('S', 98765)));
        assert_eq!(parse_stat("123 (x"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn records_identify_live_processes_and_survive_pid_reuse() {
        let me = ProcessRecord::of(std::process::id() as i32).expect("self");
        assert!(me.is_alive());
        let reused = ProcessRecord {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_alive());
        // Signalling the "reused" record must not touch us.
        reused.terminate("test", Duration::from_millis(10)).unwrap();
        assert!(me.is_alive());
    }

    #[test]
    fn a_zombie_leader_with_live_threads_is_alive() {
        // A shell that runs a multi-threaded program is not available everywhere; use
        // ourselves: this test process has several threads, so the helper must see them.
        assert!(
            other_threads_alive(std::process::id() as i32) || {
                // Single-threaded test harness: start one to make the point.
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                let h = std::thread::spawn(move || {
                    let _ = rx.recv();
                });
                let seen = other_threads_alive(std::process::id() as i32);
                drop(tx);
                h.join().unwrap();
                seen
            }
        );
        assert!(!other_threads_alive(i32::MAX));
    }

    #[test]
    fn detached_process_is_terminated_and_reaped() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("sleep.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 600"]);
        let rec = spawn_detached("sleeper", cmd, &log).unwrap();
        assert!(rec.is_alive());
        rec.terminate("sleeper", Duration::from_secs(5)).unwrap();
        assert!(!rec.is_alive());
        assert!(!Path::new(&format!("/proc/{}", rec.pid)).exists());
        // Idempotent.
        rec.terminate("sleeper", Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn socket_wait_reports_early_exit_with_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("d.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'bad flag --frob' >&2; exit 3"]);
        let rec = spawn_detached("daemon", cmd, &log).unwrap();
        let err = wait_for_socket(
            "daemon",
            &rec,
            &tmp.path().join("s.sock"),
            &log,
            Duration::from_secs(10),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("exited before creating"), "{msg}");
        assert!(msg.contains("bad flag --frob"), "{msg}");
    }

    #[test]
    fn socket_wait_times_out_and_finds_sockets() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("d.log");
        let rec = spawn_detached(
            "daemon",
            {
                let mut c = Command::new("sleep");
                c.arg("600");
                c
            },
            &log,
        )
        .unwrap();
        let sock = tmp.path().join("s.sock");
        let err =
            wait_for_socket("daemon", &rec, &sock, &log, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, ProcessError::SocketTimeout { .. }), "{err}");
        // A regular file is not a socket.
        fs::write(&sock, b"").unwrap();
        assert!(wait_for_socket("daemon", &rec, &sock, &log, Duration::from_millis(50)).is_err());
        fs::remove_file(&sock).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        wait_for_socket("daemon", &rec, &sock, &log, Duration::from_secs(1)).unwrap();
        rec.terminate("daemon", Duration::from_secs(5)).unwrap();
    }
}
