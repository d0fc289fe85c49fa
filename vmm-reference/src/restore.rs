// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Taking a running VM's state apart and putting it together on a new KVM VM: capture (vCPUs,
//! irqchip, PIT, clock), the host checks a restore needs, the VM a migration destination
//! prepares ahead of time, and the ordered restore of KVM VM state and vCPUs.

use kvm_ioctls::{Cap, Kvm, VmFd};
use lapic_state::{KvmConventions, SavedLapic};
use vcpu_manager::{Topology, TscPolicy, VcpuManager};

use crate::boot::GuestMemory;
use crate::error::{kvm_err, VmmError};
use crate::machine::{check_caps, create_kvm_vm, host_supported, open_kvm};
use crate::snapshot::{HostTsc, KvmVmState, SavedVm};

/// A KVM VM created ahead of a restore for RAM `mem`, with this host's LAPIC conventions
/// probed: what a migration destination builds while pages still arrive.
pub struct Prepared {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) conv: Option<KvmConventions>,
    pub(crate) topology: Topology,
}

impl Prepared {
    /// Create the VM (irqchip, PIT, x2APIC API as `topology` needs, `mem` registered) and probe
    /// the LAPIC conventions on a scratch vCPU configured like CPU 0 will be.
    pub fn new(topology: Topology, mem: &GuestMemory) -> Result<Prepared, VmmError> {
        let kvm = open_kvm()?;
        check_caps(&kvm)?;
        let vm = create_kvm_vm(&kvm, &topology, mem)?;
        let scratch = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        scratch.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let fd = scratch.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&host_cpuid(&kvm, &topology)?)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        let conv = detect_conventions(&kvm, &fd, &topology)?;
        Ok(Prepared {
            kvm,
            vm,
            conv: Some(conv),
            topology,
        })
    }
}

/// The most CPU 0 of a `topology` VM may have on this host (for compatibility checks).
pub fn host_cpuid(kvm: &Kvm, topology: &Topology) -> Result<kvm_bindings::CpuId, VmmError> {
    Ok(vcpu_manager::cpuid::for_vcpu(&host_supported(kvm)?, topology, 0))
}

/// This host's guest TSC rate (read from a scratch vCPU) and whether KVM can scale it.
pub fn host_tsc(kvm: &Kvm) -> Result<HostTsc, VmmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM (TSC probe)"))?;
    let fd = vm
        .create_vcpu(0)
        .map_err(kvm_err("KVM_CREATE_VCPU (TSC probe)"))?;
    Ok(HostTsc {
        khz: fd.get_tsc_khz().ok(),
        scaling: kvm.check_extension(Cap::TscControl),
    })
}

/// Check that this host can run `saved` (CPU count, vendor, CPU features, TSC, memory).
pub fn check_compat(kvm: &Kvm, saved: &SavedVm) -> Result<(), VmmError> {
    let topology = Topology::new(saved.vm.max_vcpus);
    let cpuid = host_cpuid(kvm, &topology)?;
    saved
        .compat()
        .check(kvm.get_max_vcpus() as u32, &cpuid, host_tsc(kvm)?)
        .map_err(VmmError::Snapshot)
}

/// The LAPIC conventions this host's KVM uses (id format, ICR layout, LVTs), probed on `fd`.
pub(crate) fn detect_conventions(
    kvm: &Kvm,
    fd: &kvm_ioctls::VcpuFd,
    topology: &Topology,
) -> Result<KvmConventions, VmmError> {
    KvmConventions::detect(kvm, fd, topology.needs_x2apic()).map_err(|e| VmmError::Io {
        what: e.to_string(),
        source: std::io::Error::other("LAPIC conventions"),
    })
}

/// Save every running vCPU (on its own thread, VM paused) and then the VM-wide KVM state.
/// Returns the states and the per-vCPU save times in microseconds.
#[allow(clippy::type_complexity)]
pub(crate) fn capture(
    vcpus: &VcpuManager,
    vm: &VmFd,
    msrs: &[u32],
) -> Result<(Vec<(u32, vcpu_manager::VcpuState)>, KvmVmState, Vec<f64>), String> {
    let mut save_us = Vec::new();
    let mut states = Vec::new();
    let opts = vcpus.save_options(msrs.to_vec());
    for index in vcpus.running() {
        let t = std::time::Instant::now();
        let st = vcpus
            .save(index, &opts)
            .map_err(|e| format!("saving vCPU {index}: {e}"))?;
        save_us.push(t.elapsed().as_secs_f64() * 1e6);
        states.push((index, st));
    }
    // VM-wide state after the vCPUs are quiet: 8259s, IOAPIC, PIT, clock.
    let mut irqchips = Vec::new();
    for chip_id in [
        kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
        kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
        kvm_bindings::KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_bindings::kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(|e| format!("KVM_GET_IRQCHIP: {e}"))?;
        irqchips.push(c);
    }
    let pit = vm.get_pit2().map_err(|e| format!("KVM_GET_PIT2: {e}"))?;
    let clock = vm.get_clock().map_err(|e| format!("KVM_GET_CLOCK: {e}"))?.clock;
    Ok((states, KvmVmState { irqchips, pit, clock }, save_us))
}

