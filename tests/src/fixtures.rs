//! Locally built container fixtures (no registry is reachable): a busybox-static root
//! filesystem, OCI runtime bundles around it, and OCI image archives for `ctr image import`.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked in the fixture root filesystem.
const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "ls",
    "sleep",
    "uname",
    "id",
    "hostname",
    "mount",
    "ps",
    "env",
    "true",
    "false",
    "touch",
    "rm",
    "mkdir",
    "head",
    "tail",
    "seq",
    "yes",
    "wc",
    "dd",
    "grep",
    "sed",
    "kill",
    "stat",
    "readlink",
    "printf",
    "test",
    "tr",
    "sha256sum",
    "df",
    "umount",
    "ln",
    "cp",
    "mv",
    "chmod",
    "date",
    "nproc",
    "free",
    "top",
    "whoami",
    "pwd",
    "xargs",
    "find",
    "tee",
];

/// Errors building fixtures.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// busybox-static is not installed.
    #[error("{BUSYBOX} not found: install the Debian package busybox-static (make setup)")]
    NoBusybox,
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// An external tool failed.
    #[error("{tool} failed: {stderr}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// Its stderr.
        stderr: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FixtureError {
    let path = path.to_path_buf();
    move |source| FixtureError::Io { what, path, source }
}

/// Copies a dynamically linked host program into `rootfs` at the same path, with every
/// shared library `ldd` names (and the loader) at their paths: how a test image gets a tool
/// Debian packages (iperf3) without a package manager in the image.
pub fn add_host_program(rootfs: &Path, program: &Path) -> Result<(), FixtureError> {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .map_err(io("cannot run ldd on", program))?;
    if !out.status.success() {
        return Err(FixtureError::Tool {
            tool: "ldd",
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // "libx.so => /lib/.../libx.so (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
    let libs = text.lines().filter_map(|l| {
        l.split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from)
    });
    for from in std::iter::once(program.to_path_buf()).chain(libs) {
        let rel = from.strip_prefix("/").unwrap_or(&from);
        let to = rootfs.join(rel);
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        }
        // follow the library symlinks: the image gets the files
        fs::copy(&from, &to).map_err(io("cannot copy", &from))?;
    }
    Ok(())
}

/// Fills `rootfs` with busybox-static, its applet links, and the directories and files a
/// container expects (`/proc`, `/sys`, `/dev`, `/tmp`, `/etc/passwd`, ...).
pub fn busybox_rootfs(rootfs: &Path) -> Result<(), FixtureError> {
    if !Path::new(BUSYBOX).exists() {
        return Err(FixtureError::NoBusybox);
    }
    for d in [
        "bin", "proc", "sys", "dev", "tmp", "etc", "root", "run", "var/tmp",
    ] {
        let p = rootfs.join(d);
        fs::create_dir_all(&p).map_err(io("cannot create", &p))?;
    }
    let bb = rootfs.join("bin/busybox");
    fs::copy(BUSYBOX, &bb).map_err(io("cannot copy busybox to", &bb))?;
    for a in APPLETS {
        let link = rootfs.join("bin").join(a);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).map_err(io("cannot link", &link))?;
        }
    }
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hostname", "carapace\n"),
    ];
    for (name, text) in files {
        let p = rootfs.join(name);
        fs::write(&p, text).map_err(io("cannot write", &p))?;
    }
    Ok(())
}

/// A runc-style default OCI runtime spec running `args` in `rootfs` (relative to the bundle).
pub fn default_spec(args: &[&str]) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps, "ambient": []
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "carapace",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"]
        }
    })
}

/// Creates an OCI bundle in `dir`: `rootfs/` with busybox and `config.json` from `spec`.
pub fn busybox_bundle(dir: &Path, spec: &Value) -> Result<PathBuf, FixtureError> {
    busybox_rootfs(&dir.join("rootfs"))?;
    let config = dir.join("config.json");
    let text = serde_json::to_string_pretty(spec).expect("a JSON value serialises");
    fs::write(&config, text).map_err(io("cannot write", &config))?;
    Ok(dir.to_path_buf())
}

/// The Debian release of the Debian-root fixture.
pub const DEBIAN_SUITE: &str = "bookworm";
/// Where the Debian-root fixture is fetched from (override: `CARAPACE_DEBIAN_MIRROR`).
pub const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// Paths dropped from the Debian root to keep the image small (documentation, locales,
/// apt's downloaded lists and packages).
const DEBIAN_STRIP: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
];

