//! Handing descriptors to a helper at fixed numbers (3, 4, ...): the VMM gets each tap of
//! its VM this way, and the VM description names them by number.
//!
//! In the parent every descriptor is first duplicated above [`FLOOR`] (close-on-exec), so
//! that in the child `dup2(high, 3 + i)` can never overwrite a source it still needs;
//! `dup2` leaves the new descriptor inheritable. Everything from `3 + count` on is then
//! marked close-on-exec by the caller.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use crate::process::MAX_PASSED_FDS;

/// Duplicates live at or above this number, far from the targets 3..3+MAX_PASSED_FDS.
pub(crate) const FLOOR: RawFd = 256;

/// The high duplicates of the descriptors to pass, kept open until the child has exec'd.
#[derive(Debug)]
pub(crate) struct Passed {
    dups: Vec<OwnedFd>,
}

impl Passed {
    /// Duplicates `fds` above [`FLOOR`]; refuses more than [`MAX_PASSED_FDS`].
    pub(crate) fn new(fds: &[BorrowedFd<'_>]) -> std::io::Result<Self> {
        if fds.len() > MAX_PASSED_FDS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} descriptors to pass, at most {MAX_PASSED_FDS}",
                    fds.len()
                ),
            ));
        }
        let dups = fds
            .iter()
            .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, FLOOR).map_err(std::io::Error::from))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { dups })
    }

    /// The raw numbers (a fixed array the child's hook can copy without allocating) and
    /// how many are used.
    pub(crate) fn raw(&self) -> ([RawFd; MAX_PASSED_FDS], usize) {
        let mut raw = [-1; MAX_PASSED_FDS];
        for (slot, fd) in raw.iter_mut().zip(&self.dups) {
            *slot = fd.as_raw_fd();
        }
        (raw, self.dups.len())
    }
}

/// In the forked child: `dup2(passed[i], 3 + i)` for each. Async-signal-safe.
pub(crate) fn install(passed: &[RawFd]) -> std::io::Result<()> {
    for (i, &fd) in passed.iter().enumerate() {
        let target = 3 + i as RawFd;
        // SAFETY: dup2 takes two integers; `fd` is open in this (forked) process because the
        // parent's `Passed` holds it across the fork, and `target` is below FLOOR, so no
        // later source is overwritten. dup2 is async-signal-safe.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_child_sees_the_passed_descriptors_at_3_and_up_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "first").unwrap();
        std::fs::write(&b, "second").unwrap();
        let fa = std::fs::File::open(&a).unwrap();
        let fb = std::fs::File::open(&b).unwrap();
        // an inheritable descriptor that must not reach the child
        let stray: OwnedFd = std::fs::File::open(&a).unwrap().into();
        rustix::io::fcntl_setfd(&stray, rustix::io::FdFlags::empty()).unwrap();
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "cat <&3; echo; cat <&4; echo; ls /proc/self/fd > {}",
            dir.path().join("fds").display()
        ));
        // pass b first: the numbers follow the order given, not the source numbers
        let rec = crate::process::spawn_detached_with_fds(
            "test",
            cmd,
            &log,
            &[std::os::fd::AsFd::as_fd(&fb), std::os::fd::AsFd::as_fd(&fa)],
        )
        .unwrap();
        assert!(rec.wait_gone(std::time::Duration::from_secs(10)));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "second\nfirst\n");
        let mut fds: Vec<i32> = std::fs::read_to_string(dir.path().join("fds"))
            .unwrap()
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        fds.sort_unstable();
        // 0-2, the two passed ones, and ls's own directory descriptor
        assert_eq!(&fds[..5], [0, 1, 2, 3, 4], "{fds:?}");
        assert!(fds.len() <= 6, "stray descriptor inherited: {fds:?}");
        drop(stray);
    }

    #[test]
    fn too_many_descriptors_are_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let many = vec![std::os::fd::AsFd::as_fd(&f); MAX_PASSED_FDS + 1];
        assert!(Passed::new(&many).is_err());
    }
}
