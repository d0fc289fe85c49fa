// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Ordered save/restore of vCPUs into a brand-new VM on the real /dev/kvm: every mp_state is
//! preserved exactly (UNINITIALIZED, INIT_RECEIVED, HALTED, RUNNABLE), and so are the
//! registers and the LAPIC (including an offlined CPU's SW-disabled APIC).

use kvm_bindings::{kvm_mp_state, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, KvmNestedStateBuffer, VcpuFd, VmFd};
use lapic_state::{regs, KvmConventions, LapicPage};
mod common;
use common::{kvm_or_skip, NoExits};
use vcpu_manager::{
    cpuid, msr_list, restore_vcpu, save_vcpu, xsave_size, NestedState, RestoreOptions, SaveOptions, Topology,
    TscPolicy,
};

fn vm_with_vcpus(kvm: &Kvm, n: u32) -> (VmFd, Vec<VcpuFd>) {
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let topo = Topology::new(n);
    let sup = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let fds = (0..n)
        .map(|i| {
            let fd = vm.create_vcpu(u64::from(i)).unwrap();
            fd.set_cpuid2(&cpuid::for_vcpu(&sup, &topo, i)).unwrap();
            fd
        })
        .collect();
    (vm, fds)
}

#[test]
fn mp_states_registers_and_lapic_survive_into_a_new_vm() {
    let Some(kvm) = kvm_or_skip("mp_states_registers_and_lapic_survive_into_a_new_vm") else {
        return;
    };
    let (vm, src) = vm_with_vcpus(&kvm, 4);
    let conv = KvmConventions::detect(&kvm, &src[0], false).unwrap();
    let msrs = msr_list(&kvm, &src[0]).unwrap();
    // vCPU 1: an AP between INIT and SIPI. vCPU 2: an offlined CPU (halted, IF=0, APIC
    // SW-disabled, LVTs masked). vCPU 3: never started (UNINITIALIZED). vCPU 0: runnable BSP.
    src[1]
        .set_mp_state(kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
        })
        .unwrap();
    let mut lapic = LapicPage::from(src[2].get_lapic().unwrap());
    lapic.set_reg(regs::SPIV, 0xff);
    lapic.set_reg(regs::LVT_TIMER, 0x10000 | 0xec);
    src[2].set_lapic(lapic.as_kvm()).unwrap();
    let mut r = src[2].get_regs().unwrap();
    r.rip = 0x1234;
    r.rflags = 0x2; // IF=0
    src[2].set_regs(&r).unwrap();
    src[2]
        .set_mp_state(kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_HALTED,
        })
        .unwrap();
    let mut r0 = src[0].get_regs().unwrap();
    r0.rax = 0xdead_beef;
    src[0].set_regs(&r0).unwrap();
    // Vector state travels in the XSAVE area (KVM_GET_XSAVE2 where KVM has it): XMM5 at
    // byte 240, marked live in XSTATE_BV (byte 512). Not through KVM_SET_FPU: it writes the
    // legacy area without setting XSTATE_BV, so KVM then reports XMM in its initial state.
    let mut xs = src[0].get_xsave().unwrap();
    xs.region[60..64].copy_from_slice(&[0x7873_6176, 0x6520_7375, 0x7276_6976, 0x6573_2121]);
    xs.region[128] |= 0b11;
    // SAFETY: a 4 KiB area read from this vCPU, written back with two fields changed.
    unsafe { src[0].set_xsave(&xs) }.unwrap();
    let topo = Topology::new(4);
    let sup = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let set: Vec<_> = (0..4).map(|i| cpuid::for_vcpu(&sup, &topo, i)).collect();
    let save_opts = SaveOptions::new(conv)
        .with_msrs(msrs.clone())
        .with_xsave_size(xsave_size(&vm))
        .with_nested_state(true);
    let saved: Vec<_> = src
        .iter()
        .enumerate()
        .map(|(i, fd)| save_vcpu(fd, i as u32, &set[i], &save_opts).unwrap())
        .collect();
    // The CPUID saved is the one set (KVM_GET_CPUID2 on PVM reports host bits never set).
    for (s, c) in saved.iter().zip(&set) {
        assert!(
            s.cpuid == *c,
            "vCPU {} saved a CPUID other than the one set",
            s.vcpu_id
        );
    }
    // Through serde, as a snapshot would carry it.
    let json = serde_json::to_vec(&saved).unwrap();
    let saved: Vec<vcpu_manager::VcpuState> = serde_json::from_slice(&json).unwrap();
    let want = [
        kvm_bindings::KVM_MP_STATE_RUNNABLE,
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
        kvm_bindings::KVM_MP_STATE_HALTED,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
    ];
    for (s, w) in saved.iter().zip(want) {
        assert_eq!(s.mp_state.mp_state, w, "saved mp_state of vCPU {}", s.vcpu_id);
    }

    let (vm2, dst) = vm_with_vcpus(&kvm, 4);
    let tsc = saved[0]
        .msrs
        .as_slice()
        .iter()
        .find(|e| e.index == 0x10)
        .map(|e| e.data);
    // Nested state travels where KVM has it (kvm-amd and kvm-intel: a header at least).
    let nested = kvm.check_extension(Cap::NestedState);
    for s in &saved {
        assert_eq!(s.nested_state.is_some(), nested, "vCPU {}", s.vcpu_id);
    }
    let restore_opts = RestoreOptions::new(conv)
        .with_xsave_size(xsave_size(&vm2))
        .with_tsc(tsc.map_or(TscPolicy::Saved, TscPolicy::Value));
    for (fd, s) in dst.iter().zip(&saved) {
        restore_vcpu(fd, s, &restore_opts).unwrap();
    }
    if nested {
        for (fd, s) in dst.iter().zip(&saved) {
            let back = save_vcpu(fd, s.vcpu_id, &set[s.vcpu_id as usize], &save_opts).unwrap();
            let (a, b) = (back.nested_state.unwrap(), s.nested_state.clone().unwrap());
            assert_eq!(
                (a.0.format, a.0.flags, a.0.size),
                (b.0.format, b.0.flags, b.0.size)
            );
        }
    }
    for (i, (fd, w)) in dst.iter().zip(want).enumerate() {
        assert_eq!(
            fd.get_mp_state().unwrap().mp_state,
            w,
            "restored mp_state of vCPU {i}"
        );
    }
    assert_eq!(dst[0].get_regs().unwrap().rax, 0xdead_beef);
    assert_eq!(
        dst[0].get_xsave().unwrap().region[60..64],
        [0x7873_6176, 0x6520_7375, 0x7276_6976, 0x6573_2121],
        "XMM5"
    );
    let r2 = dst[2].get_regs().unwrap();
    assert_eq!((r2.rip, r2.rflags & 0x200), (0x1234, 0));
    let l2 = LapicPage::from(dst[2].get_lapic().unwrap());
    assert!(!l2.sw_enabled(), "the offlined CPU keeps its SW-disabled APIC");
    assert!(l2.lvt(regs::LVT_TIMER).masked());
    drop(vm2);
}