/// A small Debian root file system (`debootstrap --variant=minbase`) as an uncompressed,
/// owner-neutral tar, built once and cached by content of its inputs (suite, mirror,
/// stripped paths) under `CARAPACE_FIXTURE_CACHE` (default `/var/cache/carapace/fixtures`):
/// a warm call is a file check. Needs root and the Debian mirror the first time (a few
/// minutes; progress on stderr). Returns the tar's path.
pub fn debian_rootfs_tar() -> Result<PathBuf, FixtureError> {
    let mirror = std::env::var("CARAPACE_DEBIAN_MIRROR")
        .ok()
        .or_else(apt_mirror)
        .unwrap_or_else(|| DEBIAN_MIRROR.into());
    let cache = std::env::var_os("CARAPACE_FIXTURE_CACHE").map_or_else(
        || PathBuf::from("/var/cache/carapace/fixtures"),
        PathBuf::from,
    );
    let key = hex::encode(Sha256::digest(
        format!(
            "minbase\n{DEBIAN_SUITE}\n{mirror}\n{}",
            DEBIAN_STRIP.join(",")
        )
        .as_bytes(),
    ));
    let tar = cache.join(format!("debian-{DEBIAN_SUITE}-minbase-{}.tar", &key[..16]));
    if tar.is_file() {
        return Ok(tar);
    }
    fs::create_dir_all(&cache).map_err(io("cannot create", &cache))?;
    let tmp = cache.join(format!("debian-build-{}", std::process::id()));
    let root = tmp.join("root");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io("cannot create", &tmp))?;
    eprintln!(
        "fixtures: building a Debian {DEBIAN_SUITE} minbase root with debootstrap from {mirror} \
         (a few minutes, once; cached as {})",
        tar.display()
    );
    let built = (|| {
        run(
            "debootstrap",
            Command::new("debootstrap")
                .args(["--variant=minbase", DEBIAN_SUITE])
                .arg(&root)
                .arg(&mirror),
        )?;
        for p in DEBIAN_STRIP {
            let d = root.join(p);
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).map_err(io("cannot create", &d))?;
        }
        let part = tmp.join("root.tar");
        run(
            "tar",
            Command::new("tar")
                .args(["--sort=name", "--numeric-owner", "--mtime=@0", "-C"])
                .arg(&root)
                .arg("-cf")
                .arg(&part)
                .arg("."),
        )?;
        fs::rename(&part, &tar).map_err(io("cannot move into the cache", &tar))
    })();
    // debootstrap mounts /proc and /sys in the target; never recurse into them
    crate::containerd::unmount_under(&tmp);
    let _ = fs::remove_dir_all(&tmp);
    built.map(|()| tar)
}

/// The Debian mirror apt uses on this machine (the one that is reachable), if any.
fn apt_mirror() -> Option<String> {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let legacy = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    mirror_in(&deb822, &legacy)
}

fn mirror_in(deb822: &str, legacy: &str) -> Option<String> {
    let from_deb822 = deb822
        .lines()
        .filter_map(|l| l.trim().strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|u| u.starts_with("http") && !u.contains("security"));
    let from_legacy = || {
        legacy
            .lines()
            .map(str::split_whitespace)
            .filter_map(|mut f| {
                (f.next() == Some("deb")).then(|| f.find(|w| w.starts_with("http")))?
            })
            .find(|u| !u.contains("security"))
    };
    from_deb822.or_else(from_legacy).map(str::to_owned)
}

