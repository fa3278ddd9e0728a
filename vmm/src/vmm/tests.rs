//! These run hand-made guest code on whatever /dev/kvm exists (a software KVM is fine
//! for a few instructions); they are skipped when /dev/kvm is missing.
use super::*;
use crate::boot::tests::pvh_elf;
use crate::config::SerialOutput;
use crate::hostcheck::HostFacts;
use crate::state::MARKER_POWER_OFF;

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn run_snippet(code: &[u8]) -> (ExitReason, Vm, String) {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("vmlinux");
    std::fs::write(&k, pvh_elf(code, 0x100_0000)).unwrap();
    let serial = dir.path().join("serial.log");
    let mut c = VmConfig::with_kernel(&k);
    c.memory_mib = 64;
    c.serial = SerialOutput::File(serial.clone());
    let opts = RunOptions {
        allow_software_kvm: true,
        ..Default::default()
    };
    let mut vm = Vm::start(c, opts).unwrap();
    assert_eq!(vm.info().vcpus, 1);
    let r = vm
        .wait(Some(Duration::from_secs(60)))
        .expect("guest did not stop");
    let out = std::fs::read_to_string(&serial).unwrap();
    (r, vm, out)
}

#[test]
fn pvh_entry_serial_marker_and_poweroff() {
    if !kvm_usable() {
        return;
    }
    // 32-bit protected mode (PVH entry): ebx must point at the start_info magic.
    let mut code = vec![
        0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmp dword [ebx], 0x336ec578
        0x75, 0x1d, // jne fail (+29)
    ];
    code.extend_from_slice(&[
        0x66,
        0xba,
        0xf8,
        0x03, // mov dx, 0x3f8
        0xb0,
        b'O',
        0xee, // mov al, 'O'; out dx, al
        0xb0,
        b'K',
        0xee, // mov al, 'K'; out dx, al
        0xb0,
        b'\n',
        0xee, // newline
        0x66,
        0xba,
        0xf0,
        0x03, // mov dx, 0x3f0
        0xb0,
        123,
        0xee, // boot done
        0xb0,
        MARKER_POWER_OFF,
        0xee, // power-off intent
        0xb0,
        0xfe,
        0xe6,
        0x64, // mov al, 0xfe; out 0x64, al  (i8042 reset)
        0xf4, // hlt (not reached)
        0xeb,
        0xfe, // jmp $ (not reached)
    ]);
    // fail: triple fault via int3 with an empty IDT
    code.push(0xcc);
    let (r, vm, out) = run_snippet(&code);
    assert_eq!(out, "OK\n");
    assert_eq!(r, ExitReason::PowerOff);
    assert!(vm.state.boot_done().is_some());
    let m = vm.metrics();
    assert!(m.exits.io_out >= 6, "{m:?}");
}

