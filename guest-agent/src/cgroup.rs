//! cgroup v2 management for containers: one directory per container under the agent's
//! cgroup root, limits written as files, stats read in containerd's v2 metric terms.

use std::path::{Path, PathBuf};

use carapace_protocol::agent::{
    CpuStat, IoEntry, IoStat, MemoryEvents, MemoryStat, PidsStat, StatsResponse,
};
use oci_spec::runtime::LinuxResources;

/// Errors from cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup v2 is not available (no cgroup root configured)")]
    Unavailable,
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid resource {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("timed out waiting for {path} to report frozen={frozen}")]
    FreezeTimeout { path: PathBuf, frozen: bool },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io { op, path, source }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err("writing", path))
}

/// The agent's cgroup root (a directory in a cgroup2 hierarchy).
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    path: PathBuf,
}

impl CgroupRoot {
    /// Uses `path` (created if missing) as parent of the container cgroups and enables the
    /// controllers it can in its subtree.
    pub fn init(path: &Path) -> Result<Self, CgroupError> {
        std::fs::create_dir_all(path).map_err(io_err("creating", path))?;
        if let Some(parent) = path.parent() {
            enable_controllers(parent);
        }
        enable_controllers(path);
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Picks a default root: `<mount>/carapace` on the first cgroup2 mount found at
    /// /sys/fs/cgroup or /sys/fs/cgroup/unified.
    pub fn detect() -> Option<PathBuf> {
        ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.controllers").exists())
            .map(|p| p.join("carapace"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the cgroup for container `id` (an already validated id).
    pub fn create(&self, id: &str) -> Result<Cgroup, CgroupError> {
        let path = self.path.join(id);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating", &path)(e)),
        }
        Ok(Cgroup { path })
    }
}

/// Best effort: turns on every available controller for children of `dir`.
fn enable_controllers(dir: &Path) {
    let Ok(avail) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    for c in avail.split_whitespace() {
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::debug!(dir = %dir.display(), controller = c, error = %e, "cannot enable controller");
        }
    }
}

/// One container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Writes the OCI resources as cgroup v2 files.
    pub fn apply(&self, res: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(mem) = res.memory() {
            if let Some(limit) = mem.limit() {
                let v = if limit < 0 {
                    "max".to_owned()
                } else {
                    limit.to_string()
                };
                write(&self.path.join("memory.max"), &v)?;
            }
            if let Some(res) = mem.reservation() {
                let v = if res < 0 {
                    "max".to_owned()
                } else {
                    res.to_string()
                };
                write(&self.path.join("memory.low"), &v)?;
            }
            if let (Some(swap), Some(limit)) = (mem.swap(), mem.limit()) {
                // OCI swap is memory+swap; v2 memory.swap.max is swap alone.
                let v = if swap < 0 {
                    "max".to_owned()
                } else if swap < limit {
                    return Err(CgroupError::Invalid {
                        field: "linux.resources.memory.swap",
                        reason: format!("swap {swap} is below the memory limit {limit}"),
                    });
                } else {
                    (swap - limit).to_string()
                };
                let path = self.path.join("memory.swap.max");
                if path.exists() {
                    write(&path, &v)?;
                }
            }
        }
        if let Some(cpu) = res.cpu() {
            if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
                // The conversion runc/crun use: [2, 262144] -> [1, 10000].
                let shares = shares.clamp(2, 262_144);
                let weight = 1 + ((shares - 2) * 9999) / 262_142;
                write(&self.path.join("cpu.weight"), &weight.to_string())?;
            }
            if cpu.quota().is_some() || cpu.period().is_some() {
                let period = cpu.period().unwrap_or(100_000);
                let quota = match cpu.quota() {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".to_owned(),
                };
                write(&self.path.join("cpu.max"), &format!("{quota} {period}"))?;
            }
            if let Some(cpus) = cpu.cpus() {
                write(&self.path.join("cpuset.cpus"), cpus)?;
            }
            if let Some(mems) = cpu.mems() {
                write(&self.path.join("cpuset.mems"), mems)?;
            }
        }
        if let Some(pids) = res.pids() {
            let v = if pids.limit() <= 0 {
                "max".to_owned()
            } else {
                pids.limit().to_string()
            };
            write(&self.path.join("pids.max"), &v)?;
        }
        if let Some(unified) = res.unified() {
            for (k, v) in unified {
                if k.contains('/') || k.starts_with('.') || k.starts_with("cgroup.") {
                    return Err(CgroupError::Invalid {
                        field: "linux.resources.unified",
                        reason: format!("key {k:?} is not a controller file"),
                    });
                }
                write(&self.path.join(k), v)?;
            }
        }
        Ok(())
    }

    /// PIDs in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let path = self.procs_file();
        let text = std::fs::read_to_string(&path).map_err(io_err("reading", &path))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Freezes or thaws the cgroup and waits (up to 5 s) until the kernel reports it.
    pub async fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        write(
            &self.path.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )?;
        let events = self.path.join("cgroup.events");
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        for _ in 0..500 {
            let text = std::fs::read_to_string(&events).map_err(io_err("reading", &events))?;
            if text.lines().any(|l| l.trim() == want) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(CgroupError::FreezeTimeout {
            path: self.path.clone(),
            frozen,
        })
    }

