//! A private containerd for tests and benchmarks: its own root, state, socket and config,
//! started on demand and stopped (with everything it mounted) when dropped.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Errors from the private containerd.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// containerd or ctr is not installed.
    #[error("{0} not found: install the Debian package containerd (make setup)")]
    Missing(&'static str),
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// containerd did not come up.
    #[error("containerd did not answer on {socket} within {secs} s; its log:\n{log}")]
    NotReady {
        /// Its socket.
        socket: PathBuf,
        /// How long we waited.
        secs: u64,
        /// The tail of its log.
        log: String,
    },
    /// Building the test image failed.
    #[error("cannot build the test image")]
    Fixture(#[from] crate::fixtures::FixtureError),
    /// A `ctr` command failed.
    #[error("ctr {args} failed (status {status:?}):\n{stderr}")]
    Ctr {
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: Option<i32>,
        /// Its stderr.
        stderr: String,
    },
}

/// An extra runtime to register in containerd's CRI plugin, e.g. Carapace's shim.
#[derive(Debug, Clone, Default)]
pub struct RuntimeEntry {
    /// CRI handler name, e.g. `carapace`.
    pub handler: String,
    /// Runtime type, e.g. `io.containerd.carapace.v2`.
    pub runtime_type: String,
    /// The handler's `ConfigPath` runtime option: the Carapace configuration its VMs are
    /// built from (one RuntimeClass per VM shape).
    pub config_path: Option<PathBuf>,
    /// The runc shim's `BinaryName` option: a runc-compatible binary (gVisor's `runsc`).
    pub binary_name: Option<PathBuf>,
}

/// A running private containerd. Dropping it stops containerd, kills what it started and
/// unmounts and removes its directories.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    child: Option<Child>,
    /// What it was started with, to start it again ([`Self::start_daemon`]).
    env: Vec<(String, PathBuf)>,
    path: Option<String>,
    /// `--log-level` for the next start (containerd's default when None).
    pub log_level: Option<&'static str>,
}

impl Containerd {
    /// Starts containerd with all its state under `dir` (created; should be on a local
    /// filesystem that supports overlayfs, e.g. a tmpfs). `runtimes` are registered for CRI
    /// next to the default runc. `path_prepend` is put in front of containerd's `PATH`, so
    /// it finds shim binaries there; `env` is added to its environment (shims inherit it).
    pub fn start(
        dir: &Path,
        runtimes: &[RuntimeEntry],
        path_prepend: Option<&Path>,
        env: &[(&str, &Path)],
    ) -> Result<Self, ContainerdError> {
        fs::create_dir_all(dir).map_err(|source| ContainerdError::Io {
            what: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
        let config = dir.join("config.toml");
        fs::write(&config, config_toml(dir, runtimes)).map_err(|source| ContainerdError::Io {
            what: "cannot write",
            path: config.clone(),
            source,
        })?;
        Self::start_configured(dir, path_prepend, env)
    }

    /// [`Containerd::start`] with the configuration already in `dir/config.toml` (e.g.
    /// [`node_config`] with a drop-in imported, as `make install` leaves a node).
    pub fn start_configured(
        dir: &Path,
        path_prepend: Option<&Path>,
        env: &[(&str, &Path)],
    ) -> Result<Self, ContainerdError> {
        for tool in ["containerd", "ctr"] {
            if which(tool).is_none() {
                return Err(ContainerdError::Missing(if tool == "ctr" {
                    "ctr"
                } else {
                    "containerd"
                }));
            }
        }
        let cni_conf = dir.join("cni/conf");
        let conflist = cni_conf.join(CNI_CONFLIST);
        fs::create_dir_all(&cni_conf)
            .and_then(|()| fs::write(&conflist, cni_conflist()))
            .map_err(|source| ContainerdError::Io {
                what: "cannot write",
                path: conflist.clone(),
                source,
            })?;
        let mut me = Self {
            dir: dir.to_path_buf(),
            child: None,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.to_path_buf()))
                .collect(),
            log_level: None,
            path: path_prepend.map(|p| {
                let path = std::env::var("PATH").unwrap_or_default();
                format!("{}:{path}", p.display())
            }),
        };
        fs::File::create(me.dir.join("containerd.log")).map_err(|source| ContainerdError::Io {
            what: "cannot create",
            path: me.dir.join("containerd.log"),
            source,
        })?;
        me.start_daemon()?;
        Ok(me)
    }

