//! The VMM's control API contract (newline-delimited JSON on the API socket, see
//! carapace-vmm's `api` module for the server): the requests and the typed answers both
//! sides share, so the runtime (client) and the VMM (server) cannot drift apart.

use serde::{Deserialize, Serialize};

/// One request: `{"cmd":"<name>", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// VM facts and status.
    Info {},
    /// Counters.
    Metrics {},
    /// Pause vCPUs.
    Pause {},
    /// Resume vCPUs.
    Resume {},
    /// Graceful-then-forced shutdown.
    Shutdown {
        /// Seconds to wait for the guest before forcing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_secs: Option<u32>,
    },
    /// Set the hot-plugged memory the guest should have.
    Memory {
        /// MiB of hot-plugged memory (beyond the VM's boot memory), within the region.
        requested_mib: u32,
    },
}

impl Request {
    /// The request's `cmd`, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Info {} => "info",
            Request::Metrics {} => "metrics",
            Request::Pause {} => "pause",
            Request::Resume {} => "resume",
            Request::Shutdown { .. } => "shutdown",
            Request::Memory { .. } => "memory",
        }
    }
}

/// Memory hot-plug (virtio-mem) sizes, MiB: the answer to `memory` and the
/// `memory_hotplug` field of `info` (`null` without hot-plug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryHotplugInfo {
    /// Plug/unplug granularity.
    pub block_mib: u32,
    /// Plugged by the guest now.
    pub plugged_mib: u32,
    /// The hot-plug region (the most the VM can grow by).
    pub region_mib: u32,
    /// Asked for by the host (`memory`); the guest driver moves `plugged_mib` there.
    pub requested_mib: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_and_write_the_same_lines() {
        for (req, line) in [
            (Request::Info {}, r#"{"cmd":"info"}"#),
            (
                Request::Memory { requested_mib: 512 },
                r#"{"cmd":"memory","requested_mib":512}"#,
            ),
            (
                Request::Shutdown {
                    grace_secs: Some(3),
                },
                r#"{"cmd":"shutdown","grace_secs":3}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&req).unwrap(), line);
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), req);
            assert_eq!(req.name(), line.split('"').nth(3).unwrap());
        }
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"info","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}