    /// Kills every process in the cgroup (cgroup.kill, or SIGKILL to each listed pid).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            return write(&kill, "1");
        }
        for pid in self.pids()? {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Ok(())
    }

    /// Removes the cgroup directory (it must be empty of processes).
    pub async fn remove(&self) -> Result<(), CgroupError> {
        let mut last = None;
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Err(io_err("removing", &self.path)(last.unwrap_or_else(|| {
            std::io::Error::other("remove_dir kept failing")
        })))
    }

    /// Reads `memory.events` (zeros when the memory controller is off).
    pub fn memory_events(&self) -> MemoryEvents {
        let kv = read_kv(&self.path.join("memory.events"));
        MemoryEvents {
            low: get(&kv, "low"),
            high: get(&kv, "high"),
            max: get(&kv, "max"),
            oom: get(&kv, "oom"),
            oom_kill: get(&kv, "oom_kill"),
            ..Default::default()
        }
    }

    /// The `oom_kill` count of `memory.events` (0 when the memory controller is off).
    pub fn oom_kills(&self) -> u64 {
        get(&read_kv(&self.path.join("memory.events")), "oom_kill")
    }

    /// Collects stats. Files of controllers that are not enabled read as zero.
    pub fn stats(&self) -> StatsResponse {
        let p = &self.path;
        let cpu = read_kv(&p.join("cpu.stat"));
        let mem = read_kv(&p.join("memory.stat"));
        let mut resp = StatsResponse::new();
        resp.pids = Some(PidsStat {
            current: read_u64(&p.join("pids.current")),
            limit: read_u64(&p.join("pids.max")),
            ..Default::default()
        })
        .into();
        resp.cpu = Some(CpuStat {
            usage_usec: get(&cpu, "usage_usec"),
            user_usec: get(&cpu, "user_usec"),
            system_usec: get(&cpu, "system_usec"),
            nr_periods: get(&cpu, "nr_periods"),
            nr_throttled: get(&cpu, "nr_throttled"),
            throttled_usec: get(&cpu, "throttled_usec"),
            ..Default::default()
        })
        .into();
        resp.memory = Some(MemoryStat {
            anon: get(&mem, "anon"),
            file: get(&mem, "file"),
            kernel_stack: get(&mem, "kernel_stack"),
            slab: get(&mem, "slab"),
            sock: get(&mem, "sock"),
            shmem: get(&mem, "shmem"),
            file_mapped: get(&mem, "file_mapped"),
            file_dirty: get(&mem, "file_dirty"),
            file_writeback: get(&mem, "file_writeback"),
            pgfault: get(&mem, "pgfault"),
            pgmajfault: get(&mem, "pgmajfault"),
            inactive_anon: get(&mem, "inactive_anon"),
            active_anon: get(&mem, "active_anon"),
            inactive_file: get(&mem, "inactive_file"),
            active_file: get(&mem, "active_file"),
            unevictable: get(&mem, "unevictable"),
            usage: read_u64(&p.join("memory.current")),
            usage_limit: read_u64(&p.join("memory.max")),
            swap_usage: read_u64(&p.join("memory.swap.current")),
            swap_limit: read_u64(&p.join("memory.swap.max")),
            ..Default::default()
        })
        .into();
        resp.io = Some(IoStat {
            usage: read_io(&p.join("io.stat")),
            ..Default::default()
        })
        .into();
        resp.memory_events = Some(self.memory_events()).into();
        resp
    }
}

/// Reads a single-number file; "max" and missing files read as 0... except "max", which
/// reads as u64::MAX so a caller can tell "unlimited" from "unreadable".
fn read_u64(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim() == "max" => u64::MAX,
        Ok(s) => s.trim().parse().unwrap_or(0),
        Err(_) => 0,
    }
}

fn read_kv(path: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_owned(), v))
        })
        .collect()
}

fn get(kv: &[(String, u64)], key: &str) -> u64 {
    kv.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

/// Parses io.stat lines: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...`.
fn read_io(path: &Path) -> Vec<IoEntry> {
    parse_io(&std::fs::read_to_string(path).unwrap_or_default())
}

fn parse_io(text: &str) -> Vec<IoEntry> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.split_whitespace();
            let (maj, min) = it.next()?.split_once(':')?;
            let mut e = IoEntry {
                major: maj.parse().ok()?,
                minor: min.parse().ok()?,
                ..Default::default()
            };
            for kv in it {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => e.rbytes = v,
                    "wbytes" => e.wbytes = v,
                    "rios" => e.rios = v,
                    "wios" => e.wios = v,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_stat_parsing() {
        let v = parse_io("8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\nbad\n");
        assert_eq!(v.len(), 1);
        assert_eq!(
            (
                v[0].major,
                v[0].minor,
                v[0].rbytes,
                v[0].wbytes,
                v[0].rios,
                v[0].wios
            ),
            (8, 0, 10, 20, 1, 2)
        );
    }

    #[test]
    fn stats_and_apply_on_plain_files() {
        // A plain directory stands in for a cgroup: apply writes, stats reads.
        let dir = tempfile::tempdir().unwrap();
        let cg = Cgroup {
            path: dir.path().to_owned(),
        };
        let res: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":1048576},"cpu":{"quota":50000,"period":100000,"shares":1024},"pids":{"limit":7}}"#,
        )
        .unwrap();
        cg.apply(&res).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("memory.max")).unwrap(),
            "1048576"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cpu.max")).unwrap(),
            "50000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cpu.weight")).unwrap(),
            "39"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pids.max")).unwrap(),
            "7"
        );
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("cpu.stat"),
            "usage_usec 5\nuser_usec 3\nsystem_usec 2\n",
        )
        .unwrap();
        let s = cg.stats();
        assert_eq!(s.memory.usage_limit, 1_048_576);
        assert_eq!(s.pids.limit, 7);
        assert_eq!(s.cpu.usage_usec, 5);
        assert_eq!(s.memory_events.oom_kill, 1);
        assert_eq!(cg.oom_kills(), 1);
        let bad: LinuxResources = serde_json::from_str(r#"{"unified":{"../x":"1"}}"#).unwrap();
        assert!(matches!(cg.apply(&bad), Err(CgroupError::Invalid { .. })));
    }
}
