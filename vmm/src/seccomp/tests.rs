//! Every kind's compiled filter, installed in a forked child: what the kind needs works,
//! what no VMM thread may do kills the child with SIGSYS. The child only makes raw
//! syscalls between `fork` and `_exit` (the filters are compiled before the fork).

use super::lists::{self, KVM_RUN};
use super::*;

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Exited(i32),
    Signaled(i32),
}

/// Forks; the child installs `kind`'s filters of `filters`, runs `body` and exits with its
/// result.
fn in_child(filters: &Filters, kind: ThreadKind, body: impl FnOnce() -> i32) -> Outcome {
    // SAFETY: the child only installs the precompiled filter (prctl, seccomp), makes raw
    // syscalls and leaves with _exit: no allocation, no lock another thread could hold.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = match filters.install(kind) {
            Ok(()) => body(),
            Err(_) => 100,
        };
        // SAFETY: ends the forked child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    if libc::WIFSIGNALED(status) {
        Outcome::Signaled(libc::WTERMSIG(status))
    } else {
        Outcome::Exited(libc::WEXITSTATUS(status))
    }
}

/// `syscall(nr, args)` in the child; 0 when it returned (whatever the result).
fn call(nr: i64, args: [u64; 4]) -> i32 {
    // SAFETY: raw syscalls with scalar or null arguments (or a pointer to a static
    // NUL-terminated string for execve); the kernel validates them.
    unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3]) };
    0
}

fn killed() -> Outcome {
    Outcome::Signaled(libc::SIGSYS)
}

/// Forbidden to every kind: exec, INET sockets, ptrace, new executable memory, mount,
/// namespaces.
#[test]
fn every_kind_dies_on_what_no_vmm_thread_may_do() {
    let f = Filters::compile(SeccompAction::Kill).unwrap();
    static TRUE: &[u8] = b"/bin/true\0";
    let exec = libc::PROT_EXEC as u64;
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    for &kind in ThreadKind::ALL {
        // Allowed to all: getpid, a write to stderr of nothing.
        assert_eq!(
            in_child(&f, kind, || call(libc::SYS_getpid, [0; 4])
                + call(libc::SYS_write, [2, 0, 0, 0])),
            Outcome::Exited(0),
            "{kind:?}: allowed syscalls"
        );
        let forbidden: [(&str, i64, [u64; 4]); 7] = [
            ("execve", libc::SYS_execve, [TRUE.as_ptr() as u64, 0, 0, 0]),
            (
                "socket(AF_INET)",
                libc::SYS_socket,
                [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0],
            ),
            (
                "ptrace",
                libc::SYS_ptrace,
                [libc::PTRACE_TRACEME as u64, 0, 0, 0],
            ),
            ("mmap(PROT_EXEC)", libc::SYS_mmap, [0, 4096, exec, anon]),
            ("mount", libc::SYS_mount, [0; 4]),
            (
                "unshare",
                libc::SYS_unshare,
                [libc::CLONE_NEWUSER as u64, 0, 0, 0],
            ),
            ("openat", libc::SYS_openat, [0, TRUE.as_ptr() as u64, 0, 0]),
        ];
        for (what, nr, args) in forbidden {
            assert_eq!(
                in_child(&f, kind, || call(nr, args)),
                killed(),
                "{kind:?}: {what} must kill"
            );
        }
        assert_eq!(
            in_child(&f, kind, || call(
                libc::SYS_mmap,
                [0, 4096, (libc::PROT_READ | libc::PROT_WRITE) as u64, anon]
            )),
            Outcome::Exited(0),
            "{kind:?}: plain mmap"
        );
    }
}

#[test]
fn signals_only_to_the_own_process() {
    // Compiled here: the forked child may signal this process (signal 0: a check only),
    // nothing else.
    let f = Filters::compile(SeccompAction::Kill).unwrap();
    let me = u64::from(std::process::id());
    for &kind in ThreadKind::ALL {
        let own = || call(libc::SYS_tgkill, [me, me, 0, 0]);
        assert_eq!(in_child(&f, kind, own), Outcome::Exited(0), "{kind:?}");
        let other = || call(libc::SYS_tgkill, [1, 1, 0, 0]);
        assert_eq!(in_child(&f, kind, other), killed(), "{kind:?}");
        let kill = || call(libc::SYS_kill, [1, 0, 0, 0]);
        assert_eq!(in_child(&f, kind, kill), killed(), "{kind:?}");
    }
}

#[test]
fn ioctls_are_allowed_by_number() {
    let f = Filters::compile(SeccompAction::Kill).unwrap();
    // On descriptor -1: the call fails with EBADF if the filter lets it through.
    let ioctl = |req: u64| move || call(libc::SYS_ioctl, [u64::MAX, req, 0, 0]);
    assert_eq!(
        in_child(&f, ThreadKind::Vcpu, ioctl(KVM_RUN() as u64)),
        Outcome::Exited(0)
    );
    assert_eq!(
        in_child(&f, ThreadKind::Vcpu, ioctl(libc::TUNSETOFFLOAD)),
        Outcome::Exited(0)
    );
    // KVM_CREATE_VCPU, KVM_SET_USER_MEMORY_REGION, TUNSETIFF: never at run time.
    for req in [0xae41_u64, 0x4020_ae46, libc::TUNSETIFF, libc::TIOCSTI] {
        assert_eq!(
            in_child(&f, ThreadKind::Vcpu, ioctl(req)),
            killed(),
            "{req:#x}"
        );
    }
    // Only vCPUs run guest code.
    for &kind in &[
        ThreadKind::Api,
        ThreadKind::Main,
        ThreadKind::Vsock,
        ThreadKind::Spawner,
    ] {
        assert_eq!(
            in_child(&f, kind, ioctl(KVM_RUN() as u64)),
            killed(),
            "{kind:?}"
        );
    }
}

