//! PID 1 duties in the guest: console, early mounts, kernel command line, power-off,
//! virtio-fs shares.

use std::io::Write;
use std::path::Path;

use nix::mount::{MsFlags, mount};

/// Errors of PID 1 setup.
#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: String,
        target: String,
        #[source]
        source: nix::Error,
    },
    #[error("creating {path}")]
    Mkdir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid virtio-fs share: {0}")]
    Share(String),
}

/// The first line the agent prints, so the host can tell the guest reached userspace.
pub fn ready_line() -> String {
    format!(
        "carapace-agent: ready version={} protocol={}",
        env!("CARGO_PKG_VERSION"),
        carapace_protocol::PROTOCOL_VERSION
    )
}

/// Writes `line` to /dev/console, or stdout if the console cannot be opened.
pub fn console_line(line: &str) {
    match std::fs::OpenOptions::new().write(true).open("/dev/console") {
        Ok(mut f) => {
            let _ = writeln!(f, "{line}");
        }
        Err(_) => {
            let _ = writeln!(std::io::stdout(), "{line}");
        }
    }
}

fn mkdir(path: &str) -> Result<(), Pid1Error> {
    std::fs::create_dir_all(path).map_err(|source| Pid1Error::Mkdir {
        path: path.to_owned(),
        source,
    })
}

fn mount_fs(
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Pid1Error> {
    mkdir(target)?;
    match mount(Some(fstype), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(Pid1Error::Mount {
            fstype: fstype.to_owned(),
            target: target.to_owned(),
            source,
        }),
    }
}

/// Moves the process root off the initramfs: pivot_root(2) refuses to pivot away from
/// the initial rootfs, so containers could not use it. A recursive bind of `/` onto a
/// directory, moved over `/` and chroot'ed into, is an ordinary mount with a parent, and
/// pivot_root works from there (the same trick as switch_root, without copying).
pub fn leave_initramfs() -> Result<(), Pid1Error> {
    const DIR: &str = "/.carapace-root";
    mkdir(DIR)?;
    let err = |what: &str| {
        let target = what.to_owned();
        move |source| Pid1Error::Mount {
            fstype: "bind of /".into(),
            target,
            source,
        }
    };
    mount(
        Some("/"),
        DIR,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err(DIR))?;
    nix::unistd::chdir(DIR).map_err(err("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(err("move to /"))?;
    nix::unistd::chroot(".").map_err(err("chroot"))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))?;
    Ok(())
}

/// Mounts proc, sys, dev, devpts, shm, cgroup2 and run.
pub fn early_mounts() -> Result<(), Pid1Error> {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", common, None)?;
    mount_fs("sysfs", "/sys", common, None)?;
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666,gid=5"),
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs("cgroup2", "/sys/fs/cgroup", common, None)?;
    mount_fs(
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    Ok(())
}

/// Mounts the virtio-fs share `tag` on `mount_point`.
pub fn mount_virtiofs(tag: &str, mount_point: &Path, read_only: bool) -> Result<(), Pid1Error> {
    if tag.is_empty() || tag.len() > 36 || tag.contains(['\0', ',']) {
        return Err(Pid1Error::Share(format!(
            "bad tag {tag:?} (1..=36 bytes, no ',' or NUL)"
        )));
    }
    let mp = mount_point.to_string_lossy();
    if !mount_point.is_absolute()
        || mount_point
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(Pid1Error::Share(format!(
            "mount point {mp:?} must be absolute without '..'"
        )));
    }
    mkdir(&mp)?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(
        Some(tag),
        mount_point,
        Some("virtiofs"),
        flags,
        None::<&str>,
    )
    .map_err(|source| Pid1Error::Mount {
        fstype: format!("virtiofs tag {tag}"),
        target: mp.into_owned(),
        source,
    })
}

/// Settings read from the kernel command line (`carapace.*`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CmdlineSettings {
    /// `carapace.log=<filter>`: tracing filter (default `info`).
    pub log: Option<String>,
    /// `carapace.port=<n>`: vsock port to listen on (default 1023; only privileged ports,
    /// 1..=1023, are accepted).
    pub port: Option<u32>,
    /// `carapace.cgroup_root=<path>`: parent cgroup of containers (default /sys/fs/cgroup/carapace).
    pub cgroup_root: Option<String>,
    /// `carapace.stop_grace_secs=<n>`: SIGTERM-to-SIGKILL grace of an orderly shutdown
    /// (default 5).
    pub stop_grace_secs: Option<u64>,
    /// `carapace.memory_reserve_mib=<n>`: guest memory kept from the containers for the
    /// agent and the kernel, besides 1/32 of MemTotal (default 32; memory.rs).
    pub memory_reserve_mib: Option<u64>,
    /// The kernel's own `quiet`: nobody keeps the console (the runtime adds it then), so
    /// the agent too writes only warnings and errors there. Every byte on the 8250
    /// console costs the guest two port I/O exits.
    pub quiet: bool,
}

