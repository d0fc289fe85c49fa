// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Move one vCPU's LAPIC between two KVM VMs whose conventions differ, with lapic-state alone
//! doing the LAPIC work: the source VM uses legacy x2APIC ids (`id << 24`), the destination
//! 32-bit ids. A third VM, whose CPUID lacks the TSC-deadline timer the guest's timer uses, is
//! refused by `check_compatible` with the reason, and its vCPU is left untouched.
//!
//! `cargo run -p lapic-state --features kvm --example migrate_lapic` (needs `/dev/kvm`).

use kvm_bindings::{kvm_enable_cap, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use lapic_state::kvm::{restore_saved, save, KvmLapicError};
use lapic_state::{regs, ApicBase, KvmConventions, LapicPage, Loss, SavedLapic};

const VCPU: u32 = 5;
const X2APIC: u64 = ApicBase::DEFAULT_ADDRESS | ApicBase::ENABLE | ApicBase::EXTD;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// A VM with an in-kernel irqchip and vCPU `VCPU` in x2APIC mode, its conventions detected.
fn vm(kvm: &Kvm, ids_32bit: bool, tsc_deadline: bool) -> Result<(VmFd, VcpuFd, KvmConventions)> {
    let vm = kvm.create_vm()?;
    vm.create_irq_chip()?;
    if ids_32bit {
        vm.enable_cap(&kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X2APIC_API,
            args: [u64::from(kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS), 0, 0, 0],
            ..Default::default()
        })?;
    }
    let vcpu = vm.create_vcpu(u64::from(VCPU))?;
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        e.ecx |= 1 << 21; // x2APIC
        if tsc_deadline {
            e.ecx |= 1 << 24;
        } else {
            e.ecx &= !(1 << 24);
        }
    }
    vcpu.set_cpuid2(&cpuid)?;
    // The APIC base before the LAPIC, as every restore must (KVM reads the blob by mode).
    let mut sregs = vcpu.get_sregs()?;
    sregs.apic_base = X2APIC;
    vcpu.set_sregs(&sregs)?;
    let conv = KvmConventions::detect(kvm, &vcpu, ids_32bit)?;
    Ok((vm, vcpu, conv))
}

fn id_word(vcpu: &VcpuFd) -> Result<u32> {
    Ok(LapicPage::from(vcpu.get_lapic()?).reg(regs::ID))
}

fn main() -> Result<()> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            println!("SKIP: /dev/kvm is not usable ({e})");
            return Ok(());
        }
    };
    // Source: legacy ids; the guest has its APIC on, a TPR, and its timer in TSC-deadline mode.
    let (_src_vm, src, src_conv) = vm(&kvm, false, true)?;
    let mut blob = src.get_lapic()?;
    {
        let p = LapicPage::view_mut(&mut blob);
        p.set_reg(regs::SPIV, 0x1ff);
        p.set_reg(regs::TPR, 0x20);
        p.set_reg(regs::LVT_TIMER, (2 << 17) | 0xec);
    }
    src.set_lapic(&blob)?;
    let saved = SavedLapic::new(save(&src, VCPU, &src_conv)?, src_conv, 0);
    println!(
        "source:      32-bit ids {}, ID word {:#x}",
        src_conv.x2apic_32bit_ids,
        id_word(&src)?
    );

    // Destination: 32-bit ids. The canonical state absorbs the difference.
    let (_dst_vm, dst, dst_conv) = vm(&kvm, true, true)?;
    restore_saved(&dst, VCPU, &saved, &dst_conv, Loss::Refuse)?;
    let back = save(&dst, VCPU, &dst_conv)?;
    println!(
        "destination: 32-bit ids {}, ID word {:#x}",
        dst_conv.x2apic_32bit_ids,
        id_word(&dst)?
    );
    for (name, r) in [
        ("SPIV", regs::SPIV),
        ("TPR", regs::TPR),
        ("LVT timer", regs::LVT_TIMER),
    ] {
        let (a, b) = (saved.state().page().reg(r), back.page().reg(r));
        println!("  {name:<9} {a:#010x} -> {b:#010x}");
        if a != b {
            return Err(format!("{name} changed in the move").into());
        }
    }

    // A destination without the TSC-deadline timer: refused, and nothing written.
    let (_bad_vm, bad, bad_conv) = vm(&kvm, true, false)?;
    let before = bad.get_lapic()?;
    match restore_saved(&bad, VCPU, &saved, &bad_conv, Loss::Refuse) {
        Err(KvmLapicError::Incompatible(why)) => println!("refused:     {why}"),
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }
    if bad.get_lapic()? != before {
        return Err("the refused restore changed the vCPU".into());
    }
    println!("ok: moved across id formats; the lossy restore was refused and wrote nothing");
    Ok(())
}
