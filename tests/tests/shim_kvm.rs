//! `ctr` -> containerd -> containerd-shim-carapace-v2 -> carapace-vmm + carapace-fsd -> the
//! guest agent in a real microVM: the container runs on the guest kernel, not the host's.
//! Where this host cannot boot guests the test runs inside the lab.

use std::path::Path;
use std::time::Duration;

use carapace_tests::containerd::{
    BUSYBOX_IMAGE as IMAGE, CARAPACE_RUNTIME as RUNTIME, ContainerdError, carapace_config,
    sandbox_logs, with_carapace,
};
use carapace_tests::{kvm_test, workspace_bin};

const GUEST_DIR: &str = "/var/lib/carapace/guest";

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().timeout(Duration::from_secs(1200)))]
    fn ctr_runs_a_container_in_a_carapace_microvm() {
        assert!(carapace_tests::is_root(), "needs root (containerd, mounts)");
        assert!(
            Path::new(GUEST_DIR).join("vmlinux").is_file(),
            "guest image missing: make image"
        );
        let tmp = tempfile::Builder::new().prefix("carapace-shimvm-").tempdir().expect("tempdir");
        let shim = workspace_bin("containerd-shim-carapace-v2");
        let bins = shim.parent().expect("bin dir");
        let (config, state) = carapace_config(tmp.path(), bins, true).expect("config");
        let ctrd = with_carapace(tmp.path(), bins, &[("CARAPACE_CONFIG", config.as_path())])
            .expect("containerd with Carapace");
        let ctr = |args: &[&str]| -> Result<String, ContainerdError> {
            ctrd.ctr(args).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            let logs = sandbox_logs(&state);
            panic!("{what}: {e}\n{logs}\ncontainerd log:\n{}", ctrd.log());
        };

        // the guest's kernel, not the host's
        let host = String::from_utf8_lossy(
            &std::process::Command::new("uname").arg("-r").output().expect("uname").stdout,
        )
        .trim()
        .to_owned();
        let out = ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "vm1", "uname", "-r"])
            .unwrap_or_else(|e| fail("ctr run", &e));
        let guest = out.trim();
        assert!(!guest.is_empty() && guest != host, "guest kernel {guest:?} vs host {host:?}");
        let image = std::fs::read_to_string(Path::new(GUEST_DIR).join("image.json"))
            .unwrap_or_default();
        assert!(image.contains(guest.split('-').next().unwrap_or(guest)), "{guest} not in {image}");

        // exit codes come back
        match ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "vm2", "sh", "-c", "exit 7"]) {
            Err(ContainerdError::Ctr { status: Some(7), .. }) => {}
            other => fail("exit status 7 expected", &format!("{other:?}")),
        }

        // exec into a running VM container, then kill and delete it
        ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, "vm3", "sleep", "600"])
            .unwrap_or_else(|e| fail("ctr run -d", &e));
        let out = ctr(&["task", "exec", "--exec-id", "e1", "vm3", "sh", "-c", "echo in-vm $(hostname)"])
            .unwrap_or_else(|e| fail("ctr task exec", &e));
        assert!(out.starts_with("in-vm "), "{out}");
        // the VMM and the fs daemon live in the container's host cgroup (ctr's cgroupsPath
        // is /<namespace>/<id>), which goes with the container
        let cgroup_of = |name: &str| -> String {
            let pid = std::process::Command::new("pgrep").args(["-f", name]).output().expect("pgrep");
            let pid = String::from_utf8_lossy(&pid.stdout).lines().next().unwrap_or_default().to_owned();
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
        };
        for name in ["carapace-vmm", "carapace-fsd"] {
            let cg = cgroup_of(name);
            assert!(cg.trim_end().ends_with("/vm3"), "{name} is in {cg:?}");
        }
        let cgroup_dir = std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().map(|e| e.path().join("vm3")).find(|p| p.is_dir()))
            .ok()
            .flatten();
        assert!(cgroup_dir.is_some(), "no host cgroup named vm3");
        ctr(&["task", "kill", "-s", "SIGKILL", "vm3"]).unwrap_or_else(|e| fail("kill", &e));
        let mut stopped = false;
        for _ in 0..300 {
            if ctr(&["task", "ls"]).unwrap_or_default().contains("STOPPED") {
                stopped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(stopped, "the killed task never showed as STOPPED");
        ctr(&["task", "delete", "vm3"]).unwrap_or_else(|e| fail("task delete", &e));
        ctr(&["container", "delete", "vm3"]).unwrap_or_else(|e| fail("container delete", &e));

        // every sandbox is gone: no state, no VMM, no fs daemon
        let left: Vec<_> = std::fs::read_dir(&state)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "sandbox state left: {left:?}");
        if let Some(dir) = cgroup_dir {
            assert!(!dir.exists(), "host cgroup {} left", dir.display());
        }
        for name in ["carapace-vmm", "carapace-fsd"] {
            let out = std::process::Command::new("pgrep").args(["-f", name]).output().expect("pgrep");
            assert!(out.stdout.is_empty(), "{name} still running: {}", String::from_utf8_lossy(&out.stdout));
        }
    }
}

