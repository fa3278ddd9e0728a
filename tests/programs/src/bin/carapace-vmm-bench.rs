//! carapace-vmm-bench: boot-time, first-vsock-reply and memory benchmark of carapace-vmm
//! against QEMU `-M microvm` booting the same kernel and initramfs, in the same run.
//!
//! The initramfs must have `carapace-vmm-guest-test` as /init (it prints
//! `vmm-guest-test: ready` and echoes on vsock port 1024 with `vmmtest=echo`). Run it
//! where KVM boots guests, e.g. `tests/lab/run -- target/release/carapace-vmm-bench
//! --kernel K --initrd I --runs 10 --out DIR` (see vmm/README.md). Prints a table (p50/p95
//! per metric and VMM, ratio ours/QEMU) and writes `DIR/vmm-bench.json`.
//!
//! Metrics, all from spawning the VMM process:
//! - `ready_ms`: the guest's first console line (`vmm-guest-test: ready`);
//! - `vsock_reply_ms`: the first echo received over vsock (ours: hybrid unix socket;
//!   QEMU: vhost-vsock-device, host AF_VSOCK);
//! - `boot_done_ms` (ours only): the VMM's own record of the boot-done marker;
//! - `pss_extra_kib`: VMM PSS after the reply minus the PSS of the guest-RAM mapping.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

/// Benchmark carapace-vmm against QEMU microvm (run where KVM boots guests).
#[derive(Debug, Parser)]
#[command(name = "carapace-vmm-bench", version, about, long_about)]
struct Cli {
    /// Guest kernel (PVH vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// initramfs with carapace-vmm-guest-test as /init.
    #[arg(long)]
    initrd: PathBuf,
    /// carapace-vmm binary (default: next to this one).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Runs per VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Guest memory (MiB) for both VMMs.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// Per-boot deadline in seconds.
    #[arg(long, default_value_t = 180)]
    deadline: u64,
    /// Directory for vmm-bench.json.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

const READY: &str = "vmm-guest-test: ready";
const GUEST_CMDLINE: &str = "quiet vmmtest=echo";

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Sample {
    ready_ms: f64,
    vsock_reply_ms: f64,
    boot_done_ms: Option<f64>,
    pss_extra_kib: u64,
    pss_total_kib: u64,
}

mod vsock {
    //! Host-side AF_VSOCK client (QEMU's vhost-vsock path).
    use std::fs::File;
    use std::io;
    use std::os::fd::FromRawFd;

    /// Returns the socket as a `UnixStream` only for its generic socket methods (read, write,
    /// SO_RCVTIMEO); the address family is AF_VSOCK.
    pub fn connect(cid: u32, port: u32) -> io::Result<std::os::unix::net::UnixStream> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nobody else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is valid.
        let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        a.svm_cid = cid;
        a.svm_port = port;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `a` is a valid sockaddr_vm of `len` bytes; `fd` is open.
        let r = unsafe { libc::connect(fd, (&raw const a).cast(), len) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(std::os::unix::net::UnixStream::from(
            std::os::fd::OwnedFd::from(f),
        ))
    }
}

/// Streams the child's stdout lines (with arrival time) to a channel.
fn watch_lines(child: &mut Child) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(l) = line else { break };
                if tx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn wait_ready(
    rx: &mpsc::Receiver<(Instant, String)>,
    deadline: Instant,
) -> anyhow::Result<Instant> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (t, line) = rx
            .recv_timeout(left)
            .context("no ready line before the deadline (or the VMM exited)")?;
        if line.contains(READY) {
            return Ok(t);
        }
    }
}

fn echo_once(mut s: impl Read + Write) -> anyhow::Result<()> {
    s.write_all(b"ping\n")?;
    let mut b = [0u8; 5];
    s.read_exact(&mut b)?;
    if &b != b"ping\n" {
        bail!("bad echo {b:?}");
    }
    Ok(())
}

fn retry<T>(deadline: Instant, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// (total PSS, PSS of the largest mapping = guest RAM) in KiB.
fn pss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut total, mut biggest_size, mut biggest_pss, mut cur_size) = (0u64, 0u64, 0u64, 0u64);
    for line in smaps.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("Size:"), Some(v)) => cur_size = v.parse().unwrap_or(0),
            (Some("Pss:"), Some(v)) => {
                let p: u64 = v.parse().unwrap_or(0);
                total += p;
                if cur_size > biggest_size {
                    biggest_size = cur_size;
                    biggest_pss = p;
                }
            }
            _ => {}
        }
    }
    Ok((total, biggest_pss))
}

