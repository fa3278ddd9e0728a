//! `carapace-agent`: PID 1 of a Carapace microVM (or, with `--host-mode`, a test
//! server on the host). See README.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use std::time::Duration;

use carapace_agent::core::{Config, DEFAULT_STOP_GRACE, Mode};
use carapace_agent::{pid1, process, sys};
use clap::Parser;

/// Carapace guest agent: the init process of a Carapace microVM and the supervisor of the
/// containers inside it, serving the carapace-protocol ttrpc API.
///
/// As PID 1 (the kernel runs it as /init) it prints a ready line on the console, mounts
/// proc/sys/dev/devpts/cgroup2/run, reads `carapace.*` kernel parameters, serves on vsock
/// port 1023 and powers the VM off when the sandbox is destroyed. It disables the kernel's
/// Ctrl-Alt-Del restart, so Ctrl-Alt-Del (how the VMM asks for a shutdown) reaches it as
/// SIGINT: containers get SIGTERM, a grace period, SIGKILL; shares are unmounted; power off.
///
/// With --host-mode it serves on a unix socket and runs containers on this host (root
/// needed); used by tests so that most of the agent is exercised without a VM.
#[derive(Debug, Parser)]
#[command(name = "carapace-agent", version)]
struct Args {
    /// Run as a normal process on the host instead of as the VM's init.
    #[arg(long)]
    host_mode: bool,
    /// Address to serve on: unix:///path/agent.sock or vsock://-1:PORT.
    /// Default: vsock://-1:1023 (guest); required with --host-mode.
    #[arg(long)]
    listen: Option<String>,
    /// Parent cgroup (in a cgroup2 hierarchy) of container cgroups. Default: guest
    /// /sys/fs/cgroup/carapace; host mode: <cgroup2 mount>/carapace-agent-<pid> if a cgroup2
    /// mount exists, else no cgroups (limits, stats and pause are then refused).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax). Guest default: carapace.log= on the kernel
    /// command line, else "info".
    #[arg(long)]
    log: Option<String>,
    /// Seconds containers get between SIGTERM and SIGKILL in an orderly shutdown (SIGINT:
    /// Ctrl-Alt-Del in the guest; in host mode, SIGINT stops the containers, then the agent
    /// exits). Guest default: carapace.stop_grace_secs= on the kernel command line, else 5.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=pid1::MAX_STOP_GRACE_SECS))]
    stop_grace_secs: Option<u64>,
}

/// Exit codes.
const EXIT_USAGE: u8 = 2;
const EXIT_SERVE: u8 = 3;

fn init_logging(filter: &str, to_console: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    if to_console {
        builder
            .with_writer(|| -> Box<dyn std::io::Write> {
                match std::fs::OpenOptions::new().write(true).open("/dev/console") {
                    Ok(f) => Box::new(f),
                    Err(_) => Box::new(std::io::stderr()),
                }
            })
            .init();
    } else {
        builder.with_writer(std::io::stderr).init();
    }
}

