//! The whole image: kernel + initramfs, built through the cache, installed where the
//! runtime's default configuration looks, and described by a manifest (`image.json`).

use crate::agent::{self, AgentError};
use crate::cache::{self, Cache, InitramfsKey, KernelKey};
use crate::elf;
use crate::initramfs::{self, Contents, InitramfsError};
use crate::kernel::{self, KernelBuild, KernelError, KernelSource};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub const DEFAULT_OUT_DIR: &str = "/var/lib/carapace/guest";
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/carapace/guest-image";
pub const DEFAULT_SOURCE_PACKAGE: &str = "linux-source-6.1";
pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRAMFS_FILE: &str = "initramfs.cpio.gz";
pub const MANIFEST_FILE: &str = "image.json";
/// Sanity bounds checked by `check` (our kernel is ~10-20 MB, the initramfs a few MB).
pub const MAX_KERNEL_BYTES: u64 = 64 * 1024 * 1024;
pub const MAX_INITRAMFS_BYTES: u64 = 128 * 1024 * 1024;
pub const MIN_KERNEL_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("initramfs {path}")]
    Initramfs {
        path: PathBuf,
        #[source]
        source: InitramfsError,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel {path} is not a valid x86-64 ELF vmlinux")]
    KernelElf {
        path: PathBuf,
        #[source]
        source: elf::ElfError,
    },
    #[error(
        "kernel {path} has no PVH entry note (Xen ELF note type 18); it cannot be booted by our VMM"
    )]
    NoPvhNote { path: PathBuf },
    #[error("{what} {path} is {size} bytes, outside the expected {min}..={max}")]
    Size {
        what: &'static str,
        path: PathBuf,
        size: u64,
        min: u64,
        max: u64,
    },
    #[error("manifest {path} is invalid")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| {
        if source.kind() == io::ErrorKind::StorageFull {
            ImageError::Kernel(KernelError::DiskFull {
                path: path.to_owned(),
                available_mib: kernel::available_mib(path.parent().unwrap_or(path)).unwrap_or(0),
                needed_mib: 0,
                detail: format!(" ({action} {})", path.display()),
            })
        } else {
            ImageError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        }
    }
}

/// Identity of an installed image, written beside it as `image.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub kernel_key: KernelKey,
    pub kernel_id: String,
    pub kernel_sha256: String,
    pub kernel_bytes: u64,
    pub initramfs_key: InitramfsKey,
    pub initramfs_id: String,
    pub initramfs_sha256: String,
    pub initramfs_bytes: u64,
}

/// Options of `carapace-image build`.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// A prebuilt static agent; `None` builds it with cargo from `workspace`.
    pub agent: Option<PathBuf>,
    pub workspace: Option<PathBuf>,
    pub source_package: String,
    /// A fragment file; `None` uses the fragment compiled into this binary.
    pub fragment: Option<PathBuf>,
    pub jobs: usize,
    pub force: bool,
}

