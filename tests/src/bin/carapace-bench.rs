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
//! - fs: file I/O on the container's root file system, carapace-fsd vs virtiofsd vs runc.
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
use carapace_tests::containerd::{Containerd, RuntimeEntry, carapace_config};
use carapace_tests::fixtures::{busybox_rootfs, oci_image_archive};
use clap::{Parser, ValueEnum};

const IMAGE: &str = "docker.io/carapace/busybox:bench";
const CARAPACE: &str = "io.containerd.carapace.v2";
const RUNC: &str = "io.containerd.runc.v2";
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
}

impl Phase {
    /// All phases, in the order a run measures them and a merged report lists them.
    const ALL: [Self; 6] = [
        Self::Boot,
        Self::Container,
        Self::Sandbox,
        Self::Pod,
        Self::Fs,
        Self::Net,
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
    #[arg(long, default_value_t = 20)]
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

fn boot(bins: &Path, kernel: &Path, initrd: &Path, runs: usize, report: &mut Report) -> Result<()> {
    let tool = bins.join("carapace-vmm-bench");
    if !tool.is_file() {
        bail!(Usage(format!(
            "{} is not built (cargo build --release -p carapace-test-programs)",
            tool.display()
        )));
    }
    let out = tempfile::Builder::new()
        .prefix("carapace-bench-boot-")
        .tempdir()
        .context("temp dir")?;
    progress(&format!(
        "boot: carapace-vmm vs qemu microvm, {runs} runs each (carapace-vmm-bench)"
    ));
    let status = Command::new(&tool)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--runs", &runs.to_string()])
        .arg("--out")
        .arg(out.path())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", tool.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", tool.display());
    }
    let path = out.path().join("vmm-bench.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (rows, samples) =
        vmm_bench(&text).with_context(|| format!("parsing {}", path.display()))?;
    report.rows.extend(rows);
    report.samples.extend(samples);
    report.notes.push(
        "boot: VMM process start -> the guest's ready line on the serial console (guest \
         /init = carapace-vmm-guest-test, same kernel and initramfs for both VMMs, 256 MiB); \
         boot_vsock_reply adds the first vsock echo"
            .into(),
    );
    Ok(())
}

/// `ctr run --rm` → first output line, in ms.
fn time_to_first_output(ctrd: &Containerd, runtime: &str, id: &str) -> Result<f64> {
    let start = Instant::now();
    // bounded: a start that never produces output becomes an error, not a stuck benchmark
    let mut child = Command::new("timeout")
        .arg(START_TIMEOUT_S.to_string())
        .arg("ctr")
        .arg("--address")
        .arg(ctrd.socket())
        .args([
            "--namespace",
            "carapace-test",
            "run",
            "--rm",
            "--runtime",
            runtime,
        ])
        .args([IMAGE, id, "echo", "ready"])
        .stdin(Stdio::null())
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
            last_lines(&err, 6)
        ),
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.trim().lines().collect();
    l[l.len().saturating_sub(n)..].join(" | ")
}

