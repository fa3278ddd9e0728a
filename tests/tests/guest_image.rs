//! The guest image boots: it is built on the host through the content cache
//! (`carapace-image`'s library; a warm cache makes this a few hash checks), then booted
//! where KVM can boot guests (the lab on hosts without hardware virtualization) with
//! QEMU `-M microvm` as the reference VMM, and the agent's first console line must appear.
//!
//! The boot comparison with Debian's cloud kernel (numbers in guest-image/README.md) is
//! the ignored test `boot_time_vs_debian_cloud_kernel`:
//! `cargo test -p carapace-tests --test guest_image -- --ignored --nocapture`.

use carapace_image::image::{self, BuildOptions, BuildReport};
use carapace_tests::lab::Lab;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The first line the agent prints on its console.
const READY: &str = "carapace-agent: ready";

/// Boots kernels with QEMU microvm and times the agent's ready line.
/// Usage: bash -c SCRIPT bash INITRD DEADLINE_S RUNS LABEL KERNEL [LABEL KERNEL...]
/// For each run and each kernel prints the console as `SERIAL <label>: <line>`, QEMU's
/// stderr as `QEMU <label>: <line>`, then `RESULT <label> <run> <ms>` (milliseconds from
/// starting QEMU to the ready line) or `RESULT <label> <run> FAIL <why>`.
const BOOT_SCRIPT: &str = r#"
set -u
initrd=$1 deadline=$2 runs=$3; shift 3
boot() { # label kernel run
  local label=$1 kernel=$2 run=$3 dir serial start end left line t qemu why=""
  dir=$(mktemp -d /tmp/boot.XXXXXX); serial=$dir/serial; mkfifo "$serial"
  start=$EPOCHREALTIME
  qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 256 -smp 1 \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 panic=-1 quiet" \
    >"$serial" 2>"$dir/err" </dev/null &
  qemu=$!
  end=$(( ${start%.*} + deadline ))
  while :; do
    left=$(( end - ${EPOCHREALTIME%.*} ))
    (( left > 0 )) || { why="no ready line within ${deadline}s"; break; }
    IFS= read -r -t "$left" line || { why="console closed (qemu exited) or timed out before the ready line"; break; }
    line=${line%$'\r'}
    printf 'SERIAL %s: %s\n' "$label" "$line"
    if [[ $line == *"carapace-agent: ready"* ]]; then
      t=$EPOCHREALTIME
      echo "RESULT $label $run $(( (${t/./} - ${start/./}) / 1000 ))"
      break
    fi
  done <"$serial"
  kill "$qemu" 2>/dev/null; wait "$qemu" 2>/dev/null
  sed "s/^/QEMU $label: /" "$dir/err"; rm -rf "$dir"
  [[ -z $why ]] || { echo "RESULT $label $run FAIL $why"; return 1; }
}
rc=0
args=("$@")
for run in $(seq 1 "$runs"); do
  for ((i = 0; i < ${#args[@]}; i += 2)); do
    boot "${args[i]}" "${args[i+1]}" "$run" || rc=1
  done
done
exit $rc
"#;

/// One boot's outcome parsed from the script's output.
#[derive(Debug, Clone, PartialEq)]
struct Boot {
    label: String,
    ms: Option<u64>,
}

fn parse_results(stdout: &str) -> Vec<Boot> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .filter_map(|r| {
            let mut w = r.split_whitespace();
            let label = w.next()?.to_owned();
            let _run = w.next()?;
            Some(Boot {
                label,
                ms: w.next()?.parse().ok(),
            })
        })
        .collect()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Builds (or takes from the cache) the image, installed under the target dir so the lab
/// (which shares the host's / but has its own /tmp) can read it. A prebuilt agent can be
/// given with CARAPACE_TEST_AGENT; by default the workspace's carapace-agent is built.
fn build_image() -> BuildReport {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-image");
    let opts = BuildOptions {
        out_dir,
        cache_dir: image::DEFAULT_CACHE_DIR.into(),
        agent: std::env::var_os("CARAPACE_TEST_AGENT").map(PathBuf::from),
        workspace: Some(workspace_root()),
        source_package: image::DEFAULT_SOURCE_PACKAGE.into(),
        fragment: None,
        jobs: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        force: false,
    };
    let report = image::build(&opts).unwrap_or_else(|e| {
        panic!(
            "building the guest image failed: {}",
            carapace_errors::chain(&e)
        )
    });
    // The installed files must pass the same validation `carapace-image check` does.
    image::check_kernel(&report.kernel).expect("installed kernel passes check");
    image::check_initramfs(&report.initramfs).expect("installed initramfs passes check");
    report
}

fn boot(initrd: &Path, runs: u32, kernels: &[(&str, &Path)]) -> (Vec<Boot>, String) {
    // Generous: the lab is emulated and shared; a boot normally takes seconds.
    let deadline = 300u32;
    let mut argv: Vec<String> = vec![
        "bash".into(),
        "-c".into(),
        BOOT_SCRIPT.into(),
        "bash".into(),
        initrd.display().to_string(),
        deadline.to_string(),
        runs.to_string(),
    ];
    for (label, k) in kernels {
        argv.push((*label).into());
        argv.push(k.display().to_string());
    }
    let lab = Lab::new().mem_mib(2048).timeout(Duration::from_secs(
        600 + u64::from(deadline) * u64::from(runs) * kernels.len() as u64,
    ));
    let out = lab
        .run(&argv)
        .expect("running QEMU where KVM can boot guests");
    let all = format!("{}\n{}", out.stdout, out.stderr);
    (parse_results(&out.stdout), all)
}

#[test]
fn image_boots_to_agent_ready_line_in_qemu_microvm() {
    let img = build_image();
    let (results, output) = boot(&img.initramfs, 1, &[("carapace", &img.kernel)]);
    println!("{output}");
    assert_eq!(results.len(), 1, "expected one boot result:\n{output}");
    assert!(
        results[0].ms.is_some(),
        "the guest did not print `{READY}` on its console:\n{output}"
    );
    assert!(
        output
            .lines()
            .any(|l| l.starts_with("SERIAL carapace: ") && l.contains(READY))
    );
}

/// Extracts Debian's linux-image-cloud-amd64 kernel (vmlinuz) into the image cache.
fn debian_cloud_kernel() -> PathBuf {
    let dir = Path::new(image::DEFAULT_CACHE_DIR).join("reference");
    let vmlinuz = dir.join("vmlinuz-cloud");
    if vmlinuz.is_file() {
        return vmlinuz;
    }
    std::fs::create_dir_all(&dir).expect("creating the reference kernel dir");
    let script = r#"set -euo pipefail
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
[[ -n $pkg ]] || { echo "no linux-image-cloud-amd64 dependency found (apt-get update?)" >&2; exit 1; }
rm -rf x ./*.deb; apt-get download "$pkg"; dpkg-deb -x ./"$pkg"_*.deb x
cp x/boot/vmlinuz-* vmlinuz-cloud.tmp && mv vmlinuz-cloud.tmp vmlinuz-cloud
echo "$pkg" > vmlinuz-cloud.package; rm -rf x ./*.deb"#;
    let st = Command::new("bash")
        .args(["-c", script])
        .current_dir(&dir)
        .status()
        .expect("running apt-get download");
    assert!(st.success(), "fetching Debian's cloud kernel failed");
    vmlinuz
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Measurement for guest-image/README.md: time from starting QEMU to the agent's ready
/// line, our kernel vs Debian's cloud kernel, same initramfs, same lab run, alternating.
#[test]
#[ignore = "measurement (a few minutes in the lab); numbers go in guest-image/README.md"]
fn boot_time_vs_debian_cloud_kernel() {
    let img = build_image();
    let debian = debian_cloud_kernel();
    let runs = 3;
    let (results, output) = boot(
        &img.initramfs,
        runs,
        &[("carapace", &img.kernel), ("debian-cloud", &debian)],
    );
    let times = |label: &str| -> Vec<u64> {
        results
            .iter()
            .filter(|b| b.label == label)
            .filter_map(|b| b.ms)
            .collect()
    };
    let (ours, theirs) = (times("carapace"), times("debian-cloud"));
    assert_eq!(
        (ours.len(), theirs.len()),
        (runs as usize, runs as usize),
        "every boot must reach the ready line:\n{output}"
    );
    let kernel_size = std::fs::metadata(&img.kernel).map(|m| m.len()).unwrap_or(0);
    let debian_size = std::fs::metadata(&debian).map(|m| m.len()).unwrap_or(0);
    let (mo, md) = (median(ours.clone()), median(theirs.clone()));
    println!(
        "kernel sizes: carapace vmlinux {kernel_size} bytes, debian vmlinuz {debian_size} bytes"
    );
    println!(
        "initramfs: {} bytes",
        std::fs::metadata(&img.initramfs)
            .map(|m| m.len())
            .unwrap_or(0)
    );
    println!(
        "time from starting QEMU to `{READY}` (ms), {runs} runs each: carapace {ours:?}, debian-cloud {theirs:?}"
    );
    println!(
        "median: carapace {mo} ms, debian-cloud {md} ms, ratio carapace/debian = {:.2}",
        mo as f64 / md as f64
    );
}

#[test]
fn boot_script_output_is_parsed() {
    let out = "SERIAL a: x\nRESULT a 1 123\nRESULT b 1 FAIL no ready line within 9s\n";
    assert_eq!(
        parse_results(out),
        vec![
            Boot {
                label: "a".into(),
                ms: Some(123)
            },
            Boot {
                label: "b".into(),
                ms: None
            }
        ]
    );
}
