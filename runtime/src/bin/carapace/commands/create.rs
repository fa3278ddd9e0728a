//! `create`: boot the sandbox VM and create the container in it; a background keeper
//! (`__keep`, [`carapace_runtime::keeper`]) stands for the container's init: it relays its
//! stdio (or the console socket's terminal), exits with its status, and its pid is the
//! one `--pid-file` gets.

use anyhow::bail;
use carapace_runtime::agent::Session;
use carapace_runtime::console;
use carapace_runtime::keeper::{self, KeeperStdio};
use carapace_runtime::oci::Bundle;
use carapace_runtime::process::ProcessRecord;
use carapace_runtime::sandbox::Runtime;
use carapace_runtime::state::SandboxState;

use super::{reexec_keeper, write_pid_file};
use crate::cli::{CreateArgs, Global};

/// Creates the container (with its keeper when `keep`: otherwise the caller streams the
/// init itself and stands for it); returns its state and the session to its agent. On
/// error nothing is left.
pub(super) async fn create(
    g: &Global,
    rt: &Runtime,
    a: &CreateArgs,
    keep: bool,
) -> anyhow::Result<(SandboxState, Session)> {
    let bundle = Bundle::load(&a.bundle)?;
    if let Some(sock) = &a.console_socket
        && bundle
            .spec
            .pointer("/process/terminal")
            .and_then(|t| t.as_bool())
            != Some(true)
    {
        bail!(
            "--console-socket {} given but process.terminal is not true in {}",
            sock.display(),
            bundle.spec_path.display()
        );
    }
    let (st, session) = rt.create(&a.id, &bundle).await?;
    let finish = || -> anyhow::Result<()> {
        let pid = if keep {
            let stdio = match &a.console_socket {
                Some(sock) => KeeperStdio::Terminal(console::hand_off(sock)?),
                None => KeeperStdio::Inherit,
            };
            let mut cmd = reexec_keeper(g, rt, &a.id)?;
            cmd.arg("__keep").arg(&a.id);
            keeper::spawn_init_keeper(rt, &a.id, cmd, stdio)?.pid
        } else {
            // `run` in the foreground: this process streams the init and exits with its
            // status.
            i32::try_from(std::process::id()).unwrap_or(0)
        };
        if let Some(p) = &a.pid_file {
            write_pid_file(p, pid)?;
        }
        if !keep {
            // ... and is the init's keeper until it deletes the container itself (last:
            // a failed create's delete must not stop this very process)
            let me = ProcessRecord::of(pid);
            rt.store.update(&a.id, |st| st.io_relay = me)?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        if let Err(d) = rt.delete(&a.id, true, Some(&session)).await {
            return Err(e.context(format!("cleanup after the failure also failed: {d}")));
        }
        return Err(e);
    }
    Ok((st, session))
}
