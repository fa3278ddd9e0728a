//! Shared helpers of the `carapace` CLI end-to-end tests (runtime_host_agent.rs,
//! runtime_kvm.rs, cli_callers.rs): a private state root and configuration per test, the
//! CLI runner, the leftover census (processes, mounts, state entries, sockets), and the
//! console-socket receiver.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use carapace_tests::{fixtures, workspace_bin};
use serde_json::Value;

pub struct Env {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub config: PathBuf,
    pub host_agent: Option<PathBuf>,
}

pub use carapace_tests::is_root;

pub fn env_with(config_extra: &str) -> Option<Env> {
    if !is_root() {
        eprintln!("skipped: needs root");
        return None;
    }
    let tmp = tempfile::Builder::new()
        .prefix("carapace-rt-")
        .tempdir()
        .unwrap();
    let config = tmp.path().join("configuration.toml");
    std::fs::write(
        &config,
        format!(
            "[fs]\npath = {:?}\n[agent]\nboot_timeout_ms = 20000\n{config_extra}",
            workspace_bin("carapace-fsd").display().to_string()
        ),
    )
    .unwrap();
    Some(Env {
        root: tmp.path().join("run"),
        config,
        host_agent: Some(workspace_bin("carapace-agent")),
        tmp,
    })
}

/// An environment that boots real sandbox VMs: carapace-vmm and carapace-fsd from this
/// workspace, the installed guest image, the guest console kept.
pub fn env_vm() -> Option<Env> {
    let mut env = env_with(&format!(
        "[hypervisor]\npath = {:?}\n[debug]\nconsole = true\n",
        workspace_bin("carapace-vmm").display().to_string()
    ))?;
    // Guests boot slowly under the lab's emulation.
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("boot_timeout_ms = 20000", "boot_timeout_ms = 300000");
    std::fs::write(&env.config, text).unwrap();
    env.host_agent = None;
    Some(env)
}

pub fn env() -> Option<Env> {
    env_with("")
}

impl Env {
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(workspace_bin("carapace"));
        c.arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(&self.config)
            .arg("--log")
            .arg(self.tmp.path().join("carapace.log"));
        if let Some(a) = &self.host_agent {
            c.arg("--host-agent").arg(a);
        }
        c.args(args).stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().expect("running carapace");
        eprintln!(
            "carapace {args:?} -> {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `carapace ARGS` whose stdout/stderr (and a created container's relayed stdio) go
    /// to files, so that a background relay does not hold a pipe of ours open.
    pub fn run_to_files(&self, args: &[&str], name: &str) -> (i32, PathBuf) {
        let out = self.tmp.path().join(format!("{name}.out"));
        let err = self.tmp.path().join(format!("{name}.err"));
        let status = self
            .cmd(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        eprintln!(
            "carapace {args:?} -> {:?}; stderr: {}",
            status.code(),
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        (status.code().unwrap_or(-1), out)
    }

    pub fn bundle(&self, name: &str, spec: &Value) -> PathBuf {
        fixtures::busybox_bundle(&self.tmp.path().join(name), spec).unwrap()
    }

    pub fn state(&self, id: &str) -> Value {
        let out = self.run(&["state", id]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn wait_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.state(id)["status"] != want {
            assert!(Instant::now() < deadline, "{id} never became {want}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything of this test still on the system: processes, mounts, state entries,
    /// sockets (by the test's unique directory in their command lines and paths).
    pub fn leftovers(&self) -> Vec<String> {
        let tag = self.tmp.path().display().to_string();
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<u32>().is_err() || name == std::process::id().to_string() {
                continue;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
            if cmdline.contains(&tag) && !zombie {
                left.push(format!("process {name}: {cmdline}"));
            }
        }
        for l in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
        {
            if l.contains(&tag) {
                left.push(format!("mount: {l}"));
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                left.push(format!("state entry: {}", e.path().display()));
            }
        }
        for l in std::fs::read_to_string("/proc/net/unix").unwrap().lines() {
            if l.contains(&tag) {
                left.push(format!("socket: {l}"));
            }
        }
        left
    }

    pub fn assert_clean(&self) {
        let left = self.leftovers();
        assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    }
}

/// A failed test still deletes its sandboxes (processes, mounts) before its temporary
/// directory goes: removing that directory through a live bind mount would be wrong.
impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                let _ = self
                    .cmd(&["delete", "--force", &id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn script(env: &Env, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = env.tmp.path().join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Receives the terminal master a console socket gets (runc's protocol).
pub fn receive_terminal(listener: std::os::unix::net::UnixListener) -> std::fs::File {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd};
    let (s, _) = listener.accept().unwrap();
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
    let fd = msg
        .cmsgs()
        .unwrap()
        .find_map(|c| match c {
            ControlMessageOwned::ScmRights(f) => f.first().copied(),
            _ => None,
        })
        .expect("SCM_RIGHTS with the terminal");
    // SAFETY: the fd was just received through SCM_RIGHTS; this process owns it alone.
    unsafe { std::fs::File::from_raw_fd(fd) }
}
