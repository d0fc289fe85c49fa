// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Print the LAPIC conventions this host's KVM follows, for both x2APIC id formats:
//! `cargo run -p lapic-state --features kvm --example detect`.

use kvm_ioctls::Kvm;
use lapic_state::KvmConventions;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    vm.create_irq_chip()?;
    let vcpu = vm.create_vcpu(0)?;
    let uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel {}", uname.trim());
    for ids32 in [false, true] {
        let conv = KvmConventions::detect(&kvm, &vcpu, ids32)?;
        println!("32-bit x2APIC ids {ids32}: {conv:?} (LVR {:#010x})", conv.lvr());
    }
    Ok(())
}
