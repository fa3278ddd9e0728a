//! carapace-vmm: boots a Carapace guest on KVM. See vmm/README.md.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use carapace_vmm::config::{
    BlockConfig, FsConfig, MemoryHotplug, NetConfig, SerialOutput, VmConfig, VsockConfig,
};
use carapace_vmm::exit::{EXIT_CONFIG, EXIT_VMM};
use carapace_vmm::seccomp;
use carapace_vmm::vmm::{RunOptions, Vm};
use clap::Parser;

/// Boot a Carapace microVM (PVH vmlinux or bzImage) on KVM with virtio-mmio devices.
///
/// The VM is described by a JSON or TOML file (`--config`, `-` for JSON on stdin); flags
/// override or extend it. Without `--config`, `--kernel` is required.
///
/// Exit codes: 0 guest powered off (or API shutdown), 1 VMM error, 2 invalid configuration,
/// 3 KVM missing or unable to run Linux (e.g. a software KVM), 4 unusable kernel/initrd,
/// 32 guest reboot, 33 guest triple fault, 34 guest could not be run.
#[derive(Debug, Parser)]
#[command(name = "carapace-vmm", version, about, long_about)]
struct Cli {
    /// VM description file (JSON, or TOML when it ends in .toml); `-` reads JSON from stdin.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Read the stdin description as TOML instead of JSON.
    #[arg(long)]
    stdin_toml: bool,
    /// Guest kernel: PVH ELF vmlinux (preferred) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initrd / initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command line (appended to the VMM's own arguments).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Serial console output: `stdout`, `none`, `file:PATH` or `fd:N`.
    #[arg(long, value_parser = parse_serial)]
    serial: Option<SerialOutput>,
    /// Hybrid vsock: the host unix socket (`CONNECT <port>\n`); guest connections to port P
    /// go to `<PATH>_P`.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest CID for vsock.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// virtio-blk device from a raw image: `PATH` or `PATH,ro` (repeatable).
    #[arg(long, value_parser = parse_block)]
    block: Vec<BlockConfig>,
    /// virtio-fs through a vhost-user backend: `TAG=SOCKET` (repeatable); guest memory is
    /// then memfd-backed and shared with the backend.
    #[arg(long, value_parser = parse_fs)]
    fs: Vec<FsConfig>,
    /// Attach a virtio-rng device.
    #[arg(long)]
    rng: bool,
    /// Attach a virtio-balloon device for free page reporting: memory the guest frees is
    /// given back to the host.
    #[arg(long)]
    free_page_reporting: bool,
    /// virtio-net on a host tap: `tap=NAME[,mac=MAC]` (attach to or create the tap) or
    /// `fd=N[,mac=MAC]` (an open tap descriptor, IFF_TAP|IFF_NO_PI), either with
    /// `,vhost=on` to move frames through /dev/vhost-net (repeatable).
    #[arg(long, value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// Control API unix socket (JSON lines: info, metrics, pause, resume, shutdown,
    /// memory).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Memory hot-plug through virtio-mem: `REGION_MIB[,block=BLOCK_MIB]` (a region of
    /// REGION_MIB above RAM, plugged in blocks of BLOCK_MIB, default 2, as the API's
    /// `memory` request asks).
    #[arg(long, value_parser = parse_memory_hotplug, value_name = "REGION_MIB[,block=MIB]")]
    memory_hotplug: Option<MemoryHotplug>,
    /// Lab workaround (default 0, off): interrupt a vCPU that stayed inside KVM_RUN this
    /// long, so a timer interrupt lost by an emulated host CPU cannot leave it halted.
    #[arg(long, value_name = "MS")]
    vcpu_nudge_ms: Option<u32>,
    /// Lab workaround (default 0, off): device workers re-serve their rings and re-raise an
    /// unacknowledged interrupt every MS milliseconds.
    #[arg(long, value_name = "MS")]
    irq_rescue_ms: Option<u32>,
    /// Print the effective VM description as JSON and exit.
    #[arg(long)]
    print_config: bool,
}

fn parse_serial(s: &str) -> Result<SerialOutput, String> {
    match s {
        "stdout" => Ok(SerialOutput::Stdout),
        "none" => Ok(SerialOutput::None),
        _ => {
            if let Some(p) = s.strip_prefix("file:") {
                Ok(SerialOutput::File(p.into()))
            } else if let Some(n) = s.strip_prefix("fd:") {
                n.parse()
                    .map(SerialOutput::Fd)
                    .map_err(|e| format!("bad fd: {e}"))
            } else {
                Err("expected stdout, none, file:PATH or fd:N".into())
            }
        }
    }
}

