//! `carapace events`: a container's statistics and OOM kills as runc prints them, one JSON
//! object per line: `{"type": "stats", "id": ID, "data": STATS}` and
//! `{"type": "oom", "id": ID}`.
//!
//! The statistics come from the guest agent (the container's cgroup v2 in the guest,
//! [`ContainerStats`]) and are shaped like runc's: CPU times in nanoseconds, memory usage
//! and limit, swap, the raw `memory.stat` counters, pids, and block IO per device as
//! `ioServiceBytesRecursive`/`ioServicedRecursive` entries.

use std::time::Duration;

use serde_json::{Value, json};

use crate::agent::{AgentError, ContainerStats, Session};
use crate::sandbox::{Runtime, SandboxError};
use crate::state::Status;

/// Errors of `events`.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// Reaching the container (state, status, session).
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// A stats or OOM request.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Writing an event failed (the reader went away).
    #[error("writing an event")]
    Write(#[source] std::io::Error),
}

/// One block IO counter of a device: its runc `op` name and how to read it.
type IoCounter = (&'static str, fn(&carapace_protocol::agent::IoEntry) -> u64);

/// The stats event of container `id`.
pub fn stats_event(id: &str, s: &ContainerStats) -> Value {
    let cpu = s.cpu.as_ref().cloned().unwrap_or_default();
    let mem = s.memory.as_ref().cloned().unwrap_or_default();
    let pids = s.pids.as_ref().cloned().unwrap_or_default();
    let events = s.memory_events.as_ref().cloned().unwrap_or_default();
    let io = s.io.as_ref().map(|io| io.usage.clone()).unwrap_or_default();
    let per_device = |op_values: &[IoCounter]| -> Vec<Value> {
        io.iter()
            .flat_map(|e| {
                op_values.iter().map(move |(op, value)| {
                    json!({"major": e.major, "minor": e.minor, "op": op, "value": value(e)})
                })
            })
            .collect()
    };
    let bytes = per_device(&[("Read", |e| e.rbytes), ("Write", |e| e.wbytes)]);
    let ios = per_device(&[("Read", |e| e.rios), ("Write", |e| e.wios)]);
    json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {
                "usage": {
                    "total": cpu.usage_usec.saturating_mul(1000),
                    "user": cpu.user_usec.saturating_mul(1000),
                    "kernel": cpu.system_usec.saturating_mul(1000),
                },
                "throttling": {
                    "periods": cpu.nr_periods,
                    "throttledPeriods": cpu.nr_throttled,
                    "throttledTime": cpu.throttled_usec.saturating_mul(1000),
                },
            },
            "memory": {
                "cache": mem.file,
                "usage": {"usage": mem.usage, "limit": mem.usage_limit, "failcnt": events.max},
                "swap": {"usage": mem.swap_usage, "limit": mem.swap_limit, "failcnt": 0},
                "raw": {
                    "anon": mem.anon,
                    "file": mem.file,
                    "kernel_stack": mem.kernel_stack,
                    "slab": mem.slab,
                    "sock": mem.sock,
                    "shmem": mem.shmem,
                    "file_mapped": mem.file_mapped,
                    "file_dirty": mem.file_dirty,
                    "file_writeback": mem.file_writeback,
                    "pgfault": mem.pgfault,
                    "pgmajfault": mem.pgmajfault,
                    "inactive_anon": mem.inactive_anon,
                    "active_anon": mem.active_anon,
                    "inactive_file": mem.inactive_file,
                    "active_file": mem.active_file,
                    "unevictable": mem.unevictable,
                    "oom": events.oom,
                    "oom_kill": events.oom_kill,
                },
            },
            "pids": {"current": pids.current, "limit": pids.limit},
            "blkio": {
                "ioServiceBytesRecursive": bytes,
                "ioServicedRecursive": ios,
            },
        },
    })
}

/// The OOM event of container `id`.
pub fn oom_event(id: &str) -> Value {
    json!({"type": "oom", "id": id})
}

/// Checks that `id` is running and opens a session to its agent.
async fn running_session(rt: &Runtime, id: &str) -> Result<Session, SandboxError> {
    let st = rt.store.load(id)?;
    let status = rt.live_status(&st);
    if status != Status::Running {
        return Err(SandboxError::WrongStatus {
            id: id.to_owned(),
            status: status.as_str(),
            op: "report events",
        });
    }
    rt.connect(&st).await
}

