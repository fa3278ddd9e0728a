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
    /// The user database (`/etc/passwd`), for users inside the jail's uid range.
    pub passwd: PathBuf,
    /// The group database (`/etc/group`).
    pub group: PathBuf,
    /// Subordinate uid ranges (`/etc/subuid`).
    pub subuid: PathBuf,
    /// Subordinate gid ranges (`/etc/subgid`).
    pub subgid: PathBuf,
}

impl Default for HostFiles {
    fn default() -> Self {
        Self {
            kvm: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            sys_module: "/sys/module".into(),
            vhost_net: crate::launcher::VHOST_NET_DEV.into(),
            passwd: "/etc/passwd".into(),
            group: "/etc/group".into(),
            subuid: "/etc/subuid".into(),
            subgid: "/etc/subgid".into(),
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

/// Whether a jailed VMM can be made here (`[jail]`): the namespaces, the id change and
/// no_new_privs, tried in a child ([`crate::jail::probe`]).
fn check_jail_probe(jail: &carapace_config::Jail) -> Check {
    const NAME: &str = "VMM jail";
    if !jail.enabled {
        return pass(
            NAME,
            "off (jail.enabled = false): VMMs run as root with the host's view, under their \
             seccomp filters only"
                .into(),
        );
    }
    match crate::jail::probe::probe(jail.uid_base) {
        Ok(()) => pass(
            NAME,
            format!(
                "new mount, IPC, UTS, network and PID namespaces, uid/gid {} without groups \
                 and no_new_privs all work: each VMM runs jailed",
                jail.uid_base
            ),
        ),
        Err(e) => fail(
            NAME,
            format!(
                "a jailed VMM cannot be made here ({}): sandboxes fail to start",
                carapace_errors::chain(&e)
            ),
            "run the runtime as root (it needs CAP_SYS_ADMIN, CAP_SETUID and CAP_SETGID) on a \
             kernel with mount, IPC, UTS, network and PID namespaces; or set jail.enabled = false \
             (VMMs then run as root, unconfined but for seccomp)",
        ),
    }
}

/// Whether the fs daemon can run jailed here (`[jail] fs_daemon`): an overlay of idmapped
/// layers, made and removed in a scratch directory under the state directory.
fn check_fs_jail_probe(config: &Config) -> Check {
    const NAME: &str = "fs daemon jail";
    let jail = &config.jail;
    if !jail.enabled || !jail.fs_daemon {
        return pass(
            NAME,
            "off (jail.enabled or jail.fs_daemon false): the fs daemon runs as root in its own \
             namespaces, under its seccomp filter"
                .into(),
        );
    }
    match crate::jail::probe::fs_probe(&config.runtime.state_dir, jail) {
        Ok(()) => pass(
            NAME,
            format!(
                "an overlay of idmapped layers works under {}: each fs daemon serves as root \
                 of its own block of {} ids",
                config.runtime.state_dir.display(),
                jail.fs_ids
            ),
        ),
        Err(e) => fail(
            NAME,
            format!(
                "a jailed fs daemon cannot serve files here ({}): sandboxes fail to start",
                carapace_errors::chain(&e)
            ),
            "run the runtime as root on Linux 5.19 or later whose file systems support \
             idmapped mounts (tmpfs from 6.3; not NFS or 9p), or set jail.fs_daemon = false \
             (the fs daemon then runs as root)",
        ),
    }
}

/// Entries of the host's user, group and subordinate-id files that fall in `range`: whoever
/// holds such an id could signal or trace the VMM running as it.
pub fn range_conflicts(
    range: crate::jail::UidRange,
    passwd: &str,
    group: &str,
    subuid: &str,
    subgid: &str,
) -> Vec<String> {
    let mut found = Vec::new();
    for (file, text) in [("/etc/passwd", passwd), ("/etc/group", group)] {
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            let id = f.get(2).and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(id) = id.filter(|id| range.contains(*id)) {
                found.push(format!("{file}: {} has id {id}", f[0]));
            }
        }
    }
    let (lo, hi) = (u64::from(range.base), range.last());
    for (file, text) in [("/etc/subuid", subuid), ("/etc/subgid", subgid)] {
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            let (Some(start), Some(count)) = (
                f.get(1).and_then(|v| v.trim().parse::<u64>().ok()),
                f.get(2).and_then(|v| v.trim().parse::<u64>().ok()),
            ) else {
                continue;
            };
            if count > 0 && start <= hi && start + count > lo {
                found.push(format!(
                    "{file}: {} has {start}..={}",
                    f[0],
                    start + count - 1
                ));
            }
        }
    }
    found
}

/// Whether the jail's uid range is the VMMs' alone and has free ids.
fn check_jail_range(config: &Config, host: &HostFiles) -> Option<Check> {
    const NAME: &str = "jail uid range";
    let jail = &config.jail;
    if !jail.enabled {
        return None;
    }
    let range = crate::jail::UidRange::of(jail);
    let shown = format!(
        "{}..={} (jail.uid_base, jail.uid_count)",
        range.base,
        range.last()
    );
    let read = |p: &Path| read_small(p).unwrap_or_default();
    let files = [&host.passwd, &host.group, &host.subuid, &host.subgid].map(|p| read(p));
    let conflicts_in = |r| range_conflicts(r, &files[0], &files[1], &files[2], &files[3]);
    let conflicts = conflicts_in(range);
    if !conflicts.is_empty() {
        return Some(fail(
            NAME,
            format!("{shown} overlaps ids in use: {}", conflicts.join("; ")),
            "move the range (jail.uid_base) clear of every user, group and subordinate range",
        ));
    }
    if jail.fs_daemon {
        let fs_range = crate::jail::UidRange {
            base: jail.fs_uid_base,
            count: u32::try_from(jail.fs_end() - u64::from(jail.fs_uid_base)).unwrap_or(u32::MAX),
        };
        let conflicts = conflicts_in(fs_range);
        if !conflicts.is_empty() {
            return Some(fail(
                NAME,
                format!(
                    "the fs daemons' blocks {}..={} (jail.fs_uid_base, jail.uid_count x jail.fs_ids) overlap ids in use: {}",
                    fs_range.base,
                    fs_range.last(),
                    conflicts.join("; ")
                ),
                "move the blocks (jail.fs_uid_base) clear of every user, group and subordinate range",
            ));
        }
    }
    let claims = crate::jail::UidClaims::new(&config.runtime.state_dir);
    Some(match claims.usage(range) {
        Ok(u) if u.live >= range.count => fail(
            NAME,
            format!(
                "{shown}: all {} ids are claimed by sandboxes that still exist ({})",
                range.count,
                claims.dir().display()
            ),
            "delete sandboxes or raise jail.uid_count",
        ),
        Ok(u) => pass(
            NAME,
            format!(
                "{shown}: {} free, {} claimed by running sandboxes{}; no user, group or \
                 subordinate range overlaps it",
                range.count - u.live,
                u.live,
                if u.stale > 0 {
                    format!(", {} left by sandboxes that are gone (reused)", u.stale)
                } else {
                    String::new()
                }
            ),
        ),
        Err(e) => fail(
            NAME,
            format!("{shown}: {}", carapace_errors::chain(&e)),
            "make runtime.state_dir readable to the runtime (root)",
        ),
    })
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
        check_jail_probe(&config.jail),
        check_fs_jail_probe(config),
    ]
    .into_iter()
    .chain(check_jail_range(config, host))
    .collect()
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
            passwd: p("passwd"),
            group: p("group"),
            subuid: p("subuid"),
            subgid: p("subgid"),
        };
        config.runtime.state_dir = p("run");
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
    fn the_jail_range_must_be_free_of_users_groups_and_subordinate_ranges() {
        let range = crate::jail::UidRange {
            base: 1_879_048_192,
            count: 65_536,
        };
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        let group = "root:x:0:\nusers:x:100:\n";
        let subuid = "alice:100000:65536\n";
        assert!(range_conflicts(range, passwd, group, subuid, subuid).is_empty());
        let passwd = format!("{passwd}vmm:x:1879048200:5::/:/bin/false\n");
        let group = format!("{group}odd:x:1879113727:\n");
        // ends exactly at the range's first id / starts exactly past its last: no overlap
        let subuid = "a:1879044096:4096\nb:1879113728:10\nc:1879113727:1\n";
        let subgid = "d:1879000000:50000\n";
        let found = range_conflicts(range, &passwd, &group, subuid, subgid);
        assert_eq!(
            found,
            [
                "/etc/passwd: vmm has id 1879048200",
                "/etc/group: odd has id 1879113727",
                "/etc/subuid: c has 1879113727..=1879113727",
                "/etc/subgid: d has 1879000000..=1879049999",
            ]
        );
    }

    #[test]
    fn the_jail_is_reported_with_its_range_and_free_ids() {
        let mut h = host("vmx", &["kvm_intel"]);
        h.config.jail.fs_daemon = true;
        let range = by_name(&run(&h.config, &h.files), "jail uid range").clone();
        assert!(range.ok && range.detail.contains("4000 free"), "{range:?}");
        // the fs daemons' blocks are checked too
        std::fs::write(&h.files.subuid, "bob:1879179264:65536\n").unwrap();
        let c = by_name(&run(&h.config, &h.files), "jail uid range").clone();
        assert!(
            !c.ok
                && c.detail.contains("bob")
                && c.hint.as_deref().unwrap().contains("jail.fs_uid_base"),
            "{c:?}"
        );
        std::fs::remove_file(&h.files.subuid).unwrap();
        // the fs daemon's probe: root makes the overlay of idmapped layers here
        let fs = by_name(&run(&h.config, &h.files), "fs daemon jail").clone();
        if nix::unistd::Uid::effective().is_root() {
            assert!(fs.ok, "{fs:?}");
        } else {
            assert!(
                !fs.ok && fs.hint.as_deref().unwrap().contains("jail.fs_daemon"),
                "{fs:?}"
            );
        }
        // a user in the range fails it, naming the user and the key
        std::fs::write(&h.files.passwd, "vmm:x:1879048300:1::/:/bin/false\n").unwrap();
        let c = by_name(&run(&h.config, &h.files), "jail uid range").clone();
        assert!(
            !c.ok
                && c.detail.contains("vmm")
                && c.hint.as_deref().unwrap().contains("jail.uid_base"),
            "{c:?}"
        );
        std::fs::remove_file(&h.files.passwd).unwrap();
        // every id claimed by a live sandbox: no free id
        h.config.jail.uid_count = 1;
        let state = h.config.runtime.state_dir.clone();
        std::fs::create_dir_all(state.join("s1")).unwrap();
        crate::jail::UidClaims::new(&state)
            .claim(
                crate::jail::UidRange::of(&h.config.jail),
                "s1",
                &state.join("s1"),
            )
            .unwrap();
        let c = by_name(&run(&h.config, &h.files), "jail uid range").clone();
        assert!(
            !c.ok && c.hint.as_deref().unwrap().contains("jail.uid_count"),
            "{c:?}"
        );
        // the probe: root jails, others are told to run as root
        let probe = by_name(&run(&h.config, &h.files), "VMM jail").clone();
        if nix::unistd::Uid::effective().is_root() {
            assert!(probe.ok, "{probe:?}");
        } else {
            assert!(
                !probe.ok && probe.hint.as_deref().unwrap().contains("root"),
                "{probe:?}"
            );
        }
        // off: reported as off, no range check
        h.config.jail.enabled = false;
        let checks = run(&h.config, &h.files);
        let off = by_name(&checks, "VMM jail");
        assert!(
            off.ok && off.detail.contains("jail.enabled = false"),
            "{off:?}"
        );
        assert!(checks.iter().all(|c| c.name != "jail uid range"));
        assert!(by_name(&checks, "fs daemon jail").detail.starts_with("off"));
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
