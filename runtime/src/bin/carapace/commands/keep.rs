//! `__keep` and `__guard` (internal): the keeper of a container process and the keeper's
//! guard, each a re-execution of this binary; what they do is
//! [`carapace_runtime::keeper`]'s.

use carapace_runtime::keeper::{self, Guard, Keeping, Signals};
use carapace_runtime::sandbox::Runtime;

use super::{host_io, reexec};
use crate::cli::{Global, KeepArgs};

/// The keeper: exits with its process's status.
pub(super) async fn keep(g: &Global, rt: &Runtime, a: &KeepArgs) -> anyhow::Result<u8> {
    // Catch the signals first: one sent as soon as the caller read the pid is forwarded.
    let signals = Signals::catch()?;
    let exec = match (&a.exec, &a.process) {
        (Some(exec_id), Some(file)) => Some((
            exec_id,
            keeper::take_process_file(file)?,
            keeper::ready_fd_from_env()?,
        )),
        _ => None,
    };
    let mut cmd = reexec(g, rt)?;
    cmd.arg("__guard").arg(&a.id);
    if let Some(exec_id) = &a.exec {
        cmd.arg("--exec").arg(exec_id);
    }
    let keeping = Keeping {
        signals,
        guard: Some(Guard::spawn(cmd)?),
    };
    let exit = match exec {
        Some((exec_id, process, ready)) => {
            keeper::keep_exec(rt, &a.id, exec_id, &process, host_io(), keeping, ready).await?
        }
        None => keeper::keep_init(rt, &a.id, host_io(), keeping).await?,
    };
    Ok(keeper::exit_code(&exit))
}

/// The guard: waits for its keeper on stdin.
pub(super) async fn guard(rt: &Runtime, id: &str, exec: Option<&str>) -> anyhow::Result<()> {
    keeper::guard(rt, id, exec.unwrap_or(""), std::io::stdin()).await?;
    Ok(())
}
