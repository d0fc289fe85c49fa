// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The predictor against the real KVM: install the input's APIC base, KVM_SET_LAPIC the blob,
//! KVM_GET_LAPIC, and compare with `predict_set`. Without a usable /dev/kvm every input is a
//! no-op (the target still runs, it just checks nothing) and a note is printed once.
#![no_main]
use std::cell::RefCell;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use lapic_state::{predict_set, regs, ApicBase, ApicMode, KvmConventions, LapicPage, PriorApic};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{irqchip_vm, x2apic_cpuid, LapicInput};

struct Vm {
    _vm: VmFd,
    vcpus: Vec<(u32, VcpuFd, PriorApic)>,
    conv: KvmConventions,
}

struct Env {
    vms: [Vm; 2], // [legacy ids, 32-bit ids]
}

fn make_vm(kvm: &Kvm, ids32: bool) -> Option<Vm> {
    let vm = irqchip_vm(kvm, ids32)?;
    let cpuid = x2apic_cpuid(kvm)?;
    let mut vcpus = Vec::new();
    for id in [0u32, 1, 255, 300] {
        let fd = vm.create_vcpu(u64::from(id)).ok()?;
        fd.set_cpuid2(&cpuid).ok()?;
        vcpus.push((id, fd, PriorApic::FRESH));
    }
    let conv = KvmConventions::detect(kvm, &vcpus[0].1, ids32).ok()?;
    Some(Vm { _vm: vm, vcpus, conv })
}

fn env() -> Option<Env> {
    let kvm = Kvm::new().ok()?;
    Some(Env {
        vms: [make_vm(&kvm, false)?, make_vm(&kvm, true)?],
    })
}

thread_local! {
    static ENV: RefCell<Option<Env>> = RefCell::new({
        let e = env();
        if e.is_none() {
            eprintln!("lapic_differential: /dev/kvm is not usable, nothing is checked");
        }
        e
    });
}

fuzz_target!(|data: &[u8]| {
    let inp = LapicInput::parse(data);
    ENV.with(|e| {
        let mut e = e.borrow_mut();
        let Some(env) = e.as_mut() else { return };
        let vm = &mut env.vms[usize::from(inp.conv.x2apic_32bit_ids)];
        let conv = vm.conv;
        let n = vm.vcpus.len();
        let (id, fd, prior) = &mut vm.vcpus[inp.vcpu_id as usize % n];
        // Only valid bases can be installed; choose the mode from the input's bits.
        let mode = match inp.apic_base.0 & 0xc00 {
            0 => 0,
            0x800 => ApicBase::ENABLE,
            _ => ApicBase::ENABLE | ApicBase::EXTD,
        };
        let bsp = if *id == 0 { ApicBase::BSP } else { 0 };
        let base = ApicBase(ApicBase::DEFAULT_ADDRESS | mode | bsp);
        let mut s = fd.get_sregs().unwrap();
        s.apic_base = base.0;
        fd.set_sregs(&s).unwrap();
        let mut page = inp.page;
        if base.mode() == ApicMode::X2Apic && conv.x2apic_32bit_ids && inp.apic_base.0 & 1 == 0 {
            page.set_reg(regs::ID, *id); // mostly the right id, so most sets succeed
        }
        let before = LapicPage::from(fd.get_lapic().unwrap());
        let predicted = predict_set(*id, base, &page, &conv, prior);
        let actual = fd.set_lapic(page.as_kvm());
        let mut after = LapicPage::from(fd.get_lapic().unwrap());
        let tmcct = after.reg(regs::TMCCT);
        after.set_reg(regs::TMCCT, 0);
        match (predicted, actual) {
            (Ok(p), Ok(())) => {
                assert!(p.tmcct.admits(tmcct), "TMCCT {tmcct} vs {:?}", p.tmcct);
                assert_eq!(after, p.get, "GET after SET differs from the prediction");
                *prior = p.next;
            }
            (Err(f), Err(_)) => {
                let mut expect = before;
                expect.set_reg(regs::SPIV, f.spiv_applied);
                expect.set_reg(regs::TMCCT, 0);
                assert_eq!(after, expect);
            }
            (p, a) => panic!("predicted {:?} but KVM said {:?}", p.map(|_| ()), a),
        }
    });
});
