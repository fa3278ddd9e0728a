//! The container's root: the spec's mounts (flags, propagation, binds, typeless binds),
//! `/dev`, the spec's devices, `pivot_root`, the root's propagation, sysctls, masked and
//! read-only paths.

use super::*;

/// Mount options -> (flags, propagation flags, data).
fn parse_options(opts: &[String]) -> (MsFlags, MsFlags, bool, Vec<String>) {
    let mut flags = MsFlags::empty();
    let mut prop = MsFlags::empty();
    let mut recursive = false;
    let mut data = Vec::new();
    for o in opts {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "suid" => flags &= !MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "dev" => flags &= !MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "async" => flags &= !MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "remount" => flags |= MsFlags::MS_REMOUNT,
            "mand" => flags |= MsFlags::MS_MANDLOCK,
            "nomand" => flags &= !MsFlags::MS_MANDLOCK,
            "atime" => flags &= !MsFlags::MS_NOATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "diratime" => flags &= !MsFlags::MS_NODIRATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "norelatime" => flags &= !MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "nostrictatime" => flags &= !MsFlags::MS_STRICTATIME,
            // the kernel's defaults: rw, suid, dev, exec, async
            "defaults" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => {
                flags |= MsFlags::MS_BIND;
                recursive = true;
            }
            "private" => prop |= MsFlags::MS_PRIVATE,
            "rprivate" => prop |= MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            "shared" => prop |= MsFlags::MS_SHARED,
            "rshared" => prop |= MsFlags::MS_SHARED | MsFlags::MS_REC,
            "slave" => prop |= MsFlags::MS_SLAVE,
            "rslave" => prop |= MsFlags::MS_SLAVE | MsFlags::MS_REC,
            "unbindable" => prop |= MsFlags::MS_UNBINDABLE,
            "runbindable" => prop |= MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            other => data.push(other.to_owned()),
        }
    }
    (flags, prop, recursive, data)
}

fn do_mount(root: &Path, m: &Mount) -> Result<(), InitError> {
    let dest_s = m.destination().to_string_lossy().into_owned();
    if !m.destination().is_absolute() {
        return Err(InitError::Config(format!(
            "mount destination {dest_s:?} is not absolute"
        )));
    }
    let dest = secure_join(root, &dest_s)?;
    let (flags, prop, recursive, data) = parse_options(m.options().as_deref().unwrap_or(&[]));
    let is_bind = flags.contains(MsFlags::MS_BIND) || m.typ().as_deref() == Some("bind");
    let mut typ = m.typ().clone().unwrap_or_else(|| "none".into());
    if typ == "cgroup" {
        // The guest is cgroup v2 only.
        typ = "cgroup2".into();
    }
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(&typ));
    if is_bind {
        let md =
            std::fs::metadata(&source).ctx(|| format!("bind mount source {}", source.display()))?;
        if md.is_dir() {
            std::fs::create_dir_all(&dest)
                .ctx(|| format!("creating mount point {}", dest.display()))?;
        } else {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
            }
            if !dest.exists() {
                File::create(&dest).ctx(|| format!("creating mount point {}", dest.display()))?;
            }
        }
        let mut bflags = MsFlags::MS_BIND;
        if recursive {
            bflags |= MsFlags::MS_REC;
        }
        mount(Some(&source), &dest, None::<&str>, bflags, None::<&str>)
            .ctx(|| format!("bind mounting {} on {dest_s}", source.display()))?;
        let extra = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra,
                None::<&str>,
            )
            .ctx(|| format!("remounting {dest_s} with {extra:?}"))?;
        }
    } else {
        std::fs::create_dir_all(&dest)
            .ctx(|| format!("creating mount point {}", dest.display()))?;
        let data = data.join(",");
        let r = mount(
            Some(&source),
            &dest,
            Some(typ.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        );
        match r {
            // sysfs cannot be mounted without owning a network namespace when the VM's
            // is shared from a non-init userns; fall back to a read-only bind of /sys.
            Err(nix::Error::EPERM) if typ == "sysfs" => {
                mount(
                    Some("/sys"),
                    &dest,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .ctx(|| format!("bind mounting /sys on {dest_s}"))?;
                mount(
                    None::<&str>,
                    &dest,
                    None::<&str>,
                    MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .ctx(|| format!("remounting {dest_s} read-only"))?;
            }
            r => r.ctx(|| format!("mounting {typ} on {dest_s} (options {data:?})"))?,
        }
    }
    if !prop.is_empty() {
        mount(None::<&str>, &dest, None::<&str>, prop, None::<&str>)
            .ctx(|| format!("setting propagation of {dest_s}"))?;
    }
    Ok(())
}

/// Device nodes bind-mounted from the agent's /dev into a tmpfs /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn setup_dev(root: &Path) -> Result<(), InitError> {
    let dev = root.join("dev");
    for d in DEVICES {
        let dest = dev.join(d);
        if !dest.exists() {
            File::create(&dest).ctx(|| format!("creating {}", dest.display()))?;
        }
        let src = Path::new("/dev").join(d);
        mount(
            Some(&src),
            &dest,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .ctx(|| format!("bind mounting {} into the container", src.display()))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let p = dev.join(link);
        if std::fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink(target, &p).ctx(|| format!("symlink {}", p.display()))?;
        }
    }
    Ok(())
}

/// The mknod type of an OCI device, or why it has none.
pub fn device_kind(d: &LinuxDevice) -> Result<nix::sys::stat::SFlag, String> {
    use nix::sys::stat::SFlag;
    let p = d.path().display();
    if !d.path().is_absolute() {
        return Err(format!("{p}: path is not absolute"));
    }
    if d.major() < 0 || d.minor() < 0 {
        return Err(format!("{p}: negative major or minor number"));
    }
    match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => Ok(SFlag::S_IFCHR),
        LinuxDeviceType::B => Ok(SFlag::S_IFBLK),
        LinuxDeviceType::P => Ok(SFlag::S_IFIFO),
        LinuxDeviceType::A => Err(format!("{p}: type \"a\" is not a device node type")),
    }
}