kvm_test! {
    /// A CRI pod through `ctr --annotation`: the sandbox boots the pod's VM, the container
    /// joins it (same guest boot id, one VMM), and a volume bound into both shows the same
    /// files on the guest side. Deleting the container keeps the VM; deleting the sandbox
    /// last stops it and leaves nothing.
    #[lab(carapace_tests::lab::Lab::new().timeout(Duration::from_secs(1500)))]
    fn ctr_runs_a_pod_in_one_microvm() {
        assert!(carapace_tests::is_root(), "needs root (containerd, mounts)");
        assert!(
            Path::new(GUEST_DIR).join("vmlinux").is_file(),
            "guest image missing: make image"
        );
        let tmp = tempfile::Builder::new().prefix("carapace-shimpod-").tempdir().expect("tempdir");
        let shim = workspace_bin("containerd-shim-carapace-v2");
        let bins = shim.parent().expect("bin dir");
        let (config, state) = carapace_config(tmp.path(), bins, true).expect("config");
        let vol = tmp.path().join("vol");
        std::fs::create_dir(&vol).expect("volume");
        let ctrd = with_carapace(tmp.path(), bins, &[("CARAPACE_CONFIG", config.as_path())])
            .expect("containerd with Carapace");
        let ctr = |args: &[&str]| -> Result<String, ContainerdError> {
            ctrd.ctr(args).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            let logs = sandbox_logs(&state);
            panic!("{what}: {e}\n{logs}\ncontainerd log:\n{}", ctrd.log());
        };
        let count = |name: &str| {
            let out = std::process::Command::new("pgrep").args(["-c", "-f", name]).output().expect("pgrep");
            String::from_utf8_lossy(&out.stdout).trim().parse::<usize>().unwrap_or(0)
        };
        let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
        for (id, kind) in [("pod1", "sandbox"), ("c1", "container")] {
            let ty = format!("io.kubernetes.cri.container-type={kind}");
            ctr(&[
                "run", "-d", "--runtime", RUNTIME, "--annotation", &ty, "--annotation",
                "io.kubernetes.cri.sandbox-id=pod1", "--mount", &mount, IMAGE, id, "sleep", "600",
            ])
            .unwrap_or_else(|e| fail(&format!("ctr run -d {id}"), &e));
        }
        assert_eq!(count("carapace-vmm"), 1, "one VM for the pod");
        let exec = |id: &str, exec_id: &str, script: &str| {
            ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script])
                .unwrap_or_else(|e| fail(&format!("exec in {id}"), &e))
        };
        let boot = |id: &str, exec_id: &str| exec(id, exec_id, "cat /proc/sys/kernel/random/boot_id");
        let (b1, b2) = (boot("pod1", "b1"), boot("c1", "b2"));
        let host = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("host boot id");
        assert!(!b1.trim().is_empty() && b1 == b2, "one guest kernel: {b1:?} vs {b2:?}");
        assert_ne!(b1, host, "the guest's kernel, not the host's");

        // the same host dir bound into both containers shows the same files in the guest
        exec("pod1", "w1", "echo written-by-pod1 > /data/f");
        assert_eq!(exec("c1", "r1", "cat /data/f").trim(), "written-by-pod1");
        exec("c1", "w2", "echo written-by-c1 > /data/g");
        assert_eq!(exec("pod1", "r2", "cat /data/g").trim(), "written-by-c1");
        assert_eq!(std::fs::read_to_string(vol.join("g")).expect("on the host").trim(), "written-by-c1");

        let stop = |id: &str| {
            ctr(&["task", "kill", "-s", "SIGKILL", id]).unwrap_or_else(|e| fail("kill", &e));
            let mut stopped = false;
            for _ in 0..300 {
                let ls = ctr(&["task", "ls"]).unwrap_or_default();
                if ls.lines().any(|l| l.split_whitespace().next() == Some(id) && l.contains("STOPPED")) {
                    stopped = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            assert!(stopped, "{id} never showed as STOPPED");
            ctr(&["task", "delete", id]).unwrap_or_else(|e| fail("task delete", &e));
            ctr(&["container", "delete", id]).unwrap_or_else(|e| fail("container delete", &e));
        };
        // the container goes, the pod's VM stays
        stop("c1");
        assert_eq!(count("carapace-vmm"), 1, "the pod's VM stays");
        assert_eq!(exec("pod1", "e3", "echo still-here").trim(), "still-here");
        // the sandbox goes: everything goes
        stop("pod1");
        let left: Vec<_> = std::fs::read_dir(&state)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "sandbox state left: {left:?}");
        for name in ["carapace-vmm", "carapace-fsd"] {
            assert_eq!(count(name), 0, "{name} still running");
        }
        assert!(vol.join("f").exists(), "the volume's files stay");
    }
}