fn parse_memory_hotplug(s: &str) -> Result<MemoryHotplug, String> {
    let mut parts = s.split(',');
    let region = parts.next().unwrap_or_default();
    let region_mib = region
        .parse()
        .map_err(|e| format!("region {region:?}: {e}"))?;
    let mut block_mib = 2;
    for p in parts {
        let v = p
            .strip_prefix("block=")
            .ok_or_else(|| format!("unknown option {p:?} (expected block=MIB)"))?;
        block_mib = v.parse().map_err(|e| format!("block {v:?}: {e}"))?;
    }
    Ok(MemoryHotplug {
        region_mib,
        block_mib,
    })
}

fn parse_block(s: &str) -> Result<BlockConfig, String> {
    let (path, ro) = match s.strip_suffix(",ro") {
        Some(p) => (p, true),
        None => (s, false),
    };
    if path.is_empty() {
        return Err("empty path".into());
    }
    Ok(BlockConfig {
        path: path.into(),
        read_only: ro,
    })
}

fn parse_fs(s: &str) -> Result<FsConfig, String> {
    let (tag, sock) = s.split_once('=').ok_or("expected TAG=SOCKET")?;
    Ok(FsConfig {
        socket: sock.into(),
        tag: tag.into(),
        request_queues: 1,
    })
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut n = NetConfig {
        tap: None,
        tap_fd: None,
        mac: None,
        vhost: false,
    };
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", v)) => n.tap = Some(v.into()),
            Some(("fd", v)) => {
                n.tap_fd = Some(v.parse().map_err(|e| format!("bad fd {v:?}: {e}"))?)
            }
            Some(("mac", v)) => n.mac = Some(v.into()),
            Some(("vhost", "on")) => n.vhost = true,
            Some(("vhost", "off")) => n.vhost = false,
            _ => {
                return Err(format!(
                    "unknown part {part:?}; expected tap=NAME or fd=N, mac=MAC, vhost=on|off"
                ));
            }
        }
    }
    Ok(n)
}

/// Set (to anything) by the KVM lab (`tests/lab/run`) for every process inside a lab
/// machine: the lab's emulated CPU loses interrupts and timer wake-ups of nested guests
/// (tests/README.md, "Choosing the lab"), so every VMM there turns on both lab workarounds
/// unless its description chose otherwise. Never set anywhere else.
const LAB_WORKAROUNDS_ENV: &str = "CARAPACE_LAB_WORKAROUNDS";

/// The period both lab workarounds get inside the lab.
const LAB_WORKAROUND_MS: u32 = 1000;

/// Inside the lab, turns the workarounds on where the description left them off.
fn lab_workarounds(c: &mut VmConfig, in_lab: bool) {
    if !in_lab {
        return;
    }
    if c.irq_rescue_ms == 0 {
        c.irq_rescue_ms = LAB_WORKAROUND_MS;
    }
    if c.vcpu_nudge_ms == 0 {
        c.vcpu_nudge_ms = LAB_WORKAROUND_MS;
    }
    tracing::warn!(
        irq_rescue_ms = c.irq_rescue_ms,
        vcpu_nudge_ms = c.vcpu_nudge_ms,
        "{LAB_WORKAROUNDS_ENV} is set (the KVM lab): lab workarounds on"
    );
}

fn build_config(cli: Cli) -> anyhow::Result<(VmConfig, bool)> {
    let mut c = match (&cli.config, &cli.kernel) {
        (Some(p), _) => VmConfig::load(p, cli.stdin_toml)?,
        (None, Some(k)) => VmConfig::with_kernel(k),
        (None, None) => anyhow::bail!("no VM description: pass --config FILE or --kernel PATH"),
    };
    if let Some(k) = cli.kernel {
        c.kernel = k;
    }
    if cli.initrd.is_some() {
        c.initrd = cli.initrd;
    }
    if let Some(s) = cli.cmdline {
        c.cmdline = s;
    }
    if let Some(m) = cli.memory_mib {
        c.memory_mib = m;
    }
    if let Some(v) = cli.vcpus {
        c.vcpus = v;
    }
    if let Some(s) = cli.serial {
        c.serial = s;
    }
    if let Some(u) = cli.vsock_uds {
        c.vsock = Some(VsockConfig {
            guest_cid: cli.vsock_cid,
            uds_path: u,
        });
    }
    c.block.extend(cli.block);
    c.fs.extend(cli.fs);
    c.rng |= cli.rng;
    c.free_page_reporting |= cli.free_page_reporting;
    c.net.extend(cli.net);
    if cli.api_socket.is_some() {
        c.api_socket = cli.api_socket;
    }
    if cli.memory_hotplug.is_some() {
        c.memory_hotplug = cli.memory_hotplug;
    }
    if let Some(ms) = cli.vcpu_nudge_ms {
        c.vcpu_nudge_ms = ms;
    }
    if let Some(ms) = cli.irq_rescue_ms {
        c.irq_rescue_ms = ms;
    }
    lab_workarounds(&mut c, std::env::var_os(LAB_WORKAROUNDS_ENV).is_some());
    c.validate()?;
    Ok((c, cli.print_config))
}

