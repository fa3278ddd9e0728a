//! carapace-demo: a container in a Carapace microVM, end to end, the way a containerd user
//! runs one. Starts a private containerd with the Carapace shim registered, imports a
//! locally built busybox image, runs `ctr run --runtime io.containerd.carapace.v2`, prints
//! the container's output and the time from `ctr run` to that output. `make demo` runs it
//! (inside the lab when this host cannot boot guests).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use carapace_tests::containerd::{
    BUSYBOX_IMAGE as IMAGE, CARAPACE_RUNTIME as RUNTIME, carapace_config, with_carapace,
};
const GUEST_DIR: &str = "/var/lib/carapace/guest";

fn step(msg: &str) {
    eprintln!("demo: {msg}");
}

/// The directory holding this binary and its sibling workspace binaries.
fn bin_dir() -> Result<PathBuf> {
    carapace_tests::own_bin_dir().context("locating carapace-demo")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let bins = bin_dir()?;
    for b in [
        "containerd-shim-carapace-v2",
        "carapace-vmm",
        "carapace-fsd",
    ] {
        if !bins.join(b).is_file() {
            bail!(
                "{} is not built (cargo build --workspace --bins)",
                bins.join(b).display()
            );
        }
    }
    for f in ["vmlinux", "initramfs.cpio.gz"] {
        let p = Path::new(GUEST_DIR).join(f);
        if !p.is_file() {
            bail!("guest image {} missing (make image)", p.display());
        }
    }
    let work = tempfile::Builder::new()
        .prefix("carapace-demo-")
        .tempdir()
        .context("creating a work directory")?;
    let (config, state) =
        carapace_config(work.path(), &bins, true).context("writing the Carapace configuration")?;

    step(
        "starting a private containerd with the Carapace runtime registered, importing a busybox image built locally",
    );
    let ctrd = with_carapace(work.path(), &bins, &[("CARAPACE_CONFIG", config.as_path())])?;

    step(&format!(
        "ctr run --rm --runtime {RUNTIME} {IMAGE} demo ..."
    ));
    let script = "echo \"Hello from a container in a Carapace microVM\"; \
                  echo \"kernel: $(uname -sr) (host: $HOST_KERNEL)\"; \
                  echo \"cpus: $(nproc), memory: $(free -m | awk '/Mem:/{print $2}') MiB\"";
    let host_kernel = String::from_utf8_lossy(
        &Command::new("uname")
            .arg("-r")
            .output()
            .context("uname")?
            .stdout,
    )
    .trim()
    .to_owned();
    let start = Instant::now();
    let mut child = ctrd
        .ctr_command()
        .args(["run", "--rm", "--runtime", RUNTIME])
        .args([
            "--env",
            &format!("HOST_KERNEL={host_kernel}"),
            IMAGE,
            "demo",
        ])
        .args(["sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ctr")?;
    let stdout = child.stdout.take().context("ctr stdout")?;
    let mut first = None;
    let mut output = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the container's output")?;
        first.get_or_insert_with(|| start.elapsed());
        println!("{line}");
        output.push(line);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().context("waiting for ctr")?;
    if !status.success() || output.is_empty() {
        eprintln!("demo: ctr said: {}", err.trim());
        eprintln!(
            "demo: containerd log (tail):\n{}",
            tail(&ctrd.socket().with_file_name("containerd.log"), 15)
        );
        for entry in std::fs::read_dir(&state).into_iter().flatten().flatten() {
            for log in ["vmm.log", "console.log", "fsd.log"] {
                let p = entry.path().join(log);
                if p.exists() {
                    eprintln!("demo: {} (tail):\n{}", p.display(), tail(&p, 15));
                }
            }
        }
        bail!("the container did not run ({status})");
    }
    if std::env::var_os("CARAPACE_DEMO_TIMELINE").is_some() {
        // Where the start-up time goes: containerd's log, where the shim's and the
        // runtime's lines carry their timestamps (the sandbox's own logs went with --rm).
        eprintln!(
            "demo: containerd log (tail):\n{}",
            tail(&ctrd.socket().with_file_name("containerd.log"), 60)
        );
    }
    if let Some(t) = first {
        println!(
            "demo: {} ms from `ctr run` to the container's first output (inside the lab this is \
             TCG-emulated: compare ratios, not absolute times)",
            t.as_millis()
        );
    }
    Ok(())
}
