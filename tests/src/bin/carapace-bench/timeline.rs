//! The timeline phase: where a cold `ctr run` spends its time, step by step (issue 19's boot
//! budget). Each run starts a container that prints a line, then the guest's kernel log,
//! then sleeps; the logs the start left (containerd's with the shim's lines, the VMM's,
//! the guest's kernel log) are read while the sandbox still lives and split into steps by
//! `carapace_tests::bench::timeline`. The guest kernel runs with `initcall_debug` and
//! `printk.time=1` in this phase only (its kernel log then times every initcall; nothing of
//! it reaches the console, which stays off as in the other phases).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};
use carapace_tests::bench::timeline::{Inputs, Timeline};
use carapace_tests::bench::{Report, Samples};
use carapace_tests::containerd::carapace_config_with;
use time::OffsetDateTime;

use crate::containers::time_to_first_output;
use crate::{
    CARAPACE, Cli, IMAGE, START_TIMEOUT_S, busybox_image, carapace_containerd, last_lines,
    progress, sandbox_work_dir,
};

/// Added to the guest kernel's command line in this phase: times every initcall into the
/// kernel log (which holds them all: 1 MiB), with a time on every line.
const KERNEL_PARAMS: &str = "initcall_debug printk.time=1 log_buf_len=1M";
/// The container's last line after the kernel log.
const END: &str = "timeline-end";

/// Runs `runs` timed starts (after one untimed start that warms the host's caches) and
/// reports each start's steps as notes and each step's lengths as a sample set.
pub(super) fn timeline_phase(
    cli: &Cli,
    bins: &Path,
    runs: usize,
    report: &mut Report,
) -> Result<()> {
    let work = sandbox_work_dir(cli, bins)?;
    let (config, state) = carapace_config_with(
        work.path(),
        bins,
        false,
        KERNEL_PARAMS,
        Some(&cli.guest_dir),
    )
    .context("writing the Carapace configuration")?;
    progress("timeline: building a busybox image and starting a private containerd");
    let archive = busybox_image(work.path())?;
    let ctrd = carapace_containerd(&work.path().join("containerd"), bins, &config)?;
    ctrd.import(&archive)?;
    time_to_first_output(&ctrd, CARAPACE, "timeline-warm-up").context("the warm-up start")?;

    let mut lengths: Vec<Vec<f64>> = Vec::new();
    let mut names = Vec::new();
    for r in 0..runs {
        let id = format!("timeline-run{r}");
        let t = one_start(&ctrd, &state, &id, cli.timeline_logs.as_deref())
            .with_context(|| format!("timeline run {r}"))?;
        progress(&format!("timeline run {r}:\n{}", t.table()));
        let steps: Vec<String> = t
            .steps
            .iter()
            .map(|s| format!("{} {:.0}", s.name, s.ms))
            .collect();
        let mut note = format!(
            "timeline run {r} (ms): {}; total {:.0}",
            steps.join(", "),
            t.total_ms
        );
        if let Some((sb, c)) = t.create_split {
            note.push_str(&format!("; CreateSandbox {sb:.0}, CreateContainer {c:.0}"));
        }
        if !t.initcalls.is_empty() {
            let slow: Vec<String> = t
                .initcalls
                .iter()
                .take(5)
                .map(|(n, ms)| format!("{n} {ms:.1}"))
                .collect();
            note.push_str(&format!(
                "; initcalls {:.0} in all, slowest {}",
                t.initcalls_total_ms,
                slow.join(", ")
            ));
        }
        report.notes.push(note);
        if lengths.is_empty() {
            lengths = vec![Vec::new(); t.steps.len()];
            names = t.steps.iter().map(|s| s.name).collect();
        }
        for (l, s) in lengths.iter_mut().zip(&t.steps) {
            l.push(s.ms);
        }
    }
    for (name, values) in names.into_iter().zip(lengths) {
        report
            .samples
            .push(Samples::new(format!("timeline: {name}"), "ms", values));
    }
    Ok(())
}

/// One timed start of container `id`: `ctr run`, the first line, the kernel log, the
/// sandbox's logs read while it lives, then the container killed (ctr removes it).
/// With `keep`, its logs are saved in `keep/<id>/`.
fn one_start(
    ctrd: &carapace_tests::containerd::Containerd,
    state: &Path,
    id: &str,
    keep: Option<&Path>,
) -> Result<Timeline> {
    let script = format!("echo ready; dmesg; echo {END}; exec sleep 600");
    let start = OffsetDateTime::now_utc();
    let mut child = ctrd
        .ctr_command_bounded(START_TIMEOUT_S)
        .args(["run", "--rm", "--runtime", CARAPACE, IMAGE, id, "sh", "-c"])
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ctr")?;
    let stdout = child.stdout.take().context("ctr stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut first_output = None;
    let mut dmesg = String::new();
    for line in lines.by_ref() {
        let line = line.context("reading the container's output")?;
        if first_output.is_none() {
            first_output = Some(OffsetDateTime::now_utc());
            continue;
        }
        if line == END {
            break;
        }
        dmesg.push_str(&line);
        dmesg.push('\n');
    }
    let vmm_log = std::fs::read_to_string(state.join(id).join("vmm.log"));
    let containerd_log = ctrd.log();
    let metrics = carapace_tests::containerd::vmm_metrics(&state.join(id).join("api.sock"))
        .unwrap_or_default();
    let _ = ctrd.ctr(&["task", "kill", "-s", "KILL", id]);
    drop(lines);
    let _ = child.wait();
    let first_output = first_output.context("the container printed nothing")?;
    let vmm_log =
        vmm_log.with_context(|| format!("reading {}", state.join(id).join("vmm.log").display()))?;
    if let Some(dir) = keep {
        let dir = dir.join(id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, text) in [
            ("containerd.log", &containerd_log),
            ("vmm.log", &vmm_log),
            ("dmesg", &dmesg),
            ("vmm-metrics.json", &metrics),
        ] {
            std::fs::write(dir.join(name), text)
                .with_context(|| format!("writing {}", dir.join(name).display()))?;
        }
    }
    Timeline::build(&Inputs {
        start,
        first_output,
        id,
        containerd_log: &containerd_log,
        vmm_log: &vmm_log,
        dmesg: &dmesg,
    })
    .with_context(|| {
        format!(
            "containerd's log ends with:\n{}\nthe VMM's log begins with:\n{}",
            last_lines(&containerd_log, 25, "\n"),
            vmm_log.lines().take(15).collect::<Vec<_>>().join("\n")
        )
    })
}
