//! The net phase: a CNI pod's network in a VM against the same CNI network under runc.

use super::*;

/// Rounds of the network phase per handler.
pub(super) const NET_ROUNDS: usize = 3;

/// `net_*` rows: a CNI pod's network in a VM against the same CNI network under runc:
/// iperf3 host -> pod and pod -> pod, HTTP round trips from the host (bench::net).
pub(super) fn net_phase(cli: &Cli, bins: &Path, rounds: usize, report: &mut Report) -> Result<()> {
    use carapace_tests::bench::net::{NetRun, NetSample};
    let work = tempfile::Builder::new()
        .prefix("cbn-")
        .tempdir()
        .context("creating a work directory")?;
    let (config, _state) =
        carapace_config(work.path(), bins, false).context("writing the Carapace configuration")?;
    check_guest_image(&cli.guest_dir)?;
    progress("net: starting a private containerd with the CRI and iperf3 images");
    let ctrd = carapace_containerd(&work.path().join("containerd"), bins, &config)?;
    ctrd.import_cri_images(work.path())?;
    ctrd.import_net_image(work.path())?;
    let mut cri = carapace_tests::cri::Cri::connect(&ctrd.socket())?;
    let run_for = |handler: &str| NetRun {
        handler: handler.to_owned(),
        log_root: pods::log_root(work.path(), handler),
        iperf_secs: if cli.quick { 2 } else { 5 },
        requests: if cli.quick { 10 } else { 50 },
        timeout: Duration::from_secs(POD_TIMEOUT_S),
    };
    let (carapace, runc) = (run_for("carapace"), run_for("runc"));
    let (mut ours, mut peer): (Vec<NetSample>, Vec<NetSample>) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let order = if i % 2 == 0 {
            [&carapace, &runc]
        } else {
            [&runc, &carapace]
        };
        for run in order {
            let s = run
                .measure(&mut cri, i)
                .with_context(|| format!("{} pods' network, round {i}", run.handler))?;
            progress(&format!(
                "net round {i}: {} host->pod {:.0} Mbit/s, pod->pod {:.0} Mbit/s",
                run.handler, s.host_to_pod_mbps, s.pod_to_pod_mbps
            ));
            if run.handler == "runc" {
                peer.push(s);
            } else {
                ours.push(s);
            }
        }
    }
    let samples = |who: &str, v: &[NetSample], f: fn(&NetSample) -> f64, what: &str| {
        Samples::new(format!("{who} {what}"), "Mbit/s", v.iter().map(f).collect())
    };
    for (name, f) in [
        (
            "net_host_to_pod",
            (|s: &NetSample| s.host_to_pod_mbps) as fn(&NetSample) -> f64,
        ),
        ("net_pod_to_pod", |s: &NetSample| s.pod_to_pod_mbps),
    ] {
        let (o, p) = (
            samples("carapace", &ours, f, name),
            samples("runc", &peer, f, name),
        );
        report.rows.push(
            carapace_tests::bench::Row::new(
                format!("{name}_p50"),
                o.percentile(50.0)?,
                p.percentile(50.0)?,
                "runc, same CNI network",
                "Mbit/s",
            )
            .target(">= 0.5"),
        );
        report.samples.push(o);
        report.samples.push(p);
    }
    let rtt = |v: &[NetSample]| v.iter().flat_map(|s| s.rtt_ms.iter().copied()).collect();
    let (o, p) = (
        Samples::new(
            "carapace net_rtt (HTTP GET from the host)",
            "ms",
            rtt(&ours),
        ),
        Samples::new("runc net_rtt (HTTP GET from the host)", "ms", rtt(&peer)),
    );
    report
        .rows
        .extend(percentile_rows("net_rtt", &o, &p, Some("<= 2"))?);
    report.samples.push(o);
    report.samples.push(p);
    report.notes.push(format!(
        "net_*: CRI pods with their own CNI network (bridge, host-local, portmap), {rounds} \
         round(s) per handler alternating; iperf3 (Debian) TCP {} s host -> pod and pod -> pod \
         (receiver's rate, p50 of the rounds); HTTP GET round trips (connect, request, whole \
         reply) from the host to busybox httpd in the pod; peer: runc handler, same network",
        carapace.iperf_secs
    ));
    Ok(())
}
