//! `make install` / `make uninstall` (scripts/install.sh) and `make deb`, into temporary
//! prefixes: the files, a second run that changes nothing, containerd's effective
//! configuration with the CRI drop-in (the node's own CRI settings kept, runc kept, the
//! Carapace handler added), uninstall restoring containerd's file byte for byte; and, in a
//! VM, a pod run by a containerd configured only by what install wrote.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use carapace_tests::containerd::{BUSYBOX_IMAGE, Containerd, node_config, sandbox_logs};
use carapace_tests::cri::{ContainerSpec, Cri, PodNetwork, PodSpec, log_text};
use carapace_tests::{kvm_test, workspace_bin};

const BINARIES: [&str; 4] = [
    "carapace",
    "carapace-vmm",
    "carapace-fsd",
    "containerd-shim-carapace-v2",
];

/// Where one installation goes, all under a temporary directory.
struct Node {
    root: PathBuf,
    image_from: PathBuf,
}

impl Node {
    fn prefix(&self) -> PathBuf {
        self.root.join("usr")
    }
    fn config(&self) -> PathBuf {
        self.root.join("etc/carapace/configuration.toml")
    }
    fn image_dir(&self) -> PathBuf {
        self.root.join("guest")
    }
    fn containerd_dir(&self) -> PathBuf {
        self.root.join("containerd")
    }
    fn containerd_config(&self) -> PathBuf {
        self.containerd_dir().join("config.toml")
    }
    fn drop_in(&self) -> PathBuf {
        self.containerd_dir().join("conf.d/carapace.toml")
    }

