//! The guest memory the containers may use together, so that a guest out of memory is a
//! memory-cgroup OOM of the containers, never a global OOM of the VM.
//!
//! Every container's cgroup lives under the agent's cgroup root (`/sys/fs/cgroup/carapace`);
//! the agent (PID 1) and the kernel's own allocations stay outside it. The root gets
//! `memory.max` = MemTotal minus a reserve for the agent and the kernel, so that when the
//! containers together take everything they may, the kernel reclaims and OOM-kills inside
//! that cgroup (reported as an OOM kill of the container, status 137, `OOMKilled`), while
//! the agent keeps its memory and keeps answering. Without it a container with no limit
//! of its own takes the whole VM into a global OOM, where the agent's own allocations wait
//! on reclaim like everyone's (README, "The guest out of memory").
//!
//! MemTotal changes when the VMM plugs or unplugs memory (virtio-mem): the limit is set
//! again on every memory block going online or offline, from the kernel's uevents
//! (netlink, `SUBSYSTEM=memory`), not on a timer. An event is only a wake-up: the limit
//! always comes from `/proc/meminfo`, so a forged event changes nothing.
//!
//! The OOM killer never picks the agent: the kernel does not kill global init
//! (`oom_unkillable_task`), so no `oom_score_adj` is needed, and none is set (the
//! container processes the agent starts would inherit it).

use std::path::{Path, PathBuf};

/// Default of the reserve's fixed part (`carapace.memory_reserve_mib`).
pub const DEFAULT_RESERVE_MIB: u64 = 32;

/// The reserve also grows with the guest by 1/`RESERVE_SHARE_DIVISOR` of MemTotal (page
/// tables, the memory map of plugged memory, network and fs buffers grow with it).
pub const RESERVE_SHARE_DIVISOR: u64 = 32;

/// The containers never get less than this share (1/n) of MemTotal, whatever the reserve.
const MIN_CONTAINER_SHARE_DIVISOR: u64 = 2;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A file could not be read or written.
    #[error("{op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// /proc/meminfo has no MemTotal line.
    #[error("{path} has no MemTotal line")]
    NoMemTotal {
        /// The file read.
        path: PathBuf,
    },
    /// The uevent socket could not be opened.
    #[error("opening the kernel's uevent socket")]
    Uevents(#[source] std::io::Error),
}

/// MemTotal in bytes from the text of /proc/meminfo.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let mut words = rest.split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") => n.checked_mul(1024),
            None => Some(n),
            Some(_) => None,
        }
    })
}

/// What the containers may use together: MemTotal minus `reserve_mib` MiB and
/// 1/[`RESERVE_SHARE_DIVISOR`] of MemTotal, never less than half of MemTotal; rounded down
/// to whole pages.
pub fn containers_max(mem_total: u64, reserve_mib: u64) -> u64 {
    let reserve = reserve_mib
        .saturating_mul(1 << 20)
        .saturating_add(mem_total / RESERVE_SHARE_DIVISOR);
    let max = mem_total
        .saturating_sub(reserve)
        .max(mem_total / MIN_CONTAINER_SHARE_DIVISOR);
    max & !4095
}

/// The limit of the containers' cgroup root.
#[derive(Debug, Clone)]
pub struct ContainersLimit {
    /// The agent's cgroup root (its `memory.max` is written).
    pub root: PathBuf,
    /// /proc/meminfo (a scratch file in tests).
    pub meminfo: PathBuf,
    /// The reserve's fixed part.
    pub reserve_mib: u64,
}

impl ContainersLimit {
    /// The guest's: `root` and `/proc/meminfo`.
    pub fn guest(root: &Path, reserve_mib: u64) -> Self {
        Self {
            root: root.to_owned(),
            meminfo: PathBuf::from("/proc/meminfo"),
            reserve_mib,
        }
    }

    /// Writes `memory.max` of the root from MemTotal now; returns (MemTotal, the limit).
    pub fn apply(&self) -> Result<(u64, u64), MemoryError> {
        let text = std::fs::read_to_string(&self.meminfo).map_err(|source| MemoryError::Io {
            op: "reading",
            path: self.meminfo.clone(),
            source,
        })?;
        let total = mem_total(&text).ok_or_else(|| MemoryError::NoMemTotal {
            path: self.meminfo.clone(),
        })?;
        let max = containers_max(total, self.reserve_mib);
        let file = self.root.join("memory.max");
        std::fs::write(&file, max.to_string()).map_err(|source| MemoryError::Io {
            op: "writing",
            path: file,
            source,
        })?;
        Ok((total, max))
    }

    /// Applies the limit now and again after every memory block the kernel onlines or
    /// offlines (a thread reading the kernel's uevents). Fails only when the first write
    /// fails or the socket cannot be opened; later failures are logged.
    pub fn apply_and_follow_hotplug(self) -> Result<(), MemoryError> {
        let socket = uevent_socket().map_err(MemoryError::Uevents)?;
        let (total, max) = self.apply()?;
        tracing::info!(
            mem_total = total,
            containers_max = max,
            root = %self.root.display(),
            "containers' memory bounded (the rest is the agent's and the kernel's)"
        );
        std::thread::Builder::new()
            .name("memory-hotplug".into())
            .spawn(move || self.follow(socket))
            .map_err(MemoryError::Uevents)?;
        Ok(())
    }

