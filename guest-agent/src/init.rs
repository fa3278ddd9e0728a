//! The container-side half: `carapace-agent __init`, a fresh single-threaded process the
//! agent spawns for each container init and each exec. It reads its [`InitConfig`] from a
//! pipe, enters or creates the namespaces, forks the real process (which the agent, a
//! (sub)reaper, inherits when this helper exits), and in that child sets up the rootfs,
//! mounts, identity, capabilities, rlimits and seccomp before exec'ing the workload.
//!
//! Status protocol on the status pipe (helper/child -> agent), one line each:
//! `P<pid>` (the workload pid, from the helper), `R` (set up, waiting for start),
//! `E<message>` (failure). The status pipe is close-on-exec in the child, so the agent
//! sees EOF exactly when exec succeeded.
//!
//! With a terminal, a fourth descriptor is a unix socket: the child allocates the pty in
//! the container (see [`crate::console`]) and sends the master back on it before `R`.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::{Gid, Pid, Uid};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, LinuxSeccomp, Mount, Process, Spec};
use serde::{Deserialize, Serialize};

use crate::ids::secure_join;
use crate::namespaces::{NsPlan, NsType};

mod rootfs;
pub use rootfs::device_kind;
use rootfs::setup_rootfs;

/// Largest accepted init config (a spec is a few KiB; this bounds the read).
pub const MAX_CONFIG_LEN: u64 = 4 << 20;

/// What the helper is asked to do.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    pub kind: InitKind,
    pub process: Process,
    /// `cgroup.procs` of the container's cgroup, joined before forking.
    pub cgroup_procs: Option<PathBuf>,
    pub seccomp: Option<LinuxSeccomp>,
    pub tty: bool,
    /// Wait for a byte on the start pipe before exec.
    pub wait_start: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum InitKind {
    /// New container: namespaces created or joined as planned (see
    /// [`crate::namespaces`]), rootfs from the spec.
    Create {
        /// The container's id (for its startContainer hooks' state).
        id: String,
        spec: Box<Spec>,
        namespaces: Vec<NsPlan>,
    },
    /// Join the namespaces of the running container whose init is `pid` (every one that
    /// differs from the agent's).
    Exec { pid: i32 },
}

/// Errors of the container setup (reported to the agent as `E<message>`).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{op}")]
    Sys {
        op: String,
        #[source]
        source: nix::Error,
    },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Config(String),
    /// A startContainer hook failed.
    #[error("{0}")]
    Hook(String),
    #[error(transparent)]
    Path(#[from] crate::ids::IdError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("capabilities: {0}")]
    Caps(String),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
}

trait Ctx<T> {
    fn ctx(self, op: impl FnOnce() -> String) -> Result<T, InitError>;
}
impl<T> Ctx<T> for nix::Result<T> {
    fn ctx(self, op: impl FnOnce() -> String) -> Result<T, InitError> {
        self.map_err(|source| InitError::Sys { op: op(), source })
    }
}
impl<T> Ctx<T> for std::io::Result<T> {
    fn ctx(self, op: impl FnOnce() -> String) -> Result<T, InitError> {
        self.map_err(|source| InitError::Io { op: op(), source })
    }
}