    fn script(&self, cmd: &str) -> Output {
        let bins = workspace_bin("carapace");
        let out = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh"))
            .arg(cmd)
            .arg("--prefix")
            .arg(self.prefix())
            .arg("--sysconfdir")
            .arg(self.root.join("etc"))
            .arg("--image-dir")
            .arg(self.image_dir())
            .arg("--bin-dir")
            .arg(bins.parent().expect("bin dir"))
            .arg("--image-from")
            .arg(&self.image_from)
            .arg("--containerd-config")
            .arg(self.containerd_config())
            .output()
            .expect("run scripts/install.sh");
        assert!(
            out.status.success(),
            "install.sh {cmd} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// containerd's effective configuration (`containerd config dump`) with `config`.
fn effective(config: &Path) -> toml::Table {
    let out = Command::new("containerd")
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .expect("containerd config dump");
    assert!(
        out.status.success(),
        "containerd config dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .parse()
        .expect("containerd's dump is TOML")
}

#[test]
fn install_is_idempotent_registers_the_handler_and_uninstall_restores_the_node() {
    let tmp = tempfile::Builder::new()
        .prefix("cinstall-")
        .tempdir()
        .unwrap();
    let image_from = tmp.path().join("built-image");
    fs::create_dir_all(&image_from).unwrap();
    fs::write(image_from.join("vmlinux"), "kernel").unwrap();
    fs::write(image_from.join("initramfs.cpio.gz"), "initramfs").unwrap();
    let node = Node {
        root: tmp.path().join("node"),
        image_from,
    };
    fs::create_dir_all(node.containerd_dir()).unwrap();
    let original = node_config(&node.containerd_dir());
    fs::write(node.containerd_config(), &original).unwrap();

    let first = stdout(&node.script("install"));
    for b in BINARIES {
        let path = node.prefix().join("bin").join(b);
        assert!(
            first.contains(&format!("{} (new)", path.display())),
            "{first}"
        );
        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o755
        );
    }
    assert!(node.image_dir().join("vmlinux").is_file());
    // The configuration names the installed files.
    let config = fs::read_to_string(node.config()).unwrap();
    let vmm = node.prefix().join("bin/carapace-vmm");
    assert!(
        config.contains(&format!("path = \"{}\"", vmm.display())),
        "{config}"
    );
    assert!(config.contains(&format!(
        "kernel = \"{}\"",
        node.image_dir().join("vmlinux").display()
    )));
    assert!(first.contains("containerd-config: wrote"), "{first}");

    // A second run changes nothing.
    let second = stdout(&node.script("install"));
    assert!(
        !second.contains("(new)") && !second.contains("(updated)"),
        "{second}"
    );
    assert!(second.contains("containerd-config: unchanged"), "{second}");

    // containerd (1.6 replaces a plugin section with an imported one) sees the node's own
    // CRI settings, its default runc and the Carapace handler.
    let dump = effective(&node.containerd_config());
    let cri = &dump["plugins"]["io.containerd.grpc.v1.cri"];
    assert_eq!(
        cri["cni"]["conf_dir"].as_str(),
        Some(node.containerd_dir().join("cni/conf").to_str().unwrap()),
        "the node's CNI configuration directory survives the drop-in"
    );
    let runtimes = cri["containerd"]["runtimes"].as_table().unwrap();
    assert_eq!(
        runtimes["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );
    assert_eq!(
        runtimes["carapace"]["runtime_type"].as_str(),
        Some("io.containerd.carapace.v2")
    );
    assert_eq!(
        runtimes["carapace"]["options"]["ConfigPath"].as_str(),
        Some(node.config().to_str().unwrap())
    );

    // An admin's change to the configuration survives a reinstall and an uninstall.
    fs::write(node.config(), format!("{config}# the admin's\n")).unwrap();
    let third = stdout(&node.script("install"));
    assert!(third.contains("(kept: changed here"), "{third}");
    assert!(node.config().with_extension("toml.new").is_file());

    let gone = stdout(&node.script("uninstall"));
    for b in BINARIES {
        assert!(
            !node.prefix().join("bin").join(b).exists(),
            "{b} left: {gone}"
        );
    }
    assert!(!node.drop_in().exists());
    assert!(!node.image_dir().exists(), "{gone}");
    assert_eq!(
        fs::read_to_string(node.containerd_config()).unwrap(),
        original,
        "containerd's file is as it was"
    );
    assert!(
        gone.contains("(kept: changed since it was installed)"),
        "{gone}"
    );
    assert!(!node.config().with_extension("toml.new").exists());
    assert!(
        !effective(&node.containerd_config())["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
            ["runtimes"]
            .as_table()
            .unwrap()
            .contains_key("carapace")
    );

    // Uninstalling twice says there is nothing to uninstall.
    let again = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh"))
        .args(["uninstall", "--prefix"])
        .arg(node.prefix())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to uninstall"));
}

#[test]
fn bad_options_are_refused_by_name() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh");
    let run = |args: &[&str]| {
        let out = Command::new("bash")
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["install", "--frobnicate"]).contains("unknown option '--frobnicate'"));
    assert!(run(&["install", "--prefix", "relative"]).contains("PREFIX must be an absolute path"));
    assert!(run(&["reinstall"]).contains("usage:"));
}

#[test]
fn the_debian_package_holds_the_same_files() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        panic!("dpkg-deb is missing (Debian package dpkg)");
    }
    let tmp = tempfile::Builder::new().prefix("cdeb-").tempdir().unwrap();
    let image_from = tmp.path().join("img");
    fs::create_dir_all(&image_from).unwrap();
    fs::write(image_from.join("vmlinux"), "kernel").unwrap();
    fs::write(image_from.join("initramfs.cpio.gz"), "initramfs").unwrap();
    let bins = workspace_bin("carapace");
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh"))
        .args(["deb", "--bin-dir"])
        // debug binaries: compressing them would only make the test slow
        .env("DEB_COMPRESSION", "none")
        .arg(bins.parent().unwrap())
        .arg("--image-from")
        .arg(&image_from)
        .output()
        .unwrap();
    let said = stdout(&out);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = said
        .lines()
        .find_map(|l| l.strip_prefix("install: built "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the package's path");
    let deb = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(deb);
    let list = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(&deb)
        .output()
        .unwrap();
    let list = stdout(&list);
    for path in [
        "./usr/bin/carapace",
        "./usr/bin/carapace-vmm",
        "./usr/bin/carapace-fsd",
        "./usr/bin/containerd-shim-carapace-v2",
        "./var/lib/carapace/guest/vmlinux",
        "./var/lib/carapace/guest/initramfs.cpio.gz",
        "./etc/carapace/configuration.toml",
    ] {
        assert!(
            list.contains(path),
            "{path} missing from the package:\n{list}"
        );
    }
    assert!(!list.contains("lib/carapace/installed"), "{list}");
    let info = Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .output()
        .unwrap();
    let info = stdout(&info);
    assert!(
        info.contains("Package: carapace") && info.contains("postinst"),
        "{info}"
    );
    let extract = tmp.path().join("x");
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&extract)
        .status()
        .unwrap();
    assert!(st.success());
    let config = fs::read_to_string(extract.join("etc/carapace/configuration.toml")).unwrap();
    assert!(
        config.contains("path = \"/usr/bin/carapace-vmm\""),
        "{config}"
    );
    let _ = fs::remove_file(&deb);
}

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().mem_mib(4096).timeout(Duration::from_secs(1200)))]
    fn a_pod_runs_through_what_install_wrote() {
        let tmp = tempfile::Builder::new().prefix("cinst-").tempdir().expect("tempdir");
        let node = Node {
            root: tmp.path().join("node"),
            image_from: PathBuf::from("/var/lib/carapace/guest"),
        };
        assert!(
            node.image_from.join("vmlinux").is_file(),
            "guest image missing in {}: make image",
            node.image_from.display()
        );
        fs::create_dir_all(node.containerd_dir()).unwrap();
        fs::write(node.containerd_config(), node_config(&node.containerd_dir())).unwrap();
        let said = stdout(&node.script("install"));
        // An admin's edits for this lab: slow boots, the console kept, state under tmp.
        let state = tmp.path().join("run");
        let config = fs::read_to_string(node.config())
            .unwrap()
            .replace("boot_timeout_ms = 30000", "boot_timeout_ms = 300000")
            .replace("console = false", "console = true")
            .replace("state_dir = \"/run/carapace\"", &format!("state_dir = {:?}", state.display().to_string()));
        fs::write(node.config(), config).unwrap();
        // `carapace check` of the installed files passes where VMs boot.
        let check = Command::new(node.prefix().join("bin/carapace"))
            .arg("--config")
            .arg(node.config())
            .arg("check")
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "carapace check after install:\n{said}\n{}",
            stdout(&check)
        );
        // containerd finds the shim on its PATH and the configuration through the drop-in's
        // ConfigPath: no CARAPACE_CONFIG anywhere.
        let bin = node.prefix().join("bin");
        let ctrd = Containerd::start_configured(&node.containerd_dir(), Some(&bin), &[])
            .expect("containerd with the drop-in");
        ctrd.import_cri_images(tmp.path()).expect("images");
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            panic!("{what}: {e}\n{}\ncontainerd log:\n{}", sandbox_logs(&state), ctrd.log())
        };
        let mut cri = Cri::connect(&ctrd.socket()).expect("connect");
        let pod = PodSpec {
            name: "installed".into(),
            namespace: "default".into(),
            handler: "carapace".into(),
            log_dir: tmp.path().join("logs"),
            privileged: false,
            network: PodNetwork::Cni { ports: vec![] },
        };
        let pod_id = cri.run_pod(&pod).unwrap_or_else(|e| fail("RunPodSandbox", &e));
        let hello = ContainerSpec {
            name: "hello".into(),
            image: BUSYBOX_IMAGE.into(),
            command: vec!["sh".into(), "-c".into(), "echo hello from $(uname -r)".into()],
            ..Default::default()
        };
        let c = cri
            .create_container(&pod_id, &pod, &hello)
            .unwrap_or_else(|e| fail("CreateContainer", &e));
        cri.start_container(&c).unwrap_or_else(|e| fail("StartContainer", &e));
        let code = cri
            .wait_exited(&c, Duration::from_secs(300))
            .unwrap_or_else(|e| fail("the container's exit", &e));
        let log = log_text(&pod.log_dir.join("hello.log")).expect("log");
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("hello from"), "{log}");
        // the sandbox ran under the installed configuration's state directory
        assert!(fs::read_dir(&state).map(|d| d.count() > 0).unwrap_or(false));
        cri.remove_pod(&pod_id).unwrap_or_else(|e| fail("RemovePodSandbox", &e));
        drop(cri);
        drop(ctrd);
        node.script("uninstall");
    }
}
