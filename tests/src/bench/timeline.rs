//! The boot timeline: where one cold `ctr run` spends its time until the container's first
//! output line, read back from the logs the start leaves (issue 19's boot budget).
//!
//! The marks, in the order a start passes them, and where each comes from:
//! - `ctr run` is started and the container's first line arrives: the benchmark's clock;
//! - the shim's server running (the containerd-shim crate's "Shim successfully started"),
//!   the runtime's `starting fs daemon`, `starting VMM`, `created (...)` and `started`:
//!   containerd's log, where the shim's lines carry their own RFC 3339 time (`time="..."`);
//! - the VMM's `VM started` (vCPU threads running) and `guest reported boot done` (the agent
//!   serves): the VMM's log (tracing's RFC 3339 time at the start of each line);
//! - the guest kernel's `Run /init`: the guest's kernel log (`printk.time=1`), seconds since
//!   the guest's clock started, placed after the VMM's `VM started`. The guest's clock starts
//!   when its kernel sets up kvmclock, a few instructions into the boot, so this mark is late
//!   by at most that.
//!
//! Every mark must be found: a missing one is an error naming it and where it was looked
//! for, never a guessed number. With `initcall_debug`, the slowest initcalls are listed too.

use std::fmt::Write as _;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A mark the timeline needs was not in its log.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// The line that makes a mark is missing.
    #[error("no {what} in {log} (looked for a line containing {needle:?})")]
    Missing {
        /// The mark.
        what: &'static str,
        /// Which log.
        log: &'static str,
        /// What was looked for.
        needle: &'static str,
    },
}

/// One step of a start: from the previous mark to this one.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// What happens in it.
    pub name: &'static str,
    /// Its length (ms).
    pub ms: f64,
    /// Where it ends, from `ctr run` (ms).
    pub at_ms: f64,
}

/// One start, split into steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// The steps, in order; their lengths add up to [`Self::total_ms`].
    pub steps: Vec<Step>,
    /// `ctr run` to the first output line (ms).
    pub total_ms: f64,
    /// The runtime's own split of CreateSandbox and CreateContainer (ms), from its
    /// `created` line: (sandbox_ms, container_ms).
    pub create_split: Option<(f64, f64)>,
    /// The slowest initcalls of the guest kernel (name, ms), slowest first, and the sum
    /// of all of them (ms): empty without `initcall_debug`.
    pub initcalls: Vec<(String, f64)>,
    /// The sum of every initcall's time (ms).
    pub initcalls_total_ms: f64,
}

/// What a start left behind.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// When `ctr run` was started.
    pub start: OffsetDateTime,
    /// When its first output line arrived.
    pub first_output: OffsetDateTime,
    /// The sandbox's id (the container's, for `ctr run`).
    pub id: &'a str,
    /// containerd's log (the shim's lines in it).
    pub containerd_log: &'a str,
    /// The VMM's log.
    pub vmm_log: &'a str,
    /// The guest's kernel log (`dmesg`).
    pub dmesg: &'a str,
}

/// How many initcalls [`Timeline::initcalls`] lists.
pub const SLOWEST_INITCALLS: usize = 8;

/// The time of a line of containerd's log: its `time="..."` field.
pub fn logfmt_time(line: &str) -> Option<OffsetDateTime> {
    let rest = &line[line.find("time=\"")? + 6..];
    OffsetDateTime::parse(&rest[..rest.find('"')?], &Rfc3339).ok()
}

/// The time of a tracing line (`2026-12-07T13:55:59.123456Z  INFO ...`).
pub fn tracing_time(line: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(line.split_whitespace().next()?, &Rfc3339).ok()
}

/// The time of a kernel log line (`[    1.234567] ...`, an optional `<6>` level in front),
/// in seconds since the guest's clock started, and the message.
pub fn dmesg_time(line: &str) -> Option<(f64, &str)> {
    let line = line.trim_start();
    let line = match line.strip_prefix('<') {
        Some(r) => &r[r.find('>')? + 1..],
        None => line,
    };
    let rest = line.strip_prefix('[')?;
    let end = rest.find(']')?;
    let secs = rest[..end].trim().parse().ok()?;
    Some((secs, rest[end + 1..].trim_start()))
}

