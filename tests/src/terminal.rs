//! Running a command the way a user runs it from a shell on a terminal.

use std::io::Read;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the terminal's last output may take to be read once the command exited.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs `cmd` with a new pseudo-terminal as its stdin, stdout, stderr and controlling
/// terminal, the command in the terminal's foreground process group (so it may set raw
/// mode, as `podman run -it` and `ctr -t` do). Returns its status and everything written
/// to the terminal, as stdout (stderr stays empty: a terminal has one output).
///
/// Not `script -c`: that runs the command through `$SHELL`, and where that shell forks
/// it (dash), a `timeout` in front puts the command in a background process group, where
/// setting raw mode stops it with SIGTTOU.
pub fn run_in_a_terminal(cmd: &Command) -> std::io::Result<Output> {
    let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
    // setsid(1) makes its stdin the new session's controlling terminal and execs the
    // command as the session leader, so it (and what it execs) is the foreground group
    let mut setsid = Command::new("setsid");
    setsid
        .arg("--ctty")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(pty.slave.try_clone()?)
        .stdout(pty.slave.try_clone()?)
        .stderr(pty.slave);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => setsid.env(k, v),
            None => setsid.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        setsid.current_dir(dir);
    }
    let mut child = setsid.spawn()?;
    drop(setsid); // our copies of the slave: the master reads EIO once the command's are gone
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let seen = Arc::clone(&seen);
        let mut master = std::fs::File::from(pty.master);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf)
                && n > 0
            {
                if let Ok(mut seen) = seen.lock() {
                    seen.extend_from_slice(&buf[..n]);
                }
            }
        })
    };
    let status = child.wait()?;
    // what it wrote last is in the terminal's buffer until read; a process of its that
    // still holds the terminal must not keep the caller waiting
    let deadline = Instant::now() + DRAIN;
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stdout = seen.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr: Vec::new(),
    })
}
