//! The per-container state machine. Every request that depends on a container's state
//! goes through [`Lifecycle::begin`], which checks the state and moves to the request's
//! transitional state under one lock: two concurrent starts cannot both see "created", a
//! pause cannot interleave with a resume, and nothing starts on a container that is being
//! removed. The request ends its transitional state with [`Lifecycle::settle`], which
//! moves on only if nothing (a removal) moved the container meanwhile.
//!
//! A container whose init exited after it was started is stopped whatever the stored state
//! says: the reaper, not this machine, learns about exits.

use std::sync::{Mutex, MutexGuard};

/// The state of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CState {
    /// Set up; its init waits for Start.
    Created,
    /// A Start is under way.
    Starting,
    /// Started, init alive.
    Running,
    /// A Pause is under way (freezing the cgroup).
    Pausing,
    /// Frozen.
    Paused,
    /// A Resume is under way (thawing the cgroup).
    Resuming,
    /// Started, and its init exited (or the Start failed).
    Stopped,
    /// A removal is under way.
    Removing,
}

impl CState {
    /// The name errors and logs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Pausing => "pausing",
            Self::Paused => "paused",
            Self::Resuming => "resuming",
            Self::Stopped => "stopped",
            Self::Removing => "removing",
        }
    }
}

/// A request that depends on a container's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// StartContainer: created -> starting (-> running, or stopped if it failed).
    Start,
    /// ExecProcess: needs running; moves nothing.
    Exec,
    /// PauseContainer: running -> pausing (-> paused, or back to running if it failed).
    Pause,
    /// ResumeContainer: paused -> resuming (-> running, or back to paused if it failed).
    Resume,
    /// WaitProcess on the init: needs a start first; moves nothing.
    Wait,
    /// RemoveContainer and sandbox teardown: any state but removing -> removing. Removal
    /// is forced by contract: a running or paused container is killed.
    Remove,
}

impl Op {
    /// The name errors use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Exec => "exec",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Wait => "wait",
            Self::Remove => "remove",
        }
    }

    /// What the request needs, as its error says it.
    pub fn needed(self) -> &'static str {
        match self {
            Self::Start => "created",
            Self::Exec | Self::Pause => "running",
            Self::Resume => "paused",
            Self::Wait => "started",
            Self::Remove => "not being removed",
        }
    }

    fn allowed_from(self, s: CState) -> bool {
        match self {
            Self::Start => s == CState::Created,
            Self::Exec | Self::Pause => s == CState::Running,
            Self::Resume => s == CState::Paused,
            Self::Wait => s != CState::Created,
            Self::Remove => s != CState::Removing,
        }
    }

    /// The state the request moves to when it begins (None: it only checks).
    fn moves_to(self) -> Option<CState> {
        match self {
            Self::Start => Some(CState::Starting),
            Self::Pause => Some(CState::Pausing),
            Self::Resume => Some(CState::Resuming),
            Self::Remove => Some(CState::Removing),
            Self::Exec | Self::Wait => None,
        }
    }
}

/// A request refused because of the container's state (FAILED_PRECONDITION on the wire,
/// which the host reads as "wrong state").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("container {id:?} is {}, {} needs {}", .state.name(), .op.name(), .op.needed())]
pub struct StateError {
    /// The container.
    pub id: String,
    /// Its state when the request arrived.
    pub state: CState,
    /// The request.
    pub op: Op,
}

/// One container's state, changed only under its lock.
#[derive(Debug)]
pub struct Lifecycle {
    state: Mutex<CState>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            state: Mutex::new(CState::Created),
        }
    }
}

/// The stored state with the init's exit counted.
fn effective(stored: CState, init_exited: bool) -> CState {
    match stored {
        CState::Running | CState::Pausing | CState::Paused | CState::Resuming if init_exited => {
            CState::Stopped
        }
        s => s,
    }
}

impl Lifecycle {
    fn lock(&self) -> MutexGuard<'_, CState> {
        // The lock guards one plain value: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state (`init_exited`: the reaper collected the init).
    pub fn get(&self, init_exited: bool) -> CState {
        effective(*self.lock(), init_exited)
    }

    /// Checks that container `id` may do `op` in its current state and, under the same
    /// lock, moves it to the state `op` begins with. Returns the state it was in.
    pub fn begin(&self, id: &str, op: Op, init_exited: bool) -> Result<CState, StateError> {
        let mut stored = self.lock();
        let current = effective(*stored, init_exited);
        if !op.allowed_from(current) {
            return Err(StateError {
                id: id.to_owned(),
                state: current,
                op,
            });
        }
        if let Some(next) = op.moves_to() {
            *stored = next;
        }
        Ok(current)
    }

