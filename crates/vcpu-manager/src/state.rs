// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Save and restore of one vCPU, in the one order every KVM constraint allows.

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, Xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use lapic_state::timer::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use lapic_state::{ApicBase, LapicPage, LapicState};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};

use crate::options::{get_nested_state, set_nested_state, NestedState, RestoreOptions, SaveOptions};
use crate::{Error, Result};

/// Decode a KVM structure from exactly its own number of bytes. kvm-bindings' decoder pads a
/// short byte string with zeros and cuts a long one, so a truncated `regs` inside an
/// otherwise valid snapshot would restore a vCPU with zeroed registers and hang it.
pub fn exact_len<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> std::result::Result<T, D::Error> {
    let bytes = Vec::<u8>::deserialize(d)?;
    let want = std::mem::size_of::<T>();
    if bytes.len() != want {
        return Err(D::Error::invalid_length(
            bytes.len(),
            &format!("{want} bytes of {}", std::any::type_name::<T>()).as_str(),
        ));
    }
    T::deserialize(serde::de::value::BytesDeserializer::<D::Error>::new(&bytes))
}

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
    #[serde(deserialize_with = "exact_len")]
    pub mp_state: kvm_mp_state,
    /// General registers.
    #[serde(deserialize_with = "exact_len")]
    pub regs: kvm_regs,
    /// System registers (with the APIC base and CR8).
    #[serde(deserialize_with = "exact_len")]
    pub sregs: kvm_sregs,
    /// Guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// XCRs.
    #[serde(deserialize_with = "exact_len")]
    pub xcrs: kvm_xcrs,
    /// XSAVE area: its first 4 KiB (what `KVM_GET_XSAVE` returns).
    #[serde(deserialize_with = "exact_len")]
    pub xsave: kvm_xsave,
    /// The XSAVE area beyond 4 KiB, from `KVM_GET_XSAVE2`: the state of dynamically enabled
    /// features (AMX tiles). Empty when KVM's area is 4 KiB, which is every VM whose VMM did
    /// not request such features (`ARCH_REQ_XCOMP_GUEST_PERM`); left out of the encoding then,
    /// so states without it decode as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xsave_ext: Vec<u32>,
    /// LAPIC, normalised (convention-free).
    pub lapic: LapicState,
    /// MSRs (IA32_TSC included; APIC base and TSC deadline excluded).
    pub msrs: Msrs,
    /// IA32_TSC_DEADLINE (with the zero-deadline hazard handled at save).
    pub tsc_deadline: u64,
    /// Pending exceptions, interrupts, NMI, SMI, latched INIT, SIPI vector.
    #[serde(deserialize_with = "exact_len")]
    pub vcpu_events: kvm_vcpu_events,
    /// Debug registers.
    #[serde(deserialize_with = "exact_len")]
    pub debugregs: kvm_debugregs,
    /// Nested virtualization state, if it was asked for ([`SaveOptions::nested_state`]) and
    /// KVM has it. Left out of the encoding when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_state: Option<NestedState>,
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
///
/// `opts` says which MSRs, the VM's LAPIC conventions and XSAVE size, and whether to save
/// nested virtualization state.
pub fn save_vcpu(vcpu: &VcpuFd, vcpu_id: u32, cpuid: &CpuId, opts: &SaveOptions) -> Result<VcpuState> {
    let (msrs, conv, xsave_size) = (&opts.msrs, &opts.conventions, opts.xsave_size);
    // MP state first: KVM_GET_MP_STATE processes pending INIT/SIPI and may change CS/RIP.
    let mp_state = vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let (xsave, xsave_ext) = get_xsave(vcpu, xsave_size)?;
    let xcrs = vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
    let blob = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let lapic = LapicState::normalise(LapicPage::view(&blob), vcpu_id, ApicBase(sregs.apic_base), conv)
        .map_err(Error::Lapic)?;
    let msr_vals = read_msrs(vcpu, msrs)?;
    // As KVM reports it: a fired deadline not yet injected is still there (it fires at once
    // when restored); 0 means disarmed or delivered (lapic_state::timer, rule 3).
    let tsc_deadline = read_msrs(vcpu, &[MSR_IA32_TSC_DEADLINE])?
        .as_slice()
        .first()
        .map_or(0, |e| e.data);
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let nested_state = match opts.nested_state {
        true => get_nested_state(vcpu)?,
        false => None,
    };
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
        xsave_ext,
        lapic,
        msrs: msr_vals,
        tsc_deadline,
        vcpu_events,
        debugregs,
        nested_state,
    })
}