#[test]
fn each_kind_keeps_to_its_own_syscalls() {
    let f = Filters::compile(SeccompAction::Kill).unwrap();
    let unix = || {
        call(
            libc::SYS_socket,
            [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0],
        )
    };
    assert_eq!(in_child(&f, ThreadKind::Vsock, unix), Outcome::Exited(0));
    assert_eq!(in_child(&f, ThreadKind::Vcpu, unix), killed());
    let pread = || call(libc::SYS_pread64, [u64::MAX, 0, 0, 0]);
    assert_eq!(in_child(&f, ThreadKind::Block, pread), Outcome::Exited(0));
    assert_eq!(in_child(&f, ThreadKind::Net, pread), killed());
    let punch = || call(libc::SYS_fallocate, [u64::MAX, 0, 0, 0]);
    assert_eq!(in_child(&f, ThreadKind::Mem, punch), Outcome::Exited(0));
    assert_eq!(in_child(&f, ThreadKind::Rng, punch), killed());
    let unlink = || call(libc::SYS_unlink, [0; 4]);
    assert_eq!(in_child(&f, ThreadKind::Main, unlink), Outcome::Exited(0));
    assert_eq!(in_child(&f, ThreadKind::Api, unlink), killed());
}

#[test]
fn thread_creators_make_threads_but_not_processes_or_namespaces() {
    let f = Filters::compile(SeccompAction::Kill).unwrap();
    for &kind in &[ThreadKind::Api, ThreadKind::Spawner] {
        // clone3 is answered ENOSYS (glibc then uses clone, whose flags seccomp sees).
        let clone3 = || {
            // SAFETY: clone3 with a null argument fails before creating anything.
            let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            let e = std::io::Error::last_os_error().raw_os_error();
            if r == -1 && e == Some(libc::ENOSYS) {
                0
            } else {
                1
            }
        };
        assert_eq!(in_child(&f, kind, clone3), Outcome::Exited(0), "{kind:?}");
        // fork-like clone (no CLONE_THREAD): killed before it creates anything.
        let fork = || call(libc::SYS_clone, [libc::SIGCHLD as u64, 0, 0, 0]);
        assert_eq!(in_child(&f, kind, fork), killed(), "{kind:?}");
        // A thread clone with a new user namespace: killed. (Invalid stack, so that if it
        // were allowed the kernel would still refuse it: EINVAL, exit 0, test fails.)
        let flags = (libc::CLONE_THREAD | libc::CLONE_SIGHAND | libc::CLONE_VM) as u64;
        let ns = || {
            call(
                libc::SYS_clone,
                [flags | libc::CLONE_NEWUSER as u64, 0, 0, 0],
            )
        };
        assert_eq!(in_child(&f, kind, ns), killed(), "{kind:?}");
    }
    let fork = || call(libc::SYS_clone, [libc::SIGCHLD as u64, 0, 0, 0]);
    assert_eq!(in_child(&f, ThreadKind::Vcpu, fork), killed());
}

#[test]
fn trap_reports_the_syscall_and_exits_159() {
    let f = Filters::compile(SeccompAction::Trap).unwrap();
    trap::install_handler().unwrap();
    let out = in_child(&f, ThreadKind::Rng, || call(libc::SYS_ptrace, [0; 4]));
    assert_eq!(out, Outcome::Exited(TRAP_EXIT));
}

#[test]
fn log_allows_and_only_logs() {
    let f = Filters::compile(SeccompAction::Log).unwrap();
    let out = in_child(&f, ThreadKind::Rng, || {
        call(libc::SYS_ptrace, [u64::MAX, 0, 0, 0])
    });
    assert_eq!(out, Outcome::Exited(0));
}

#[test]
fn the_spawner_allows_all_its_workers_need() {
    let spawner = lists::list(ThreadKind::Spawner, 1).unwrap().rules;
    for &w in ThreadKind::WORKERS {
        for (nr, rules) in lists::list(w, 1).unwrap().rules {
            let s = spawner
                .get(&nr)
                .unwrap_or_else(|| panic!("{w:?}: syscall {nr}"));
            assert!(
                s.is_empty() || rules.iter().all(|r| s.contains(r)),
                "{w:?}: syscall {nr}"
            );
        }
    }
}

#[test]
fn ioctl_numbers_match_the_kernel() {
    assert_eq!(KVM_RUN(), 0xae80);
    assert_eq!(
        vhost::vhost_kern::vhost_binding::VHOST_SET_MEM_TABLE(),
        0x4008_af03
    );
}
