//! Running commands where KVM can boot Linux guests: the Rust face of `tests/lab/run`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Environment variable set inside the lab (and read by [`in_kvm`]) so that a test
/// re-executed there runs its body instead of starting another lab.
pub const IN_LAB_ENV: &str = "CARAPACE_IN_LAB";

/// Exit status `tests/lab/run` uses when COMMAND timed out.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status `tests/lab/run` uses when the lab itself failed.
pub const EXIT_LAB_FAILED: i32 = 125;

/// Errors from running a command in the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The harness script could not be started.
    #[error("cannot run the lab harness {path}")]
    Spawn {
        /// Path of `tests/lab/run`.
        path: PathBuf,
        /// Why it could not be started.
        #[source]
        source: std::io::Error,
    },
    /// The command ran longer than the timeout; the lab machine was killed.
    #[error("command timed out after {secs} s in the lab; the lab machine was killed\n{stderr}")]
    Timeout {
        /// The timeout in seconds.
        secs: u64,
        /// What the command and the harness wrote to stderr.
        stderr: String,
    },
    /// The lab machine failed before reporting the command's status.
    #[error("the lab failed (exit status {EXIT_LAB_FAILED}):\n{stderr}")]
    LabFailed {
        /// What the harness wrote to stderr.
        stderr: String,
    },
    /// The harness was killed by a signal.
    #[error("the lab harness was killed by a signal")]
    Killed,
}

/// The outcome of a command run in the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabOutput {
    /// The command's exit status.
    pub status: i32,
    /// The command's standard output.
    pub stdout: String,
    /// The command's standard error, after the harness's own one-line notice.
    pub stderr: String,
}

/// Where commands run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Directly on the host when it can boot guests, otherwise in the lab machine.
    Auto,
    /// Always on the host.
    Direct,
    /// Always in the lab machine, even on a host that could boot guests.
    Lab,
}

/// A command runner for the lab, configured with the builder methods.
#[derive(Debug, Clone)]
pub struct Lab {
    mem_mib: u32,
    smp: Option<u32>,
    timeout: Duration,
    mode: Mode,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    /// A runner with 4 GiB of lab memory, all host cores, and a 20 minute timeout.
    pub fn new() -> Self {
        Self {
            mem_mib: 4096,
            smp: None,
            timeout: Duration::from_secs(1200),
            mode: Mode::Auto,
            env: Vec::new(),
            cwd: None,
        }
    }

    /// Memory of the lab machine in MiB.
    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    /// vCPUs of the lab machine.
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = Some(n);
        self
    }

    /// Kill the command (and the lab machine) after this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where to run the command.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// An extra environment variable for the command.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The command's working directory (default: the caller's).
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Runs `argv` and waits for it. A non-zero exit status of the command is not an
    /// error; a timeout or a failure of the lab itself is.
    /// [`Lab::run`], once more in a new lab machine when the first one died under the
    /// command: its own kernel panicked, it reset without a word, or it froze and the
    /// harness's heartbeat watchdog stopped it (tests/README.md, "Known limitation"). Either is a failure of the lab machine, not of the command, which never
    /// got to report its exit status. Likewise a command that failed while a nested guest
    /// triple-faulted in the lab machine (the emulated CPU's: tests/README.md, The lab).
    /// The retry is said loudly on stderr with the console or the first run's output;
    /// any other failure, and a second death, is returned.
    pub fn run_retrying_a_lab_panic<S: AsRef<OsStr>>(
        &self,
        argv: &[S],
        what: &str,
    ) -> Result<LabOutput, LabError> {
        let mut retries = 0;
        loop {
            let r = self.run(argv);
            if retries == LAB_RETRIES || !retries_allowed() {
                return r;
            }
            retries += 1;
            match &r {
                Err(LabError::LabFailed { stderr }) if lab_machine_died(stderr) => eprintln!(
                    "{what}: the lab machine died (its own kernel panicked or it reset); \
                     running it again in a new lab machine ({retries} of {LAB_RETRIES}). \
                     Its console:\n{stderr}"
                ),
                Ok(out) if out.status != 0 && nested_guest_triple_faulted(&out.stderr) => {
                    eprintln!(
                        "{what}: failed while a nested guest triple-faulted in the lab machine \
                         (the lab's emulated CPU: tests/README.md, The lab); running it again \
                         in a new lab machine ({retries} of {LAB_RETRIES}). That run's \
                         output:\n{}\n{}",
                        out.stdout, out.stderr
                    )
                }
                _ => return r,
            }
        }
    }

    pub fn run<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<LabOutput, LabError> {
        let script = harness_path();
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("--mem")
            .arg(self.mem_mib.to_string())
            .arg("--timeout")
            .arg(self.timeout.as_secs().max(1).to_string());
        if let Some(smp) = self.smp {
            cmd.arg("--smp").arg(smp.to_string());
        }
        cmd.arg("--").args(argv);
        match self.mode {
            Mode::Auto => None,
            Mode::Direct => Some("direct"),
            Mode::Lab => Some("lab"),
        }
        .map(|m| cmd.env("LAB_MODE", m));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        tracing::debug!(script = %script.display(), mode = ?self.mode, "running in the lab");
        let out = cmd.output().map_err(|source| LabError::Spawn {
            path: script.clone(),
            source,
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            None => Err(LabError::Killed),
            Some(EXIT_TIMEOUT) => Err(LabError::Timeout {
                secs: self.timeout.as_secs(),
                stderr,
            }),
            Some(EXIT_LAB_FAILED) if stderr.lines().any(|l| l.starts_with("lab: ")) => {
                Err(LabError::LabFailed { stderr })
            }
            Some(status) => Ok(LabOutput {
                status,
                stdout,
                stderr: strip_notice(&stderr),
            }),
        }
    }
}

