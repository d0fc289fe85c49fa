// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Save and restore of one vCPU, in the one order every KVM constraint allows.

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use lapic_state::timer::{deadline_to_save, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use lapic_state::{ApicBase, KvmConventions, LapicState};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// IA32_APIC_BASE: restored through SREGS, never through the MSR list (a second write after
/// `KVM_SET_LAPIC` with another mode would rewrite the x2APIC ID and LDR).
const MSR_IA32_APICBASE: u32 = 0x1b;
/// IA32_MTRR_DEF_TYPE: enable bit 11 and the default memory type in bits 0-7.
pub(crate) const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back: what firmware leaves for the OS on a machine whose
/// RAM is all write-back. KVM's power-on value is 0 (MTRRs off, everything uncachable), which
/// makes Linux skip its PAT setup ("MTRRs disabled, skipping PAT initialization").
pub(crate) const MTRR_DEF_TYPE_WB: u64 = (1 << 11) | 6;

/// Everything KVM keeps about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// KVM vCPU id (the APIC id).
    pub vcpu_id: u32,
    /// CPUID as set on the vCPU.
    pub cpuid: CpuId,
    /// MP state (RUNNABLE, HALTED, UNINITIALIZED, INIT_RECEIVED, ...), exactly as KVM had it.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// System registers (with the APIC base and CR8).
    pub sregs: kvm_sregs,
    /// Guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// XCRs.
    pub xcrs: kvm_xcrs,
    /// XSAVE area.
    pub xsave: kvm_xsave,
    /// LAPIC, normalised (convention-free).
    pub lapic: LapicState,
    /// MSRs (IA32_TSC included; APIC base and TSC deadline excluded).
    pub msrs: Msrs,
    /// IA32_TSC_DEADLINE (with the zero-deadline hazard handled at save).
    pub tsc_deadline: u64,
    /// Pending exceptions, interrupts, NMI, SMI, latched INIT, SIPI vector.
    pub vcpu_events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The MTRRs: `KVM_GET_MSR_INDEX_LIST` leaves them out, yet KVM keeps them per vCPU and a
/// guest (Linux's PAT setup) reads them back: default type, the fixed ranges, and the
/// variable ranges (KVM offers 8 pairs from 0x200).
const MTRR_MSRS: [u32; 28] = [
    MSR_MTRR_DEF_TYPE,
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207,
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f,
];

/// The MSRs worth saving on this host: KVM's index list and the MTRRs, without the APIC base
/// and the TSC deadline (both restored separately), keeping only those `vcpu` can read.
pub fn msr_list(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let all = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut candidates: Vec<u32> = all.as_slice().to_vec();
    candidates.extend(MTRR_MSRS.iter().filter(|m| !all.as_slice().contains(m)));
    let mut out = Vec::new();
    for index in candidates {
        if index == MSR_IA32_APICBASE || index == MSR_IA32_TSC_DEADLINE {
            continue;
        }
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| Error::Msrs("building the MSR probe"))?;
        if vcpu.get_msrs(&mut one).map_err(ioctl("KVM_GET_MSRS"))? == 1 {
            out.push(index);
        }
    }
    Ok(out)
}

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::Msrs("too many MSRs"))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
    if n != entries.len() {
        return Err(Error::MsrCount {
            what: "KVM_GET_MSRS",
            done: n,
            wanted: entries.len(),
        });
    }
    Ok(msrs)
}