/// Creates the spec's `linux.devices` nodes (resolved inside the rootfs). A node that is
/// already there with the same type and number (such as /dev/null bound from the VM) is
/// kept as is.
fn create_devices(root: &Path, spec: &Spec) -> Result<(), InitError> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let devices = spec.linux().as_ref().and_then(|l| l.devices().as_ref());
    for d in devices.into_iter().flatten() {
        let kind = device_kind(d).map_err(|e| InitError::Config(format!("linux.devices: {e}")))?;
        let p = d.path().to_string_lossy().into_owned();
        // device_kind checked that both are not negative.
        let rdev = makedev(d.major().unsigned_abs(), d.minor().unsigned_abs());
        let dest = secure_join(root, &p)?;
        if let Ok(md) = std::fs::symlink_metadata(&dest) {
            let ft = md.file_type();
            let same = match kind {
                SFlag::S_IFCHR => ft.is_char_device() && md.rdev() == rdev,
                SFlag::S_IFBLK => ft.is_block_device() && md.rdev() == rdev,
                _ => ft.is_fifo(),
            };
            if same {
                continue;
            }
            return Err(InitError::Config(format!(
                "linux.devices: {p} already exists and is another file"
            )));
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        let mode = d.file_mode().unwrap_or(0o666) & 0o7777;
        let perm = Mode::from_bits_truncate(mode);
        mknod(&dest, kind, perm, rdev).ctx(|| format!("mknod {p}"))?;
        // mknod applied the umask: set the exact mode.
        nix::sys::stat::fchmodat(
            None,
            &dest,
            perm,
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .ctx(|| format!("chmod {p}"))?;
        nix::unistd::chown(
            &dest,
            d.uid().map(Uid::from_raw),
            d.gid().map(Gid::from_raw),
        )
        .ctx(|| format!("chown {p}"))?;
    }
    Ok(())
}

pub(super) fn setup_rootfs(spec: &Spec) -> Result<(), InitError> {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .ok_or_else(|| InitError::Config("root.path missing".into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .ctx(|| "making / rprivate".into())?;
    mount(
        Some(&root),
        &root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("bind mounting rootfs {}", root.display()))?;
    let mut dev_is_tmpfs = false;
    for m in spec.mounts().iter().flatten() {
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
        do_mount(&root, m)?;
    }
    if dev_is_tmpfs {
        setup_dev(&root)?;
    }
    create_devices(&root, spec)?;
    nix::unistd::chdir(&root).ctx(|| format!("chdir {}", root.display()))?;
    nix::unistd::pivot_root(".", ".").ctx(|| format!("pivot_root to {}", root.display()))?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detaching the old root".into())?;
    nix::unistd::chdir("/").ctx(|| "chdir /".into())?;
    let linux = spec.linux().as_ref();
    // The root's propagation, as asked (it was made private above, with everything else)
    if let Some(p) = linux.and_then(|l| l.rootfs_propagation().as_ref()) {
        let (flags, prop, _, data) = parse_options(std::slice::from_ref(p));
        if prop.is_empty() || !flags.is_empty() || !data.is_empty() {
            return Err(InitError::Config(format!(
                "linux.rootfsPropagation {p:?} is not a propagation (shared, slave, private, \
                 unbindable, or their r-prefixed forms)"
            )));
        }
        mount(None::<&str>, "/", None::<&str>, prop, None::<&str>)
            .ctx(|| format!("applying linux.rootfsPropagation {p:?}"))?;
    }
    // Sysctls before the masked and read-only paths: /proc/sys is usually read-only.
    for (k, v) in linux
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
    {
        let rel = k.replace('.', "/");
        let path = crate::ids::relative_inside(Path::new("/proc/sys"), &rel)?;
        std::fs::write(&path, v).ctx(|| format!("setting sysctl {k}"))?;
    }
    for p in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
    {
        let target = secure_join(Path::new("/"), p)?;
        match std::fs::metadata(&target) {
            Ok(md) if md.is_dir() => mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .ctx(|| format!("masking {p}"))?,
            Ok(_) => mount(
                Some("/dev/null"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .ctx(|| format!("masking {p}"))?,
            Err(_) => {}
        }
    }
    for p in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
    {
        let target = secure_join(Path::new("/"), p)?;
        if target.exists() {
            mount(
                Some(&target),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .ctx(|| format!("binding read-only path {p}"))?;
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_REMOUNT
                    | MsFlags::MS_BIND
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .ctx(|| format!("making {p} read-only"))?;
        }
    }
    if let Some(h) = spec.hostname() {
        nix::unistd::sethostname(h).ctx(|| format!("sethostname({h:?})"))?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .ctx(|| "remounting / read-only".into())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mount_option_the_runtime_advertises_is_applied_not_passed_as_data() {
        for o in carapace_protocol::MOUNT_OPTIONS {
            let (_, _, _, data) = parse_options(&[(*o).to_owned()]);
            assert!(data.is_empty(), "{o} would reach the filesystem as data");
        }
        let opts =
            |o: &[&str]| parse_options(&o.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        let (flags, ..) = opts(&["strictatime", "nostrictatime", "defaults"]);
        assert!(flags.is_empty());
        let (_, prop, recursive, data) = opts(&["rbind", "rslave", "size=1m"]);
        assert_eq!(prop, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert!(recursive);
        assert_eq!(data, ["size=1m"]);
    }
}
