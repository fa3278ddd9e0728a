//! Support of the hostile-guest tests (`tests/hostile_kvm.rs`): the `carapace-hostile`
//! program (crate carapace-test-programs) built static and put into a test image, and the
//! host-side facts the tests assert on: the sandbox's processes and their memory, its log files, the VMM's metrics,
//! the host's mount table and a decoy directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::containerd::{Containerd, ContainerdError};

/// The image holding busybox and `/bin/carapace-hostile`.
pub const HOSTILE_IMAGE: &str = "carapace.test/hostile:1";
/// The cap of every sandbox log file (`carapace_footprint::logcap::DEFAULT_LOG_CAP`).
pub const LOG_CAP: u64 = 16 << 20;
const TARGET: &str = "x86_64-unknown-linux-gnu";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `carapace-hostile`, static (it runs in a busybox image without a libc), release. Built
/// with cargo on the host; inside the lab (where cargo never runs) only its path.
///
/// # Panics
/// When the build fails.
pub fn program() -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target_dir
        .join(TARGET)
        .join("release")
        .join("carapace-hostile");
    if std::env::var_os(crate::lab::IN_LAB_ENV).is_some() {
        return bin;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "carapace-test-programs"])
        .args(["--bin", "carapace-hostile", "--target", TARGET])
        // the same flags as fsd_guest's static builds, so both share the dependencies
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace_root())
        .status()
        .expect("running cargo build");
    assert!(st.success(), "building carapace-hostile statically failed");
    bin
}

/// Imports [`HOSTILE_IMAGE`] for CRI: the busybox fixture root with `program` as
/// `/bin/carapace-hostile`.
pub fn import_image(ctrd: &Containerd, work: &Path, program: &Path) -> Result<(), ContainerdError> {
    let rootfs = work.join("hostile-image-rootfs");
    crate::fixtures::busybox_rootfs(&rootfs)?;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ContainerdError::Io { what, path, source }
    };
    let to = rootfs.join("bin/carapace-hostile");
    fs::copy(program, &to).map_err(io("cannot copy carapace-hostile to", &to))?;
    let dir = work.join("hostile-image");
    fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
    let archive = dir.join("image.tar");
    crate::fixtures::oci_image_archive(&rootfs, HOSTILE_IMAGE, &["sh"], &dir, &archive)?;
    ctrd.import_for_cri(&archive)
}

/// The `HOSTILE <attack> <verdict> k=v...` lines of a `carapace-hostile` output, by attack.
pub fn verdicts(output: &str) -> BTreeMap<String, Verdict> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("HOSTILE "))
        .filter_map(|l| {
            let mut w = l.split(' ');
            let attack = w.next()?;
            let status = w.next()?;
            if attack == "begin" || attack == "done" {
                return None;
            }
            let mut facts = BTreeMap::new();
            let mut breaches = Vec::new();
            for kv in w {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                if k == "breach" {
                    breaches.push(v.to_owned());
                } else {
                    facts.insert(k.to_owned(), v.to_owned());
                }
            }
            Some((
                attack.to_owned(),
                Verdict {
                    status: status.to_owned(),
                    facts,
                    breaches,
                    line: l.to_owned(),
                },
            ))
        })
        .collect()
}

/// One attack's verdict line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `ok`, `BREACH` or `unavailable`.
    pub status: String,
    /// Its `key=value` facts.
    pub facts: BTreeMap<String, String>,
    /// What got through.
    pub breaches: Vec<String>,
    /// The whole line.
    pub line: String,
}

impl Verdict {
    /// The fact `k` as a number (0 when absent or not a number).
    pub fn num(&self, k: &str) -> u64 {
        self.facts.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// A host process's memory from `/proc/<pid>/status`, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rss {
    /// VmRSS.
    pub total: u64,
    /// RssAnon: the process's own heap and stacks (guest RAM is shared memory, not here).
    pub anon: u64,
    /// RssShmem: for the VMM, the guest RAM it touched.
    pub shmem: u64,
}

impl Rss {
    /// Of `pid`, `None` when it is gone.
    pub fn of(pid: u32) -> Option<Rss> {
        let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Some(Rss {
            total: kb("VmRSS:"),
            anon: kb("RssAnon:"),
            shmem: kb("RssShmem:"),
        })
    }

    /// The larger of each field.
    pub fn max(self, o: Rss) -> Rss {
        Rss {
            total: self.total.max(o.total),
            anon: self.anon.max(o.anon),
            shmem: self.shmem.max(o.shmem),
        }
    }
}

/// A live process that is not a zombie.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// Pids whose command line (NUL-separated arguments) satisfies `pred`.
pub fn pids_where(pred: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.is_empty() && pred(&args) {
            out.push(pid);
        }
    }
    out
}

/// A sandbox's host processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxPids {
    /// carapace-vmm.
    pub vmm: u32,
    /// carapace-fsd.
    pub fsd: u32,
    /// containerd-shim-carapace-v2 serving the pod.
    pub shim: u32,
}

impl SandboxPids {
    /// Those of the sandbox whose state directory is `dir` (the VMM and the fs daemon name
    /// it in their arguments) and of the shim serving `pod_id`.
    pub fn find(dir: &Path, pod_id: &str) -> Result<SandboxPids, String> {
        let d = dir.to_string_lossy().into_owned();
        let one = |what: &str, pids: Vec<u32>| match pids.as_slice() {
            [p] => Ok(*p),
            other => Err(format!("{what}: {} processes: {other:?}", other.len())),
        };
        let named = |name: &'static str| {
            let d = d.clone();
            move |a: &[String]| a[0].ends_with(name) && a.iter().any(|x| x.starts_with(&d))
        };
        Ok(SandboxPids {
            vmm: one("carapace-vmm", pids_where(named("carapace-vmm")))?,
            fsd: one("carapace-fsd", pids_where(named("carapace-fsd")))?,
            shim: one(
                "shim",
                pids_where(|a| {
                    a[0].ends_with("containerd-shim-carapace-v2")
                        && a.iter().any(|x| x == pod_id)
                        && !a.iter().any(|x| x == "delete")
                }),
            )?,
        })
    }

    /// Each one's memory, `None` for one that is gone.
    pub fn rss(&self) -> [(&'static str, Option<Rss>); 3] {
        [
            ("vmm", Rss::of(self.vmm)),
            ("fsd", Rss::of(self.fsd)),
            ("shim", Rss::of(self.shim)),
        ]
    }
}

