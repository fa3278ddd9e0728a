//! Content-addressed cache keys and the cache directory layout.
//!
//! ```text
//! <cache>/kernel/<kernel key>/{vmlinux, config, build.log, key.json}
//! <cache>/initramfs/<initramfs key>/{initramfs.cpio.gz, key.json}
//! ```
//! The kernel key covers the source package version and the fragment (not the agent), so
//! an agent change rebuilds only the initramfs; the initramfs key covers the agent binary.
//! Both include a recipe version, bumped whenever the way we build changes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Bump when the kernel build steps change in a way that changes the output.
pub const KERNEL_RECIPE: u32 = 2;
/// Bump when the initramfs layout changes.
pub const INITRAMFS_RECIPE: u32 = 1;

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Inputs that determine the kernel image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelKey {
    pub source_package: String,
    pub source_version: String,
    pub fragment_sha256: String,
    pub recipe: u32,
}

impl KernelKey {
    pub fn new(source_package: &str, source_version: &str, fragment: &[u8]) -> Self {
        Self {
            source_package: source_package.to_owned(),
            source_version: source_version.to_owned(),
            fragment_sha256: sha256_hex(fragment),
            recipe: KERNEL_RECIPE,
        }
    }

    /// Directory name: readable version plus a hash over every input.
    pub fn id(&self) -> String {
        let all = format!(
            "kernel\0{}\0{}\0{}\0{}",
            self.source_package, self.source_version, self.fragment_sha256, self.recipe
        );
        format!(
            "{}-{}",
            sanitize(&self.source_version),
            &sha256_hex(all.as_bytes())[..16]
        )
    }
}

/// Inputs that determine the initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitramfsKey {
    pub agent_sha256: String,
    pub recipe: u32,
}

impl InitramfsKey {
    pub fn new(agent: &[u8]) -> Self {
        Self {
            agent_sha256: sha256_hex(agent),
            recipe: INITRAMFS_RECIPE,
        }
    }

    pub fn id(&self) -> String {
        let all = format!("initramfs\0{}\0{}", self.agent_sha256, self.recipe);
        sha256_hex(all.as_bytes())[..16].to_owned()
    }
}

/// Keeps only characters safe in a directory name.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn kernel_dir(&self, key: &KernelKey) -> PathBuf {
        self.root.join("kernel").join(key.id())
    }
    pub fn initramfs_dir(&self, key: &InitramfsKey) -> PathBuf {
        self.root.join("initramfs").join(key.id())
    }
    /// Where a kernel is built before being moved to [`Cache::kernel_dir`].
    pub fn kernel_work_dir(&self, key: &KernelKey) -> PathBuf {
        self.root.join("kernel").join(format!("{}.work", key.id()))
    }
    pub fn lock_path(&self, dir: &Path) -> PathBuf {
        let mut p = dir.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_key_depends_on_version_and_fragment_only() {
        let a = KernelKey::new("linux-source-6.1", "6.1.192-2", b"CONFIG_A=y\n");
        assert_eq!(
            a.id(),
            KernelKey::new("linux-source-6.1", "6.1.192-2", b"CONFIG_A=y\n").id()
        );
        assert!(a.id().starts_with("6.1.192-2-"));
        assert_eq!(a.id().len(), "6.1.192-2-".len() + 16);
        let other_version = KernelKey::new("linux-source-6.1", "6.1.193-1", b"CONFIG_A=y\n");
        let other_fragment = KernelKey::new("linux-source-6.1", "6.1.192-2", b"CONFIG_A=n\n");
        let other_package = KernelKey::new("linux-source-6.2", "6.1.192-2", b"CONFIG_A=y\n");
        assert_ne!(a.id(), other_version.id());
        assert_ne!(a.id(), other_fragment.id());
        assert_ne!(a.id(), other_package.id());
        let mut other_recipe = a.clone();
        other_recipe.recipe += 1;
        assert_ne!(a.id(), other_recipe.id());
    }

    #[test]
    fn initramfs_key_depends_on_agent_bytes() {
        let a = InitramfsKey::new(b"agent v1");
        assert_eq!(a.id(), InitramfsKey::new(b"agent v1").id());
        assert_ne!(a.id(), InitramfsKey::new(b"agent v2").id());
        assert_eq!(
            a.agent_sha256,
            // sha256("agent v1")
            sha256_hex(b"agent v1")
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn layout_and_sanitising() {
        let c = Cache::new("/c");
        let k = KernelKey::new("p", "1:2.0~rc/x", b"");
        let dir = c.kernel_dir(&k);
        assert!(dir.starts_with("/c/kernel"));
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("1_2.0_rc_x-"), "{name}");
        assert_eq!(
            c.lock_path(&dir).file_name().unwrap().to_str().unwrap(),
            format!("{name}.lock")
        );
        let i = InitramfsKey::new(b"x");
        assert_eq!(c.initramfs_dir(&i), Path::new("/c/initramfs").join(i.id()));
    }
}