/// What `build` did.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub manifest: Manifest,
    pub kernel_cached: bool,
    pub initramfs_cached: bool,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Builds (or reuses from the cache) the kernel and initramfs and installs them.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, ImageError> {
    // Cheap checks first: the source package and the agent, before a long kernel build.
    let source = KernelSource::locate(&opts.source_package)?;
    let (fragment, origin) = match &opts.fragment {
        Some(p) => (
            fs::read_to_string(p).map_err(io_err("reading fragment", p))?,
            p.display().to_string(),
        ),
        None => (
            crate::DEFAULT_FRAGMENT.to_owned(),
            "(built in: guest-image/kernel/carapace.fragment)".to_owned(),
        ),
    };
    let agent_path = match &opts.agent {
        Some(p) => p.clone(),
        None => {
            let ws = match &opts.workspace {
                Some(w) => w.clone(),
                None => agent::workspace_root(
                    &std::env::current_dir().map_err(io_err("reading", Path::new(".")))?,
                )?,
            };
            agent::build(&ws)?
        }
    };
    let agent_bytes = agent::load(&agent_path)?;
    tracing::info!(
        "agent: {} ({} bytes, static)",
        agent_path.display(),
        agent_bytes.len()
    );

    let cache = Cache::new(&opts.cache_dir);
    let k = kernel::build(&KernelBuild {
        source: &source,
        fragment: &fragment,
        fragment_origin: &origin,
        cache: &cache,
        jobs: opts.jobs,
        force: opts.force,
    })?;

    let ikey = InitramfsKey::new(&agent_bytes);
    let idir = cache.initramfs_dir(&ikey);
    let ipath = idir.join(INITRAMFS_FILE);
    let initramfs_cached = !opts.force && ipath.is_file();
    if initramfs_cached {
        tracing::info!(key = %ikey.id(), "initramfs: cache hit, not rebuilding");
    } else {
        let gz = initramfs::build(&agent_bytes).map_err(|source| ImageError::Initramfs {
            path: ipath.clone(),
            source,
        })?;
        fs::create_dir_all(&idir).map_err(io_err("creating", &idir))?;
        let kj = idir.join("key.json");
        let json = serde_json::to_vec_pretty(&ikey).map_err(|source| ImageError::Manifest {
            path: kj.clone(),
            source,
        })?;
        initramfs::write_atomic(&kj, &json).map_err(io_err("writing", &kj))?;
        initramfs::write_atomic(&ipath, &gz).map_err(io_err("writing", &ipath))?;
        tracing::info!(key = %ikey.id(), bytes = gz.len(), "initramfs: built");
    }

    // Install: copy from the cache unless the installed file already has the same content.
    fs::create_dir_all(&opts.out_dir).map_err(io_err("creating", &opts.out_dir))?;
    let kernel_dst = opts.out_dir.join(KERNEL_FILE);
    let initramfs_dst = opts.out_dir.join(INITRAMFS_FILE);
    let (kernel_sha256, kernel_bytes) = install(&k.vmlinux, &kernel_dst)?;
    let (initramfs_sha256, initramfs_bytes) = install(&ipath, &initramfs_dst)?;
    let manifest = Manifest {
        kernel_id: k.key.id(),
        kernel_key: k.key,
        kernel_sha256,
        kernel_bytes,
        initramfs_id: ikey.id(),
        initramfs_key: ikey,
        initramfs_sha256,
        initramfs_bytes,
    };
    let mpath = opts.out_dir.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| ImageError::Manifest {
        path: mpath.clone(),
        source,
    })?;
    initramfs::write_atomic(&mpath, &json).map_err(io_err("writing", &mpath))?;
    Ok(BuildReport {
        manifest,
        kernel_cached: k.cached,
        initramfs_cached,
        kernel: kernel_dst,
        initramfs: initramfs_dst,
    })
}

/// Copies `from` to `to` atomically unless `to` already has the same bytes.
/// Returns the sha256 and size.
fn install(from: &Path, to: &Path) -> Result<(String, u64), ImageError> {
    let data = fs::read(from).map_err(io_err("reading", from))?;
    let sha = cache::sha256_hex(&data);
    let same = fs::read(to).is_ok_and(|old| cache::sha256_hex(&old) == sha);
    if same {
        tracing::info!("install: {} is up to date", to.display());
    } else {
        initramfs::write_atomic(to, &data).map_err(io_err("installing", to))?;
        tracing::info!("install: {}", to.display());
    }
    Ok((sha, data.len() as u64))
}

/// What `check` found about a kernel.
#[derive(Debug, Clone)]
pub struct KernelReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub pvh_entry: u64,
    /// The `Linux version ...` banner embedded in the image.
    pub banner: Option<String>,
}

/// What `check` found about an initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub contents: Contents,
}

