// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `cargo bench -p lapic-state --features kvm`
//!
//! 1. normalise + validate + encode + decode per blob, on one core (target: >= 2 million/s).
//! 2. Per-vCPU LAPIC save (`KVM_GET_SREGS` + `KVM_GET_LAPIC` + normalise) and restore
//!    (validate + `KVM_GET_SREGS` + `KVM_SET_LAPIC`) through the real KVM, when usable.

use std::hint::black_box;
use std::time::Instant;

use lapic_state::{regs, ApicBase, IcrLayout, KvmConventions, LapicPage, LapicState};

fn blobs() -> Vec<(u32, ApicBase, LapicPage)> {
    let mut v = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..64u32 {
        let mut p = LapicPage::power_on(i, i == 0, &KvmConventions::CANONICAL);
        p.set_reg(regs::SPIV, 0x1ff);
        p.set_reg(regs::LVT_TIMER, (1 << 17) | 0xec);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.set_reg(regs::TMICT, (x as u32) >> 8);
        p.set_reg(regs::TPR, (x >> 40) as u32 & 0xff);
        let x2 = i % 2 == 0;
        let base = ApicBase(0xfee0_0800 | if x2 { 0x400 } else { 0 } | if i == 0 { 0x100 } else { 0 });
        if x2 {
            p.set_reg(regs::ID, i);
            p.set_reg(regs::LDR, lapic_state::x2apic_ldr(i));
        }
        v.push((i, base, p));
    }
    v
}

fn pipeline_rate() -> f64 {
    let set = blobs();
    let conv = KvmConventions {
        icr: IcrLayout::Merged,
        ..KvmConventions::CANONICAL
    };
    let n = 4_000_000u32;
    let start = Instant::now();
    let mut acc = 0u64;
    for i in 0..n {
        let (id, base, page) = &set[(i % 64) as usize];
        let s = LapicState::normalise(page, *id, *base, &conv).expect("normalise");
        acc += s.validate(&conv).len() as u64;
        let e = s.encode();
        let d = LapicState::decode(black_box(&e)).expect("decode");
        acc += u64::from(d.vcpu_id());
    }
    black_box(acc);
    f64::from(n) / start.elapsed().as_secs_f64()
}

#[cfg(feature = "kvm")]
fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[cfg(feature = "kvm")]
fn kvm_rows() -> Vec<(String, f64, f64)> {
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        return vec![];
    };
    let vm = kvm.create_vm().expect("vm");
    vm.create_irq_chip().expect("irqchip");
    let vcpu = vm.create_vcpu(1).expect("vcpu");
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("cpuid");
    vcpu.set_cpuid2(&cpuid).expect("cpuid");
    let conv = KvmConventions::detect(&kvm, &vcpu, false).expect("detect");
    let (mut save, mut restore) = (Vec::new(), Vec::new());
    for _ in 0..2000 {
        let t = Instant::now();
        let s = lapic_state::kvm::save(&vcpu, 1, &conv).expect("save");
        save.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        lapic_state::kvm::restore(&vcpu, 1, &s, &conv).expect("restore");
        restore.push(t.elapsed().as_secs_f64() * 1e6);
    }
    vec![
        (
            "per-vCPU LAPIC save via KVM (us)".into(),
            pct(&mut save, 0.5),
            pct(&mut save, 0.99),
        ),
        (
            "per-vCPU LAPIC restore via KVM (us)".into(),
            pct(&mut restore, 0.5),
            pct(&mut restore, 0.99),
        ),
    ]
}

#[cfg(not(feature = "kvm"))]
fn kvm_rows() -> Vec<(String, f64, f64)> {
    vec![]
}

fn main() {
    let rate = pipeline_rate();
    println!("\nlapic-state benchmark");
    println!("{:<46} {:>14}", "metric", "value");
    println!(
        "{:<46} {:>14.0}   (target >= 2,000,000)",
        "normalise+validate+encode+decode blobs/s", rate
    );
    let rows = kvm_rows();
    if rows.is_empty() {
        println!("(KVM rows skipped: build with --features kvm and a usable /dev/kvm)");
    }
    println!("{:<46} {:>9} {:>9}", "", "median", "p99");
    for (name, med, p99) in rows {
        println!("{name:<46} {med:>9.1} {p99:>9.1}");
    }
}
