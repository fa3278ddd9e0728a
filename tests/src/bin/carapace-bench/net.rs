//! The net phase: a CNI pod's network in a VM against the same CNI network under runc.

use super::*;

/// Rounds of the network phase per handler.
pub(super) const NET_ROUNDS: usize = 3;

/// The handler whose configuration turns vhost-net off: the VMM's userspace virtio-net.
const USERSPACE: &str = "carapace-userspace";

/// `net_*` rows: a CNI pod's network in a VM against the same CNI network under runc:
/// iperf3 host -> pod and pod -> pod, HTTP round trips from the host (bench::net). Carapace
/// runs twice: as configured by default (`network.vhost_net = "auto"`: vhost-net where the
/// host has it) and with the VMM's own userspace virtio-net (`vhost_net = "off"`, its own
/// handler), so both data paths are measured against the same peer in the same run.
pub(super) fn net_phase(cli: &Cli, bins: &Path, rounds: usize, report: &mut Report) -> Result<()> {
    use carapace_tests::bench::net::{NetRun, NetSample};
    let work = tempfile::Builder::new()
        .prefix("cbn-")
        .tempdir()
        .context("creating a work directory")?;
    // The guest console is kept (the kernel's own lines only: `quiet`), so a failed round
    // shows what the guest said, e.g. an out-of-memory kill.
    let (config, state) =
        carapace_config(work.path(), bins, true).context("writing the Carapace configuration")?;
    let userspace_config = work.path().join("configuration-userspace.toml");
    let text = std::fs::read_to_string(&config).context("reading the configuration")?;
    std::fs::write(
        &userspace_config,
        format!("{text}[network]\nvhost_net = \"off\"\n"),
    )
    .context("writing the userspace-network configuration")?;
    check_guest_image(&cli.guest_dir)?;
    let vhost = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-net")
        .is_ok();
    progress("net: starting a private containerd with the CRI and iperf3 images");
    let ctrd = carapace_containerd_with(
        &work.path().join("containerd"),
        bins,
        &config,
        &[(USERSPACE, &userspace_config)],
    )?;
    ctrd.import_cri_images(work.path())?;
    ctrd.import_net_image(work.path())?;
    let mut cri = carapace_tests::cri::Cri::connect(&ctrd.socket())?;
    let run_for = |handler: &str| NetRun {
        handler: handler.to_owned(),
        log_root: pods::log_root(work.path(), handler),
        iperf_secs: if cli.quick { 2 } else { 5 },
        requests: if cli.quick { 10 } else { 50 },
        timeout: Duration::from_secs(POD_TIMEOUT_S),
        state_dir: (handler != "runc").then(|| state.clone()),
    };
    let runs = [run_for("carapace"), run_for(USERSPACE), run_for("runc")];
    let mut got: [Vec<NetSample>; 3] = Default::default();
    for i in 0..rounds {
        // who goes first rotates, so a trend in the host's state falls on all three
        for k in 0..runs.len() {
            let j = (i + k) % runs.len();
            let run = &runs[j];
            let faults = triple_faults(&ctrd);
            let s = match run.measure(&mut cri, i) {
                Ok(s) => s,
                // A VM of the round triple-faulted (the lab's emulated CPU does that now
                // and then: tests/README.md, "The lab"): the round says nothing about the
                // network, so it runs once more (its pods named as round i + rounds), and
                // the report says so. Anything else, or a second fault, ends the phase.
                Err(e) if triple_faults(&ctrd) > faults => {
                    let again = i + rounds;
                    progress(&format!(
                        "net round {i}: a {} VM triple-faulted ({e}); running the round again",
                        run.handler
                    ));
                    report.notes.push(format!(
                        "net_*: round {i} of {} ran twice: a VM of its first try triple-faulted \
                         (shim's post-mortem in containerd's log)",
                        run.handler
                    ));
                    run.measure(&mut cri, again).with_context(|| {
                        format!("{} pods' network, round {i} (second try)", run.handler)
                    })?
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("{} pods' network, round {i}", run.handler));
                }
            };
            progress(&format!(
                "net round {i}: {} host->pod {:.0} Mbit/s, pod->pod {:.0} Mbit/s",
                run.handler, s.host_to_pod_mbps, s.pod_to_pod_mbps
            ));
            got[j].push(s);
        }
    }
    let [ours, userspace, peer] = &got;
    let default_path = if vhost { "vhost-net" } else { "userspace" };
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
        let p = samples("runc", peer, f, name);
        for (suffix, who, v) in [
            ("", format!("carapace ({default_path})"), ours),
            (
                "_userspace",
                "carapace (userspace virtio-net)".to_owned(),
                userspace,
            ),
        ] {
            let o = samples(&who, v, f, name);
            report.rows.push(
                carapace_tests::bench::Row::new(
                    format!("{name}{suffix}_p50"),
                    o.percentile(50.0)?,
                    p.percentile(50.0)?,
                    "runc, same CNI network",
                    "Mbit/s",
                )
                .target(">= 0.5"),
            );
            report.samples.push(o);
        }
        report.samples.push(p);
    }
    let rtt = |v: &[NetSample]| v.iter().flat_map(|s| s.rtt_ms.iter().copied()).collect();
    let p = Samples::new("runc net_rtt (HTTP GET from the host)", "ms", rtt(peer));
    for (prefix, who, v) in [
        ("net_rtt", format!("carapace ({default_path})"), ours),
        (
            "net_rtt_userspace",
            "carapace (userspace virtio-net)".to_owned(),
            userspace,
        ),
    ] {
        let o = Samples::new(
            format!("{who} net_rtt (HTTP GET from the host)"),
            "ms",
            rtt(v),
        );
        report
            .rows
            .extend(percentile_rows(prefix, &o, &p, Some("<= 2"))?);
        report.samples.push(o);
    }
    report.samples.push(p);
    report.notes.push(format!(
        "net_*: CRI pods with their own CNI network (bridge, host-local, portmap), {rounds} \
         round(s) per handler, the order rotating; iperf3 (Debian) TCP {} s host -> pod and \
         pod -> pod (receiver's rate, p50 of the rounds); HTTP GET round trips (connect, \
         request, whole reply) from the host to busybox httpd in the pod; peer: runc handler, \
         same network. Carapace's default data path here: {default_path} (network.vhost_net = \
         auto); the *_userspace rows: vhost_net = off, the VMM's own virtio-net with offloads",
        runs[0].iperf_secs
    ));
    Ok(())
}

/// How many VM post-mortems in containerd's log name a guest triple fault (the shim logs
/// one when a VM ends on its own, quoting the VMM's last lines).
pub(super) fn triple_faults(ctrd: &carapace_tests::containerd::Containerd) -> usize {
    ctrd.log().matches("guest triple fault").count()
}
