//! `carapace check`: can this host run sandboxes? Each check says what it looked at and,
//! when it fails, how to fix it.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use carapace_config::{Config, FsDaemon, VhostNetMode};
use serde::Serialize;

use crate::launcher::is_executable;

/// The KVM API version every current kernel reports.
const KVM_API_VERSION: i32 = 12;

nix::ioctl_none!(kvm_get_api_version, 0xAE, 0x00);

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short name.
    pub name: &'static str,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it (failures only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Where the host facts are read from (tests point these at fixtures).
#[derive(Debug, Clone)]
pub struct HostFiles {
    /// The KVM device.
    pub kvm: PathBuf,
    /// CPU flags.
    pub cpuinfo: PathBuf,
    /// Loaded (and built-in) kernel modules: `/sys/module`.
    pub sys_module: PathBuf,
    /// The vhost-net device.
    pub vhost_net: PathBuf,
}

impl Default for HostFiles {
    fn default() -> Self {
        Self {
            kvm: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            sys_module: "/sys/module".into(),
            vhost_net: crate::launcher::VHOST_NET_DEV.into(),
        }
    }
}

fn pass(name: &'static str, detail: String) -> Check {
    Check {
        name,
        ok: true,
        detail,
        hint: None,
    }
}

fn fail(name: &'static str, detail: String, hint: impl Into<String>) -> Check {
    Check {
        name,
        ok: false,
        detail,
        hint: Some(hint.into()),
    }
}

fn check_kvm_device(path: &Path) -> Check {
    const NAME: &str = "kvm device";
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "load the KVM module (modprobe kvm_intel or kvm_amd) and enable virtualization \
                     (VT-x/AMD-V) in the firmware; in a VM, enable nested virtualization"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "run as root, or add the user to the group owning /dev/kvm (usually `kvm`)"
                }
                _ => "check that /dev/kvm is the KVM character device",
            };
            return fail(NAME, format!("cannot open {}: {e}", path.display()), hint);
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value; the fd is
    // open for the duration of the call. On a non-KVM file the kernel returns an error.
    match unsafe { kvm_get_api_version(f.as_raw_fd()) } {
        Ok(KVM_API_VERSION) => pass(
            NAME,
            format!("{} opens, KVM API version 12", path.display()),
        ),
        Ok(v) => fail(
            NAME,
            format!("{} reports KVM API version {v}", path.display()),
            "this kernel's KVM is not the standard one (API version 12)",
        ),
        Err(e) => fail(
            NAME,
            format!("{} is not a KVM device: {e}", path.display()),
            "check that /dev/kvm is the KVM character device",
        ),
    }
}

fn read_small(path: &Path) -> std::io::Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(4 << 20)
        .read_to_string(&mut s)?;
    Ok(s)
}

fn check_hw_virt(cpuinfo: &Path, sys_module: &Path) -> Check {
    const NAME: &str = "hardware virtualization";
    if sys_module.join("kvm_pvm").exists() {
        return fail(
            NAME,
            "KVM is provided by kvm_pvm, a software KVM that cannot boot Linux guests".into(),
            "run on a host whose CPU exposes VT-x/AMD-V (vmx/svm); for development, run inside \
             the lab (tests/lab/run)",
        );
    }
    let info = match read_small(cpuinfo) {
        Ok(t) => t,
        Err(e) => {
            return fail(
                NAME,
                format!("cannot read {}: {e}", cpuinfo.display()),
                "mount /proc",
            );
        }
    };
    let flags: Vec<&str> = info
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .collect();
    if let Some(f) = flags.iter().find(|f| **f == "vmx" || **f == "svm") {
        pass(NAME, format!("CPU flag {f} present"))
    } else {
        fail(
            NAME,
            "the CPU flags have neither vmx nor svm".into(),
            "enable VT-x/AMD-V in the firmware; in a VM, enable nested virtualization \
             (e.g. -cpu host / +vmx / +svm)",
        )
    }
}

