// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The KVM VM itself: the capabilities the VMM needs, VM creation (in-kernel irqchip and PIT,
//! the PC's GSI routing, the x2APIC API), guest memory slots, and the host's CPU model.

use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vcpu_manager::Topology;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::GuestMemory;
use crate::error::{kvm_err, VmmError};

/// KVM_CAP_X2APIC_API flags: 32-bit x2APIC ids in the LAPIC state, no 0xff broadcast quirk.
const X2APIC_API_FLAGS: u64 = (kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS
    | kvm_bindings::KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK) as u64;
/// TSS area KVM needs for real-mode emulation on Intel (3 pages inside the MMIO gap).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// Open `/dev/kvm`.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(kvm_err("opening /dev/kvm"))
}

/// The KVM capabilities the VMM cannot run without.
pub(crate) fn check_caps(kvm: &Kvm) -> Result<(), VmmError> {
    for cap in [
        Cap::Irqchip,
        Cap::IrqRouting,
        Cap::Irqfd,
        Cap::ImmediateExit,
        Cap::UserMemory,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::Io {
                what: format!("KVM lacks {cap:?}"),
                source: std::io::Error::from(std::io::ErrorKind::Unsupported),
            });
        }
    }
    // Any XSAVE area size is fine: vcpu-manager saves it whole with KVM_GET_XSAVE2 (the
    // part beyond 4 KiB only exists for features such as AMX, which this VMM never requests).
    Ok(())
}

/// The CPU model of a new VM on this host (see `vcpu_manager::cpuid::host_model`).
pub(crate) fn host_model(kvm: &Kvm) -> Result<kvm_bindings::CpuId, VmmError> {
    vcpu_manager::cpuid::host_model(kvm, vcpu_manager::cpuid::Backend::detect())
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// What a VM may have to run on this host (see `vcpu_manager::cpuid::host_supported`).
pub(crate) fn host_supported(kvm: &Kvm) -> Result<kvm_bindings::CpuId, VmmError> {
    vcpu_manager::cpuid::host_supported(kvm, vcpu_manager::cpuid::Backend::detect())
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// The PC's interrupt wiring, as the MADT describes it: ISA IRQ 0 (the PIT) on I/O APIC pin 2
/// (our MADT's interrupt source override, as on every PC), the other ISA IRQs and GSIs 16-23
/// on the pin of their number, IRQs 0-15 also on the 8259s (except 2, the cascade).
/// KVM's default table wires GSI 0 to I/O APIC pin 0, where Linux never looks: its PIT ticks
/// would be lost, its LAPIC timer then fails verification against jiffies, and its clock
/// stops. QEMU installs the same table (`kvm_pc_setup_irq_routing`).
fn pc_gsi_routing() -> Result<KvmIrqRouting, VmmError> {
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut entries = Vec::with_capacity(40);
    for irq in (0..16).filter(|&i| i != 2) {
        let (pic, pin) = if irq < 8 {
            (KVM_IRQCHIP_PIC_MASTER, irq)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, irq - 8)
        };
        entries.push(chip(irq, pic, pin));
    }
    entries.push(chip(0, KVM_IRQCHIP_IOAPIC, 2));
    for gsi in (1..IOAPIC_PINS).filter(|&g| g != 2) {
        entries.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    KvmIrqRouting::from_entries(&entries).map_err(|_| VmmError::Io {
        what: "the GSI routing table".into(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// Pins of KVM's in-kernel I/O APIC.
const IOAPIC_PINS: u32 = 24;

/// A KVM VM with the in-kernel irqchip and PIT, the x2APIC API when APIC ids need it, and
/// `mem` registered. Used at boot and when the VM is rebuilt from saved state.
pub(crate) fn create_kvm_vm(kvm: &Kvm, topology: &Topology, mem: &GuestMemory) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    vm.set_gsi_routing(&pc_gsi_routing()?)
        .map_err(kvm_err("KVM_SET_GSI_ROUTING"))?;
    if topology.needs_x2apic() {
        // APIC ids above 254 only exist with 32-bit x2APIC ids; must precede vCPU creation.
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X2APIC_API,
            args: [X2APIC_API_FLAGS, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP(X2APIC_API)"))?;
    }
    register_memory(&vm, mem, 0)?;
    Ok(vm)
}

/// Register (or re-register with other `flags`, e.g. `KVM_MEM_LOG_DIRTY_PAGES`) every RAM
/// region of `mem` as KVM memory slots 0.. in order.
pub(crate) fn register_memory(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmmError::Io {
                what: format!("guest memory host address: {e}"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which VmInner keeps for as long
        // as any VM fd it created exists (field order in `VmInner`).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pit_is_on_ioapic_pin_2_like_the_madt_says() {
        let table = pc_gsi_routing().expect("routing");
        let entries = table.as_slice();
        let routes: Vec<(u32, u32, u32)> = entries
            .iter()
            .map(|e| {
                assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
                // SAFETY: the type is KVM_IRQ_ROUTING_IRQCHIP, so `irqchip` is the union's variant.
                unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) }
            })
            .collect();
        let ioapic = |gsi: u32| {
            routes
                .iter()
                .find(|r| r.0 == gsi && r.1 == KVM_IRQCHIP_IOAPIC)
                .map(|r| r.2)
        };
        assert_eq!(ioapic(0), Some(2), "ISA IRQ 0 -> GSI 2 (MADT override)");
        assert!(
            routes.iter().all(|r| r.0 != 2),
            "GSI 2 (the cascade) is not routed"
        );
        assert_eq!(
            (ioapic(4), ioapic(9), ioapic(23)),
            (Some(4), Some(9), Some(23)),
            "COM1, SCI"
        );
        assert!(
            routes.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)),
            "PIT on the 8259 too"
        );
        assert_eq!(entries.len(), 15 + 23);
    }
}
