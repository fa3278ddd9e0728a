//! The container and sandbox phases: `ctr run` to first output, idle sandboxes one by one
//! (start latency, memory, density), Carapace vs runc in one private containerd.

use super::*;

/// `ctr run --rm` → first output line, in ms.
pub(super) fn time_to_first_output(ctrd: &Containerd, runtime: &str, id: &str) -> Result<f64> {
    let start = Instant::now();
    // bounded: a start that never produces output becomes an error, not a stuck benchmark
    let mut child = ctrd
        .ctr_command_bounded(START_TIMEOUT_S)
        .args(["run", "--rm"])
        .args(ctr_runtime_args(runtime))
        .args([IMAGE, id, "echo", "ready"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ctr")?;
    let stdout = child.stdout.take().context("ctr stdout")?;
    let mut first = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the container's output")?;
        if first.is_none() && line.contains("ready") {
            first = Some(start.elapsed());
        }
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().context("waiting for ctr")?;
    match first {
        Some(t) if status.success() => Ok(t.as_secs_f64() * 1000.0),
        _ => bail!(
            "ctr run --runtime {runtime} failed ({status}{}): {}",
            if status.code() == Some(124) {
                format!(", no output within {START_TIMEOUT_S} s")
            } else {
                String::new()
            },
            last_lines(&err, 6, " | ")
        ),
    }
}

/// The container phase (when `container`) and the sandbox phase (when `density_max` is
/// given: it bounds the density run) in one private containerd.
pub(super) fn containers(
    cli: &Cli,
    bins: &Path,
    runs: usize,
    container: bool,
    density_max: Option<usize>,
    report: &mut Report,
) -> Result<()> {
    let work = sandbox_work_dir(cli, bins)?;
    let (config, state) =
        carapace_config_with(work.path(), bins, false, &cli.guest_kernel_params, None)
            .context("writing the Carapace configuration")?;
    if !cli.guest_kernel_params.is_empty() {
        report.notes.push(format!(
            "container and sandbox phases: guest kernel parameters added: {:?} \
             (--guest-kernel-params)",
            cli.guest_kernel_params
        ));
    }
    progress("building a busybox image and starting a private containerd");
    let archive = busybox_image(work.path())?;
    let ctrd = carapace_containerd(&work.path().join("containerd"), bins, &config)?;
    ctrd.import(&archive)?;
    gvisor_wrapper(work.path())?;

    let mut carapace_ok = true;
    if container {
        let (mut ours, mut peer, mut gvisor) = (Vec::new(), Vec::new(), Vec::new());
        let (mut failure, mut gvisor_failure) = (None, None);
        for i in 0..runs {
            // rotate who goes first so warm caches favour nobody
            let mut order = [CARAPACE, RUNC, GVISOR];
            order.rotate_left(i % 3);
            for runtime in order {
                if (runtime == CARAPACE && failure.is_some())
                    || (runtime == GVISOR && gvisor_failure.is_some())
                {
                    continue;
                }
                let id = format!(
                    "start-{}-{i}",
                    match runtime {
                        RUNC => "runc",
                        GVISOR => "gvisor",
                        _ => "carapace",
                    }
                );
                match time_to_first_output(&ctrd, runtime, &id) {
                    Ok(ms) => {
                        progress(&format!("container_start run {i}: {runtime} {ms:.0} ms"));
                        match runtime {
                            RUNC => peer.push(ms),
                            GVISOR => gvisor.push(ms),
                            _ => ours.push(ms),
                        }
                    }
                    Err(e) if runtime == CARAPACE => {
                        progress(&format!("container_start: carapace failed: {e:#}"));
                        progress(&diagnose(&ctrd, &state, &id));
                        failure = Some(format!("{e:#}"));
                    }
                    // the second peer is a note when it cannot run, never a number
                    Err(e) if runtime == GVISOR => {
                        progress(&format!("container_start: gVisor failed: {e:#}"));
                        gvisor_failure = Some(format!("{e:#}"));
                    }
                    Err(e) => return Err(e.context("runc (the peer) failed")),
                }
            }
        }
        let peer = Samples::new("runc (io.containerd.runc.v2)", "ms", peer);
        let gvisor = Samples::new(GVISOR_LABEL, "ms", gvisor);
        match failure {
            Some(e) => {
                carapace_ok = false;
                report.notes.push(format!(
                    "container_start: Carapace not measured, `ctr run --runtime {CARAPACE}` failed: {e}; \
                     runc p50 {:.0} ms",
                    peer.percentile(50.0).unwrap_or(f64::NAN)
                ));
                report.samples.push(peer);
            }
            None => {
                let ours = Samples::new("carapace container_start", "ms", ours);
                report.rows.extend(percentile_rows(
                    "container_start",
                    &ours,
                    &peer,
                    Some("<= 3"),
                )?);
                if gvisor_failure.is_none() {
                    report.rows.extend(percentile_rows(
                        "container_start_vs_gvisor",
                        &ours,
                        &gvisor,
                        None,
                    )?);
                }
                report.samples.push(ours);
                report.samples.push(peer);
            }
        }
        match gvisor_failure {
            Some(e) => report.notes.push(format!(
                "container_start_vs_gvisor: gVisor not measured: {e}"
            )),
            None => report.samples.push(gvisor),
        }
    }

    let Some(density_max) = density_max else {
        return Ok(());
    };
    if !carapace_ok {
        report.notes.push(
            "sandbox_pss, density: not measured: Carapace containers do not start (see container_start)"
                .into(),
        );
    } else if let Err(e) = sandboxes(&ctrd, &state, density_max, cli.smaps_dir.as_deref(), report) {
        progress(&format!("sandbox phase failed: {e:#}"));
        report
            .notes
            .push(format!("sandbox_pss, density: not measured: {e:#}"));
    }
    Ok(())
}

/// Deletes container `id` and its task, whatever state they are in (best effort: each
/// step bounded, failures ignored).
fn discard(ctrd: &Containerd, id: &str) {
    use carapace_tests::faults::ctr;
    let _ = ctr(ctrd, START_TIMEOUT_S, &["task", "delete", "-f", id]);
    let _ = ctr(ctrd, START_TIMEOUT_S, &["container", "delete", id]);
}

/// Starts an idle container in the background; returns the time `ctr run -d` took (ms).
/// `ctr run -d ... sleep 3600`, bounded by [`START_TIMEOUT_S`]; returns ms.
pub(super) fn start_idle(ctrd: &Containerd, runtime: &str, id: &str) -> Result<f64> {
    let start = Instant::now();
    let out = ctrd
        .ctr_command_bounded(START_TIMEOUT_S)
        .args(["run", "-d"])
        .args(ctr_runtime_args(runtime))
        .args([IMAGE, id, "sleep", "3600"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting idle container {id} with {runtime}"))?;
    if !out.status.success() {
        bail!(
            "starting idle container {id} with {runtime} failed ({}{}): {}",
            out.status,
            if out.status.code() == Some(124) {
                format!(", not started within {START_TIMEOUT_S} s")
            } else {
                String::new()
            },
            last_lines(&String::from_utf8_lossy(&out.stderr), 6, " | ")
        );
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// What a stuck or failed Carapace start left to look at: the sandbox's VMM counters (from
/// its control API), the ends of its logs, and the end of containerd's log (the shim's and
/// the runtime's lines).
pub(super) fn diagnose(ctrd: &Containerd, state: &Path, id: &str) -> String {
    let dir = state.join(id);
    let mut out = format!("--- diagnostics of sandbox {id}\n");
    let api = || -> std::io::Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(dir.join("api.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        std::io::Write::write_all(&mut s, b"{\"cmd\":\"metrics\"}\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    };
    out.push_str(&format!(
        "VMM metrics: {}\n",
        api().unwrap_or_else(|e| format!("(none: {e})"))
    ));
    for log in ["vmm.log", "fsd.log", "console.log"] {
        let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
        out.push_str(&format!("{log} (end):\n{}\n", last_lines(&text, 25, "\n")));
    }
    out.push_str(&format!(
        "containerd log (end):\n{}\n",
        last_lines(&ctrd.log(), 40, "\n")
    ));
    out
}

pub(super) fn mem_available_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The counts of idle sandboxes at which the `sandbox_memory` row is taken (and the last
/// count reached).
const MEMORY_AT: [usize; 3] = [1, 10, 30];

/// The host's memory as a node operator sees it, taken after each idle start: how far
/// MemAvailable fell since the first start, and the memory.current sum of the host cgroups
/// holding the VMMs and fs daemons (the pods' cgroups: a cross-check).
#[derive(Debug, Default)]
struct NodeMemory {
    /// MemAvailable before the first start (KiB).
    base: u64,
    /// (count, MemAvailable drop KiB, cgroup memory.current sum KiB or None).
    at: Vec<(usize, u64, Option<u64>)>,
}

impl NodeMemory {
    fn start() -> Result<Self> {
        Ok(NodeMemory {
            base: mem_available_kib().context("reading MemAvailable from /proc/meminfo")?,
            at: Vec::new(),
        })
    }

    /// Records the state after `n` starts.
    fn sample(&mut self, n: usize, cgroups: Option<u64>) {
        let now = mem_available_kib().unwrap_or(self.base);
        self.at.push((n, self.base.saturating_sub(now), cgroups));
    }

    /// KiB per sandbox at count `n` (or the last count below it).
    fn per_sandbox(&self, n: usize) -> Option<(usize, f64, Option<f64>)> {
        let &(m, drop, cg) = self.at.iter().rev().find(|a| a.0 <= n)?;
        let per = |v: u64| v as f64 / m as f64;
        Some((m, per(drop), cg.map(per)))
    }
}

/// memory.current (KiB) summed over the distinct cgroup v2 groups that hold a process named
/// one of `names` (None on cgroup v1 or when none was found).
fn cgroups_memory_kib(names: &[&str]) -> Option<u64> {
    let mut groups = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let dir = entry.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        // comm is the program name cut to 15 bytes
        if !names
            .iter()
            .any(|n| n.get(..15).unwrap_or(n) == comm.trim())
        {
            continue;
        }
        let Ok(cg) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        if let Some(path) = cg.lines().find_map(|l| l.strip_prefix("0::")) {
            groups.insert(path.to_owned());
        }
    }
    let mut sum = 0;
    for g in &groups {
        let text = std::fs::read_to_string(format!("/sys/fs/cgroup{g}/memory.current")).ok()?;
        sum += text.trim().parse::<u64>().ok()? / 1024;
    }
    (!groups.is_empty()).then_some(sum)
}

/// PSS of Carapace's sandbox processes (KiB).
#[derive(Debug, Default)]
pub(super) struct SandboxMemory {
    /// All of them, guest RAM included.
    pss: u64,
    /// The VMMs' guest-RAM mappings: guest memory actually touched.
    guest: u64,
    /// Processes counted.
    procs: usize,
    /// Per program, guest RAM excluded: (name, KiB).
    by_name: std::collections::BTreeMap<String, u64>,
}

/// Host PSS of all Carapace sandbox processes and guest memory touched; with `smaps_dir`,
/// each process's smaps is saved there as `<program>.<pid>.smaps`.
pub(super) fn sandbox_memory(smaps_dir: Option<&Path>) -> Result<SandboxMemory> {
    let mut m = SandboxMemory::default();
    for entry in std::fs::read_dir("/proc")
        .context("listing /proc")?
        .flatten()
    {
        let dir = entry.path();
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let name = Path::new(std::str::from_utf8(argv0).unwrap_or_default())
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if !SANDBOX_PROCS.contains(&name.as_str()) {
            continue;
        }
        let Ok(rollup) = std::fs::read_to_string(dir.join("smaps_rollup")) else {
            continue; // exited meanwhile
        };
        let pss = smaps_rollup_pss_kib(&rollup)
            .with_context(|| format!("{}/smaps_rollup", dir.display()))?;
        if let Some(out) = smaps_dir {
            let pid = entry.file_name().to_string_lossy().into_owned();
            let to = out.join(format!("{name}.{pid}.smaps"));
            std::fs::create_dir_all(out)
                .and_then(|()| std::fs::copy(dir.join("smaps"), &to))
                .with_context(|| format!("saving {}", to.display()))?;
        }
        // Guest RAM wherever it is mapped: the VMM and the vhost-user fs daemon share the
        // memfd, so PSS splits the pages both touched between them. A VMM without a
        // vhost-user device has anonymous guest RAM: its largest mapping.
        let mut guest = 0;
        if let Ok(smaps) = std::fs::read_to_string(dir.join("smaps")) {
            let ctx = || format!("{}/smaps", dir.display());
            guest = named_mappings_pss_kib(&smaps, GUEST_RAM_MAPPING).with_context(ctx)?;
            if guest == 0 && name == "carapace-vmm" {
                guest = largest_mapping_pss_kib(&smaps).with_context(ctx)?;
            }
        }
        m.pss += pss;
        m.guest += guest;
        m.procs += 1;
        *m.by_name.entry(name).or_default() += pss.saturating_sub(guest);
    }
    Ok(m)
}

pub(super) fn sandboxes(
    ctrd: &Containerd,
    state: &Path,
    max: usize,
    smaps_dir: Option<&Path>,
    report: &mut Report,
) -> Result<()> {
    let mut at = Vec::new(); // (count, host PSS beyond guest RAM, guest touched) per sandbox
    let mut lat = Vec::new();
    let mut stop_reason = format!("bound of {max} reached");
    let (mut breakdown, mut last_breakdown) = (Vec::new(), String::new());
    let mut node = NodeMemory::start()?;
    for n in 1..=max {
        let id = format!("idle-carapace-{n}");
        let faults = super::net::triple_faults(ctrd);
        let ms = match start_idle(ctrd, CARAPACE, &id) {
            Ok(ms) => ms,
            // Its VM triple-faulted (the lab's emulated CPU does that now and then:
            // tests/README.md, "The lab"): that start says nothing about memory, so the
            // dead container goes and the sandbox starts once more, and the report says so.
            // Anything else, or a second fault, ends the phase.
            Err(e) if super::net::triple_faults(ctrd) > faults => {
                progress(&format!(
                    "sandbox {n}: its VM triple-faulted ({e}); starting it again"
                ));
                discard(ctrd, &id);
                report.notes.push(format!(
                    "sandbox_memory, density: sandbox {n} started twice: the VM of its first \
                     try triple-faulted (shim's post-mortem in containerd's log); that \
                     container was deleted"
                ));
                let again = format!("{id}-again");
                start_idle(ctrd, CARAPACE, &again)
                    .map_err(|e| e.context(diagnose(ctrd, state, &again)))?
            }
            Err(e) => return Err(e.context(diagnose(ctrd, state, &id))),
        };
        lat.push(ms);
        // An idle sandbox, not one still starting: the guest settled.
        std::thread::sleep(IDLE_SETTLE);
        let mem = sandbox_memory(if n == 1 { smaps_dir } else { None })?;
        node.sample(n, cgroups_memory_kib(&["carapace-vmm", "carapace-fsd"]));
        let (pss, guest, procs) = (mem.pss, mem.guest, mem.procs);
        let by_name = mem
            .by_name
            .iter()
            .map(|(k, v)| format!("{k} {:.0}", *v as f64 / n as f64))
            .collect::<Vec<_>>()
            .join(", ");
        progress(&format!(
            "sandbox {n}: started in {ms:.0} ms; {procs} processes, PSS {pss} KiB (guest touched {guest} KiB); per sandbox without guest RAM: {by_name}"
        ));
        if n == 1 {
            breakdown.push(format!("at 1: {by_name}"));
        }
        last_breakdown = format!("at {n}: {by_name}");
        if n == 1 || n == max {
            at.push((n, pss, guest));
        }
        if started_before_slowdown(&lat, 2.0) < lat.len() {
            stop_reason = format!("start latency doubled at sandbox {n}");
            at.push((n, pss, guest));
            break;
        }
        if mem_available_kib().is_some_and(|m| m < MIN_AVAILABLE_KIB) {
            stop_reason = format!(
                "MemAvailable below {} MiB at sandbox {n}",
                MIN_AVAILABLE_KIB / 1024
            );
            at.push((n, pss, guest));
            break;
        }
    }
    at.dedup_by_key(|a| a.0);
    breakdown.push(last_breakdown);
    breakdown.dedup_by(|a, b| a.split(':').next() == b.split(':').next());
    report.notes.push(format!(
        "sandbox_pss by program, KiB per sandbox without guest RAM: {}",
        breakdown.join("; ")
    ));
    for &(n, pss, guest) in &at {
        let per = |v: u64| v as f64 / n as f64;
        report.rows.push(
            Row::new(
                format!("sandbox_pss_at_{n}"),
                per(pss.saturating_sub(guest)),
                KATA_PUBLISHED_KIB,
                KATA_NAME,
                "KiB/sandbox",
            )
            .target("<= 10240 (10 MiB)"),
        );
        report.rows.push(Row::new(
            format!("sandbox_pss_incl_guest_at_{n}"),
            per(pss),
            KATA_PUBLISHED_KIB,
            KATA_NAME,
            "KiB/sandbox",
        ));
        report.rows.push(Row::new(
            format!("sandbox_guest_touched_at_{n}"),
            per(guest),
            KATA_PUBLISHED_KIB,
            KATA_NAME,
            "KiB/sandbox",
        ));
    }
    report.notes.push(format!(
        "sandbox_pss: PSS of containerd-shim-carapace-v2 + carapace-vmm + carapace-fsd per idle \
         sandbox (`ctr run -d ... sleep 3600`, sampled {} s after it returned), without guest \
         RAM (the guest-RAM memfd, which the VMM and the fs daemon both map); _incl_guest adds \
         it; guest_touched is the PSS of those guest-RAM mappings (memory the guest actually \
         touched). Executable pages are shared between sandboxes, so the per-sandbox figure \
         falls as sandboxes are added. The peer is Kata's published figure, a fixed reference, \
         not measured here",
        IDLE_SETTLE.as_secs()
    ));
    let ours_density = started_before_slowdown(&lat, 2.0);
    report.samples.push(Samples::new(
        "carapace idle sandbox start",
        "ms",
        lat.clone(),
    ));

    // the peer under the same rule and bound
    let mut peer_lat = Vec::new();
    let mut peer_node = NodeMemory::start()?;
    for n in 1..=max {
        peer_lat.push(start_idle(ctrd, RUNC, &format!("idle-runc-{n}"))?);
        if MEMORY_AT.contains(&n) || n == max {
            std::thread::sleep(IDLE_SETTLE);
            peer_node.sample(n, None);
        }
        if started_before_slowdown(&peer_lat, 2.0) < peer_lat.len()
            || mem_available_kib().is_some_and(|m| m < MIN_AVAILABLE_KIB)
        {
            break;
        }
    }
    progress(&format!(
        "density: carapace {ours_density} ({stop_reason}), runc {}",
        started_before_slowdown(&peer_lat, 2.0)
    ));
    report.rows.push(Row::new(
        "density",
        ours_density as f64,
        started_before_slowdown(&peer_lat, 2.0) as f64,
        "runc",
        "idle sandboxes",
    ));
    report.notes.push(format!(
        "density: idle sandboxes started (via ctr, one Carapace VM each) before the start latency \
         reached 2x the median of the first 3 or MemAvailable fell below {} MiB, bounded at {max}; Carapace \
         stopped: {stop_reason}; runc under the same rule and bound is the peer",
        MIN_AVAILABLE_KIB / 1024
    ));
    report
        .samples
        .push(Samples::new("runc idle container start", "ms", peer_lat));
    memory_rows(&node, &peer_node, "runc", report);

    // the second peer: idle gVisor sandboxes, same rule and bound; a note if it cannot run
    let mut gvisor_lat = Vec::new();
    let mut gvisor_node = NodeMemory::start()?;
    let mut gvisor_failure = None;
    for n in 1..=max {
        match start_idle(ctrd, GVISOR, &format!("idle-gvisor-{n}")) {
            Ok(ms) => gvisor_lat.push(ms),
            Err(e) => {
                gvisor_failure = Some(format!("{e:#}"));
                break;
            }
        }
        if MEMORY_AT.contains(&n) || n == max {
            std::thread::sleep(IDLE_SETTLE);
            gvisor_node.sample(n, None);
        }
        if started_before_slowdown(&gvisor_lat, 2.0) < gvisor_lat.len()
            || mem_available_kib().is_some_and(|m| m < MIN_AVAILABLE_KIB)
        {
            break;
        }
    }
    match gvisor_failure {
        Some(e) if gvisor_lat.is_empty() => report.notes.push(format!(
            "sandbox_memory_vs_gvisor, density_vs_gvisor: gVisor not measured: {e}"
        )),
        failure => {
            if let Some(e) = failure {
                report.notes.push(format!(
                    "gVisor idle sandbox {} failed to start: {e}",
                    gvisor_lat.len() + 1
                ));
            }
            report.rows.push(Row::new(
                "density_vs_gvisor",
                ours_density as f64,
                started_before_slowdown(&gvisor_lat, 2.0) as f64,
                GVISOR_LABEL,
                "idle sandboxes",
            ));
            memory_rows(&node, &gvisor_node, "gvisor", report);
            report
                .samples
                .push(Samples::new("gvisor idle sandbox start", "ms", gvisor_lat));
        }
    }
    Ok(())
}

/// The `sandbox_memory_at_N` rows: MemAvailable drop per idle sandbox at each count of
/// [`MEMORY_AT`] reached and at the last, runc's per idle container as the peer.
fn memory_rows(ours: &NodeMemory, peer: &NodeMemory, peer_name: &str, report: &mut Report) {
    let last = ours.at.last().map_or(0, |a| a.0);
    let mut counts: Vec<usize> = MEMORY_AT.iter().copied().filter(|&n| n <= last).collect();
    counts.push(last);
    counts.dedup();
    let mut cross = Vec::new();
    for n in counts {
        let Some((n, ours_kib, cgroups)) = ours.per_sandbox(n) else {
            continue;
        };
        let Some((peer_n, peer_kib, _)) = peer.per_sandbox(n) else {
            continue;
        };
        let name = if peer_n == n {
            peer_name.to_owned()
        } else {
            format!("{peer_name} at {peer_n}")
        };
        let row = if peer_name == "runc" {
            format!("sandbox_memory_at_{n}")
        } else {
            format!("sandbox_memory_at_{n}_vs_{peer_name}")
        };
        report.rows.push(
            Row::new(row, ours_kib, peer_kib, &name, "KiB/sandbox").target("<= 24576 (24 MiB)"),
        );
        if let Some(cg) = cgroups {
            cross.push(format!("at {n}: {cg:.0}"));
        }
    }
    if peer_name != "runc" {
        return;
    }
    report.notes.push(format!(
        "sandbox_memory: the host's MemAvailable drop per idle sandbox (guest memory, VMM, fs \
         daemon, shim, page cache they pin; sampled {} s after each `ctr run -d`), against \
         the drop per idle runc container in the same containerd; cross-check, memory.current \
         of the pods' host cgroups (VMM + fs daemon, no shim) per sandbox, KiB: {}",
        IDLE_SETTLE.as_secs(),
        if cross.is_empty() {
            "not available (cgroup v1 or no cgroup found)".to_owned()
        } else {
            cross.join(", ")
        }
    ));
}