/// Entry point of `carapace-agent __init`. `console_fd` is the socket that carries the
/// terminal back to the agent (only with a terminal). Never returns.
pub fn main(config_fd: RawFd, status_fd: RawFd, start_fd: RawFd, console_fd: Option<RawFd>) -> ! {
    // SAFETY: the agent passes these three descriptors, open and owned by nobody else in
    // this freshly exec'd process; each is wrapped exactly once.
    let status = unsafe { File::from_raw_fd(status_fd) };
    let mut status = status;
    let result = (|| -> Result<(), InitError> {
        // SAFETY: see above.
        let config = unsafe { File::from_raw_fd(config_fd) };
        // SAFETY: see above.
        let start = unsafe { OwnedFd::from_raw_fd(start_fd) };
        // SAFETY: see above.
        let console = console_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        let mut text = Vec::new();
        config
            .take(MAX_CONFIG_LEN + 1)
            .read_to_end(&mut text)
            .ctx(|| "reading init config".into())?;
        if text.len() as u64 > MAX_CONFIG_LEN {
            return Err(InitError::Config("config larger than 4 MiB".into()));
        }
        let cfg: InitConfig =
            serde_json::from_slice(&text).map_err(|e| InitError::Config(e.to_string()))?;
        if cfg.tty != console.is_some() {
            return Err(InitError::Config(
                "a console socket is passed exactly when process.terminal is set".into(),
            ));
        }
        helper(cfg, &mut status, start, console)
    })();
    if let Err(e) = result {
        let _ = status_line(&mut status, &format!("E{}", carapace_errors::chain(&e)));
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// Writes one status line with a single write(2): the helper's parent (`P<pid>`) and its
/// forked child (`R`, `E...`) share the pipe, and a line split over several writes (as
/// `writeln!` may do) could interleave with the other's ("PR" was seen under load). Lines
/// are far below PIPE_BUF, so one write is atomic. A newline inside `line` (an error
/// message can hold one) becomes a space: one status is one line.
fn status_line(status: &mut File, line: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.replace('\n', " ").as_bytes());
    buf.push(b'\n');
    status.write_all(&buf)
}

fn helper(
    cfg: InitConfig,
    status: &mut File,
    start: OwnedFd,
    console: Option<OwnedFd>,
) -> Result<(), InitError> {
    if let Some(procs) = &cfg.cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .ctx(|| format!("joining cgroup {}", procs.display()))?;
    }
    match &cfg.kind {
        InitKind::Create { namespaces, .. } => enter_namespaces(namespaces)?,
        InitKind::Exec { pid } => join_container_namespaces(*pid)?,
    }
    match crate::sys::fork_single_threaded().ctx(|| "fork".into())? {
        nix::unistd::ForkResult::Parent { child } => {
            // Only the child sends on the console socket: the agent sees EOF on it when
            // the child is gone.
            drop(console);
            status_line(status, &format!("P{child}")).ctx(|| "writing status".into())?;
            Ok(())
        }
        nix::unistd::ForkResult::Child => {
            let result = child(&cfg, status, start, console);
            if let Err(e) = result {
                let _ = status_line(status, &format!("E{}", carapace_errors::chain(&e)));
                std::process::exit(127);
            }
            unreachable!("child() only returns on error");
        }
    }
}

/// Joins the namespaces given by path, then creates the others (after the cgroup was
/// joined, so a new cgroup namespace is rooted at the container's cgroup). Every path is
/// opened before any namespace changes.
fn enter_namespaces(plan: &[NsPlan]) -> Result<(), InitError> {
    let mut joins = Vec::new();
    let mut create = CloneFlags::empty();
    for p in plan {
        match &p.path {
            Some(path) => {
                let f = File::open(path)
                    .ctx(|| format!("opening {} namespace {}", p.ns.proc_name(), path.display()))?;
                joins.push((p, f));
            }
            None => create |= p.ns.flag(),
        }
    }
    for (p, f) in &joins {
        // The flag makes the kernel check that the file is a namespace of that type.
        setns(f.as_fd(), p.ns.flag()).ctx(|| {
            format!(
                "joining {} namespace {}",
                p.ns.proc_name(),
                p.path.as_deref().unwrap_or(Path::new("")).display()
            )
        })?;
    }
    if !create.is_empty() {
        unshare(create).ctx(|| format!("unshare({create:?})"))?;
    }
    Ok(())
}

/// Joins every namespace of the process `pid` (a container init) that differs from ours.
fn join_container_namespaces(pid: i32) -> Result<(), InitError> {
    let mut fds = Vec::new();
    for ns in NsType::ALL {
        let name = ns.proc_name();
        let theirs = format!("/proc/{pid}/ns/{name}");
        let target = std::fs::read_link(&theirs).ctx(|| format!("reading {theirs}"))?;
        let ours = std::fs::read_link(format!("/proc/self/ns/{name}"))
            .ctx(|| format!("reading /proc/self/ns/{name}"))?;
        if target != ours {
            fds.push((ns, File::open(&theirs).ctx(|| format!("opening {theirs}"))?));
        }
    }
    // NsType::ALL ends with the mount namespace: after it, /proc may be the container's.
    for (ns, f) in &fds {
        setns(f.as_fd(), ns.flag()).ctx(|| format!("setns({}) of pid {pid}", ns.proc_name()))?;
    }
    Ok(())
}

