// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a vCPU save or restore includes beyond the fixed set of registers, and how: the MSR
//! list, the LAPIC conventions, the XSAVE area size, nested virtualization state, and the
//! TSC policy. A VMM builds these once per VM and passes them to every vCPU.

use kvm_ioctls::{KvmNestedStateBuffer, VcpuFd};
use lapic_state::KvmConventions;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// How the guest TSC (IA32_TSC) is set on restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TscPolicy {
    /// The value each vCPU's state holds.
    #[default]
    Saved,
    /// This value for every vCPU, so that their TSC offsets are equal and the guest's TSCs
    /// stay in step (take it from one saved vCPU).
    Value(u64),
    /// Leave the TSC as KVM set it on the destination: the guest sees its TSC jump.
    Keep,
}

impl TscPolicy {
    /// The TSC to write given the one a vCPU's state holds; `None`: write none.
    pub(crate) fn resolve(self, saved: Option<u64>) -> Option<u64> {
        match self {
            TscPolicy::Saved => saved,
            TscPolicy::Value(v) => Some(v),
            TscPolicy::Keep => None,
        }
    }
}

/// How [`crate::save_vcpu`] saves a vCPU.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SaveOptions {
    /// MSRs to save, from [`crate::msr_list`] (the TSC deadline and APIC base are always
    /// handled on their own).
    pub msrs: Vec<u32>,
    /// The VM's LAPIC conventions: the LAPIC is saved normalised with them.
    pub conventions: KvmConventions,
    /// The VM's XSAVE area size, from [`crate::xsave_size`] (`None`: legacy 4 KiB ioctls).
    pub xsave_size: Option<usize>,
    /// Also save nested virtualization state (`KVM_GET_NESTED_STATE`) where KVM has it, for
    /// guests that run their own VMs. Off by default: about 8 KiB per vCPU.
    pub nested_state: bool,
}

impl SaveOptions {
    /// Options for a VM with these LAPIC conventions: no MSRs, legacy XSAVE, no nested state.
    pub fn new(conventions: KvmConventions) -> Self {
        SaveOptions {
            conventions,
            ..Default::default()
        }
    }

    /// Save these MSRs.
    pub fn with_msrs(mut self, msrs: Vec<u32>) -> Self {
        self.msrs = msrs;
        self
    }

    /// The VM's XSAVE area size.
    pub fn with_xsave_size(mut self, size: Option<usize>) -> Self {
        self.xsave_size = size;
        self
    }

    /// Save nested virtualization state too.
    pub fn with_nested_state(mut self, on: bool) -> Self {
        self.nested_state = on;
        self
    }
}

/// How [`crate::restore_vcpu`] restores a vCPU.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RestoreOptions {
    /// The destination VM's LAPIC conventions (the saved LAPIC is canonical).
    pub conventions: KvmConventions,
    /// The destination VM's XSAVE area size, from [`crate::xsave_size`].
    pub xsave_size: Option<usize>,
    /// How IA32_TSC is set.
    pub tsc: TscPolicy,
}

impl RestoreOptions {
    /// Options for a destination with these LAPIC conventions: legacy XSAVE, saved TSC.
    pub fn new(conventions: KvmConventions) -> Self {
        RestoreOptions {
            conventions,
            ..Default::default()
        }
    }

    /// The destination VM's XSAVE area size.
    pub fn with_xsave_size(mut self, size: Option<usize>) -> Self {
        self.xsave_size = size;
        self
    }

    /// How IA32_TSC is set.
    pub fn with_tsc(mut self, tsc: TscPolicy) -> Self {
        self.tsc = tsc;
        self
    }
}

/// Nested virtualization state as KVM gives it (`KVM_GET_NESTED_STATE`): a header (format,
/// flags, size) and the VMX or SVM data, about 8 KiB.
#[derive(Clone)]
pub struct NestedState(pub Box<KvmNestedStateBuffer>);

impl std::fmt::Debug for NestedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedState")
            .field("format", &self.0.format)
            .field("flags", &self.0.flags)
            .field("size", &self.0.size)
            .finish()
    }
}

impl Serialize for NestedState {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for NestedState {
    /// Exactly the buffer's bytes, like the other KVM structures ([`crate::state::exact_len`]).
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        crate::state::exact_len::<D, KvmNestedStateBuffer>(d).map(|b| NestedState(Box::new(b)))
    }
}

/// `vcpu`'s nested virtualization state, or `None` where KVM has none to give (no
/// `KVM_CAP_NESTED_STATE`: the ioctl answers EINVAL or ENOTTY).
pub(crate) fn get_nested_state(vcpu: &VcpuFd) -> Result<Option<NestedState>> {
    let mut buf = Box::new(KvmNestedStateBuffer::empty());
    match vcpu.nested_state(&mut buf) {
        // Header only (no guest in guest mode) is still state: its flags are restored too.
        Ok(_) => Ok(Some(NestedState(buf))),
        Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENOTTY => Ok(None),
        Err(source) => Err(Error::Kvm {
            what: "KVM_GET_NESTED_STATE",
            source,
        }),
    }
}

/// Restore nested state saved by [`get_nested_state`]. Its `size` comes from a snapshot: KVM
/// reads that many bytes from the buffer, so a size beyond the buffer is refused here.
pub(crate) fn set_nested_state(vcpu: &VcpuFd, state: &NestedState) -> Result<()> {
    let room = std::mem::size_of::<KvmNestedStateBuffer>();
    if state.0.size as usize > room {
        return Err(Error::NestedState {
            size: state.0.size,
            room,
        });
    }
    vcpu.set_nested_state(&state.0).map_err(|source| Error::Kvm {
        what: "KVM_SET_NESTED_STATE",
        source,
    })
}
