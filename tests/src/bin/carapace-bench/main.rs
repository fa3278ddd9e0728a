//! carapace-bench: `make bench`. Measures Carapace side by side with its peers in the same
//! run and writes `latest.json`, `<date>.json`, `latest.md` and `latest.svg` (see
//! bench/README.md). Run it where KVM boots guests (scripts/bench.sh runs it in the lab).
//!
//! Phases:
//! - boot: drives `carapace-vmm-bench` (carapace-vmm vs QEMU `-M microvm`, same kernel and
//!   initramfs) and turns its JSON into rows;
//! - container: `ctr run` → first output, Carapace vs runc, in one private containerd;
//! - sandbox: idle Carapace sandboxes started one by one (`ctr run -d`), start latency of
//!   each, PSS of shim + VMM + fsd per sandbox at 1 and at the last count, guest memory
//!   touched; density = sandboxes started before the start latency doubles or memory runs
//!   short, bounded; runc under the same rule is the peer;
//! - pod: CRI RunPodSandbox -> the container's first log line, one pod at a time and
//!   `--pod-parallel` pods at once, Carapace's handler vs runc's, in one private containerd;
//! - fs: file I/O on the container's root file system, carapace-fsd vs virtiofsd vs runc;
//! - net: TCP throughput and round trips into CNI pods, Carapace's two data paths vs runc;
//! - timeline: one cold `ctr run` split into its steps (shim, fs daemon, VMM, guest kernel
//!   with its slowest initcalls, agent, creates, process), from the logs it leaves.
//!
//! `--only PHASE... --partial FILE` runs some phases and writes their report to FILE;
//! `--merge FILE... --out DIR` joins such partial reports into the report files
//! (scripts/bench.sh runs each phase group in its own lab machine that way).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use carapace_tests::bench::fsio::{self as fsbench, FsResult};
use carapace_tests::bench::parse::{
    largest_mapping_pss_kib, named_mappings_pss_kib, smaps_rollup_pss_kib, started_before_slowdown,
    vmm_bench,
};
use carapace_tests::bench::pods::{self, PodRun};
use carapace_tests::bench::{Report, Row, Samples, percentile_rows};
use carapace_tests::containerd::{Containerd, RuntimeEntry, carapace_config, carapace_config_with};
use carapace_tests::fixtures::{busybox_rootfs, oci_image_archive};
use clap::{Parser, ValueEnum};

mod boot;
mod containers;
mod fs;
mod net;
mod pod;
mod timeline;

use boot::boot;
use containers::containers;
use fs::fs_phase;
use net::{NET_ROUNDS, net_phase};
use pod::pod_phase;
use timeline::timeline_phase;

const IMAGE: &str = "docker.io/carapace/busybox:bench";
const CARAPACE: &str = "io.containerd.carapace.v2";
const RUNC: &str = "io.containerd.runc.v2";
/// gVisor, the second peer: Debian's `runsc` driven by containerd's runc shim (`ctr run
/// --runc-binary`; Debian ships no containerd-shim-runsc-v1). A name of the bench's own,
/// never passed to containerd as a runtime ([`ctr_runtime_args`]).
const GVISOR: &str = "gvisor";
/// Debian's runsc (package `runsc`, installed by `make setup`).
const GVISOR_BIN: &str = "/usr/bin/runsc";
/// How the gVisor peer shows in rows and samples.
const GVISOR_LABEL: &str = "gvisor (runsc, runc shim)";

/// The runc-compatible binary the gVisor peer's containers are run with: a wrapper that
/// adds `--network=host` (ctr's containers share the host's network namespace, which runsc
/// refuses unless told; runc's containers get the same network), written by
/// [`gvisor_wrapper`].
static GVISOR_RUNC_BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Writes the gVisor wrapper into `dir` (once per run).
fn gvisor_wrapper(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("runsc-host-network");
    std::fs::write(
        &path,
        format!("#!/bin/sh\nexec {GVISOR_BIN} --network=host \"$@\"\n"),
    )
    .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
    .with_context(|| format!("writing {}", path.display()))?;
    let _ = GVISOR_RUNC_BINARY.set(path);
    Ok(())
}

