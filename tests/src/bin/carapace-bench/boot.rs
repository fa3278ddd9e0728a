//! The boot phase: carapace-vmm vs QEMU microvm through carapace-vmm-bench.

use super::*;

pub(super) fn boot(
    bins: &Path,
    kernel: &Path,
    initrd: &Path,
    runs: usize,
    report: &mut Report,
) -> Result<()> {
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