/// A private containerd whose runtime handler `carapace` is Carapace's shim, configured by
/// the Carapace configuration file `config`.
fn carapace_containerd(dir: &Path, bins: &Path, config: &Path) -> Result<Containerd> {
    Containerd::start(
        dir,
        &[RuntimeEntry {
            handler: "carapace".into(),
            runtime_type: CARAPACE.into(),
        }],
        Some(bins),
        &[("CARAPACE_CONFIG", config)],
    )
    .context("starting a private containerd with Carapace")
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

/// The container phase (when `container`) and the sandbox phase (when `density_max` is
/// given: it bounds the density run) in one private containerd.
fn containers(
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
fn start_idle(ctrd: &Containerd, runtime: &str, id: &str) -> Result<f64> {
    let start = Instant::now();
    let ctr = ctrd.ctr_command();
    let out = Command::new("timeout")
        .arg(START_TIMEOUT_S.to_string())
        .arg(ctr.get_program())
        .args(ctr.get_args())
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
            last_lines(&String::from_utf8_lossy(&out.stderr), 6)
        );
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// What a stuck or failed Carapace start left to look at: the sandbox's VMM counters (from
/// its control API), the ends of its logs, and the end of containerd's log (the shim's and
/// the runtime's lines).
fn diagnose(ctrd: &Containerd, state: &Path, id: &str) -> String {
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
        out.push_str(&format!("{log} (end):\n{}\n", tail_lines(&text, 25)));
    }
    out.push_str(&format!(
        "containerd log (end):\n{}\n",
        tail_lines(&ctrd.log(), 40)
    ));
    out
}

fn tail_lines(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

fn mem_available_kib() -> Option<u64> {
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
struct SandboxMemory {
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
fn sandbox_memory(smaps_dir: Option<&Path>) -> Result<SandboxMemory> {
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

fn sandboxes(
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

/// Deadline of one pod start (s): generous, the lab emulates the CPU.
const POD_TIMEOUT_S: u64 = 300;

/// `pod_start` rows: CRI pods with Carapace's handler vs runc's, one at a time (alternating
/// who goes first) and `parallel` at once. A failing Carapace start becomes a note; a failing
/// runc start is an error (without the peer no row means anything).
fn pod_phase(
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
    progress("pod_start: starting a private containerd with the CRI images");
    let ctrd = carapace_containerd(&work.path().join("containerd"), bins, &config)?;
    ctrd.import_cri_images(work.path())?;
    let run_for = |handler: &str| PodRun {
        socket: ctrd.socket(),
        handler: handler.to_owned(),
        image: carapace_tests::containerd::BUSYBOX_IMAGE.to_owned(),
        log_root: pods::log_root(work.path(), handler),
        timeout: Duration::from_secs(POD_TIMEOUT_S),
    };
    let (carapace, runc) = (run_for("carapace"), run_for("runc"));
    let mut cri = carapace_tests::cri::Cri::connect(&ctrd.socket())?;

    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    let mut failure = None;
    for i in 0..runs {
        let order = if i % 2 == 0 {
            [&carapace, &runc]
        } else {
            [&runc, &carapace]
        };
        for run in order {
            if run.handler == "carapace" && failure.is_some() {
                continue;
            }
            match run.start_once(&mut cri, &format!("seq-{}-{i}", run.handler)) {
                Ok(ms) => {
                    progress(&format!("pod_start run {i}: {} {ms:.0} ms", run.handler));
                    if run.handler == "runc" {
                        peer.push(ms);
                    } else {
                        ours.push(ms);
                    }
                }
                Err(e) if run.handler == "carapace" => {
                    let e = anyhow::Error::from(e);
                    progress(&format!("pod_start: carapace failed: {e:#}"));
                    progress(&format!(
                        "containerd log (end):\n{}",
                        tail_lines(&ctrd.log(), 40)
                    ));
                    failure = Some(format!("{e:#}"));
                }
                Err(e) => return Err(anyhow::Error::from(e).context("runc pods (the peer) failed")),
            }
        }
    }
    let peer = Samples::new("runc pod_start (CRI handler runc)", "ms", peer);
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
         time (alternating handlers), then {parallel} at once from separate CRI connections; \
         peer: runc handler in the same containerd"
    ));
    Ok(())
}

/// Rounds of the network phase per handler.
const NET_ROUNDS: usize = 3;

/// `net_*` rows: a CNI pod's network in a VM against the same CNI network under runc:
/// iperf3 host -> pod and pod -> pod, HTTP round trips from the host (bench::net).
fn net_phase(cli: &Cli, bins: &Path, rounds: usize, report: &mut Report) -> Result<()> {
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

fn virtiofsd_path(cli: &Cli) -> Option<PathBuf> {
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
fn fs_run(ctrd: &Containerd, runtime: &str, id: &str) -> Result<FsResult> {
    let script = fsbench::script();
    // bounded: a hung run must not stall the whole benchmark
    let out = Command::new("timeout")
        .arg(FS_RUN_TIMEOUT_S.to_string())
        .arg("ctr")
        .arg("--address")
        .arg(ctrd.socket())
        .args([
            "--namespace",
            "carapace-test",
            "run",
            "--rm",
            "--runtime",
            runtime,
        ])
        .args([IMAGE, id, "sh", "-c", &script])
        .stdin(Stdio::null())
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
            last_lines(&String::from_utf8_lossy(&out.stderr), 6)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    fsbench::parse(&stdout).with_context(|| format!("fs workload output of {id}: {stdout}"))
}

/// File I/O through virtio-fs (the container's root file system) with carapace-fsd and
/// with virtiofsd, against runc on the same host file system, each in its own private
/// containerd whose Carapace configuration names the daemon (`cache = "never"`, so the
/// guest page cache does not hide the daemon).
fn fs_phase(cli: &Cli, bins: &Path, runs: usize, report: &mut Report) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("carapace-bench-fs-")
        .tempdir()
        .context("creating a work directory")?;
    let rootfs = work.path().join("image-rootfs");
    busybox_rootfs(&rootfs)?;
    let archive = work.path().join("busybox.tar");
    oci_image_archive(&rootfs, IMAGE, &["sh"], work.path(), &archive)?;
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