/// How many times a test runs again when its lab machine died or a nested guest
/// triple-faulted under it. Two: on 2026-12-07 one test's guest (no free page reporting, no
/// hot-plug, nothing of ours discarded) triple-faulted in two runs in a row
/// (tests/README.md, "Where the boot CPU was").
pub const LAB_RETRIES: usize = 2;

/// Whether a test may run again when its lab machine died (the default). `LAB_RETRY=0`
/// turns every such retry off, so that a measurement of the lab (tests/lab/ab) or a
/// zero-retry record counts each death as a failure.
pub fn retries_allowed() -> bool {
    std::env::var("LAB_RETRY").map_or(true, |v| v != "0")
}

/// Whether the lab harness says its machine stopped before the command could report an
/// exit status (tests/lab/run) or that machine's kernel panicked.
fn lab_machine_died(stderr: &str) -> bool {
    stderr.contains("Kernel panic") || stderr.contains("without reporting the exit status")
}

/// Whether the lab harness saw a nested guest triple-fault (a KVM shutdown exit, traced by
/// tests/lab/run) while the command ran.
fn nested_guest_triple_faulted(stderr: &str) -> bool {
    stderr
        .lines()
        .any(|l| l.starts_with("lab: a nested guest triple-faulted"))
}

/// Drops the harness's notices from the start of stderr: the one-line "lab: ... running
/// ..." notice, and before it the "waiting for it" line of a job that waited for the lab
/// lock.
fn strip_notice(stderr: &str) -> String {
    // `s` without its first line when that is a notice `is` says it is
    fn drop_line(s: &str, is: fn(&str) -> bool) -> &str {
        match s.split_once('\n') {
            Some((first, rest)) if first.starts_with("lab: ") && is(first) => rest,
            _ => s,
        }
    }
    let rest = drop_line(stderr, |l| l.contains("waiting for it"));
    drop_line(rest, |l| l.contains("running")).to_owned()
}

/// Path of the `tests/lab/run` harness script of this checkout.
pub fn harness_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("lab")
        .join("run")
}

/// Why this host's `/dev/kvm` cannot boot a Linux guest, or `None` if it can.
/// The same rules as `tests/lab/run`: `/dev/kvm` must exist, must not be the software
/// KVM `kvm_pvm`, and the CPU must advertise `vmx` or `svm`.
pub fn kvm_unusable_reason() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("/dev/kvm is the software KVM kvm_pvm".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpu_has_virt(&cpuinfo) {
        None
    } else {
        Some("the CPU has no vmx/svm (no hardware virtualization)".into())
    }
}

