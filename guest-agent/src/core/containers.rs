//! Requests on created containers: start, exec, removal, pause/resume, signals, waits,
//! process lists, resources, and the orderly stop of every container. Each one that
//! depends on the container's state begins with [`Container::begin`] (atomic check and
//! move) and ends its transitional state with [`Container::settle`].

use std::sync::Arc;

use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxResources, Process};

use super::state::{CState, Op, StateError};
use super::table::Container;
use super::{Core, CoreError, Result};
use crate::cgroup::{Cgroup, CgroupError};
use crate::init::{InitConfig, InitKind};
use crate::process::Proc;
use crate::reaper::Exit;
use carapace_errors::chain;

/// The error of a failed `kill(pid, sig)` of a process this agent still had as live. ESRCH
/// means the reaper collected it in between (its exit is on the way to the process's
/// state): the same answer as for a process already known to have stopped, which the host
/// takes as "already finished", not an internal error.
pub(crate) fn kill_error(id: &str, pid: i32, sig: Signal, e: nix::Error) -> CoreError {
    if e == nix::Error::ESRCH {
        stopped(id)
    } else {
        CoreError::Io {
            op: format!("kill({pid}, {sig})"),
            source: e.into(),
        }
    }
}

fn stopped(id: &str) -> CoreError {
    CoreError::Process {
        id: id.to_owned(),
        state: "stopped",
        op: "signal",
        needed: "a live process",
    }
}

fn kill(pid: i32, sig: Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
}

