//! Helpers of the fault tests (`tests/faults_kvm.rs`, and the jail and soak tests that drive
//! `ctr` the same way): the task exits `ctr events` saw, what a sandbox may leave behind on
//! the host (processes, cgroups; mounts: [`crate::containerd::mounts_under`]), `ctr` under a
//! deadline and a task's status.

use crate::containerd::Containerd;

/// One `/tasks/exit` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskExit {
    /// The container.
    pub container: String,
    /// The process: the container id for its init, else the exec id.
    pub process: String,
    /// Its exit status (protobuf's JSON leaves out a zero).
    pub status: u64,
}

/// The `/tasks/exit` events in `ctr events` output (lines `<time> <namespace> <topic>
/// <event JSON>`).
pub fn task_exits(events: &str) -> Vec<TaskExit> {
    events
        .lines()
        .filter_map(|l| {
            let at = l.find(" /tasks/exit ")?;
            let json = &l[at + " /tasks/exit ".len()..];
            let v: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
            let s = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            Some(TaskExit {
                container: s("container_id"),
                process: s("id"),
                status: v.get("exit_status").and_then(|x| x.as_u64()).unwrap_or(0),
            })
        })
        .collect()
}

/// Pids of the processes one of whose arguments contains `needle` (this process excluded).
pub fn processes_with(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    crate::hostile::pids_where(|args| args.iter().any(|a| a.contains(needle)))
        .into_iter()
        .filter(|pid| *pid != me)
        .collect()
}

/// The processes of a sandbox that may outlive it: the VMM, the fs daemon and the shim.
pub const SANDBOX_PROCESSES: [&str; 3] = [
    "carapace-vmm",
    "carapace-fsd",
    "containerd-shim-carapace-v2",
];

/// What sandbox `id` (state directory `state`/`id`) left on the host: its state directory,
/// any VMM, fs daemon or shim, mounts under `state`, host cgroups named `id`. Empty when
/// nothing.
pub fn left_behind(state: &std::path::Path, id: &str) -> Vec<String> {
    let mut left = Vec::new();
    let dir = state.join(id);
    if dir.exists() {
        left.push(format!("state directory {}", dir.display()));
    }
    for name in SANDBOX_PROCESSES {
        let pids = processes_with(name);
        if !pids.is_empty() {
            left.push(format!("{name} {pids:?}"));
        }
    }
    let mounts = crate::containerd::mounts_under(state);
    if !mounts.is_empty() {
        left.push(format!("mounts {mounts:?}"));
    }
    let cgroups = cgroups_named(id);
    if !cgroups.is_empty() {
        left.push(format!("cgroups {cgroups:?}"));
    }
    left
}

/// Waits up to `secs` for [`left_behind`] to be empty; returns what is still left then,
/// after removing it by hand (SIGKILL to the processes, unmounting, removing the state
/// directory) so that the next case starts from nothing.
pub fn settle_leftovers(state: &std::path::Path, id: &str, secs: u64) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let left = left_behind(state, id);
        if left.is_empty() {
            return left;
        }
        if std::time::Instant::now() > deadline {
            for name in SANDBOX_PROCESSES {
                for pid in processes_with(name) {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
            crate::containerd::unmount_under(state);
            let _ = std::fs::remove_dir_all(state.join(id));
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// Host cgroup directories named `name` one or two levels under `/sys/fs/cgroup` (ctr's
/// cgroups path is `/<namespace>/<id>`).
pub fn cgroups_named(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(top) = std::fs::read_dir("/sys/fs/cgroup") else {
        return found;
    };
    for d in top.flatten().filter(|d| d.path().is_dir()) {
        let direct = d.path().join(name);
        if direct.is_dir() {
            found.push(direct.display().to_string());
        }
        if let Ok(sub) = std::fs::read_dir(d.path()) {
            for s in sub.flatten() {
                let p = s.path().join(name);
                if p.is_dir() {
                    found.push(p.display().to_string());
                }
            }
        }
    }
    found
}

/// `ctr` under a deadline of `secs`; Ok(stdout) on exit 0, else Err(what happened).
pub fn ctr(ctrd: &Containerd, secs: u64, args: &[&str]) -> Result<String, String> {
    let out = ctrd
        .ctr_command_bounded(secs)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ctr {} exited {:?}: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The task's status in `ctr task ls` (None: no task).
pub fn task_status(ctrd: &Containerd, id: &str) -> Option<String> {
    let ls = ctr(ctrd, 30, &["task", "ls"]).unwrap_or_default();
    ls.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| f.last().unwrap_or(&"").to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_read_from_ctr_events_with_a_missing_status_as_zero() {
        let text = "2026-12-06 23:00:00.1 +0000 UTC carapace-test /tasks/start {\"container_id\":\"f1\",\"pid\":9}\n\
                    2026-12-06 23:00:01.2 +0000 UTC carapace-test /tasks/exit {\"container_id\":\"f1\",\"id\":\"f1\",\"pid\":9,\"exit_status\":137,\"exited_at\":\"2026-12-06T23:00:01Z\"}\n\
                    2026-12-06 23:00:02.3 +0000 UTC carapace-test /tasks/exit {\"container_id\":\"f2\",\"id\":\"e1\",\"pid\":10}\n\
                    garbage /tasks/exit {not json\n";
        assert_eq!(
            task_exits(text),
            [
                TaskExit {
                    container: "f1".into(),
                    process: "f1".into(),
                    status: 137
                },
                TaskExit {
                    container: "f2".into(),
                    process: "e1".into(),
                    status: 0
                },
            ]
        );
    }
}
