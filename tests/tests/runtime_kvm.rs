//! The `carapace` CLI booting real sandbox VMs (carapace-vmm + carapace-fsd + the guest
//! image from `carapace-image build`), where KVM can boot guests (here: inside the lab).
//!
//! Each test boots its own VMs in the lab (about a minute each under emulation) and
//! ends with the leftover census: no process, mount, state entry or socket may remain.

mod runtime_common;

use std::process::Command;

use carapace_tests::{fixtures, kvm_test};
use runtime_common::{env_vm, stderr, stdout};
use serde_json::json;

/// The VM description the runtime writes is one carapace-vmm accepts (no KVM needed:
/// `--print-config` parses and validates it).
#[test]
fn vm_description_is_accepted_by_carapace_vmm() {
    use carapace_runtime::launcher::{VmPaths, vm_description};
    let tmp = tempfile::tempdir().unwrap();
    let config = carapace_config::Config::default();
    let paths = VmPaths {
        vsock: tmp.path().join("vsock.sock"),
        api: tmp.path().join("api.sock"),
        fs_socket: tmp.path().join("fsd.sock"),
        console: Some(tmp.path().join("console.log")),
        nics: vec![],
    };
    let desc = vm_description(&config, config.vm_resources(&[]), &paths);
    let file = tmp.path().join("vm.json");
    std::fs::write(&file, serde_json::to_string(&desc).unwrap()).unwrap();
    let out = std::process::Command::new(carapace_tests::workspace_bin("carapace-vmm"))
        .arg("--config")
        .arg(&file)
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "carapace-vmm refused the runtime's VM description: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echoed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(echoed["fs"][0]["tag"], "carapace");
    assert_eq!(
        echoed["vsock"]["uds_path"],
        paths.vsock.display().to_string().as_str()
    );
}

/// The guest image to boot: `$CARAPACE_GUEST_DIR`, else the installed one.
fn guest_dir() -> std::path::PathBuf {
    std::env::var_os("CARAPACE_GUEST_DIR")
        .map(Into::into)
        .unwrap_or_else(|| "/var/lib/carapace/guest".into())
}

