//! A pod's VM is sized to its containers through containerd's CRI, as a kubelet drives it:
//! a container asking 2 CPUs / 512 MiB brings that many more vCPUs online and plugs that
//! much memory (virtio-mem) before it starts, UpdateContainerResources resizes the VM, a
//! second container joining grows it, removing a container shrinks its vCPUs, and a
//! container that would take the VM past `max_vcpus` is refused at start with an error
//! naming the maximum, leaving the pod as it was. Where this host cannot boot guests the test runs
//! inside the lab.

use std::time::Duration;

use carapace_tests::containerd::{BUSYBOX_IMAGE, CarapaceCri};
use carapace_tests::cri::{ContainerSpec, Cri, PodNetwork, PodSpec, limits};
use carapace_tests::kvm_test;

/// What the guest shows a container: (online vCPUs, MemTotal KiB).
fn shape(cri: &mut Cri, id: &str) -> Result<(u32, u64), String> {
    let (code, out, err) = cri
        .exec_sync(
            id,
            &[
                "sh",
                "-c",
                "nproc; sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
            ],
            Duration::from_secs(300),
        )
        .map_err(|e| format!("ExecSync shape in {id}: {e}"))?;
    if code != 0 {
        return Err(format!("shape probe in {id} exited {code}: {err}{out}"));
    }
    let mut lines = out.lines().map(|l| l.trim().parse::<u64>());
    match (lines.next(), lines.next()) {
        (Some(Ok(cpus)), Some(Ok(kib))) => Ok((cpus as u32, kib)),
        _ => Err(format!("shape probe in {id} printed {out:?}")),
    }
}