    fn follow(self, socket: netlink_sys::Socket) {
        loop {
            // a uevent is at most 2 KiB (UEVENT_BUFFER_SIZE); a longer one is cut, harmlessly
            let mut data = Vec::with_capacity(8192);
            let from = match socket.recv_from(&mut data, 0) {
                Ok((_, from)) => from,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ENOBUFS: events were dropped; the limit is re-read below anyway
                    tracing::debug!(error = %e, "uevent socket");
                    if e.raw_os_error() != Some(libc::ENOBUFS) {
                        tracing::warn!(error = %e, "memory hotplug no longer followed");
                        return;
                    }
                    data.clear();
                    netlink_sys::SocketAddr::new(0, 0)
                }
            };
            // only the kernel's (port 0) events about memory blocks; a lost event (empty)
            // also re-reads
            if from.port_number() != 0 || !(data.is_empty() || is_memory_block_change(&data)) {
                continue;
            }
            match self.apply() {
                Ok((total, max)) => tracing::info!(
                    mem_total = total,
                    containers_max = max,
                    "guest memory changed; containers' bound follows"
                ),
                Err(e) => tracing::warn!(
                    error = %carapace_errors::Chain(&e),
                    "cannot follow the guest's memory change"
                ),
            }
        }
    }
}

/// Whether a uevent (`ACTION@DEVPATH\0KEY=VALUE\0...`) is a memory block going online or
/// offline (or being added or removed).
pub fn is_memory_block_change(event: &[u8]) -> bool {
    let mut fields = event.split(|b| *b == 0).filter(|f| !f.is_empty());
    let Some(header) = fields.next() else {
        return false;
    };
    let action = header.split(|b| *b == b'@').next().unwrap_or_default();
    let wanted = matches!(action, b"online" | b"offline" | b"add" | b"remove");
    wanted && fields.any(|f| f == b"SUBSYSTEM=memory")
}

/// A netlink socket bound to the kernel's uevent multicast group.
fn uevent_socket() -> std::io::Result<netlink_sys::Socket> {
    let mut s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_KOBJECT_UEVENT)?;
    s.bind(&netlink_sys::SocketAddr::new(0, 1))?;
    // bursts: plugging 1 GiB onlines eight 128 MiB blocks at once
    let _ = s.set_rx_buf_sz::<libc::c_int>(1 << 20);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:         242716 kB\nMemFree:          200000 kB\n";
        assert_eq!(mem_total(text), Some(242716 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: x kB\n"), None);
        assert_eq!(mem_total("MemTotal: 1 MB\n"), None);
    }

    #[test]
    fn the_reserve_is_fixed_plus_a_share_and_never_more_than_half() {
        let mib = 1u64 << 20;
        // the boot size of a pod's VM: 237 MiB -> 237 - 32 - 7.4
        let total = 242716 * 1024;
        let max = containers_max(total, 32);
        assert_eq!(max, (total - 32 * mib - total / 32) & !4095);
        assert!(max > 190 * mib && max < 200 * mib, "{max}");
        // a small guest keeps half for its containers
        assert_eq!(containers_max(48 * mib, 32), 24 * mib);
        // pages
        assert_eq!(containers_max(1000 * mib + 123, 0) % 4096, 0);
        assert_eq!(containers_max(0, 32), 0);
    }

    #[test]
    fn only_memory_block_changes_count() {
        let ev = |s: &str| s.replace('|', "\0").into_bytes();
        assert!(is_memory_block_change(&ev(
            "online@/devices/system/memory/memory40|ACTION=online|DEVPATH=/devices/system/memory/memory40|SUBSYSTEM=memory|SEQNUM=9"
        )));
        assert!(is_memory_block_change(&ev(
            "offline@/devices/system/memory/memory40|ACTION=offline|SUBSYSTEM=memory"
        )));
        assert!(!is_memory_block_change(&ev(
            "online@/devices/system/cpu/cpu1|ACTION=online|SUBSYSTEM=cpu"
        )));
        assert!(!is_memory_block_change(&ev(
            "change@/devices/system/memory/memory40|SUBSYSTEM=memory"
        )));
        assert!(!is_memory_block_change(b""));
        assert!(!is_memory_block_change(&ev("online@/x|SUBSYSTEM=memoryx")));
    }

    #[test]
    fn apply_writes_the_limit_from_meminfo() {
        let dir = tempfile::tempdir().unwrap();
        let meminfo = dir.path().join("meminfo");
        std::fs::write(&meminfo, "MemTotal:  1048576 kB\n").unwrap();
        let limit = ContainersLimit {
            root: dir.path().to_owned(),
            meminfo: meminfo.clone(),
            reserve_mib: 32,
        };
        let (total, max) = limit.apply().unwrap();
        assert_eq!(total, 1 << 30);
        assert_eq!(max, (1 << 30) - (32 << 20) - (32 << 20));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("memory.max")).unwrap(),
            max.to_string()
        );
        std::fs::write(&meminfo, "MemFree: 1 kB\n").unwrap();
        assert!(matches!(limit.apply(), Err(MemoryError::NoMemTotal { .. })));
    }
}
