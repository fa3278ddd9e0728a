//! SIGTERM ends the VMM at once, as the signal's default action would, with exit status
//! 143 (128 + 15). The handler is installed explicitly because a jailed VMM is PID 1 of a
//! PID namespace of its own (its launcher starts it there), and the kernel protects a
//! namespace's init from every signal it has no handler for, even one sent from the
//! parent namespace: without this, the runtime's SIGTERM would be ignored and every stop
//! would wait out its grace period before SIGKILL. The handler makes one system call,
//! `exit_group`, which every thread's seccomp filter allows.

/// The exit status after SIGTERM.
pub const EXIT_TERMINATED: i32 = 128 + libc::SIGTERM;

extern "C" fn on_term(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe and ends the process without unwinding or
    // running destructors, exactly as the default action would (but with a status).
    unsafe { libc::_exit(EXIT_TERMINATED) }
}

/// Installs the SIGTERM handler (process-wide; call before any thread starts, so no
/// thread has it blocked).
pub fn install() -> nix::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_term),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only calls _exit (async-signal-safe); replacing the previous
    // disposition affects nothing else of this process (nothing else handles SIGTERM).
    unsafe { sigaction(Signal::SIGTERM, &action) }.map(drop)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use super::*;

    const CHILD_ENV: &str = "CARAPACE_TERM_TEST_CHILD";

    /// Run by [`sigterm_ends_the_init_of_a_pid_namespace`] as PID 1 of a new namespace.
    #[test]
    #[ignore = "runs as the child of sigterm_ends_the_init_of_a_pid_namespace"]
    fn term_child() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        install().unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        println!("{nspid}");
        std::thread::sleep(std::time::Duration::from_secs(60));
        std::process::exit(3);
    }

    /// SIGTERM from the parent namespace ends a namespace's init that installed the
    /// handler, with [`EXIT_TERMINATED`] (without it the signal would be ignored). Needs
    /// root (a PID namespace) and util-linux's `unshare`.
    #[test]
    fn sigterm_ends_the_init_of_a_pid_namespace() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let mut child = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "term::tests::term_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let nspid: Vec<i32> = out
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                // on libtest's "test ... " line
                l.split_once("NSpid:")
                    .map(|(_, r)| r.split_whitespace().map(|p| p.parse().unwrap()).collect())
            })
            .expect("the child reported its pids");
        assert_eq!(nspid.len(), 2, "{nspid:?}");
        assert_eq!(nspid[1], 1, "PID 1 of its namespace");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(nspid[0]),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(EXIT_TERMINATED), "{status}");
    }
}