/// The initcalls of a kernel log written with `initcall_debug` (`initcall NAME+0x0/0x50
/// returned 0 after 123 usecs`): (name, ms), slowest first.
pub fn initcalls(dmesg: &str) -> Vec<(String, f64)> {
    let mut calls: Vec<(String, f64)> = dmesg
        .lines()
        .filter_map(|l| {
            let msg = dmesg_time(l).map_or(l, |(_, m)| m);
            let rest = msg.strip_prefix("initcall ")?;
            let name = rest.split_whitespace().next()?;
            let after = rest.split(" after ").nth(1)?;
            let usecs: f64 = after.strip_suffix(" usecs")?.trim().parse().ok()?;
            let name = name.split('+').next().unwrap_or(name);
            Some((name.to_owned(), usecs / 1000.0))
        })
        .collect();
    calls.sort_by(|a, b| b.1.total_cmp(&a.1));
    calls
}

/// The first line at or after `after` of `log` (lines timed by `time`) that contains
/// `needle` and, when given, names the sandbox `id`; its time and text.
fn find(
    log: &str,
    time: fn(&str) -> Option<OffsetDateTime>,
    after: OffsetDateTime,
    needle: &str,
    id: Option<&str>,
) -> Option<(OffsetDateTime, String)> {
    log.lines().find_map(|l| {
        let t = time(l)?;
        (t >= after && l.contains(needle) && id.is_none_or(|id| names(l, id)))
            .then(|| (t, l.to_owned()))
    })
}

/// Whether a log line has the field `id=<id>` (quoted or not, whole).
fn names(line: &str, id: &str) -> bool {
    line.match_indices("id=").any(|(i, _)| {
        // a field of its own, not the tail of `guest_pid=` or `sandbox_id=`
        let own = line[..i]
            .chars()
            .next_back()
            .is_none_or(|c| c == ' ' || c == '"');
        let v = line[i + 3..].trim_start_matches(['"', '\\']);
        own && v.strip_prefix(id).is_some_and(|rest| {
            rest.chars()
                .next()
                .is_none_or(|c| c == ' ' || c == '"' || c == '\\')
        })
    })
}

