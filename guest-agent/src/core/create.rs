//! CreateContainer: checks the OCI spec, makes the cgroup, spawns the `__init` helper and
//! waits until the init is set up and waits for Start.

use std::sync::Arc;

use oci_spec::runtime::{LinuxResources, Process, Spec};

use super::table::{Container, StartPipe};
use super::{Core, CoreError, Result};
use crate::cgroup::{Cgroup, CgroupError};
use crate::ids::validate_id;
use crate::init::{InitConfig, InitKind};
use carapace_errors::chain;

impl Core {
    /// Creates container `id` from an OCI spec (JSON), in state `created`.
    pub async fn create_container(&self, id: &str, spec_json: &[u8]) -> Result<()> {
        validate_id("container id", id)?;
        let spec: Spec = serde_json::from_slice(spec_json).map_err(|e| CoreError::Invalid {
            field: "spec_json",
            reason: e.to_string(),
        })?;
        let process = check_spec(id, &spec)?;
        self.containers.reserve(id)?;
        let result = self.create_inner(id, spec, process).await;
        match result {
            Ok(c) => {
                self.containers.finish(id, Some(c));
                Ok(())
            }
            Err(e) => {
                self.containers.finish(id, None);
                Err(e)
            }
        }
    }

    async fn create_inner(&self, id: &str, spec: Spec, process: Process) -> Result<Arc<Container>> {
        let namespaces = crate::namespaces::plan(&spec)
            .and_then(|p| crate::namespaces::check_paths(&p).map(|()| p))
            .map_err(|e| CoreError::Invalid {
                field: "spec.linux.namespaces",
                reason: chain(&e),
            })?;
        let own_pidns = namespaces
            .iter()
            .any(|p| p.ns == crate::namespaces::NsType::Pid && p.path.is_none());
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        let cgroup = match &self.cgroups {
            Some(root) => {
                let cg = root.create(id)?;
                let events = cg.path().join("memory.events");
                if let Err(e) = self.oom_watch.watch(&events) {
                    if events.exists() {
                        tracing::warn!(container = id, error = %chain(&e), "OOM kills of this container will not be reported");
                    } else {
                        tracing::debug!(container = id, "no memory controller: no OOM events");
                    }
                }
                if let Some(Err(e)) = resources.as_ref().map(|r| cg.apply(r)) {
                    let _ = cg.remove().await;
                    return Err(e.into());
                }
                Some(cg)
            }
            None if resources.as_ref().is_some_and(has_limits) => {
                return Err(CoreError::Cgroup(CgroupError::Unavailable));
            }
            None => None,
        };
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        if let Some(s) = &seccomp {
            // Compile once here so a bad profile is a typed error at create time.
            crate::seccomp::compile(s).map_err(|e| CoreError::Invalid {
                field: "spec.linux.seccomp",
                reason: chain(&e),
            })?;
        }
        let cfg = InitConfig {
            tty: process.terminal().unwrap_or(false),
            process,
            cgroup_procs: cgroup.as_ref().map(Cgroup::procs_file),
            seccomp: seccomp.clone(),
            wait_start: true,
            kind: InitKind::Create {
                id: id.to_owned(),
                spec: Box::new(spec),
                namespaces,
            },
        };
        let spawned = match crate::process::spawn(&cfg, &self.reaper).await {
            Ok(s) => s,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.remove().await;
                }
                return Err(e.into());
            }
        };
        let mut status = spawned.status;
        let ready = status.expect_ready().await;
        let start = match (ready, spawned.start) {
            (Ok(()), Some(fd)) => StartPipe { fd, status },
            (result, _) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(spawned.proc.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                spawned.proc.wait().await;
                if let Some(cg) = &cgroup {
                    let _ = cg.remove().await;
                }
                return Err(match result {
                    Err(e) => e.into(),
                    Ok(()) => CoreError::Spawn(crate::process::SpawnError::Protocol {
                        expected: "a start pipe",
                    }),
                });
            }
        };
        tracing::info!(container = id, pid = spawned.proc.pid, "container created");
        Ok(Arc::new(Container::new(
            id.to_owned(),
            spawned.proc,
            cgroup,
            start,
            seccomp,
            own_pidns,
        )))
    }
}

/// The checks that need no process: returns the spec's process.
fn check_spec(id: &str, spec: &Spec) -> Result<Process> {
    let process = spec.process().clone().ok_or(CoreError::Invalid {
        field: "spec.process",
        reason: "missing".into(),
    })?;
    validate_process(&process, "spec.process")?;
    let root = spec.root().as_ref().ok_or(CoreError::Invalid {
        field: "spec.root",
        reason: "missing".into(),
    })?;
    if !root.path().is_absolute() || !root.path().is_dir() {
        return Err(CoreError::Invalid {
            field: "spec.root.path",
            reason: format!(
                "{} is not an absolute path to a directory",
                root.path().display()
            ),
        });
    }
    for d in spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        crate::init::device_kind(d).map_err(|reason| CoreError::Invalid {
            field: "spec.linux.devices",
            reason,
        })?;
    }
    if spec.hooks().is_some() {
        // Hook paths are host executables run in the runtime's namespaces: the host
        // side (runtime/src/oci.rs) strips them; they are never run in the guest.
        tracing::warn!(container = %id, "spec.hooks ignored: OCI hooks are not run in the guest");
    }
    for m in spec.mounts().iter().flatten() {
        if !m.destination().is_absolute() {
            return Err(CoreError::Invalid {
                field: "spec.mounts[].destination",
                reason: format!("{} is not absolute", m.destination().display()),
            });
        }
    }
    Ok(process)
}

fn has_limits(r: &LinuxResources) -> bool {
    r.memory()
        .as_ref()
        .is_some_and(|m| m.limit().is_some() || m.reservation().is_some())
        || r.cpu()
            .as_ref()
            .is_some_and(|c| c.quota().is_some() || c.shares().is_some() || c.cpus().is_some())
        || r.pids().is_some()
        || r.unified().as_ref().is_some_and(|u| !u.is_empty())
}

/// Checks a process spec (the init's, or an exec's: `field` names it in errors).
pub(super) fn validate_process(p: &Process, field: &'static str) -> Result<()> {
    let invalid = |reason: String| CoreError::Invalid { field, reason };
    match p.args() {
        Some(a) if !a.is_empty() && !a[0].is_empty() => {}
        _ => return Err(invalid("args is empty".into())),
    }
    if !p.cwd().is_absolute() {
        return Err(invalid(format!(
            "cwd {} is not absolute",
            p.cwd().display()
        )));
    }
    for e in p.env().iter().flatten() {
        if !e.contains('=') {
            return Err(invalid(format!("env entry {e:?} has no '='")));
        }
    }
    Ok(())
}