/// One stats event of running container `id` (`events --stats`).
pub async fn stats_once(rt: &Runtime, id: &str) -> Result<Value, EventsError> {
    let agent = running_session(rt, id).await?;
    Ok(stats_event(id, &agent.stats(id).await?))
}

/// Writes a stats event of running container `id` every `interval` and an OOM event for
/// every OOM kill in it, to `out` (one JSON object per line), until the container stops.
pub async fn stream(
    rt: &Runtime,
    id: &str,
    interval: Duration,
    mut out: impl std::io::Write,
) -> Result<(), EventsError> {
    let agent = running_session(rt, id).await?;
    let (tx, mut ooms) = tokio::sync::mpsc::unbounded_channel();
    let watcher = {
        let agent = agent.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            // OOM kills of every container of the VM: keep this one's
            while let Ok(cid) = agent.next_oom_event().await {
                if cid == id && tx.send(()).is_err() {
                    return;
                }
            }
        })
    };
    let mut tick = tokio::time::interval(interval);
    let result = loop {
        let event = tokio::select! {
            _ = tick.tick() => {
                let live = rt.store.load(id).map(|st| rt.live_status(&st));
                if !matches!(live, Ok(Status::Running)) {
                    break Ok(());
                }
                match agent.stats(id).await {
                    Ok(s) => stats_event(id, &s),
                    // stopped meanwhile
                    Err(_) if !matches!(rt.store.load(id).map(|st| rt.live_status(&st)), Ok(Status::Running)) => break Ok(()),
                    Err(e) => break Err(e.into()),
                }
            }
            Some(()) = ooms.recv() => oom_event(id),
        };
        if let Err(e) = writeln!(out, "{event}").and_then(|()| out.flush()) {
            break Err(EventsError::Write(e));
        }
    };
    watcher.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_protocol::agent::{CpuStat, IoEntry, IoStat, MemoryEvents, MemoryStat, PidsStat};

    #[test]
    fn stats_have_runcs_shape_and_units() {
        let s = ContainerStats {
            pids: Some(PidsStat {
                current: 3,
                limit: 55,
                ..Default::default()
            })
            .into(),
            cpu: Some(CpuStat {
                usage_usec: 1500,
                user_usec: 1000,
                system_usec: 500,
                nr_periods: 4,
                nr_throttled: 1,
                throttled_usec: 20,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStat {
                usage: 4096,
                usage_limit: 100_663_296,
                anon: 1024,
                ..Default::default()
            })
            .into(),
            io: Some(IoStat {
                usage: vec![IoEntry {
                    major: 254,
                    minor: 0,
                    rbytes: 10,
                    wbytes: 20,
                    rios: 1,
                    wios: 2,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .into(),
            memory_events: Some(MemoryEvents {
                max: 2,
                oom_kill: 1,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let e = stats_event("c1", &s);
        assert_eq!(e["type"], "stats");
        assert_eq!(e["id"], "c1");
        let d = &e["data"];
        assert_eq!(d["cpu"]["usage"]["total"], 1_500_000);
        assert_eq!(d["cpu"]["usage"]["kernel"], 500_000);
        assert_eq!(d["cpu"]["throttling"]["throttledTime"], 20_000);
        assert_eq!(d["memory"]["usage"]["usage"], 4096);
        assert_eq!(d["memory"]["usage"]["limit"], 100_663_296);
        assert_eq!(d["memory"]["usage"]["failcnt"], 2);
        assert_eq!(d["memory"]["raw"]["oom_kill"], 1);
        assert_eq!(d["pids"], json!({"current": 3, "limit": 55}));
        assert_eq!(
            d["blkio"]["ioServiceBytesRecursive"],
            json!([
                {"major": 254, "minor": 0, "op": "Read", "value": 10},
                {"major": 254, "minor": 0, "op": "Write", "value": 20},
            ])
        );
        assert_eq!(d["blkio"]["ioServicedRecursive"][1]["value"], 2);
        assert_eq!(oom_event("c1"), json!({"type": "oom", "id": "c1"}));
        // an agent that reports nothing gives zeros, not a failure
        let empty = stats_event("c1", &ContainerStats::default());
        assert_eq!(empty["data"]["pids"]["current"], 0);
    }
}