/// A `key=value` number of a log line (`sandbox_ms=12`).
fn field(line: &str, key: &str) -> Option<f64> {
    let pat = format!("{key}=");
    let rest = &line[line.find(&pat)? + pat.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn ms_between(a: OffsetDateTime, b: OffsetDateTime) -> f64 {
    (b - a).as_seconds_f64() * 1000.0
}

impl Timeline {
    /// Splits one start into its steps.
    pub fn build(i: &Inputs) -> Result<Self, TimelineError> {
        let with_id = |after, needle: &'static str, what| {
            find(i.containerd_log, logfmt_time, after, needle, Some(i.id)).ok_or(
                TimelineError::Missing {
                    what,
                    log: "containerd's log",
                    needle,
                },
            )
        };
        // the containerd-shim crate's line once the shim's server runs
        const SHIM_UP: &str = "Shim successfully started";
        let shim = find(i.containerd_log, logfmt_time, i.start, SHIM_UP, None).ok_or(
            TimelineError::Missing {
                what: "shim start",
                log: "containerd's log",
                needle: SHIM_UP,
            },
        )?;
        let fsd = with_id(shim.0, "starting fs daemon", "fs daemon start")?;
        let vmm = with_id(fsd.0, "starting VMM", "VMM start")?;
        let vm_log = |needle: &'static str, what| {
            find(i.vmm_log, tracing_time, vmm.0, needle, None).ok_or(TimelineError::Missing {
                what,
                log: "the VMM's log",
                needle,
            })
        };
        const VM_STARTED: &str = "VM started";
        let vm = vm_log(VM_STARTED, "vCPUs running")?;
        const RUN_INIT: &str = "Run /init";
        let (init_secs, _) = i
            .dmesg
            .lines()
            .filter_map(dmesg_time)
            .find(|(_, m)| m.starts_with(RUN_INIT))
            .ok_or(TimelineError::Missing {
                what: "the guest kernel starting /init",
                log: "the guest's kernel log",
                needle: RUN_INIT,
            })?;
        let init_at = vm.0 + time::Duration::seconds_f64(init_secs);
        let ready = vm_log("guest reported boot done", "the agent serving")?;
        let created = with_id(ready.0, "created (", "CreateContainer answered")?;
        let started = with_id(created.0, "msg=\"started", "the process started")?;

        let marks = [
            ("containerd starts the shim", shim.0),
            (
                "shim: bundle, rootfs share, cgroup until the fs daemon",
                fsd.0,
            ),
            ("fs daemon started and serving", vmm.0),
            ("VMM: exec, jail, guest memory, devices, vCPUs", vm.0),
            ("guest kernel until /init", init_at),
            ("agent (init) until it serves", ready.0),
            ("CreateSandbox + CreateContainer", created.0),
            ("shim start: the agent starts the process", started.0),
            (
                "the process runs until its first line arrives",
                i.first_output,
            ),
        ];
        let mut steps = Vec::new();
        let mut prev = i.start;
        for (name, at) in marks {
            steps.push(Step {
                name,
                ms: ms_between(prev, at),
                at_ms: ms_between(i.start, at),
            });
            prev = at;
        }
        let create_split = field(&created.1, "sandbox_ms").zip(field(&created.1, "container_ms"));
        let all = initcalls(i.dmesg);
        let initcalls_total_ms = all.iter().map(|(_, ms)| ms).sum();
        Ok(Self {
            steps,
            total_ms: ms_between(i.start, i.first_output),
            create_split,
            initcalls: all.into_iter().take(SLOWEST_INITCALLS).collect(),
            initcalls_total_ms,
        })
    }

    /// The timeline as a table for a terminal or markdown.
    pub fn table(&self) -> String {
        let mut s = String::from("| step | took (ms) | at (ms) |\n|---|---:|---:|\n");
        for st in &self.steps {
            let _ = writeln!(s, "| {} | {:.0} | {:.0} |", st.name, st.ms, st.at_ms);
        }
        let _ = writeln!(
            s,
            "| `ctr run` to the first output line | {:.0} | |",
            self.total_ms
        );
        if let Some((sb, c)) = self.create_split {
            let _ = writeln!(
                s,
                "\nCreateSandbox {sb:.0} ms, CreateContainer {c:.0} ms (the runtime's split)."
            );
        }
        if !self.initcalls.is_empty() {
            let _ = writeln!(
                s,
                "\nSlowest initcalls (all of them: {:.0} ms):",
                self.initcalls_total_ms
            );
            for (name, ms) in &self.initcalls {
                let _ = writeln!(s, "- {name}: {ms:.1} ms");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // as containerd's log has them (the runtime's fields quoted inside the shim's msg)
    const CONTAINERD: &str = r#"time="2026-12-07T14:00:00.000000000Z" level=info msg="an earlier start" id=t1
time="2026-12-07T14:00:00.900000000Z" level=info msg="Shim successfully started, waiting for exit signal..."

time="2026-12-07T14:00:01.150000000Z" level=info msg="host cgroup for the VMM and fs daemon id="t1" dirs=["/sys/fs/cgroup/x/t1"]"

time="2026-12-07T14:00:01.200000000Z" level=info msg="starting fs daemon id="t1""

time="2026-12-07T14:00:01.300000000Z" level=info msg="starting VMM id="t1" resources=VmResources { vcpus: 1, memory_mib: 256 } created_vcpus=8 hotplug_mib=16128"

time="2026-12-07T14:00:03.500000000Z" level=info msg="created (VMM start -> agent answering, CreateSandbox, CreateContainer) id="t1" agent_ms=1900 sandbox_ms=120 container_ms=80"

time="2026-12-07T14:00:03.501000000Z" level=info msg="created id=t1 role=Standalone"

time="2026-12-07T14:00:03.650000000Z" level=info msg="started id="t1" guest_pid=7"

time="2026-12-07T14:00:03.651000000Z" level=info msg="started process=t1 pid=7"
"#;
    const VMM: &str = "2026-12-07T14:00:01.400000Z  INFO carapace_vmm: VMM jailed uid=1\n\
2026-12-07T14:00:01.450000Z  INFO carapace_vmm::vmm::builder: VM started vcpus=1 setup_ms=120\n\
2026-12-07T14:00:03.250000Z  INFO carapace_vmm::state: guest reported boot done boot_done_ms=1900\n";
    const DMESG: &str = "<6>[    0.000000] Linux version 6.1\n\
[    0.210000] calling  virtio_mmio_init+0x0/0x20 @ 1\n\
[    0.230000] initcall virtio_mmio_init+0x0/0x20 returned 0 after 20000 usecs\n\
[    0.400000] initcall slow_init+0x0/0x90 returned 0 after 150000 usecs\n\
[    0.410000] initcall quick+0x0/0x9 returned 0 after 7 usecs\n\
[    1.300000] Run /init as init process\n";

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &Rfc3339).unwrap()
    }

    fn inputs<'a>(containerd: &'a str, vmm: &'a str, dmesg: &'a str) -> Inputs<'a> {
        Inputs {
            start: at("2026-12-07T14:00:00.500Z"),
            first_output: at("2026-12-07T14:00:03.800Z"),
            id: "t1",
            containerd_log: containerd,
            vmm_log: vmm,
            dmesg,
        }
    }

    #[test]
    fn a_start_splits_into_steps_that_add_up() {
        let t = Timeline::build(&inputs(CONTAINERD, VMM, DMESG)).unwrap();
        let ms: Vec<i64> = t.steps.iter().map(|s| s.ms.round() as i64).collect();
        // shim 400, to fsd 300, fsd 100, VMM 150, kernel 1300, agent 500, creates 250,
        // start 150, first line 150
        assert_eq!(ms, [400, 300, 100, 150, 1300, 500, 250, 150, 150]);
        let sum: f64 = t.steps.iter().map(|s| s.ms).sum();
        assert!((sum - t.total_ms).abs() < 1e-6, "{sum} vs {}", t.total_ms);
        assert!((t.total_ms - 3300.0).abs() < 1e-6);
        assert_eq!(t.steps.last().unwrap().at_ms.round() as i64, 3300);
        assert_eq!(t.create_split, Some((120.0, 80.0)));
        assert_eq!(t.initcalls[0], ("slow_init".to_owned(), 150.0));
        assert_eq!(t.initcalls[1].0, "virtio_mmio_init");
        assert!((t.initcalls_total_ms - 170.007).abs() < 1e-9);
        let table = t.table();
        assert!(
            table.contains("| guest kernel until /init | 1300 | 2250 |"),
            "{table}"
        );
        assert!(table.contains("- slow_init: 150.0 ms"), "{table}");
    }

    #[test]
    fn lines_before_the_start_do_not_count() {
        // the earlier start's "starting fs daemon" is older than this `ctr run`
        let old = "time=\"2026-12-07T13:59:00Z\" level=info msg=\"Shim successfully started\"\n";
        let log = format!("{old}{CONTAINERD}");
        let t = Timeline::build(&inputs(&log, VMM, DMESG)).unwrap();
        assert_eq!(t.steps[0].ms.round() as i64, 400);
    }

    #[test]
    fn a_missing_mark_is_an_error_naming_it() {
        let no_init = DMESG.replace("Run /init", "Run /sbin/init");
        let e = Timeline::build(&inputs(CONTAINERD, VMM, &no_init)).unwrap_err();
        assert!(e.to_string().contains("guest's kernel log"), "{e}");
        let no_ready = VMM.replace("boot done", "something");
        let e = Timeline::build(&inputs(CONTAINERD, &no_ready, DMESG)).unwrap_err();
        assert!(e.to_string().contains("the agent serving"), "{e}");
        // another sandbox's lines are not this one's
        let other = CONTAINERD.replace("id=\"t1\"", "id=\"t10\"");
        let e = Timeline::build(&inputs(&other, VMM, DMESG)).unwrap_err();
        assert!(e.to_string().contains("fs daemon start"), "{e}");
    }

    #[test]
    fn line_times_parse() {
        assert_eq!(dmesg_time("[   12.500000] x"), Some((12.5, "x")));
        assert_eq!(
            dmesg_time("<4>[    0.000001] warn"),
            Some((0.000001, "warn"))
        );
        assert_eq!(dmesg_time("no time"), None);
        assert!(tracing_time("2026-12-07T14:00:01.4Z  INFO x").is_some());
        assert!(tracing_time("garbage").is_none());
        assert!(logfmt_time("time=\"2026-12-07T14:00:01.4Z\" level=info").is_some());
        assert!(logfmt_time("level=info").is_none());
        assert_eq!(
            field("x sandbox_ms=12 container_ms=3.5", "container_ms"),
            Some(3.5)
        );
        assert!(names("msg=\"started id=t1 guest_pid=7\"", "t1"));
        assert!(names("msg=\"x id=\\\"t1\\\" y\"", "t1"));
        assert!(!names("msg=\"x id=t10\"", "t1"));
        assert!(!names("msg=\"x sandbox_id=t1\"", "t1"));
    }
}