fn check_image_file(name: &'static str, key: &str, path: &Path, magics: &[&[u8]]) -> Check {
    let hint = format!("build the guest image with `carapace-image build`, or set {key}");
    let mut head = [0u8; 6];
    let n = match std::fs::File::open(path).and_then(|mut f| f.read(&mut head)) {
        Ok(n) => n,
        Err(e) => return fail(name, format!("{}: {e}", path.display()), hint),
    };
    if magics.iter().any(|m| n >= m.len() && head.starts_with(m)) {
        pass(name, format!("{}", path.display()))
    } else {
        fail(
            name,
            format!(
                "{} does not look like the expected file type",
                path.display()
            ),
            hint,
        )
    }
}

fn check_binary(name: &'static str, key: &str, path: &Path, fix: &str) -> Check {
    if is_executable(path) {
        pass(name, format!("{}", path.display()))
    } else if path.exists() {
        fail(
            name,
            format!("{} is not executable", path.display()),
            format!("chmod +x it, or set {key}"),
        )
    } else {
        fail(
            name,
            format!("{} does not exist", path.display()),
            format!("{fix}, or set {key}"),
        )
    }
}

/// Which data path pod NICs get (`network.vhost_net`): "auto" passes either way and says
/// which, "on" fails without a usable device, "off" says it is off.
fn check_vhost_net(mode: VhostNetMode, dev: &Path) -> Check {
    const NAME: &str = "vhost-net";
    const FIX: &str = "load the vhost_net module (modprobe vhost_net) and give the runtime \
                       read-write access to the device";
    let probe = std::fs::OpenOptions::new().read(true).write(true).open(dev);
    match (mode, probe) {
        (VhostNetMode::Off, _) => pass(
            NAME,
            "off (network.vhost_net = \"off\"): pod NICs use the VMM's userspace virtio-net".into(),
        ),
        (_, Ok(_)) => pass(
            NAME,
            format!("{} opens: pod NICs use vhost-net", dev.display()),
        ),
        (VhostNetMode::Auto, Err(e)) => pass(
            NAME,
            format!(
                "{} cannot be opened ({e}): pod NICs use the VMM's userspace virtio-net, which is \
                 slower; to use vhost-net, {FIX}",
                dev.display()
            ),
        ),
        (VhostNetMode::On, Err(e)) => fail(
            NAME,
            format!(
                "{} cannot be opened ({e}) and network.vhost_net = \"on\": pods with a \
                 network cannot start",
                dev.display()
            ),
            format!("{FIX}, or set network.vhost_net = \"auto\""),
        ),
    }
}