/// Polls the guest's shape until `ok` holds (vCPUs come online and memory is plugged
/// before CreateContainer/Update return; a short grace covers the guest's onlining of
/// hot-plugged memory blocks), returning the last shape seen.
fn shape_until(
    cri: &mut Cri,
    id: &str,
    ok: impl Fn((u32, u64)) -> bool,
) -> Result<(u32, u64), String> {
    let start = std::time::Instant::now();
    loop {
        let s = shape(cri, id)?;
        if ok(s) || start.elapsed() > Duration::from_secs(30) {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn sleeper(
    name: &str,
    resources: Option<carapace_tests::cri::LinuxContainerResources>,
) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec!["sleep".into(), "600".into()],
        resources,
        ..Default::default()
    }
}

const MIB: u64 = 1024;

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().mem_mib(4096).timeout(Duration::from_secs(1200)))]
    fn a_pod_vm_grows_and_shrinks_with_its_containers() {
        let tmp = tempfile::Builder::new().prefix("cresize-").tempdir().expect("tempdir");
        let rig = CarapaceCri::start(tmp.path());
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! { rig.fail(what, e) };
        let mut cri = Cri::connect(&rig.ctrd.socket()).expect("connect");
        let pod = PodSpec {
            name: "resize-pod".into(),
            namespace: "default".into(),
            handler: "carapace".into(),
            log_dir: tmp.path().join("logs"),
            privileged: false,
            network: PodNetwork::Cni { ports: vec![] },
        };
        let pod_id = cri.run_pod(&pod).unwrap_or_else(|e| fail("RunPodSandbox", &e));

        // a container without limits adds nothing: the defaults (1 vCPU, 256 MiB)
        let base = cri
            .create_container(&pod_id, &pod, &sleeper("base", None))
            .unwrap_or_else(|e| fail("CreateContainer base", &e));
        cri.start_container(&base).unwrap_or_else(|e| fail("StartContainer base", &e));
        let (cpus0, mem0) = shape(&mut cri, &base).unwrap_or_else(|e| fail("shape", &e));
        println!("defaults: {cpus0} vCPUs, MemTotal {mem0} KiB");
        assert_eq!(cpus0, 1, "default vCPUs");
        assert!(mem0 < 256 * MIB && mem0 > 128 * MIB, "default MemTotal {mem0} KiB");

        // 2 CPUs / 512 MiB: 2 more vCPUs online and 512 MiB plugged, seen by every
        // container of the pod
        let big = cri
            .create_container(&pod_id, &pod, &sleeper("big", Some(limits(2, 512))))
            .unwrap_or_else(|e| fail("CreateContainer big (2 CPUs, 512 MiB)", &e));
        cri.start_container(&big).unwrap_or_else(|e| fail("StartContainer big", &e));
        let grown = |(c, m): (u32, u64), cpus: u32, mib: u64| {
            c == cpus && m >= mem0 + mib * MIB - 4 * MIB && m <= mem0 + mib * MIB + 4 * MIB
        };
        let s = shape_until(&mut cri, &big, |s| grown(s, 3, 512))
            .unwrap_or_else(|e| fail("shape", &e));
        println!("with big (2 CPUs, 512 MiB): {} vCPUs, MemTotal {} KiB", s.0, s.1);
        assert!(grown(s, 3, 512), "after big joined: {s:?} (defaults {cpus0}, {mem0} KiB)");
        assert_eq!(shape(&mut cri, &base).unwrap_or_else(|e| fail("shape", &e)).0, 3, "base sees the pod's vCPUs too");

        // in-place resize of big to 1 CPU / 256 MiB: one vCPU goes offline; memory is
        // given back where the guest can unplug it (auto-movable zone), never grown
        cri.update_container_resources(&big, limits(1, 256))
            .unwrap_or_else(|e| fail("UpdateContainerResources big (1 CPU, 256 MiB)", &e));
        let s = shape_until(&mut cri, &big, |(c, m)| c == 2 && m <= mem0 + 256 * MIB + 4 * MIB)
            .unwrap_or_else(|e| fail("shape", &e));
        println!("big updated (1 CPU, 256 MiB): {} vCPUs, MemTotal {} KiB", s.0, s.1);
        assert_eq!(s.0, 2, "vCPUs after the update");
        assert!(s.1 <= mem0 + 512 * MIB + 4 * MIB, "memory grew on a shrink: {s:?}");
        let after_update = s;

        // a second container joining grows the VM by its limits
        let small = cri
            .create_container(&pod_id, &pod, &sleeper("small", Some(limits(1, 128))))
            .unwrap_or_else(|e| fail("CreateContainer small (1 CPU, 128 MiB)", &e));
        cri.start_container(&small).unwrap_or_else(|e| fail("StartContainer small", &e));
        let s = shape_until(&mut cri, &small, |(c, m)| {
            c == 3 && m >= mem0 + (256 + 128) * MIB - 4 * MIB
        })
        .unwrap_or_else(|e| fail("shape", &e));
        println!("with small (1 CPU, 128 MiB): {} vCPUs, MemTotal {} KiB", s.0, s.1);
        assert_eq!(s.0, 3, "vCPUs after small joined");
        assert!(s.1 >= mem0 + (256 + 128) * MIB - 4 * MIB, "memory after small: {s:?}");

        // past max_vcpus (8): refused, naming the maximum; the pod is as it was. CRI's
        // CreateContainer only records the container; the runtime sees it at start.
        let greedy = cri
            .create_container(&pod_id, &pod, &sleeper("greedy", Some(limits(16, 64))))
            .unwrap_or_else(|e| fail("CreateContainer greedy", &e));
        let err = cri
            .start_container(&greedy)
            .expect_err("a container past max_vcpus must be refused");
        println!("greedy (16 CPUs) refused: {err}");
        let text = err.to_string();
        assert!(
            text.contains("maximum") && text.contains("vCPUs"),
            "the refusal does not name the maximum: {text}"
        );
        assert_eq!(shape(&mut cri, &small).unwrap_or_else(|e| fail("shape", &e)).0, 3, "a refused container changed the VM");
        cri.remove_container(&greedy)
            .unwrap_or_else(|e| fail("RemoveContainer greedy", &e));

        // removing a container takes its vCPUs offline again
        cri.stop_container(&small, Duration::from_secs(5))
            .unwrap_or_else(|e| fail("StopContainer small", &e));
        cri.remove_container(&small).unwrap_or_else(|e| fail("RemoveContainer small", &e));
        let s = shape_until(&mut cri, &big, |(c, _)| c == 2).unwrap_or_else(|e| fail("shape", &e));
        println!("small removed: {} vCPUs, MemTotal {} KiB", s.0, s.1);
        assert_eq!(s.0, 2, "vCPUs after small left");
        assert!(s.1 >= after_update.1 - 4 * MIB, "memory below big's share: {s:?}");

        cri.remove_pod(&pod_id).unwrap_or_else(|e| fail("remove pod", &e));
        assert!(cri.pods().expect("list pods").is_empty());
    }
}
