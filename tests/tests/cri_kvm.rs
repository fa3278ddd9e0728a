//! Kubernetes' path: a CRI client -> containerd's CRI plugin -> runtime handler `carapace`
//! -> containerd-shim-carapace-v2 -> one microVM per pod. A pod with two containers that
//! share a volume runs in one VM (same guest boot id, guest kernel), logs are read, ExecSync
//! works, the pod is stopped and removed, and nothing is left behind. Two runtime handlers
//! whose runtime options name two configurations (two RuntimeClasses) give two VM shapes.
//! Where this host cannot boot guests the test runs inside the lab.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use carapace_tests::containerd::{BIG_HANDLER, BUSYBOX_IMAGE, CarapaceCri, mounts_under};
use carapace_tests::cri::{ContainerSpec, Cri, PodNetwork, PodSpec, log_text};
use carapace_tests::kvm_test;

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("boot id")
        .trim()
        .to_owned()
}

fn running(name: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-af", name])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .collect::<Vec<_>>()
        .join("\n")
}

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().mem_mib(4096).timeout(Duration::from_secs(1200)))]
    fn a_two_container_pod_runs_in_one_microvm_through_cri() {
        let tmp = tempfile::Builder::new().prefix("ccri-").tempdir().expect("tempdir");
        let rig = CarapaceCri::start(tmp.path());
        let (ctrd, state) = (&rig.ctrd, &rig.state);
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! { rig.fail(what, e) };
        let mut cri = Cri::connect(&ctrd.socket()).expect("connect");

        let pod = PodSpec {
            name: "vm-pod".into(),
            namespace: "default".into(),
            handler: "carapace".into(),
            log_dir: tmp.path().join("logs"),
            privileged: false,
            network: PodNetwork::Cni { ports: vec![] },
        };
        let shared = tmp.path().join("empty-dir");
        std::fs::create_dir_all(&shared).expect("volume");
        let pod_id = cri.run_pod(&pod).unwrap_or_else(|e| fail("RunPodSandbox", &e));

        // the first container writes into the shared volume and stays up
        let writer = ContainerSpec {
            name: "writer".into(),
            image: BUSYBOX_IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo from-writer > /data/note; cat /proc/sys/kernel/random/boot_id; \
                 for n in ipc uts pid; do readlink /proc/self/ns/$n; done; exec sleep 600"
                    .into(),
            ],
            mounts: vec![(shared.clone(), "/data".into())],
            ..Default::default()
        };
        let w = cri
            .create_container(&pod_id, &pod, &writer)
            .unwrap_or_else(|e| fail("CreateContainer writer", &e));
        cri.start_container(&w).unwrap_or_else(|e| fail("StartContainer writer", &e));

        // ExecSync in it: the guest's kernel, not the host's
        let (code, release, err) = cri
            .exec_sync(&w, &["uname", "-r"], Duration::from_secs(300))
            .unwrap_or_else(|e| fail("ExecSync", &e));
        let host_release = String::from_utf8_lossy(
            &Command::new("uname").arg("-r").output().expect("uname").stdout,
        )
        .trim()
        .to_owned();
        assert_eq!(code, 0, "uname in the pod: {err}");
        assert!(
            !release.trim().is_empty() && release.trim() != host_release,
            "pod kernel {release:?} vs host {host_release:?}"
        );

        // the second container reads the note and reports its VM's boot id
        let reader = ContainerSpec {
            name: "reader".into(),
            image: BUSYBOX_IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "while [ ! -e /data/note ]; do sleep 0.2; done; cat /data/note; \
                 cat /proc/sys/kernel/random/boot_id; \
                 for n in ipc uts pid; do readlink /proc/self/ns/$n; done; exit 4"
                    .into(),
            ],
            mounts: vec![(shared, "/data".into())],
            ..Default::default()
        };
        let r = cri
            .create_container(&pod_id, &pod, &reader)
            .unwrap_or_else(|e| fail("CreateContainer reader", &e));
        cri.start_container(&r).unwrap_or_else(|e| fail("StartContainer reader", &e));
        let code = cri
            .wait_exited(&r, Duration::from_secs(300))
            .unwrap_or_else(|e| fail("reader exit", &e));
        assert_eq!(code, 4, "the reader's exit code comes back");

        let reader_log = log_text(&pod.log_dir.join("reader.log")).expect("reader log");
        let writer_log = log_text(&pod.log_dir.join("writer.log")).expect("writer log");
        let mut lines = reader_log.lines();
        assert_eq!(lines.next(), Some("from-writer"), "reader log: {reader_log:?}");
        let reader_boot = lines.next().unwrap_or_default().to_owned();
        let writer_boot = writer_log.lines().next().unwrap_or_default().to_owned();
        assert_eq!(reader_boot.len(), 36, "reader log: {reader_log:?}");
        assert_eq!(reader_boot, writer_boot, "both containers run in the pod's one VM");
        // and share the pod's ipc, uts and (pod-wide pid mode) pid namespaces, the pause
        // container's, as on runc
        let rest = |log: &str, skip: usize| -> Vec<String> {
            log.lines().skip(skip).take(3).map(str::to_owned).collect()
        };
        let (r_ns, w_ns) = (rest(&reader_log, 2), rest(&writer_log, 1));
        assert_eq!(r_ns.len(), 3, "reader log: {reader_log:?}");
        for (line, kind) in r_ns.iter().zip(["ipc:[", "uts:[", "pid:["]) {
            assert!(line.starts_with(kind), "{r_ns:?}");
        }
        assert_eq!(r_ns, w_ns, "pod namespaces: reader {reader_log:?}, writer {writer_log:?}");
        assert_ne!(reader_boot, host_boot_id(), "the pod runs in a VM, not on the host");
        let vmms = running("carapace-vmm");
        assert_eq!(vmms.lines().count(), 1, "one VM for the whole pod: {vmms}");

        // stop and remove the pod: its VM and everything around it goes
        cri.remove_pod(&pod_id).unwrap_or_else(|e| fail("remove pod", &e));
        assert!(cri.pods().expect("list pods").is_empty());
        let left: Vec<_> = std::fs::read_dir(state)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "sandbox state left: {left:?}");
        for name in ["carapace-vmm", "carapace-fsd", "containerd-shim-carapace"] {
            // the shim exits right after answering its last request: give it a moment
            let mut p = running(name);
            for _ in 0..300 {
                if p.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
                p = running(name);
            }
            assert!(p.is_empty(), "{name} still running: {p}\ncontainerd log:\n{}", ctrd.log());
        }
        let m = mounts_under(state);
        assert!(m.is_empty(), "mounts left under {}: {m:?}", state.display());
    }
}

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().mem_mib(4096).timeout(Duration::from_secs(1200)))]
    fn two_runtime_classes_give_two_vm_shapes() {
        let tmp = tempfile::Builder::new().prefix("cshape-").tempdir().expect("tempdir");
        let rig = CarapaceCri::start(tmp.path());
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! { rig.fail(what, e) };
        let mut cri = Cri::connect(&rig.ctrd.socket()).expect("connect");
        // what a pod's VM shows its containers, under each handler
        let mut shape = |handler: &str| -> (u32, u64) {
            let pod = PodSpec {
                name: format!("shape-{handler}"),
                namespace: "default".into(),
                handler: handler.into(),
                log_dir: tmp.path().join(format!("logs-{handler}")),
                privileged: false,
                network: PodNetwork::Cni { ports: vec![] },
            };
            let pod_id = cri.run_pod(&pod).unwrap_or_else(|e| fail("RunPodSandbox", &e));
            let probe = ContainerSpec {
                name: "probe".into(),
                image: BUSYBOX_IMAGE.into(),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "nproc; sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo".into(),
                ],
                ..Default::default()
            };
            let c = cri
                .create_container(&pod_id, &pod, &probe)
                .unwrap_or_else(|e| fail(&format!("CreateContainer under {handler}"), &e));
            cri.start_container(&c).unwrap_or_else(|e| fail("StartContainer", &e));
            let code = cri
                .wait_exited(&c, Duration::from_secs(300))
                .unwrap_or_else(|e| fail("probe exit", &e));
            let log = log_text(&pod.log_dir.join("probe.log")).expect("probe log");
            assert_eq!(code, 0, "{handler}: {log:?}");
            cri.remove_pod(&pod_id).unwrap_or_else(|e| fail("remove pod", &e));
            let mut lines = log.lines().map(|l| l.trim().parse::<u64>());
            match (lines.next(), lines.next()) {
                (Some(Ok(cpus)), Some(Ok(kib))) => (cpus as u32, kib),
                _ => panic!("{handler}: probe printed {log:?}"),
            }
        };
        let (cpus, kib) = shape("carapace");
        let (big_cpus, big_kib) = shape(BIG_HANDLER);
        // BIG_SHAPE: 2 vCPUs, 768 MiB against the defaults' 1 vCPU, 256 MiB (MemTotal is
        // a little less than the VM's memory: the kernel keeps some)
        assert_eq!((cpus, big_cpus), (1, 2), "vCPUs under carapace and {BIG_HANDLER}");
        assert!(kib < 256 * 1024 && kib > 128 * 1024, "default MemTotal {kib} KiB");
        assert!(
            big_kib < 768 * 1024 && big_kib > 512 * 1024,
            "{BIG_HANDLER} MemTotal {big_kib} KiB"
        );
        assert!(cri.pods().expect("list pods").is_empty());
    }
}