/// Whether a `/proc/cpuinfo` text lists `vmx` or `svm` among the CPU flags.
fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

/// Whether this host's `/dev/kvm` can boot Linux guests.
pub fn host_can_boot_guests() -> bool {
    kvm_unusable_reason().is_none()
}

/// Runs a test body where KVM can boot guests. Called by [`kvm_test!`].
///
/// Inside the lab (or on a capable host) `body` runs here. Otherwise this re-runs the
/// current test executable inside the lab, filtered to exactly this test, and panics
/// with the lab's output if it fails there.
pub fn in_kvm(module_path: &str, name: &str, lab: Lab, body: impl FnOnce()) {
    in_lab_unless(host_can_boot_guests(), module_path, name, lab, body);
}

/// Runs a test body where cgroup v2 has the cpu and memory controllers (container
/// resource limits). Called by [`cgroup2_test!`]; like [`in_kvm`], it uses the lab (which
/// mounts a full cgroup2 hierarchy) when this host has only cgroup v1 or a hybrid tree.
pub fn in_cgroup2(module_path: &str, name: &str, lab: Lab, body: impl FnOnce()) {
    in_lab_unless(host_has_cgroup2(), module_path, name, lab, body);
}

/// Whether `/sys/fs/cgroup` is a cgroup2 hierarchy offering the cpu and memory controllers.
pub fn host_has_cgroup2() -> bool {
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    let list: Vec<&str> = controllers.split_whitespace().collect();
    list.contains(&"cpu") && list.contains(&"memory")
}

/// Runs `body` here when `host_ok` (or when already inside the lab), otherwise re-runs this
/// test inside the lab.
pub fn in_lab_unless(host_ok: bool, module_path: &str, name: &str, lab: Lab, body: impl FnOnce()) {
    if std::env::var_os(IN_LAB_ENV).is_some() || host_ok {
        body();
        return;
    }
    let test_path = test_path(module_path, name);
    let exe = std::env::current_exe().expect("the test executable's path");
    let argv = [
        exe.as_os_str(),
        OsStr::new(&test_path),
        OsStr::new("--exact"),
        OsStr::new("--include-ignored"),
        OsStr::new("--nocapture"),
        OsStr::new("--test-threads=1"),
    ];
    let lab = lab.mode(Mode::Lab).env(IN_LAB_ENV, "1");
    let out = lab
        .run_retrying_a_lab_panic(&argv, &test_path)
        .unwrap_or_else(|e| panic!("{test_path}: {e}"));
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    assert_eq!(
        out.status, 0,
        "{test_path} failed inside the lab (exit status {})",
        out.status
    );
    assert!(
        out.stdout.contains("1 passed"),
        "{test_path} did not run inside the lab (no test matched)"
    );
}

/// The libtest name of a test: its module path without the crate name, then its name.
fn test_path(module_path: &str, name: &str) -> String {
    match module_path.split_once("::") {
        Some((_, rest)) => format!("{rest}::{name}"),
        None => name.to_owned(),
    }
}

