//! The command line: global options, commands and their arguments (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Carapace: run OCI containers, each inside its own lightweight KVM virtual machine.
///
/// The commands follow runc's (create, start, state, kill, delete, run, exec, ps, pause,
/// resume, list, features, spec), so podman (`--runtime carapace`) and runc-style callers can drive it.
/// `check` tells whether this host can run sandboxes, `env` prints the configuration.
#[derive(Debug, Parser)]
#[command(name = "carapace", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct Global {
    /// Directory for sandbox state (default: runtime.state_dir, /run/carapace).
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Write the runtime's log to FILE instead of stderr.
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// Configuration file (default: $CARAPACE_CONFIG, else /etc/carapace/configuration.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Log at debug level whatever the configuration says.
    #[arg(long, global = true)]
    pub(crate) debug: bool,
    /// Testing only: run containers on this host through `AGENT --host-mode` instead of in
    /// a VM (no isolation). Lets the runtime be exercised where KVM cannot boot guests.
    #[arg(long, global = true, hide = true, value_name = "AGENT")]
    pub(crate) host_agent: Option<PathBuf>,
    /// Accepted for runc compatibility; ignored (there is no systemd cgroup on the host
    /// side: cgroups live in the guest).
    #[arg(long, global = true, hide = true)]
    pub(crate) systemd_cgroup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
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
    /// rootfs, created, owner, annotations). pid is the host pid of the init's keeper,
    /// which lives as long as the container's init.
    State {
        /// Container id.
        id: String,
    },
    /// Freeze every process of a running container (the guest's cgroup freezer; its VM
    /// keeps running). `state` then says paused.
    Pause {
        /// Container id.
        id: String,
    },
    /// Thaw a paused container.
    Resume {
        /// Container id.
        id: String,
    },
    /// Change a container's resource limits (OCI linux.resources): the VM grows or
    /// shrinks for them where it can, then the guest's cgroup is updated.
    Update(UpdateArgs),
    /// Print a running container's statistics (and OOM kills) as JSON events, one per
    /// line, until it stops; with --stats, one statistics event.
    Events {
        /// Container id.
        id: String,
        /// Print one statistics event and exit.
        #[arg(long)]
        stats: bool,
        /// Time between statistics events (e.g. 5s, 500ms, 1m).
        #[arg(long, default_value = "5s", value_parser = parse_interval)]
        interval: std::time::Duration,
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
    /// Run a new process in a running container and exit with its status (with --detach,
    /// return once it started).
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
    /// virtualization, guest image present, VMM and fs daemon present, the VMM jail
    /// possible with free ids. Prints a fix for each failure; exits non-zero if any check
    /// fails.
    Check {
        /// Output format.
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Print the effective configuration (TOML) and where it came from.
    Env,
    /// Register Carapace with the node's containerd for CRI (Kubernetes): write a drop-in
    /// holding the node's CRI section with a handler (RuntimeClass `handler`) whose pods
    /// run in Carapace VMs built from this configuration (--config), and add it to the
    /// main file's `imports`. containerd 1.6 replaces a whole plugin section with an
    /// imported one, so run this again after changing containerd's CRI settings. Restart
    /// containerd afterwards. With --remove, take both out again.
    ContainerdConfig(ContainerdConfigArgs),
    /// Internal: the keeper of a container process (started by create and exec
    /// --detach): relays its stdio, forwards signals to it, exits with its status.
    #[command(name = "__keep", hide = true)]
    Keep(KeepArgs),
    /// Internal: a keeper's guard (started by the keeper): kills the keeper's container
    /// process if the keeper is killed.
    #[command(name = "__guard", hide = true)]
    Guard {
        /// Container id.
        id: String,
        /// The exec'd process guarded (none: the init).
        #[arg(long, value_name = "EXEC_ID")]
        exec: Option<String>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ContainerdConfigArgs {
    /// containerd's main configuration file (created with `version = 2` if missing).
    #[arg(long, value_name = "FILE", default_value = carapace_runtime::containerd_config::DEFAULT_MAIN)]
    pub(crate) containerd_config: PathBuf,
    /// The drop-in file to write.
    #[arg(long, value_name = "FILE", default_value = carapace_runtime::containerd_config::DEFAULT_DROP_IN)]
    pub(crate) drop_in: PathBuf,
    /// The CRI handler name (a RuntimeClass's `handler`).
    #[arg(long, default_value = "carapace")]
    pub(crate) handler: String,
    /// Remove the drop-in and its import instead.
    #[arg(long)]
    pub(crate) remove: bool,
    /// Print what would be written; change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    /// Container id.
    pub(crate) id: String,
    /// The OCI linux.resources object (JSON) from FILE, or `-` for stdin (what
    /// containerd's runc shim passes); the flags below change fields of it.
    #[arg(short = 'r', long, value_name = "FILE")]
    pub(crate) resources: Option<PathBuf>,
    /// Memory limit in bytes (suffixes k, m, g accepted).
    #[arg(long, value_name = "BYTES")]
    pub(crate) memory: Option<String>,
    /// Memory soft limit in bytes (suffixes k, m, g accepted).
    #[arg(long, value_name = "BYTES")]
    pub(crate) memory_reservation: Option<String>,
    /// Memory plus swap limit in bytes (suffixes k, m, g accepted; -1: unlimited).
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    pub(crate) memory_swap: Option<String>,
    /// CPU CFS period (microseconds).
    #[arg(long, value_name = "US")]
    pub(crate) cpu_period: Option<u64>,
    /// CPU CFS quota (microseconds; -1: none).
    #[arg(long, value_name = "US", allow_hyphen_values = true)]
    pub(crate) cpu_quota: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long = "cpu-share", value_name = "SHARES")]
    pub(crate) cpu_shares: Option<u64>,
    /// Maximum number of processes (-1 or 0: unlimited).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub(crate) pids_limit: Option<i64>,
    /// Block IO weight (10-1000).
    #[arg(long, value_name = "WEIGHT")]
    pub(crate) blkio_weight: Option<u16>,
}

#[derive(Debug, Args)]
pub(crate) struct KeepArgs {
    /// Container id.
    pub(crate) id: String,
    /// Keep this exec'd process (started by the keeper from --process) instead of the
    /// init.
    #[arg(long, value_name = "EXEC_ID", requires = "process")]
    pub(crate) exec: Option<String>,
    /// The exec'd process's OCI process file (read and removed by the keeper).
    #[arg(long, value_name = "FILE", requires = "exec")]
    pub(crate) process: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Container id.
    pub(crate) id: String,
    /// Bundle directory (holding config.json).
    #[arg(long, short = 'b', default_value = ".")]
    pub(crate) bundle: PathBuf,
    /// Write the container's pid to FILE: a host process (the init's keeper) that lives
    /// as long as the container's init, exits with its status and forwards the signals it
    /// gets to it (`run` in the foreground: the pid of `run` itself).
    #[arg(long, value_name = "FILE")]
    pub(crate) pid_file: Option<PathBuf>,
    /// Unix socket to send the container terminal's master fd to (runc's protocol, used
    /// by podman/conmon for `-t`); the spec must have process.terminal = true.
    #[arg(long, value_name = "SOCKET")]
    pub(crate) console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility; ignored (the guest agent sets up the rootfs).
    #[arg(long, hide = true)]
    pub(crate) no_pivot: bool,
    /// Accepted for runc compatibility; ignored.
    #[arg(long, hide = true)]
    pub(crate) no_new_keyring: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) create: CreateArgs,
    /// Return once the container started; its stdio is relayed in the background (or
    /// through --console-socket's terminal).
    #[arg(long, short = 'd')]
    pub(crate) detach: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Container id.
    pub(crate) id: String,
    /// Allocate a terminal for the process.
    #[arg(short = 't', long)]
    pub(crate) tty: bool,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub(crate) env: Vec<String>,
    /// Working directory in the container.
    #[arg(long)]
    pub(crate) cwd: Option<String>,
    /// Take the whole OCI process object from this JSON file (overrides the command).
    #[arg(short = 'p', long, value_name = "FILE")]
    pub(crate) process: Option<PathBuf>,
    /// Do not wait: start the process and return; a keeper process relays its stdio and
    /// exits with its status.
    #[arg(short = 'd', long)]
    pub(crate) detach: bool,
    /// Write the process's pid to FILE: a host process that lives as long as the
    /// process, exits with its status and forwards the signals it gets to it (with
    /// --detach its keeper, else this command). Never a guest pid.
    #[arg(long, value_name = "FILE")]
    pub(crate) pid_file: Option<PathBuf>,
    /// Unix socket to send the process terminal's master fd to (runc's protocol); the
    /// process must have a terminal (-t, or terminal: true in --process).
    #[arg(long, value_name = "SOCKET")]
    pub(crate) console_socket: Option<PathBuf>,
    /// Run as UID[:GID] (numeric).
    #[arg(short = 'u', long, value_name = "UID[:GID]")]
    pub(crate) user: Option<String>,
    /// An additional group id; repeatable.
    #[arg(short = 'g', long = "additional-gids", value_name = "GID")]
    pub(crate) additional_gids: Vec<u32>,
    /// Add a capability (CAP_NET_ADMIN or NET_ADMIN) to the process's bounding, effective
    /// and permitted sets; repeatable.
    #[arg(short = 'c', long = "cap", value_name = "CAP")]
    pub(crate) caps: Vec<String>,
    /// Set no_new_privs for the process.
    #[arg(long)]
    pub(crate) no_new_privs: bool,
    /// Pass N more descriptors: refused unless 0 (a VM cannot get host descriptors).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) preserve_fds: u32,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) command: Vec<String>,
}

/// An interval as runc takes it: a number with a unit (ms, s, m, h).
fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (num, unit_ms) = [("ms", 1u64), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
        .iter()
        .find_map(|(suffix, ms)| t.strip_suffix(suffix).map(|n| (n, *ms)))
        .ok_or_else(|| format!("{text:?}: give a unit (ms, s, m or h), e.g. 5s"))?;
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: not a whole number of {num:?}"))?;
    let ms = n.saturating_mul(unit_ms);
    if ms == 0 {
        return Err(format!("{text:?}: the interval must be positive"));
    }
    Ok(std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_with_their_units() {
        assert_eq!(parse_interval("5s").unwrap().as_secs(), 5);
        assert_eq!(parse_interval("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_interval("2m").unwrap().as_secs(), 120);
        assert!(parse_interval("5").unwrap_err().contains("unit"));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("xs").is_err());
    }
}
