//! One module per command, each over `carapace-runtime` library calls; this module loads
//! the configuration, sets up logging and dispatches, and holds the helpers several
//! commands share.

mod check;
mod containerd;
mod create;
mod exec;
mod info;
mod keep;
mod lifecycle;
mod list;
mod run;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use carapace_config::ConfigError;
use carapace_runtime::sandbox::Runtime;
use carapace_runtime::stdio::HostIo;

use crate::cli::{Cli, Cmd, Global};

/// Runs the command; returns the exit code (the container's status for `run`/`exec`).
pub(crate) async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
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
    crate::logging::init(g, level)?;
    let rt = runtime(g, &loaded);
    match &cli.cmd {
        Cmd::Create(a) => drop(create::create(g, &rt, a, true).await?),
        Cmd::Start { id } => lifecycle::start(&rt, id).await?,
        Cmd::State { id } => lifecycle::state(&rt, id)?,
        Cmd::Pause { id } => lifecycle::pause(&rt, id).await?,
        Cmd::Resume { id } => lifecycle::resume(&rt, id).await?,
        Cmd::Update(a) => lifecycle::update(&rt, a).await?,
        Cmd::Events {
            id,
            stats,
            interval,
        } => lifecycle::events(&rt, id, *stats, *interval).await?,
        Cmd::Kill { id, signal, all } => lifecycle::kill(&rt, id, signal, *all).await?,
        Cmd::Delete { id, force } => lifecycle::delete(&rt, id, *force).await?,
        Cmd::Run(a) => return run::run(g, &rt, a).await,
        Cmd::Exec(a) => return exec::exec(g, &rt, a).await,
        Cmd::Ps { id, format } => lifecycle::ps(&rt, id, *format).await?,
        Cmd::List { format, quiet } => list::list(&rt, *format, *quiet)?,
        Cmd::Features => info::features()?,
        Cmd::Spec { bundle, .. } => info::spec(bundle)?,
        Cmd::Check { format } => check::check(&loaded, *format)?,
        Cmd::Env => info::env(&rt, &loaded)?,
        Cmd::ContainerdConfig(a) => containerd::containerd_config(&loaded, a)?,
        Cmd::Keep(a) => return keep::keep(g, &rt, a).await,
        Cmd::Guard { id, exec } => keep::guard(&rt, id, exec.as_deref()).await?,
    }
    Ok(0)
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

/// [`reexec`] for a keeper of container `id`: without `--log` its log goes to
/// `keeper.log` in the container's state directory, not to its stderr, which is the
/// container process's.
fn reexec_keeper(g: &Global, rt: &Runtime, id: &str) -> anyhow::Result<std::process::Command> {
    let mut cmd = reexec(g, rt)?;
    if g.log.is_none() {
        cmd.arg("--log").arg(rt.store.dir(id)?.join("keeper.log"));
    }
    Ok(cmd)
}

/// A command re-executing this binary with the same runtime (root, configuration, log,
/// host agent) as this one; the caller adds the command.
fn reexec(g: &Global, rt: &Runtime) -> anyhow::Result<std::process::Command> {
    let exe = std::env::current_exe().context("locating the carapace binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--root").arg(rt.store.root());
    if let Some(c) = &g.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(l) = &g.log {
        cmd.arg("--log").arg(l);
    }
    if g.log_format == crate::cli::LogFormat::Json {
        cmd.args(["--log-format", "json"]);
    }
    if g.debug {
        cmd.arg("--debug");
    }
    if let Some(h) = &g.host_agent {
        cmd.arg("--host-agent").arg(h);
    }
    Ok(cmd)
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

/// This process's stdio as a container process's.
fn host_io() -> HostIo {
    HostIo {
        stdin_release: None,
        stdin: Some(Box::new(std::io::stdin())),
        stdout: Box::new(tokio::io::stdout()),
        stderr: Box::new(tokio::io::stderr()),
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
}
