//! The command line: global options, commands and their arguments (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Carapace: run OCI containers, each inside its own lightweight KVM virtual machine.
///
/// The commands follow runc's (create, start, state, kill, delete, run, exec, ps, list,
/// features, spec), so podman (`--runtime carapace`) and runc-style callers can drive it.
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
pub(crate) struct CreateArgs {
    /// Container id.
    pub(crate) id: String,
    /// Bundle directory (holding config.json).
    #[arg(long, short = 'b', default_value = ".")]
    pub(crate) bundle: PathBuf,
    /// Write the container's pid (the VMM's host pid) to FILE.
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
    /// Do not wait: start the process and return.
    #[arg(short = 'd', long)]
    pub(crate) detach: bool,
    /// Write the process's guest pid to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) pid_file: Option<PathBuf>,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) command: Vec<String>,
}