fn child(
    cfg: &InitConfig,
    status: &mut File,
    start: OwnedFd,
    console: Option<OwnedFd>,
) -> Result<(), InitError> {
    let p = &cfg.process;
    // Until exec, this process runs the agent's binary inside the container: keep other
    // container processes from ptrace-attaching to it or opening /proc/<pid>/exe etc.
    // (exec resets it).
    nix::sys::prctl::set_dumpable(false).ctx(|| "prctl(PR_SET_DUMPABLE, 0)".into())?;
    nix::unistd::setsid().ctx(|| "setsid".into())?;
    if let InitKind::Create { spec, .. } = &cfg.kind {
        setup_rootfs(spec)?;
    }
    // The terminal comes from the container's devpts: after pivot_root (create), or in the
    // joined mount namespace (exec), /dev/ptmx is the container's.
    if let Some(sock) = console {
        crate::console::setup_in_container(sock, p.user().uid())?;
    }
    for r in p.rlimits().iter().flatten() {
        let name = serde_json::to_value(r.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let res = rlimit_resource(&name)
            .ok_or_else(|| InitError::Config(format!("process.rlimits: unknown type {name:?}")))?;
        nix::sys::resource::setrlimit(res, r.soft(), r.hard())
            .ctx(|| format!("setrlimit({name})"))?;
    }
    if let Some(adj) = p.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .ctx(|| "writing oom_score_adj".into())?;
    }
    let cwd = p.cwd();
    nix::unistd::chdir(cwd).ctx(|| format!("chdir to process.cwd {}", cwd.display()))?;
    if let Some(mask) = p.user().umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    let programs = match &cfg.seccomp {
        Some(s) => crate::seccomp::compile(s)?,
        None => Vec::new(),
    };
    let nnp = p.no_new_privileges().unwrap_or(false);
    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it while root.
    if !nnp {
        crate::seccomp::install(&programs)?;
    }
    set_identity(p)?;
    if nnp {
        nix::sys::prctl::set_no_new_privs().ctx(|| "prctl(PR_SET_NO_NEW_PRIVS)".into())?;
    }
    let (path, argv, envp) = prepare_exec(p)?;
    // Hand the remaining descriptors to exec: the status pipe closes on success.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(status),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .ctx(|| "FD_CLOEXEC on status pipe".into())?;
    if cfg.wait_start {
        status_line(status, "R").ctx(|| "writing status".into())?;
        let mut b = [0u8; 1];
        let n = File::from(start)
            .read(&mut b)
            .ctx(|| "waiting for start".into())?;
        if n == 0 {
            return Err(InitError::Config(
                "start pipe closed: container removed before start".into(),
            ));
        }
    } else {
        drop(start);
    }
    if let InitKind::Create { spec, id, .. } = &cfg.kind {
        crate::start_hooks::run(spec, &crate::start_hooks::state(spec, id))?;
    }
    if nnp {
        crate::seccomp::install(&programs)?;
    }
    let e = nix::unistd::execve(&path, &argv, &envp).unwrap_err();
    Err(InitError::Sys {
        op: format!("exec {:?}", path),
        source: e,
    })
}

fn rlimit_resource(name: &str) -> Option<nix::sys::resource::Resource> {
    use nix::sys::resource::Resource as R;
    Some(match name {
        "RLIMIT_AS" => R::RLIMIT_AS,
        "RLIMIT_CORE" => R::RLIMIT_CORE,
        "RLIMIT_CPU" => R::RLIMIT_CPU,
        "RLIMIT_DATA" => R::RLIMIT_DATA,
        "RLIMIT_FSIZE" => R::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => R::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => R::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => R::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => R::RLIMIT_NICE,
        "RLIMIT_NOFILE" => R::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => R::RLIMIT_NPROC,
        "RLIMIT_RSS" => R::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => R::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => R::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => R::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => R::RLIMIT_STACK,
        _ => return None,
    })
}

fn caps_of(set: Option<&oci_spec::runtime::Capabilities>) -> Result<caps::CapsHashSet, InitError> {
    let mut out = caps::CapsHashSet::new();
    for c in set.into_iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let cap: caps::Capability = name
            .parse()
            .map_err(|_| InitError::Caps(format!("unknown capability {name:?}")))?;
        out.insert(cap);
    }
    Ok(out)
}