fn read_bounded(
    what: &'static str,
    path: &Path,
    min: u64,
    max: u64,
) -> Result<Vec<u8>, ImageError> {
    let size = fs::metadata(path).map_err(io_err("reading", path))?.len();
    if size < min || size > max {
        return Err(ImageError::Size {
            what,
            path: path.to_owned(),
            size,
            min,
            max,
        });
    }
    fs::read(path).map_err(io_err("reading", path))
}

/// Finds the `Linux version ...` banner (bounded to one short line).
fn linux_banner(b: &[u8]) -> Option<String> {
    let needle = b"Linux version ";
    let start = b.windows(needle.len()).position(|w| w == needle)?;
    let rest = &b[start..b.len().min(start + 256)];
    let end = rest
        .iter()
        .position(|&c| c == b'\n' || c == 0)
        .unwrap_or(rest.len());
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Validates a kernel: an x86-64 ELF with the PVH entry note, of a sane size.
pub fn check_kernel(path: &Path) -> Result<KernelReport, ImageError> {
    let b = read_bounded("kernel", path, MIN_KERNEL_BYTES, MAX_KERNEL_BYTES)?;
    let info = elf::parse(&b).map_err(|source| ImageError::KernelElf {
        path: path.to_owned(),
        source,
    })?;
    let pvh_entry = info.pvh_entry.ok_or_else(|| ImageError::NoPvhNote {
        path: path.to_owned(),
    })?;
    Ok(KernelReport {
        path: path.to_owned(),
        bytes: b.len() as u64,
        sha256: cache::sha256_hex(&b),
        pvh_entry,
        banner: linux_banner(&b),
    })
}

/// Validates an initramfs: newc (gzip or plain) with a static executable /init and
/// /dev/console, of a sane size.
pub fn check_initramfs(path: &Path) -> Result<InitramfsReport, ImageError> {
    let b = read_bounded("initramfs", path, 1, MAX_INITRAMFS_BYTES)?;
    let contents = initramfs::inspect(&b).map_err(|source| ImageError::Initramfs {
        path: path.to_owned(),
        source,
    })?;
    Ok(InitramfsReport {
        path: path.to_owned(),
        bytes: b.len() as u64,
        sha256: cache::sha256_hex(&b),
        contents,
    })
}

/// Reads `image.json` from `dir`, if there is one.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>, ImageError> {
    let p = dir.join(MANIFEST_FILE);
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| ImageError::Manifest { path: p, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", &p)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole build with a pre-seeded kernel cache entry: nothing is compiled, the
    /// initramfs is built once, then reused; an agent change rebuilds only the initramfs.
    #[test]
    fn build_uses_the_cache_and_installs_with_a_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let cache_dir = tmp.path().join("cache");
        let source = KernelSource::locate(DEFAULT_SOURCE_PACKAGE).unwrap();
        let key = KernelKey::new(
            &source.package,
            &source.version,
            crate::DEFAULT_FRAGMENT.as_bytes(),
        );
        let kdir = Cache::new(&cache_dir).kernel_dir(&key);
        fs::create_dir_all(&kdir).unwrap();
        fs::write(kdir.join(KERNEL_FILE), b"pretend vmlinux").unwrap();
        let agent = tmp.path().join("agent");
        fs::copy("/bin/busybox", &agent).unwrap();
        let opts = BuildOptions {
            out_dir: tmp.path().join("out"),
            cache_dir: cache_dir.clone(),
            agent: Some(agent.clone()),
            workspace: None,
            source_package: DEFAULT_SOURCE_PACKAGE.into(),
            fragment: None,
            jobs: 1,
            force: false,
        };
        let first = build(&opts).unwrap();
        assert!(first.kernel_cached);
        assert!(!first.initramfs_cached);
        assert_eq!(fs::read(&first.kernel).unwrap(), b"pretend vmlinux");
        let contents = initramfs::inspect(&fs::read(&first.initramfs).unwrap()).unwrap();
        assert_eq!(
            contents.init_sha256,
            cache::sha256_hex(&fs::read("/bin/busybox").unwrap())
        );
        assert_eq!(
            read_manifest(&opts.out_dir).unwrap().as_ref(),
            Some(&first.manifest)
        );
        assert_eq!(first.manifest.kernel_key, key);

        let second = build(&opts).unwrap();
        assert!(second.kernel_cached && second.initramfs_cached);
        assert_eq!(second.manifest, first.manifest);

        // A different agent: new initramfs, same kernel.
        let mut other = fs::read(&agent).unwrap();
        other.extend_from_slice(b"trailing bytes change the hash");
        fs::write(&agent, other).unwrap();
        let third = build(&opts).unwrap();
        assert!(third.kernel_cached && !third.initramfs_cached);
        assert_eq!(third.manifest.kernel_id, first.manifest.kernel_id);
        assert_ne!(third.manifest.initramfs_id, first.manifest.initramfs_id);

        // A dynamic agent is refused before any build work.
        let bad = BuildOptions {
            agent: Some("/bin/ls".into()),
            ..opts
        };
        assert!(matches!(
            build(&bad),
            Err(ImageError::Agent(AgentError::NotStatic { .. }))
        ));
    }

    #[test]
    fn banner_is_found_and_bounded() {
        let mut b = vec![0u8; 100];
        b.extend_from_slice(b"Linux version 6.1.192 (carapace@carapace) #1 SMP\n\0rest");
        assert_eq!(
            linux_banner(&b).as_deref(),
            Some("Linux version 6.1.192 (carapace@carapace) #1 SMP")
        );
        assert_eq!(linux_banner(b"nothing here"), None);
        let long = [b"Linux version ".as_slice(), &[b'x'; 1000]].concat();
        assert_eq!(linux_banner(&long).unwrap().len(), 256);
    }

    #[test]
    fn check_rejects_wrong_sizes_and_missing_note() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        fs::write(&small, b"\x7fELF").unwrap();
        assert!(matches!(check_kernel(&small), Err(ImageError::Size { .. })));
        // A big static ELF without the PVH note: busybox padded to the minimum size.
        let mut bb = fs::read("/bin/busybox").unwrap();
        bb.resize(bb.len().max(MIN_KERNEL_BYTES as usize), 0);
        let nopvh = dir.path().join("nopvh");
        fs::write(&nopvh, &bb).unwrap();
        assert!(matches!(
            check_kernel(&nopvh),
            Err(ImageError::NoPvhNote { .. })
        ));
    }

    #[test]
    fn install_is_atomic_and_skips_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&a, b"one").unwrap();
        let (sha, n) = install(&a, &b).unwrap();
        assert_eq!((sha.as_str(), n), (cache::sha256_hex(b"one").as_str(), 3));
        let before = fs::metadata(&b).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        install(&a, &b).unwrap();
        assert_eq!(fs::metadata(&b).unwrap().modified().unwrap(), before);
        fs::write(&a, b"two").unwrap();
        install(&a, &b).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"two");
    }

    #[test]
    fn manifest_round_trip_and_strictness() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_manifest(dir.path()).unwrap().is_none());
        let m = Manifest {
            kernel_key: KernelKey::new("p", "1", b"f"),
            kernel_id: "k".into(),
            kernel_sha256: "s".into(),
            kernel_bytes: 1,
            initramfs_key: InitramfsKey::new(b"a"),
            initramfs_id: "i".into(),
            initramfs_sha256: "t".into(),
            initramfs_bytes: 2,
        };
        fs::write(
            dir.path().join(MANIFEST_FILE),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        assert_eq!(read_manifest(dir.path()).unwrap(), Some(m));
        fs::write(dir.path().join(MANIFEST_FILE), br#"{"bogus":1}"#).unwrap();
        assert!(matches!(
            read_manifest(dir.path()),
            Err(ImageError::Manifest { .. })
        ));
    }
}