fn print_chain(e: &dyn std::error::Error) {
    eprintln!("carapace-vmm: error: {}", carapace_errors::Chain(e));
}

fn main() {
    let start = Instant::now();
    carapace_footprint::one_malloc_arena();
    // The VMM's log is a file under /run, and guests cause some of its lines: capped.
    tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(
            carapace_footprint::logcap::CappedWriter::new(
                std::io::stderr(),
                carapace_footprint::logcap::DEFAULT_LOG_CAP,
                "carapace-vmm",
            ),
        ))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let (config, print) = match build_config(cli) {
        Ok(c) => c,
        Err(e) => {
            print_chain(e.as_ref());
            std::process::exit(EXIT_CONFIG);
        }
    };
    if print {
        match serde_json::to_string_pretty(&config) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("carapace-vmm: {e}"),
        }
        return;
    }
    // Before any thread exists; a jailed VMM is its PID namespace's init (term.rs).
    if let Err(e) = carapace_vmm::term::install() {
        print_chain(&e);
        std::process::exit(EXIT_VMM);
    }
    // Every list is compiled now, before anything is created; each thread installs its
    // own (see vmm/src/seccomp).
    let seccomp = match seccomp::effective_action(&config.seccomp) {
        Ok(a) => a,
        Err(e) => {
            print_chain(&e);
            std::process::exit(EXIT_CONFIG);
        }
    };
    if let Err(e) = seccomp::configure(seccomp) {
        print_chain(&e);
        std::process::exit(EXIT_VMM);
    }
    let config_api = config.api_socket.clone();
    // Bound before the VM starts: a jailed VMM cannot reach the path afterwards.
    let api = match config.api_socket.as_deref().map(carapace_vmm::api::bind) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            print_chain(&e);
            std::process::exit(EXIT_VMM);
        }
    };
    let mut vm = match Vm::start(
        config,
        RunOptions {
            start,
            ..Default::default()
        },
    ) {
        Ok(vm) => vm,
        Err(e) => {
            print_chain(&e);
            if let Some(p) = &config_api {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(e.exit_code());
        }
    };
    if let Some(l) = api
        && let Err(e) = carapace_vmm::api::serve(vm.handle.clone(), l)
            .with_context(|| "control API".to_string())
    {
        print_chain(e.as_ref());
        std::process::exit(EXIT_VMM);
    }
    // From here the main thread only waits, stops the VM and cleans up.
    if let Err(e) = seccomp::install(seccomp::ThreadKind::Main) {
        print_chain(&e);
        std::process::exit(EXIT_VMM);
    }
    let reason = vm
        .wait(None)
        .unwrap_or(carapace_vmm::exit::ExitReason::PowerOff);
    tracing::info!(%reason, code = reason.code(), "VM stopped");
    // (A jailed VMM no longer sees these paths: its launcher removes them.)
    if vm.config.jail.is_none() {
        if let Some(p) = &vm.config.api_socket {
            let _ = std::fs::remove_file(p);
        }
        if let Some(v) = &vm.config.vsock {
            let _ = std::fs::remove_file(&v.uds_path);
        }
    }
    // vsock sockets are removed when the devices drop; exit without unwinding vCPU threads.
    drop(vm);
    std::process::exit(reason.code());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_workarounds_only_in_the_lab_and_never_over_a_chosen_value() {
        let mut c = VmConfig::with_kernel("/k");
        lab_workarounds(&mut c, false);
        assert_eq!((c.irq_rescue_ms, c.vcpu_nudge_ms), (0, 0));
        lab_workarounds(&mut c, true);
        assert_eq!((c.irq_rescue_ms, c.vcpu_nudge_ms), (1000, 1000));
        let mut c = VmConfig::with_kernel("/k");
        c.vcpu_nudge_ms = 250;
        lab_workarounds(&mut c, true);
        assert_eq!((c.irq_rescue_ms, c.vcpu_nudge_ms), (1000, 250));
    }
}
