//! Helpers of the VMM jail test (`tests/jail_kvm.rs`): what a sandbox's state records about
//! its VMM's jail, and what the kernel says about a process (`/proc/<pid>/status`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A sandbox's VMM and its jail, from `<state>/<id>/state.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailedVmm {
    /// The VMM's pid.
    pub pid: u32,
    /// The uid (= gid) claimed for it.
    pub uid: u32,
    /// Its jail directory.
    pub root: PathBuf,
}

/// The VMM and jail that the runtime recorded for sandbox `id` under the state dir `state`
/// (None when the state has no VMM or no jail).
pub fn jailed_vmm(state: &Path, id: &str) -> Option<JailedVmm> {
    let text = std::fs::read(state.join(id).join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some(JailedVmm {
        pid: u32::try_from(v["vmm"]["pid"].as_u64()?).ok()?,
        uid: u32::try_from(v["jail"]["uid"].as_u64()?).ok()?,
        root: PathBuf::from(v["jail"]["root"].as_str()?),
    })
}

/// A jailed fs daemon as the runtime recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailedFsd {
    /// The daemon's pid.
    pub pid: u32,
    /// First host id of its block (its uid and gid).
    pub base: u32,
    /// Ids in the block.
    pub count: u32,
}

/// The fs daemon and its id block recorded for sandbox `id` (None when it is not jailed).
pub fn jailed_fsd(state: &Path, id: &str) -> Option<JailedFsd> {
    let text = std::fs::read(state.join(id).join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some(JailedFsd {
        pid: u32::try_from(v["fsd"]["pid"].as_u64()?).ok()?,
        base: u32::try_from(v["jail"]["fs"]["base"].as_u64()?).ok()?,
        count: u32::try_from(v["jail"]["fs"]["count"].as_u64()?).ok()?,
    })
}

/// The fields of `/proc/<pid>/status` (or of one thread's, `/proc/<pid>/task/<tid>/status`
/// when `tid` is given), each value trimmed.
pub fn status(pid: u32, tid: Option<&str>) -> BTreeMap<String, String> {
    let path = match tid {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// The thread ids of process `pid`.
pub fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect()
}

/// Pids of the processes whose real uid is `uid`.
pub fn processes_of_uid(uid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            status(*pid, None)
                .get("Uid")
                .and_then(|u| u.split_whitespace().next().map(str::to_owned))
                == Some(uid.to_string())
        })
        .collect()
}

/// The jail uids claimed under the state dir `state` (`<state>/.jail-uids/<uid>`).
pub fn claimed_uids(state: &Path) -> Vec<u32> {
    let mut uids: Vec<u32> = std::fs::read_dir(state.join(".jail-uids"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    uids.sort();
    uids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_status_and_the_recorded_jail_are_read() {
        let me = std::process::id();
        let st = status(me, None);
        assert_eq!(
            st.get("Pid").map(String::as_str),
            Some(me.to_string().as_str())
        );
        assert!(threads(me).contains(&me.to_string()));
        let uid = nix::unistd::getuid().as_raw();
        assert!(processes_of_uid(uid).contains(&me));

        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("s1")).unwrap();
        std::fs::write(
            tmp.path().join("s1/state.json"),
            r#"{"vmm":{"pid":42,"start_time":1},"jail":{"uid":1879048200,"gid":1879048200,"root":"/run/x/s1/jail"}}"#,
        )
        .unwrap();
        assert_eq!(
            jailed_vmm(tmp.path(), "s1"),
            Some(JailedVmm {
                pid: 42,
                uid: 1_879_048_200,
                root: "/run/x/s1/jail".into()
            })
        );
        assert_eq!(jailed_vmm(tmp.path(), "s2"), None);
        std::fs::create_dir_all(tmp.path().join(".jail-uids")).unwrap();
        for f in ["1879048201", "1879048200", ".lock"] {
            std::fs::write(tmp.path().join(".jail-uids").join(f), b"").unwrap();
        }
        assert_eq!(claimed_uids(tmp.path()), [1_879_048_200, 1_879_048_201]);
    }
}
