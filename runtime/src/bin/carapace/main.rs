//! `carapace`: the runc-compatible command line of the Carapace runtime. See README.md
//! (exit codes are listed there and in [`exit::code`]).
//!
//! The binary is thin: `cli` holds the arguments, `commands/` one module per command over
//! `carapace-runtime`'s library calls, `exit` the mapping from errors to exit codes.

mod cli;
mod commands;
mod exit;
mod logging;

use std::process::ExitCode;

use carapace_runtime::stdio::block_sigwinch;
use clap::Parser;

use cli::{Cli, Cmd};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::code::USAGE } else { 0 });
        }
    };
    // `run` and `exec` may forward terminal resizes: block SIGWINCH before any thread
    // exists, so that every thread inherits the mask and only `forward_resizes` collects it
    // (the VMM and fs daemon `run` starts inherit it too; they do not use it).
    if matches!(cli.cmd, Cmd::Run(_) | Cmd::Exec(_)) {
        block_sigwinch();
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("carapace: error: cannot create the async runtime: {e}");
            return ExitCode::from(exit::code::FAILURE);
        }
    };
    let result = rt.block_on(commands::dispatch(cli));
    // A read of a terminal stdin cannot be interrupted: do not wait for it.
    rt.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("carapace: error: {e:#}");
            ExitCode::from(exit::exit_code(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
