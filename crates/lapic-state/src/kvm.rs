// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! KVM-backed helpers (feature `kvm`): detect conventions, save and restore through ioctls.

use kvm_bindings::{kvm_enable_cap, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::conventions::{IcrLayout, KvmConventions};
use crate::page::{regs, LapicPage};
use crate::state::{LapicError, LapicState};
use crate::{ApicBase, Loss, SavedLapic};

/// Errors of the KVM-backed helpers.
#[derive(Debug, thiserror::Error)]
pub enum KvmLapicError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The state would be refused by KVM (nothing was written to the vCPU).
    #[error("refusing to restore LAPIC state: {0}")]
    Invalid(LapicError),
    /// The vCPU's APIC base differs from the state's: it must be restored first
    /// (KVM_SET_SREGS), because KVM interprets the blob according to the current mode.
    #[error("APIC base of the vCPU is {found:#x}, the state needs {expected:#x}: restore SREGS first")]
    ApicBaseNotRestored {
        /// Base the state was saved with.
        expected: u64,
        /// Base the vCPU has.
        found: u64,
    },
    /// The destination would lose something the guest uses (see [`crate::check_compatible`];
    /// nothing was written to the vCPU).
    #[error("refusing to restore LAPIC state: {0}")]
    Incompatible(crate::Incompatible),
    /// The state belongs to another vCPU id.
    #[error("LAPIC state of vCPU {state} cannot be restored into vCPU {vcpu}")]
    WrongVcpu {
        /// vCPU id in the state.
        state: u32,
        /// vCPU id given.
        vcpu: u32,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmLapicError {
    move |source| KvmLapicError::Ioctl { what, source }
}

const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;

impl KvmConventions {
    /// Detect the conventions of `vcpu`'s VM.
    ///
    /// `x2apic_32bit_ids` is whether the VMM enabled `KVM_CAP_X2APIC_API` with
    /// `KVM_X2APIC_API_USE_32BIT_IDS` on that VM (KVM cannot be asked). LVT count and directed
    /// EOI come from the vCPU's LVR, TSC-deadline from its CPUID (set CPUID first), and the
    /// x2APIC ICR layout is probed on a scratch VM created from `kvm`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let kvm = kvm_ioctls::Kvm::new()?;
    /// let vm = kvm.create_vm()?;
    /// vm.create_irq_chip()?;
    /// let vcpu = vm.create_vcpu(0)?;
    /// // Set the vCPU's CPUID first: TSC-deadline availability is read from it.
    /// let conv = lapic_state::KvmConventions::detect(&kvm, &vcpu, false)?;
    /// println!("{} LVT entries, ICR {:?}", conv.nr_lvt, conv.icr);
    /// # Ok(())
    /// # }
    /// ```
    pub fn detect(kvm: &Kvm, vcpu: &VcpuFd, x2apic_32bit_ids: bool) -> Result<KvmConventions, KvmLapicError> {
        let lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        let lvr = LapicPage::view(&lapic).reg(regs::LVR);
        let tsc_deadline = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map(|c| {
                c.as_slice()
                    .iter()
                    .any(|e| e.function == 1 && e.ecx & CPUID1_ECX_TSC_DEADLINE != 0)
            })
            .unwrap_or(false);
        let icr = probe_icr_layout(kvm)?;
        let x2apic_id_readonly = probe_x2apic_id_readonly(kvm)?;
        Ok(KvmConventions {
            x2apic_32bit_ids,
            icr,
            nr_lvt: 6,
            tsc_deadline,
            directed_eoi: false,
            x2apic_id_readonly,
            // KVM's default; a VMM that sets another per VM says so itself.
            apic_bus_cycle_ns: 1,
        }
        .with_lvr(lvr))
    }
}

/// A scratch VM with one vCPU (id `vcpu_id`) in x2APIC mode, for probing KVM's behaviour;
/// `ids_32bit` enables `KVM_X2APIC_API_USE_32BIT_IDS` on it. The VM goes with the vCPU fd.
fn scratch_x2apic_vcpu(kvm: &Kvm, vcpu_id: u64, ids_32bit: bool) -> Result<VcpuFd, KvmLapicError> {
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    if ids_32bit {
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X2APIC_API,
            args: [u64::from(kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).map_err(ioctl("KVM_ENABLE_CAP(X2APIC_API)"))?;
    }
    let vcpu = vm.create_vcpu(vcpu_id).map_err(ioctl("KVM_CREATE_VCPU"))?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        e.ecx |= 1 << 21; // x2APIC, so the mode switch is legal
    }
    vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    sregs.apic_base = ApicBase::DEFAULT_ADDRESS | ApicBase::ENABLE | ApicBase::EXTD;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    Ok(vcpu)
}

/// Find out whether this host's KVM keeps the x2APIC ICR split (AMD, old kernels) or merged
/// (Intel, Linux ≥ 5.18), on a scratch VM: set ICR2 in x2APIC mode and see whether GET
/// mirrors it at 0x304.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let vm = kvm.create_vm()?;
/// vm.create_irq_chip()?;
/// let vcpu = vm.create_vcpu(0)?;
/// let layout = lapic_state::kvm::probe_icr_layout(&kvm)?;
/// println!("x2APIC ICR is {layout:?} on this host");
/// # let _ = vcpu;
/// # Ok(())
/// # }
/// ```
pub fn probe_icr_layout(kvm: &Kvm) -> Result<IcrLayout, KvmLapicError> {
    let vcpu = scratch_x2apic_vcpu(kvm, 1, true)?;
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    {
        let p = LapicPage::view_mut(&mut lapic);
        p.set_reg(regs::ICR, 0x4f0);
        p.set_reg(regs::ICR2, 0x5a5a_0001);
    }
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    let back = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let hi = LapicPage::view(&back).icr_high_merged();
    Ok(if hi == 0x5a5a_0001 {
        IcrLayout::Merged
    } else {
        IcrLayout::Split
    })
}

/// Find out whether this host's KVM treats the x2APIC id as read-only (Linux ≥ 6.11 and
/// backports), on a scratch VM with legacy ids: set a blob whose ID word names another id and
/// see whether GET reports the vCPU's own id (read-only) or the blob's (older kernels).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let vm = kvm.create_vm()?;
/// vm.create_irq_chip()?;
/// let vcpu = vm.create_vcpu(0)?;
/// if lapic_state::kvm::probe_x2apic_id_readonly(&kvm)? {
///     println!("KVM derives the x2APIC id from the vCPU id (Linux >= 6.11)");
/// }
/// # let _ = vcpu;
/// # Ok(())
/// # }
/// ```
pub fn probe_x2apic_id_readonly(kvm: &Kvm) -> Result<bool, KvmLapicError> {
    let vcpu = scratch_x2apic_vcpu(kvm, 3, false)?;
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    LapicPage::view_mut(&mut lapic).set_reg(regs::ID, 5 << 24);
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    let back = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    Ok(LapicPage::view(&back).reg(regs::ID) == 3 << 24)
}

/// Save vCPU `vcpu_id`'s LAPIC: its APIC base (from SREGS) and page, normalised.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let vm = kvm.create_vm()?;
/// vm.create_irq_chip()?;
/// let vcpu = vm.create_vcpu(0)?;
/// let conv = lapic_state::KvmConventions::detect(&kvm, &vcpu, false)?;
/// let state = lapic_state::kvm::save(&vcpu, 0, &conv)?;
/// let bytes = state.encode(); // versioned, convention-free
/// # let _ = bytes;
/// # Ok(())
/// # }
/// ```
pub fn save(vcpu: &VcpuFd, vcpu_id: u32, conv: &KvmConventions) -> Result<LapicState, KvmLapicError> {
    let base = ApicBase(vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?.apic_base);
    let blob = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    LapicState::normalise(LapicPage::view(&blob), vcpu_id, base, conv).map_err(KvmLapicError::Invalid)
}

/// Restore `state` into vCPU `vcpu_id` under `conv`, atomically: everything KVM could refuse
/// is checked first, and nothing is written unless it will be accepted. (KVM's own
/// `KVM_SET_LAPIC` is not atomic: it applies SPIV before it checks the x2APIC id.) The x2APIC
/// id format is read from the vCPU itself when it shows it (x2APIC mode, vCPU id not 0), so
/// a wrong `conv.x2apic_32bit_ids` cannot break that promise.
///
/// The vCPU's APIC base must already equal the state's (restore SREGS first). TSC-deadline
/// and IA32_TSC MSRs must be written after this call; see [`crate::timer`].
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let vm = kvm.create_vm()?;
/// vm.create_irq_chip()?;
/// let vcpu = vm.create_vcpu(0)?;
/// let conv = lapic_state::KvmConventions::detect(&kvm, &vcpu, false)?;
/// let state = lapic_state::kvm::save(&vcpu, 0, &conv)?;
/// // On the destination: KVM_SET_SREGS with state.apic_base() first, then:
/// lapic_state::kvm::restore(&vcpu, 0, &state, &conv)?;
/// # Ok(())
/// # }
/// ```
pub fn restore(
    vcpu: &VcpuFd,
    vcpu_id: u32,
    state: &LapicState,
    conv: &KvmConventions,
) -> Result<(), KvmLapicError> {
    if state.vcpu_id() != vcpu_id {
        return Err(KvmLapicError::WrongVcpu {
            state: state.vcpu_id(),
            vcpu: vcpu_id,
        });
    }
    let found = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?.apic_base;
    if found != state.apic_base().0 {
        return Err(KvmLapicError::ApicBaseNotRestored {
            expected: state.apic_base().0,
            found,
        });
    }
    // The id format the VM really uses, not the caller's word for it: a wrong one makes KVM
    // refuse the ID word after it has applied SPIV (a failed restore that changed the vCPU).
    let conv = &live_id_format(vcpu, vcpu_id, state.apic_base(), conv)?;
    if let Some(f) = state.validate(conv).into_iter().find(|f| !f.kvm_accepts) {
        return Err(KvmLapicError::Invalid(f.error));
    }
    vcpu.set_lapic(state.denormalise(conv).as_kvm())
        .map_err(ioctl("KVM_SET_LAPIC"))
}

/// `conv` with the x2APIC id format of `vcpu`'s VM as the vCPU shows it. In x2APIC mode KVM
/// reports the ID word as the vCPU id with 32-bit ids (`KVM_X2APIC_API_USE_32BIT_IDS`) and as
/// `id << 24` without. Elsewhere (xAPIC, disabled, or vCPU 0, where both read 0) the format
/// does not change the blob and `conv` stands.
fn live_id_format(
    vcpu: &VcpuFd,
    vcpu_id: u32,
    base: ApicBase,
    conv: &KvmConventions,
) -> Result<KvmConventions, KvmLapicError> {
    if base.mode() != crate::ApicMode::X2Apic || vcpu_id == 0 {
        return Ok(*conv);
    }
    let lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let id = LapicPage::view(&lapic).reg(regs::ID);
    let x2apic_32bit_ids = match id {
        i if i == vcpu_id => true,
        i if i == vcpu_id << 24 => false,
        // Neither (not a vCPU KVM set up itself): keep the caller's word.
        _ => return Ok(*conv),
    };
    Ok(KvmConventions {
        x2apic_32bit_ids,
        ..*conv
    })
}

/// Restore a [`SavedLapic`] into vCPU `vcpu_id`, whose VM has conventions `dst`: refused
/// (nothing written) when the destination would lose something the guest uses, unless `loss`
/// is [`Loss::Accept`]; then as [`restore`]. The TSC-deadline MSR is the caller's to write
/// afterwards, after IA32_TSC ([`SavedLapic::tsc_deadline`]).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let vm = kvm.create_vm()?;
/// vm.create_irq_chip()?;
/// let vcpu = vm.create_vcpu(0)?;
/// use lapic_state::{kvm::restore_saved, KvmConventions, Loss, SavedLapic};
/// let conv = KvmConventions::detect(&kvm, &vcpu, false)?;
/// let saved = SavedLapic::new(lapic_state::kvm::save(&vcpu, 0, &conv)?, conv, 0);
/// // Refused, with the reason, if the destination would lose what the guest uses.
/// restore_saved(&vcpu, 0, &saved, &conv, Loss::Refuse)?;
/// # Ok(())
/// # }
/// ```
pub fn restore_saved(
    vcpu: &VcpuFd,
    vcpu_id: u32,
    saved: &SavedLapic,
    dst: &KvmConventions,
    loss: Loss,
) -> Result<(), KvmLapicError> {
    if loss == Loss::Refuse {
        saved.check_compatible(dst).map_err(KvmLapicError::Incompatible)?;
    }
    restore(vcpu, vcpu_id, saved.state(), dst)
}