/// The release string the guest kernel reports (`uname -r`), read from its banner.
fn guest_kernel_release() -> String {
    let vmlinux = std::fs::read(guest_dir().join("vmlinux")).expect("guest kernel installed");
    let needle = b"Linux version ";
    let at = vmlinux
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("a Linux banner in vmlinux");
    let rest = &vmlinux[at + needle.len()..];
    let end = rest.iter().position(|b| *b == b' ').unwrap_or(0);
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

kvm_test! {
    /// `carapace run` on a busybox bundle prints the guest kernel's release, not the host's.
    fn run_prints_the_guest_kernel_release() {
        let Some(env) = env_vm() else { return };
        let b = env.bundle("b", &fixtures::default_spec(&["sh", "-c", "echo guest $(uname -r); exit 4"]));
        let out = env.run(&["run", "-b", b.to_str().unwrap(), "k1"]);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        let release = guest_kernel_release();
        assert_eq!(stdout(&out), format!("guest {release}\n"));
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_ne!(host.trim(), release);
        env.assert_clean();
    }
}

kvm_test! {
    /// create / start / exec / kill / delete against a VM, and nothing left afterwards.
    fn lifecycle_in_a_vm() {
        let Some(env) = env_vm() else { return };
        let b = env.bundle("b", &fixtures::default_spec(&[
            "sh", "-c", "trap 'exit 7' TERM; while true; do sleep 0.1; done",
        ]));
        let (rc, _) = env.run_to_files(&["create", "-b", b.to_str().unwrap(), "l1"], "create");
        assert_eq!(rc, 0);
        assert_eq!(env.state("l1")["status"], "created");
        assert!(env.run(&["start", "l1"]).status.success());
        let e = env.run(&["exec", "l1", "sh", "-c", "hostname; exit 3"]);
        assert_eq!(e.status.code(), Some(3));
        assert_eq!(stdout(&e), "carapace\n");
        assert!(env.run(&["kill", "l1", "TERM"]).status.success());
        env.wait_status("l1", "stopped");
        assert!(env.run(&["delete", "l1"]).status.success());
        env.assert_clean();
    }
}

kvm_test! {
    /// A read-only bind mount stays read-only in the guest; a read-write one is writable.
    fn read_only_bind_in_a_vm() {
        let Some(env) = env_vm() else { return };
        let ro = env.tmp.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        let mut spec = fixtures::default_spec(&[
            "sh", "-c", "if echo x > /ro/f 2>/dev/null; then echo WROTE; else echo READONLY; fi",
        ]);
        spec["mounts"].as_array_mut().unwrap().push(
            json!({"destination": "/ro", "type": "bind", "source": ro, "options": ["rbind", "ro"]}),
        );
        let b = env.bundle("b", &spec);
        let out = env.run(&["run", "-b", b.to_str().unwrap(), "m1"]);
        assert_eq!(stdout(&out), "READONLY\n", "{}", stderr(&out));
        assert!(!ro.join("f").exists());
        env.assert_clean();
    }
}

kvm_test! {
    /// Two sandboxes side by side, then the VMM of one killed behind the runtime's back.
    fn two_vms_and_a_killed_vmm() {
        let Some(env) = env_vm() else { return };
        for id in ["a", "b"] {
            let b = env.bundle(id, &fixtures::default_spec(&["sleep", "600"]));
            let (rc, _) = env.run_to_files(&["run", "-d", "-b", b.to_str().unwrap(), id], id);
            assert_eq!(rc, 0);
        }
        assert_eq!(env.state("a")["status"], "running");
        assert_eq!(env.state("b")["status"], "running");
        let pid = env.state("a")["pid"].as_i64().unwrap();
        assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
        env.wait_status("a", "stopped");
        assert_eq!(env.state("b")["status"], "running");
        assert!(env.run(&["delete", "a"]).status.success());
        assert!(env.run(&["delete", "-f", "b"]).status.success());
        env.assert_clean();
    }
}

kvm_test! {
    /// The runtime's own pieces against the real VMM and guest agent, without virtio-fs:
    /// BinaryLauncher starts carapace-vmm from a VM description, the hybrid-vsock
    /// TtrpcConnector reaches the agent in the guest (protocol version checked), the
    /// sandbox is created without shares and destroyed, and the VMM is stopped.
    fn launcher_and_agent_client_reach_the_guest_agent() {
        use carapace_runtime::agent::{AgentConnector, Transport, TtrpcConnector};
        use carapace_runtime::launcher::{BinaryLauncher, Launcher, VmPaths, VmRequest, vm_description};
        use std::time::{Duration, Instant};

        let tmp = tempfile::tempdir().unwrap();
        let mut config = carapace_config::Config::default();
        config.hypervisor.path = carapace_tests::workspace_bin("carapace-vmm");
        let guest = guest_dir();
        config.hypervisor.kernel = guest.join("vmlinux");
        config.hypervisor.initrd = guest.join("initramfs.cpio.gz");
        let paths = VmPaths {
            vsock: tmp.path().join("vsock.sock"),
            api: tmp.path().join("api.sock"),
            fs_socket: tmp.path().join("fsd.sock"),
            console: Some(tmp.path().join("console.log")),
            nics: vec![],
        };
        let mut desc = vm_description(&config, config.vm_resources(&[]), &paths);
        // No fs daemon in this test: boot without the share.
        desc.fs.clear();
        let desc_path = tmp.path().join("vm.json");
        std::fs::write(&desc_path, serde_json::to_string(&desc).unwrap()).unwrap();
        let log = tmp.path().join("vmm.log");
        let vmm = BinaryLauncher { config: config.clone() }
            .start_vmm(&VmRequest { description: desc_path, vsock: paths.vsock.clone(), log: log.clone(), taps: &[], cgroup: None, pid_namespace: false })
            .expect("starting carapace-vmm");
        let connector = TtrpcConnector {
            transport: Transport::HybridVsock,
            request_timeout: Duration::from_secs(60),
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(180);
        let logs = || {
            format!(
                "vmm log:\n{}\nconsole:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                std::fs::read_to_string(tmp.path().join("console.log")).unwrap_or_default()
            )
        };
        let chain = carapace_errors::chain;
        let agent = loop {
            assert!(vmm.is_alive(), "VMM exited\n{}", logs());
            match rt.block_on(connector.connect(&paths.vsock, Duration::from_secs(5))) {
                Ok(a) => break a,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("agent never answered: {}\n{}", chain(&e), logs()),
            }
        };
        rt.block_on(agent.create_sandbox("s1", "carapace", &[])).expect("CreateSandbox");
        rt.block_on(agent.destroy_sandbox("s1")).expect("DestroySandbox");
        // The agent powers the VM off after DestroySandbox; the runtime's teardown then
        // stops whatever is left (SIGTERM, then SIGKILL).
        let by_itself = vmm.wait_gone(Duration::from_secs(30));
        eprintln!("VMM exited by itself after DestroySandbox: {by_itself}");
        vmm.terminate("VMM", Duration::from_secs(3)).expect("stopping the VMM");
        assert!(!vmm.is_alive());
    }
}
