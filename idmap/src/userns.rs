//! User namespaces that map one block of host ids, and entering one.
//!
//! A namespace made by [`new_userns`] maps its ids `0 .. count` to the host ids
//! `host_base .. host_base + count` (uids and gids alike) and nothing else. It serves two
//! purposes with the same mapping: as the id mapping of idmapped mounts (a file whose id is
//! `k` on disk shows as `host_base + k` through the mount), and as the namespace a process
//! joins with [`enter`] to act as its root, i.e. as host uid `host_base`, with
//! capabilities that reach only files whose ids (as the mount shows them) are in the block.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;

use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork, pipe2, setgroups, setresgid, setresuid};
use rustix::io::{read, write};

use crate::IdmapError;

/// The largest id a mapping may reach (exclusive): ids from 2^31 on are unsafe with
/// tools that treat them as signed, and `(uid_t)-1` is reserved.
pub const ID_LIMIT: u64 = 1 << 31;

/// Ids `0 .. count` of a namespace mapped to host ids `host_base .. host_base + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// The host id that namespace id 0 maps to.
    pub host_base: u32,
    /// How many ids are mapped.
    pub count: u32,
}

impl IdMap {
    /// Checks the block: not empty, not starting at host root, below [`ID_LIMIT`].
    pub fn validate(&self) -> Result<(), IdmapError> {
        let end = u64::from(self.host_base) + u64::from(self.count);
        if self.count == 0 || self.host_base == 0 || end > ID_LIMIT {
            return Err(IdmapError::BadMap { map: *self });
        }
        Ok(())
    }

    /// The `uid_map`/`gid_map` line.
    pub fn line(&self) -> String {
        format!("0 {} {}\n", self.host_base, self.count)
    }

    /// The host id that namespace id `id` maps to, if it is mapped.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        (id < self.count).then(|| self.host_base + id)
    }

    /// Parses `BASE:COUNT` (decimal), the form command lines use.
    pub fn parse(s: &str) -> Result<Self, IdmapError> {
        let bad = || IdmapError::Parse { text: s.to_owned() };
        let (base, count) = s.split_once(':').ok_or_else(bad)?;
        let map = IdMap {
            host_base: base.trim().parse().map_err(|_| bad())?,
            count: count.trim().parse().map_err(|_| bad())?,
        };
        map.validate()?;
        Ok(map)
    }
}

impl std::fmt::Display for IdMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host_base, self.count)
    }
}

/// Makes a user namespace with `map` for uids and gids and returns a descriptor of it (it
/// lives as long as the descriptor or anything made with it, such as an idmapped mount).
/// Needs CAP_SETUID and CAP_SETGID (root). A short-lived child process creates the
/// namespace; the caller writes its maps.
pub fn new_userns(map: IdMap) -> Result<OwnedFd, IdmapError> {
    map.validate()?;
    let sys = |step: &'static str| move |source: nix::Error| IdmapError::Sys { step, source };
    // The child says it has unshared (one byte: 1 done, 0 failed, then the errno) on
    // `ready`, and waits on `done` until the parent has written the maps and opened the
    // namespace; the parent then writes a byte to `done`.
    let (ready_r, ready_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let (done_r, done_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    // SAFETY: the child runs only async-signal-safe system calls on descriptors it already
    // holds (unshare, write, read) and leaves with `_exit`, allocating nothing and touching
    // no lock, so forking a multi-threaded caller is sound.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            drop(ready_r);
            drop(done_w);
            let msg = match unshare(CloneFlags::CLONE_NEWUSER) {
                Ok(()) => [1u8, 0, 0, 0, 0],
                Err(e) => {
                    let b = (e as i32).to_ne_bytes();
                    [0, b[0], b[1], b[2], b[3]]
                }
            };
            let _ = write(&ready_w, &msg);
            let mut byte = [0u8; 1];
            let _ = read(&done_r, &mut byte);
            // SAFETY: `_exit` ends the child without running the parent's atexit handlers
            // or destructors, which must not run twice.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(done_r);
            let result = finish_userns(child, map, &ready_r);
            // An explicit byte, not end-of-file: a child forked meanwhile by another thread
            // of ours holds copies of these descriptors, so the pipe may never close.
            if write(&done_w, &[1]).is_err() {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            }
            drop(done_w);
            let _ = waitpid(child, None);
            result
        }
    }
}

fn finish_userns(child: Pid, map: IdMap, ready: &OwnedFd) -> Result<OwnedFd, IdmapError> {
    // The child answers at once; a bound in case it died first (the pipe need not close,
    // see the caller).
    let mut fds = [rustix::event::PollFd::new(
        ready,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 10,
        tv_nsec: 0,
    };
    let ready_n = rustix::event::poll(&mut fds, Some(&timeout)).map_err(|e| IdmapError::Sys {
        step: "wait for the namespace child",
        source: nix::Error::from_raw(e.raw_os_error()),
    })?;
    if ready_n == 0 {
        return Err(IdmapError::Sys {
            step: "wait for the namespace child",
            source: nix::Error::ETIMEDOUT,
        });
    }
    let mut msg = [0u8; 5];
    let n = read(ready, &mut msg).map_err(|e| IdmapError::Sys {
        step: "read from the namespace child",
        source: nix::Error::from_raw(e.raw_os_error()),
    })?;
    if n != msg.len() || msg[0] != 1 {
        let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
        return Err(IdmapError::Sys {
            step: "unshare(CLONE_NEWUSER)",
            source: nix::Error::from_raw(if n == msg.len() { errno } else { libc::EIO }),
        });
    }
    let proc = format!("/proc/{child}");
    for file in ["uid_map", "gid_map"] {
        let path = format!("{proc}/{file}");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(map.line().as_bytes()))
            .map_err(|source| IdmapError::WriteMap { path, map, source })?;
    }
    let path = format!("{proc}/ns/user");
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map(OwnedFd::from)
        .map_err(|source| IdmapError::Open { path, source })
}

/// Joins the user namespace `userns` (made by [`new_userns`]) as its root: no
/// supplementary groups, uid and gid 0 of the namespace (host id `host_base`), with every
/// capability in that namespace and none in the host's. The caller must be
/// single-threaded (the kernel refuses otherwise) and hold CAP_SYS_ADMIN; its mount
/// namespace stays the one it was in, owned by the host's user namespace, so what it
/// mounted before it can no longer change.
pub fn enter(userns: &OwnedFd) -> Result<(), IdmapError> {
    let sys = |step: &'static str| move |source: nix::Error| IdmapError::Sys { step, source };
    setns(userns, CloneFlags::CLONE_NEWUSER).map_err(sys("setns(CLONE_NEWUSER)"))?;
    setgroups(&[]).map_err(sys("setgroups"))?;
    let root_g = Gid::from_raw(0);
    setresgid(root_g, root_g, root_g).map_err(sys("setresgid"))?;
    let root_u = Uid::from_raw(0);
    setresuid(root_u, root_u, root_u).map_err(sys("setresuid"))?;
    Ok(())
}
