//! A hostile guest, through CRI: a privileged container of a pod (guest root, as a guest
//! whose kernel or agent an attacker owns would be) mounts the pod's virtio-fs share itself
//! and, for as long as the host keeps adding and removing other containers of the pod (the
//! moments the host prepares bind mounts), tries to plant symlinks and directories next to
//! the host's mount points and to swap a container's `mounts` directory for a symlink.
//! Checks: every attempt is refused, the joining containers and their volumes work, nothing
//! outside the sandbox's state directory changed on the host (a decoy directory and the
//! host's mount table), and the pod is removed without a trace.
//!
//! `hostile_workloads_stay_inside_their_pod` runs `carapace-hostile` (tests/programs) as a
//! container workload in three pods, each beside a victim container: floods (port I/O,
//! vsock connects, the console), containment (the agent over vsock and by signal, setuid
//! and capabilities in a volume, a read-only volume with a submount), and starvation of
//! the guest; the host asserts the bounds (tests/README.md "Hostile guests").
//!
//! Threat model: docs/threat-model.md. Where this host cannot boot guests the tests run
//! inside the lab.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use carapace_tests::containerd::{BUSYBOX_IMAGE, CarapaceCri};
use carapace_tests::cri::{ContainerSpec, Cri, PodNetwork, PodSpec, log_text};
use carapace_tests::hostile::{
    self, HOSTILE_IMAGE, LOG_CAP, Rss, SandboxPids, find_u64, host_mounts, listing,
};
use carapace_tests::kvm_test;
use carapace_tests::lab::Lab;

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

/// How much memory of its own (RssAnon: heap, stacks; the VMM's guest RAM is shared memory
/// and not in it) each host process of an attacked sandbox may hold. Chosen from the lab:
/// tests/README.md "Hostile guests".
const ANON_BOUND_KIB: [(&str, u64); 3] = [("vmm", 16 << 10), ("fsd", 16 << 10), ("shim", 16 << 10)];
/// What a flood may add to `vmm.log`: guest-caused lines are rate-limited per call site.
const VMM_LOG_GROWTH: u64 = 64 << 10;
/// The cap plus the one notice line written when it is reached.
const LOG_FILE_BOUND: u64 = LOG_CAP + 4096;

/// One attacked pod: its sandbox's directory and host processes, and what went wrong.
struct Target<'a> {
    cri: &'a mut Cri,
    pod: PodSpec,
    id: String,
    dir: PathBuf,
    pids: SandboxPids,
    victim: String,
    peak: BTreeMap<&'static str, Rss>,
    findings: Vec<String>,
    /// containerd's log, where the shim says why a VM ended on its own.
    ctrd_log: PathBuf,
}