/// Restore `state` into `vcpu` (a vCPU that has never run, created with the same id), with
/// the destination's conventions and XSAVE size and the TSC policy of `opts`.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState, opts: &RestoreOptions) -> Result<()> {
    let (conv, xsave_size) = (&opts.conventions, opts.xsave_size);
    // CPUID first: it decides x2APIC legality, the timer mode mask and the LVT count.
    vcpu.set_cpuid2(&state.cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    // SREGS before the LAPIC: it installs the APIC base (KVM reads the blob per that mode)
    // and CR8, whose TPR bits the LAPIC then completes.
    vcpu.set_sregs(&state.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    // Nested state right after SREGS, which set EFER.SVME/CR4.VMXE that it requires; the
    // VMX capability MSRs first, since KVM refuses to change them (EBUSY) in VMX operation.
    if let Some(n) = &state.nested_state {
        set_msr_list(vcpu, &vmx_setup_msrs(state), "KVM_SET_MSRS(VMX capabilities)")?;
        set_nested_state(vcpu, n)?;
    }
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
    set_xsave(vcpu, &state.xsave, &state.xsave_ext, xsave_size)?;
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
    if let Some(t) = opts.tsc.resolve(saved_tsc) {
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
    // Without the VMX ones already set before the nested state.
    let early = state.nested_state.is_some();
    entries.extend(
        state
            .msrs
            .as_slice()
            .iter()
            .filter(|e| e.index != MSR_IA32_TSC && !(early && is_vmx_setup_msr(e.index)))
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

/// IA32_FEATURE_CONTROL and the VMX capability MSRs (IA32_VMX_BASIC ..= IA32_VMX_VMFUNC):
/// what nested VMX state is checked against. None of them exist on AMD.
fn is_vmx_setup_msr(index: u32) -> bool {
    index == 0x3a || (0x480..=0x491).contains(&index)
}

/// The saved values of [`is_vmx_setup_msr`]'s MSRs.
fn vmx_setup_msrs(state: &VcpuState) -> Vec<kvm_msr_entry> {
    let msrs = state.msrs.as_slice().iter();
    msrs.filter(|e| is_vmx_setup_msr(e.index)).copied().collect()
}

/// Set `entries` (none: nothing to do), all or an error.
fn set_msr_list(vcpu: &VcpuFd, entries: &[kvm_msr_entry], what: &'static str) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(entries).map_err(|_| Error::Msrs("too many MSRs"))?;
    let n = vcpu.set_msrs(&msrs).map_err(ioctl(what))?;
    if n != entries.len() {
        return Err(Error::MsrCount {
            what,
            done: n,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// The legacy XSAVE area: `struct kvm_xsave` without its flexible tail.
pub const XSAVE_LEGACY: usize = std::mem::size_of::<kvm_xsave>();

/// The size in bytes of the XSAVE area KVM uses for the vCPUs of `vm`, from
/// `KVM_CAP_XSAVE2` (Linux 5.17+): 4 KiB, or more once the VMM was granted dynamic features
/// such as AMX tiles. `None` where KVM lacks the capability: only the legacy 4 KiB
/// `KVM_GET_XSAVE`/`KVM_SET_XSAVE` exist there.
pub fn xsave_size(vm: &VmFd) -> Option<usize> {
    usize::try_from(vm.check_extension_int(Cap::Xsave2))
        .ok()
        .filter(|&n| n > 0)
        .map(|n| n.max(XSAVE_LEGACY))
}

/// The vCPU's XSAVE area, split into the legacy 4 KiB and the rest: with `KVM_GET_XSAVE2`
/// where KVM has it (the legacy ioctl refuses a vCPU whose area is larger).
fn get_xsave(vcpu: &VcpuFd, size: Option<usize>) -> Result<(kvm_xsave, Vec<u32>)> {
    let Some(size) = size else {
        return Ok((vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?, Vec::new()));
    };
    let mut buf = xsave_buffer(size)?;
    // SAFETY: `buf` holds `size` bytes, the size KVM_CAP_XSAVE2 gave for this VM, which is
    // what KVM_GET_XSAVE2 writes.
    unsafe { vcpu.get_xsave2(&mut buf) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
    let region = kvm_xsave {
        region: buf.as_fam_struct_ref().xsave.region,
        ..Default::default()
    };
    Ok((region, buf.as_slice().to_vec()))
}

/// The largest XSAVE area accepted: AMX, the largest component today, makes it ~11 KiB.
pub const XSAVE_MAX: usize = 64 * 1024;

/// A zeroed XSAVE buffer of `size` bytes (the legacy 4 KiB and a tail of u32 words).
fn xsave_buffer(size: usize) -> Result<Xsave> {
    let too_large = Error::Xsave {
        bytes: size,
        room: XSAVE_MAX,
    };
    if size > XSAVE_MAX {
        return Err(too_large);
    }
    Xsave::new((size - XSAVE_LEGACY).div_ceil(4)).map_err(|_| too_large)
}

/// The saved XSAVE tail fitted to a destination tail of `words` u32s: zeros stand for
/// components in their initial state (their XSTATE_BV bits are clear), so a shorter tail is
/// padded; a longer one is cut only where it holds nothing, otherwise the guest would lose
/// state the destination KVM has no room for.
pub fn fit_xsave_tail(saved: &[u32], words: usize) -> Result<Vec<u32>> {
    if saved.len() > words && saved[words..].iter().any(|&w| w != 0) {
        return Err(Error::Xsave {
            bytes: XSAVE_LEGACY + 4 * saved.len(),
            room: XSAVE_LEGACY + 4 * words,
        });
    }
    let mut out = saved[..saved.len().min(words)].to_vec();
    out.resize(words, 0);
    Ok(out)
}

/// Restore the XSAVE area into a buffer of the destination's `size`: KVM_SET_XSAVE reads as
/// many bytes as the vCPU's area has, so a buffer of exactly that size is required.
fn set_xsave(vcpu: &VcpuFd, legacy: &kvm_xsave, tail: &[u32], size: Option<usize>) -> Result<()> {
    let Some(size) = size else {
        fit_xsave_tail(tail, 0)?;
        // SAFETY: without KVM_CAP_XSAVE2 the vCPU's area is the legacy 4 KiB of `kvm_xsave`.
        return unsafe { vcpu.set_xsave(legacy) }.map_err(ioctl("KVM_SET_XSAVE"));
    };
    let mut buf = xsave_buffer(size)?;
    let fitted = fit_xsave_tail(tail, buf.as_slice().len())?;
    // SAFETY: only the fixed-size `region` is written; the length field is left alone.
    unsafe { buf.as_mut_fam_struct() }.xsave.region = legacy.region;
    buf.as_mut_slice().copy_from_slice(&fitted);
    // SAFETY: `buf` holds the `size` bytes KVM_CAP_XSAVE2 gave for this VM, all of which
    // KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave2(&buf) }.map_err(ioctl("KVM_SET_XSAVE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shorter_xsave_tail_is_padded_with_initial_state() {
        assert_eq!(fit_xsave_tail(&[1, 2], 4).ok(), Some(vec![1, 2, 0, 0]));
        assert_eq!(fit_xsave_tail(&[], 3).ok(), Some(vec![0, 0, 0]));
    }

    #[test]
    fn a_longer_xsave_tail_is_cut_only_where_it_is_empty() {
        assert_eq!(fit_xsave_tail(&[7, 0, 0], 1).ok(), Some(vec![7]));
        let e = fit_xsave_tail(&[7, 0, 9], 2).err().map(|e| e.to_string());
        assert!(
            e.as_deref() == Some("an XSAVE area of 4108 bytes does not fit in 4104"),
            "{e:?}"
        );
        assert!(fit_xsave_tail(&[0, 5], 0).is_err());
    }
}