kvm_test! {
    /// What a kubelet reads: ContainerStats from the guest's cgroup, PodSandboxStats from
    /// the pod's host cgroup (the VMM and fs daemon are charged there, so the pod's memory is
    /// its containers' plus the VM's overhead, which the test prints: the figure behind the
    /// RuntimeClass's `overhead.podFixed`), and a container killed by the guest's OOM killer
    /// shows reason OOMKilled.
    #[lab(carapace_tests::lab::Lab::new().mem_mib(4096).timeout(Duration::from_secs(1200)))]
    fn stats_overhead_and_oom_killed_through_cri() {
        let tmp = tempfile::Builder::new().prefix("cstat-").tempdir().expect("tempdir");
        let rig = CarapaceCri::start(tmp.path());
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! { rig.fail(what, e) };
        let mut cri = Cri::connect(&rig.ctrd.socket()).expect("connect");
        // a kubelet's cgroupfs-driver pod cgroup (containerd's default driver here)
        let parent = format!("/carapace-test-pod-{}", std::process::id());
        let pod = PodSpec {
            name: "stats-pod".into(),
            namespace: "default".into(),
            handler: "carapace".into(),
            log_dir: tmp.path().join("logs"),
            privileged: false,
            network: PodNetwork::Cni { ports: vec![] },
        };
        let pod_id = cri
            .run_pod_in_cgroup(&pod, &parent)
            .unwrap_or_else(|e| fail("RunPodSandbox", &e));
        let busy = ContainerSpec {
            name: "busy".into(),
            image: BUSYBOX_IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo counted; exec sleep 600"
                    .into(),
            ],
            ..Default::default()
        };
        let b = cri
            .create_container(&pod_id, &pod, &busy)
            .unwrap_or_else(|e| fail("CreateContainer busy", &e));
        cri.start_container(&b).unwrap_or_else(|e| fail("StartContainer busy", &e));
        let log = pod.log_dir.join("busy.log");
        let start = std::time::Instant::now();
        while !log_text(&log).unwrap_or_default().contains("counted") {
            assert!(start.elapsed() < Duration::from_secs(300), "busy never counted");
            std::thread::sleep(Duration::from_millis(200));
        }

        let usage = cri.container_usage(&b).unwrap_or_else(|e| fail("ContainerStats", &e));
        println!("ContainerStats busy: {usage:?}");
        assert!(usage.cpu_ns > 0, "no CPU time for a container that counted: {usage:?}");
        assert!(usage.working_set > 0, "no memory for a running container: {usage:?}");

        let (pod_usage, containers) =
            cri.pod_usage(&pod_id).unwrap_or_else(|e| fail("PodSandboxStats", &e));
        println!("PodSandboxStats: pod {pod_usage:?}, containers {containers:?}");
        assert!(pod_usage.cpu_ns > 0 && pod_usage.working_set > 0, "{pod_usage:?}");
        let in_containers: u64 = containers.iter().map(|(_, u)| u.working_set).sum();
        assert!(
            containers.iter().any(|(name, u)| name == "busy" && u.working_set > 0),
            "PodSandboxStats lists no busy container: {containers:?}"
        );
        // the pod's host cgroup holds the VM: more than its containers use inside it
        assert!(
            pod_usage.working_set > in_containers,
            "pod {} B <= containers {in_containers} B",
            pod_usage.working_set
        );
        println!(
            "pod overhead (host cgroup working set - containers' working sets): {} MiB",
            (pod_usage.working_set - in_containers) / (1024 * 1024)
        );

        // over its memory limit in the guest: the kernel kills it, CRI says why
        let hog = ContainerSpec {
            name: "hog".into(),
            image: BUSYBOX_IMAGE.into(),
            // tail keeps a line until its end: one 200 MB line
            command: vec!["sh".into(), "-c".into(), "head -c 200000000 /dev/zero | tail".into()],
            resources: Some(carapace_tests::cri::LinuxContainerResources {
                memory_limit_in_bytes: 32 * 1024 * 1024,
                ..Default::default()
            }),
            ..Default::default()
        };
        let h = cri
            .create_container(&pod_id, &pod, &hog)
            .unwrap_or_else(|e| fail("CreateContainer hog", &e));
        cri.start_container(&h).unwrap_or_else(|e| fail("StartContainer hog", &e));
        cri.wait_exited(&h, Duration::from_secs(300))
            .unwrap_or_else(|e| fail("hog exit", &e));
        let (state, code, reason) =
            cri.container_reason(&h).unwrap_or_else(|e| fail("ContainerStatus hog", &e));
        println!("hog: {state}, exit {code}, reason {reason:?}");
        if reason != "OOMKilled" || code == 0 {
            fail("the hog is OOM-killed", &format!("{state}, exit {code}, reason {reason:?}"));
        }

        cri.remove_pod(&pod_id).unwrap_or_else(|e| fail("remove pod", &e));
        assert!(cri.pods().expect("list pods").is_empty());
        // the runtime removed the sandbox's cgroup; the parent is the kubelet's to remove
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu,cpuacct"] {
            let dir = Path::new(root).join(parent.trim_start_matches('/'));
            if dir.is_dir() {
                let left: Vec<_> = std::fs::read_dir(&dir)
                    .expect("read pod cgroup")
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name())
                    .collect();
                assert!(left.is_empty(), "cgroups left under {}: {left:?}", dir.display());
                std::fs::remove_dir(&dir).expect("remove the pod cgroup");
            }
        }
    }
}