/// `ctr run` arguments that pick `runtime` (one of [`CARAPACE`], [`RUNC`], [`GVISOR`]).
fn ctr_runtime_args(runtime: &str) -> Vec<String> {
    if runtime == GVISOR {
        let binary = GVISOR_RUNC_BINARY
            .get()
            .map_or_else(|| GVISOR_BIN.to_owned(), |p| p.display().to_string());
        vec![
            "--runtime".into(),
            RUNC.into(),
            "--runc-binary".into(),
            binary,
        ]
    } else {
        vec!["--runtime".into(), runtime.into()]
    }
}
/// Kata Containers' published per-sandbox memory footprint, the one fixed reference.
const KATA_PUBLISHED_KIB: f64 = 127_220.0;
const KATA_NAME: &str = "kata (published 127,220 KB/sandbox, fixed reference)";
/// Processes that make up one Carapace sandbox on the host.
const SANDBOX_PROCS: [&str; 3] = [
    "containerd-shim-carapace-v2",
    "carapace-vmm",
    "carapace-fsd",
];
/// How the guest RAM memfd shows in /proc/<pid>/smaps (carapace-vmm names it).
const GUEST_RAM_MAPPING: &str = "/memfd:carapace-guest-ram (deleted)";
/// Deadline of one `ctr run` in the container_start row (s).
const START_TIMEOUT_S: u64 = 300;
/// Deadline of one fs workload run (s).
const FS_RUN_TIMEOUT_S: u64 = 300;
/// How long after `ctr run -d` returned an idle sandbox's memory is sampled.
const IDLE_SETTLE: Duration = Duration::from_secs(12);
/// Timed starts of the timeline phase (after an untimed warm-up start).
const TIMELINE_RUNS: usize = 3;
/// Density stops when MemAvailable falls below this.
const MIN_AVAILABLE_KIB: u64 = 512 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    Boot,
    Container,
    Sandbox,
    Pod,
    Fs,
    Net,
    Timeline,
}

impl Phase {
    /// All phases, in the order a run measures them and a merged report lists them.
    const ALL: [Self; 7] = [
        Self::Boot,
        Self::Container,
        Self::Sandbox,
        Self::Pod,
        Self::Fs,
        Self::Net,
        Self::Timeline,
    ];

    /// The name on the command line (clap's).
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// The rows it writes, as notes name them (the density row is the sandbox phase's).
    fn rows(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::Container => "container_start",
            Self::Sandbox => "sandbox_pss, density",
            Self::Pod => "pod_start",
            Self::Fs => "fs_*",
            Self::Net => "net_*",
            Self::Timeline => "timeline",
        }
    }

    /// The note a phase left out by `--skip` leaves.
    fn skip_note(self) -> String {
        format!("{}: skipped (--skip {})", self.rows(), self.name())
    }
}