    /// Ends a transitional state: moves from `from` to `to` unless something else (a
    /// removal) moved the container meanwhile. Returns whether it moved.
    pub fn settle(&self, from: CState, to: CState) -> bool {
        let mut stored = self.lock();
        if *stored == from {
            *stored = to;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    fn running() -> Lifecycle {
        let l = Lifecycle::default();
        l.begin("c", Op::Start, false).unwrap();
        assert!(l.settle(CState::Starting, CState::Running));
        l
    }

    #[test]
    fn of_concurrent_starts_exactly_one_wins() {
        for _ in 0..50 {
            let l = Arc::new(Lifecycle::default());
            let barrier = Arc::new(Barrier::new(8));
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let (l, barrier) = (l.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        l.begin("c", Op::Start, false)
                    })
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            assert_eq!(
                results.iter().filter(|r| r.is_ok()).count(),
                1,
                "{results:?}"
            );
            for e in results.into_iter().filter_map(Result::err) {
                assert_eq!(
                    e,
                    StateError {
                        id: "c".into(),
                        state: CState::Starting,
                        op: Op::Start
                    }
                );
            }
            assert_eq!(l.get(false), CState::Starting);
        }
    }

    #[test]
    fn start_after_exit_is_refused_naming_container_state_and_request() {
        let l = running();
        assert_eq!(l.get(true), CState::Stopped);
        let e = l.begin("web", Op::Start, true).unwrap_err();
        assert_eq!((e.state, e.op), (CState::Stopped, Op::Start));
        assert_eq!(
            e.to_string(),
            "container \"web\" is stopped, start needs created"
        );
        // A second start of a running container: the same typed refusal.
        let e = running().begin("web", Op::Start, false).unwrap_err();
        assert_eq!(e.state, CState::Running);
    }

    #[test]
    fn a_failed_start_leaves_the_container_stopped() {
        let l = Lifecycle::default();
        l.begin("c", Op::Start, false).unwrap();
        assert!(l.settle(CState::Starting, CState::Stopped));
        assert_eq!(l.get(false), CState::Stopped);
        assert!(l.begin("c", Op::Start, false).is_err());
        // Waiting for its init is allowed (it has an exit to report).
        assert_eq!(l.begin("c", Op::Wait, false), Ok(CState::Stopped));
    }

    #[test]
    fn nothing_begins_while_removing_and_removal_wins_over_a_settle() {
        let l = Lifecycle::default();
        l.begin("c", Op::Start, false).unwrap();
        // A removal during the start: forced, whatever the state.
        assert_eq!(l.begin("c", Op::Remove, false), Ok(CState::Starting));
        // The start ends: it must not bring the container back to running.
        assert!(!l.settle(CState::Starting, CState::Running));
        assert_eq!(l.get(false), CState::Removing);
        for op in [Op::Start, Op::Exec, Op::Pause, Op::Resume, Op::Remove] {
            let e = l.begin("c", op, false).unwrap_err();
            assert_eq!((e.state, e.op), (CState::Removing, op));
        }
    }

    #[test]
    fn removal_is_forced_from_every_state_but_removing() {
        // The contract the host relies on (RemoveContainer kills a running or paused
        // container, DestroySandbox removes everything): removal is never refused for a
        // running container, only while another removal is under way.
        for state in [
            CState::Created,
            CState::Running,
            CState::Paused,
            CState::Stopped,
        ] {
            let l = Lifecycle::default();
            *l.lock() = state;
            assert_eq!(l.begin("c", Op::Remove, false), Ok(state));
            let e = l.begin("c", Op::Remove, false).unwrap_err();
            assert_eq!(e.state, CState::Removing);
            // A failed removal gives the container back.
            assert!(l.settle(CState::Removing, state));
        }
    }

    #[test]
    fn pause_and_resume_do_not_interleave() {
        let l = running();
        assert_eq!(l.begin("c", Op::Pause, false), Ok(CState::Running));
        // While freezing: no second pause, no resume, no exec.
        for op in [Op::Pause, Op::Resume, Op::Exec] {
            assert_eq!(l.begin("c", op, false).unwrap_err().state, CState::Pausing);
        }
        assert!(l.settle(CState::Pausing, CState::Paused));
        assert_eq!(l.begin("c", Op::Resume, false), Ok(CState::Paused));
        assert_eq!(
            l.begin("c", Op::Pause, false).unwrap_err().state,
            CState::Resuming
        );
        // A failed thaw leaves it paused.
        assert!(l.settle(CState::Resuming, CState::Paused));
        assert_eq!(l.get(false), CState::Paused);
        // An init that exits while paused is stopped.
        assert_eq!(l.get(true), CState::Stopped);
    }

    #[test]
    fn wait_needs_a_start_and_exec_needs_running() {
        let l = Lifecycle::default();
        let e = l.begin("c", Op::Wait, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "container \"c\" is created, wait needs started"
        );
        assert_eq!(
            l.begin("c", Op::Exec, false).unwrap_err().state,
            CState::Created
        );
        // A never-started init that died stays created (it was never started).
        assert_eq!(l.get(true), CState::Created);
        let l = running();
        assert_eq!(l.begin("c", Op::Exec, false), Ok(CState::Running));
        assert_eq!(l.get(false), CState::Running, "exec moves nothing");
        assert_eq!(
            l.begin("c", Op::Exec, true).unwrap_err().state,
            CState::Stopped
        );
    }
}