impl Core {
    pub(super) fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers.get(id)
    }

    pub(super) fn process(&self, cid: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Proc>)> {
        let c = self.container(cid)?;
        let p = c.process(exec_id)?;
        Ok((c, p))
    }

    fn cgroup_of(c: &Container) -> Result<&Cgroup> {
        c.cgroup
            .as_ref()
            .ok_or(CoreError::Cgroup(CgroupError::Unavailable))
    }

    /// Starts a created container; returns its init's pid. Of concurrent starts exactly
    /// one proceeds; the others get the state error.
    pub async fn start_container(&self, id: &str) -> Result<u32> {
        let c = self.container(id)?;
        c.begin(Op::Start)?;
        let result = Self::start_init(&c).await;
        // On failure the init can never run (its start pipe is gone): stopped.
        let to = if result.is_ok() {
            CState::Running
        } else {
            CState::Stopped
        };
        c.settle(CState::Starting, to);
        result
    }

    async fn start_init(c: &Container) -> Result<u32> {
        let Some(mut pipe) = c.take_start() else {
            // Only a removal, which began after this start, takes the pipe without a start.
            return Err(CoreError::State(StateError {
                id: c.id.clone(),
                state: c.state(),
                op: Op::Start,
            }));
        };
        nix::unistd::write(&pipe.fd, b"s").map_err(|e| CoreError::Io {
            op: format!("starting container {}", c.id),
            source: e.into(),
        })?;
        drop(pipe.fd);
        pipe.status.expect_exec().await?;
        Ok(c.init.pid.unsigned_abs())
    }

    /// Runs a process (OCI process JSON) in a running container; returns its pid.
    pub async fn exec_process(&self, cid: &str, exec_id: &str, process_json: &[u8]) -> Result<u32> {
        let c = self.container(cid)?;
        crate::ids::validate_id("exec id", exec_id)?;
        c.begin(Op::Exec)?;
        let process: Process =
            serde_json::from_slice(process_json).map_err(|e| CoreError::Invalid {
                field: "process_json",
                reason: e.to_string(),
            })?;
        super::create::validate_process(&process, "process_json")?;
        c.reserve_exec(exec_id)?;
        let result = self.spawn_exec(&c, process).await;
        let pid = result.as_ref().ok().map(|p| p.pid.unsigned_abs());
        c.finish_exec(exec_id, result.as_ref().ok().cloned());
        result?;
        Ok(pid.unwrap_or_default())
    }

    async fn spawn_exec(&self, c: &Container, process: Process) -> Result<Arc<Proc>> {
        let cfg = InitConfig {
            tty: process.terminal().unwrap_or(false),
            process,
            cgroup_procs: c.cgroup.as_ref().map(Cgroup::procs_file),
            // runc semantics: an exec gets the container's seccomp profile; its identity,
            // capabilities, rlimits and no_new_privileges come from its own process spec.
            seccomp: c.seccomp.clone(),
            wait_start: false,
            kind: InitKind::Exec { pid: c.init.pid },
        };
        let spawned = crate::process::spawn(&cfg, &self.reaper).await?;
        let mut st = spawned.status;
        st.expect_exec().await?;
        Ok(spawned.proc)
    }

    /// Removes a container in any state: kills every process of it (a created init exits
    /// when its start pipe closes), waits for the init, removes the cgroup. Refused only
    /// while another removal of it is under way.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let before = c.begin(Op::Remove)?;
        if let Err(e) = self.remove_inner(&c).await {
            // Give it back so that the removal can be retried.
            c.settle(CState::Removing, before);
            return Err(e);
        }
        self.containers.remove(id);
        tracing::info!(container = id, "container removed");
        Ok(())
    }

    async fn remove_inner(&self, c: &Container) -> Result<()> {
        // Unblock a never-started init: closing the start pipe makes it exit.
        drop(c.take_start());
        self.kill_all(c)?;
        if c.init.pid > 0 {
            c.init.wait().await;
        }
        if let Some(cg) = &c.cgroup {
            let _ = cg.freeze(false).await;
            cg.kill_all()?;
            cg.remove().await?;
        }
        Ok(())
    }

    fn kill_all(&self, c: &Container) -> Result<()> {
        if c.init.exited().is_some() {
            return Ok(());
        }
        if let Some(cg) = &c.cgroup {
            cg.kill_all()?;
        } else if c.own_pidns {
            // Killing the pid-namespace init kills everything in it.
            let _ = kill(c.init.pid, Signal::SIGKILL);
        } else {
            for pid in self.container_pids(c)? {
                let _ = kill(pid as i32, Signal::SIGKILL);
            }
        }
        Ok(())
    }

    /// Freezes a running container (its cgroup).
    pub async fn pause_container(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        c.begin(Op::Pause)?;
        let r = Self::freeze(&c, true).await;
        let to = if r.is_ok() {
            CState::Paused
        } else {
            CState::Running
        };
        c.settle(CState::Pausing, to);
        r
    }

    /// Thaws a paused container.
    pub async fn resume_container(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        c.begin(Op::Resume)?;
        let r = Self::freeze(&c, false).await;
        let to = if r.is_ok() {
            CState::Running
        } else {
            CState::Paused
        };
        c.settle(CState::Resuming, to);
        r
    }

    async fn freeze(c: &Container, frozen: bool) -> Result<()> {
        Ok(Self::cgroup_of(c)?.freeze(frozen).await?)
    }

    /// Applies an OCI `linux.resources` object (JSON) to a container's cgroup.
    pub fn update_resources(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let c = self.container(id)?;
        let res: LinuxResources =
            serde_json::from_slice(resources_json).map_err(|e| CoreError::Invalid {
                field: "resources_json",
                reason: e.to_string(),
            })?;
        Ok(Self::cgroup_of(&c)?.apply(&res)?)
    }

    /// Reads a container's cgroup with `read` (the cgroup module makes the statistics).
    pub fn with_cgroup<T>(&self, id: &str, read: impl FnOnce(&Cgroup) -> T) -> Result<T> {
        let c = self.container(id)?;
        Ok(read(Self::cgroup_of(&c)?))
    }

    /// Every pid of a container, sorted.
    pub fn list_processes(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.container(id)?;
        let mut pids = self.container_pids(&c)?;
        pids.sort_unstable();
        Ok(pids)
    }

    /// Every pid in the container: from its cgroup, else by pid namespace.
    fn container_pids(&self, c: &Container) -> Result<Vec<u32>> {
        if let Some(cg) = &c.cgroup {
            return Ok(cg.pids()?);
        }
        if !c.own_pidns {
            // Without a cgroup and a pid namespace of its own, only the processes the
            // agent started are known to be the container's.
            return Ok(c
                .processes()
                .iter()
                .filter(|p| p.pid > 0 && p.exited().is_none())
                .map(|p| p.pid.unsigned_abs())
                .collect());
        }
        let target =
            std::fs::read_link(format!("/proc/{}/ns/pid", c.init.pid)).map_err(|source| {
                CoreError::Io {
                    op: format!("reading pid namespace of {}", c.init.pid),
                    source,
                }
            })?;
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc")
            .map_err(|source| CoreError::Io {
                op: "listing /proc".into(),
                source,
            })?
            .flatten()
        {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_link(e.path().join("ns/pid")).ok().as_ref() == Some(&target) {
                out.push(pid);
            }
        }
        Ok(out)
    }

    /// Sends signal number `signal` to one process, or (`all`, init) to every process of
    /// the container.
    pub fn signal_process(&self, cid: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let (c, p) = self.process(cid, exec_id)?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
            .ok_or_else(|| CoreError::Invalid {
                field: "signal",
                reason: format!("{signal} is not a signal number"),
            })?;
        if p.exited().is_some() || p.pid <= 0 {
            return Err(stopped(&c.id));
        }
        if all && exec_id.is_empty() {
            for pid in self.container_pids(&c)? {
                let _ = kill(pid as i32, sig);
            }
        } else {
            kill(p.pid, sig).map_err(|e| kill_error(&c.id, p.pid, sig, e))?;
        }
        Ok(())
    }

    /// Waits for a process to exit (the init: only once started).
    pub async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<Exit> {
        let (c, p) = self.process(cid, exec_id)?;
        if exec_id.is_empty() {
            c.begin(Op::Wait)?;
        }
        Ok(p.wait().await)
    }

    /// Orderly shutdown of every container: SIGTERM to each process of each started
    /// container (a paused one is thawed first, or the signal would wait), up to
    /// `config.stop_grace` for the inits to exit, then the usual removal (SIGKILL to what
    /// is left, cgroups removed). Logs how each container ended.
    pub async fn stop_all(&self) {
        let grace = self.config.stop_grace;
        let mut waiting = Vec::new();
        for c in self.containers.all() {
            let state = c.state();
            if matches!(
                state,
                CState::Created | CState::Starting | CState::Stopped | CState::Removing
            ) {
                continue;
            }
            if matches!(state, CState::Pausing | CState::Paused | CState::Resuming)
                && let Some(cg) = &c.cgroup
                && let Err(e) = cg.freeze(false).await
            {
                tracing::warn!(container = %c.id, error = %chain(&e), "thawing before stop");
            }
            match self.container_pids(&c) {
                Ok(pids) => {
                    for pid in pids {
                        let _ = kill(pid as i32, Signal::SIGTERM);
                    }
                }
                Err(e) => {
                    tracing::warn!(container = %c.id, error = %chain(&e), "listing processes to stop")
                }
            }
            tracing::info!(container = %c.id, grace_ms = grace.as_millis() as u64, "stopping container (SIGTERM)");
            waiting.push(c);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for c in waiting {
            match tokio::time::timeout_at(deadline, c.init.wait()).await {
                Ok(exit) => {
                    tracing::info!(container = %c.id, status = exit.status(), "container stopped")
                }
                Err(_) => tracing::warn!(
                    container = %c.id,
                    "container did not stop within the grace period: killing it (SIGKILL)"
                ),
            }
        }
        self.destroy_all().await;
    }

    /// Removes every container (SIGKILL), logging failures.
    pub(super) async fn destroy_all(&self) {
        for c in self.containers.all() {
            if let Err(e) = self.remove_container(&c.id).await {
                tracing::warn!(container = %c.id, error = %chain(&e), "removing container during destroy");
            }
        }
    }
}