fn set_identity(p: &Process) -> Result<(), InitError> {
    use caps::CapSet;
    let user = p.user();
    let c = p.capabilities().as_ref();
    let bounding = caps_of(c.and_then(|c| c.bounding().as_ref()))?;
    let effective = caps_of(c.and_then(|c| c.effective().as_ref()))?;
    let permitted = caps_of(c.and_then(|c| c.permitted().as_ref()))?;
    let inheritable = caps_of(c.and_then(|c| c.inheritable().as_ref()))?;
    let ambient = caps_of(c.and_then(|c| c.ambient().as_ref()))?;
    let cap_err = |what: &str, e: caps::errors::CapsError| InitError::Caps(format!("{what}: {e}"));
    // Bounding set first, while we still hold CAP_SETPCAP.
    for cap in caps::all() {
        if !bounding.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| cap_err("dropping bounding cap", e))?;
        }
    }
    let gids: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).ctx(|| "setgroups(process.user.additionalGids)".into())?;
    let gid = Gid::from_raw(user.gid());
    nix::unistd::setresgid(gid, gid, gid).ctx(|| format!("setresgid({gid})"))?;
    nix::sys::prctl::set_keepcaps(true).ctx(|| "prctl(PR_SET_KEEPCAPS)".into())?;
    let uid = Uid::from_raw(user.uid());
    nix::unistd::setresuid(uid, uid, uid).ctx(|| format!("setresuid({uid})"))?;
    // capset(2) checks each change against the current sets: inheritable first (while
    // CAP_SETPCAP may still be effective), then effective (must stay within the current
    // permitted), then permitted (must keep containing effective).
    caps::set(None, CapSet::Inheritable, &inheritable)
        .map_err(|e| cap_err("setting inheritable", e))?;
    caps::set(None, CapSet::Effective, &effective).map_err(|e| cap_err("setting effective", e))?;
    caps::set(None, CapSet::Permitted, &permitted).map_err(|e| cap_err("setting permitted", e))?;
    caps::set(None, CapSet::Ambient, &ambient).map_err(|e| cap_err("setting ambient", e))?;
    nix::sys::prctl::set_keepcaps(false).ctx(|| "prctl(PR_SET_KEEPCAPS, 0)".into())?;
    Ok(())
}

fn cstr(s: &str, what: &str) -> Result<CString, InitError> {
    CString::new(s).map_err(|_| InitError::Config(format!("{what} contains a NUL byte")))
}

fn prepare_exec(p: &Process) -> Result<(CString, Vec<CString>, Vec<CString>), InitError> {
    let args = p
        .args()
        .as_ref()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| InitError::Config("process.args is empty".into()))?;
    let env: Vec<String> = p.env().clone().unwrap_or_default();
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let prog = &args[0];
    let resolved = if prog.contains('/') {
        // checked here, before the container is reported created, as a name found in PATH
        // is: a create that cannot start its process fails, not the start
        let md = std::fs::metadata(prog)
            .map_err(|e| InitError::Config(format!("executable {prog:?}: {e}")))?;
        let runnable = md.is_file()
            && nix::unistd::access(prog.as_str(), nix::unistd::AccessFlags::X_OK).is_ok();
        if !runnable {
            return Err(InitError::Config(format!(
                "executable {prog:?} is not a file this user may execute"
            )));
        }
        PathBuf::from(prog)
    } else {
        path_var
            .split(':')
            .map(|d| Path::new(d).join(prog))
            .find(|c| {
                std::fs::metadata(c)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .ok_or_else(|| {
                InitError::Config(format!(
                    "executable {prog:?} not found in PATH {path_var:?}"
                ))
            })?
    };
    let path = cstr(&resolved.to_string_lossy(), "process.args[0]")?;
    let argv = args
        .iter()
        .map(|a| cstr(a, "process.args"))
        .collect::<Result<_, _>>()?;
    let envp = env
        .iter()
        .map(|e| cstr(e, "process.env"))
        .collect::<Result<_, _>>()?;
    Ok((path, argv, envp))
}

/// Re-export so the agent can refer to the pid type without nix.
pub type ChildPid = Pid;
