//! Carapace guest agent library. See README.md.

pub mod cgroup;
pub mod console;
pub mod core;
pub mod cpus;
pub mod ids;
pub mod init;
pub mod listen;
pub mod memory;
pub mod namespaces;
pub mod network;
pub mod oom;
pub mod pid1;
pub mod process;
pub mod reaper;
pub mod seccomp;
pub mod service;
pub mod start_hooks;
pub mod stream;
pub mod sys;

use std::sync::Arc;

/// Serves the agent API on `addr` (`vsock://-1:1023`, `unix:///path`) until the sandbox is
/// destroyed (in the guest) or SIGINT; returns why it stopped.
pub async fn serve(
    addr: &str,
    config: core::Config,
    on_listening: impl FnOnce(),
) -> anyhow::Result<core::ShutdownKind> {
    use anyhow::Context;
    if let Some(path) = addr.strip_prefix("unix://") {
        // A stale socket from a previous run would make bind fail.
        let _ = std::fs::remove_file(path);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mode = config.mode;
    let grace = config.stop_grace;
    // Before serving, so that no SIGINT is lost once requests can start containers.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let core = core::Core::new(config, tx).context("starting the reaper")?;
    let svc = service::AgentService::new(core.clone());
    let stopper = core;
    // On vsock only the host may connect (see listen.rs); unix sockets are host mode.
    let listener = match listen::vsock_port(addr) {
        Some(port) => ttrpc::r#async::transport::Listener::new(
            listen::host_only(port).with_context(|| format!("listening on {addr}"))?,
        ),
        None => ttrpc::r#async::transport::Listener::bind(addr)
            .with_context(|| format!("listening on {addr}"))?,
    };
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener)
        .register_service(carapace_protocol::agent_ttrpc::create_agent(Arc::new(svc)));
    server.start().await.context("starting the ttrpc server")?;
    tracing::info!(%addr, "serving");
    on_listening();
    let why = tokio::select! {
        why = rx.recv() => why.unwrap_or(core::ShutdownKind::PowerOff),
        _ = sigint.recv() => {
            // In the guest this is Ctrl-Alt-Del (the VMM asking for a shutdown): the
            // kernel sends SIGINT to PID 1 since the agent disabled its hard restart.
            let line = format!(
                "carapace-agent: SIGINT (Ctrl-Alt-Del): orderly shutdown, containers get {} ms after SIGTERM",
                grace.as_millis()
            );
            match mode {
                core::Mode::Guest => pid1::console_line(&line),
                core::Mode::Host => tracing::info!("{line}"),
            }
            stopper.stop_all().await;
            if mode == core::Mode::Guest {
                stopper.unmount_shares();
            }
            core::ShutdownKind::Interrupted
        }
    };
    // Let the reply to the DestroySandbox that asked for the power-off go out first.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let _ = server.shutdown().await;
    Ok(why)
}