impl<'a> Target<'a> {
    /// Runs the pod and its victim (busybox, answering execs).
    fn start(cri: &'a mut Cri, rig: &CarapaceCri, pod: PodSpec) -> Self {
        let id = cri
            .run_pod(&pod)
            .unwrap_or_else(|e| rig.fail("RunPodSandbox", &e));
        let dir = rig.state.join(&id);
        let pids = SandboxPids::find(&dir, &id).unwrap_or_else(|e| rig.fail("sandbox pids", &e));
        let victim = ContainerSpec {
            name: "victim".into(),
            image: BUSYBOX_IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo victim-up; exec sleep 100000".into(),
            ],
            ..Default::default()
        };
        let victim = cri
            .create_container(&id, &pod, &victim)
            .unwrap_or_else(|e| rig.fail("CreateContainer victim", &e));
        cri.start_container(&victim)
            .unwrap_or_else(|e| rig.fail("StartContainer victim", &e));
        let mut t = Target {
            cri,
            pod,
            id,
            dir,
            pids,
            victim,
            peak: BTreeMap::new(),
            findings: Vec::new(),
            ctrd_log: rig.ctrd.socket().with_file_name("containerd.log"),
        };
        t.victim_answers("before the attack");
        t.sample();
        println!("{}: before the attack: {}", t.pod.name, t.figures());
        t
    }

    fn finding(&mut self, what: String) {
        println!("{}: FINDING {what}", self.pod.name);
        self.findings.push(format!("{}: {what}", self.pod.name));
    }

    fn victim_answers(&mut self, when: &str) {
        match self.cri.exec_sync(
            &self.victim,
            &["echo", "victim-alive"],
            Duration::from_secs(120),
        ) {
            Ok((0, out, _)) if out == "victim-alive\n" => {}
            other => self.finding(format!("the victim does not answer {when}: {other:?}")),
        }
    }

    fn sample(&mut self) {
        for (name, rss) in self.pids.rss() {
            if let Some(r) = rss {
                let p = self.peak.entry(name).or_default();
                *p = p.max(r);
            }
        }
    }

    fn figures(&self) -> String {
        let logs = hostile::log_sizes(&self.dir);
        let rss: Vec<String> = self
            .peak
            .iter()
            .map(|(n, r)| {
                format!(
                    "{n} rss {} KiB (anon {}, shmem {})",
                    r.total, r.anon, r.shmem
                )
            })
            .collect();
        let logs: Vec<String> = logs.iter().map(|(f, n)| format!("{f} {n} B")).collect();
        format!("peak {}; {}", rss.join(", "), logs.join(", "))
    }

    /// Runs an attacker to its end, sampling the host processes' memory meanwhile; its
    /// verdicts. A missing verdict or a BREACH is a finding; `unavailable` only where
    /// `may_be_unavailable` says so.
    fn attack(
        &mut self,
        c: ContainerSpec,
        expect: &[&str],
        may_be_unavailable: &[&str],
    ) -> BTreeMap<String, hostile::Verdict> {
        let start = Instant::now();
        let id = match self.cri.create_container(&self.id, &self.pod, &c) {
            Ok(id) => id,
            Err(e) => {
                self.finding(e.to_string());
                return BTreeMap::new();
            }
        };
        if let Err(e) = self.cri.start_container(&id) {
            self.finding(format!("StartContainer {}: {e}", c.name));
            return BTreeMap::new();
        }
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            self.sample();
            match self.cri.container_state(&id) {
                Ok((s, _)) if s == "CONTAINER_EXITED" => break,
                Ok(_) if Instant::now() < deadline => {}
                other => {
                    self.finding(format!("attacker {} did not end: {other:?}", c.name));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let out = log_text(&self.pod.log_dir.join(format!("{}.log", c.name))).unwrap_or_default();
        println!(
            "{}: attacker {} ({:.0} s):\n{out}",
            self.pod.name,
            c.name,
            start.elapsed().as_secs_f64()
        );
        let verdicts = hostile::verdicts(&out);
        for attack in expect {
            match verdicts.get(*attack) {
                None => self.finding(format!("{}: no verdict for {attack}", c.name)),
                Some(v) if v.status == "ok" => {}
                Some(v) if v.status == "unavailable" && may_be_unavailable.contains(attack) => {}
                Some(v) => self.finding(format!("{}: {}", c.name, v.line)),
            }
        }
        if !out.contains("HOSTILE done") {
            self.finding(format!("{}: the attacker did not finish: {out}", c.name));
        }
        verdicts
    }

    /// The host-side bounds after the attacks: processes alive, memory, log sizes, the
    /// victim; then the pod is removed and nothing of it may be left.
    fn check_and_remove(mut self, victim_must_answer: bool) -> Vec<String> {
        self.sample();
        println!("{}: after the attacks: {}", self.pod.name, self.figures());
        let mut died = false;
        for (name, pid) in [
            ("vmm", self.pids.vmm),
            ("fsd", self.pids.fsd),
            ("shim", self.pids.shim),
        ] {
            if !hostile::alive(pid) {
                died = true;
                self.finding(format!("{name} (pid {pid}) died"));
            }
        }
        if died {
            // what the shim logged when it lost the VM (the end of the VMM's log and of
            // the guest console), before the state directory went
            let log = std::fs::read_to_string(&self.ctrd_log).unwrap_or_default();
            println!(
                "{}: containerd log about the pod:\n{}",
                self.pod.name,
                hostile::about_pod(&log, &self.id)
            );
        }
        for (name, bound) in ANON_BOUND_KIB {
            let anon = self.peak.get(name).map_or(0, |r| r.anon);
            if anon > bound {
                self.finding(format!("{name} RssAnon peaked at {anon} KiB > {bound} KiB"));
            }
        }
        for (file, size) in hostile::log_sizes(&self.dir) {
            if size > LOG_FILE_BOUND {
                self.finding(format!("{file} is {size} bytes > {LOG_FILE_BOUND}"));
            }
        }
        if victim_must_answer {
            self.victim_answers("after the attacks");
        }
        let (id, pod_name) = (self.id.clone(), self.pod.name.clone());
        let removal = Instant::now();
        if let Err(e) = self.cri.remove_pod(&id) {
            self.finding(format!(
                "remove pod failed after {:.0} s: {e}",
                removal.elapsed().as_secs_f64()
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let pids = [self.pids.vmm, self.pids.fsd, self.pids.shim];
        while pids.iter().any(|p| hostile::alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let left: Vec<u32> = pids.into_iter().filter(|p| hostile::alive(*p)).collect();
        if !left.is_empty() {
            self.finding(format!("processes left after removal: {left:?}"));
        }
        if self.dir.exists() {
            self.finding(format!("{} left after removal", self.dir.display()));
        }
        let own = self.dir.to_string_lossy().into_owned();
        let left: Vec<_> = host_mounts(Path::new("/nonexistent"))
            .into_iter()
            .filter(|m| m.starts_with(&own))
            .collect();
        if !left.is_empty() {
            self.finding(format!("mounts left under {own}: {left:?}"));
        }
        println!("{pod_name}: removed");
        self.findings
    }
}

fn counter(m: &Option<serde_json::Value>, sub: &str, key: &str) -> u64 {
    m.as_ref()
        .and_then(|m| find_u64(m.pointer(sub)?, key))
        .unwrap_or(0)
}

fn hostile_pod(name: &str, tmp: &Path) -> PodSpec {
    PodSpec {
        name: name.into(),
        namespace: "default".into(),
        handler: "carapace".into(),
        log_dir: tmp.join("logs").join(name),
        privileged: true,
        network: PodNetwork::Cni { ports: vec![] },
    }
}

fn hostile(name: &str, args: &str, privileged: bool, own_pid: bool) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: HOSTILE_IMAGE.into(),
        command: std::iter::once("carapace-hostile")
            .chain(args.split(' '))
            .map(str::to_owned)
            .collect(),
        privileged,
        own_pid_namespace: own_pid,
        ..Default::default()
    }
}

/// Floods: vsock connects, the console (kernel paths and the UART's port directly), port
/// I/O to an unclaimed port, and (where the guest kernel has /dev/mem) MMIO registers,
/// from guest root. The VMM must stay up and small, its log must not grow with the flood,
/// the console file must stay under its cap and every byte must be accounted for.
fn flood_pod(cri: &mut Cri, rig: &CarapaceCri, tmp: &Path) -> Vec<String> {
    let mut t = Target::start(cri, rig, hostile_pod("hostile-flood", tmp));
    let logs0 = hostile::log_sizes(&t.dir);
    let m0 = hostile::metrics(&t.dir);
    let args = "pio-flood secs=5 + vsock-flood secs=10 + console-flood secs=10 mib=64 + mmio-flood";
    let v = t.attack(
        hostile("flooder", args, true, true),
        &["vsock-flood", "console-flood", "pio-flood", "mmio-flood"],
        &["mmio-flood"],
    );
    let m1 = hostile::metrics(&t.dir);
    if m1.is_none() {
        t.finding("the VMM's API does not answer after the floods".into());
    }
    let n = |a: &str, k: &str| v.get(a).map_or(0, |v| v.num(k));
    let delta =
        |sub: &str, key: &str| counter(&m1, sub, key).saturating_sub(counter(&m0, sub, key));
    let (attempts, uart, pio) = (
        n("vsock-flood", "attempts"),
        n("console-flood", "uart"),
        n("pio-flood", "ops"),
    );
    let resets = delta("/devices/vsock", "conns_reset");
    let console = delta("/console", "written") + delta("/console", "dropped");
    let unhandled = delta("/exits", "unhandled");
    println!(
        "hostile-flood: vsock connects {attempts} -> VMM conns_reset +{resets}; UART bytes {uart} \
         -> console written+dropped +{console}; port I/O {pio} -> unhandled exits +{unhandled}"
    );
    if attempts == 0 || resets == 0 {
        t.finding(format!(
            "the vsock flood did not reach the VMM: {attempts} connects, +{resets} resets"
        ));
    }
    if console < uart {
        t.finding(format!(
            "the VMM accounted {console} console bytes < the {uart} written to the UART"
        ));
    }
    if pio == 0 || unhandled < pio {
        t.finding(format!(
            "{pio} port accesses to COM2 but +{unhandled} unhandled exits"
        ));
    }
    let logs1 = hostile::log_sizes(&t.dir);
    let vmm_growth = logs1[0].1.saturating_sub(logs0[0].1);
    if vmm_growth > VMM_LOG_GROWTH {
        t.finding(format!(
            "vmm.log grew by {vmm_growth} bytes during the floods (> {VMM_LOG_GROWTH})"
        ));
    }
    t.check_and_remove(true)
}

/// Containment: a container (its own pid namespace, and one in the pod's) tries to reach
/// the agent over vsock and by signal; guest root leaves setuid/setgid files, file
/// capabilities and a device node in a read-write volume and writes through a read-only
/// one (with a host submount) after remounting it read-write. The host checks its side.
fn containment_pod(cri: &mut Cri, rig: &CarapaceCri, tmp: &Path) -> Vec<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let vol = tmp.join("vol");
    std::fs::create_dir_all(&vol).expect("volume");
    let hostsuid = vol.join("hostsuid");
    std::fs::write(&hostsuid, b"#!/bin/sh\n").expect("setuid file");
    std::fs::set_permissions(&hostsuid, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
    let ro = tmp.join("ro");
    let sub = ro.join("sub");
    std::fs::create_dir_all(&sub).expect("ro volume");
    std::fs::write(ro.join("top"), b"host").expect("ro file");
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "hostile-sub"])
        .arg(&sub)
        .status()
        .expect("mount");
    assert!(
        st.success(),
        "mounting a tmpfs under the read-only volume failed"
    );
    std::fs::write(sub.join("keep"), b"host").expect("submount file");
    let ro_before = listing(&ro);

    let mut t = Target::start(cri, rig, hostile_pod("hostile-contain", tmp));
    for (name, own_pid) in [("agent-own-pidns", true), ("agent-pod-pidns", false)] {
        let v = t.attack(hostile(name, "agent", false, own_pid), &["agent"], &[]);
        let pid1 = v
            .get("agent")
            .and_then(|v| v.facts.get("pid1"))
            .cloned()
            .unwrap_or_default();
        // PID 1 is the attacker itself, or the pod's pause (its shell script), never the agent
        let expected = if own_pid { "carapace-hostile" } else { "trap" };
        if !pid1.contains(expected) {
            t.finding(format!(
                "{name}: PID 1 is {pid1:?}, expected {expected:?} in it"
            ));
        }
    }
    let mut files = hostile("files", "setuid dir=/vol", true, true);
    files.mounts = vec![(vol.clone(), "/vol".into())];
    t.attack(files, &["setuid"], &[]);
    let mut rov = hostile("ro", "ro-volume dir=/ro", true, true);
    rov.read_only_mounts = vec![(ro.clone(), "/ro".into())];
    t.attack(rov, &["ro-volume"], &[]);

    for e in std::fs::read_dir(&vol).into_iter().flatten().flatten() {
        let p = e.path();
        let Ok(m) = p.symlink_metadata() else {
            continue;
        };
        let ft = m.file_type();
        if ft.is_char_device() || ft.is_block_device() {
            t.finding(format!("a device node on the host: {}", p.display()));
        }
        if ft.is_file() && m.mode() & 0o6000 != 0 {
            t.finding(format!(
                "{} is mode {:o} on the host",
                p.display(),
                m.mode() & 0o7777
            ));
        }
        if file_caps(&p) {
            t.finding(format!(
                "{} has security.capability on the host",
                p.display()
            ));
        }
    }
    let grew = std::fs::metadata(&hostsuid).map_or(0, |m| m.len()) > 10;
    if !grew {
        t.finding("the guest's write to the host's setuid file did not arrive".into());
    }
    let ro_after = listing(&ro);
    if ro_after != ro_before {
        t.finding(format!(
            "the read-only volume changed: {ro_before:?} -> {ro_after:?}"
        ));
    }
    let findings = t.check_and_remove(true);
    let _ = std::process::Command::new("umount").arg(&sub).status();
    findings
}

/// Starvation: guest root runs a SCHED_FIFO 99 busy loop with real-time throttling off on
/// the pod's vCPU, so the agent never runs again (a hung or hostile guest). The VMM must
/// stay bounded, and the host must still stop and remove the pod, leaving nothing.
fn starve_pod(cri: &mut Cri, rig: &CarapaceCri, tmp: &Path) -> Vec<String> {
    let mut t = Target::start(cri, rig, hostile_pod("hostile-starve", tmp));
    let c = hostile("starver", "starve", true, true);
    let log = t.pod.log_dir.join("starver.log");
    match t.cri.create_container(&t.id, &t.pod, &c) {
        Err(e) => t.finding(e.to_string()),
        Ok(id) => {
            if let Err(e) = t.cri.start_container(&id) {
                t.finding(format!("StartContainer starver: {e}"));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let line = loop {
        let text = log_text(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("HOSTILE starve")) {
            break l.to_owned();
        }
        if Instant::now() > deadline {
            break format!("no verdict: {text}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("hostile-starve: {line}");
    if !line.contains("fifo99=ok") {
        t.finding(format!("the starver did not get SCHED_FIFO: {line}"));
    }
    // the starved guest for a while, sampled like the others
    for _ in 0..40 {
        t.sample();
        std::thread::sleep(Duration::from_millis(500));
    }
    t.check_and_remove(false)
}

/// Whether `path` (not followed) carries a `security.capability` xattr.
fn file_caps(path: &Path) -> bool {
    use nix::libc;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 64];
    // SAFETY: a valid NUL-terminated path and name, a buffer and its length.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"security.capability".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n >= 0
}

/// The attacks of `carapace-hostile` in two pods, one after the other (each with its own
/// victim, so one breach does not hide another), then what the host must still have.
fn hostile_workloads(program: &Path) {
    let start = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("chostile-")
        .tempdir()
        .expect("tempdir");
    let decoy = tmp.path().join("decoy");
    std::fs::create_dir_all(decoy.join("sub")).expect("decoy");
    std::fs::write(decoy.join("precious"), b"keep me").expect("decoy file");
    let decoy_before = listing(&decoy);
    let mounts_before = host_mounts(tmp.path());

    let rig = CarapaceCri::start(tmp.path());
    hostile::import_image(&rig.ctrd, tmp.path(), program)
        .unwrap_or_else(|e| rig.fail("hostile image", &e));
    let mut cri = Cri::connect(&rig.ctrd.socket()).expect("connect");

    let mut findings = flood_pod(&mut cri, &rig, tmp.path());
    findings.extend(containment_pod(&mut cri, &rig, tmp.path()));
    findings.extend(starve_pod(&mut cri, &rig, tmp.path()));

    if listing(&decoy) != decoy_before {
        findings.push("the decoy changed".into());
    }
    let logs = carapace_tests::containerd::sandbox_logs(&rig.state);
    drop(cri);
    drop(rig);
    let new: Vec<_> = host_mounts(tmp.path())
        .difference(&mounts_before)
        .cloned()
        .collect();
    if !new.is_empty() {
        findings.push(format!(
            "host mounts appeared outside the test dir: {new:?}"
        ));
    }
    println!("hostile workloads: {:.0} s", start.elapsed().as_secs_f64());
    assert!(
        findings.is_empty(),
        "the hostile workloads got through:\n{}\n{logs}",
        findings.join("\n")
    );
}

#[test]
fn hostile_workloads_stay_inside_their_pod() {
    // built here, on the host: cargo never runs inside the lab
    let program = hostile::program();
    carapace_tests::lab::in_kvm(
        module_path!(),
        "hostile_workloads_stay_inside_their_pod",
        Lab::new().mem_mib(4096).timeout(Duration::from_secs(1500)),
        || hostile_workloads(&program),
    );
}
