//! The allow-list of each thread kind (x86_64), as seccompiler rules: which syscalls, and
//! for `ioctl`, `mmap`, `mprotect`, `socket`, `prctl`, `clone` and `seccomp` which
//! arguments. Built from reading what each thread does (see the kind's function); the
//! unit tests in `tests.rs` run each list in a child process, and the lab's end-to-end
//! tests run the real VMM under them.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::{SeccompError, ThreadKind};

/// Syscall number → rules (an empty list: allowed whatever the arguments).
pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// A list under construction; unions of lists keep "unconditional" over conditions.
#[derive(Default)]
pub(super) struct List {
    pub(super) rules: Rules,
}

impl List {
    /// Allows each of `nrs` whatever its arguments.
    fn allow(&mut self, nrs: &[i64]) -> &mut Self {
        for &nr in nrs {
            self.rules.insert(nr, Vec::new());
        }
        self
    }

    /// Allows `nr` when all of `conds` hold (added to the syscall's other rules, if any;
    /// no effect on a syscall already allowed whatever its arguments).
    fn allow_if(
        &mut self,
        nr: i64,
        conds: Vec<SeccompCondition>,
    ) -> Result<&mut Self, SeccompError> {
        let rule = SeccompRule::new(conds).map_err(SeccompError::Build)?;
        match self.rules.get_mut(&nr) {
            Some(v) if v.is_empty() => {}
            Some(v) => v.push(rule),
            None => {
                self.rules.insert(nr, vec![rule]);
            }
        }
        Ok(self)
    }

    /// Allows `ioctl` with each of the request numbers `reqs` (on any descriptor).
    fn ioctls(&mut self, reqs: &[u64]) -> Result<&mut Self, SeccompError> {
        for &r in reqs {
            self.allow_if(libc::SYS_ioctl, vec![arg_eq(1, r)?])?;
        }
        Ok(self)
    }

    /// Adds every rule of `other`.
    pub(super) fn union(&mut self, other: &List) {
        for (&nr, rules) in &other.rules {
            if rules.is_empty() {
                self.rules.insert(nr, Vec::new());
            } else {
                match self.rules.get_mut(&nr) {
                    Some(v) if v.is_empty() => {}
                    Some(v) => v.extend(rules.iter().cloned()),
                    None => {
                        self.rules.insert(nr, rules.clone());
                    }
                }
            }
        }
    }
}

/// Argument `idx` (its low 32 bits, as the kernel reads an `int`/`unsigned int`) equals `v`.
fn arg_eq(idx: u8, v: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(idx, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
        .map_err(SeccompError::Build)
}

/// Argument `idx`'s bits in `mask` equal `v`.
fn arg_masked(idx: u8, mask: u64, v: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(
        idx,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        v,
    )
    .map_err(SeccompError::Build)
}

// ioctl request numbers, from the kernel's uapi headers (also checked against the
// crates' own definitions in the tests).
vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_MP_STATE,
    kvm_bindings::KVMIO,
    0x98,
    kvm_bindings::kvm_mp_state
);

/// ioctls a vCPU thread makes: KVM_RUN, reading its own registers and MP state when the
/// guest triple-faults (the log line says where), and what device activation and reset do
/// on the vCPU that wrote DRIVER_OK or 0 to a device's status (vhost-net's setup and
/// teardown, the tap's offloads). FIONBIO: `set_nonblocking` on sockets.
fn vcpu_ioctls() -> Vec<u64> {
    use vhost::vhost_kern::vhost_binding as vb;
    let mut v = vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MP_STATE(),
    ];
    v.extend(vhost_net_ioctls());
    v.extend([vb::VHOST_GET_FEATURES(), libc::TUNSETOFFLOAD, libc::FIONBIO]);
    v
}

/// What `net::vhost` sends to `/dev/vhost-net` at activation and reset (SET_OWNER at the
/// first activation, inside the jail: it creates the kernel's vhost worker).
fn vhost_net_ioctls() -> Vec<u64> {
    use vhost::vhost_kern::vhost_binding as vb;
    vec![
        vb::VHOST_SET_OWNER(),
        vb::VHOST_SET_FEATURES(),
        vb::VHOST_SET_MEM_TABLE(),
        vb::VHOST_SET_VRING_NUM(),
        vb::VHOST_SET_VRING_ADDR(),
        vb::VHOST_SET_VRING_BASE(),
        vb::VHOST_GET_VRING_BASE(),
        vb::VHOST_SET_VRING_KICK(),
        vb::VHOST_SET_VRING_CALL(),
        vb::VHOST_NET_SET_BACKEND(),
    ]
}