/// Exits go nowhere: these vCPUs are created and configured, never run.

#[test]
fn a_hot_added_vcpu_gets_the_vm_tsc_rate_not_the_hosts() {
    let Some(kvm) = kvm_or_skip("a_hot_added_vcpu_gets_the_vm_tsc_rate_not_the_hosts") else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let topo = Topology::new(2);
    let model = cpuid::host_model(&kvm, cpuid::Backend::detect()).unwrap();
    let mut cpus = vcpu_manager::VcpuManager::new(
        topo,
        model,
        std::sync::Arc::new(NoExits),
        KvmConventions::CANONICAL,
    );
    let host = cpus.prepare(&vm, 0).unwrap().get_tsc_khz().unwrap();
    // A VM from a host whose TSC ran 100 kHz slower: within KVM's 250 ppm tolerance, so any
    // KVM takes it (no TSC scaling needed), and KVM_GET_TSC_KHZ reports what was set.
    let vm_rate = host - 100;
    cpus.set_tsc_khz(Some(vm_rate));
    let added = cpus.prepare(&vm, 1).unwrap();
    assert_eq!(added.get_tsc_khz().unwrap(), vm_rate, "host rate {host} kHz");
    // Its MTRRs are on, default write-back, as firmware leaves them.
    let mut m = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: 0x2ff,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(added.get_msrs(&mut m).unwrap(), 1);
    assert_eq!(m.as_slice()[0].data, 0x806);
}

#[test]
fn nested_state_claiming_more_than_its_buffer_is_refused() {
    let Some(kvm) = kvm_or_skip("nested_state_claiming_more_than_its_buffer_is_refused") else {
        return;
    };
    // A snapshot's nested state says how many bytes KVM reads from the buffer: beyond the
    // buffer, KVM would read this process's memory into the vCPU. Refused before the ioctl.
    let (vm, fds) = vm_with_vcpus(&kvm, 1);
    let conv = KvmConventions::detect(&kvm, &fds[0], false).unwrap();
    let topo = Topology::new(1);
    let sup = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let opts = SaveOptions::new(conv).with_xsave_size(xsave_size(&vm));
    let mut st = save_vcpu(&fds[0], 0, &cpuid::for_vcpu(&sup, &topo, 0), &opts).unwrap();
    let mut buf = KvmNestedStateBuffer::empty();
    buf.size = u32::MAX;
    st.nested_state = Some(NestedState(Box::new(buf)));
    let (vm2, dst) = vm_with_vcpus(&kvm, 1);
    let r = restore_vcpu(
        &dst[0],
        &st,
        &RestoreOptions::new(conv).with_xsave_size(xsave_size(&vm2)),
    );
    assert!(
        matches!(r, Err(vcpu_manager::Error::NestedState { size: u32::MAX, .. })),
        "{r:?}"
    );
}
