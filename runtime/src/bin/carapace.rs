//! `carapace`: the runc-compatible command line of the Carapace runtime. See README.md
//! (exit codes are listed there and in [`exit_code`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use carapace_config::ConfigError;
use carapace_runtime::agent::AgentError;
use carapace_runtime::process::ProcessRecord;
use carapace_runtime::sandbox::{ExecOptions, Runtime, SandboxError};
use carapace_runtime::state::{StateError, Status};
use carapace_runtime::stdio::{
    HostIo, RawMode, block_sigwinch, forward_resizes, stream_until_exit, terminal_size,
};
use carapace_runtime::{check, console, features, oci};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Carapace: run OCI containers, each inside its own lightweight KVM virtual machine.
///
/// The commands follow runc's (create, start, state, kill, delete, run, exec, ps, list,
/// features, spec), so podman (`--runtime carapace`) and runc-style callers can drive it.
/// `check` tells whether this host can run sandboxes, `env` prints the configuration.
#[derive(Debug, Parser)]
#[command(name = "carapace", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Args)]
struct Global {
    /// Directory for sandbox state (default: runtime.state_dir, /run/carapace).
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Write the runtime's log to FILE instead of stderr.
    #[arg(long, global = true, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Configuration file (default: $CARAPACE_CONFIG, else /etc/carapace/configuration.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log at debug level whatever the configuration says.
    #[arg(long, global = true)]
    debug: bool,
    /// Testing only: run containers on this host through `AGENT --host-mode` instead of in
    /// a VM (no isolation). Lets the runtime be exercised where KVM cannot boot guests.
    #[arg(long, global = true, hide = true, value_name = "AGENT")]
    host_agent: Option<PathBuf>,
    /// Accepted for runc compatibility; ignored (there is no systemd cgroup on the host
    /// side: cgroups live in the guest).
    #[arg(long, global = true, hide = true)]
    systemd_cgroup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a container from an OCI bundle: boot its sandbox VM and create the container
    /// in it, without starting the process. The container's stdio is relayed to this
    /// command's stdio by a background process until the container exits.
    Create(CreateArgs),
    /// Start the process of a created container.
    Start {
        /// Container id.
        id: String,
    },
    /// Print the OCI state of a container as JSON (ociVersion, id, status, pid, bundle,
    /// annotations). pid is the sandbox VMM's host pid.
    State {
        /// Container id.
        id: String,
    },
    /// Send a signal (default SIGTERM) to the container's init process.
    Kill {
        /// Container id.
        id: String,
        /// Signal name (TERM, SIGKILL, ...) or number.
        #[arg(default_value = "SIGTERM")]
        signal: String,
        /// Signal every process of the container.
        #[arg(short, long)]
        all: bool,
    },
    /// Delete a container: stop its VM, its fs daemon, undo its mounts and remove its
    /// state. A running container needs --force. Deleting a missing container is an
    /// error without --force and succeeds with it.
    Delete {
        /// Container id.
        id: String,
        /// Kill a running container first; succeed if it does not exist.
        #[arg(short, long)]
        force: bool,
    },
    /// Create and start a container, stream its stdio, wait for it and delete it; exits
    /// with the container's exit status (128+signal when killed). With --detach, return
    /// once it started.
    Run(RunArgs),
    /// Run a new process in a running container and exit with its status.
    Exec(ExecArgs),
    /// List the guest pids of a container's processes.
    Ps {
        /// Container id.
        id: String,
        /// Output format.
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// List containers under --root.
    List {
        /// Output format.
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Print only the ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print the features document (what this runtime implements) as JSON.
    Features,
    /// Write a default config.json (runc's default shape) into the bundle directory.
    Spec {
        /// Bundle directory.
        #[arg(long, short = 'b', default_value = ".")]
        bundle: PathBuf,
        /// Accepted for runc compatibility; ignored.
        #[arg(long, hide = true)]
        rootless: bool,
    },
    /// Check whether this host can run sandboxes: /dev/kvm usable with hardware
    /// virtualization, guest image present, VMM and fs daemon present. Prints a fix for
    /// each failure; exits non-zero if any check fails.
    Check {
        /// Output format.
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Print the effective configuration (TOML) and where it came from.
    Env,
    /// Internal: relays a created container's stdio until it exits (started by create).
    #[command(name = "__relay", hide = true)]
    Relay {
        /// Container id.
        id: String,
    },
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Container id.
    id: String,
    /// Bundle directory (holding config.json).
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
    /// Write the container's pid (the VMM's host pid) to FILE.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Unix socket to send the container terminal's master fd to (runc's protocol, used
    /// by podman/conmon for `-t`); the spec must have process.terminal = true.
    #[arg(long, value_name = "SOCKET")]
    console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility; ignored (the guest agent sets up the rootfs).
    #[arg(long, hide = true)]
    no_pivot: bool,
    /// Accepted for runc compatibility; ignored.
    #[arg(long, hide = true)]
    no_new_keyring: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    create: CreateArgs,
    /// Return once the container started; its stdio is relayed in the background (or
    /// through --console-socket's terminal).
    #[arg(long, short = 'd')]
    detach: bool,
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// Container id.
    id: String,
    /// Allocate a terminal for the process.
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the container.
    #[arg(long)]
    cwd: Option<String>,
    /// Take the whole OCI process object from this JSON file (overrides the command).
    #[arg(short = 'p', long, value_name = "FILE")]
    process: Option<PathBuf>,
    /// Do not wait: start the process and return.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Write the process's guest pid to FILE.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Exit codes of `carapace` itself (`run`/`exec` exit with the container process's status).
mod exit {
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CONFIG: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const CONFLICT: u8 = 5;
    pub const BAD_SPEC: u8 = 6;
    pub const HOST: u8 = 7;
    pub const HELPER: u8 = 8;
    pub const AGENT: u8 = 9;
    pub const MOUNT: u8 = 10;
    pub const TEARDOWN: u8 = 11;
    pub const CHECK_FAILED: u8 = 12;
}

/// A failed `check`, carried to `main` for its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{failed} host check(s) failed")]
struct ChecksFailed {
    failed: usize,
}

fn state_exit_code(e: &StateError) -> u8 {
    match e {
        StateError::NotFound { .. } => exit::NOT_FOUND,
        StateError::Exists { .. } | StateError::InvalidId { .. } => exit::CONFLICT,
        StateError::Io { .. } | StateError::Corrupt { .. } => exit::FAILURE,
    }
}

fn sandbox_exit_code(e: &SandboxError) -> u8 {
    match e {
        SandboxError::State(s) => state_exit_code(s),
        SandboxError::Io { .. } => exit::FAILURE,
        SandboxError::WrongStatus { .. } => exit::CONFLICT,
        SandboxError::Spec(_) => exit::BAD_SPEC,
        SandboxError::Image(_) => exit::HOST,
        SandboxError::Process(_) | SandboxError::VmmExited { .. } => exit::HELPER,
        SandboxError::Agent(_) | SandboxError::AgentTimeout { .. } => exit::AGENT,
        SandboxError::Mount(_) => exit::MOUNT,
        SandboxError::Teardown { .. } => exit::TEARDOWN,
        SandboxError::WithTeardown { error, .. } => sandbox_exit_code(error),
    }
}

/// Maps an error chain to the exit code of its most specific known kind.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<SandboxError>() {
            return sandbox_exit_code(s);
        }
        if let Some(s) = cause.downcast_ref::<StateError>() {
            return state_exit_code(s);
        }
        if cause.downcast_ref::<oci::SpecError>().is_some() {
            return exit::BAD_SPEC;
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return exit::CONFIG;
        }
        if cause.downcast_ref::<AgentError>().is_some() {
            return exit::AGENT;
        }
        if cause.downcast_ref::<ChecksFailed>().is_some() {
            return exit::CHECK_FAILED;
        }
    }
    exit::FAILURE
}

fn init_logging(g: &Global, level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARAPACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let writer: tracing_subscriber::fmt::writer::BoxMakeWriter = match &g.log {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(Arc::new(f))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    match g.log_format {
        LogFormat::Json => builder.json().with_writer(writer).init(),
        LogFormat::Text => builder.with_writer(writer).init(),
    }
    Ok(())
}

fn load_config(g: &Global) -> Result<carapace_config::Loaded, ConfigError> {
    let env = std::env::var_os(carapace_config::ENV_VAR).map(PathBuf::from);
    carapace_config::load(g.config.as_deref(), env.as_deref())
}

fn runtime(g: &Global, loaded: &carapace_config::Loaded) -> Runtime {
    let config = loaded.config.clone();
    let root = g
        .root
        .clone()
        .unwrap_or_else(|| config.runtime.state_dir.clone());
    Runtime::from_config(config, root, g.host_agent.clone())
}

fn parse_signal(s: &str) -> anyhow::Result<u32> {
    if let Ok(n) = s.parse::<u32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("signal number {n} out of range 1-64");
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    let sig: nix::sys::signal::Signal = name
        .parse()
        .with_context(|| format!("unknown signal {s:?}"))?;
    Ok(sig as u32)
}

fn write_pid_file(path: &Path, pid: impl std::fmt::Display) -> anyhow::Result<()> {
    // Atomic, as runc does: callers poll for the file.
    let tmp = path.with_extension("tmp-carapace");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing pid file {}", path.display()))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Arguments that make a child `carapace` see the same runtime as this one.
fn global_args(g: &Global, root: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec!["--root".into(), root.into()];
    if let Some(c) = &g.config {
        a.extend(["--config".into(), c.into()]);
    }
    if let Some(l) = &g.log {
        a.extend(["--log".into(), l.into()]);
    }
    if g.log_format == LogFormat::Json {
        a.extend(["--log-format".into(), "json".into()]);
    }
    if g.debug {
        a.push("--debug".into());
    }
    if let Some(h) = &g.host_agent {
        a.extend(["--host-agent".into(), h.into()]);
    }
    a
}

/// Starts the stdio relay for a created container: on `terminal` (the console socket's
/// pty slave) if given, else on this process's stdio.
fn spawn_relay(
    g: &Global,
    rt: &Runtime,
    id: &str,
    terminal: Option<std::os::fd::OwnedFd>,
) -> anyhow::Result<ProcessRecord> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating the carapace binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(global_args(g, rt.store.root()))
        .arg("__relay")
        .arg(id)
        .process_group(0);
    if let Some(t) = terminal {
        let dup = |fd: &std::os::fd::OwnedFd| fd.try_clone().context("duplicating the terminal");
        cmd.stdin(dup(&t)?).stdout(dup(&t)?).stderr(t);
    }
    let child = cmd.spawn().context("starting the stdio relay")?;
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    drop(child);
    let rec = ProcessRecord::of(pid).unwrap_or(ProcessRecord { pid, start_time: 0 });
    rt.store.update(id, |st| st.io_relay = Some(rec))?;
    Ok(rec)
}

fn create(g: &Global, rt: &Runtime, a: &CreateArgs, relay: bool) -> anyhow::Result<()> {
    if let Some(sock) = &a.console_socket {
        let bundle = std::fs::canonicalize(&a.bundle)
            .with_context(|| format!("resolving bundle {}", a.bundle.display()))?;
        let (path, spec) = oci::load_bundle_spec(&bundle)?;
        if spec.pointer("/process/terminal").and_then(|t| t.as_bool()) != Some(true) {
            bail!(
                "--console-socket {} given but process.terminal is not true in {}",
                sock.display(),
                path.display()
            );
        }
    }
    let st = rt.create(&a.id, &a.bundle)?;
    let finish = || -> anyhow::Result<()> {
        if relay {
            let terminal = match &a.console_socket {
                Some(sock) => Some(console::hand_off(sock)?),
                None => None,
            };
            spawn_relay(g, rt, &a.id, terminal)?;
        }
        if let Some(p) = &a.pid_file {
            write_pid_file(p, st.vmm.map(|v| v.pid).unwrap_or(0))?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        if let Err(d) = rt.delete(&a.id, true) {
            return Err(e.context(format!("cleanup after the failure also failed: {d}")));
        }
        return Err(e);
    }
    Ok(())
}

fn host_io() -> HostIo {
    HostIo {
        stdin: Some(Box::new(std::io::stdin())),
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
    }
}

fn relay(rt: &Runtime, id: &str) -> anyhow::Result<()> {
    // Wait for `start` (or for the container to disappear).
    loop {
        match rt.store.load(id) {
            Ok(st) if st.status == Status::Running => break,
            Ok(st) if rt.live_status(&st) == Status::Stopped => {
                tracing::info!(id, "container stopped before it started; relay exits");
                return Ok(());
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            Err(StateError::NotFound { .. }) => {
                tracing::info!(id, "container deleted; relay exits");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    }
    let st = rt.store.load(id)?;
    let agent = rt.agent(&st)?;
    tracing::info!(id, "relaying stdio");
    let exit = stream_until_exit(&agent, id, "", host_io())?;
    tracing::info!(id, status = exit.exit_status, "container exited");
    rt.record_exit(id, exit)?;
    Ok(())
}

fn run(g: &Global, rt: &Runtime, a: &RunArgs) -> anyhow::Result<u8> {
    if a.detach || a.create.console_socket.is_some() {
        // The relay carries the stdio (or the console socket's terminal).
        let id = &a.create.id;
        create(g, rt, &a.create, true)?;
        if let Err(e) = rt.start(id) {
            let _ = rt.delete(id, true);
            return Err(e.into());
        }
        if a.detach {
            return Ok(0);
        }
        let exit = loop {
            let st = rt.store.load(id)?;
            if rt.live_status(&st) == Status::Stopped {
                break st.exit.map(|e| e.status).unwrap_or(255);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        rt.delete(id, true)?;
        return Ok(u8::try_from(exit).unwrap_or(255));
    }
    create(g, rt, &a.create, false)?;
    let id = &a.create.id;
    let result = (|| -> anyhow::Result<u8> {
        let st = rt.store.load(id)?;
        let agent = rt.agent(&st)?;
        // the container's own process (exec_process would override `terminal`)
        let guest_spec = rt.paths(id)?.guest_spec;
        let tty = std::fs::read(&guest_spec)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.pointer("/process/terminal").and_then(|t| t.as_bool()))
            .unwrap_or(false);
        // The terminal exists from create on: size it before the process runs, so its
        // first look at the window size sees the real one (retried after start if the
        // agent refuses a not yet started process).
        let size = if tty { terminal_size() } else { None };
        let sized = size.is_some_and(|(rows, cols)| agent.resize(id, "", rows, cols).is_ok());
        rt.start(id)?;
        let _raw = if tty { RawMode::stdin() } else { None };
        if let Some((rows, cols)) = size {
            if !sized {
                let _ = agent.resize(id, "", rows, cols);
            }
            forward_resizes(agent.clone(), id.clone(), String::new());
        }
        let exit = stream_until_exit(&agent, id, "", host_io())?;
        rt.record_exit(id, exit)?;
        Ok(u8::try_from(exit.exit_status).unwrap_or(255))
    })();
    let deleted = rt.delete(id, true);
    let code = result?;
    deleted?;
    Ok(code)
}

fn exec(rt: &Runtime, a: &ExecArgs) -> anyhow::Result<u8> {
    let process = match &a.process {
        Some(p) => {
            let text = std::fs::read(p)
                .with_context(|| format!("reading process file {}", p.display()))?;
            serde_json::from_slice::<serde_json::Value>(&text)
                .with_context(|| format!("parsing process file {}", p.display()))?
        }
        None => {
            if a.command.is_empty() {
                bail!("exec needs a command (or --process FILE)");
            }
            rt.exec_process(
                &a.id,
                &ExecOptions {
                    args: a.command.clone(),
                    env: a.env.clone(),
                    cwd: a.cwd.clone(),
                    tty: a.tty,
                },
            )?
        }
    };
    let tty = process
        .get("terminal")
        .and_then(|t| t.as_bool())
        .unwrap_or(false);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let exec_id = format!("exec-{}-{nanos}", std::process::id());
    let (agent, pid) = rt.exec(&a.id, &exec_id, &process)?;
    if let Some(p) = &a.pid_file {
        write_pid_file(p, pid)?;
    }
    if a.detach {
        return Ok(0);
    }
    let _raw = if tty { RawMode::stdin() } else { None };
    if tty && let Some((rows, cols)) = terminal_size() {
        let _ = agent.resize(&a.id, &exec_id, rows, cols);
        forward_resizes(agent.clone(), a.id.clone(), exec_id.clone());
    }
    let exit = stream_until_exit(&agent, &a.id, &exec_id, host_io())?;
    Ok(u8::try_from(exit.exit_status).unwrap_or(255))
}

fn list(rt: &Runtime, format: Format, quiet: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for id in rt.store.ids()? {
        let Ok(st) = rt.store.load(&id) else {
            continue;
        };
        let oci = st.oci(rt.live_status(&st), st.vmm.is_some_and(|v| v.is_alive()));
        rows.push((st, oci));
    }
    if quiet {
        for (st, _) in &rows {
            println!("{}", st.id);
        }
        return Ok(());
    }
    match format {
        Format::Json => {
            let v: Vec<_> = rows
                .iter()
                .map(|(st, oci)| {
                    serde_json::json!({
                        "ociVersion": oci.oci_version,
                        "id": oci.id,
                        "pid": oci.pid,
                        "status": oci.status,
                        "bundle": oci.bundle,
                        "created": carapace_runtime::state::rfc3339_utc(st.created_unix),
                        "annotations": oci.annotations,
                    })
                })
                .collect();
            print_json(&v)
        }
        Format::Table => {
            println!(
                "{:<24} {:<8} {:<10} {:<40} CREATED",
                "ID", "PID", "STATUS", "BUNDLE"
            );
            for (st, oci) in &rows {
                println!(
                    "{:<24} {:<8} {:<10} {:<40} {}",
                    oci.id,
                    oci.pid,
                    oci.status,
                    oci.bundle,
                    carapace_runtime::state::rfc3339_utc(st.created_unix)
                );
            }
            Ok(())
        }
    }
}

fn checks(loaded: &carapace_config::Loaded, format: Format) -> anyhow::Result<()> {
    let results = check::run(&loaded.config, &check::HostFiles::default());
    let failed = results.iter().filter(|c| !c.ok).count();
    match format {
        Format::Json => print_json(&results)?,
        Format::Table => {
            println!("configuration: {}", loaded.origin);
            for c in &results {
                let mark = if c.ok { "ok  " } else { "FAIL" };
                println!("[{mark}] {}: {}", c.name, c.detail);
                if let Some(h) = &c.hint {
                    println!("       fix: {h}");
                }
            }
        }
    }
    if failed > 0 {
        return Err(ChecksFailed { failed }.into());
    }
    Ok(())
}

fn main_inner(cli: Cli) -> anyhow::Result<u8> {
    let g = &cli.global;
    let loaded = load_config(g)?;
    // On stderr the default level (info) is lowered to warnings, so that the container's
    // own output is not interleaved with progress lines; a log file gets the configured
    // level, and an explicit debug/trace level is kept.
    let level = match (g.debug, &g.log, loaded.config.debug.log_level) {
        (true, _, _) => "debug",
        (false, None, carapace_config::LogLevel::Info) => "warn",
        (false, _, l) => l.as_str(),
    };
    init_logging(g, level)?;
    let rt = runtime(g, &loaded);
    match &cli.cmd {
        Cmd::Create(a) => create(g, &rt, a, true)?,
        Cmd::Start { id } => {
            rt.start(id)?;
        }
        Cmd::State { id } => print_json(&rt.state(id)?)?,
        Cmd::Kill { id, signal, all } => rt.kill(id, parse_signal(signal)?, *all)?,
        Cmd::Delete { id, force } => rt.delete(id, *force)?,
        Cmd::Run(a) => return run(g, &rt, a),
        Cmd::Exec(a) => return exec(&rt, a),
        Cmd::Ps { id, format } => {
            let pids = rt.ps(id)?;
            match format {
                Format::Json => print_json(&pids)?,
                Format::Table => {
                    println!("PID");
                    for p in pids {
                        println!("{p}");
                    }
                }
            }
        }
        Cmd::List { format, quiet } => list(&rt, *format, *quiet)?,
        Cmd::Features => print_json(&features::document())?,
        Cmd::Spec { bundle, .. } => {
            oci::write_default_spec(bundle)?;
        }
        Cmd::Check { format } => checks(&loaded, *format)?,
        Cmd::Env => {
            println!("# configuration: {}", loaded.origin);
            println!("# state root: {}", rt.store.root().display());
            print!("{}", toml::to_string_pretty(&loaded.config)?);
        }
        Cmd::Relay { id } => relay(&rt, id)?,
    }
    Ok(0)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    // `run` and `exec` may forward terminal resizes: block SIGWINCH before any thread
    // exists, so that every thread inherits the mask and only `forward_resizes` collects it
    // (the VMM and fs daemon `run` starts inherit it too; they do not use it).
    if matches!(cli.cmd, Cmd::Run(_) | Cmd::Exec(_)) {
        block_sigwinch();
    }
    match main_inner(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("carapace: error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), 10);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn error_kinds_map_to_distinct_exit_codes() {
        let nf: anyhow::Error = SandboxError::State(StateError::NotFound {
            id: "x".into(),
            path: "/r/x/state.json".into(),
        })
        .into();
        assert_eq!(exit_code(&nf), exit::NOT_FOUND);
        let wrapped = nf.context("deleting");
        assert_eq!(exit_code(&wrapped), exit::NOT_FOUND);
        let spec: anyhow::Error = oci::SpecError::Exists {
            path: "/b/config.json".into(),
        }
        .into();
        assert_eq!(exit_code(&spec), exit::BAD_SPEC);
        let ws: anyhow::Error = SandboxError::WrongStatus {
            id: "x".into(),
            status: "running",
            op: "delete",
        }
        .into();
        assert_eq!(exit_code(&ws), exit::CONFLICT);
        let cf: anyhow::Error = ChecksFailed { failed: 2 }.into();
        assert_eq!(exit_code(&cf), exit::CHECK_FAILED);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), exit::FAILURE);
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
