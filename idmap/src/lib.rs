//! Per-sandbox id mappings (the jail's scheme for the fs daemon): user namespaces that map
//! one block of host ids, idmapped mounts, and overlayfs built from idmapped layers.
//! See the runtime's README, "The VMM jail".

pub mod mount_setattr;
pub mod overlay;
mod userns;

pub use overlay::{Overlay, clone_idmapped, mount_idmapped};
pub use userns::{ID_LIMIT, IdMap, enter, new_userns};

use std::path::PathBuf;

/// Errors of id-mapping operations.
#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    /// A block of ids that cannot be mapped.
    #[error(
        "id block {map} is not usable: it must be non-empty, not start at 0 and end at or below 2^31"
    )]
    BadMap {
        /// The block.
        map: IdMap,
    },
    /// A `BASE:COUNT` text that does not parse.
    #[error("'{text}' is not an id block BASE:COUNT (two decimal numbers)")]
    Parse {
        /// The text.
        text: String,
    },
    /// A system call failed.
    #[error("{step} failed")]
    Sys {
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// Writing a uid or gid map failed.
    #[error("cannot write the id map {map} to {path}")]
    WriteMap {
        /// The map file.
        path: String,
        /// The block.
        map: IdMap,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Opening a namespace file failed.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Cloning a directory as a mount failed.
    #[error("cannot clone {path} as a mount (open_tree)")]
    Clone {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Giving a clone its id mapping failed.
    #[error(
        "cannot give the mount of {path} an id mapping (its file system may not support idmapped mounts: tmpfs needs Linux 6.3, network and 9p file systems have none)"
    )]
    Idmap {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An overlay option this crate cannot rebuild the overlay from.
    #[error("overlay option '{option}': {reason}")]
    OverlayOption {
        /// The option.
        option: String,
        /// Why.
        reason: &'static str,
    },
    /// Attaching or creating a staging mount point failed.
    #[error("cannot stage a layer at {path}")]
    Staging {
        /// The mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Creating the overlay failed.
    #[error("cannot create the overlay from idmapped layers: {step}")]
    Overlay {
        /// The step.
        step: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
