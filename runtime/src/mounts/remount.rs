//! A rootfs overlay mounted anew from idmapped layers, for the jailed fs daemon: found in
//! mountinfo, rebuilt with a work directory of its own beside the upper layer (recorded by
//! the caller and removed at teardown with [`remove_scratch`]).

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::{MountError, unescape};

/// Mounts the overlay whose root is `source` (its options as mountinfo shows them)
/// anew from its layers, each idmapped by `userns`, and returns it detached. The
/// layer clones are staged in a directory of the sandbox's own, beside `stage` (never
/// under anything the guest can write), which is removed again.
pub(super) fn remount_overlay(
    source: &Path,
    stage: &Path,
    super_options: &str,
    map: carapace_idmap::IdMap,
    userns: std::os::fd::BorrowedFd<'_>,
) -> Result<(OwnedFd, PathBuf), MountError> {
    let idmap_err = |e| MountError::Idmap {
        source_path: source.to_path_buf(),
        source: e,
    };
    let mut overlay =
        carapace_idmap::Overlay::from_mountinfo_options(super_options).map_err(idmap_err)?;
    if overlay.has_relative_lower() {
        // containerd's shim shortens a long lowerdir option to paths relative to the
        // layers' common directory, `<root>/snapshots/`, which also holds the upper
        // layer's snapshot (`<root>/snapshots/<n>/fs`).
        let base = overlay
            .upper
            .as_deref()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        match base {
            Some(base) => overlay.resolve_relative_lower(&base),
            None => {
                return Err(idmap_err(carapace_idmap::IdmapError::OverlayOption {
                    option: "lowerdir".to_owned(),
                    reason: "relative lower layers without an upper layer to find them by",
                }));
            }
        }
        if let Some(missing) = overlay.lower.iter().find(|p| !p.is_dir()) {
            return Err(idmap_err(carapace_idmap::IdmapError::OverlayOption {
                option: format!("lowerdir={}", missing.display()),
                reason: "a relative lower layer is not beside the upper layer's snapshot",
            }));
        }
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A work directory of our own beside the upper layer (overlayfs needs it on the
    // upper layer's mount): the caller's mount keeps its own, which a second overlay
    // must not share (a volatile overlay's refuses it outright).
    let Some(upper_dir) = overlay.upper.as_deref().and_then(Path::parent) else {
        return Err(idmap_err(carapace_idmap::IdmapError::OverlayOption {
            option: "upperdir".to_owned(),
            reason: "a container rootfs overlay needs an upper layer",
        }));
    };
    let work = upper_dir.join(format!("{WORK_PREFIX}{}-{n}", std::process::id()));
    private_dir(&work)?;
    overlay.work = Some(work.clone());
    let parent = stage.parent().unwrap_or(stage);
    let staging = parent.join(format!("idmap-{}-{n}", std::process::id()));
    if let Err(e) = private_dir(&staging) {
        let _ = std::fs::remove_dir(&work);
        return Err(e);
    }
    let made = carapace_idmap::mount_idmapped(&overlay, map, userns, &staging);
    let _ = std::fs::remove_dir(&staging);
    match made {
        Ok(tree) => {
            tracing::debug!(
                source = %source.display(),
                layers = overlay.lower.len(),
                "overlay mounted anew from idmapped layers"
            );
            Ok((tree, work))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            tracing::warn!(
                source = %source.display(),
                mountinfo = super_options,
                ?overlay,
                "the overlay could not be mounted anew from idmapped layers"
            );
            Err(idmap_err(e))
        }
    }
}

/// Creates the directory `path`, mode 0700 (root's alone); it must not exist.
fn private_dir(path: &Path) -> Result<(), MountError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|source| MountError::MountPoint {
            path: path.to_path_buf(),
            source,
        })
}

/// The name prefix of the work directories the runtime makes beside an upper layer.
pub const WORK_PREFIX: &str = "carapace-work-";

/// Removes a scratch directory [`Mounter::bind`] made (after its mount is undone); one
/// that is already gone is not an error. Only a directory named with [`WORK_PREFIX`] is
/// touched, whatever a damaged state file says.
pub fn remove_scratch(dir: &Path) -> Result<(), MountError> {
    if !dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(WORK_PREFIX))
    {
        return Err(MountError::BadTarget {
            path: dir.to_path_buf(),
        });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MountError::MountPoint {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// The super options of the overlay mounted at `source` (the topmost mount there), from
/// `/proc/self/mountinfo`; None when `source` is not an overlay's mount point.
pub(super) fn overlay_at(source: &Path) -> Option<String> {
    let source = std::fs::canonicalize(source).ok()?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    overlay_in_mountinfo(&text, &source)
}

/// [`overlay_at`] on a given mountinfo text.
fn overlay_in_mountinfo(mountinfo: &str, source: &Path) -> Option<String> {
    let mut found = None;
    for line in mountinfo.lines() {
        let mut halves = line.splitn(2, " - ");
        let (Some(first), Some(second)) = (halves.next(), halves.next()) else {
            continue;
        };
        let Some(point) = first.split(' ').nth(4) else {
            continue;
        };
        let mut rest = second.split(' ');
        let (Some(fstype), Some(_src), Some(super_options)) =
            (rest.next(), rest.next(), rest.next())
        else {
            continue;
        };
        if Path::new(&unescape(point)) == source {
            // A later line is a mount on top of an earlier one.
            found = (fstype == "overlay").then(|| super_options.to_owned());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_are_found_in_mountinfo() {
        let text = "\
36 25 0:31 / /b/rootfs rw,relatime shared:1 - overlay overlay rw,lowerdir=/l1:/l0,upperdir=/u/fs,workdir=/u/work
37 25 0:32 / /b/other rw - tmpfs tmpfs rw
38 36 0:33 / /b/rootfs rw - tmpfs tmpfs rw
39 25 0:34 / /b/with\\040space rw - overlay overlay rw,lowerdir=/x
";
        assert_eq!(
            overlay_in_mountinfo(text, Path::new("/b/with space")).as_deref(),
            Some("rw,lowerdir=/x")
        );
        // Covered by a later mount: not an overlay any more.
        assert_eq!(overlay_in_mountinfo(text, Path::new("/b/rootfs")), None);
        assert_eq!(overlay_in_mountinfo(text, Path::new("/b/other")), None);
        let first_only = text.lines().next().unwrap();
        assert_eq!(
            overlay_in_mountinfo(first_only, Path::new("/b/rootfs")).as_deref(),
            Some("rw,lowerdir=/l1:/l0,upperdir=/u/fs,workdir=/u/work")
        );
    }

    /// Teardown removes only what the remount made: a directory named with the prefix
    /// (gone already is fine), never another path a corrupted record names.
    #[test]
    fn only_work_directories_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let other = tmp.path().join("fs");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("keep"), b"x").unwrap();
        let err = remove_scratch(&other).unwrap_err();
        assert!(matches!(err, MountError::BadTarget { .. }), "{err}");
        assert!(other.join("keep").exists());
        let err = remove_scratch(Path::new("/")).unwrap_err();
        assert!(matches!(err, MountError::BadTarget { .. }), "{err}");
        let work = tmp.path().join(format!("{WORK_PREFIX}1-0"));
        std::fs::create_dir_all(work.join("work/index")).unwrap();
        std::os::unix::fs::symlink(&other, work.join("work/link")).unwrap();
        remove_scratch(&work).unwrap();
        assert!(!work.exists());
        assert!(other.join("keep").exists(), "a link inside is not followed");
        remove_scratch(&work).unwrap();
    }
}