/// Sizes of a sandbox's `vmm.log`, `console.log`, `fsd.log` (0 when absent).
pub fn log_sizes(dir: &Path) -> [(&'static str, u64); 3] {
    ["vmm.log", "console.log", "fsd.log"]
        .map(|f| (f, fs::metadata(dir.join(f)).map_or(0, |m| m.len())))
}

/// What a containerd log says about pod `id`, bounded: from the shim's last "the VM ended
/// on its own" report of it (with the lines of the VMM log and console it quotes, flood
/// lines counted rather than shown), else the last lines naming the pod.
pub fn about_pod(log: &str, id: &str) -> String {
    const LINES: usize = 60;
    const WIDTH: usize = 400;
    let lines: Vec<&str> = log.lines().collect();
    let report = lines
        .iter()
        .rposition(|l| l.contains(id) && l.contains("ended on its own"));
    let picked: Vec<&str> = match report {
        Some(at) => lines[at..].iter().take(LINES * 4).copied().collect(),
        None => {
            let named: Vec<&str> = lines.iter().filter(|l| l.contains(id)).copied().collect();
            named[named.len().saturating_sub(LINES)..].to_vec()
        }
    };
    let mut out = Vec::new();
    let mut flood = 0;
    for l in picked {
        if l.contains("HOSTILE-") {
            flood += 1;
            continue;
        }
        if out.len() < LINES {
            out.push(l.chars().take(WIDTH).collect::<String>());
        }
    }
    if flood > 0 {
        out.push(format!("({flood} flood lines not shown)"));
    }
    if out.is_empty() {
        "(nothing)".to_owned()
    } else {
        out.join("\n")
    }
}

/// The VMM's metrics (its API's `metrics` answer), parsed.
pub fn metrics(dir: &Path) -> Option<serde_json::Value> {
    let line = crate::containerd::vmm_metrics(&dir.join("api.sock"))?;
    serde_json::from_str(&line).ok()
}

/// The first number named `key` at or below `v` (depth first).
pub fn find_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .or_else(|| m.values().find_map(|x| find_u64(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_u64(x, key)),
        _ => None,
    }
}

/// Mount points of the host (this process's view), outside `skip`.
pub fn host_mounts(skip: &Path) -> BTreeSet<String> {
    let skip = skip.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| !p.starts_with(&skip))
        .map(str::to_owned)
        .collect()
}

/// Every path under `dir` with its size and mode, for a before/after comparison.
pub fn listing(dir: &Path) -> Vec<(String, u64, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            out.push((e.path().display().to_string(), m.len(), m.mode()));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shims_report_of_a_lost_vm_is_picked_from_the_log() {
        let log = "time=1 msg=\"other pod p2\"\n\
                   time=2 msg=\"started\" id=p1\n\
                   time=3 level=warn msg=\"the VM of p1 ended on its own: the VMM (pid 9) is gone; vmm.log ends with:\n\
                   vmm: exiting: guest triple fault\n\
                   HOSTILE-FLOOD xxxx\n\
                   HOSTILE-FLOOD xxxx\n\
                   [  3.1] Kernel panic\" id=p1\n";
        let about = about_pod(log, "p1");
        assert!(about.starts_with("time=3"), "{about}");
        assert!(
            about.contains("triple fault") && about.contains("Kernel panic"),
            "{about}"
        );
        assert!(
            about.contains("(2 flood lines not shown)") && !about.contains("p2"),
            "{about}"
        );
        let plain = about_pod("a id=p1\nb id=p2\nc id=p1\n", "p1");
        assert_eq!(plain, "a id=p1\nc id=p1");
        assert_eq!(about_pod("", "p1"), "(nothing)");
    }

    #[test]
    fn verdict_lines_are_parsed_by_attack() {
        let out = "noise\nHOSTILE begin agent\n\
                   HOSTILE agent BREACH cid1=ENODEV:1024 pid1=sh breach=x breach=y\n\
                   HOSTILE mmio-flood unavailable why=no_devmem mknod=ok\n\
                   HOSTILE done breaches=2\n";
        let v = verdicts(out);
        assert_eq!(v.len(), 2);
        assert_eq!(v["agent"].status, "BREACH");
        assert_eq!(v["agent"].breaches, ["x", "y"]);
        assert_eq!(v["agent"].facts["cid1"], "ENODEV:1024");
        assert_eq!(v["mmio-flood"].status, "unavailable");
        assert_eq!(v["mmio-flood"].num("mknod"), 0);
    }

    #[test]
    fn numbers_are_found_below_any_key() {
        let m: serde_json::Value = serde_json::from_str(
            r#"{"ok":true,"exits":{"unhandled":7},"devices":{"vsock":{"device":{"Vsock":{"conns_reset":3}}}}}"#,
        )
        .unwrap();
        assert_eq!(find_u64(&m, "unhandled"), Some(7));
        assert_eq!(find_u64(&m["devices"]["vsock"], "conns_reset"), Some(3));
        assert_eq!(find_u64(&m, "nothing"), None);
    }
}