fn run_ours(cli: &Cli, vmm: &Path, dir: &Path) -> anyhow::Result<Sample> {
    let uds = dir.join("v.sock");
    let start = Instant::now();
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(&cli.kernel)
        .arg("--initrd")
        .arg(&cli.initrd)
        .args(["--memory-mib", &cli.memory_mib.to_string()])
        .arg("--vsock-uds")
        .arg(&uds)
        .args(["--cmdline", GUEST_CMDLINE, "--serial", "stdout"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn carapace-vmm")?;
    let deadline = start + Duration::from_secs(cli.deadline);
    let stderr = child.stderr.take();
    let boot_done = std::thread::spawn(move || {
        let mut v = None;
        if let Some(e) = stderr {
            for l in BufReader::new(e).lines().map_while(Result::ok) {
                if let Some(rest) = l.split("boot_done_ms=").nth(1) {
                    let num: String = rest
                        .chars()
                        .filter(|c| c.is_ascii_digit() || *c == '.')
                        .collect();
                    v = num.parse::<f64>().ok();
                }
            }
        }
        v
    });
    let rx = watch_lines(&mut child);
    let result = (|| -> anyhow::Result<Sample> {
        let ready = wait_ready(&rx, deadline)?;
        retry(deadline, || {
            let mut s = std::os::unix::net::UnixStream::connect(&uds)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"CONNECT 1024\n")?;
            let mut line = [0u8; 1];
            let mut got = Vec::new();
            while line[0] != b'\n' {
                if s.read(&mut line)? == 0 {
                    bail!("closed in handshake");
                }
                got.push(line[0]);
            }
            echo_once(s)
        })?;
        let reply = Instant::now();
        let (total, guest) = pss(child.id())?;
        Ok(Sample {
            ready_ms: (ready - start).as_secs_f64() * 1000.0,
            vsock_reply_ms: (reply - start).as_secs_f64() * 1000.0,
            boot_done_ms: None,
            pss_extra_kib: total.saturating_sub(guest),
            pss_total_kib: total,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    let mut s = result?;
    s.boot_done_ms = boot_done.join().unwrap_or(None);
    Ok(s)
}

fn run_qemu(cli: &Cli, cid: u32) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut child = Command::new(&cli.qemu)
        .args([
            "-M",
            "microvm,acpi=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-smp",
            "1",
        ])
        .args(["-m", &format!("{}M", cli.memory_mib)])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(&cli.kernel)
        .arg("-initrd")
        .arg(&cli.initrd)
        .args([
            "-append",
            &format!("console=ttyS0 reboot=k panic=-1 pci=off {GUEST_CMDLINE}"),
        ])
        .args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .context("spawn qemu")?;
    let deadline = start + Duration::from_secs(cli.deadline);
    let rx = watch_lines(&mut child);
    let result = (|| -> anyhow::Result<Sample> {
        let ready = wait_ready(&rx, deadline)?;
        retry(deadline, || {
            let s = vsock::connect(cid, 1024)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            echo_once(s)
        })?;
        let reply = Instant::now();
        let (total, guest) = pss(child.id())?;
        Ok(Sample {
            ready_ms: (ready - start).as_secs_f64() * 1000.0,
            vsock_reply_ms: (reply - start).as_secs_f64() * 1000.0,
            boot_done_ms: None,
            pss_extra_kib: total.saturating_sub(guest),
            pss_total_kib: total,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// (name, unit, extractor) of one table row.
type Metric = (&'static str, &'static str, fn(&Sample) -> f64);

/// Nearest-rank percentile.
fn pct(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let vmm = match &cli.vmm {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("carapace-vmm"),
    };
    let dir = tempfile::tempdir()?;
    let (mut ours, mut qemu) = (Vec::new(), Vec::new());
    for run in 0..cli.runs {
        // Alternate which VMM goes first so warm caches do not favour one.
        let order = if run % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_ours in order {
            if is_ours {
                let s = run_ours(&cli, &vmm, dir.path()).context("carapace-vmm run")?;
                eprintln!("run {run} carapace-vmm {s:?}");
                ours.push(s);
            } else {
                let s = run_qemu(&cli, 100 + run as u32).context("qemu run")?;
                eprintln!("run {run} qemu-microvm {s:?}");
                qemu.push(s);
            }
        }
    }
    let col = |v: &[Sample], f: fn(&Sample) -> f64| v.iter().map(f).collect::<Vec<f64>>();
    let metrics: [Metric; 3] = [
        ("start -> guest ready line", "ms", |s| s.ready_ms),
        ("start -> first vsock reply", "ms", |s| s.vsock_reply_ms),
        ("VMM PSS beyond guest RAM", "KiB", |s| {
            s.pss_extra_kib as f64
        }),
    ];
    println!(
        "{:<30} {:>5} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "metric", "unit", "ours p50", "ours p95", "qemu p50", "qemu p95", "p50 ratio"
    );
    let mut rows = Vec::new();
    for (name, unit, f) in metrics {
        let (o, q) = (col(&ours, f), col(&qemu, f));
        let (o50, o95, q50, q95) = (pct(&o, 50.0), pct(&o, 95.0), pct(&q, 50.0), pct(&q, 95.0));
        println!(
            "{name:<30} {unit:>5} {o50:>12.1} {o95:>12.1} {q50:>12.1} {q95:>12.1} {:>8.2}",
            o50 / q50
        );
        rows.push(serde_json::json!({
            "metric": name, "unit": unit,
            "ours": {"p50": o50, "p95": o95, "samples": o},
            "qemu_microvm": {"p50": q50, "p95": q95, "samples": q},
            "ratio_p50": o50 / q50,
        }));
    }
    let bd: Vec<f64> = ours.iter().filter_map(|s| s.boot_done_ms).collect();
    println!(
        "carapace-vmm boot-done marker (VMM's own clock): p50 {:.1} ms, p95 {:.1} ms",
        pct(&bd, 50.0),
        pct(&bd, 95.0)
    );
    let report = serde_json::json!({
        "runs": cli.runs,
        "memory_mib": cli.memory_mib,
        "kernel": cli.kernel,
        "initrd": cli.initrd,
        "rows": rows,
        "boot_done_ms": {"p50": pct(&bd, 50.0), "p95": pct(&bd, 95.0), "samples": bd},
        "targets": {"boot_ratio": "<= 0.7", "pss_extra": "<= 5 MiB"},
    });
    std::fs::create_dir_all(&cli.out)?;
    let path = cli.out.join("vmm-bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