/// Put the irqchip, PIT and clock into a new VM, before any vCPU runs.
fn restore_kvm_vm_state(vm: &VmFd, st: &KvmVmState) -> Result<(), String> {
    for c in &st.irqchips {
        vm.set_irqchip(c).map_err(|e| format!("KVM_SET_IRQCHIP: {e}"))?;
    }
    vm.set_pit2(&st.pit).map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
    // The VM clock before any vCPU runs, so kvmclock readers see no jump backwards.
    vm.set_clock(&kvm_bindings::kvm_clock_data {
        clock: st.clock,
        ..Default::default()
    })
    .map_err(|e| format!("KVM_SET_CLOCK: {e}"))
}

/// The one restore path, for a snapshot, a migration and a rebuild alike: the VM-wide KVM
/// state into `vm` first, then every saved vCPU with its saved TSC rate, started paused.
/// Returns the per-vCPU restore times in microseconds.
pub(crate) fn restore_machine(
    kvm: &Kvm,
    vm: &VmFd,
    vcpus: &mut VcpuManager,
    states: &[(u32, vcpu_manager::VcpuState)],
    kvm_state: &KvmVmState,
    conv: Conventions,
) -> Result<Vec<f64>, String> {
    // The irqchip, PIT and clock before any vCPU or interrupt line exists.
    restore_kvm_vm_state(vm, kvm_state)?;
    // The saved TSC rate, for the restored vCPUs and any hot-added later.
    vcpus.set_tsc_khz(states.first().and_then(|(_, st)| st.tsc_khz));
    restore_vcpus(kvm, vm, vcpus, states, conv)
}

/// The LAPIC conventions of a restore: those the state was saved under, and the
/// destination's when probed ahead of time (else they are detected on the first vCPU).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Conventions {
    /// The source's.
    pub source: KvmConventions,
    /// The destination's, if known.
    pub destination: Option<KvmConventions>,
}

/// Create every saved vCPU with its original id and restore it (vcpu-manager's ordered
/// restore), started paused. Returns the per-vCPU restore times in microseconds.
fn restore_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    vcpus: &mut VcpuManager,
    states: &[(u32, vcpu_manager::VcpuState)],
    conv: Conventions,
) -> Result<Vec<f64>, String> {
    // One IA32_TSC for all vCPUs, so their TSC offsets are equal after the restore.
    let tsc = states
        .first()
        .and_then(|(_, s)| s.msrs.as_slice().iter().find(|e| e.index == 0x10).map(|e| e.data));
    let topology = vcpus.topology();
    if let Some(c) = conv.destination {
        vcpus.set_conventions(c);
    }
    let mut detected = conv.destination.is_some();
    let mut restore_us = Vec::new();
    for (index, st) in states {
        let t = std::time::Instant::now();
        let fd = vcpus
            .prepare(vm, *index)
            .map_err(|e| format!("creating vCPU {index}: {e}"))?;
        if !detected {
            // The destination's own conventions: the saved LAPICs are canonical.
            let conv = detect_conventions(kvm, &fd, &topology).map_err(|e| e.to_string())?;
            vcpus.set_conventions(conv);
            detected = true;
        }
        // Refused, not restored, if this KVM would lose what the guest's LAPIC uses.
        SavedLapic::new(st.lapic, conv.source, st.tsc_deadline)
            .check_compatible(&vcpus.conventions())
            .map_err(|e| format!("vCPU {index}: {e}"))?;
        let opts = vcpus.restore_options(tsc.map_or(TscPolicy::Saved, TscPolicy::Value));
        vcpu_manager::restore_vcpu(&fd, st, &opts).map_err(|e| format!("restoring vCPU {index}: {e}"))?;
        vcpus.record_cpuid(*index, st.cpuid.clone());
        restore_us.push(t.elapsed().as_secs_f64() * 1e6);
        vcpus
            .start_paused(*index, fd)
            .map_err(|e| format!("starting vCPU {index}: {e}"))?;
    }
    Ok(restore_us)
}