    /// Starts the daemon (again) with its configuration, its log appended to; waits until
    /// it answers.
    pub fn start_daemon(&mut self) -> Result<(), ContainerdError> {
        let config = self.dir.join("config.toml");
        let log_path = self.dir.join("containerd.log");
        let log = fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .map_err(|source| ContainerdError::Io {
                what: "cannot open",
                path: log_path.clone(),
                source,
            })?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        if let Some(level) = self.log_level {
            cmd.args(["--log-level", level]);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(p) = &self.path {
            cmd.env("PATH", p);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|source| ContainerdError::Io {
                what: "cannot reopen",
                path: log_path.clone(),
                source,
            })?)
            .stderr(log)
            .spawn()
            .map_err(|source| ContainerdError::Io {
                what: "cannot start containerd with config",
                path: config.clone(),
                source,
            })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Stops the daemon only (SIGTERM, then SIGKILL after 10 s): its shims and their
    /// containers go on running, as in a containerd restart or upgrade.
    pub fn stop_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// containerd's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("containerd.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn wait_ready(&self, timeout: Duration) -> Result<(), ContainerdError> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.socket().exists()
                && self
                    .ctr_output(&["version"])
                    .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        Err(ContainerdError::NotReady {
            socket: self.socket(),
            secs: timeout.as_secs(),
            log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        })
    }

    /// A `ctr` command against this containerd (namespace `carapace-test`), to be given
    /// its subcommand and run by the caller (e.g. to stream its output).
    pub fn ctr_command(&self) -> Command {
        self.ctr_command_in(TEST_NAMESPACE)
    }

    /// A `ctr` command against this containerd in `namespace` (e.g. [`CRI_NAMESPACE`]).
    pub fn ctr_command_in(&self, namespace: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .args(["--namespace", namespace])
            .stdin(Stdio::null());
        c
    }

    /// [`Self::ctr_command`] under coreutils' `timeout secs`: a `ctr` that hangs ends with
    /// status 124 instead of stalling its caller (benchmarks).
    pub fn ctr_command_bounded(&self, secs: u64) -> Command {
        let ctr = self.ctr_command();
        let mut c = Command::new("timeout");
        c.arg(secs.to_string())
            .arg(ctr.get_program())
            .args(ctr.get_args())
            .stdin(Stdio::null());
        c
    }

    fn ctr_output(&self, args: &[&str]) -> std::io::Result<Output> {
        self.ctr_command().args(args).output()
    }

