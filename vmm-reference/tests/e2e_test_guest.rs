// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests: the VMM boots the built-in test guest on the real /dev/kvm.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmm_reference::config::{CpuConfig, KernelSource, SerialMode, VmConfig};
use vmm_reference::console::GuestConsole;
use vmm_reference::vm::{Vm, VmOutcome};

const T: Duration = Duration::from_secs(20);
const KVM_MP_STATE_HALTED: u32 = 3;

/// The built-in test guest with `boot` of `max` CPUs, 128 MiB, console on `sock`.
fn test_guest_config(boot: u32, max: u32, sock: &std::path::Path) -> VmConfig {
    VmConfig {
        kernel: KernelSource::Embedded,
        initramfs: None,
        cmdline: None,
        cpus: CpuConfig { boot, max },
        memory: 128 << 20,
        serial: SerialMode::Socket(sock.to_path_buf()),
    }
}

#[test]
fn boot_two_of_eight_reports_status_ticks_and_powers_off() {
    if !kvm_or_skip("boot_two_of_eight_reports_status_ticks_and_powers_off") {
        return;
    }
    let dir = temp_dir("boot28");
    let sock = dir.join("console.sock");
    let mut child = spawn_vmm(&[
        "--cpus",
        "boot=2,max=8",
        "--memory",
        "256M",
        "--serial",
        &format!("socket={}", sock.display()),
    ]);
    let mut con = GuestConsole::connect(&sock, T).expect("console");
    let ready = con.wait_for("READY", T).expect("READY");
    assert!(ready.contains("possible=8 present=2 online=2"), "{ready}");

    let s1 = con.status(T).expect("status");
    assert_eq!((s1.possible, s1.present, s1.online), (8, 2, 2));
    assert_eq!(s1.cpus.len(), 8);
    assert!(s1.cpus[..2].iter().all(|c| c.state == "online"), "{s1:?}");
    assert!(s1.cpus[2..].iter().all(|c| c.state == "absent"), "{s1:?}");
    assert_eq!(
        s1.cpus.iter().map(|c| c.apic_id).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );

    std::thread::sleep(Duration::from_millis(300));
    let s2 = con.status(T).expect("status");
    for i in 0..2 {
        assert!(
            s2.cpus[i].ticks > s1.cpus[i].ticks,
            "CPU {i} timer not ticking: {s1:?} -> {s2:?}"
        );
    }
    let reply = con.command("poweroff", T).expect("poweroff");
    assert_eq!(reply.last().map(String::as_str), Some("OK poweroff"));
    let out = wait_child(&mut child, T);
    assert!(
        out.status.success(),
        "VMM exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn offline_and_online_cpu1_like_linux() {
    if !kvm_or_skip("offline_and_online_cpu1_like_linux") {
        return;
    }
    let dir = temp_dir("offon");
    let sock = dir.join("console.sock");
    let vm = Vm::start(&test_guest_config(2, 4, &sock)).expect("VM starts");
    let mut con = GuestConsole::connect(&sock, T).expect("console");
    con.wait_for("READY", T).expect("READY");
    assert!(
        vm.lapic(1).expect("lapic").sw_enabled(),
        "online CPU has a SW-enabled APIC"
    );

    assert_eq!(con.command("offline 1", T).expect("offline"), vec!["OK"]);
    // KVM's view: the offlined CPU is halted (cli; hlt) with a SW-disabled APIC.
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.mp_state(1) != Some(KVM_MP_STATE_HALTED) {
        assert!(
            Instant::now() < deadline,
            "vCPU 1 mp_state {:?}, expected HALTED",
            vm.mp_state(1)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let lapic = vm.lapic(1).expect("lapic");
    assert!(!lapic.sw_enabled(), "SPIV bit 8 must be clear on an offlined CPU");
    assert!(lapic.lvt(lapic_state::regs::LVT_TIMER).masked());
    let s1 = con.status(T).expect("status");
    assert_eq!(s1.cpus[1].state, "offline");
    assert_eq!(s1.online, 1);
    std::thread::sleep(Duration::from_millis(200));
    let s2 = con.status(T).expect("status");
    assert_eq!(s2.cpus[1].ticks, s1.cpus[1].ticks, "an offline CPU must not tick");
    assert!(s2.cpus[0].ticks > s1.cpus[0].ticks);

    // INIT/SIPI again brings it back with its timer running.
    assert_eq!(con.command("online 1", T).expect("online"), vec!["OK"]);
    std::thread::sleep(Duration::from_millis(200));
    let s3 = con.status(T).expect("status");
    assert_eq!(s3.cpus[1].state, "online");
    assert_eq!(s3.online, 2);
    assert!(
        s3.cpus[1].ticks > s2.cpus[1].ticks,
        "CPU 1 not ticking after online: {s2:?} -> {s3:?}"
    );
    assert!(vm.lapic(1).expect("lapic").sw_enabled());

    // The boot CPU and absent CPUs are refused.
    assert_eq!(
        con.command("offline 0", T).expect("offline 0"),
        vec!["ERR cannot offline the boot cpu"]
    );
    assert_eq!(
        con.command("online 3", T).expect("online 3"),
        vec!["ERR cpu not present"]
    );
    assert_eq!(
        con.command("online 9", T).expect("online 9"),
        vec!["ERR no such cpu"]
    );

    con.command("poweroff", T).expect("poweroff");
    assert_eq!(vm.wait(Some(T)), Some(VmOutcome::PowerOff));
    vm.shutdown();
}

#[test]
fn triple_fault_ends_the_vmm_with_an_error() {
    if !kvm_or_skip("triple_fault_ends_the_vmm_with_an_error") {
        return;
    }
    let dir = temp_dir("tf");
    let sock = dir.join("console.sock");
    let mut child = spawn_vmm(&[
        "--cpus",
        "boot=1,max=2",
        "--serial",
        &format!("socket={}", sock.display()),
    ]);
    let mut con = GuestConsole::connect(&sock, T).expect("console");
    con.wait_for("READY", T).expect("READY");
    con.command("triple-fault", T).expect("reply");
    let out = wait_child(&mut child, T);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("triple fault"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn x2apic_ids_above_255_boot() {
    if !kvm_or_skip("x2apic_ids_above_255_boot") {
        return;
    }
    // 300 possible CPUs: the MADT carries x2APIC entries and KVM needs 32-bit x2APIC ids.
    let dir = temp_dir("x2");
    let sock = dir.join("console.sock");
    let vm = Vm::start(&test_guest_config(2, 300, &sock)).expect("VM starts");
    let mut con = GuestConsole::connect(&sock, T).expect("console");
    let ready = con.wait_for("READY", T).expect("READY");
    assert!(
        ready.contains("apic_mode=x2apic possible=300 present=2 online=2"),
        "{ready}"
    );
    let s = con.status(T).expect("status");
    assert_eq!(s.cpus[299].apic_id, 299);
    con.command("poweroff", T).expect("poweroff");
    assert_eq!(vm.wait(Some(T)), Some(VmOutcome::PowerOff));
}