/// Declares an end-to-end test whose body needs a `/dev/kvm` that boots Linux guests.
///
/// ```ignore
/// carapace_tests::kvm_test! {
///     fn boots() { /* runs on the host or inside the lab */ }
/// }
/// // with lab settings:
/// carapace_tests::kvm_test! {
///     #[lab(carapace_tests::lab::Lab::new().mem_mib(2048))]
///     fn small() { /* ... */ }
/// }
/// ```
#[macro_export]
macro_rules! kvm_test {
    ($(#[doc = $doc:literal])* #[lab($lab:expr)] $(#[$m:meta])* fn $name:ident() $body:block) => {
        $(#[doc = $doc])*
        $(#[$m])*
        #[test]
        fn $name() {
            $crate::lab::in_kvm(module_path!(), stringify!($name), $lab, || $body);
        }
    };
    ($(#[$m:meta])* fn $name:ident() $body:block) => {
        $(#[$m])*
        #[test]
        fn $name() {
            $crate::lab::in_kvm(module_path!(), stringify!($name), $crate::lab::Lab::new(), || $body);
        }
    };
}

/// Declares an end-to-end test whose body needs cgroup v2 with the cpu and memory
/// controllers; on a host without them it runs inside the lab. Same forms as [`kvm_test!`].
#[macro_export]
macro_rules! cgroup2_test {
    ($(#[doc = $doc:literal])* #[lab($lab:expr)] $(#[$m:meta])* fn $name:ident() $body:block) => {
        $(#[doc = $doc])*
        $(#[$m])*
        #[test]
        fn $name() {
            $crate::lab::in_cgroup2(module_path!(), stringify!($name), $lab, || $body);
        }
    };
    ($(#[$m:meta])* fn $name:ident() $body:block) => {
        $(#[$m])*
        #[test]
        fn $name() {
            $crate::lab::in_cgroup2(module_path!(), stringify!($name), $crate::lab::Lab::new(), || $body);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_path_drops_the_crate_name() {
        assert_eq!(test_path("lab_kvm", "runs"), "runs");
        assert_eq!(test_path("lab_kvm::inner", "runs"), "inner::runs");
    }

    #[test]
    fn a_nested_triple_fault_is_told_by_the_harness_line_only() {
        let seen = "lab: /dev/kvm ...; running\nsome output\nlab: a nested guest triple-faulted (KVM shutdown exit) during the job; the last KVM events before it:\n";
        assert!(nested_guest_triple_faulted(seen));
        assert!(!nested_guest_triple_faulted(
            "vmm: VM stopped reason=guest triple fault\ntest failed\n"
        ));
    }

    #[test]
    fn cpu_virt_flags_are_found_only_in_the_flags_line() {
        assert!(cpu_has_virt("model name\t: x\nflags\t\t: fpu vme svm lm\n"));
        assert!(cpu_has_virt("flags\t\t: fpu vmx\n"));
        assert!(!cpu_has_virt("flags\t\t: fpu svme lm\nmodel name\t: svm\n"));
    }

    #[test]
    fn notice_is_stripped_from_stderr() {
        let s = "lab: no vmx/svm; running inside a QEMU-TCG machine\nreal error\n";
        assert_eq!(strip_notice(s), "real error\n");
        assert_eq!(strip_notice("other\n"), "other\n");
        // a job that waited for the lab lock first says so
        let waited = "lab: another lab machine is running on this host; waiting for it (LAB_LOCK=none to skip)\nlab: no vmx/svm; running inside a QEMU-TCG machine\nreal error\nlab: later\n";
        assert_eq!(strip_notice(waited), "real error\nlab: later\n");
        assert_eq!(
            strip_notice("lab: something else\nx\n"),
            "lab: something else\nx\n"
        );
    }

    #[test]
    fn direct_mode_keeps_cwd_env_status_and_streams_apart() {
        let dir = std::env::temp_dir();
        let out = Lab::new()
            .mode(Mode::Direct)
            .env("LAB_TEST_VALUE", "xyzzy")
            .cwd(&dir)
            .run(&[
                "bash",
                "-c",
                "echo \"$LAB_TEST_VALUE $PWD\"; echo to-err >&2; exit 3",
            ])
            .expect("direct run");
        assert_eq!(out.status, 3);
        assert_eq!(out.stdout, format!("xyzzy {}\n", dir.display()));
        assert_eq!(out.stderr, "to-err\n");
    }

    #[test]
    fn direct_mode_timeout_is_an_error() {
        let err = Lab::new()
            .mode(Mode::Direct)
            .timeout(Duration::from_secs(1))
            .run(&["sleep", "30"])
            .expect_err("must time out");
        assert!(matches!(err, LabError::Timeout { secs: 1, .. }), "{err}");
    }

    #[test]
    fn harness_rejects_bad_arguments_with_a_named_reason() {
        let out = Command::new("bash")
            .arg(harness_path())
            .args(["--mem", "lots", "--", "true"])
            .output()
            .expect("run harness");
        assert_eq!(out.status.code(), Some(EXIT_LAB_FAILED));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--mem must be a number"), "{err}");
    }
}
