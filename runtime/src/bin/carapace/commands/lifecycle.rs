//! `start`, `state`, `pause`, `resume`, `update`, `events`, `kill`, `delete` and `ps`: one
//! library call each, through a session opened for the command.

use std::io::Read;

use anyhow::{Context, bail};

use carapace_runtime::sandbox::Runtime;
use carapace_runtime::{events as container_events, freezer};

use super::{parse_signal, print_json};
use crate::cli::{Format, UpdateArgs};

/// `start`: start the created container's process.
pub(super) async fn start(rt: &Runtime, id: &str) -> anyhow::Result<()> {
    rt.start(id, None).await?;
    Ok(())
}

/// `state`: the OCI state JSON.
pub(super) fn state(rt: &Runtime, id: &str) -> anyhow::Result<()> {
    print_json(&rt.state(id)?)
}

/// `pause`: freeze the running container.
pub(super) async fn pause(rt: &Runtime, id: &str) -> anyhow::Result<()> {
    freezer::pause(rt, id, None).await?;
    Ok(())
}

/// `resume`: thaw the paused container.
pub(super) async fn resume(rt: &Runtime, id: &str) -> anyhow::Result<()> {
    freezer::resume(rt, id, None).await?;
    Ok(())
}

/// `update`: new resource limits (the object given, changed by the flags).
pub(super) async fn update(rt: &Runtime, a: &UpdateArgs) -> anyhow::Result<()> {
    let mut res = match &a.resources {
        Some(p) => {
            let mut text = Vec::new();
            if p.as_os_str() == "-" {
                std::io::stdin()
                    .read_to_end(&mut text)
                    .context("reading the resources from stdin")?;
            } else {
                text = std::fs::read(p)
                    .with_context(|| format!("reading the resources from {}", p.display()))?;
            }
            serde_json::from_slice::<serde_json::Value>(&text)
                .context("the resources are not a JSON object (OCI linux.resources)")?
        }
        None => serde_json::json!({}),
    };
    if !res.is_object() {
        bail!("the resources are not a JSON object (OCI linux.resources)");
    }
    let mut set = |path: &[&str], v: serde_json::Value| {
        let mut at = &mut res;
        for (i, key) in path.iter().enumerate() {
            if i + 1 == path.len() {
                at[*key] = v;
                return;
            }
            if !at[*key].is_object() {
                at[*key] = serde_json::json!({});
            }
            at = &mut at[*key];
        }
    };
    if let Some(m) = &a.memory {
        set(&["memory", "limit"], bytes(m, "--memory")?.into());
    }
    if let Some(m) = &a.memory_reservation {
        set(
            &["memory", "reservation"],
            bytes(m, "--memory-reservation")?.into(),
        );
    }
    if let Some(m) = &a.memory_swap {
        set(&["memory", "swap"], bytes(m, "--memory-swap")?.into());
    }
    if let Some(p) = a.cpu_period {
        set(&["cpu", "period"], p.into());
    }
    if let Some(q) = a.cpu_quota {
        set(&["cpu", "quota"], q.into());
    }
    if let Some(s) = a.cpu_shares {
        set(&["cpu", "shares"], s.into());
    }
    if let Some(p) = a.pids_limit {
        set(&["pids", "limit"], p.into());
    }
    if let Some(w) = a.blkio_weight {
        set(&["blockIO", "weight"], w.into());
    }
    if res.as_object().is_some_and(|o| o.is_empty()) {
        bail!("nothing to update: give --resources or a limit flag");
    }
    let json = serde_json::to_vec(&res)?;
    rt.update_resources(&a.id, &json, None).await?;
    Ok(())
}

/// A byte count as runc's flags take it: a number with an optional k, m, g (or kb, mb,
/// gb; binary multiples) suffix; -1 for unlimited.
fn bytes(text: &str, flag: &str) -> anyhow::Result<i64> {
    let t = text.trim().to_ascii_lowercase();
    if t == "-1" {
        return Ok(-1);
    }
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .and_then(|n| n.checked_mul(mult))
        .with_context(|| format!("{flag} {text:?}: not a byte count (e.g. 536870912, 512m, 1g)"))
}

/// `events`: statistics (and OOM kills) as JSON lines.
pub(super) async fn events(
    rt: &Runtime,
    id: &str,
    stats: bool,
    interval: std::time::Duration,
) -> anyhow::Result<()> {
    if stats {
        let event = container_events::stats_once(rt, id).await?;
        println!("{event}");
        return Ok(());
    }
    container_events::stream(rt, id, interval, std::io::stdout()).await?;
    Ok(())
}

/// `kill`: signal the init (or every process with `all`).
pub(super) async fn kill(rt: &Runtime, id: &str, signal: &str, all: bool) -> anyhow::Result<()> {
    rt.kill(id, parse_signal(signal)?, all, None).await?;
    Ok(())
}

/// `delete`: stop the VM (or leave the pod's), undo the mounts, remove the state.
pub(super) async fn delete(rt: &Runtime, id: &str, force: bool) -> anyhow::Result<()> {
    rt.delete(id, force, None).await?;
    Ok(())
}

/// `ps`: the guest pids of the container's processes.
pub(super) async fn ps(rt: &Runtime, id: &str, format: Format) -> anyhow::Result<()> {
    let pids = rt.ps(id, None).await?;
    match format {
        Format::Json => print_json(&pids)?,
        Format::Table => {
            println!("PID");
            for p in pids {
                println!("{p}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_like_runcs() {
        assert_eq!(bytes("536870912", "--memory").unwrap(), 536_870_912);
        assert_eq!(bytes("512m", "--memory").unwrap(), 512 << 20);
        assert_eq!(bytes("1G", "--memory").unwrap(), 1 << 30);
        assert_eq!(bytes("64kb", "--memory").unwrap(), 64 << 10);
        assert_eq!(bytes("-1", "--memory-swap").unwrap(), -1);
        let err = bytes("lots", "--memory").unwrap_err().to_string();
        assert!(err.contains("--memory") && err.contains("lots"), "{err}");
        assert!(bytes("-5", "--memory").is_err());
    }
}
