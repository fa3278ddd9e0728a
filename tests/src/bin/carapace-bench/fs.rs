//! The fs phase: file I/O on the container's root file system, carapace-fsd vs virtiofsd
//! vs runc.

use super::*;

pub(super) fn virtiofsd_path(cli: &Cli) -> Option<PathBuf> {
    if let Some(p) = &cli.virtiofsd {
        return Some(p.clone());
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let p = home.join(".cargo/bin/virtiofsd");
    if p.is_file() {
        return Some(p);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("virtiofsd"))
            .find(|p| p.is_file())
    })
}

/// (row name, unit, extractor) of one file-system row.
type FsMetric = (&'static str, &'static str, fn(&FsResult) -> f64);

/// Runs the fs workload once in a container; its root file system is what is measured.
pub(super) fn fs_run(ctrd: &Containerd, runtime: &str, id: &str) -> Result<FsResult> {
    let script = fsbench::script();
    // bounded: a hung run must not stall the whole benchmark
    let out = ctrd
        .ctr_command_bounded(FS_RUN_TIMEOUT_S)
        .args(["run", "--rm", "--runtime", runtime])
        .args([IMAGE, id, "sh", "-c", &script])
        .output()
        .context("running timeout ctr")?;
    if !out.status.success() {
        bail!(
            "fs workload in {id} ({runtime}) failed ({}{}): {}",
            out.status,
            if out.status.code() == Some(124) {
                format!(", timed out after {FS_RUN_TIMEOUT_S} s")
            } else {
                String::new()
            },
            last_lines(&String::from_utf8_lossy(&out.stderr), 6, " | ")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    fsbench::parse(&stdout).with_context(|| format!("fs workload output of {id}: {stdout}"))
}

/// File I/O through virtio-fs (the container's root file system) with carapace-fsd and
/// with virtiofsd, against runc on the same host file system, each in its own private
/// containerd whose Carapace configuration names the daemon (`cache = "never"`, so the
/// guest page cache does not hide the daemon).
pub(super) fn fs_phase(cli: &Cli, bins: &Path, runs: usize, report: &mut Report) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("carapace-bench-fs-")
        .tempdir()
        .context("creating a work directory")?;
    let archive = busybox_image(work.path())?;
    let mut daemons = vec![("carapace-fsd", bins.join("carapace-fsd"))];
    match virtiofsd_path(cli) {
        Some(p) => daemons.push(("virtiofsd", p)),
        None => report.notes.push(
            "fs_*_vs_virtiofsd: not measured: virtiofsd not found (make setup installs it)".into(),
        ),
    }
    let mut results: Vec<(&str, Vec<FsResult>)> = Vec::new();
    let mut host = Vec::new();
    for (daemon, path) in daemons {
        let dir = work.path().join(daemon);
        std::fs::create_dir_all(&dir).context("creating a work directory")?;
        let config = dir.join("configuration.toml");
        std::fs::write(
            &config,
            format!(
                "[hypervisor]\npath = {:?}\n[fs]\ndaemon = {daemon:?}\npath = {:?}\ncache = \"never\"\n\
                 [runtime]\nstate_dir = {:?}\n[agent]\nboot_timeout_ms = 300000\n",
                bins.join("carapace-vmm").display().to_string(),
                path.display().to_string(),
                dir.join("run").display().to_string()
            ),
        )
        .context("writing the Carapace configuration")?;
        progress(&format!(
            "fs: private containerd with Carapace using {daemon}"
        ));
        let ctrd = carapace_containerd(&dir.join("containerd"), bins, &config)?;
        ctrd.import(&archive)?;
        let mut ours = Vec::new();
        for i in 0..runs {
            match fs_run(&ctrd, CARAPACE, &format!("fs-{daemon}-{i}")) {
                Ok(r) => {
                    progress(&format!("fs run {i}: carapace with {daemon}: {r:?}"));
                    ours.push(r);
                }
                Err(e) => {
                    progress(&format!("fs: carapace with {daemon} failed: {e:#}"));
                    report
                        .notes
                        .push(format!("fs with {daemon}: not measured: {e:#}"));
                    ours.clear();
                    break;
                }
            }
            if daemon == "carapace-fsd" {
                let r = fs_run(&ctrd, RUNC, &format!("fs-host-{i}"))
                    .context("runc (the host peer) failed")?;
                progress(&format!("fs run {i}: runc (host file system): {r:?}"));
                host.push(r);
            }
        }
        if !ours.is_empty() {
            results.push((daemon, ours));
        }
    }
    let metrics: [FsMetric; 3] = [
        ("fs_seq_write", "MiB/s", |r| r.seq_write_mib_s),
        ("fs_seq_read", "MiB/s", |r| r.seq_read_mib_s),
        ("fs_metadata", "ops/s", |r| r.metadata_ops_s),
    ];
    let median = |v: &[FsResult], f: fn(&FsResult) -> f64, label: &str| {
        Samples::new(label, "", v.iter().map(f).collect()).percentile(50.0)
    };
    let fsd = results.iter().find(|r| r.0 == "carapace-fsd").map(|r| &r.1);
    let vfs = results.iter().find(|r| r.0 == "virtiofsd").map(|r| &r.1);
    for (name, unit, f) in metrics {
        if let Some(fsd) = fsd {
            report.rows.push(Row::new(
                name,
                median(fsd, f, "carapace-fsd")?,
                median(&host, f, "host")?,
                "host file system (runc, overlayfs)",
                unit,
            ));
            if let Some(vfs) = vfs {
                report.rows.push(Row::new(
                    format!("{name}_vs_virtiofsd"),
                    median(fsd, f, "carapace-fsd")?,
                    median(vfs, f, "virtiofsd")?,
                    "virtiofsd (same VMM, same guest)",
                    unit,
                ));
            }
        }
        if let Some(vfs) = vfs {
            report.rows.push(Row::new(
                format!("{name}_virtiofsd_vs_host"),
                median(vfs, f, "virtiofsd")?,
                median(&host, f, "host")?,
                "host file system (runc, overlayfs)",
                unit,
            ));
        }
    }
    report.notes.push(format!(
        "fs_*: inside a container, on its root file system (virtio-fs under Carapace with \
         cache=never, overlayfs on the host under runc): {} MiB dd write with fsync, the same \
         file read back, {} files created, listed with attributes and removed; medians of \
         {runs} run(s); higher is better (ratio > 1 means ours is faster). Times come from \
         /proc/uptime (10 ms resolution)",
        fsbench::SEQ_MIB,
        fsbench::META_FILES
    ));
    Ok(())
}
