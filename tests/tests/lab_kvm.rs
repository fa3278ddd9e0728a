//! The lab itself: a tiny real-mode guest on KVM, and the harness's contract.

use carapace_tests::kvm_test;
use carapace_tests::lab::{Lab, LabError, Mode};
use kvm_ioctls::{Kvm, VcpuExit};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest-physical address where the snippet is loaded and starts.
const CODE_ADDR: u64 = 0x1000;
/// The I/O port the snippet writes its result to.
const RESULT_PORT: u16 = 0x10;

/// 16-bit real-mode code: ax = 10 + 9 + ... + 1 (= 55), `out 0x10, al`, `hlt`.
const SNIPPET: &[u8] = &[
    0x31, 0xc0, // xor ax, ax
    0xb9, 0x0a, 0x00, // mov cx, 10
    0x01, 0xc8, // add ax, cx      (loop target)
    0xe2, 0xfc, // loop -4
    0xe6, 0x10, // out 0x10, al
    0xf4, // hlt
];

kvm_test! {
    /// Inside the lab: /dev/kvm opens, a VM runs the snippet, the value and the HLT exit arrive.
    fn real_mode_snippet_computes_and_halts() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("guest memory");
        mem.write_slice(SNIPPET, GuestAddress(CODE_ADDR)).expect("load snippet");
        let region = mem.iter().next().expect("one region");
        let host_addr = mem.get_host_address(GuestAddress(0)).expect("host address") as u64;

        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let slot = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host_addr,
        };
        // SAFETY: `host_addr` is the start of a live mapping of `region.len()` bytes owned by
        // `mem`, which is declared before `vm` and therefore dropped after it: the mapping
        // outlives every use the VM can make of it.
        unsafe { vm.set_user_memory_region(slot) }.expect("KVM_SET_USER_MEMORY_REGION");

        let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let mut sregs = vcpu.get_sregs().expect("get sregs");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).expect("set sregs");
        let regs = kvm_bindings::kvm_regs { rip: CODE_ADDR, rflags: 0x2, ..Default::default() };
        vcpu.set_regs(&regs).expect("set regs");

        let mut result = None;
        let mut halted = false;
        for _ in 0..16 {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(port, data) => {
                    assert_eq!(port, RESULT_PORT, "write to an unexpected port");
                    result = Some(data.to_vec());
                }
                VcpuExit::Hlt => {
                    halted = true;
                    break;
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        assert_eq!(result.as_deref(), Some(&[55u8][..]), "snippet result");
        assert!(halted, "no HLT exit");
        assert_eq!(vcpu.get_regs().expect("regs").rip, CODE_ADDR + SNIPPET.len() as u64);
    }
}

/// The harness in lab mode returns the command's status, stdout and stderr apart, and
/// keeps the caller's cwd and environment. Boots the lab machine even on a capable host.
#[test]
fn lab_mode_returns_status_output_cwd_and_env() {
    let cwd = std::env::temp_dir().canonicalize().expect("cwd");
    let out = Lab::new()
        .mode(Mode::Lab)
        .mem_mib(1024)
        .timeout(Duration::from_secs(300))
        .env("LAB_PROBE", "probe-42")
        .cwd(&cwd)
        .run(&[
            "bash",
            "-c",
            "echo \"$LAB_PROBE $PWD\"; test -c /dev/kvm && echo kvm-ok; echo to-stderr >&2; exit 9",
        ])
        .expect("lab run");
    assert_eq!(out.status, 9, "{out:?}");
    assert_eq!(
        out.stdout,
        format!("probe-42 {}\nkvm-ok\n", cwd.display()),
        "{out:?}"
    );
    assert_eq!(out.stderr, "to-stderr\n", "{out:?}");
}

/// A command that outlives its timeout is killed with the lab machine.
#[test]
fn lab_mode_timeout_kills_the_machine() {
    let err = Lab::new()
        .mode(Mode::Lab)
        .mem_mib(1024)
        .timeout(Duration::from_secs(20))
        .run(&["sleep", "600"])
        .expect_err("must time out");
    assert!(matches!(err, LabError::Timeout { secs: 20, .. }), "{err}");
}
