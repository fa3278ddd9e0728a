//! The agent's core, free of wire types (no ttrpc, no protobuf: `crate::service` converts
//! requests and maps [`CoreError`] to ttrpc status codes). It owns the container table
//! and each container's state machine ([`state`]); the requests are grouped by concern:
//!
//! - [`table`]: the container table and the [`Container`](table::Container) record;
//! - [`state`]: the per-container state machine with atomic transitions;
//! - `create`: CreateContainer (spec checks, cgroup, the `__init` helper);
//! - `containers`: start, exec, remove, pause/resume, signals, waits, process lists,
//!   resources, the orderly stop of every container;
//! - `stdio`: reads of stdout/stderr, stdin writes and close, terminal size;
//! - `oom`: the OOM event queue fed by `crate::oom`'s wake-ups;
//! - `sandbox`: the sandbox (shares, hostname, sysctls, `lo` up, the network through
//!   `crate::network`), the guest clock, the online vCPUs, power-off.

mod containers;
mod create;
mod oom;
mod sandbox;
pub mod state;
mod stdio;
pub mod table;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cgroup::{CgroupError, CgroupRoot};
use crate::ids::IdError;
use crate::network::NetError;
use crate::process::SpawnError;
use crate::reaper::Reaper;
use carapace_errors::chain;

#[cfg(test)]
pub(crate) use containers::kill_error;
pub use sandbox::{SandboxSpec, Share};
pub use state::{CState, Op, StateError};
pub use stdio::{Chunk, Stream};

/// Why a request failed. `crate::service` gives each kind its ttrpc status code.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("container {0:?} not found")]
    NoContainer(String),
    #[error("sandbox {0:?} not found")]
    NoSandbox(String),
    #[error("process {exec_id:?} not found in container {container_id:?}")]
    NoProcess {
        container_id: String,
        exec_id: String,
    },
    #[error("{what} {id:?} already exists")]
    Exists { what: &'static str, id: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The container's state refuses the request.
    #[error(transparent)]
    State(#[from] StateError),
    /// A create of this id is under way.
    #[error("container {0:?} is being created")]
    BeingCreated(String),
    /// One process's state refuses the request (it exited, its stdin is closed).
    #[error("container {id:?} is {state}, {op} needs {needed}")]
    Process {
        id: String,
        state: &'static str,
        op: &'static str,
        needed: &'static str,
    },
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is refused in host mode")]
    HostMode(&'static str),
    /// A request out of the sandbox's order (ConfigureNetwork before CreateSandbox, or
    /// twice).
    #[error("{0}")]
    Order(&'static str),
    #[error(transparent)]
    Network(#[from] NetError),
    /// SetOnlineCpus failed.
    #[error(transparent)]
    Cpus(#[from] crate::cpus::CpuError),
}

pub type Result<T> = std::result::Result<T, CoreError>;

/// Where the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 in the VM.
    Guest,
    /// A process on the host (tests): no power-off, no guest clock, no virtio-fs.
    Host,
}

/// Agent-wide settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub cgroup_root: Option<PathBuf>,
    /// How long an orderly shutdown (Ctrl-Alt-Del in the guest, SIGINT/SIGTERM in host
    /// mode) gives containers between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// Where the guest's CPUs are onlined and offlined (SetOnlineCpus):
    /// [`crate::cpus::SYSFS_CPU_ROOT`], a scratch tree in tests.
    pub cpu_sysfs: PathBuf,
}

/// Default of [`Config::stop_grace`]: well within the VMM's default shutdown timeout (10 s).
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);

/// Why the server should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    /// The sandbox was destroyed (DestroySandbox): in the guest, power off.
    PowerOff,
    /// SIGINT: in the guest, the kernel's Ctrl-Alt-Del (the VMM's shutdown request, with
    /// RB_DISABLE_CAD set); the containers were stopped in order (see [`Core::stop_all`]).
    Interrupted,
}

/// Sets the realtime clock (a parameter so that tests need not change the host's).
pub type SetClock = fn(nix::sys::time::TimeSpec) -> nix::Result<()>;

fn set_realtime_clock(ts: nix::sys::time::TimeSpec) -> nix::Result<()> {
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
}

/// The state shared by all connections.
#[derive(Debug)]
pub struct Core {
    config: Config,
    reaper: Reaper,
    cgroups: Option<CgroupRoot>,
    containers: table::Table,
    sandbox: Mutex<Option<String>>,
    /// ConfigureNetwork succeeded or is under way (once per sandbox).
    network: std::sync::atomic::AtomicBool,
    /// Mount points of the virtio-fs shares mounted for the sandbox, in mount order.
    shares: Mutex<Vec<PathBuf>>,
    oom: oom::OomQueue,
    oom_watch: Arc<crate::oom::OomWatcher>,
    shutdown: tokio::sync::mpsc::UnboundedSender<ShutdownKind>,
    set_clock: SetClock,
}

impl Core {
    /// Creates the core and starts its reaper and OOM watcher tasks (inside a tokio
    /// runtime).
    pub fn new(
        config: Config,
        shutdown: tokio::sync::mpsc::UnboundedSender<ShutdownKind>,
    ) -> std::io::Result<Arc<Self>> {
        Self::with_clock(config, shutdown, set_realtime_clock)
    }

    /// [`Core::new`] with another way to set the clock.
    pub fn with_clock(
        config: Config,
        shutdown: tokio::sync::mpsc::UnboundedSender<ShutdownKind>,
        set_clock: SetClock,
    ) -> std::io::Result<Arc<Self>> {
        Self::with_reaper(config, shutdown, set_clock, Reaper::default())
    }

    /// [`Core::with_clock`] collecting exits into `reaper` (whose reaping task this
    /// starts). Every reaper of a process drains `waitpid(-1)`: cores sharing one process
    /// (unit tests) share one reaper, or one would take the exits another waits for.
    pub(crate) fn with_reaper(
        config: Config,
        shutdown: tokio::sync::mpsc::UnboundedSender<ShutdownKind>,
        set_clock: SetClock,
        reaper: Reaper,
    ) -> std::io::Result<Arc<Self>> {
        reaper.start()?;
        let cgroups = match &config.cgroup_root {
            Some(p) => match CgroupRoot::init(p) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "cgroups disabled");
                    None
                }
            },
            None => None,
        };
        let core = Arc::new(Self {
            config,
            reaper,
            cgroups,
            containers: table::Table::default(),
            sandbox: Mutex::default(),
            network: Default::default(),
            shares: Mutex::default(),
            oom: oom::OomQueue::default(),
            oom_watch: Arc::new(crate::oom::OomWatcher::new()),
            shutdown,
            set_clock,
        });
        oom::spawn_poller(&core);
        Ok(core)
    }
}

#[cfg(test)]
pub(crate) mod tests;
