//! Getting a statically linked `carapace-agent`: either build it with cargo (glibc static,
//! the only toolchain available) or take a given binary; either way verify it has no
//! dynamic loader, since the initramfs holds nothing but the agent.

use crate::elf;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The target triple we build the agent for; explicit so RUSTFLAGS do not reach build
/// scripts and proc-macros (which must stay dynamic host binaries).
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";
pub const AGENT_PACKAGE: &str = "carapace-agent";
/// Sanity bound for the agent binary we put in guest memory.
pub const MAX_AGENT_BYTES: u64 = 128 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "could not locate the carapace workspace from {dir} (run inside the source tree, or pass --agent PATH)"
    )]
    NoWorkspace {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("running `{cmd}` in {dir}")]
    Spawn {
        cmd: String,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`cargo build -p {AGENT_PACKAGE}` failed ({status}); see the compiler output above")]
    CargoFailed { status: String },
    #[error("cargo built {AGENT_PACKAGE} but reported no executable")]
    NoExecutable,
    #[error("reading agent binary {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("agent binary {path} is {size} bytes, more than the {MAX_AGENT_BYTES} allowed")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("agent binary {path} is not a valid x86-64 ELF executable")]
    Elf {
        path: PathBuf,
        #[source]
        source: elf::ElfError,
    },
    #[error(
        "agent binary {path} is dynamically linked (interpreter {interpreter}); build it with \
         RUSTFLAGS=\"-C target-feature=+crt-static\" and --target {AGENT_TARGET}"
    )]
    NotStatic { path: PathBuf, interpreter: String },
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// The workspace root containing `dir` (via `cargo locate-project --workspace`).
pub fn workspace_root(dir: &Path) -> Result<PathBuf, AgentError> {
    let out = Command::new(cargo())
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| AgentError::NoWorkspace {
            dir: dir.to_owned(),
            source,
        })?;
    let manifest = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    match manifest.parent() {
        Some(root) if out.status.success() && root.join("guest-agent").is_dir() => {
            Ok(root.to_owned())
        }
        _ => Err(AgentError::NoWorkspace {
            dir: dir.to_owned(),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "no Cargo workspace with a guest-agent/ directory",
            ),
        }),
    }
}

/// The cargo profile the agent is built with (the workspace's `[profile.guest]`: release,
/// optimised for size, fat LTO, no symbols).
pub const AGENT_PROFILE: &str = "guest";

/// Builds the agent statically with [`AGENT_PROFILE`] and returns the executable's path.
pub fn build(workspace: &Path) -> Result<PathBuf, AgentError> {
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if !rustflags.contains("crt-static") {
        if !rustflags.is_empty() {
            rustflags.push(' ');
        }
        rustflags.push_str("-C target-feature=+crt-static");
    }
    let args = [
        "build",
        "--profile",
        AGENT_PROFILE,
        "-p",
        AGENT_PACKAGE,
        "--target",
        AGENT_TARGET,
        "--message-format=json-render-diagnostics",
    ];
    tracing::info!("agent: cargo {} (RUSTFLAGS={rustflags})", args.join(" "));
    let mut child = Command::new(cargo())
        .args(args)
        .current_dir(workspace)
        .env("RUSTFLAGS", &rustflags)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| AgentError::Spawn {
            cmd: format!("cargo {}", args.join(" ")),
            dir: workspace.to_owned(),
            source,
        })?;
    let mut exe = None;
    if let Some(stdout) = child.stdout.take() {
        for line in io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(p) = executable_from_message(&line) {
                exe = Some(p);
            }
        }
    }
    let status = child.wait().map_err(|source| AgentError::Spawn {
        cmd: "cargo build".to_owned(),
        dir: workspace.to_owned(),
        source,
    })?;
    if !status.success() {
        return Err(AgentError::CargoFailed {
            status: status.to_string(),
        });
    }
    exe.ok_or(AgentError::NoExecutable)
}

/// Extracts the agent's executable path from one line of cargo's JSON messages.
fn executable_from_message(line: &str) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    if v.get("target")?.get("name")?.as_str()? != AGENT_PACKAGE {
        return None;
    }
    v.get("executable")?.as_str().map(PathBuf::from)
}

/// Reads an agent binary and checks that it is a static x86-64 executable.
pub fn load(path: &Path) -> Result<Vec<u8>, AgentError> {
    let read_err = |source| AgentError::Read {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_AGENT_BYTES {
        return Err(AgentError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let bytes = std::fs::read(path).map_err(|source| AgentError::Read {
        path: path.to_owned(),
        source,
    })?;
    let info = elf::parse(&bytes).map_err(|source| AgentError::Elf {
        path: path.to_owned(),
        source,
    })?;
    if let Some(interpreter) = info.interpreter {
        return Err(AgentError::NotStatic {
            path: path.to_owned(),
            interpreter,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_artifact_messages() {
        let msg = r#"{"reason":"compiler-artifact","target":{"name":"carapace-agent","kind":["bin"]},"executable":"/t/release/carapace-agent","fresh":true}"#;
        assert_eq!(
            executable_from_message(msg),
            Some(PathBuf::from("/t/release/carapace-agent"))
        );
        let other = r#"{"reason":"compiler-artifact","target":{"name":"libc"},"executable":null}"#;
        assert_eq!(executable_from_message(other), None);
        assert_eq!(
            executable_from_message(r#"{"reason":"build-finished","success":true}"#),
            None
        );
        assert_eq!(executable_from_message("not json"), None);
    }

    #[test]
    fn dynamic_binary_is_rejected_with_advice() {
        let e = load(Path::new("/bin/ls")).unwrap_err();
        assert!(matches!(e, AgentError::NotStatic { .. }), "{e:?}");
        assert!(e.to_string().contains("crt-static"));
        // Debian's busybox-static, installed by scripts/setup.sh, is a static executable.
        load(Path::new("/bin/busybox")).unwrap();
        assert!(matches!(
            load(Path::new("/etc/passwd")),
            Err(AgentError::Elf { .. })
        ));
    }
}
