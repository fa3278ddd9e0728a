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

/// (row name, unit, extractor) of one file-system row; None when a run did not measure it.
type FsMetric = (&'static str, &'static str, fn(&FsResult) -> Option<f64>);

/// The static carapace-fsio for the random-I/O rows (scripts/bench.sh builds it), if built.
fn fsio_path(cli: &Cli, bins: &Path) -> Option<PathBuf> {
    cli.fsio
        .clone()
        .or_else(|| {
            bins.parent()
                .map(|t| t.join("x86_64-unknown-linux-gnu/release/carapace-fsio"))
        })
        .filter(|p| p.is_file())
}

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
    let fsio = fsio_path(cli, bins);
    if fsio.is_none() {
        report.notes.push(
            "fs_rand_*: not measured: carapace-fsio is not built (scripts/bench.sh builds it \
             static: cargo build --release --target x86_64-unknown-linux-gnu -p \
             carapace-test-programs --bin carapace-fsio)"
                .into(),
        );
    }
    let archive = busybox_image_with(work.path(), fsio.as_deref())?;
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
                 [runtime]\nstate_dir = {:?}\n[agent]\nboot_timeout_ms = 300000\n\
                 [jail]\nfs_daemon = {}\n",
                bins.join("carapace-vmm").display().to_string(),
                path.display().to_string(),
                dir.join("run").display().to_string(),
                // virtiofsd cannot run jailed; ours runs jailed, so that its cost shows
                daemon == "carapace-fsd"
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
    let metrics: [FsMetric; 5] = [
        ("fs_seq_write", "MiB/s", |r| Some(r.seq_write_mib_s)),
        ("fs_seq_read", "MiB/s", |r| Some(r.seq_read_mib_s)),
        ("fs_metadata", "ops/s", |r| Some(r.metadata_ops_s)),
        ("fs_rand_write_4k", "IOPS", |r| r.rand_write_iops),
        ("fs_rand_read_4k", "IOPS", |r| r.rand_read_iops),
    ];
    // every run's value, or None when a run lacks it (no row then)
    let values = |v: &[FsResult], f: fn(&FsResult) -> Option<f64>| -> Option<Vec<f64>> {
        v.iter().map(f).collect::<Option<Vec<f64>>>()
    };
    let fsd = results.iter().find(|r| r.0 == "carapace-fsd").map(|r| &r.1);
    let vfs = results.iter().find(|r| r.0 == "virtiofsd").map(|r| &r.1);
    for (name, unit, f) in metrics {
        let host_v = values(&host, f);
        let fsd_v = fsd.and_then(|v| values(v, f));
        let vfs_v = vfs.and_then(|v| values(v, f));
        let set = |label: &str, v: &Option<Vec<f64>>| {
            v.as_ref()
                .map(|v| Samples::new(format!("{label} {name}"), unit, v.clone()))
        };
        let (h, o, p) = (
            set("runc (host)", &host_v),
            set("carapace-fsd", &fsd_v),
            set("virtiofsd", &vfs_v),
        );
        let row = |row: String, a: &Samples, b: &Samples, peer: &str| -> Result<Row> {
            Ok(Row::new(
                row,
                a.percentile(50.0)?,
                b.percentile(50.0)?,
                peer,
                unit,
            ))
        };
        const HOST: &str = "host file system (runc, overlayfs)";
        if let (Some(o), Some(h)) = (&o, &h) {
            report.rows.push(row(name.to_owned(), o, h, HOST)?);
        }
        if let (Some(o), Some(p)) = (&o, &p) {
            report.rows.push(row(
                format!("{name}_vs_virtiofsd"),
                o,
                p,
                "virtiofsd (same VMM, same guest)",
            )?);
        }
        if let (Some(p), Some(h)) = (&p, &h) {
            report
                .rows
                .push(row(format!("{name}_virtiofsd_vs_host"), p, h, HOST)?);
        }
        report.samples.extend([o, p, h].into_iter().flatten());
    }
    report.notes.push(format!(
        "fs_*: inside a container, on its root file system (virtio-fs under Carapace with \
         cache=never, overlayfs on the host under runc): {} MiB dd write with fsync, the same \
         file read back, {} files created, listed with attributes and removed (times from \
         /proc/uptime, 10 ms resolution); fs_rand_*: carapace-fsio, {} 4 KiB writes at random \
         offsets of a {} MiB file then one fsync, then {} 4 KiB random reads (in-process \
         clock); medians of {runs} run(s), every run in the samples; higher is better (ratio \
         > 1 means ours is faster)",
        fsbench::SEQ_MIB,
        fsbench::META_FILES,
        fsbench::RAND_OPS,
        fsbench::RAND_MIB,
        fsbench::RAND_OPS
    ));
    Ok(())
}