/// What every thread does: memory (no new executable mappings), locks, time, its own
/// logging (`write` to stderr), thread exit, a panic's abort, `getrandom` for hash maps.
/// `sched_getaffinity` and `fcntl`: seen from every worker kind and the main thread in
/// the lab's `vmm_boot` run with the `log` action (glibc's and std's own use).
/// `tgkill` only within the process `pid` (kicks, `raise`): never another process.
fn base(pid: u32) -> Result<List, SeccompError> {
    let mut l = List::default();
    l.allow(&[
        libc::SYS_sched_getaffinity,
        libc::SYS_fcntl,
        libc::SYS_futex,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_close,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_sched_yield,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    l.allow_if(libc::SYS_tgkill, vec![arg_eq(0, u64::from(pid))?])?;
    let exec = libc::PROT_EXEC as u64;
    l.allow_if(libc::SYS_mmap, vec![arg_masked(2, exec, 0)?])?;
    l.allow_if(libc::SYS_mprotect, vec![arg_masked(2, exec, 0)?])?;
    Ok(l)
}

/// Creating threads (no new namespaces through `clone`; `clone3`, whose flags seccomp
/// cannot see, is answered ENOSYS by a second filter so glibc falls back to `clone`) and
/// what a new thread does before its own filter: glibc's start (robust list, rseq), Rust's
/// (thread name), and installing that filter (no_new_privs, seccomp).
fn threads(l: &mut List, install_filters: bool) -> Result<(), SeccompError> {
    let ns = (libc::CLONE_NEWNS
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET) as u64;
    let thread = libc::CLONE_THREAD as u64;
    l.allow_if(libc::SYS_clone, vec![arg_masked(0, ns | thread, thread)?])?;
    l.allow(&[libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq]);
    l.allow_if(libc::SYS_prctl, vec![arg_eq(0, libc::PR_SET_NAME as u64)?])?;
    if install_filters {
        l.allow_if(
            libc::SYS_prctl,
            vec![arg_eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)?],
        )?;
        l.allow_if(
            libc::SYS_seccomp,
            vec![arg_eq(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))?],
        )?;
    }
    Ok(())
}

/// Epoll and eventfds: every device worker's event loop (`virtio::event`).
fn event_loop(l: &mut List) {
    l.allow(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_epoll_ctl,
        libc::SYS_read,
    ]);
}

/// Unix-domain sockets only.
fn unix_sockets(l: &mut List) -> Result<(), SeccompError> {
    l.allow_if(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?])?;
    Ok(())
}

/// The allow-list of `kind` for the process `pid`.
pub(super) fn list(kind: ThreadKind, pid: u32) -> Result<List, SeccompError> {
    let mut l = base(pid)?;
    match kind {
        // Waits for the VM to stop, kicks and joins the vCPUs, drains the console, removes
        // the API and vsock sockets, drops the devices (stops their workers, unmaps guest
        // memory, closes descriptors) and exits.
        ThreadKind::Main => {
            l.allow(&[libc::SYS_unlink, libc::SYS_unlinkat]);
        }
        // KVM_RUN and the port and MMIO exits. A guest's status writes activate and reset
        // devices here: descriptors and epoll sets for the new worker (the thread itself
        // comes from the spawner), vhost-net ioctls, vhost-user messages with descriptors
        // to the fs backend (and its replies), tap offloads, a reset's worker stop.
        ThreadKind::Vcpu => {
            l.allow(&[
                libc::SYS_read,
                libc::SYS_eventfd2,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_sendmsg,
                libc::SYS_recvmsg,
                libc::SYS_sendto,
                libc::SYS_recvfrom,
                libc::SYS_fcntl,
                libc::SYS_dup,
            ]);
            l.ioctls(&vcpu_ioctls())?;
        }
        // Accepts clients, one thread each; pause/resume kick the vCPUs; shutdown presses
        // Ctrl-Alt-Del (an irqfd write); memory sets virtio-mem's requested size and raises
        // a configuration interrupt.
        ThreadKind::Api => {
            threads(&mut l, false)?;
            l.allow(&[
                libc::SYS_accept4,
                libc::SYS_read,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_fcntl,
                libc::SYS_shutdown,
            ]);
        }
        // Writes the guest's console bytes to a file, a descriptor or stdout.
        ThreadKind::Console => {}
        // Sleeps, then signals vCPUs stuck in KVM_RUN.
        ThreadKind::Nudge => {}
        // Creates every device worker thread (see `spawner.rs`), which starts under this
        // list and then installs its own: so this is the union of the workers' lists.
        ThreadKind::Spawner => {
            threads(&mut l, true)?;
            for k in ThreadKind::WORKERS {
                l.union(&list(*k, pid)?);
            }
        }
        // Reads and writes the image at offsets; flushes.
        ThreadKind::Block => {
            event_loop(&mut l);
            l.allow(&[
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_fdatasync,
                libc::SYS_fsync,
            ]);
        }
        // getrandom(2) is in the base list.
        ThreadKind::Rng => event_loop(&mut l),
        // Frames to and from the tap.
        ThreadKind::Net => {
            event_loop(&mut l);
            l.allow(&[libc::SYS_readv]);
            l.ioctls(&[libc::TUNSETOFFLOAD])?;
        }
        // vhost-net's and vhost-user's call eventfds turned into interrupts.
        ThreadKind::VhostIrq => event_loop(&mut l),
        // Host connections accepted on the device's socket, guest connections to
        // `<uds>_<port>`, stream data both ways.
        ThreadKind::Vsock => {
            event_loop(&mut l);
            unix_sockets(&mut l)?;
            l.allow(&[
                libc::SYS_accept4,
                libc::SYS_connect,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_recvmsg,
                libc::SYS_sendmsg,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                libc::SYS_fcntl,
            ]);
            l.ioctls(&[libc::FIONBIO])?;
        }
        // Unplugged blocks go back to the host: a hole punched in the memfd, or
        // MADV_DONTNEED (base list).
        ThreadKind::Mem => {
            event_loop(&mut l);
            l.allow(&[libc::SYS_fallocate]);
        }
    }
    Ok(l)
}