/// Writes `bytes` as a content-addressed blob of an OCI layout; returns its digest.
fn put_blob(layout: &Path, bytes: &[u8]) -> Result<String, FixtureError> {
    let hex = hex::encode(Sha256::digest(bytes));
    let p = layout.join("blobs/sha256").join(&hex);
    fs::write(&p, bytes).map_err(io("cannot write", &p))?;
    Ok(format!("sha256:{hex}"))
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<Vec<u8>, FixtureError> {
    let out = cmd.output().map_err(|e| FixtureError::Tool {
        tool,
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(FixtureError::Tool {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}

/// Builds an OCI image archive (an OCI image layout in a tar) from the root filesystem
/// `rootfs`, named `name` (e.g. `docker.io/carapace/busybox:latest`), whose default command
/// is `cmd`. The archive imports with `ctr image import`. Returns the archive's path, `out`.
pub fn oci_image_archive(
    rootfs: &Path,
    name: &str,
    cmd: &[&str],
    work: &Path,
    out: &Path,
) -> Result<PathBuf, FixtureError> {
    // One uncompressed layer; sorted, owner-neutral, so equal rootfs give equal digests.
    let layer = run(
        "tar",
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .args(["--mtime=@0", "-C"])
            .arg(rootfs)
            .args(["-cf", "-", "."]),
    )?;
    oci_image_archive_from_layer(&layer, name, cmd, work, out)
}

/// Like [`oci_image_archive`], from an already built uncompressed layer tar (`layer`).
pub fn oci_image_archive_from_layer(
    layer: &[u8],
    name: &str,
    cmd: &[&str],
    work: &Path,
    out: &Path,
) -> Result<PathBuf, FixtureError> {
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io("cannot create", &blobs))?;
    let layer_digest = put_blob(&layout, layer)?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "carapace-tests fixture"}]
    });
    let config_bytes = serde_json::to_vec(&config).expect("serialises");
    let config_digest = put_blob(&layout, &config_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}]
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("serialises");
    let manifest_digest = put_blob(&layout, &manifest_bytes)?;
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_bytes.len(),
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": tag}
        }]
    });
    for (file, text) in [
        (
            "index.json",
            serde_json::to_string(&index).expect("serialises"),
        ),
        ("oci-layout", r#"{"imageLayoutVersion":"1.0.0"}"#.to_owned()),
    ] {
        let p = layout.join(file);
        fs::write(&p, text).map_err(io("cannot write", &p))?;
    }
    run(
        "tar",
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(out)
            .arg("."),
    )?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_program_runs_in_its_image_root_with_its_libraries() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        add_host_program(root, Path::new("/bin/true")).unwrap();
        let program = root.join("bin/true");
        assert!(program.is_file());
        // it runs chrooted there: every library it needs came along
        let status = std::process::Command::new("chroot")
            .arg(root)
            .arg("/bin/true")
            .status()
            .unwrap();
        assert!(status.success(), "{status}");
        assert!(add_host_program(root, Path::new("/nonexistent/tool")).is_err());
    }

    #[test]
    fn the_debian_mirror_is_the_one_apt_uses() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n\
                      Types: deb\nURIs: http://security.example/debian-security\n";
        assert_eq!(
            mirror_in(deb822, "").as_deref(),
            Some("http://mirror.example/debian")
        );
        let legacy = "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main\n";
        assert_eq!(
            mirror_in("", legacy).as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(mirror_in("", ""), None);
    }

    #[test]
    fn bundle_has_a_runnable_rootfs_and_a_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = default_spec(&["sh", "-c", "echo hi"]);
        busybox_bundle(dir.path(), &spec).expect("bundle");
        let back: Value =
            serde_json::from_slice(&fs::read(dir.path().join("config.json")).expect("read"))
                .expect("json");
        assert_eq!(back["process"]["args"][2], "echo hi");
        assert_eq!(back["root"]["path"], "rootfs");
        // the rootfs really runs: busybox's sh through the applet link
        let out = Command::new(dir.path().join("rootfs/bin/sh"))
            .args(["-c", "echo works"])
            .output()
            .expect("run sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "works\n");
    }

    #[test]
    fn image_archive_is_a_consistent_oci_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        busybox_rootfs(&rootfs).expect("rootfs");
        let archive = dir.path().join("img.tar");
        oci_image_archive(
            &rootfs,
            "docker.io/carapace/busybox:1",
            &["sh"],
            dir.path(),
            &archive,
        )
        .expect("archive");
        let check = dir.path().join("check");
        fs::create_dir(&check).expect("mkdir");
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&check)
            .status()
            .expect("untar");
        assert!(st.success());
        let index: Value =
            serde_json::from_slice(&fs::read(check.join("index.json")).expect("index"))
                .expect("json");
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "docker.io/carapace/busybox:1"
        );
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "1");
        // every digest names a blob whose content hashes to it
        let blob = |d: &str| fs::read(check.join("blobs/sha256").join(&d[7..])).expect("blob");
        let digest_ok = |d: &str| hex::encode(Sha256::digest(blob(d))) == d[7..];
        let md = m["digest"].as_str().expect("digest");
        assert!(digest_ok(md));
        let manifest: Value = serde_json::from_slice(&blob(md)).expect("manifest");
        for d in [
            &manifest["config"]["digest"],
            &manifest["layers"][0]["digest"],
        ] {
            assert!(digest_ok(d.as_str().expect("digest")));
        }
        assert_eq!(
            manifest["layers"][0]["size"].as_u64(),
            Some(blob(manifest["layers"][0]["digest"].as_str().expect("d")).len() as u64)
        );
    }
}
