//! Real clients driving the runc-compatible `carapace` CLI in the lab: Debian's podman 4.3
//! with `--runtime` (conmon starting `carapace create/start/kill/delete/exec` as it starts
//! runc), and Debian's docker 20.10 with the runtime added to a `dockerd` of the test's own
//! (containerd's runc shim starting the CLI, with docker's `--root` and 64-character ids):
//! run --rm, exit statuses, -it with a terminal, run -d with exec, logs, pause/unpause,
//! stop, rm. After each: no VMM left and no sandbox state.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// Waits up to a minute for the VMMs started since `vmms_before` and every sandbox state
/// under `state` to be gone, then asserts it, showing the client's own view
/// (`client_ps`), our processes and the sandboxes' logs if not.
fn assert_nothing_left(state: &Path, vmms_before: usize, client_ps: impl FnOnce() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while (vmms() > vmms_before || !left(state).is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    let ps = Command::new("ps")
        .args(["-eo", "pid,ppid,etimes,args"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let ours: Vec<&str> = ps
        .lines()
        .filter(|l| l.contains("carapace") || l.contains("conmon") || l.contains("shim"))
        .collect();
    assert_eq!(
        (vmms(), left(state)),
        (vmms_before, Vec::<String>::new()),
        "a VMM or sandbox state outlived its container:\n{}\nthe client's containers:\n{}\n{}",
        ours.join("\n"),
        client_ps(),
        sandbox_logs(state)
    );
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
        assert_nothing_left(&podman.state, vmms_before, || podman.ok(&["ps", "-a"]));
        let _ = podman.run(&["rmi", "-a", "-f"]);
    }
}

/// Debian's docker CLI (docker.io); not a newer one earlier in PATH.
const DOCKER: &str = "/usr/bin/docker";
const DOCKER_IMAGE: &str = "carapace/busybox:latest";

/// A `dockerd` of the test's own: data, exec root and socket under a temporary directory,
/// no bridge or iptables (containers run with `--network none`), cgroupfs, and Carapace
/// added as the runtime `carapace`. Stopped (and its mounts removed) on drop.
struct Docker {
    dir: PathBuf,
    daemon: Child,
}

impl Docker {
    fn start(dir: &Path, carapace: &Path, config: &Path) -> Docker {
        fs::create_dir_all(dir).expect("docker dir");
        // runtimeArgs: dockerd writes a wrapper script passing them before the runc-style
        // arguments (global flags: the configuration file)
        let daemon_json = serde_json::json!({
            "runtimes": {"carapace": {
                "path": carapace,
                "runtimeArgs": [format!("--config={}", config.display())],
            }}
        });
        let daemon_config = dir.join("daemon.json");
        fs::write(&daemon_config, daemon_json.to_string()).expect("daemon.json");
        let log = fs::File::create(dir.join("dockerd.log")).expect("dockerd.log");
        let daemon = Command::new("dockerd")
            .arg("--config-file")
            .arg(&daemon_config)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .args(["--ip-masq=false", "--userland-proxy=false"])
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("dockerd (Debian package docker.io; make setup installs it)");
        let docker = Docker {
            dir: dir.to_path_buf(),
            daemon,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !docker.run(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 120 s:\n{}",
                docker.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        docker
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["-k", "5", "300", DOCKER])
            .arg("--host")
            .arg(format!("unix://{}", self.dir.join("docker.sock").display()))
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run docker")
    }

    /// `args` must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker {}: {}\nstdout: {}\nstderr: {}\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log(),
            sandbox_logs(&self.state())
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The state directory of docker's runc-style runtimes: its `--root` for Carapace.
    fn state(&self) -> PathBuf {
        self.dir.join("exec/runtime-runc/moby")
    }

    /// The end of dockerd's log.
    fn log(&self) -> String {
        let text = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- dockerd.log\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops its containers' tasks and its containerd, unmounts
        let pid = nix::unistd::Pid::from_raw(self.daemon.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(self.daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // whatever a killed daemon left mounted under its directory, deepest first
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().mem_mib(4096).timeout(Duration::from_secs(1500)))]
    fn docker_runs_execs_stops_and_removes_containers_in_vms() {
        assert!(
            Path::new(DOCKER).exists() && Command::new("dockerd").arg("--version").output().is_ok(),
            "docker is missing (Debian package docker.io; make setup installs it)"
        );
        let tmp = tempfile::Builder::new().prefix("cdocker-").tempdir().expect("tempdir");
        let carapace = workspace_bin("carapace");
        let bins = carapace.parent().expect("bin dir");
        let (config, _) = carapace_config(tmp.path(), bins, true).expect("config");
        let docker = Docker::start(&tmp.path().join("docker"), &carapace, &config);
        let rootfs = tmp.path().join("rootfs");
        fixtures::busybox_rootfs(&rootfs).expect("busybox rootfs");
        let layer = tmp.path().join("busybox.tar");
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg(".")
            .status()
            .expect("tar");
        assert!(tar.success());
        docker.ok(&["import", "--change", "CMD [\"sh\"]", layer.to_str().unwrap(), DOCKER_IMAGE]);
        let vmms_before = vmms();
        let run = ["run", "--runtime", "carapace", "--network", "none"];
        let with = |args: &[&'static str]| -> Vec<&'static str> {
            run.iter().chain(args).copied().collect()
        };

        // run --rm: the output, the guest's kernel, and docker returns
        let out = docker.ok(&with(&["--rm", DOCKER_IMAGE, "sh", "-c", "uname -r; echo hello"]));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out:?}");
        assert_ne!(lines[0], host_kernel(), "the container runs on the guest's kernel");
        assert_eq!(lines[1], "hello");

        // the container's exit status is docker's
        let out = docker.run(&with(&["--rm", DOCKER_IMAGE, "sh", "-c", "exit 3"]));
        assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));

        // -it: the container's process has a terminal
        let out = run_in_a_terminal(&docker.command(&with(&[
            "-it", "--rm", DOCKER_IMAGE, "sh", "-c", "tty; echo tty-ok; exit 4",
        ])))
        .expect("docker run -it on a terminal");
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        assert!(
            text.lines().any(|l| l.contains("/dev/pts/")) && text.contains("tty-ok"),
            "docker run -it ({}): {text:?}\n{}",
            out.status,
            docker.log()
        );
        assert_eq!(out.status.code(), Some(4), "{text:?}");

        // detached: exec, logs, pause, stop, rm
        let id = docker.ok(&with(&[
            "-d", "--name", "t1", DOCKER_IMAGE, "sh", "-c", "echo started; exec sleep 1000",
        ]));
        assert_eq!(id.trim().len(), 64, "docker's ids are 64 characters: {id:?}");
        assert_eq!(docker.ok(&["exec", "t1", "echo", "hi"]).trim(), "hi");
        let out = docker.run(&["exec", "t1", "sh", "-c", "exit 7"]);
        assert_eq!(out.status.code(), Some(7));
        assert!(docker.ok(&["logs", "t1"]).contains("started"));
        docker.ok(&["pause", "t1"]);
        assert_eq!(docker.ok(&["inspect", "-f", "{{.State.Status}}", "t1"]).trim(), "paused");
        docker.ok(&["unpause", "t1"]);
        docker.ok(&["stop", "-t", "2", "t1"]);
        let status = docker.ok(&["inspect", "-f", "{{.State.Status}}", "t1"]);
        assert_eq!(status.trim(), "exited", "after stop");
        docker.ok(&["rm", "t1"]);

        assert_nothing_left(&docker.state(), vmms_before, || docker.ok(&["ps", "-a"]));
    }
}
