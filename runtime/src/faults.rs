//! Fault injection for the fault tests: at named points of create, start, exec and delete
//! the runtime kills one of its own processes, so a test can put a failure exactly at a
//! step instead of racing it with a timer.
//!
//! Off unless the configuration names a plan file (`[debug] fault_plan`, never set on a real
//! node). The file holds lines `<point> <victim>` (blank lines and `#` comments allowed);
//! it is read each time a point is reached, and a line that fires is removed from it
//! before the kill, so each fires once even when the killed process's cleanup comes back
//! through the same point. Victims: `vmm`, `fsd` (killed with SIGKILL, then waited for),
//! `runtime` (the process that reached the point: the shim or the CLI; SIGKILL to
//! itself).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::ProcessRecord;
use crate::state::SandboxState;

/// The points a plan can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// `create`: the fs daemon and the VMM run, the agent is not reached yet.
    CreateVmmStarted,
    /// `create`: the container exists in the guest; hooks and the reply are still due.
    CreateContainerCreated,
    /// `start`: the agent started the container's process.
    StartStarted,
    /// `exec`: the agent started the extra process.
    ExecStarted,
    /// `delete`: the guest was told (DestroySandbox or RemoveContainer); the host side is
    /// still to undo.
    DeleteGuestTold,
}

impl Point {
    /// Every point, for parsing and documentation.
    pub const ALL: [Point; 5] = [
        Point::CreateVmmStarted,
        Point::CreateContainerCreated,
        Point::StartStarted,
        Point::ExecStarted,
        Point::DeleteGuestTold,
    ];

    /// Its name in a plan.
    pub fn name(self) -> &'static str {
        match self {
            Point::CreateVmmStarted => "create.vmm-started",
            Point::CreateContainerCreated => "create.container-created",
            Point::StartStarted => "start.started",
            Point::ExecStarted => "exec.started",
            Point::DeleteGuestTold => "delete.guest-told",
        }
    }
}

/// Whom a fault kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    /// The sandbox's VMM.
    Vmm,
    /// The sandbox's fs daemon.
    Fsd,
    /// The process that reached the point.
    Runtime,
}

impl Victim {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "vmm" => Some(Victim::Vmm),
            "fsd" => Some(Victim::Fsd),
            "runtime" => Some(Victim::Runtime),
            _ => None,
        }
    }
}

/// A plan file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// Reading or rewriting it failed.
    #[error("fault plan {path}: {source}")]
    Io {
        /// The plan.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line names no known point or victim.
    #[error(
        "fault plan {path} line {line}: {reason} (expected \"<point> <victim>\", points: {points}; victims: vmm, fsd, runtime)"
    )]
    Line {
        /// The plan.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
        /// The known points.
        points: String,
    },
}

/// Reads `plan`; when it names `point`, removes that line from the file and returns the
/// victim. A missing file is an empty plan.
pub fn take(plan: &Path, point: Point) -> Result<Option<Victim>, FaultError> {
    let io = |source| FaultError::Io {
        path: plan.to_path_buf(),
        source,
    };
    let text = match std::fs::read_to_string(plan) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut found = None;
    let mut kept = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            kept.push(raw);
            continue;
        }
        let bad = |reason: String| FaultError::Line {
            path: plan.to_path_buf(),
            line: n + 1,
            reason,
            points: Point::ALL.map(Point::name).join(", "),
        };
        let mut words = line.split_whitespace();
        let (Some(p), Some(v), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad(format!("{line:?} is not two words")));
        };
        let Some(p) = Point::ALL.into_iter().find(|k| k.name() == p) else {
            return Err(bad(format!("unknown point {p:?}")));
        };
        let Some(v) = Victim::parse(v) else {
            return Err(bad(format!("unknown victim {v:?}")));
        };
        if p == point && found.is_none() {
            found = Some(v);
        } else {
            kept.push(raw);
        }
    }
    if found.is_some() {
        let mut rest = kept.join("\n");
        if !rest.is_empty() {
            rest.push('\n');
        }
        std::fs::write(plan, rest).map_err(io)?;
    }
    Ok(found)
}

/// Fires `point` for sandbox `st` when `plan` names it: kills the victim (and waits for a
/// killed VMM or fs daemon to be gone, so the next step finds it dead). A plan that cannot
/// be read is logged as an error and fires nothing.
pub fn fire(plan: Option<&Path>, point: Point, st: &SandboxState) {
    let Some(plan) = plan else { return };
    let victim = match take(plan, point) {
        Ok(Some(v)) => v,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %carapace_errors::Chain(&e), "fault plan not used");
            return;
        }
    };
    tracing::warn!(id = st.id, point = point.name(), victim = ?victim, "injecting a fault");
    let record: Option<ProcessRecord> = match victim {
        Victim::Vmm => st.vmm,
        Victim::Fsd => st.fsd,
        Victim::Runtime => {
            // The caller asked for this very process to die here, as a crash would.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            None
        }
    };
    if let Some(rec) = record {
        let _ = rec.signal("fault victim", nix::sys::signal::Signal::SIGKILL);
        if !rec.wait_gone(Duration::from_secs(10)) {
            tracing::error!(
                id = st.id,
                pid = rec.pid,
                "fault victim still alive after 10 s"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_point_fires_once_and_leaves_the_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("plan");
        assert_eq!(take(&plan, Point::StartStarted).unwrap(), None, "no file");
        std::fs::write(
            &plan,
            "# a comment\nstart.started vmm\nexec.started runtime  # inline\nstart.started fsd\n",
        )
        .unwrap();
        assert_eq!(take(&plan, Point::CreateVmmStarted).unwrap(), None);
        assert_eq!(take(&plan, Point::StartStarted).unwrap(), Some(Victim::Vmm));
        assert_eq!(take(&plan, Point::StartStarted).unwrap(), Some(Victim::Fsd));
        assert_eq!(
            take(&plan, Point::StartStarted).unwrap(),
            None,
            "fired once each"
        );
        assert_eq!(
            std::fs::read_to_string(&plan).unwrap(),
            "# a comment\nexec.started runtime  # inline\n"
        );
        assert_eq!(
            take(&plan, Point::ExecStarted).unwrap(),
            Some(Victim::Runtime)
        );
    }

    #[test]
    fn a_bad_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("plan");
        for (text, want) in [
            ("start.started\n", "not two words"),
            ("start.begun vmm\n", "unknown point \"start.begun\""),
            (
                "\nstart.started agent\n",
                "line 2: unknown victim \"agent\"",
            ),
        ] {
            std::fs::write(&plan, text).unwrap();
            let e = take(&plan, Point::StartStarted).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("create.vmm-started"), "{e}");
        }
    }

    #[test]
    fn a_fired_vmm_fault_kills_the_vmm_and_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("plan");
        std::fs::write(&plan, "create.vmm-started vmm\n").unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let mut st = SandboxState::new("c1", dir.path(), Default::default());
        st.vmm = ProcessRecord::of(child.id() as i32);
        let vmm = st.vmm.unwrap();
        fire(Some(&plan), Point::ExecStarted, &st);
        assert!(vmm.is_alive(), "another point fires nothing");
        fire(Some(&plan), Point::CreateVmmStarted, &st);
        assert!(!vmm.is_alive(), "killed, and gone when fire returns");
        let _ = child.wait(); // reaped already by is_alive
    }
}