    /// Runs `ctr` against this containerd (namespace `carapace-test`); returns its output
    /// when it exits 0.
    pub fn ctr(&self, args: &[&str]) -> Result<Output, ContainerdError> {
        let out = self.ctr_output(args).map_err(|e| ContainerdError::Ctr {
            args: args.join(" "),
            status: None,
            stderr: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(ContainerdError::Ctr {
                args: args.join(" "),
                status: out.status.code(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(out)
    }

    /// Imports an OCI image archive.
    pub fn import(&self, archive: &Path) -> Result<(), ContainerdError> {
        let a = archive.to_string_lossy();
        self.ctr(&["image", "import", "--all-platforms", &a])
            .map(|_| ())
    }

    /// Imports an OCI image archive into the CRI plugin's namespace, where pods find it.
    pub fn import_for_cri(&self, archive: &Path) -> Result<(), ContainerdError> {
        let args = [
            "image",
            "import",
            "--all-platforms",
            &archive.to_string_lossy(),
        ];
        let out = self
            .ctr_command_in(CRI_NAMESPACE)
            .args(args)
            .output()
            .map_err(|e| ContainerdError::Ctr {
                args: args.join(" "),
                status: None,
                stderr: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(ContainerdError::Ctr {
                args: args.join(" "),
                status: out.status.code(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// Imports [`NET_IMAGE`] for CRI: busybox and Debian's iperf3 (with its libraries).
    pub fn import_net_image(&self, work: &Path) -> Result<(), ContainerdError> {
        let rootfs = work.join("net-image-rootfs");
        crate::fixtures::busybox_rootfs(&rootfs)?;
        crate::fixtures::add_host_program(&rootfs, Path::new(IPERF3))?;
        let dir = work.join("net-image");
        fs::create_dir_all(&dir).map_err(|source| ContainerdError::Io {
            what: "cannot create",
            path: dir.clone(),
            source,
        })?;
        let archive = dir.join("image.tar");
        crate::fixtures::oci_image_archive(&rootfs, NET_IMAGE, &["sh"], &dir, &archive)?;
        self.import_for_cri(&archive)
    }

    /// Builds the busybox and pause fixture images under `work` and imports them for CRI
    /// as [`BUSYBOX_IMAGE`] and [`PAUSE_IMAGE`] (the `sandbox_image` of the config).
    pub fn import_cri_images(&self, work: &Path) -> Result<(), ContainerdError> {
        let rootfs = work.join("cri-image-rootfs");
        crate::fixtures::busybox_rootfs(&rootfs)?;
        for (name, cmd) in [
            (BUSYBOX_IMAGE, &["sh"][..]),
            // A pod's pause container: sleeps until asked to stop, and does stop on
            // SIGTERM although it is its namespace's init.
            (PAUSE_IMAGE, &["sh", "-c", PAUSE_SCRIPT][..]),
        ] {
            let dir = work.join(format!(
                "cri-image-{}",
                if name == PAUSE_IMAGE {
                    "pause"
                } else {
                    "busybox"
                }
            ));
            fs::create_dir_all(&dir).map_err(|source| ContainerdError::Io {
                what: "cannot create",
                path: dir.clone(),
                source,
            })?;
            let archive = dir.join("image.tar");
            crate::fixtures::oci_image_archive(&rootfs, name, cmd, &dir, &archive)?;
            self.import_for_cri(&archive)?;
        }
        Ok(())
    }
}

/// Writes `<dir>/configuration.toml` for Carapace: the VMM and fs daemon from `bins`, state
/// under `<dir>/run`, a 300 s agent deadline (the lab emulates the CPU) and, with `console`,
/// the guest console logged to each sandbox's `console.log`. Returns (config, state dir).
pub fn carapace_config(
    dir: &Path,
    bins: &Path,
    console: bool,
) -> Result<(PathBuf, PathBuf), ContainerdError> {
    carapace_config_with(dir, bins, console, "", None)
}

/// [`carapace_config`] with `hypervisor.kernel_params` set to `kernel_params` (added to
/// the guest kernel's command line) and, with `guest`, the guest image (`vmlinux`,
/// `initramfs.cpio.gz`) from that directory instead of the installed one.
pub fn carapace_config_with(
    dir: &Path,
    bins: &Path,
    console: bool,
    kernel_params: &str,
    guest: Option<&Path>,
) -> Result<(PathBuf, PathBuf), ContainerdError> {
    let state = dir.join("run");
    let config = dir.join("configuration.toml");
    let mut text = format!(
        "[hypervisor]\npath = {:?}\n",
        bins.join("carapace-vmm").display().to_string(),
    );
    // only when asked: callers add their own [hypervisor] keys to this file
    if !kernel_params.is_empty() {
        text.push_str(&format!("kernel_params = {kernel_params:?}\n"));
    }
    if let Some(g) = guest {
        text.push_str(&format!(
            "kernel = {:?}\ninitrd = {:?}\n",
            g.join("vmlinux").display().to_string(),
            g.join("initramfs.cpio.gz").display().to_string()
        ));
    }
    // callers extend the last tables by appending keys ([agent], [debug])
    text.push_str(&format!(
        "[fs]\npath = {:?}\n[runtime]\nstate_dir = {:?}\n[agent]\nboot_timeout_ms = 300000\n",
        bins.join("carapace-fsd").display().to_string(),
        state.display().to_string()
    ));
    if console {
        text.push_str("[debug]\nconsole = true\n");
    }
    fs::write(&config, text).map_err(|source| ContainerdError::Io {
        what: "cannot write",
        path: config.clone(),
        source,
    })?;
    Ok((config, state))
}

/// The VMM, console and fs daemon logs of every sandbox under the state dir `state`, for
/// failure messages.
pub fn sandbox_logs(state: &Path) -> String {
    sandbox_log_tails(state, usize::MAX)
}

/// [`sandbox_logs`] with at most the last `lines` lines of each log.
pub fn sandbox_log_tails(state: &Path, lines: usize) -> String {
    let mut logs = String::new();
    for entry in fs::read_dir(state).into_iter().flatten().flatten() {
        for log in ["vmm.log", "console.log", "fsd.log"] {
            let text = fs::read_to_string(entry.path().join(log)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let text = all[all.len().saturating_sub(lines)..].join("\n");
            logs.push_str(&format!("--- {} {log}\n{text}\n", entry.path().display()));
        }
        if let Some(m) = vmm_metrics(&entry.path().join("api.sock")) {
            logs.push_str(&format!(
                "--- {} VMM metrics\n{m}\n",
                entry.path().display()
            ));
        }
    }
    logs
}

/// The VMM's metrics (exits, devices, interrupts raised and acknowledged) from its control
/// API socket, if it answers within a second.
pub fn vmm_metrics(api: &Path) -> Option<String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(api).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .ok()?;
    s.write_all(b"{\"cmd\":\"metrics\"}\n").ok()?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    Some(line)
}

/// The namespace of `ctr` commands of the tests.
pub const TEST_NAMESPACE: &str = "carapace-test";
/// The namespace containerd's CRI plugin keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The pod sandbox image configured for CRI (built from busybox by [`Containerd::import_cri_images`]).
pub const PAUSE_IMAGE: &str = "docker.io/carapace/pause:latest";
const PAUSE_SCRIPT: &str = "trap 'exit 0' TERM INT; sleep 2147483647 & wait";

/// The runtime type of Carapace's shim.
pub const CARAPACE_RUNTIME: &str = "io.containerd.carapace.v2";
/// The name under which [`with_carapace`] imports the busybox fixture image.
pub const BUSYBOX_IMAGE: &str = "docker.io/carapace/busybox:latest";

/// A private containerd under `work/containerd` with Carapace's shim registered (runtime
/// type [`CARAPACE_RUNTIME`], CRI handler `carapace`, the shim found in `bin_dir`), `env`
/// in its environment (and so the shim's, e.g. `CARAPACE_CONFIG`), and the busybox fixture
/// image imported as [`BUSYBOX_IMAGE`].
pub fn with_carapace(
    work: &Path,
    bin_dir: &Path,
    env: &[(&str, &Path)],
) -> Result<Containerd, ContainerdError> {
    let rootfs = work.join("image-rootfs");
    crate::fixtures::busybox_rootfs(&rootfs)?;
    let archive = work.join("busybox.tar");
    crate::fixtures::oci_image_archive(&rootfs, BUSYBOX_IMAGE, &["sh"], work, &archive)?;
    let ctrd = Containerd::start(
        &work.join("containerd"),
        &[RuntimeEntry {
            handler: "carapace".into(),
            runtime_type: CARAPACE_RUNTIME.into(),
            ..Default::default()
        }],
        Some(bin_dir),
        env,
    )?;
    ctrd.import(&archive)?;
    Ok(ctrd)
}

/// A fresh temporary directory (named `prefix...`) holding a private containerd with the
/// workspace's Carapace shim ([`with_carapace`]) and its configuration
/// ([`carapace_config`], the console kept), `debug(the directory)` appended to that
/// configuration's `[debug]` section. Returns (directory, runtime state dir, containerd).
pub fn carapace_world(
    prefix: &str,
    debug: impl Fn(&Path) -> String,
) -> Result<(tempfile::TempDir, PathBuf, Containerd), ContainerdError> {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|source| ContainerdError::Io {
            what: "cannot create a temporary directory for",
            path: PathBuf::from(prefix),
            source,
        })?;
    let shim = crate::workspace_bin("containerd-shim-carapace-v2");
    let bins = shim.parent().unwrap_or(Path::new("."));
    let (config, state) = carapace_config(tmp.path(), bins, true)?;
    let extra = debug(tmp.path());
    if !extra.is_empty() {
        let io = |source| ContainerdError::Io {
            what: "cannot extend",
            path: config.clone(),
            source,
        };
        let mut text = fs::read_to_string(&config).map_err(io)?;
        text.push_str(&extra);
        fs::write(&config, text).map_err(io)?;
    }
    let ctrd = with_carapace(tmp.path(), bins, &[("CARAPACE_CONFIG", config.as_path())])?;
    Ok((tmp, state, ctrd))
}

/// A second Carapace handler of [`CarapaceCri`], whose runtime options name a
/// configuration with a bigger VM shape ([`BIG_SHAPE`]): a RuntimeClass of its own.
pub const BIG_HANDLER: &str = "carapace-big";
/// The `[hypervisor]` section start of [`BIG_HANDLER`]'s configuration.
pub const BIG_SHAPE: &str = "[hypervisor]\ndefault_vcpus = 2\ndefault_memory_mib = 768\n";

/// Where the CRI end-to-end tests start: a private containerd under `work` with Carapace as
/// CRI handler `carapace` (configuration from [`carapace_config`], the console kept), the
/// CRI images imported; `state` is the runtime's state directory.
#[derive(Debug)]
pub struct CarapaceCri {
    /// The containerd.
    pub ctrd: Containerd,
    /// The runtime's state directory (one subdirectory per sandbox).
    pub state: PathBuf,
}

impl CarapaceCri {
    /// Starts it with the workspace's shim; panics with the reason when it cannot.
    pub fn start(work: &Path) -> Self {
        assert!(crate::is_root(), "needs root (containerd, mounts)");
        let guest = Path::new("/var/lib/carapace/guest");
        assert!(
            guest.join("vmlinux").is_file(),
            "guest image missing in {}: make image",
            guest.display()
        );
        let shim = crate::workspace_bin("containerd-shim-carapace-v2");
        let bins = shim.parent().expect("bin dir");
        let (config, state) = carapace_config(work, bins, true).expect("config");
        let big = work.join("configuration-big.toml");
        let text = fs::read_to_string(&config).expect("config");
        fs::write(&big, text.replacen("[hypervisor]\n", BIG_SHAPE, 1)).expect("big config");
        let ctrd = Containerd::start(
            &work.join("containerd"),
            &[
                RuntimeEntry {
                    handler: "carapace".into(),
                    runtime_type: CARAPACE_RUNTIME.into(),
                    ..Default::default()
                },
                RuntimeEntry {
                    handler: BIG_HANDLER.into(),
                    runtime_type: CARAPACE_RUNTIME.into(),
                    config_path: Some(big),
                    ..Default::default()
                },
            ],
            Some(bins),
            &[("CARAPACE_CONFIG", config.as_path())],
        )
        .expect("containerd with Carapace");
        ctrd.import_cri_images(work).expect("images");
        CarapaceCri { ctrd, state }
    }

    /// Fails the test after `what` went wrong, with every sandbox's logs and metrics and
    /// containerd's log.
    pub fn fail(&self, what: &str, e: &dyn std::fmt::Display) -> ! {
        let logs = sandbox_logs(&self.state);
        panic!("{what}: {e}\n{logs}\ncontainerd log:\n{}", self.ctrd.log());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Remove what tests left, so no shim outlives containerd: the tests' namespace and
        // CRI's (pods), containers before their pod's sandbox container would not matter
        // here since every task is killed first.
        for ns in [TEST_NAMESPACE, CRI_NAMESPACE] {
            let ctr = |args: &[&str]| self.ctr_command_in(ns).args(args).output();
            if let Ok(out) = ctr(&["task", "ls", "-q"]) {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
                    let _ = ctr(&["task", "delete", "--force", id]);
                }
            }
            if let Ok(out) = ctr(&["container", "ls", "-q"]) {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = ctr(&["container", "delete", id]);
                }
            }
        }
        // SIGTERM lets containerd unmount its snapshots; then make sure it is gone.
        self.stop_daemon();
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Mount points at or under `dir` (this process's mount table).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Unmounts every mount point at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// busybox with Debian's iperf3, for the network benchmark.
pub const NET_IMAGE: &str = "carapace.test/net:1";
/// Debian's iperf3.
pub const IPERF3: &str = "/usr/bin/iperf3";

/// Where Debian's containernetworking-plugins are.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The CNI network of the tests' containerd.
pub const CNI_NETWORK: &str = "carapace-test";
/// Its bridge on the host.
pub const CNI_BRIDGE: &str = "cni-carapace0";
/// Its subnet and the bridge's (gateway's) address.
pub const CNI_SUBNET: &str = "10.213.0.0/16";
/// The bridge's address, the pods' default gateway.
pub const CNI_GATEWAY: &str = "10.213.0.1";
/// The IPv6 subnet (the network is dual-stack, as a Kubernetes dual-stack cluster's).
pub const CNI_SUBNET6: &str = "fd00:213::/64";
/// The bridge's IPv6 address, the pods' IPv6 default gateway.
pub const CNI_GATEWAY6: &str = "fd00:213::1";
const CNI_CONFLIST: &str = "10-carapace-test.conflist";

/// The CNI configuration CRI pods of the tests get (what a kubelet's node would have):
/// a dual-stack bridge with host-local addresses, masquerading out, and portmap for
/// hostPorts.
fn cni_conflist() -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [
                        [{"subnet": CNI_SUBNET, "gateway": CNI_GATEWAY}],
                        [{"subnet": CNI_SUBNET6, "gateway": CNI_GATEWAY6}]
                    ],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
    .to_string()
}

/// A node's containerd configuration keeping everything under `dir`: CRI with runc and
/// the CNI plugins, as [`Containerd::start`] writes it with no extra runtime.
pub fn node_config(dir: &Path) -> String {
    config_toml(dir, &[])
}

/// containerd's configuration: everything under `dir`, CRI with runc and `runtimes`.
fn config_toml(dir: &Path, runtimes: &[RuntimeEntry]) -> String {
    let d = dir.display();
    let mut s = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_cgroup = false
  # keep pods' oom_score_adj at or above containerd's own: lowering it needs
  # CAP_SYS_RESOURCE, which CI containers may not grant
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#
    );
    for r in runtimes {
        s.push_str(&format!(
            "    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{}]\n      runtime_type = \"{}\"\n",
            r.handler, r.runtime_type
        ));
        let options: Vec<String> = [
            ("ConfigPath", &r.config_path),
            ("BinaryName", &r.binary_name),
        ]
        .into_iter()
        .filter_map(|(key, value)| {
            value
                .as_ref()
                .map(|p| format!("      {key} = {:?}\n", p.display().to_string()))
        })
        .collect();
        if !options.is_empty() {
            s.push_str(&format!(
                "    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{}.options]\n{}",
                r.handler,
                options.concat()
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_registers_extra_runtimes_and_keeps_state_under_dir() {
        let s = config_toml(
            Path::new("/t/c"),
            &[
                RuntimeEntry {
                    handler: "carapace".into(),
                    runtime_type: "io.containerd.carapace.v2".into(),
                    ..Default::default()
                },
                RuntimeEntry {
                    handler: "big".into(),
                    runtime_type: "io.containerd.carapace.v2".into(),
                    config_path: Some("/t/big.toml".into()),
                    ..Default::default()
                },
                RuntimeEntry {
                    handler: "gvisor".into(),
                    runtime_type: "io.containerd.runc.v2".into(),
                    binary_name: Some("/usr/bin/runsc".into()),
                    ..Default::default()
                },
            ],
        );
        let parsed: toml::Value = toml::from_str(&s).expect("valid TOML");
        let big = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["big"];
        assert_eq!(big["options"]["ConfigPath"].as_str(), Some("/t/big.toml"));
        assert_eq!(big["options"].get("BinaryName"), None);
        let gvisor =
            &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["gvisor"];
        assert_eq!(
            gvisor["options"]["BinaryName"].as_str(),
            Some("/usr/bin/runsc")
        );
        assert_eq!(
            gvisor["runtime_type"].as_str(),
            Some("io.containerd.runc.v2")
        );
        assert!(s.contains("root = \"/t/c/root\""));
        assert!(s.contains("address = \"/t/c/containerd.sock\""));
        assert!(
            s.contains("runtimes.carapace]\n      runtime_type = \"io.containerd.carapace.v2\"")
        );
        assert!(!s.contains("/var/lib/containerd"));
        assert!(s.contains("bin_dir = \"/usr/lib/cni\""));
    }

    #[test]
    fn the_cni_network_is_a_bridge_with_host_local_addresses_and_portmap() {
        let v: serde_json::Value = serde_json::from_str(&cni_conflist()).unwrap();
        assert_eq!(v["name"], CNI_NETWORK);
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["gateway"],
            CNI_GATEWAY
        );
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][1][0]["subnet"],
            CNI_SUBNET6
        );
        assert_eq!(v["plugins"][1]["type"], "portmap");
    }
}
