//! The container table (ids to containers, with a reservation while a create is under
//! way) and the container record, whose state changes only through its
//! [`Lifecycle`](super::state::Lifecycle).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use oci_spec::runtime::LinuxSeccomp;

use super::state::{CState, Lifecycle, Op, StateError};
use super::{CoreError, Result};
use crate::cgroup::Cgroup;
use crate::ids::validate_id;
use crate::process::{Proc, StatusReader};

/// What StartContainer needs of a created container: the pipe its init waits on and the
/// status pipe that reports the exec.
#[derive(Debug)]
pub struct StartPipe {
    pub fd: OwnedFd,
    pub status: StatusReader,
}

/// One container.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub init: Arc<Proc>,
    pub cgroup: Option<Cgroup>,
    lifecycle: Lifecycle,
    start: Mutex<Option<StartPipe>>,
    /// Exec id -> process; `None` while that exec is being started (the id is taken).
    execs: Mutex<HashMap<String, Option<Arc<Proc>>>>,
    /// The spec's seccomp profile, applied to the init and to every exec (as runc does).
    pub seccomp: Option<LinuxSeccomp>,
    /// The init is pid 1 of a pid namespace created for it (else the namespace is joined
    /// or the VM's, and holds other processes).
    pub own_pidns: bool,
    /// oom_kill count already reported.
    pub oom_seen: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every value these locks guard is replaced whole: a panic cannot leave it half-made.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Container {
    /// A created container (state `created`) whose init waits on `start`.
    pub fn new(
        id: String,
        init: Arc<Proc>,
        cgroup: Option<Cgroup>,
        start: StartPipe,
        seccomp: Option<LinuxSeccomp>,
        own_pidns: bool,
    ) -> Self {
        Self {
            id,
            init,
            cgroup,
            lifecycle: Lifecycle::default(),
            start: Mutex::new(Some(start)),
            execs: Mutex::default(),
            seccomp,
            own_pidns,
            oom_seen: Mutex::new(0),
        }
    }

    /// The current state.
    pub fn state(&self) -> CState {
        self.lifecycle.get(self.init.exited().is_some())
    }

    /// Checks and moves the state for `op` atomically (see [`Lifecycle::begin`]).
    pub fn begin(&self, op: Op) -> std::result::Result<CState, StateError> {
        self.lifecycle
            .begin(&self.id, op, self.init.exited().is_some())
    }

    /// Ends a transitional state (see [`Lifecycle::settle`]).
    pub fn settle(&self, from: CState, to: CState) -> bool {
        self.lifecycle.settle(from, to)
    }

    /// Takes the start pipe (once: Start uses it, or a removal closes it so that a
    /// never-started init exits).
    pub fn take_start(&self) -> Option<StartPipe> {
        lock(&self.start).take()
    }

    /// The process `exec_id` ("" = the init).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        validate_id("exec id", exec_id)?;
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .flatten()
            .ok_or_else(|| CoreError::NoProcess {
                container_id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    /// Takes exec id `exec_id` for an exec being started (ALREADY_EXISTS if taken).
    pub fn reserve_exec(&self, exec_id: &str) -> Result<()> {
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(CoreError::Exists {
                what: "exec",
                id: exec_id.to_owned(),
            });
        }
        execs.insert(exec_id.to_owned(), None);
        Ok(())
    }

    /// Ends a reservation: the started exec, or (None) the id is free again.
    pub fn finish_exec(&self, exec_id: &str, proc: Option<Arc<Proc>>) {
        let mut execs = lock(&self.execs);
        match proc {
            Some(p) => {
                execs.insert(exec_id.to_owned(), Some(p));
            }
            None => {
                execs.remove(exec_id);
            }
        }
    }

    /// The init and every started exec.
    pub fn processes(&self) -> Vec<Arc<Proc>> {
        let execs = lock(&self.execs);
        std::iter::once(self.init.clone())
            .chain(execs.values().flatten().cloned())
            .collect()
    }
}

#[derive(Debug)]
enum Slot {
    /// A create of this id is under way.
    Creating,
    Ready(Arc<Container>),
}

/// Container id -> container.
#[derive(Debug, Default)]
pub struct Table {
    map: Mutex<HashMap<String, Slot>>,
}

impl Table {
    /// Takes `id` for a create (ALREADY_EXISTS if taken, by a container or another create).
    pub fn reserve(&self, id: &str) -> Result<()> {
        let mut map = lock(&self.map);
        if map.contains_key(id) {
            return Err(CoreError::Exists {
                what: "container",
                id: id.to_owned(),
            });
        }
        map.insert(id.to_owned(), Slot::Creating);
        Ok(())
    }

    /// Ends a reservation: the created container, or (None) the id is free again.
    pub fn finish(&self, id: &str, c: Option<Arc<Container>>) {
        let mut map = lock(&self.map);
        match c {
            Some(c) => {
                map.insert(id.to_owned(), Slot::Ready(c));
            }
            None => {
                map.remove(id);
            }
        }
    }

    /// The container `id` (validated first).
    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        validate_id("container id", id)?;
        match lock(&self.map).get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Creating) => Err(CoreError::BeingCreated(id.to_owned())),
            None => Err(CoreError::NoContainer(id.to_owned())),
        }
    }

    /// Removes container `id` (a reservation stays).
    pub fn remove(&self, id: &str) {
        let mut map = lock(&self.map);
        if matches!(map.get(id), Some(Slot::Ready(_))) {
            map.remove(id);
        }
    }

    /// Every container (not the ones being created).
    pub fn all(&self) -> Vec<Arc<Container>> {
        lock(&self.map)
            .values()
            .filter_map(|s| match s {
                Slot::Ready(c) => Some(c.clone()),
                Slot::Creating => None,
            })
            .collect()
    }
}
