//! The pod phase: CRI RunPodSandbox to first log line, Carapace's handler vs runc's, and
//! Carapace with its VMM jail on (the default) vs off: what the jail costs a pod's start.

use super::*;

/// The CRI handler whose configuration turns the VMM jail off.
const NOJAIL: &str = "carapace-nojail";

/// `pod_start` rows: CRI pods with Carapace's handler vs runc's, one at a time (alternating
/// who goes first) and `parallel` at once. A failing Carapace start becomes a note; a failing
/// runc start is an error (without the peer no row means anything).
pub(super) fn pod_phase(
    cli: &Cli,
    bins: &Path,
    runs: usize,
    parallel: usize,
    report: &mut Report,
) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("cbp-") // short: unix socket paths below it carry 64-char CRI ids
        .tempdir()
        .context("creating a work directory")?;
    let (config, _state) =
        carapace_config(work.path(), bins, false).context("writing the Carapace configuration")?;
    check_guest_image(&cli.guest_dir)?;
    // the same configuration with the VMM jail off, for the jail's cost
    let nojail_config = work.path().join("nojail.toml");
    let text = std::fs::read_to_string(&config).context("reading the configuration")?;
    std::fs::write(&nojail_config, format!("{text}[jail]\nenabled = false\n"))
        .context("writing the jail-off configuration")?;
    progress("pod_start: starting a private containerd with the CRI images");
    let ctrd = carapace_containerd_with(
        &work.path().join("containerd"),
        bins,
        &config,
        &[(NOJAIL, &nojail_config)],
    )?;
    ctrd.import_cri_images(work.path())?;
    let run_for = |handler: &str| PodRun {
        socket: ctrd.socket(),
        handler: handler.to_owned(),
        image: carapace_tests::containerd::BUSYBOX_IMAGE.to_owned(),
        log_root: pods::log_root(work.path(), handler),
        timeout: Duration::from_secs(POD_TIMEOUT_S),
    };
    let (carapace, runc, gvisor) = (run_for("carapace"), run_for("runc"), run_for(GVISOR));
    let nojail = run_for(NOJAIL);
    let mut cri = carapace_tests::cri::Cri::connect(&ctrd.socket())?;

    let (mut ours, mut peer, mut second) = (Vec::new(), Vec::new(), Vec::new());
    let mut unjailed = Vec::new();
    let (mut failure, mut gvisor_failure, mut nojail_failure) = (None, None, None);
    for i in 0..runs {
        // rotate who goes first
        let mut order = [&carapace, &runc, &gvisor, &nojail];
        order.rotate_left(i % 4);
        for run in order {
            if (run.handler == "carapace" && failure.is_some())
                || (run.handler == GVISOR && gvisor_failure.is_some())
                || (run.handler == NOJAIL && nojail_failure.is_some())
            {
                continue;
            }
            match run.start_once(&mut cri, &format!("seq-{}-{i}", run.handler)) {
                Ok(ms) => {
                    progress(&format!("pod_start run {i}: {} {ms:.0} ms", run.handler));
                    match run.handler.as_str() {
                        "runc" => peer.push(ms),
                        GVISOR => second.push(ms),
                        NOJAIL => unjailed.push(ms),
                        _ => ours.push(ms),
                    }
                }
                Err(e) if run.handler == "carapace" => {
                    let e = anyhow::Error::from(e);
                    progress(&format!("pod_start: carapace failed: {e:#}"));
                    progress(&format!(
                        "containerd log (end):\n{}",
                        last_lines(&ctrd.log(), 40, "\n")
                    ));
                    failure = Some(format!("{e:#}"));
                }
                Err(e) if run.handler == NOJAIL => {
                    let e = anyhow::Error::from(e);
                    progress(&format!(
                        "pod_start: carapace with the jail off failed: {e:#}"
                    ));
                    nojail_failure = Some(format!("{e:#}"));
                }
                // the second peer is a note when it cannot run, never a number
                Err(e) if run.handler == GVISOR => {
                    let e = anyhow::Error::from(e);
                    progress(&format!("pod_start: gVisor failed: {e:#}"));
                    gvisor_failure = Some(format!("{e:#}"));
                }
                Err(e) => return Err(anyhow::Error::from(e).context("runc pods (the peer) failed")),
            }
        }
    }
    let peer = Samples::new("runc pod_start (CRI handler runc)", "ms", peer);
    let second = Samples::new(format!("{GVISOR_LABEL} pod_start"), "ms", second);
    if let Some(e) = &gvisor_failure {
        report
            .notes
            .push(format!("pod_start_vs_gvisor: gVisor not measured: {e}"));
    }
    if let Some(e) = failure {
        report.notes.push(format!(
            "pod_start: Carapace not measured, a pod with handler carapace failed: {e}; runc p50 {:.0} ms",
            peer.percentile(50.0).unwrap_or(f64::NAN)
        ));
        report.samples.push(peer);
        return Ok(());
    }
    let ours = Samples::new("carapace pod_start (CRI handler carapace)", "ms", ours);
    report
        .rows
        .extend(percentile_rows("pod_start", &ours, &peer, None)?);
    if gvisor_failure.is_none() {
        report.rows.extend(percentile_rows(
            "pod_start_vs_gvisor",
            &ours,
            &second,
            None,
        )?);
        report.samples.push(second);
    }
    let unjailed = Samples::new(
        "carapace pod_start, VMM jail off (CRI handler carapace-nojail)",
        "ms",
        unjailed,
    );
    match &nojail_failure {
        None => {
            report.rows.extend(percentile_rows(
                "pod_start_jail_on_vs_off",
                &ours,
                &unjailed,
                None,
            )?);
            report.samples.push(unjailed);
        }
        Some(e) => report.notes.push(format!(
            "pod_start_jail_on_vs_off: Carapace with the jail off not measured: {e}"
        )),
    }
    report.samples.push(ours);
    report.samples.push(peer);

    // all at once: runc first, then Carapace, each batch released together
    let batch = |run: &PodRun| -> Result<Vec<f64>> {
        progress(&format!(
            "pod_start: {parallel} {} pods at once",
            run.handler
        ));
        run.start_parallel(&format!("par-{}", run.handler), parallel)
            .into_iter()
            .map(|r| r.map_err(anyhow::Error::from))
            .collect()
    };
    let peer_par = batch(&runc).context("runc pods in parallel (the peer) failed")?;
    match batch(&carapace) {
        Ok(ours_par) => {
            let name = format!("pod_start_parallel{parallel}");
            let ours_par = Samples::new(format!("carapace {name}"), "ms", ours_par);
            let peer_par = Samples::new(format!("runc {name}"), "ms", peer_par);
            report
                .rows
                .extend(percentile_rows(&name, &ours_par, &peer_par, None)?);
            report.samples.push(ours_par);
            report.samples.push(peer_par);
        }
        Err(e) => report.notes.push(format!(
            "pod_start_parallel{parallel}: Carapace not measured: {e:#}"
        )),
    }
    report.notes.push(format!(
        "pod_start: CRI RunPodSandbox -> CreateContainer -> StartContainer -> the container's \
         first line in its CRI log, the pod's own CNI network (bridge, host-local, portmap), \
         busybox image; {runs} pods one at a \
         time (rotating handlers), then {parallel} at once from separate CRI connections; \
         peer: runc handler in the same containerd; second peer (one at a time only): handler \
         {GVISOR}, runsc under the runc shim, same CNI; pod_start_jail_on_vs_off: the same \
         pods with Carapace's VMM jail on (handler carapace, the default) against off (handler \
         {NOJAIL}, `[jail] enabled = false`), the jail's cost"
    ));
    Ok(())
}
