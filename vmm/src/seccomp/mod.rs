//! Per-thread seccomp allow-lists (the `seccomp` section of the VM description).
//!
//! Every VMM thread has a kind ([`ThreadKind`]) and runs under that kind's allow-list
//! (`lists.rs`), installed by the thread itself before it touches guest state:
//! - a vCPU before its first KVM_RUN (`vmm/vcpu.rs`);
//! - a device worker first thing in its thread, before its event loop serves a queue
//!   (`virtio/worker.rs`). Workers are created by the *spawner* thread (`spawner.rs`),
//!   not by the vCPU whose DRIVER_OK activates the device, so a vCPU's list does not need
//!   the workers' syscalls (a thread inherits its creator's filter, and stacked filters
//!   allow only what both allow);
//! - the API thread before it accepts a client (its client threads inherit its list);
//! - the console writer, the lab's vCPU nudger, and the main thread once the VM runs and
//!   the API is up (`bin/carapace-vmm.rs`).
//!
//! The binary compiles every list once, at start ([`configure`]), so a list that does not
//! build stops the VMM before it creates anything. [`install`] is a no-op in a process that
//! never called [`configure`] (the library's unit tests, tools), and when the description
//! says `"off"`.
//!
//! A syscall outside the list: by default the kernel kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`): the VMM dies with SIGSYS and the kernel's audit log
//! (`dmesg`: `audit: type=1326 ... comm="vcpu0" ... syscall=N`) names the thread and the
//! syscall. For debugging, `"trap"` makes the VMM itself log the thread and syscall and
//! exit with 159, and `"log"` allows the syscall and has the kernel log it; the
//! environment variable [`ACTION_ENV`] overrides the description's action.

mod lists;
#[cfg(test)]
mod tests;
mod trap;

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompFilter, TargetArch};

pub use carapace_vm_config::{SeccompAction, SeccompConfig};

/// Overrides the description's `seccomp.action` (`kill`, `trap`, `log`, `off`): a
/// debugging aid for runs whose description one cannot edit (the end-to-end tests).
pub const ACTION_ENV: &str = "CARAPACE_VMM_SECCOMP";

/// Exit status of a VMM stopped by a trapped syscall (`"trap"`): 128 + SIGSYS.
pub const TRAP_EXIT: i32 = 128 + libc::SIGSYS;

/// Errors building or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A list could not be built into a filter.
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// A filter could not be compiled to BPF.
    #[error("cannot compile the seccomp filter of the {kind} threads")]
    Compile {
        /// Which list.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter of a {kind} thread")]
    Install {
        /// Which list.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The trap action's SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler of the trap action")]
    Handler(#[source] std::io::Error),
    /// The override in the environment is not an action.
    #[error("{ACTION_ENV}: {0}")]
    Env(String),
    /// Only x86_64 has lists.
    #[error("no seccomp allow-lists for architecture {0}")]
    UnsupportedArch(&'static str),
}

/// The kinds of VMM threads, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The main thread, once the VM runs.
    Main,
    /// A vCPU.
    Vcpu,
    /// The control API and its client threads.
    Api,
    /// The console writer.
    Console,
    /// The lab workaround that interrupts stuck vCPUs.
    Nudge,
    /// The thread that creates device workers.
    Spawner,
    /// virtio-blk worker.
    Block,
    /// virtio-rng worker.
    Rng,
    /// userspace virtio-net worker.
    Net,
    /// The worker turning vhost (vhost-net, vhost-user-fs) calls into interrupts.
    VhostIrq,
    /// virtio-vsock worker.
    Vsock,
    /// virtio-mem worker.
    Mem,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: &'static [ThreadKind] = &[
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Console,
        ThreadKind::Nudge,
        ThreadKind::Spawner,
        ThreadKind::Block,
        ThreadKind::Rng,
        ThreadKind::Net,
        ThreadKind::VhostIrq,
        ThreadKind::Vsock,
        ThreadKind::Mem,
    ];

    /// The device worker kinds (threads the spawner creates).
    pub const WORKERS: &'static [ThreadKind] = &[
        ThreadKind::Block,
        ThreadKind::Rng,
        ThreadKind::Net,
        ThreadKind::VhostIrq,
        ThreadKind::Vsock,
        ThreadKind::Mem,
    ];

    /// Short name (logs, errors).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Console => "console",
            ThreadKind::Nudge => "nudge",
            ThreadKind::Spawner => "spawner",
            ThreadKind::Block => "block",
            ThreadKind::Rng => "rng",
            ThreadKind::Net => "net",
            ThreadKind::VhostIrq => "vhost-irq",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Mem => "mem",
        }
    }

    fn index(self) -> usize {
        ThreadKind::ALL
            .iter()
            .position(|k| *k == self)
            .unwrap_or_default()
    }

    /// Kinds that create threads get a second filter answering `clone3` with ENOSYS.
    fn creates_threads(self) -> bool {
        matches!(self, ThreadKind::Api | ThreadKind::Spawner)
    }
}

