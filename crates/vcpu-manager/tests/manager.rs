// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The manager's slots on the real /dev/kvm: hot-add, refusals, hot-remove parks the fd, the
//! next hot-add reuses it reset to an AP's power-on state, and pause/save/resume/stop over
//! every running vCPU. Application processors only: they wait in `KVM_RUN` for a SIPI that
//! never comes, so no guest code is needed.

use std::sync::Arc;

use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use lapic_state::{regs, ApicBase, ApicMode, KvmConventions, LapicPage};
use vcpu_manager::{cpuid, Error, Slot, Topology, VcpuManager};

mod common;
use common::{kvm_or_skip, NoExits};

#[test]
fn slots_go_absent_running_parked_and_parked_fds_are_reused_clean() {
    let Some(kvm) = kvm_or_skip("slots_go_absent_running_parked_and_parked_fds_are_reused_clean") else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let model = cpuid::host_model(&kvm, cpuid::Backend::detect()).unwrap();
    let mut cpus = VcpuManager::new(
        Topology::new(4),
        model,
        Arc::new(NoExits),
        KvmConventions::CANONICAL,
    );
    cpus.hot_add(&vm, 1).unwrap();
    cpus.hot_add(&vm, 2).unwrap();
    assert_eq!(cpus.running(), vec![1, 2]);
    assert!(matches!(cpus.hot_add(&vm, 1), Err(Error::AlreadyRunning(1))));
    assert!(matches!(cpus.hot_add(&vm, 4), Err(Error::NoSuchCpu(4))));
    assert!(matches!(cpus.hot_remove(3), Err(Error::NotRunning(3))));
    assert!(matches!(cpus.hot_remove(9), Err(Error::NoSuchCpu(9))));
    // The guest left CPU 2 in x2APIC mode, software-enabled, runnable: all of it must go.
    cpus.runner(2)
        .unwrap()
        .with_vcpu(vcpu_manager::VCPU_TIMEOUT, |fd| {
            let mut s = fd.get_sregs().unwrap();
            s.apic_base |= 0xc00;
            fd.set_sregs(&s).unwrap();
            let mut page = LapicPage::from(fd.get_lapic().unwrap());
            page.set_reg(regs::SPIV, 0x1ff);
            fd.set_lapic(page.as_kvm()).unwrap();
        })
        .unwrap();
    cpus.hot_remove(2).unwrap();
    assert!(matches!(cpus.slot(2), Some(Slot::Parked(_))));
    assert_eq!((cpus.parked(), cpus.reused()), (1, 0));
    let fd = cpus.prepare(&vm, 2).unwrap();
    assert_eq!((cpus.parked(), cpus.reused()), (0, 1));
    let base = ApicBase(fd.get_sregs().unwrap().apic_base);
    assert_eq!(base.mode(), ApicMode::XApic, "back in xAPIC mode: {:#x}", base.0);
    assert!(!LapicPage::from(fd.get_lapic().unwrap()).sw_enabled());
    assert_eq!(fd.get_mp_state().unwrap().mp_state, KVM_MP_STATE_UNINITIALIZED);
    cpus.start(2, fd).unwrap();
    // Pause, save and resume every running vCPU, then stop them: their fds are parked.
    cpus.pause_all().unwrap();
    let states = cpus.save_all(&cpus.save_options(Vec::new())).unwrap();
    let ids: Vec<u32> = states.iter().map(|(i, _)| *i).collect();
    assert_eq!(ids, vec![1, 2]);
    for (_, s) in &states {
        assert_ne!(s.mp_state.mp_state, KVM_MP_STATE_RUNNABLE, "an AP never started");
    }
    cpus.resume_all();
    cpus.stop_all();
    assert!(cpus.running().is_empty());
    assert_eq!(cpus.parked(), 2);
}
