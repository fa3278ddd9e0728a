//! The shim's task vocabulary: errors, process states, exits and the events for
//! containerd.

use std::path::PathBuf;
use std::time::SystemTime;

use carapace_runtime::agent::AgentError;

use crate::backend::BackendError;
use crate::pod::PodError;
use crate::stdio::{StdioError, StdioPaths};

/// Errors of task operations.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No such container or process.
    #[error("{kind} {id} not found")]
    NotFound {
        /// "container" or "process".
        kind: &'static str,
        /// Its id (`container/exec`).
        id: String,
    },
    /// A signal for a process that has exited. containerd (CRI's StopContainer and
    /// StopPodSandbox among others) treats this like runc's "process already finished": a
    /// not-found, so the caller goes on to wait and delete.
    #[error("process {id} already finished")]
    Finished {
        /// Which process.
        id: String,
    },
    /// The id is taken.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// "container" or "process".
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The operation does not fit the process's state.
    #[error("cannot {op} {id}: it is {state}")]
    WrongState {
        /// What was asked.
        op: &'static str,
        /// Which process.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// The bundle's pod annotations.
    #[error("bundle of {id}")]
    Pod {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: PodError,
    },
    /// Opening stdio.
    #[error("stdio of {id}")]
    Stdio {
        /// The process.
        id: String,
        /// Why.
        #[source]
        source: StdioError,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The guest agent failed.
    #[error("agent request for {id} failed")]
    Agent {
        /// The process.
        id: String,
        /// Why.
        #[source]
        source: Box<AgentError>,
    },
    /// The bundle's spec cannot be read or is invalid.
    #[error("spec of {id}")]
    Spec {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: carapace_runtime::oci::SpecError,
    },
}

/// A process's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Created (or, for an exec, registered), not started.
    Created,
    /// Running.
    Running,
    /// Frozen by `pause` (the container's init only).
    Paused,
    /// Exited.
    Stopped,
}

impl ProcState {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcState::Created => "created",
            ProcState::Running => "running",
            ProcState::Paused => "paused",
            ProcState::Stopped => "stopped",
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status (128 + signal when killed).
    pub status: u32,
    /// When.
    pub at: SystemTime,
}

/// A snapshot of one process, for `state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Container id.
    pub id: String,
    /// Exec id, empty for the init.
    pub exec_id: String,
    /// The container's bundle.
    pub bundle: PathBuf,
    /// Pid (0 until started).
    pub pid: u32,
    /// State.
    pub state: ProcState,
    /// Stdio.
    pub stdio: StdioPaths,
    /// Exit, once stopped.
    pub exit: Option<Exit>,
}

/// Events for containerd, in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A container was created.
    Create {
        /// Container.
        id: String,
        /// Bundle.
        bundle: PathBuf,
        /// Stdio.
        stdio: StdioPaths,
        /// Pid.
        pid: u32,
    },
    /// A container's init started.
    Start {
        /// Container.
        id: String,
        /// Pid.
        pid: u32,
    },
    /// An exec was registered.
    ExecAdded {
        /// Container.
        id: String,
        /// Exec.
        exec_id: String,
    },
    /// An exec started.
    ExecStarted {
        /// Container.
        id: String,
        /// Exec.
        exec_id: String,
        /// Pid.
        pid: u32,
    },
    /// A process exited (exactly once per started process).
    Exit {
        /// Container.
        id: String,
        /// Exec, empty for the init (containerd wants the container id there then).
        exec_id: String,
        /// Pid.
        pid: u32,
        /// How.
        exit: Exit,
    },
    /// A container's processes were frozen.
    Paused {
        /// Container.
        id: String,
    },
    /// A paused container was thawed.
    Resumed {
        /// Container.
        id: String,
    },
    /// The guest kernel's OOM killer killed a process of the container.
    Oom {
        /// Container.
        id: String,
    },
    /// A container was deleted.
    Delete {
        /// Container.
        id: String,
        /// Pid.
        pid: u32,
        /// How it had ended.
        exit: Exit,
    },
}
