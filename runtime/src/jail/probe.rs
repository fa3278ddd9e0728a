//! Can this host jail a VMM? A forked child does what the VMM's jail needs of the kernel
//! and of our privileges — new mount, IPC, UTS, network and PID namespaces (the PID
//! namespace as its launcher makes it: for the child's children), no supplementary
//! groups, an unprivileged gid and uid, no_new_privs — and reports the first step that
//! fails. The child makes raw system calls only (it is forked from a possibly
//! multi-threaded process), then exits; nothing of it outlives the probe.

use std::io::Read;
use std::os::fd::AsRawFd;

/// The steps, in order, as the child reports them.
const STEPS: [&str; 5] = [
    "unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET | CLONE_NEWPID)",
    "setgroups([])",
    "setresgid",
    "setresuid",
    "prctl(PR_SET_NO_NEW_PRIVS)",
];

/// Why jailing cannot work here.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A step failed in the child.
    #[error("{step} failed")]
    Step {
        /// The step.
        step: &'static str,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// The fs daemon's id mapping cannot be made here.
    #[error("an overlay of idmapped layers cannot be made in {dir}")]
    Idmap {
        /// The scratch directory.
        dir: std::path::PathBuf,
        /// Cause.
        #[source]
        source: carapace_idmap::IdmapError,
    },
    /// The probe itself could not run.
    #[error("cannot run the jail probe: {what}")]
    Probe {
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the steps in a child as id `uid` (also the gid).
pub fn probe(uid: u32) -> Result<(), ProbeError> {
    let probe_err = |what| {
        move |e: nix::Error| ProbeError::Probe {
            what,
            source: std::io::Error::from(e),
        }
    };
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(probe_err("pipe"))?;
    // SAFETY: the child only makes raw system calls (unshare, setgroups, setresgid,
    // setresuid, prctl, write) and `_exit`, all async-signal-safe, on values prepared
    // before the fork; it allocates nothing and takes no lock, so a fork of a
    // multi-threaded parent is sound.
    let fork = unsafe { nix::unistd::fork() }.map_err(probe_err("fork"))?;
    match fork {
        nix::unistd::ForkResult::Child => {
            let fd = write.as_raw_fd();
            // SAFETY: see above; `child` never returns.
            unsafe { child(fd, uid) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(write);
            let mut report = Vec::new();
            let read_result = std::fs::File::from(read).read_to_end(&mut report);
            let status = nix::sys::wait::waitpid(child, None).map_err(probe_err("waitpid"))?;
            read_result.map_err(|source| ProbeError::Probe {
                what: "reading the child's report",
                source,
            })?;
            if let [step, e0, e1, e2, e3] = report[..] {
                let step = STEPS.get(usize::from(step)).copied().unwrap_or("a step");
                let errno = i32::from_le_bytes([e0, e1, e2, e3]);
                return Err(ProbeError::Step {
                    step,
                    source: std::io::Error::from_raw_os_error(errno),
                });
            }
            match status {
                nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
                other => Err(ProbeError::Probe {
                    what: "the child ended without a report",
                    source: std::io::Error::other(format!("{other:?}")),
                }),
            }
        }
    }
}

/// The child: each step, reporting `[step, errno (4 bytes LE)]` on `fd` at the first
/// failure; exits 0 when all passed.
///
/// # Safety
/// Only in the child of a fork: it exits the process.
unsafe fn child(fd: i32, uid: u32) -> ! {
    let id = uid as libc::c_long;
    let flags = (libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWPID) as libc::c_long;
    let steps: [(libc::c_long, [libc::c_long; 5]); 5] = [
        (libc::SYS_unshare, [flags, 0, 0, 0, 0]),
        (libc::SYS_setgroups, [0, 0, 0, 0, 0]),
        (libc::SYS_setresgid, [id, id, id, 0, 0]),
        (libc::SYS_setresuid, [id, id, id, 0, 0]),
        (
            libc::SYS_prctl,
            [libc::PR_SET_NO_NEW_PRIVS as libc::c_long, 1, 0, 0, 0],
        ),
    ];
    for (i, (nr, a)) in steps.iter().enumerate() {
        // SAFETY: raw system calls with integer arguments only (setgroups with size 0
        // reads no list).
        let r = unsafe { libc::syscall(*nr, a[0], a[1], a[2], a[3], a[4]) };
        if r != 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            let e = errno.to_le_bytes();
            let msg = [i as u8, e[0], e[1], e[2], e[3]];
            // SAFETY: writing a stack buffer to our pipe.
            unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
            // SAFETY: leaving at once, without the parent's exit handlers.
            unsafe { libc::_exit(1) }
        }
    }
    // SAFETY: leaving the child without running any of the parent's exit handlers.
    unsafe { libc::_exit(0) }
}

/// Can this host jail the fs daemon? In a scratch directory under `state_dir` (removed
/// again), makes a one-layer overlay with an upper layer from idmapped layers with the
/// first block of `[jail]`, the way a rootfs is mounted for a jailed daemon, and checks
/// that a file of id 1000 shows as the block's id 1000.
pub fn fs_probe(
    state_dir: &std::path::Path,
    jail: &carapace_config::Jail,
) -> Result<(), ProbeError> {
    let io = |what: &'static str| move |source: std::io::Error| ProbeError::Probe { what, source };
    let (base, count) = jail
        .fs_block(jail.uid_base)
        .ok_or_else(|| ProbeError::Probe {
            what: "the first fs block of [jail]",
            source: std::io::Error::from_raw_os_error(libc::ERANGE),
        })?;
    let map = carapace_idmap::IdMap {
        host_base: base,
        count,
    };
    std::fs::create_dir_all(state_dir).map_err(io("creating runtime.state_dir"))?;
    let dir = state_dir.join(format!(".fs-jail-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(io("creating the probe directory"))?;
    let result = (|| {
        for d in ["lower", "upper", "upper/fs", "upper/work", "staging"] {
            std::fs::create_dir(dir.join(d)).map_err(io("creating the probe's layers"))?;
        }
        let file = dir.join("lower/f");
        std::fs::write(&file, b"probe").map_err(io("writing the probe's file"))?;
        std::os::unix::fs::chown(&file, Some(1000), Some(1000))
            .map_err(io("chown of the probe's file"))?;
        let idmap_err = |source| ProbeError::Idmap {
            dir: dir.clone(),
            source,
        };
        let overlay = carapace_idmap::Overlay {
            lower: vec![dir.join("lower")],
            upper: Some(dir.join("upper/fs")),
            work: Some(dir.join("upper/work")),
            other: Vec::new(),
        };
        let ns = carapace_idmap::new_userns(map).map_err(idmap_err)?;
        let tree = carapace_idmap::mount_idmapped(
            &overlay,
            map,
            std::os::fd::AsFd::as_fd(&ns),
            &dir.join("staging"),
        )
        .map_err(idmap_err)?;
        let st = rustix::fs::statat(&tree, "f", rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io("stat through the overlay")(e.into()))?;
        if st.st_uid != base + 1000 {
            return Err(ProbeError::Probe {
                what: "the overlay shows id 1000 as another id than the block's",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_can_jail_and_others_are_told_which_step_fails() {
        let root = nix::unistd::Uid::effective().is_root();
        match probe(0x7000_0000) {
            Ok(()) => assert!(root, "only root can change its uid"),
            Err(ProbeError::Step { step, source }) => {
                // Without privileges the first step already fails (EPERM); as root a
                // kernel without one of the namespaces fails there too (EINVAL).
                assert_eq!(step, STEPS[0], "{source}");
                if !root {
                    assert_eq!(source.raw_os_error(), Some(libc::EPERM), "{source}");
                }
            }
            Err(e) => panic!("the probe did not run: {e}"),
        }
    }
}