/// Save `vcpu` (which must be out of `KVM_RUN`, with any PIO/MMIO completed).
///
/// `cpuid` is the CPUID the VMM set on this vCPU. It is saved as given, not read back with
/// `KVM_GET_CPUID2`: KVM forbids changing CPUID after the first `KVM_RUN`, so what was set is
/// the VM's CPU model, while some KVM backends (PVM) answer `KVM_GET_CPUID2` with bits that
/// were never set (AVX, AVX-512, XSAVE, ...) and without some leaves. Saving those would make
/// the snapshot claim features the VM was never given, and a destination's compatibility
/// check would compare the wrong thing.
pub fn save_vcpu(
    vcpu: &VcpuFd,
    vcpu_id: u32,
    cpuid: &CpuId,
    msrs: &[u32],
    conv: &KvmConventions,
) -> Result<VcpuState> {
    // MP state first: KVM_GET_MP_STATE processes pending INIT/SIPI and may change CS/RIP.
    let mp_state = vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
    let blob = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let lapic =
        LapicState::normalise(&blob, vcpu_id, ApicBase(sregs.apic_base), conv).map_err(Error::Lapic)?;
    let msr_vals = read_msrs(vcpu, msrs)?;
    let dl = read_msrs(vcpu, &[MSR_IA32_TSC_DEADLINE, MSR_IA32_TSC])?;
    let (reported, tsc) = (dl.as_slice()[0].data, dl.as_slice()[1].data);
    // KVM reports 0 when the deadline fired but was not injected yet: keep the tick.
    let tsc_deadline = deadline_to_save(&lapic.page, conv, reported, tsc);
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let cpuid = cpuid.clone();
    // VCPU_EVENTS last: it reflects pending events as of the end of the save.
    let vcpu_events = vcpu.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        vcpu_id,
        cpuid,
        mp_state,
        regs,
        sregs,
        tsc_khz,
        xcrs,
        xsave,
        lapic,
        msrs: msr_vals,
        tsc_deadline,
        vcpu_events,
        debugregs,
    })
}

/// Restore `state` into `vcpu` (a vCPU that has never run, created with the same id).
/// `tsc` overrides the saved IA32_TSC (pass the same value to every vCPU so their offsets are
/// equal).
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState, conv: &KvmConventions, tsc: Option<u64>) -> Result<()> {
    // CPUID first: it decides x2APIC legality, the timer mode mask and the LVT count.
    vcpu.set_cpuid2(&state.cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    // SREGS before the LAPIC: it installs the APIC base (KVM reads the blob per that mode)
    // and CR8, whose TPR bits the LAPIC then completes.
    vcpu.set_sregs(&state.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    // TSC frequency before anything that depends on the guest TSC.
    if let Some(khz) = state.tsc_khz {
        if let Err(e) = vcpu.set_tsc_khz(khz) {
            log::warn!(
                "vCPU {}: keeping the host TSC frequency, KVM_SET_TSC_KHZ({khz}) failed: {e}",
                state.vcpu_id
            );
        }
    }
    // REGS before VCPU_EVENTS: setting REGS clears pending exceptions.
    vcpu.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    // SAFETY: the XSAVE area came from KVM_GET_XSAVE on a vCPU of the same kind: the 4 KiB
    // legacy area, all of it unless the VMM granted dynamic features (AMX) that need XSAVE2.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    // LAPIC after SREGS (APIC base) and before the MSRs (TSC deadline needs its LVT mode).
    lapic_state::kvm::restore(vcpu, state.vcpu_id, &state.lapic, conv).map_err(Error::LapicRestore)?;
    // MSRs: IA32_TSC first, the rest, and the TSC deadline last (compared with the TSC).
    let mut entries: Vec<kvm_msr_entry> = Vec::with_capacity(state.msrs.as_slice().len() + 1);
    let saved_tsc = state
        .msrs
        .as_slice()
        .iter()
        .find(|e| e.index == MSR_IA32_TSC)
        .map(|e| e.data);
    if let Some(t) = tsc.or(saved_tsc) {
        entries.push(kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: t,
            ..Default::default()
        });
    }
    // A state saved before MTRRs were saved had KVM's power-on MTRRs (off), not the default
    // a new vCPU gets here: restore that.
    if !state.msrs.as_slice().iter().any(|e| e.index == MSR_MTRR_DEF_TYPE) {
        entries.push(kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            ..Default::default()
        });
    }
    entries.extend(
        state
            .msrs
            .as_slice()
            .iter()
            .filter(|e| e.index != MSR_IA32_TSC)
            .copied(),
    );
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Msrs("too many MSRs"))?;
    let n = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(Error::MsrCount {
            what: "KVM_SET_MSRS",
            done: n,
            wanted: entries.len(),
        });
    }
    let dl = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC_DEADLINE,
        data: state.tsc_deadline,
        ..Default::default()
    }])
    .map_err(|_| Error::Msrs("TSC deadline"))?;
    vcpu.set_msrs(&dl).map_err(ioctl("KVM_SET_MSRS(TSC_DEADLINE)"))?;
    // VCPU_EVENTS after REGS, before MP_STATE (older kernels check INIT_RECEIVED against it).
    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    // MP_STATE exactly as saved: HALTED stays halted, UNINITIALIZED and INIT_RECEIVED stay.
    vcpu.set_mp_state(state.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    Ok(())
}