impl CmdlineSettings {
    /// The tracing filter of the agent's console log: `--log` (`from_args`), else
    /// `carapace.log`, else `info`; under `quiet` warnings and errors only, whatever those
    /// say (what nobody keeps is not worth two VM exits per byte).
    pub fn console_filter(&self, from_args: Option<&str>) -> String {
        if self.quiet {
            return "warn".to_owned();
        }
        from_args
            .or(self.log.as_deref())
            .unwrap_or("info")
            .to_owned()
    }
}

/// Largest accepted `carapace.stop_grace_secs` (an hour).
pub const MAX_STOP_GRACE_SECS: u64 = 3600;

/// Largest accepted `carapace.memory_reserve_mib` (64 GiB).
pub const MAX_MEMORY_RESERVE_MIB: u64 = 65536;

/// Parses the `carapace.` parameters of a kernel command line; unknown ones are ignored
/// with their names returned for logging.
pub fn parse_cmdline(text: &str) -> (CmdlineSettings, Vec<String>) {
    let mut s = CmdlineSettings::default();
    let mut unknown = Vec::new();
    for word in text.split_whitespace() {
        if word == "quiet" {
            s.quiet = true;
        }
        let Some(rest) = word.strip_prefix("carapace.") else {
            continue;
        };
        let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
        match k {
            "log" if !v.is_empty() => s.log = Some(v.to_owned()),
            "port" => match v.parse() {
                Ok(p) if (1..=1023).contains(&p) => s.port = Some(p),
                _ => unknown.push(word.to_owned()),
            },
            "cgroup_root" if v.starts_with('/') => s.cgroup_root = Some(v.to_owned()),
            "stop_grace_secs" => match v.parse() {
                Ok(n) if n <= MAX_STOP_GRACE_SECS => s.stop_grace_secs = Some(n),
                _ => unknown.push(word.to_owned()),
            },
            "memory_reserve_mib" => match v.parse() {
                Ok(n) if n <= MAX_MEMORY_RESERVE_MIB => s.memory_reserve_mib = Some(n),
                _ => unknown.push(word.to_owned()),
            },
            _ => unknown.push(word.to_owned()),
        }
    }
    (s, unknown)
}

/// Syncs and powers the VM off. Returns only on failure.
///
/// The guest has no ACPI, where `RB_POWER_OFF` would only halt the CPU: the agent writes
/// the power-off marker (124) to port 0x3f0, then resets the machine (`RB_AUTOBOOT`; the
/// kernel's `reboot=k` uses the i8042 reset line). Our VMM treats a reset announced this
/// way as power-off; QEMU with `-no-reboot` exits on the reset.
pub fn power_off() -> nix::Error {
    nix::unistd::sync();
    if let Err(e) = crate::sys::write_marker(crate::sys::POWER_OFF_MARKER_VALUE) {
        console_line(&format!(
            "carapace-agent: cannot write the power-off marker: {e}"
        ));
    }
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        let (s, unknown) = parse_cmdline(
            "console=ttyS0 carapace.log=debug carapace.port=900 carapace.bogus=1 carapace.port=x \
             carapace.port=2000 carapace.stop_grace_secs=7 carapace.stop_grace_secs=99999 \
             carapace.memory_reserve_mib=48 carapace.memory_reserve_mib=-1",
        );
        assert_eq!(s.log.as_deref(), Some("debug"));
        assert_eq!(s.port, Some(900), "an unprivileged port is refused");
        assert_eq!(s.stop_grace_secs, Some(7));
        assert_eq!(s.memory_reserve_mib, Some(48));
        assert!(!s.quiet);
        assert!(
            parse_cmdline("console=ttyS0 quiet carapace.log=info")
                .0
                .quiet
        );
        assert!(!parse_cmdline("carapace.quiet quieter").0.quiet);
        assert_eq!(
            unknown,
            vec![
                "carapace.bogus=1",
                "carapace.port=x",
                "carapace.port=2000",
                "carapace.stop_grace_secs=99999",
                "carapace.memory_reserve_mib=-1"
            ]
        );
    }

    #[test]
    fn quiet_caps_the_console_log_at_warnings() {
        let (loud, _) = parse_cmdline("console=ttyS0 carapace.log=debug");
        assert_eq!(loud.console_filter(None), "debug");
        assert_eq!(loud.console_filter(Some("trace")), "trace");
        assert_eq!(CmdlineSettings::default().console_filter(None), "info");
        let (quiet, _) = parse_cmdline("console=ttyS0 carapace.log=debug quiet");
        assert_eq!(quiet.console_filter(None), "warn");
        assert_eq!(quiet.console_filter(Some("trace")), "warn");
    }

    #[test]
    fn ready_line_format() {
        assert!(ready_line().starts_with("carapace-agent: ready version="));
        assert!(
            ready_line().ends_with(&format!("protocol={}", carapace_protocol::PROTOCOL_VERSION))
        );
    }

    #[test]
    fn bad_shares_rejected_before_mounting() {
        assert!(mount_virtiofs("", Path::new("/x"), false).is_err());
        assert!(mount_virtiofs("a,b", Path::new("/x"), false).is_err());
        assert!(mount_virtiofs("tag", Path::new("rel"), false).is_err());
        assert!(mount_virtiofs("tag", Path::new("/a/../b"), false).is_err());
    }
}
