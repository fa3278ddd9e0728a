//! carapace-fsd: virtio-fs vhost-user backend. See README.md.

use std::path::PathBuf;
use std::process::ExitCode;

use carapace_fsd::config::{CacheMode, FsConfig, SandboxMode};
use carapace_fsd::daemon::{self, DaemonError, DaemonOptions};
use carapace_idmap::IdMap;
use clap::{CommandFactory, Parser};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Serve one host directory to a VM over virtio-fs (vhost-user backend).
///
/// The daemon listens on --socket-path, serves one VMM connection, and exits when the VMM
/// disconnects. By default it confines itself (own mount namespace with the shared dir
/// as its root, seccomp allow-list, no_new_privs, capabilities reduced to file ownership
/// ones), which needs root; use --sandbox none to run unprivileged. With --idmap it
/// serves as root of a block of host ids instead of as host root.
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

    /// Serve as root of the id block BASE:COUNT (decimal host ids BASE .. BASE+COUNT-1):
    /// host uid and gid BASE, capabilities only over files whose ids are in the block.
    ///
    /// The daemon makes a user namespace mapping its ids 0 .. COUNT-1 to host ids
    /// BASE .. BASE+COUNT-1 (uids and gids) while it is still root, sets up the namespace
    /// sandbox as root, then joins that user namespace as its root and drops capabilities
    /// as usual. Only with --sandbox namespace (needs root at start).
    ///
    /// The served tree must consist of idmapped mounts with the same mapping (an id n on
    /// disk shows as host id BASE+n), so the guest sees and writes the ids on disk. What
    /// does not work: ids >= COUNT (creating or chowning as them fails with EINVAL; files
    /// owned by them show as 65534 and are used through their "other" permission bits),
    /// trusted.* xattrs (EPERM), device nodes (EPERM; refused anyway). Directories of the
    /// shared dir that are not on such a mount (host root's) show as 65534:65534 and are
    /// reachable only through their "other" permission bits, read-only.
    #[arg(long, value_name = "BASE:COUNT", value_parser = parse_idmap)]
    idmap: Option<IdMap>,

    /// Let the guest set setuid/setgid bits and `security.capability` everywhere (by
    /// default: only in `<cid>/rootfs` trees of a sandbox layout; elsewhere the bits are
    /// stripped from chmod/create modes and cleared by writes, and the xattr is refused).
    #[arg(long)]
    allow_setid: bool,
}

fn parse_idmap(s: &str) -> Result<IdMap, String> {
    IdMap::parse(s).map_err(|e| e.to_string())
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
    if args.idmap.is_some() && args.sandbox == SandboxMode::None {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--idmap needs --sandbox namespace (it cannot be used with --sandbox none)",
            )
            .exit();
    }
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
        idmap: args.idmap,
    })
}