/// Runs every check.
pub fn run(config: &Config, host: &HostFiles) -> Vec<Check> {
    let h = &config.hypervisor;
    let fs_fix = match config.fs.daemon {
        FsDaemon::CarapaceFsd => "install carapace-fsd (cargo build --release -p carapace-fsd)",
        FsDaemon::Virtiofsd => "install virtiofsd (cargo install virtiofsd)",
    };
    vec![
        check_kvm_device(&host.kvm),
        check_hw_virt(&host.cpuinfo, &host.sys_module),
        check_image_file(
            "guest kernel",
            "hypervisor.kernel",
            &h.kernel,
            &[b"\x7fELF"],
        ),
        check_image_file(
            "guest initramfs",
            "hypervisor.initrd",
            &h.initrd,
            &[b"\x1f\x8b", b"070701"],
        ),
        check_binary(
            "VMM",
            "hypervisor.path",
            &h.path,
            "install carapace-vmm (cargo build --release -p carapace-vmm)",
        ),
        check_binary("fs daemon", "fs.path", &config.fs.path, fs_fix),
        check_vhost_net(config.network.vhost_net, &host.vhost_net),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Host {
        tmp: tempfile::TempDir,
        files: HostFiles,
        config: Config,
    }

    fn host(cpu_flags: &str, modules: &[&str]) -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let p = |n: &str| tmp.path().join(n);
        std::fs::write(
            p("cpuinfo"),
            format!("processor\t: 0\nflags\t\t: fpu {cpu_flags} sse\n"),
        )
        .unwrap();
        for m in modules {
            std::fs::create_dir_all(p("module").join(m)).unwrap();
        }
        std::fs::write(p("vmlinux"), b"\x7fELF\x02\x01rest").unwrap();
        std::fs::write(p("initrd"), b"\x1f\x8b\x08rest").unwrap();
        for bin in ["vmm", "fsd"] {
            std::fs::write(p(bin), b"#!/bin/sh\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p(bin), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut config = Config::default();
        config.hypervisor.kernel = p("vmlinux");
        config.hypervisor.initrd = p("initrd");
        config.hypervisor.path = p("vmm");
        config.fs.path = p("fsd");
        let files = HostFiles {
            kvm: p("kvm"),
            cpuinfo: p("cpuinfo"),
            sys_module: p("module"),
            vhost_net: p("vhost-net"),
        };
        Host { tmp, files, config }
    }

    fn by_name<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn vhost_net_is_reported_for_each_mode() {
        let h = host("vmx", &["kvm_intel"]);
        let dev = h.files.vhost_net.clone();
        // no device: auto falls back (passes, says so), on fails with a fix, off passes
        let auto = check_vhost_net(VhostNetMode::Auto, &dev);
        assert!(auto.ok && auto.detail.contains("userspace"), "{auto:?}");
        let on = check_vhost_net(VhostNetMode::On, &dev);
        assert!(
            !on.ok && on.hint.as_deref().unwrap().contains("modprobe"),
            "{on:?}"
        );
        let off = check_vhost_net(VhostNetMode::Off, &dev);
        assert!(off.ok && off.detail.contains("off"), "{off:?}");
        // a device that opens read-write (a plain file stands in)
        std::fs::write(&dev, b"").unwrap();
        for mode in [VhostNetMode::Auto, VhostNetMode::On] {
            let c = check_vhost_net(mode, &dev);
            assert!(c.ok && c.detail.contains("use vhost-net"), "{c:?}");
        }
        assert!(by_name(&run(&h.config, &h.files), "vhost-net").ok);
    }

    #[test]
    fn good_files_pass_and_each_failure_has_a_hint() {
        let h = host("vmx", &["kvm_intel"]);
        let checks = run(&h.config, &h.files);
        for name in [
            "hardware virtualization",
            "guest kernel",
            "guest initramfs",
            "VMM",
            "fs daemon",
        ] {
            assert!(
                by_name(&checks, name).ok,
                "{name}: {:?}",
                by_name(&checks, name)
            );
        }
        // No such device file in the fixture.
        let kvm = by_name(&checks, "kvm device");
        assert!(
            !kvm.ok && kvm.hint.as_deref().unwrap().contains("modprobe"),
            "{kvm:?}"
        );
        for c in checks.iter().filter(|c| !c.ok) {
            assert!(c.hint.is_some(), "{c:?}");
        }
        drop(h.tmp);
    }

    #[test]
    fn software_kvm_and_missing_flags_and_files_fail_with_fixes() {
        let h = host("vmx", &["kvm", "kvm_pvm"]);
        let c = check_hw_virt(&h.files.cpuinfo, &h.files.sys_module);
        assert!(!c.ok && c.detail.contains("kvm_pvm"), "{c:?}");
        let h = host("pae", &[]);
        let c = check_hw_virt(&h.files.cpuinfo, &h.files.sys_module);
        assert!(!c.ok && c.detail.contains("neither vmx nor svm"), "{c:?}");

        let mut h = host("svm", &[]);
        h.config.hypervisor.kernel = h.tmp.path().join("none");
        std::fs::write(&h.config.hypervisor.initrd, b"garbage").unwrap();
        std::fs::remove_file(&h.config.fs.path).unwrap();
        let checks = run(&h.config, &h.files);
        let k = by_name(&checks, "guest kernel");
        assert!(
            !k.ok && k.hint.as_deref().unwrap().contains("carapace-image build"),
            "{k:?}"
        );
        assert!(!by_name(&checks, "guest initramfs").ok);
        let f = by_name(&checks, "fs daemon");
        assert!(
            !f.ok && f.hint.as_deref().unwrap().contains("carapace-fsd"),
            "{f:?}"
        );
    }

    #[test]
    fn a_file_that_is_not_kvm_is_reported() {
        let c = check_kvm_device(Path::new("/dev/null"));
        assert!(!c.ok && c.detail.contains("not a KVM device"), "{c:?}");
    }

    #[test]
    fn this_hosts_kvm_answers_the_api_version_when_present() {
        // On the project machines /dev/kvm exists (software or hardware KVM): the ioctl path
        // itself must work there.
        if Path::new("/dev/kvm").exists() {
            let c = check_kvm_device(Path::new("/dev/kvm"));
            assert!(c.ok, "{c:?}");
        }
    }
}