/// Carapace benchmarks side by side with their peers (QEMU microvm, runc, Kata's published
/// footprint). Run where KVM boots guests; `make bench` runs it in the lab. Exit codes:
/// 0 report written (rows that could not be measured are in its notes), 2 bad arguments
/// or missing binaries/images, 1 anything else.
///
/// Each phase can run on its own: `--only container --only sandbox --partial FILE` measures
/// those phases and writes their report (rows, samples, notes; the latest.json format) to
/// FILE; `--merge FILE... --out DIR` later joins such files, measuring nothing, into the
/// report files a whole run writes. scripts/bench.sh runs each phase group in its own lab
/// machine that way, so one lab failure loses one group, not the run.
#[derive(Debug, Parser)]
#[command(name = "carapace-bench", version, about, long_about)]
struct Cli {
    /// Where the report goes.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Smoke run: 3 runs per row, density bounded at 3.
    #[arg(long)]
    quick: bool,
    /// Runs per latency row (ignored with --quick).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Upper bound of the density run (ignored with --quick).
    #[arg(long, default_value_t = 30)]
    density_max: usize,
    /// Kernel for the boot phase (a PVH vmlinux).
    #[arg(long)]
    boot_kernel: Option<PathBuf>,
    /// initramfs with carapace-vmm-guest-test as /init, for the boot phase.
    #[arg(long)]
    boot_initrd: Option<PathBuf>,
    /// The Carapace guest image directory (vmlinux, initramfs.cpio.gz).
    #[arg(long, default_value = "/var/lib/carapace/guest")]
    guest_dir: PathBuf,
    /// Runs per file-system configuration (ignored with --quick: 1).
    #[arg(long, default_value_t = 3)]
    fs_runs: usize,
    /// virtiofsd, the peer of carapace-fsd (default: ~/.cargo/bin/virtiofsd, then PATH).
    #[arg(long)]
    virtiofsd: Option<PathBuf>,
    /// Pods started at once in the parallel pod_start row (ignored with --quick: 3).
    #[arg(long, default_value_t = 10)]
    pod_parallel: usize,
    /// Phases to skip (with --merge: phases the merged report notes as skipped).
    #[arg(long, value_enum, value_name = "PHASE", conflicts_with = "only")]
    skip: Vec<Phase>,
    /// Run only this phase (repeatable). Container and sandbox share one private
    /// containerd: ask for both in one run to set it up once.
    #[arg(long, value_enum, value_name = "PHASE")]
    only: Vec<Phase>,
    /// Write this run's report as JSON to FILE (for --merge) instead of the report files
    /// in --out.
    #[arg(long, value_name = "FILE")]
    partial: Option<PathBuf>,
    /// Measure nothing: merge these partial reports, in the order given (phase order), into
    /// the report files in --out and print the table. A missing or unreadable file becomes
    /// a note; a row name in two files is an error. Run options are ignored.
    #[arg(long, value_name = "PARTIAL", num_args = 1.., conflicts_with_all = ["only", "partial"])]
    merge: Vec<PathBuf>,
    /// Also save /proc/<pid>/smaps of each process of the first idle sandbox here (for
    /// finding where its memory goes).
    #[arg(long)]
    smaps_dir: Option<PathBuf>,
    /// The static carapace-fsio for the fs phase's random-I/O rows (default: the workspace's
    /// target/x86_64-unknown-linux-gnu/release/carapace-fsio, which scripts/bench.sh builds).
    #[arg(long, value_name = "PATH")]
    fsio: Option<PathBuf>,
    /// Guest kernel parameters added to Carapace's configuration (`hypervisor.kernel_params`)
    /// in the container and sandbox phases, for measuring one against the default in
    /// separate runs (e.g. `page_reporting.page_reporting_order=3`); the report notes them.
    #[arg(long, value_name = "PARAMS", default_value = "")]
    guest_kernel_params: String,
    /// Also save the logs each timeline start is read from (containerd's, the VMM's, the
    /// guest's kernel log) in DIR/<container id>/.
    #[arg(long, value_name = "DIR")]
    timeline_logs: Option<PathBuf>,
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// The directory holding this binary and its sibling workspace binaries.
fn bin_dir() -> Result<PathBuf> {
    carapace_tests::own_bin_dir().context("locating carapace-bench")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = if cli.merge.is_empty() {
        run(&cli)
    } else {
        merge(&cli)
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: failed: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A precondition the caller must fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn run(cli: &Cli) -> Result<()> {
    let runs = if cli.quick { 3 } else { cli.runs.max(1) };
    let density_max = if cli.quick { 3 } else { cli.density_max.max(1) };
    let bins = bin_dir()?;
    let mut report = Report::default();
    report.notes.push(format!(
        "ran on kernel {} ({}), {runs} runs per latency row, density bounded at {density_max}",
        sh("uname", &["-r"]),
        if std::path::Path::new("/sys/module/kvm_amd").exists() {
            "kvm_amd: inside the lab or on AMD hardware"
        } else {
            "kvm"
        }
    ));
    report.notes.push(format!(
        "gvisor peer: {GVISOR_BIN} ({}), default platform, host network (as ctr gives runc), \
         driven by containerd's runc shim",
        sh(GVISOR_BIN, &["--version"])
            .lines()
            .next()
            .unwrap_or("not installed")
    ));
    let started = Instant::now();

    if !skipped(cli, Phase::Boot, &mut report) {
        match (&cli.boot_kernel, &cli.boot_initrd) {
            (Some(k), Some(i)) => {
                if let Err(e) = boot(&bins, k, i, runs, &mut report) {
                    progress(&format!("boot phase failed: {e:#}"));
                    report.notes.push(format!("boot: not measured: {e:#}"));
                }
            }
            _ => report.notes.push(
                "boot: not measured: --boot-kernel/--boot-initrd not given (scripts/bench.sh builds them)"
                    .into(),
            ),
        }
    }

    let container = !skipped(cli, Phase::Container, &mut report);
    let sandbox = !skipped(cli, Phase::Sandbox, &mut report);
    if container || sandbox {
        let density_max = sandbox.then_some(density_max);
        containers(cli, &bins, runs, container, density_max, &mut report)?;
    }

    if !skipped(cli, Phase::Pod, &mut report) {
        let parallel = if cli.quick {
            3
        } else {
            cli.pod_parallel.max(1)
        };
        pod_phase(cli, &bins, runs, parallel, &mut report)?;
    }
    if !skipped(cli, Phase::Fs, &mut report) {
        let fs_runs = if cli.quick { 1 } else { cli.fs_runs.max(1) };
        if let Err(e) = fs_phase(cli, &bins, fs_runs, &mut report) {
            progress(&format!("fs phase failed: {e:#}"));
            report.notes.push(format!("fs_*: not measured: {e:#}"));
        }
    }
    if !skipped(cli, Phase::Net, &mut report) {
        let rounds = if cli.quick { 1 } else { NET_ROUNDS };
        if let Err(e) = net_phase(cli, &bins, rounds, &mut report) {
            progress(&format!("net phase failed: {e:#}"));
            report.notes.push(format!("net_*: not measured: {e:#}"));
        }
    }
    if !skipped(cli, Phase::Timeline, &mut report) {
        let runs = if cli.quick { 1 } else { TIMELINE_RUNS };
        if let Err(e) = timeline_phase(cli, &bins, runs, &mut report) {
            progress(&format!("timeline phase failed: {e:#}"));
            report.notes.push(format!("timeline: not measured: {e:#}"));
        }
    }
    let took = started.elapsed().as_secs_f64();
    report.notes.push(if cli.only.is_empty() {
        format!("total bench time {took:.0} s")
    } else {
        let only: Vec<String> = cli.only.iter().map(|p| p.name()).collect();
        format!("bench time of {}: {took:.0} s", only.join(" + "))
    });
    finish(cli, &report)
}

/// Whether `phase` is left out of this run. One left out by `--skip` says so in a note;
/// one left out by `--only` does not (it is another partial report's).
fn skipped(cli: &Cli, phase: Phase, report: &mut Report) -> bool {
    if cli.skip.contains(&phase) {
        report.notes.push(phase.skip_note());
        true
    } else {
        !cli.only.is_empty() && !cli.only.contains(&phase)
    }
}

/// `--merge`: the partial reports joined, `--skip`ped phases noted, written as a run would.
fn merge(cli: &Cli) -> Result<()> {
    let mut report =
        carapace_tests::bench::merge::merge_files(&cli.merge).context("merging partial reports")?;
    for phase in Phase::ALL {
        if cli.skip.contains(&phase) {
            report.notes.push(phase.skip_note());
        }
    }
    finish(cli, &report)
}

/// Writes the report: to `--partial` if given, else the report files in `--out`; prints
/// the table.
fn finish(cli: &Cli, report: &Report) -> Result<()> {
    let date = sh("date", &["-u", "+%Y-%m-%d"]);
    let files = match &cli.partial {
        Some(path) => report
            .write_partial(path, &date)
            .map(|()| vec![path.clone()])
            .context("writing the partial report")?,
        None => report
            .write(&cli.out, &date)
            .context("writing the report")?,
    };
    for f in files {
        progress(&format!("wrote {}", f.display()));
    }
    println!("{}", report.markdown());
    Ok(())
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("({cmd}: {e})"))
}

/// Deadline of one pod start (s): generous, the lab emulates the CPU.
const POD_TIMEOUT_S: u64 = 300;

/// The last `n` lines of `s`, joined by `sep`.
fn last_lines(s: &str, n: usize, sep: &str) -> String {
    let l: Vec<&str> = s.trim().lines().collect();
    l[l.len().saturating_sub(n)..].join(sep)
}

/// A private containerd whose runtime handler `carapace` is Carapace's shim, configured by
/// the Carapace configuration file `config`.
fn carapace_containerd(dir: &Path, bins: &Path, config: &Path) -> Result<Containerd> {
    carapace_containerd_with(dir, bins, config, &[])
}

/// [`carapace_containerd`] with more Carapace handlers, each `(handler, configuration)`
/// (the configuration reaches the shim as the handler's `ConfigPath` runtime option).
fn carapace_containerd_with(
    dir: &Path,
    bins: &Path,
    config: &Path,
    more: &[(&str, &Path)],
) -> Result<Containerd> {
    let mut runtimes = vec![RuntimeEntry {
        handler: "carapace".into(),
        runtime_type: CARAPACE.into(),
        ..Default::default()
    }];
    runtimes.extend(more.iter().map(|(handler, path)| RuntimeEntry {
        handler: (*handler).into(),
        runtime_type: CARAPACE.into(),
        config_path: Some(path.to_path_buf()),
        ..Default::default()
    }));
    // the second peer's CRI handler: runsc under the runc shim (pods bring their own network
    // namespace, so no wrapper is needed here)
    runtimes.push(RuntimeEntry {
        handler: GVISOR.into(),
        runtime_type: RUNC.into(),
        binary_name: Some(GVISOR_BIN.into()),
        ..Default::default()
    });
    Containerd::start(dir, &runtimes, Some(bins), &[("CARAPACE_CONFIG", config)])
        .context("starting a private containerd with Carapace")
}

/// The busybox image of the ctr phases, as an OCI archive in `work` for `ctr import`.
fn busybox_image(work: &Path) -> Result<PathBuf> {
    busybox_image_with(work, None)
}

/// [`busybox_image`] with the static program `fsio` as `/carapace-fsio` when given.
fn busybox_image_with(work: &Path, fsio: Option<&Path>) -> Result<PathBuf> {
    let rootfs = work.join("image-rootfs");
    busybox_rootfs(&rootfs)?;
    if let Some(p) = fsio {
        let dest = rootfs.join(fsbench::FSIO_PATH.trim_start_matches('/'));
        std::fs::copy(p, &dest)
            .with_context(|| format!("copying {} into the image", p.display()))?;
    }
    let archive = work.join("busybox.tar");
    oci_image_archive(&rootfs, IMAGE, &["sh"], work, &archive)?;
    Ok(archive)
}

/// A work directory for a phase that runs Carapace sandboxes through `ctr`, once their host
/// programs and the guest image are there.
fn sandbox_work_dir(cli: &Cli, bins: &Path) -> Result<tempfile::TempDir> {
    check_sandbox_binaries(bins)?;
    check_guest_image(&cli.guest_dir)?;
    tempfile::Builder::new()
        .prefix("carapace-bench-")
        .tempdir()
        .context("creating a work directory")
}

/// The sandbox's host programs must be built.
fn check_sandbox_binaries(bins: &Path) -> Result<()> {
    for b in SANDBOX_PROCS {
        if !bins.join(b).is_file() {
            bail!(Usage(format!(
                "{} is not built (cargo build --release --workspace --bins)",
                bins.join(b).display()
            )));
        }
    }
    Ok(())
}

/// The guest image the Carapace phases boot must be there.
fn check_guest_image(dir: &Path) -> Result<()> {
    for f in ["vmlinux", "initramfs.cpio.gz"] {
        let p = dir.join(f);
        if !p.is_file() {
            bail!(Usage(format!(
                "guest image {} missing (make image)",
                p.display()
            )));
        }
    }
    Ok(())
}
