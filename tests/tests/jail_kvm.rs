//! The VMM jail with real VMs through containerd and `ctr` (lab): while containers run, each
//! sandbox's VMM runs as an unprivileged uid of the configured range (a different one per
//! sandbox), with no capabilities, no_new_privs and seccomp filters on every thread, and its
//! jail directory as `/`; after its VMM is SIGKILLed and the task deleted, the jail
//! directory and the uid's claim are gone. `carapace check` says jailing works.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use carapace_tests::containerd::{
    BUSYBOX_IMAGE as IMAGE, CARAPACE_RUNTIME as RUNTIME, carapace_world, sandbox_log_tails,
};
use carapace_tests::faults::{ctr, task_status};
use carapace_tests::jail::{
    JailedVmm, claimed_uids, jailed_fsd, jailed_vmm, processes_of_uid, status, threads,
};
use carapace_tests::{kvm_test, workspace_bin};

/// The default `[jail]` range.
const UID_BASE: u32 = 0x7000_0000;
const UID_COUNT: u32 = 4_000;
/// The default first id of the fs daemons' blocks (`jail.fs_uid_base`).
const FS_UID_BASE: u32 = 0x7001_0000;

/// What is wrong with the jail of `vmm` while its VM runs (empty: nothing).
fn jail_findings(id: &str, vmm: &JailedVmm) -> Vec<String> {
    let mut wrong = Vec::new();
    let uid = vmm.uid.to_string();
    if !(UID_BASE..UID_BASE + UID_COUNT).contains(&vmm.uid) {
        wrong.push(format!(
            "{id}: uid {} outside the configured range",
            vmm.uid
        ));
    }
    let st = status(vmm.pid, None);
    println!(
        "jail: {id}: VMM pid {} Uid {:?} Gid {:?} Groups {:?} CapEff {:?} CapPrm {:?} CapBnd {:?} \
         NoNewPrivs {:?} Seccomp {:?}",
        vmm.pid,
        st.get("Uid"),
        st.get("Gid"),
        st.get("Groups"),
        st.get("CapEff"),
        st.get("CapPrm"),
        st.get("CapBnd"),
        st.get("NoNewPrivs"),
        st.get("Seccomp")
    );
    let four = |v: Option<&String>| {
        v.is_some_and(|v| v.split_whitespace().collect::<Vec<_>>() == [&*uid, &*uid, &*uid, &*uid])
    };
    if !four(st.get("Uid")) || !four(st.get("Gid")) {
        wrong.push(format!(
            "{id}: Uid {:?} / Gid {:?}, want {uid} in all four",
            st.get("Uid"),
            st.get("Gid")
        ));
    }
    if st.get("Groups").is_some_and(|g| !g.is_empty()) {
        wrong.push(format!("{id}: supplementary groups {:?}", st.get("Groups")));
    }
    for cap in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        if st.get(cap).map(String::as_str) != Some("0000000000000000") {
            wrong.push(format!("{id}: {cap} {:?}", st.get(cap)));
        }
    }
    let tids = threads(vmm.pid);
    if tids.len() < 2 {
        wrong.push(format!("{id}: only threads {tids:?}"));
    }
    for t in &tids {
        let ts = status(vmm.pid, Some(t));
        if ts.get("Seccomp").map(String::as_str) != Some("2")
            || ts.get("NoNewPrivs").map(String::as_str) != Some("1")
        {
            wrong.push(format!(
                "{id}: thread {t} ({:?}) Seccomp {:?} NoNewPrivs {:?}",
                ts.get("Name"),
                ts.get("Seccomp"),
                ts.get("NoNewPrivs")
            ));
        }
    }
    // Its root is the jail directory: the same inode, holding the vsock socket and no /etc.
    let proc_root = Path::new("/proc").join(vmm.pid.to_string()).join("root");
    println!(
        "jail: {id}: /proc/{}/root -> {:?} (jail {})",
        vmm.pid,
        std::fs::read_link(&proc_root),
        vmm.root.display()
    );
    match (std::fs::metadata(&proc_root), std::fs::metadata(&vmm.root)) {
        (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()) => {}
        (a, b) => wrong.push(format!(
            "{id}: /proc/{}/root is not the jail {}: {:?} vs {:?}",
            vmm.pid,
            vmm.root.display(),
            a.map(|m| (m.dev(), m.ino())),
            b.map(|m| (m.dev(), m.ino()))
        )),
    }
    if !proc_root.join("vsock.sock").exists() || proc_root.join("etc").exists() {
        wrong.push(format!(
            "{id}: the VMM's / is not the jail (vsock.sock {}, etc {})",
            proc_root.join("vsock.sock").exists(),
            proc_root.join("etc").exists()
        ));
    }
    // Its namespaces are its own; it is PID 1 of its PID namespace.
    let nspid: Vec<String> = st
        .get("NSpid")
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    if nspid != [vmm.pid.to_string(), "1".to_owned()] {
        wrong.push(format!("{id}: NSpid {nspid:?}, want [{}, 1]", vmm.pid));
    }
    for ns in ["mnt", "ipc", "uts", "net", "pid"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
        let its = std::fs::read_link(format!("/proc/{}/ns/{ns}", vmm.pid)).ok();
        if its.is_none() || its == mine {
            wrong.push(format!("{id}: {ns} namespace {its:?}, the host's {mine:?}"));
        }
    }
    wrong
}

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().timeout(Duration::from_secs(1500)))]
    fn jailed_vmms_run_unprivileged_in_their_own_root_and_are_cleaned_up_when_killed() {
        assert!(carapace_tests::is_root(), "needs root (containerd, mounts)");
        let (tmp, state, ctrd) =
            // the defaults: both jails on
            carapace_world("carapace-jail-", |_| String::new()).expect("containerd with Carapace");
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            panic!(
                "{what}: {e}\n{}\ncontainerd log (end):\n{}",
                sandbox_log_tails(&state, 30),
                ctrd.log().lines().rev().take(100).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        };

        // `carapace check` with the same configuration: jailing works here.
        let check = std::process::Command::new(workspace_bin("carapace"))
            .arg("--config")
            .arg(tmp.path().join("configuration.toml"))
            .args(["check", "--format", "json"])
            .output()
            .expect("carapace check");
        let checks: serde_json::Value = serde_json::from_slice(&check.stdout)
            .unwrap_or_else(|e| fail("carapace check output", &format!("{e}: {}", String::from_utf8_lossy(&check.stdout))));
        for name in ["VMM jail", "jail uid range", "fs daemon jail"] {
            let c = checks.as_array().and_then(|a| a.iter().find(|c| c["name"] == name));
            println!("jail: check {name}: {c:?}");
            assert!(c.is_some_and(|c| c["ok"] == true), "check {name}: {c:?}");
        }

        let t = Instant::now();
        for id in ["j1", "j2"] {
            ctr(&ctrd, 240, &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "600"])
                .unwrap_or_else(|e| fail(&format!("run {id}"), &e));
        }
        println!("jail: two jailed sandboxes up in {:.1} s", t.elapsed().as_secs_f64());
        // the VMs work: an exec in each
        for id in ["j1", "j2"] {
            let out = ctr(&ctrd, 120, &["task", "exec", "--exec-id", "e1", id, "echo", "hello-from-the-jail"])
                .unwrap_or_else(|e| fail(&format!("exec in {id}"), &e));
            assert_eq!(out.trim(), "hello-from-the-jail");
        }
        let vmms: Vec<JailedVmm> = ["j1", "j2"]
            .iter()
            .map(|id| jailed_vmm(&state, id).unwrap_or_else(|| fail(&format!("{id}: no jailed VMM in its state"), &"")))
            .collect();
        let mut wrong: Vec<String> = vmms
            .iter()
            .zip(["j1", "j2"])
            .flat_map(|(v, id)| jail_findings(id, v))
            .collect();
        if vmms[0].uid == vmms[1].uid {
            wrong.push(format!("both sandboxes run as uid {}", vmms[0].uid));
        }
        let mut want = vec![vmms[0].uid, vmms[1].uid];
        want.sort();
        if claimed_uids(&state) != want {
            wrong.push(format!("claims {:?}, want {want:?}", claimed_uids(&state)));
        }
        // The fs daemons: each root of its own id block (host uid = the block's first id),
        // the block the one of its sandbox's VMM uid, under its filter, and the guest sees
        // and writes real ids through it.
        for (id, vmm) in ["j1", "j2"].iter().zip(&vmms) {
            let Some(fsd) = jailed_fsd(&state, id) else {
                wrong.push(format!("{id}: no jailed fs daemon in its state"));
                continue;
            };
            let want_base = FS_UID_BASE + (vmm.uid - UID_BASE) * 65536;
            if (fsd.base, fsd.count) != (want_base, 65536) {
                wrong.push(format!("{id}: fs block {}:{}, want {want_base}:65536", fsd.base, fsd.count));
            }
            let st = status(fsd.pid, None);
            let base = fsd.base.to_string();
            for key in ["Uid", "Gid"] {
                let v = st.get(key).map(|v| v.split_whitespace().collect::<Vec<_>>());
                if v.as_deref() != Some(&[&*base, &*base, &*base, &*base][..]) {
                    wrong.push(format!("{id}: fs daemon {key} {v:?}, want {base} in all four"));
                }
            }
            for (key, want) in [("NoNewPrivs", "1"), ("Seccomp", "2"), ("Groups", "")] {
                if st.get(key).map(String::as_str) != Some(want) {
                    wrong.push(format!("{id}: fs daemon {key} {:?}, want {want}", st.get(key)));
                }
            }
            let map = std::fs::read_to_string(format!("/proc/{}/uid_map", fsd.pid)).unwrap_or_default();
            if map.split_whitespace().collect::<Vec<_>>() != ["0", &*base, "65536"] {
                wrong.push(format!("{id}: fs daemon uid_map {map:?}"));
            }
            // Real ids in the guest: a file of the image is root's, a new one chowned to 1000
            // is 1000 on the host's side of the container's rootfs.
            let out = ctr(&ctrd, 120, &["task", "exec", "--exec-id", "e2", id, "sh", "-c",
                "stat -c %u /bin/busybox && touch /owned && chown 1000:1000 /owned && stat -c %u:%g /owned"])
                .unwrap_or_else(|e| fail(&format!("ids in {id}"), &e));
            if out.split_whitespace().collect::<Vec<_>>() != ["0", "1000:1000"] {
                wrong.push(format!("{id}: the guest sees {out:?}, want 0 and 1000:1000"));
            }
            let bundle_file = tmp.path().join("containerd/state/io.containerd.runtime.v2.task/carapace-test").join(id).join("rootfs/owned");
            match std::fs::metadata(&bundle_file) {
                Ok(m) if (m.uid(), m.gid()) == (1000, 1000) => {}
                Ok(m) => wrong.push(format!("{id}: {} is {}:{} on the host, want 1000:1000", bundle_file.display(), m.uid(), m.gid())),
                Err(e) => wrong.push(format!("{id}: {}: {e}", bundle_file.display())),
            }
        }
        if !wrong.is_empty() {
            fail("the jail", &wrong.join("\n"));
        }

        // SIGKILL j1's VMM: the task stops, delete cleans everything of it, j2 is untouched.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vmms[0].pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the VMM");
        let deadline = Instant::now() + Duration::from_secs(120);
        while task_status(&ctrd, "j1").as_deref() == Some("RUNNING") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
        }
        let settled = task_status(&ctrd, "j1");
        if settled.as_deref() == Some("RUNNING") {
            fail("j1 after its VMM was killed", &"still RUNNING after 120 s");
        }
        if let Err(e) = ctr(&ctrd, 120, &["task", "delete", "j1"]) {
            ctr(&ctrd, 120, &["task", "delete", "-f", "j1"])
                .unwrap_or_else(|e2| fail("task delete j1", &format!("{e}; -f: {e2}")));
        }
        ctr(&ctrd, 60, &["container", "delete", "j1"]).unwrap_or_else(|e| fail("container delete j1", &e));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut left = Vec::new();
            if vmms[0].root.exists() {
                left.push(format!("jail directory {}", vmms[0].root.display()));
            }
            if state.join("j1").exists() {
                left.push("j1's state directory".to_owned());
            }
            if claimed_uids(&state) != [vmms[1].uid] {
                left.push(format!("claims {:?}, want only j2's {}", claimed_uids(&state), vmms[1].uid));
            }
            let fs_uid = FS_UID_BASE + (vmms[0].uid - UID_BASE) * 65536;
            for uid in [vmms[0].uid, fs_uid] {
                let procs = processes_of_uid(uid);
                if !procs.is_empty() {
                    left.push(format!("processes of uid {uid}: {procs:?}"));
                }
            }
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                fail("after j1's VMM was killed and its task deleted", &left.join("; "));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        println!("jail: j1 killed (task {settled:?}) and deleted: jail directory and uid {} gone", vmms[0].uid);
        let j2 = jail_findings("j2", &vmms[1]);
        if !j2.is_empty() {
            fail("j2 after j1 was removed", &j2.join("\n"));
        }

        // SIGTERM j2's VMM: as its PID namespace's init it ends only because it handles the
        // signal (vmm/src/term.rs); nobody escalates to SIGKILL here.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vmms[1].pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM the VMM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{}/exe", vmms[1].pid)).exists() {
            if Instant::now() > deadline {
                fail("j2's VMM after SIGTERM", &"still running after 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("jail: j2's VMM ended on SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(120);
        while task_status(&ctrd, "j2").as_deref() == Some("RUNNING") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
        }
        if task_status(&ctrd, "j2").as_deref() == Some("RUNNING") {
            fail("j2 after its VMM ended", &"still RUNNING after 120 s");
        }
        if let Err(e) = ctr(&ctrd, 120, &["task", "delete", "j2"]) {
            ctr(&ctrd, 120, &["task", "delete", "-f", "j2"])
                .unwrap_or_else(|e2| fail("task delete j2", &format!("{e}; -f: {e2}")));
        }
        ctr(&ctrd, 60, &["container", "delete", "j2"]).unwrap_or_else(|e| fail("container delete j2", &e));
        let deadline = Instant::now() + Duration::from_secs(20);
        while (!claimed_uids(&state).is_empty() || state.join("j2").exists() || state.join(".jail-uids").exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(300));
        }
        assert_eq!(claimed_uids(&state), Vec::<u32>::new(), "claims left");
        // nothing at all is left in the state directory, not even the claims directory
        let left: Vec<_> = std::fs::read_dir(&state)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "state left: {left:?}");
        drop(tmp);
    }
}
