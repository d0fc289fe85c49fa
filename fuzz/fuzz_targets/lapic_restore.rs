// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The path untrusted LAPIC state really takes, into the real KVM: decode (the binary
//! encoding, postcard or JSON, chosen by the first byte), validate, then
//! `kvm::restore_saved` into a vCPU that has never held another input's state. The invariant
//! checked: a restore that fails leaves the vCPU's LAPIC exactly as it was (the atomicity the
//! crate promises), and one that succeeds reads back the state's ID word as KVM would write
//! it. Without a usable /dev/kvm only the decode and validation paths run.
#![no_main]
use std::cell::RefCell;
use std::sync::Once;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use lapic_state::kvm::restore_saved;
use lapic_state::{regs, ApicMode, KvmConventions, LapicPage, LapicState, Loss, SavedLapic};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{irqchip_vm, x2apic_cpuid};

/// vCPUs per VM before a fresh VM is made (KVM cannot destroy a vCPU).
const VCPUS_PER_VM: u32 = 64;

/// One VM per x2APIC id format: legacy, and 32-bit ids (where KVM refuses a wrong ID word
/// after it has applied SPIV: the case the restore must prevent).
struct Env {
    kvm: Kvm,
    /// Fetched once: every fresh vCPU gets the same CPUID.
    cpuid: kvm_bindings::CpuId,
    vms: [Dest; 2],
}

struct Dest {
    vm: VmFd,
    used: u32,
    ids32: bool,
    conv: KvmConventions,
}

fn dest(kvm: &Kvm, ids32: bool) -> Option<Dest> {
    // The destination's conventions, detected once on a scratch vCPU of another VM.
    let scratch = irqchip_vm(kvm, ids32)?;
    let fd = scratch.create_vcpu(0).ok()?;
    fd.set_cpuid2(&x2apic_cpuid(kvm)?).ok()?;
    let conv = KvmConventions::detect(kvm, &fd, ids32).ok()?;
    Some(Dest {
        vm: irqchip_vm(kvm, ids32)?,
        used: 0,
        ids32,
        conv,
    })
}

fn env() -> Option<Env> {
    let kvm = Kvm::new().ok()?;
    let vms = [dest(&kvm, false)?, dest(&kvm, true)?];
    let cpuid = x2apic_cpuid(&kvm)?;
    Some(Env { kvm, cpuid, vms })
}

thread_local! {
    static ENV: RefCell<Option<Env>> = RefCell::new({
        let e = env();
        if e.is_none() {
            eprintln!("lapic_restore: /dev/kvm is not usable, only decoding is checked");
        }
        e
    });
}

/// The input decoded the way the first byte says; `None` when the decoder refuses it.
fn decode(data: &[u8]) -> Option<SavedLapic> {
    let (&kind, rest) = data.split_first()?;
    match kind % 3 {
        0 => {
            let state = LapicState::decode(rest).ok()?;
            Some(SavedLapic::new(state, KvmConventions::CANONICAL, 0))
        }
        1 => postcard::from_bytes(rest).ok(),
        _ => serde_json::from_slice(rest).ok(),
    }
}

/// A vCPU that has never run or held any state, with the state's id (a fresh VM when the
/// current one is used up or already has that id).
fn fresh_vcpu(kvm: &Kvm, cpuid: &kvm_bindings::CpuId, d: &mut Dest, id: u32) -> Option<VcpuFd> {
    if d.used >= VCPUS_PER_VM {
        d.vm = irqchip_vm(kvm, d.ids32)?;
        d.used = 0;
    }
    d.used += 1;
    let fd = d.vm.create_vcpu(u64::from(id)).ok().or_else(|| {
        d.vm = irqchip_vm(kvm, d.ids32)?;
        d.used = 1;
        d.vm.create_vcpu(u64::from(id)).ok()
    })?;
    fd.set_cpuid2(cpuid).ok()?;
    Some(fd)
}

fuzz_target!(|data: &[u8]| {
    let Some(saved) = decode(data) else { return };
    let state = *saved.state();
    let _ = state.validate(&KvmConventions::CANONICAL);
    let _ = saved.check_compatible(&KvmConventions::CANONICAL);
    // KVM limits vCPU ids; an invalid APIC base cannot be installed at all.
    if state.vcpu_id() >= 1024 || state.apic_base().mode() == ApicMode::Invalid {
        return;
    }
    ENV.with(|e| {
        let mut e = e.borrow_mut();
        let Some(env) = e.as_mut() else { return };
        // The id format: one more bit of the first byte.
        let d = &mut env.vms[usize::from(data[0] / 3 % 2)];
        let Some(fd) = fresh_vcpu(&env.kvm, &env.cpuid, d, state.vcpu_id()) else {
            return;
        };
        let Ok(mut sregs) = fd.get_sregs() else { return };
        sregs.apic_base = state.apic_base().0;
        if fd.set_sregs(&sregs).is_err() {
            return;
        }
        let Ok(before) = fd.get_lapic() else { return };
        let conv = d.conv;
        let result = restore_saved(&fd, state.vcpu_id(), &saved, &conv, Loss::Refuse);
        // Once each, so a run's log shows both paths reach KVM.
        static RESTORED: Once = Once::new();
        static REFUSED: Once = Once::new();
        match &result {
            Ok(()) => RESTORED.call_once(|| eprintln!("lapic_restore: a restore into KVM succeeded")),
            Err(e) => REFUSED.call_once(|| eprintln!("lapic_restore: a restore was refused: {e}")),
        }
        match result {
            Err(e) => {
                let after = fd.get_lapic().expect("KVM_GET_LAPIC");
                assert!(
                    LapicPage::from(after) == LapicPage::from(before),
                    "a refused restore ({e}) changed the vCPU"
                );
            }
            Ok(()) => {
                // Read back in canonical form: in x2APIC mode the id is the vCPU's own.
                let back = lapic_state::kvm::save(&fd, state.vcpu_id(), &conv).expect("save after restore");
                if state.apic_base().mode() == ApicMode::X2Apic {
                    assert_eq!(
                        back.page().reg(regs::ID),
                        state.vcpu_id(),
                        "x2APIC id after restore"
                    );
                }
            }
        }
    });
});
