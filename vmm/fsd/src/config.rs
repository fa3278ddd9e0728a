//! Validated daemon configuration, built from the command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fsd_fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig};

/// Errors while validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The shared directory does not exist.
    #[error("shared directory {path}: does not exist")]
    SharedDirMissing {
        /// Path given on the command line.
        path: PathBuf,
    },
    /// The shared directory exists but is not a directory.
    #[error("shared directory {path}: not a directory")]
    SharedDirNotDir {
        /// Path given on the command line.
        path: PathBuf,
    },
    /// The shared directory could not be accessed.
    #[error("shared directory {path}: no permission to access it")]
    SharedDirPermission {
        /// Path given on the command line.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Any other error while checking the shared directory.
    #[error("shared directory {path}: cannot be inspected")]
    SharedDirIo {
        /// Path given on the command line.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A numeric option is out of range.
    #[error("option {field}: {reason}")]
    OutOfRange {
        /// Option name.
        field: &'static str,
        /// Why the value is rejected.
        reason: String,
    },
}

/// Guest page cache policy, as virtiofsd's `--cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheMode {
    /// No caching in the guest: every access goes to the host (attributes and data).
    Never,
    /// Metadata cached for one second; data cached until a change is seen on open.
    Auto,
    /// Metadata and data cached in the guest for a long time (nothing else changes the dir).
    Always,
}

impl CacheMode {
    fn policy(self) -> CachePolicy {
        match self {
            CacheMode::Never => CachePolicy::Never,
            CacheMode::Auto => CachePolicy::Auto,
            CacheMode::Always => CachePolicy::Always,
        }
    }

    fn timeout(self) -> Duration {
        match self {
            CacheMode::Never => Duration::ZERO,
            CacheMode::Auto => Duration::from_secs(1),
            CacheMode::Always => Duration::from_secs(86_400),
        }
    }
}

/// How the daemon confines itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// Own mount namespace, pivot_root into the shared dir, seccomp, no_new_privs,
    /// capability drop. Needs root (CAP_SYS_ADMIN) at start.
    Namespace,
    /// seccomp + no_new_privs + capability drop only, no namespace (for unprivileged runs).
    /// Safety then rests on the fd-based path handling alone.
    None,
}

/// Largest accepted `--thread-pool-size`.
pub const MAX_THREAD_POOL: usize = 64;

/// The validated configuration of one daemon.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Canonical absolute path of the shared directory.
    pub shared_dir: PathBuf,
    /// Guest cache policy.
    pub cache: CacheMode,
    /// Refuse every modification.
    pub readonly: bool,
    /// Support extended attributes.
    pub xattr: bool,
    /// Enable the guest writeback cache (only with cache auto/always).
    pub writeback: bool,
    /// Worker threads for requests; 0 handles requests on the queue thread.
    pub thread_pool_size: usize,
    /// The export's shape (where setuid files may be made, see [`crate::zones`]).
    pub layout: crate::zones::Layout,
    /// Let the guest set file privileges everywhere.
    pub allow_setid: bool,
}

impl FsConfig {
    /// Checks the options and resolves the shared directory to an absolute path.
    pub fn new(
        shared_dir: &Path,
        cache: CacheMode,
        readonly: bool,
        xattr: bool,
        writeback: bool,
        thread_pool_size: usize,
    ) -> Result<Self, ConfigError> {
        let path = shared_dir.to_path_buf();
        let meta = std::fs::metadata(shared_dir).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ConfigError::SharedDirMissing { path: path.clone() },
            std::io::ErrorKind::PermissionDenied => ConfigError::SharedDirPermission {
                path: path.clone(),
                source,
            },
            _ => ConfigError::SharedDirIo {
                path: path.clone(),
                source,
            },
        })?;
        if !meta.is_dir() {
            return Err(ConfigError::SharedDirNotDir { path });
        }
        // Opening the directory proves search/read permission for this user.
        std::fs::read_dir(shared_dir).map_err(|source| match source.kind() {
            std::io::ErrorKind::PermissionDenied => ConfigError::SharedDirPermission {
                path: path.clone(),
                source,
            },
            _ => ConfigError::SharedDirIo {
                path: path.clone(),
                source,
            },
        })?;
        let shared_dir = std::fs::canonicalize(shared_dir)
            .map_err(|source| ConfigError::SharedDirIo { path, source })?;
        if thread_pool_size > MAX_THREAD_POOL {
            return Err(ConfigError::OutOfRange {
                field: "--thread-pool-size",
                reason: format!("{thread_pool_size} is above the maximum {MAX_THREAD_POOL}"),
            });
        }
        Ok(FsConfig {
            shared_dir,
            cache,
            readonly,
            xattr,
            writeback: writeback && cache != CacheMode::Never,
            thread_pool_size,
            layout: crate::zones::Layout::Plain,
            allow_setid: false,
        })
    }

    /// The fuse-backend-rs passthrough configuration for `root` (the path the daemon will
    /// open as the export root; the shared dir itself, opened before any pivot_root).
    pub fn passthrough_config(&self, root: &Path) -> PassthroughConfig {
        let timeout = self.cache.timeout();
        PassthroughConfig {
            root_dir: root.to_string_lossy().into_owned(),
            cache_policy: self.cache.policy(),
            attr_timeout: timeout,
            entry_timeout: timeout,
            xattr: self.xattr,
            writeback: self.writeback && !self.readonly,
            // We import the root ourselves before entering the sandbox.
            do_import: false,
            // Inode identity includes the mount id so submounts never collide.
            enable_mntid: true,
            // FUSE inode numbers are the host's (tagged with a per-device/mount index):
            // the passthrough then drops an inode's id mapping when the guest forgets it.
            // With its own counter instead it keeps every id it ever handed out ("the
            // same file keeps its number"), one map entry per file the guest ever saw:
            // memory a guest could grow without bound by creating and deleting files.
            use_host_ino: true,
            ..PassthroughConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_dir_is_named() {
        let err = FsConfig::new(
            Path::new("/nonexistent/carapace-fsd"),
            CacheMode::Auto,
            false,
            true,
            false,
            0,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::SharedDirMissing { .. }));
        assert!(err.to_string().contains("/nonexistent/carapace-fsd"));
    }

    #[test]
    fn file_is_not_a_dir() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let err = FsConfig::new(f.path(), CacheMode::Auto, false, true, false, 0).unwrap_err();
        assert!(matches!(err, ConfigError::SharedDirNotDir { .. }));
    }

    #[test]
    fn pool_size_bounded_and_writeback_off_without_cache() {
        let d = tempfile::tempdir().unwrap();
        let err = FsConfig::new(d.path(), CacheMode::Auto, false, true, false, 1000).unwrap_err();
        assert!(matches!(err, ConfigError::OutOfRange { .. }));
        let cfg = FsConfig::new(d.path(), CacheMode::Never, false, true, true, 2).unwrap();
        assert!(!cfg.writeback);
        assert!(cfg.shared_dir.is_absolute());
    }
}
