//! `carapace-image`: build and check the Carapace guest image. See README.md.

use anyhow::Context as _;
use carapace_image::agent::AgentError;
use carapace_image::image::{self, BuildOptions, ImageError};
use carapace_image::kernel::KernelError;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Builds and checks the Carapace guest image: a minimal Linux kernel (PVH vmlinux built
/// from Debian's linux-source package plus our config fragment) and an initramfs whose
/// /init is the statically linked carapace-agent.
#[derive(Debug, Parser)]
#[command(name = "carapace-image", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the kernel and initramfs (through the cache) and install them.
    ///
    /// The kernel is cached by (source package version, fragment hash) and the initramfs
    /// by the agent binary's hash, so unchanged inputs rebuild nothing and an agent change
    /// rebuilds only the initramfs. A cold kernel build takes 5 to 20 minutes on 2 cores,
    /// depending on load.
    /// Exit codes: 3 kernel source package missing, 4 disk full, 5 kernel build failed,
    /// 6 agent build or agent binary invalid, 1 anything else.
    Build {
        /// Where to install vmlinux, initramfs.cpio.gz and image.json.
        #[arg(long, default_value = image::DEFAULT_OUT_DIR)]
        out_dir: PathBuf,
        /// Build cache (kernel trees, logs, images keyed by content).
        #[arg(long, default_value = image::DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Use this prebuilt static agent instead of building carapace-agent with cargo.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Carapace source tree to build the agent in (default: the workspace containing
        /// the current directory).
        #[arg(long, conflicts_with = "agent")]
        workspace: Option<PathBuf>,
        /// Debian kernel source package providing /usr/src/<package>.tar.xz.
        #[arg(long, default_value = image::DEFAULT_SOURCE_PACKAGE)]
        source_package: String,
        /// Kernel config fragment (default: the one compiled into this binary,
        /// guest-image/kernel/carapace.fragment).
        #[arg(long)]
        fragment: Option<PathBuf>,
        /// Parallel compile jobs for the kernel build (default: number of CPUs).
        #[arg(long, short)]
        jobs: Option<usize>,
        /// Rebuild the kernel and initramfs even if the cache has them.
        #[arg(long)]
        force: bool,
    },
    /// Validate a kernel and initramfs and print their identity.
    ///
    /// Checks that the kernel is an x86-64 ELF with the PVH entry note and a sane size,
    /// and that the initramfs is a (gzip) newc archive whose /init is a static executable,
    /// with /dev/console. Exit code 7 when a check fails.
    Check {
        /// Kernel to check.
        #[arg(long, default_value_t = format!("{}/{}", image::DEFAULT_OUT_DIR, image::KERNEL_FILE))]
        kernel: String,
        /// Initramfs to check.
        #[arg(long, default_value_t = format!("{}/{}", image::DEFAULT_OUT_DIR, image::INITRAMFS_FILE))]
        initrd: String,
    },
}

fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        let kernel = cause.downcast_ref::<KernelError>().or_else(|| {
            match cause.downcast_ref::<ImageError>() {
                Some(ImageError::Kernel(k)) => Some(k),
                _ => None,
            }
        });
        match kernel {
            Some(
                KernelError::SourceNotInstalled { .. } | KernelError::SourceTarballMissing { .. },
            ) => {
                return 3;
            }
            Some(KernelError::DiskFull { .. }) => return 4,
            Some(_) => return 5,
            None => {}
        }
        if cause.downcast_ref::<AgentError>().is_some()
            || matches!(
                cause.downcast_ref::<ImageError>(),
                Some(ImageError::Agent(_))
            )
        {
            return 6;
        }
    }
    1
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Build {
            out_dir,
            cache_dir,
            agent,
            workspace,
            source_package,
            fragment,
            jobs,
            force,
        } => {
            let jobs = jobs.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            });
            let r = image::build(&BuildOptions {
                out_dir,
                cache_dir,
                agent,
                workspace,
                source_package,
                fragment,
                jobs,
                force,
            })?;
            let m = &r.manifest;
            println!(
                "kernel     {} ({} bytes, {}) id {}",
                r.kernel.display(),
                m.kernel_bytes,
                if r.kernel_cached { "cached" } else { "built" },
                m.kernel_id
            );
            println!(
                "initramfs  {} ({} bytes, {}) id {}",
                r.initramfs.display(),
                m.initramfs_bytes,
                if r.initramfs_cached {
                    "cached"
                } else {
                    "built"
                },
                m.initramfs_id
            );
            Ok(())
        }
        Cmd::Check { kernel, initrd } => check(PathBuf::from(kernel), PathBuf::from(initrd)),
    }
}

/// Failure of `check` (exit code 7), wrapping what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("image check failed")]
struct CheckFailed(#[source] ImageError);

fn check(kernel: PathBuf, initrd: PathBuf) -> anyhow::Result<()> {
    let k = image::check_kernel(&kernel).map_err(CheckFailed)?;
    let i = image::check_initramfs(&initrd).map_err(CheckFailed)?;
    println!("kernel     {}", k.path.display());
    println!(
        "  size     {} bytes ({:.1} MiB)",
        k.bytes,
        k.bytes as f64 / 1048576.0
    );
    println!("  sha256   {}", k.sha256);
    println!("  PVH      entry {:#x}", k.pvh_entry);
    if let Some(b) = &k.banner {
        println!("  banner   {b}");
    }
    println!("initramfs  {}", i.path.display());
    println!(
        "  size     {} bytes compressed, {} uncompressed",
        i.bytes, i.contents.uncompressed_bytes
    );
    println!("  sha256   {}", i.sha256);
    println!(
        "  /init    static, {} bytes, sha256 {}",
        i.contents.init_bytes, i.contents.init_sha256
    );
    println!("  entries  {}", i.contents.entries.join(" "));
    let dir = kernel.parent().unwrap_or(std::path::Path::new("."));
    match image::read_manifest(dir).context("reading the image manifest")? {
        Some(m) if m.kernel_sha256 == k.sha256 && m.initramfs_sha256 == i.sha256 => {
            println!(
                "identity   (from {}/{})",
                dir.display(),
                image::MANIFEST_FILE
            );
            println!(
                "  kernel   {} {} fragment sha256 {} (id {})",
                m.kernel_key.source_package,
                m.kernel_key.source_version,
                m.kernel_key.fragment_sha256,
                m.kernel_id
            );
            println!(
                "  agent    sha256 {} (initramfs id {})",
                m.initramfs_key.agent_sha256, m.initramfs_id
            );
        }
        Some(_) => println!(
            "identity   {}/{} does not describe these files (stale or other image)",
            dir.display(),
            image::MANIFEST_FILE
        ),
        None => println!("identity   no {} beside the kernel", image::MANIFEST_FILE),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carapace-image: error: {e:#}");
            let code = if e.chain().any(|c| c.downcast_ref::<CheckFailed>().is_some()) {
                7
            } else {
                exit_code(&e)
            };
            ExitCode::from(code)
        }
    }
}