fn report(e: &anyhow::Error) {
    let msg = format!("carapace-agent: error: {e:#}");
    eprintln!("{msg}");
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // The container helper: handled before anything else (no runtime, no threads).
    if argv.get(1).map(String::as_str) == Some("__init") {
        let fd = |i: usize| argv.get(i).and_then(|s| process::parse_fd(s));
        let console = argv.get(5).map(|_| fd(5));
        match (fd(2), fd(3), fd(4), console) {
            (Some(c), Some(s), Some(st), None) => carapace_agent::init::main(c, s, st, None),
            (Some(c), Some(s), Some(st), Some(Some(tty))) => {
                carapace_agent::init::main(c, s, st, Some(tty))
            }
            _ => {
                eprintln!(
                    "carapace-agent: __init needs three descriptor numbers (config, status, start) and, with a terminal, a fourth (console socket)"
                );
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let is_pid1 = std::process::id() == 1;
    if is_pid1 {
        // First thing: tell the host we reached userspace.
        pid1::console_line(&pid1::ready_line());
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if is_pid1 => {
            // PID 1 must not exit on odd arguments from the kernel.
            pid1::console_line(&format!("carapace-agent: ignoring arguments: {e}"));
            Args::parse_from(["carapace-agent"])
        }
        Err(e) => e.exit(),
    };
    let result = if args.host_mode {
        run_host(args)
    } else if is_pid1 {
        run_guest(args)
    } else {
        eprintln!(
            "carapace-agent: error: not running as PID 1: pass --host-mode --listen unix:///path to run on the host"
        );
        return ExitCode::from(EXIT_USAGE);
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            if is_pid1 && !args_host_mode() {
                pid1::console_line(&format!("carapace-agent: fatal: {e:#}; powering off"));
                let err = pid1::power_off();
                pid1::console_line(&format!("carapace-agent: power off failed: {err}"));
                // PID 1 must never exit; park forever.
                loop {
                    std::thread::park();
                }
            }
            ExitCode::from(EXIT_SERVE)
        }
    }
}

fn args_host_mode() -> bool {
    std::env::args().any(|a| a == "--host-mode")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

fn run_host(args: Args) -> anyhow::Result<ExitCode> {
    init_logging(args.log.as_deref().unwrap_or("info"), false);
    let listen = args
        .listen
        .context("--host-mode needs --listen unix:///path/agent.sock")?;
    anyhow::ensure!(
        listen.starts_with("unix://"),
        "--listen in host mode must be unix:///path"
    );
    let cgroup_root = args.cgroup_root.or_else(|| {
        carapace_agent::cgroup::CgroupRoot::detect()
            .map(|p| p.with_file_name(format!("carapace-agent-{}", std::process::id())))
    });
    // Orphaned container processes must be re-parented to us so we can reap them.
    nix::sys::prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")?;
    let config = Config {
        mode: Mode::Host,
        cgroup_root: cgroup_root.clone(),
        stop_grace: args
            .stop_grace_secs
            .map_or(DEFAULT_STOP_GRACE, Duration::from_secs),
        cpu_sysfs: PathBuf::from(carapace_agent::cpus::SYSFS_CPU_ROOT),
    };
    let rt = runtime()?;
    rt.block_on(carapace_agent::serve(&listen, config, || {}))?;
    if let Some(root) = cgroup_root {
        let _ = std::fs::remove_dir(root);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_guest(args: Args) -> anyhow::Result<ExitCode> {
    if let Err(e) = pid1::leave_initramfs() {
        pid1::console_line(&format!(
            "carapace-agent: warning: cannot leave the initramfs root ({e:#}); containers will fail to pivot_root"
        ));
    }
    pid1::early_mounts().context("mounting the early filesystems")?;
    // Ctrl-Alt-Del must not restart the VM at once: with the hard restart disabled the
    // kernel sends SIGINT to PID 1, which stops the containers in order (lib.rs `serve`).
    let cad = nix::sys::reboot::set_cad_enabled(false);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (settings, unknown) = pid1::parse_cmdline(&cmdline);
    let filter = settings.console_filter(args.log.as_deref());
    init_logging(&filter, true);
    for u in unknown {
        tracing::warn!(parameter = %u, "unknown or invalid carapace.* kernel parameter ignored");
    }
    if let Err(e) = cad {
        tracing::warn!(error = %e, "reboot(RB_DISABLE_CAD) failed: Ctrl-Alt-Del restarts the VM without stopping the containers");
    }
    let port = settings.port.unwrap_or(carapace_protocol::AGENT_VSOCK_PORT);
    let listen = args.listen.unwrap_or_else(|| format!("vsock://-1:{port}"));
    let config = Config {
        mode: Mode::Guest,
        cgroup_root: Some(
            args.cgroup_root
                .or(settings.cgroup_root.map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/carapace")),
        ),
        stop_grace: args
            .stop_grace_secs
            .or(settings.stop_grace_secs)
            .map_or(DEFAULT_STOP_GRACE, Duration::from_secs),
        cpu_sysfs: PathBuf::from(carapace_agent::cpus::SYSFS_CPU_ROOT),
    };
    // The containers' cgroup root is bounded below MemTotal, so that a guest out of memory
    // is an OOM kill in the containers' cgroups, not a global OOM (memory.rs). It exists
    // before the agent serves, so no container starts unbounded.
    if let Some(root) = &config.cgroup_root {
        let reserve = settings
            .memory_reserve_mib
            .unwrap_or(carapace_agent::memory::DEFAULT_RESERVE_MIB);
        let bounded = carapace_agent::cgroup::CgroupRoot::init(root)
            .map_err(anyhow::Error::from)
            .and_then(|_| {
                carapace_agent::memory::ContainersLimit::guest(root, reserve)
                    .apply_and_follow_hotplug()
                    .map_err(anyhow::Error::from)
            });
        if let Err(e) = bounded {
            tracing::warn!(error = %format!("{e:#}"), "containers' memory not bounded: a guest out of memory is a global OOM");
        }
    }
    let rt = runtime()?;
    rt.block_on(carapace_agent::serve(&listen, config, || {
        if let Err(e) = sys::write_boot_marker() {
            tracing::warn!(error = %e, "cannot write the boot-done marker to port 0x3f0");
        }
    }))?;
    pid1::console_line("carapace-agent: powering off");
    drop(rt);
    let err = pid1::power_off();
    Err(anyhow::anyhow!("reboot(RB_POWER_OFF) failed: {err}"))
}
