//! The container and sandbox phases: `ctr run` to first output, idle sandboxes one by one
//! (start latency, memory, density), Carapace vs runc in one private containerd.

use super::*;

/// `ctr run --rm` → first output line, in ms.
pub(super) fn time_to_first_output(ctrd: &Containerd, runtime: &str, id: &str) -> Result<f64> {
    let start = Instant::now();
    // bounded: a start that never produces output becomes an error, not a stuck benchmark
    let mut child = ctrd
        .ctr_command_bounded(START_TIMEOUT_S)
        .args(["run", "--rm", "--runtime", runtime])
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
    for b in SANDBOX_PROCS {
        if !bins.join(b).is_file() {
            bail!(Usage(format!(
                "{} is not built (cargo build --release --workspace --bins)",
                bins.join(b).display()
            )));
        }
    }
    check_guest_image(&cli.guest_dir)?;
    let work = tempfile::Builder::new()
        .prefix("carapace-bench-")
        .tempdir()
        .context("creating a work directory")?;
    let (config, state) =
        carapace_config(work.path(), bins, false).context("writing the Carapace configuration")?;
    progress("building a busybox image and starting a private containerd");
    let rootfs = work.path().join("image-rootfs");
    busybox_rootfs(&rootfs)?;
    let archive = work.path().join("busybox.tar");
    oci_image_archive(&rootfs, IMAGE, &["sh"], work.path(), &archive)?;
    let ctrd = carapace_containerd(&work.path().join("containerd"), bins, &config)?;
    ctrd.import(&archive)?;

    let mut carapace_ok = true;
    if container {
        let (mut ours, mut peer) = (Vec::new(), Vec::new());
        let mut failure = None;
        for i in 0..runs {
            // alternate who goes first so warm caches favour neither
            for runtime in if i % 2 == 0 {
                [CARAPACE, RUNC]
            } else {
                [RUNC, CARAPACE]
            } {
                if runtime == CARAPACE && failure.is_some() {
                    continue;
                }
                let id = format!(
                    "start-{}-{i}",
                    if runtime == RUNC { "runc" } else { "carapace" }
                );
                match time_to_first_output(&ctrd, runtime, &id) {
                    Ok(ms) => {
                        progress(&format!("container_start run {i}: {runtime} {ms:.0} ms"));
                        if runtime == RUNC {
                            peer.push(ms)
                        } else {
                            ours.push(ms)
                        }
                    }
                    Err(e) if runtime == CARAPACE => {
                        progress(&format!("container_start: carapace failed: {e:#}"));
                        progress(&diagnose(&ctrd, &state, &id));
                        failure = Some(format!("{e:#}"));
                    }
                    Err(e) => return Err(e.context("runc (the peer) failed")),
                }
            }
        }
        let peer = Samples::new("runc (io.containerd.runc.v2)", "ms", peer);
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
                report.samples.push(ours);
                report.samples.push(peer);
            }
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

/// Starts an idle container in the background; returns the time `ctr run -d` took (ms).
/// `ctr run -d ... sleep 3600`, bounded by [`START_TIMEOUT_S`]; returns ms.
pub(super) fn start_idle(ctrd: &Containerd, runtime: &str, id: &str) -> Result<f64> {
    let start = Instant::now();
    let out = ctrd
        .ctr_command_bounded(START_TIMEOUT_S)
        .args([
            "run",
            "-d",
            "--runtime",
            runtime,
            IMAGE,
            id,
            "sleep",
            "3600",
        ])
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
    for n in 1..=max {
        let id = format!("idle-carapace-{n}");
        let ms =
            start_idle(ctrd, CARAPACE, &id).map_err(|e| e.context(diagnose(ctrd, state, &id)))?;
        lat.push(ms);
        // An idle sandbox, not one still starting: the guest settled.
        std::thread::sleep(IDLE_SETTLE);
        let mem = sandbox_memory(if n == 1 { smaps_dir } else { None })?;
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
    for n in 1..=max {
        peer_lat.push(start_idle(ctrd, RUNC, &format!("idle-runc-{n}"))?);
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
    Ok(())
}
