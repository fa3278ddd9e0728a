//! carapace-fsd: virtio-fs vhost-user backend. See README.md.

use std::path::PathBuf;
use std::process::ExitCode;

use carapace_fsd::config::{CacheMode, FsConfig, SandboxMode};
use carapace_fsd::daemon::{self, DaemonError, DaemonOptions};
use clap::Parser;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Serve one host directory to a VM over virtio-fs (vhost-user backend).
///
/// The daemon listens on --socket-path, serves one VMM connection, and exits when the VMM
/// disconnects. By default it confines itself (own mount namespace with the shared dir
/// as its root, seccomp allow-list, no_new_privs, capabilities reduced to file ownership
/// ones), which needs root; use --sandbox none to run unprivileged.
///
/// Exit codes: 0 clean exit, 2 usage, 3 shared dir missing or not a directory,
/// 4 permission denied, 5 socket error (in use, directory missing), 6 sandbox failure,
/// 7 cannot open the shared dir for serving, 8 vhost-user failure.
#[derive(Debug, Parser)]
#[command(name = "carapace-fsd", version)]
struct Args {
    /// vhost-user UNIX socket to listen on (a stale one is replaced, a live one is an error).
    #[arg(long, alias = "socket", value_name = "PATH")]
    socket_path: PathBuf,

    /// Directory to share with the guest.
    #[arg(long, value_name = "DIR")]
    shared_dir: PathBuf,

    /// Guest caching: never (always ask the host), auto (1 s metadata), always (long-lived).
    #[arg(long, value_enum, default_value = "auto")]
    cache: CacheMode,

    /// How the daemon confines itself.
    #[arg(long, value_enum, default_value = "namespace")]
    sandbox: SandboxMode,

    /// Export read-only: every modification fails with EROFS.
    #[arg(long)]
    readonly: bool,

    /// Worker threads for requests (0: handle requests on the queue thread).
    #[arg(long, default_value_t = 0, value_name = "N")]
    thread_pool_size: usize,

    /// Log level: error, warn, info, debug, trace or off, or per-target directives such as
    /// `warn,carapace_fsd=debug`.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: String,

    /// Disable extended attributes.
    #[arg(long)]
    no_xattr: bool,

    /// Let the guest use a writeback cache (only with --cache auto or always).
    #[arg(long)]
    writeback: bool,

    /// The shape of the shared directory: `plain` (any directory) or `sandbox` (a Carapace
    /// sandbox's: `<cid>/rootfs` trees may hold setuid files, `<cid>/mounts/*` may not).
    #[arg(long, value_enum, default_value = "plain")]
    layout: LayoutArg,

    /// Let the guest set setuid/setgid bits and `security.capability` everywhere (by
    /// default: only in `<cid>/rootfs` trees of a sandbox layout; elsewhere the bits are
    /// stripped from chmod/create modes and cleared by writes, and the xattr is refused).
    #[arg(long)]
    allow_setid: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LayoutArg {
    Plain,
    Sandbox,
}

fn main() -> ExitCode {
    // Before any thread exists (see carapace-footprint).
    carapace_footprint::one_malloc_arena();
    let args = Args::parse();
    // `Targets` (target=level directives), not `EnvFilter`: the same syntax for what we
    // need without the regex engine (~260 KB of code) in the daemon.
    let filter: Targets = match args.log_level.parse() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("carapace-fsd: --log-level {:?}: {e}", args.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::registry()
        // The daemon's log is a file under /run, and guests cause some of its lines: capped.
        .with(
            tracing_subscriber::fmt::layer().with_writer(std::sync::Mutex::new(
                carapace_footprint::logcap::CappedWriter::new(
                    std::io::stderr(),
                    carapace_footprint::logcap::DEFAULT_LOG_CAP,
                    "carapace-fsd",
                ),
            )),
        )
        .with(filter)
        .init();

    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carapace-fsd: error: {}", carapace_errors::Chain(&e));
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

fn run(args: &Args) -> Result<(), DaemonError> {
    let mut fs = FsConfig::new(
        &args.shared_dir,
        args.cache,
        args.readonly,
        !args.no_xattr,
        args.writeback,
        args.thread_pool_size,
    )?;
    fs.layout = match args.layout {
        LayoutArg::Plain => carapace_fsd::zones::Layout::Plain,
        LayoutArg::Sandbox => carapace_fsd::zones::Layout::Sandbox,
    };
    fs.allow_setid = args.allow_setid;
    daemon::run(&DaemonOptions {
        socket_path: args.socket_path.clone(),
        fs,
        sandbox: args.sandbox,
    })
}