/// The compiled filters of one action: per kind, the allow-list and, for kinds that create
/// threads, the `clone3` refusal.
#[derive(Debug)]
pub struct Filters {
    action: SeccompAction,
    lists: Vec<BpfProgram>,
    no_clone3: BpfProgram,
}

impl Filters {
    /// Compiles every kind's list with `action` for syscalls outside it (not `Off`), for
    /// this process (signals only to its own threads).
    pub fn compile(action: SeccompAction) -> Result<Self, SeccompError> {
        let pid = std::process::id();
        let mismatch = match action {
            SeccompAction::Kill | SeccompAction::Off => seccompiler::SeccompAction::KillProcess,
            SeccompAction::Trap => seccompiler::SeccompAction::Trap,
            SeccompAction::Log => seccompiler::SeccompAction::Log,
        };
        let lists = ThreadKind::ALL
            .iter()
            .map(|&k| {
                compile_one(
                    k.name(),
                    lists::list(k, pid)?.rules,
                    mismatch.clone(),
                    false,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut clone3 = lists::Rules::new();
        clone3.insert(libc::SYS_clone3, Vec::new());
        let no_clone3 = compile_one("clone3", clone3, seccompiler::SeccompAction::Allow, true)?;
        Ok(Filters {
            action,
            lists,
            no_clone3,
        })
    }

    /// The BPF program of `kind`'s allow-list.
    pub fn program(&self, kind: ThreadKind) -> &BpfProgram {
        &self.lists[kind.index()]
    }

    /// Installs `kind`'s filters on the calling thread (and sets its no_new_privs).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let err = |source| SeccompError::Install {
            kind: kind.name(),
            source,
        };
        trap::set_thread_kind(kind);
        // The clone3 refusal first: installing a filter takes prctl(PR_SET_NO_NEW_PRIVS),
        // which the allow-list may not have.
        if kind.creates_threads() {
            seccompiler::apply_filter(&self.no_clone3).map_err(err)?;
        }
        seccompiler::apply_filter(self.program(kind)).map_err(err)
    }
}

/// `rules` as a BPF program: listed syscalls get `Allow` (or, `invert`ed, the listed
/// syscalls get ENOSYS and the rest `mismatch`).
fn compile_one(
    kind: &'static str,
    rules: lists::Rules,
    mismatch: seccompiler::SeccompAction,
    invert: bool,
) -> Result<BpfProgram, SeccompError> {
    #[cfg(target_arch = "x86_64")]
    {
        let matched = if invert {
            seccompiler::SeccompAction::Errno(libc::ENOSYS as u32)
        } else {
            seccompiler::SeccompAction::Allow
        };
        let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .map_err(|source| SeccompError::Compile { kind, source })?;
        BpfProgram::try_from(filter).map_err(|source| SeccompError::Compile { kind, source })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, rules, mismatch, invert);
        Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
    }
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// The action to use: the environment's override ([`ACTION_ENV`]) if set, else the
/// description's.
pub fn effective_action(config: &SeccompConfig) -> Result<SeccompAction, SeccompError> {
    match std::env::var(ACTION_ENV) {
        Ok(v) => v.parse().map_err(SeccompError::Env),
        Err(_) => Ok(config.action),
    }
}

/// Compiles the filters for `action` and makes [`install`] use them from now on (once
/// per process; later calls keep the first filters). The filters hold the process id: a
/// forked child must not use its parent's. With `Trap`, installs the SIGSYS
/// handler that reports a refused syscall. `Off` installs nothing.
pub fn configure(action: SeccompAction) -> Result<(), SeccompError> {
    if action == SeccompAction::Off {
        tracing::warn!("seccomp is off: VMM threads run without syscall allow-lists");
        return Ok(());
    }
    let filters = Filters::compile(action)?;
    if action == SeccompAction::Trap {
        trap::install_handler().map_err(SeccompError::Handler)?;
    }
    if action == SeccompAction::Log {
        tracing::warn!(
            "seccomp action is log: syscalls outside the allow-lists are allowed and logged by the kernel"
        );
    }
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Whether [`configure`] set up filters (the spawner is only needed then).
pub fn configured() -> bool {
    FILTERS.get().is_some()
}

/// Installs `kind`'s filter on the calling thread, if the process configured filters.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    match FILTERS.get() {
        Some(f) => {
            f.install(kind)?;
            tracing::debug!(
                kind = kind.name(),
                action = f.action.as_str(),
                "seccomp filter installed"
            );
            Ok(())
        }
        None => Ok(()),
    }
}

/// [`install`], and a thread that cannot get its filter stops the VMM (exit code 1): it
/// must not go on unfiltered. For threads with no error path of their own.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        tracing::error!(error = %carapace_errors::Chain(&e), "stopping the VMM");
        std::process::exit(crate::exit::EXIT_VMM);
    }
}
