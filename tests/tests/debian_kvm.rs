//! A real distribution image through the whole stack: a Debian (debootstrap minbase) OCI
//! image, built locally and imported with `ctr image import`, runs under
//! `io.containerd.carapace.v2` in a microVM; `ctr task exec` works with and without a
//! terminal. The Debian root is built on the host once (cached by content, see
//! `fixtures::debian_rootfs_tar`); where this host cannot boot guests the containers run
//! inside the lab.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use carapace_tests::containerd::{
    CARAPACE_RUNTIME as RUNTIME, carapace_config, sandbox_logs, with_carapace,
};
use carapace_tests::fixtures::{debian_rootfs_tar, oci_image_archive_from_layer};
use carapace_tests::lab::{Lab, in_kvm};
use carapace_tests::terminal::run_in_a_terminal;
use carapace_tests::workspace_bin;

const GUEST_DIR: &str = "/var/lib/carapace/guest";
const DEBIAN_IMAGE: &str = "docker.io/carapace/debian:bookworm";

#[test]
fn a_debian_image_runs_in_a_microvm_and_execs_with_and_without_a_tty() {
    assert!(
        carapace_tests::is_root(),
        "needs root (debootstrap, containerd, mounts)"
    );
    // built here on the host (network, native speed); inside the lab this is a cache hit
    let layer_tar = debian_rootfs_tar().expect("Debian root fixture");
    in_kvm(
        module_path!(),
        "a_debian_image_runs_in_a_microvm_and_execs_with_and_without_a_tty",
        Lab::new().mem_mib(4096).timeout(Duration::from_secs(1500)),
        || body(&layer_tar),
    );
}

fn body(layer_tar: &Path) {
    assert!(
        Path::new(GUEST_DIR).join("vmlinux").is_file(),
        "guest image missing: make image"
    );
    let tmp = tempfile::Builder::new()
        .prefix("cdeb-")
        .tempdir()
        .expect("tempdir");
    let shim = workspace_bin("containerd-shim-carapace-v2");
    let bins = shim.parent().expect("bin dir");
    let (config, state) = carapace_config(tmp.path(), bins, true).expect("config");
    let ctrd = with_carapace(tmp.path(), bins, &[("CARAPACE_CONFIG", config.as_path())])
        .expect("containerd with Carapace");
    let layer = std::fs::read(layer_tar).expect("read the Debian layer");
    let archive = tmp.path().join("debian.tar");
    oci_image_archive_from_layer(
        &layer,
        DEBIAN_IMAGE,
        &["bash"],
        &tmp.path().join("debian-image"),
        &archive,
    )
    .expect("Debian OCI image");
    drop(layer);
    ctrd.import(&archive).expect("import the Debian image");
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        let logs = sandbox_logs(&state);
        panic!("{what}: {e}\n{logs}\ncontainerd log:\n{}", ctrd.log());
    };
    let ctr = |args: &[&str]| -> String {
        ctrd.ctr(args)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| fail(&format!("ctr {}", args.join(" ")), &e))
    };

    // Debian's userland on the guest kernel
    let host_release = String::from_utf8_lossy(
        &Command::new("uname")
            .arg("-r")
            .output()
            .expect("uname")
            .stdout,
    )
    .trim()
    .to_owned();
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        DEBIAN_IMAGE,
        "deb1",
        "bash",
        "-c",
        "cat /etc/debian_version; dpkg-query -W -f='${Package}\\n' | wc -l; uname -r",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("12."), "Debian 12 expected: {out}");
    let packages: usize = lines[1].trim().parse().expect("package count");
    assert!(packages > 50, "dpkg sees the minbase packages: {out}");
    assert_ne!(lines[2], host_release, "runs on the guest kernel: {out}");

    // exec into a running container, without and with a terminal
    ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        DEBIAN_IMAGE,
        "deb2",
        "sleep",
        "600",
    ]);
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "plain",
        "deb2",
        "bash",
        "-c",
        "tty || true",
    ]);
    assert_eq!(out.trim(), "not a tty", "{out}");
    // ctr -t needs a terminal of its own
    let mut exec = ctrd.ctr_command();
    exec.args([
        "task",
        "exec",
        "-t",
        "--exec-id",
        "tty",
        "deb2",
        "bash",
        "-c",
        "[ -t 0 ] && [ -t 1 ] && echo has-a-tty; t=$(tty) && [ -c \"$t\" ] && echo \"tty=$t\"; stty size",
    ]);
    let out = run_in_a_terminal(&exec).expect("ctr task exec -t on a terminal");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "ctr task exec -t: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("has-a-tty"),
        "stdin and stdout are a terminal in the guest: {text:?}"
    );
    // ... from the container's own devpts: `tty` names a device that exists in it
    assert!(
        text.lines().any(|l| l.starts_with("tty=/dev/pts/")),
        "the exec's terminal is a /dev/pts device of the container: {text:?}"
    );

    ctr(&["task", "kill", "-s", "SIGKILL", "deb2"]);
    let mut stopped = false;
    for _ in 0..300 {
        if ctr(&["task", "ls"]).contains("STOPPED") {
            stopped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(stopped, "the killed task never showed as STOPPED");
    ctr(&["task", "delete", "deb2"]);
    ctr(&["container", "delete", "deb2"]);
    let left: Vec<_> = std::fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "sandbox state left: {left:?}");
}
