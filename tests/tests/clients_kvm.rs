//! Real clients driving the runc-compatible `carapace` CLI in the lab: Debian's podman 4.3
//! with `--runtime` (conmon starting `carapace create/start/kill/delete/exec` as it starts
//! runc): run --rm, exit statuses, -it with a terminal, run -d with exec, logs,
//! pause/unpause, stop, rm. After it: no VMM left and no sandbox state.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use carapace_tests::containerd::{carapace_config, sandbox_logs};
use carapace_tests::terminal::run_in_a_terminal;
use carapace_tests::{fixtures, kvm_test, workspace_bin};

const IMAGE: &str = "localhost/carapace/busybox:latest";

/// One podman with all its state under a temporary directory and Carapace as its runtime.
struct Podman {
    dir: PathBuf,
    carapace: PathBuf,
    config: PathBuf,
    state: PathBuf,
}

impl Podman {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["-k", "5", "300", "podman"])
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "overlay"])
            .args(["--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"])
            .arg("--runtime")
            .arg(&self.carapace)
            // podman passes no environment through to the runtime: the configuration
            // reaches it as a global flag of every runtime command
            .arg(format!("--runtime-flag=config={}", self.config.display()))
            .args(args);
        c
    }

    /// `args` with a terminal as podman's stdin, stdout, stderr and controlling terminal,
    /// as `podman run -it` from a shell.
    fn run_in_a_terminal(&self, args: &[&str]) -> Output {
        run_in_a_terminal(&self.command(args)).expect("run podman on a terminal")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run podman")
    }

    /// `args` must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        if !out.status.success() {
            self.fail(&format!("podman {}", args.join(" ")), &out);
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fail(&self, what: &str, out: &Output) -> ! {
        panic!(
            "{what}: {}\nstdout: {}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            sandbox_logs(&self.state)
        );
    }
}

/// carapace-vmm processes running now.
fn vmms() -> usize {
    let out = Command::new("pgrep")
        .args(["-c", "-x", "carapace-vmm"])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn host_kernel() -> String {
    let u = nix::sys::utsname::uname().expect("uname");
    u.release().to_string_lossy().into_owned()
}

/// Sandboxes left in the runtime's state directory (one subdirectory each).
fn left(state: &Path) -> Vec<String> {
    fs::read_dir(state)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().mem_mib(4096).timeout(Duration::from_secs(1500)))]
    fn podman_runs_execs_stops_and_removes_containers_in_vms() {
        assert!(
            Command::new("podman").arg("--version").output().is_ok(),
            "podman is missing (Debian package podman; make setup installs it)"
        );
        let tmp = tempfile::Builder::new().prefix("cpodman-").tempdir().expect("tempdir");
        let carapace = workspace_bin("carapace");
        let bins = carapace.parent().expect("bin dir");
        // The state stays in the default directory: podman 4.3 passes its --runtime-flag
        // options to create, start, exec, kill and state but not to `delete --force`, so a
        // state directory named only in the configuration would hide the container from
        // that delete and leak its VM. (Inside the lab /run is the lab machine's tmpfs.)
        let (config, _) = carapace_config(tmp.path(), bins, true).expect("config");
        let text = fs::read_to_string(&config).expect("config");
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with("state_dir"))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(&config, text).expect("config");
        let state = PathBuf::from("/run/carapace");
        let podman = Podman {
            dir: tmp.path().join("podman"),
            carapace: carapace.clone(),
            config,
            state,
        };
        let rootfs = tmp.path().join("rootfs");
        fixtures::busybox_rootfs(&rootfs).expect("busybox rootfs");
        let archive = tmp.path().join("busybox.tar");
        fixtures::oci_image_archive(&rootfs, IMAGE, &["sh"], tmp.path(), &archive)
            .expect("image archive");
        podman.ok(&["load", "-i", archive.to_str().unwrap()]);
        let vmms_before = vmms();

        // run --rm: the output, the guest's kernel, and podman returns
        let out = podman.ok(&[
            "run", "--rm", "--network", "none", IMAGE, "sh", "-c", "uname -r; echo hello",
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out:?}");
        assert_ne!(lines[0], host_kernel(), "the container runs on the guest's kernel");
        assert_eq!(lines[1], "hello");

        // the container's exit status is podman's
        let out = podman.run(&["run", "--rm", "--network", "none", IMAGE, "sh", "-c", "exit 3"]);
        assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));

        // -it: the container's process has a terminal
        let out = podman.run_in_a_terminal(&[
            "run", "-it", "--rm", "--network", "none", IMAGE, "sh", "-c",
            "tty; echo tty-ok; exit 4",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        assert!(
            text.lines().any(|l| l.contains("/dev/pts/")) && text.contains("tty-ok"),
            "podman run -it ({}): {text:?}\n{}",
            out.status,
            sandbox_logs(&podman.state)
        );
        assert_eq!(out.status.code(), Some(4), "{text:?}");

        // detached: exec, logs, stop, rm
        let id = podman.ok(&[
            "run", "-d", "--name", "t1", "--network", "none", IMAGE, "sh", "-c",
            "echo started; exec sleep 1000",
        ]);
        assert!(!id.trim().is_empty());
        assert_eq!(podman.ok(&["exec", "t1", "echo", "hi"]).trim(), "hi");
        let out = podman.run(&["exec", "t1", "sh", "-c", "exit 7"]);
        assert_eq!(out.status.code(), Some(7));
        assert!(podman.ok(&["logs", "t1"]).contains("started"));
        podman.ok(&["pause", "t1"]);
        assert_eq!(podman.ok(&["inspect", "-f", "{{.State.Status}}", "t1"]).trim(), "paused");
        podman.ok(&["unpause", "t1"]);
        podman.ok(&["stop", "-t", "2", "t1"]);
        let status = podman.ok(&["inspect", "-f", "{{.State.Status}}", "t1"]);
        assert_eq!(status.trim(), "exited", "after stop");
        podman.ok(&["rm", "t1"]);

        // nothing left: no VMM, no sandbox state (podman's cleanup of a container runs in
        // the background once conmon saw it exit: a few seconds)
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while (vmms() > vmms_before || !left(&podman.state).is_empty())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        let ps = Command::new("ps")
            .args(["-eo", "pid,ppid,etimes,args"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let carapace_ps: Vec<&str> = ps
            .lines()
            .filter(|l| l.contains("carapace") || l.contains("conmon"))
            .collect();
        assert_eq!(
            (vmms(), left(&podman.state)),
            (vmms_before, Vec::<String>::new()),
            "a VMM or sandbox state outlived its container:\n{}\npodman ps -a:\n{}\n{}",
            carapace_ps.join("\n"),
            podman.ok(&["ps", "-a"]),
            sandbox_logs(&podman.state)
        );
        let _ = podman.run(&["rmi", "-a", "-f"]);
    }
}