/// A private containerd with Carapace booting real microVMs; state under the returned dir.
fn vm_world(
    prefix: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    carapace_tests::containerd::Containerd,
) {
    carapace_tests::containerd::carapace_world(prefix, |_| String::new())
        .expect("containerd with Carapace")
}

kvm_test! {
    /// `ctr task pause/resume` freeze and thaw the container inside the VM, `ctr task
    /// metrics` reads its guest cgroup, and an OOM kill in the guest becomes a TaskOOM event.
    #[lab(carapace_tests::lab::Lab::new().timeout(Duration::from_secs(1500)))]
    fn pause_resume_metrics_and_oom_in_a_microvm() {
        assert!(carapace_tests::is_root(), "needs root (containerd, mounts)");
        let (_tmp, state, ctrd) = vm_world("carapace-shimvm2-");
        let ctr = |args: &[&str]| -> Result<String, ContainerdError> {
            ctrd.ctr(args).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            let mut logs = String::new();
            for entry in std::fs::read_dir(&state).into_iter().flatten().flatten() {
                for log in ["vmm.log", "console.log"] {
                    let text = std::fs::read_to_string(entry.path().join(log)).unwrap_or_default();
                    logs.push_str(&format!("--- {log}\n{text}\n"));
                }
            }
            panic!("{what}: {e}\n{logs}\ncontainerd log:\n{}", ctrd.log());
        };
        let status = |id: &str| {
            let ls = ctr(&["task", "ls"]).unwrap_or_else(|e| fail("task ls", &e));
            ls.lines()
                .find(|l| l.split_whitespace().next() == Some(id))
                .and_then(|l| l.split_whitespace().nth(2))
                .unwrap_or_default()
                .to_owned()
        };
        ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, "vp", "sleep", "600"])
            .unwrap_or_else(|e| fail("ctr run -d", &e));
        ctr(&["task", "pause", "vp"]).unwrap_or_else(|e| fail("pause", &e));
        assert_eq!(status("vp"), "PAUSED");
        ctr(&["task", "resume", "vp"]).unwrap_or_else(|e| fail("resume", &e));
        assert_eq!(status("vp"), "RUNNING");
        let table = ctr(&["task", "metrics", "vp"]).unwrap_or_else(|e| fail("metrics", &e));
        let metric = |key: &str| {
            table.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(key)).then(|| f.next()?.parse::<u64>().ok())?
            })
        };
        assert!(metric("pids.current").is_some_and(|n| n >= 1), "{table}");
        assert!(metric("memory.usage").is_some_and(|n| n > 0), "{table}");
        ctr(&["task", "kill", "-s", "SIGKILL", "vp"]).unwrap_or_else(|e| fail("kill", &e));
        for _ in 0..300 {
            if status("vp") == "STOPPED" {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        ctr(&["task", "delete", "vp"]).unwrap_or_else(|e| fail("task delete", &e));
        ctr(&["container", "delete", "vp"]).unwrap_or_else(|e| fail("container delete", &e));

        let mut events = ctrd
            .ctr_command()
            .arg("events")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("ctr events");
        std::thread::sleep(Duration::from_millis(500));
        let hog = "a=$(head -c 200000000 /dev/zero | tr '\\000' a); echo survived";
        let r = ctr(&[
            "run", "--rm", "--runtime", RUNTIME, "--memory-limit", "16777216", IMAGE, "voom",
            "sh", "-c", hog,
        ]);
        let _ = events.kill();
        let out = events.wait_with_output().expect("ctr events output");
        let text = String::from_utf8_lossy(&out.stdout);
        if !matches!(r, Err(ContainerdError::Ctr { status: Some(137), .. })) {
            fail("the hog is OOM-killed", &format!("{r:?}"));
        }
        assert!(
            text.lines().any(|l| l.contains("/tasks/oom") && l.contains("voom")),
            "no TaskOOM event for voom:\n{text}"
        );
    }
}
