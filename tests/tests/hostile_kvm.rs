//! A hostile guest, through CRI: a privileged container of a pod (guest root, as a guest
//! whose kernel or agent an attacker owns would be) mounts the pod's virtio-fs share itself
//! and, for as long as the host keeps adding and removing other containers of the pod (the
//! moments the host prepares bind mounts), tries to plant symlinks and directories next to
//! the host's mount points and to swap a container's `mounts` directory for a symlink.
//! Checks: every attempt is refused, the joining containers and their volumes work, nothing
//! outside the sandbox's state directory changed on the host (a decoy directory and the
//! host's mount table), and the pod is removed without a trace. Threat model:
//! docs/threat-model.md. Where this host cannot boot guests the test runs inside the lab.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use carapace_tests::containerd::{BUSYBOX_IMAGE, CarapaceCri};
use carapace_tests::cri::{ContainerSpec, Cri, PodNetwork, PodSpec, log_text};
use carapace_tests::kvm_test;

/// Mount points of the host (this process's view), outside `skip`.
fn host_mounts(skip: &Path) -> BTreeSet<String> {
    let skip = skip.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| !p.starts_with(&skip))
        .map(str::to_owned)
        .collect()
}

/// Every path under `dir` with its size, for a before/after comparison.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.path().symlink_metadata().expect("metadata");
            out.push((e.path().display().to_string(), m.len()));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// The attacker: mount the share, then for ATTACK_SECS try, five times a second (a tighter
/// loop only measures how long a lab machine lasts with a guest vCPU pinned at 100 %), to
/// create entries next to the host's mount points and to swap `mounts` directories for
/// symlinks; count what worked.
const ATTACK: &str = r#"
mkdir -p /share
mount -t virtiofs carapace /share || { echo "ATTACK mount-failed"; exec sleep 600; }
echo "ATTACK mounted $(ls /share | wc -l)"
made=0; denied=0; n=0
end=$(( $(date +%s) + ATTACK_SECS ))
while [ "$(date +%s)" -lt "$end" ]; do
  for d in /share /share/* /share/*/mounts; do
    [ -d "$d" ] || continue
    if ln -s /decoy "$d/evil$n" 2>/dev/null; then made=$((made+1)); echo "ATTACK planted $d/evil$n"; else denied=$((denied+1)); fi
    if mkdir "$d/evildir$n" 2>/dev/null; then made=$((made+1)); echo "ATTACK made $d/evildir$n"; else denied=$((denied+1)); fi
  done
  for c in /share/*; do
    if mv "$c/mounts" "$c/mounts.old" 2>/dev/null; then made=$((made+1)); echo "ATTACK renamed $c/mounts"; fi
    if ln -s /decoy "$c/mounts" 2>/dev/null; then made=$((made+1)); echo "ATTACK linked $c/mounts"; fi
  done
  n=$((n+1))
  sleep 0.2
done
echo "ATTACK done made=$made denied=$denied rounds=$n"
exec sleep 600
"#;

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().mem_mib(4096).timeout(Duration::from_secs(1500)))]
    fn guest_root_cannot_steer_host_mounts_through_the_share() {
        let tmp = tempfile::Builder::new().prefix("chostile-").tempdir().expect("tempdir");
        let decoy = tmp.path().join("decoy");
        std::fs::create_dir_all(decoy.join("sub")).expect("decoy");
        std::fs::write(decoy.join("precious"), b"keep me").expect("decoy file");
        let decoy_before = listing(&decoy);
        let mounts_before = host_mounts(tmp.path());

        let rig = CarapaceCri::start(tmp.path());
        let (ctrd, state) = (&rig.ctrd, &rig.state);
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! { rig.fail(what, e) };
        let mut cri = Cri::connect(&ctrd.socket()).expect("connect");
        let pod = PodSpec {
            name: "hostile-pod".into(),
            namespace: "default".into(),
            handler: "carapace".into(),
            log_dir: tmp.path().join("logs"),
            privileged: true,
            network: PodNetwork::Cni { ports: vec![] },
        };
        let pod_id = cri.run_pod(&pod).unwrap_or_else(|e| fail("RunPodSandbox", &e));

        let attack_secs = 45;
        let attacker = ContainerSpec {
            name: "attacker".into(),
            image: BUSYBOX_IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                ATTACK.replace("ATTACK_SECS", &attack_secs.to_string()),
            ],
            privileged: true,
            ..Default::default()
        };
        let a = cri
            .create_container(&pod_id, &pod, &attacker)
            .unwrap_or_else(|e| fail("CreateContainer attacker", &e));
        cri.start_container(&a).unwrap_or_else(|e| fail("StartContainer attacker", &e));
        let attacker_log = pod.log_dir.join("attacker.log");
        let deadline = Instant::now() + Duration::from_secs(300);
        while !log_text(&attacker_log).unwrap_or_default().contains("ATTACK mounted") {
            let text = log_text(&attacker_log).unwrap_or_default();
            assert!(!text.contains("mount-failed"), "the attacker could not mount the share: {text}");
            assert!(Instant::now() < deadline, "the attacker never started: {text}");
            std::thread::sleep(Duration::from_millis(200));
        }

        // While the attack runs: containers join the pod with a volume and leave again.
        let start = Instant::now();
        let mut joined = 0;
        while (start.elapsed() < Duration::from_secs(attack_secs) && joined < 6) || joined < 2 {
            let vol = tmp.path().join(format!("vol{joined}"));
            std::fs::create_dir_all(&vol).expect("volume");
            let joiner = ContainerSpec {
                name: format!("joiner{joined}"),
                image: BUSYBOX_IMAGE.into(),
                command: vec!["sh".into(), "-c".into(), "echo ok > /data/out".into()],
                mounts: vec![(vol.clone(), "/data".into())],
                ..Default::default()
            };
            let j = cri
                .create_container(&pod_id, &pod, &joiner)
                .unwrap_or_else(|e| fail("CreateContainer joiner", &e));
            cri.start_container(&j).unwrap_or_else(|e| fail("StartContainer joiner", &e));
            let code = cri
                .wait_exited(&j, Duration::from_secs(300))
                .unwrap_or_else(|e| fail("joiner exit", &e));
            assert_eq!(code, 0, "joiner {joined} failed");
            assert_eq!(
                std::fs::read_to_string(vol.join("out")).expect("the joiner's volume"),
                "ok\n"
            );
            cri.remove_container(&j).unwrap_or_else(|e| fail("RemoveContainer joiner", &e));
            joined += 1;
        }

        let deadline = Instant::now() + Duration::from_secs(300);
        let text = loop {
            let text = log_text(&attacker_log).unwrap_or_default();
            if text.contains("ATTACK done") || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let done = text
            .lines()
            .find(|l| l.starts_with("ATTACK done"))
            .unwrap_or_else(|| panic!("the attack never finished: {text}"));
        println!("{joined} containers joined and left during the attack; {done}");
        assert!(done.contains(" made=0 "), "the guest changed the share: {text}");
        assert!(!done.contains(" denied=0 "), "nothing was attempted: {text}");

        assert_eq!(listing(&decoy), decoy_before, "the decoy changed");
        cri.remove_pod(&pod_id).unwrap_or_else(|e| fail("remove pod", &e));
        let left: Vec<_> = std::fs::read_dir(state)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "sandbox state left: {left:?}");
        drop(cri);
        drop(rig);
        let mounts_after = host_mounts(tmp.path());
        let new: Vec<_> = mounts_after.difference(&mounts_before).collect();
        assert!(new.is_empty(), "host mounts appeared outside the test dir: {new:?}");
    }
}