#[test]
fn triple_fault_and_reboot_exit_codes() {
    if !kvm_usable() {
        return;
    }
    let (r, _, _) = run_snippet(&[0xcc]); // int3, IDT empty -> triple fault
    if HostFacts::read().software_kvm().is_some() {
        // kvm_pvm cannot deliver the exception and reports an emulation failure instead.
        assert!(
            matches!(r, ExitReason::TripleFault | ExitReason::GuestCrash(_)),
            "{r:?}"
        );
    } else {
        assert_eq!(r, ExitReason::TripleFault);
        assert_eq!(r.code(), 33);
    }
    let (r, _, _) = run_snippet(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
    assert_eq!(r, ExitReason::Reboot);
    assert_eq!(r.code(), 32);
}

/// A VM whose one vCPU spins in guest code (`jmp $`) until stopped.
fn spinning_vm() -> (Vm, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("vmlinux");
    std::fs::write(&k, pvh_elf(&[0xeb, 0xfe], 0x100_0000)).unwrap();
    let mut c = VmConfig::with_kernel(&k);
    c.memory_mib = 64;
    c.serial = SerialOutput::None;
    let opts = RunOptions {
        allow_software_kvm: true,
        ..Default::default()
    };
    (Vm::start(c, opts).unwrap(), dir)
}

fn interrupted(vm: &Vm) -> u64 {
    vm.state.exits.snapshot().interrupted
}

#[test]
fn a_kick_between_the_flag_check_and_kvm_run_is_not_lost() {
    if !kvm_usable() {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    let (mut vm, _dir) = spinning_vm();
    // The hook holds the vCPU in the window between its look at the pause flag and
    // KVM_RUN, for as long as the test needs to kick it there.
    let armed = Arc::new(AtomicBool::new(false));
    let (in_window, reached) = mpsc::channel::<()>();
    let (go, wait_go) = mpsc::channel::<()>();
    let wait_go = Mutex::new(wait_go);
    let a = armed.clone();
    vm.state.test_hooks.set_before_run(move |_| {
        if a.swap(false, Ordering::SeqCst) {
            let _ = in_window.send(());
            let _ = wait_go.lock().unwrap().recv();
        }
    });
    for cycle in 0..20 {
        armed.store(true, Ordering::SeqCst);
        // No flag set: this kick only brings the spinning vCPU round to the hook.
        vm.kick_vcpus();
        reached
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("cycle {cycle}: the vCPU never left KVM_RUN"));
        let before = interrupted(&vm);
        vm.state.set_paused(true);
        vm.kick_vcpus(); // lands while the vCPU is outside KVM_RUN, past its flag check
        go.send(()).unwrap();
        assert!(
            vm.state.wait_none_running(Duration::from_secs(5)),
            "cycle {cycle}: the kick was lost, the vCPU went on running guest code"
        );
        assert_eq!(
            interrupted(&vm) - before,
            1,
            "cycle {cycle}: one immediate exit per kick"
        );
        vm.resume();
    }
    vm.state.request_exit(ExitReason::PowerOff);
    assert_eq!(
        vm.wait(Some(Duration::from_secs(10))),
        Some(ExitReason::PowerOff)
    );
}

#[test]
fn every_pause_takes_one_kick() {
    if !kvm_usable() {
        return;
    }
    let (mut vm, _dir) = spinning_vm();
    let cycles = 200;
    let before = interrupted(&vm);
    for cycle in 0..cycles {
        assert!(vm.pause(), "cycle {cycle}: pause timed out");
        assert_eq!(vm.state.running_vcpus(), 0);
        vm.resume();
    }
    // One exit per pause (the kick); a kick that lands before KVM_RUN costs no more.
    let exits = interrupted(&vm) - before;
    assert!(
        exits <= cycles,
        "{exits} interrupted exits for {cycles} pauses"
    );
    vm.state.request_exit(ExitReason::PowerOff);
    assert_eq!(
        vm.wait(Some(Duration::from_secs(10))),
        Some(ExitReason::PowerOff)
    );
}

#[test]
fn software_kvm_is_refused_with_reason() {
    if !kvm_usable() || HostFacts::read().software_kvm().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("vmlinux");
    std::fs::write(&k, pvh_elf(&[0xf4], 0x100_0000)).unwrap();
    let e = Vm::start(VmConfig::with_kernel(&k), RunOptions::default()).unwrap_err();
    assert_eq!(e.exit_code(), EXIT_KVM);
    assert!(e.to_string().contains("software KVM"), "{e}");
}

#[test]
fn memory_hotplug_region_device_cmdline_and_api() {
    if !kvm_usable() {
        return;
    }
    use crate::api::{Request, handle};
    use vm_memory::{Bytes, GuestAddress};
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("vmlinux");
    std::fs::write(&k, pvh_elf(&[0xeb, 0xfe], 0x100_0000)).unwrap();
    let mut c = VmConfig::with_kernel(&k);
    c.memory_mib = 64;
    c.serial = SerialOutput::None;
    c.rng = true;
    c.memory_hotplug = Some(crate::config::MemoryHotplug {
        region_mib: 256,
        block_mib: 4,
    });
    let opts = RunOptions {
        allow_software_kvm: true,
        ..Default::default()
    };
    let mut vm = Vm::start(c, opts).unwrap();
    // The device comes last (rng keeps its window), with its command-line entry and the
    // online policy.
    let info = vm.info();
    let names: Vec<_> = info.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["rng", "mem"]);
    assert!(
        vm.cmdline.contains(&format!(
            "virtio_mmio.device=4K@0xd0001000:6 {}",
            super::HOTPLUG_CMDLINE
        )),
        "{}",
        vm.cmdline
    );
    // KVM and the devices see the region at 4 GiB; the guest's memory map does not.
    assert!(vm.mem.write_obj(7u64, GuestAddress(4 << 30)).is_ok());
    assert!(
        vm.mem
            .write_obj(7u64, GuestAddress((4 << 30) + (256 << 20)))
            .is_err()
    );
    let start_info: u32 = vm
        .mem
        .read_obj(GuestAddress(
            crate::layout::PVH_START_INFO
                + std::mem::offset_of!(
                    linux_loader::loader::elf::start_info::hvm_start_info,
                    memmap_entries
                ) as u64,
        ))
        .unwrap();
    assert_eq!(
        start_info, 2,
        "memmap_entries: low RAM and RAM above 1 MiB only"
    );
    for i in 0..2u64 {
        let at = crate::layout::PVH_MEMMAP + i * 24;
        let addr: u64 = vm.mem.read_obj(GuestAddress(at)).unwrap();
        let size: u64 = vm.mem.read_obj(GuestAddress(at + 8)).unwrap();
        assert!(addr + size <= 64 << 20, "{addr:#x}+{size:#x}");
    }
    let hp = info.memory_hotplug.unwrap();
    assert_eq!(
        (
            hp.region_mib,
            hp.block_mib,
            hp.plugged_mib,
            hp.requested_mib
        ),
        (256, 4, 0, 0)
    );
    let v = handle(&vm, Request::Memory { requested_mib: 128 });
    assert_eq!(
        v,
        serde_json::json!({
            "ok": true, "block_mib": 4, "requested_mib": 128, "plugged_mib": 0, "region_mib": 256
        })
    );
    assert_eq!(vm.info().memory_hotplug.unwrap().requested_mib, 128);
    for (n, reason) in [
        (6, "multiple of block_mib 4"),
        (260, "exceeds region_mib 256"),
    ] {
        let v = handle(&vm, Request::Memory { requested_mib: n });
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains(reason), "{v}");
    }
    assert_eq!(vm.info().memory_hotplug.unwrap().requested_mib, 128);
    vm.state.request_exit(ExitReason::PowerOff);
    assert_eq!(
        vm.wait(Some(Duration::from_secs(10))),
        Some(ExitReason::PowerOff)
    );
}

#[test]
fn memory_request_without_hotplug_is_refused() {
    if !kvm_usable() {
        return;
    }
    let (mut vm, _dir) = spinning_vm();
    assert_eq!(vm.info().memory_hotplug, None);
    assert!(!vm.cmdline.contains("memhp_default_state"));
    let v = crate::api::handle(&vm, crate::api::Request::Memory { requested_mib: 2 });
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().unwrap().contains("no memory hot-plug"),
        "{v}"
    );
    vm.state.request_exit(ExitReason::PowerOff);
    assert_eq!(
        vm.wait(Some(Duration::from_secs(10))),
        Some(ExitReason::PowerOff)
    );
}
