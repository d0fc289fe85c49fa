// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The canonical, convention-free LAPIC state: normalise, denormalise, validate, encode.

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

use crate::conventions::{IcrLayout, KvmConventions};
use crate::page::{regs, CanonicalPage, DeliveryMode, LapicPage, Lvt, Reg};
use crate::{ApicBase, ApicMode};

/// Errors about LAPIC state content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LapicError {
    /// IA32_APIC_BASE has x2APIC set without the global enable: no such mode exists.
    #[error("invalid APIC mode: APIC base {0:#x} has x2APIC (bit 10) without enable (bit 11)")]
    InvalidApicMode(u64),
    /// In x2APIC mode the ID word does not match the vCPU id in the blob's id format.
    #[error("x2APIC id word {found:#x} does not match vCPU {vcpu_id} (expected {expected:#x})")]
    X2ApicIdMismatch {
        /// The vCPU id (KVM's x2APIC id).
        vcpu_id: u32,
        /// The ID word found.
        found: u32,
        /// The ID word KVM would use in this format.
        expected: u32,
    },
    /// In x2APIC mode the LDR is not `(id >> 4) << 16 | 1 << (id & 15)`.
    #[error("x2APIC LDR {found:#x} is inconsistent with APIC id {id} (expected {expected:#x})")]
    LdrInconsistent {
        /// x2APIC id.
        id: u32,
        /// LDR found.
        found: u32,
        /// LDR derived from the id.
        expected: u32,
    },
    /// The timer's current count exceeds its initial count.
    #[error("timer current count {tmcct} exceeds initial count {tmict}")]
    TimerCountBeyondInitial {
        /// TMCCT.
        tmcct: u32,
        /// TMICT.
        tmict: u32,
    },
    /// An LVT entry uses a delivery mode that is reserved for that entry.
    #[error("LVT {lvt} uses reserved delivery mode {mode:#05b}")]
    ReservedLvtDeliveryMode {
        /// Which LVT entry.
        lvt: &'static str,
        /// The 3-bit mode.
        mode: u8,
    },
    /// The LVT timer selects the reserved timer mode 11b (or TSC-deadline without support).
    #[error("LVT timer selects a reserved or unsupported timer mode ({0:#x})")]
    ReservedTimerMode(u32),
    /// A one-shot timer that has expired (TMICT set, TMCCT 0): KVM arms it again on restore
    /// and it fires once more, which is right if its interrupt was still pending (not yet
    /// injected) and one spurious interrupt if the guest already took it. The page cannot
    /// tell the two apart.
    #[error("expired one-shot timer (TMICT {tmict:#x}, TMCCT 0) fires once more when restored")]
    ExpiredOneShotFiresAgain {
        /// TMICT.
        tmict: u32,
    },
}

/// One validation finding and whether `KVM_SET_LAPIC` would still accept the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// What is wrong.
    pub error: LapicError,
    /// `true` if KVM accepts it anyway (copying or fixing it up), `false` if KVM refuses.
    pub kvm_accepts: bool,
}

/// x2APIC logical destination derived from an x2APIC id (cluster in 31:16, one-hot 15:0).
pub fn x2apic_ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xf))
}

/// The LAPIC state of one vCPU, free of any KVM convention.
///
/// Canonical layout of the page: in x2APIC mode the ID word holds the 32-bit x2APIC id; the
/// ICR is split (low word at 0x300, high word at 0x310). Every other byte is as KVM keeps it
/// (including TMCCT, the remaining count KVM restarts the timer from).
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "Wire", into = "Wire"))]
pub struct LapicState {
    /// KVM vCPU id (KVM's x2APIC id is always the vCPU id).
    vcpu_id: u32,
    /// IA32_APIC_BASE.
    apic_base: ApicBase,
    /// Register page in canonical layout.
    page: CanonicalPage,
}

pub(crate) fn id_word(vcpu_id: u32, conv: &KvmConventions) -> u32 {
    if conv.x2apic_32bit_ids {
        vcpu_id
    } else {
        vcpu_id.wrapping_shl(24)
    }
}

impl LapicState {
    /// A state from its parts: vCPU `vcpu_id`, its IA32_APIC_BASE, and a page already in
    /// canonical layout. [`LapicState::validate`] says what is wrong with it, if anything.
    pub fn new(vcpu_id: u32, apic_base: ApicBase, page: CanonicalPage) -> Self {
        LapicState {
            vcpu_id,
            apic_base,
            page,
        }
    }

    /// KVM vCPU id (KVM's x2APIC id is always the vCPU id).
    pub fn vcpu_id(&self) -> u32 {
        self.vcpu_id
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> ApicBase {
        self.apic_base
    }

    /// The register page, canonical.
    pub fn page(&self) -> &CanonicalPage {
        &self.page
    }

    /// The register page, canonical, to change.
    pub fn page_mut(&mut self) -> &mut CanonicalPage {
        &mut self.page
    }

    /// Read a page taken with `KVM_GET_LAPIC` under `conv` from vCPU `vcpu_id` whose
    /// IA32_APIC_BASE was `apic_base`, into the canonical state.
    pub fn normalise(
        raw: &LapicPage,
        vcpu_id: u32,
        apic_base: ApicBase,
        conv: &KvmConventions,
    ) -> Result<LapicState, LapicError> {
        let mut page = *raw;
        match apic_base.mode() {
            ApicMode::Invalid => return Err(LapicError::InvalidApicMode(apic_base.0)),
            ApicMode::X2Apic => {
                let expected = id_word(vcpu_id, conv);
                let found = page.reg(regs::ID);
                if found != expected {
                    return Err(LapicError::X2ApicIdMismatch {
                        vcpu_id,
                        found,
                        expected,
                    });
                }
                page.set_reg(regs::ID, vcpu_id);
                // The canonical x2APIC LDR is the one KVM derives from the full id (kernels
                // before 6.11 with legacy ids derive it from the truncated one: not portable).
                page.set_reg(regs::LDR, x2apic_ldr(vcpu_id));
                if conv.icr == IcrLayout::Merged {
                    // KVM's merged ICR: high half at 0x304, copied to 0x310 by GET. 0x310 is
                    // what KVM reads on SET, so it is authoritative; 0x304 carries nothing else.
                    page.set_icr_high_merged(0);
                }
            }
            ApicMode::Disabled | ApicMode::XApic => {}
        }
        Ok(LapicState {
            vcpu_id,
            apic_base,
            page: CanonicalPage::from_canonical(page),
        })
    }

    /// The page `KVM_GET_LAPIC` would return for this state under `conv`, which is also
    /// exactly what `KVM_SET_LAPIC` expects there.
    pub fn denormalise(&self, conv: &KvmConventions) -> LapicPage {
        let mut page = *self.page.inner();
        if self.apic_base.mode() == ApicMode::X2Apic {
            let word = id_word(self.vcpu_id, conv);
            page.set_reg(regs::ID, word);
            // The LDR such a KVM reports: from the (possibly truncated) id it keeps.
            page.set_reg(regs::LDR, x2apic_ldr(conv.x2apic_id_on_set(self.vcpu_id, word)));
            if conv.icr == IcrLayout::Merged {
                let hi = page.reg(regs::ICR2);
                page.set_icr_high_merged(hi);
            }
        }
        page
    }

    /// The x2APIC id / xAPIC id this state carries.
    pub fn apic_id(&self) -> u32 {
        match self.apic_base.mode() {
            ApicMode::X2Apic => self.page.reg(regs::ID),
            _ => self.page.reg(regs::ID) >> 24,
        }
    }

    /// Check the state; an empty list means nothing is wrong. Each finding says whether KVM
    /// would accept the state anyway.
    pub fn validate(&self, conv: &KvmConventions) -> Vec<Finding> {
        let mut out = Vec::new();
        let p = &self.page;
        if self.apic_base.mode() == ApicMode::Invalid {
            out.push(Finding {
                error: LapicError::InvalidApicMode(self.apic_base.0),
                kvm_accepts: false,
            });
        }
        if self.apic_base.mode() == ApicMode::X2Apic {
            let id = p.reg(regs::ID);
            if id != self.vcpu_id {
                out.push(Finding {
                    error: LapicError::X2ApicIdMismatch {
                        vcpu_id: self.vcpu_id,
                        found: id,
                        expected: self.vcpu_id,
                    },
                    kvm_accepts: !conv.x2apic_32bit_ids,
                });
            }
            let ldr = p.reg(regs::LDR);
            let expected = x2apic_ldr(self.vcpu_id);
            if ldr != expected {
                // KVM recomputes the x2APIC LDR on set.
                out.push(Finding {
                    error: LapicError::LdrInconsistent {
                        id: self.vcpu_id,
                        found: ldr,
                        expected,
                    },
                    kvm_accepts: true,
                });
            }
        }
        let (tmict, tmcct) = (p.reg(regs::TMICT), p.reg(regs::TMCCT));
        if tmcct > tmict {
            // KVM warns, then restarts from the initial count.
            out.push(Finding {
                error: LapicError::TimerCountBeyondInitial { tmcct, tmict },
                kvm_accepts: true,
            });
        }
        let lvtt = p.reg(regs::LVT_TIMER);
        let mode = lvtt & (3 << 17);
        if mode == 0 && tmict != 0 && tmcct == 0 && !Lvt(lvtt).masked() {
            out.push(Finding {
                error: LapicError::ExpiredOneShotFiresAgain { tmict },
                kvm_accepts: true,
            });
        }
        if mode == 3 << 17 || (mode == 2 << 17 && !conv.tsc_deadline) {
            out.push(Finding {
                error: LapicError::ReservedTimerMode(lvtt),
                kvm_accepts: true,
            });
        }
        use DeliveryMode::*;
        let checks: [(&'static str, Reg, &[DeliveryMode]); 7] = [
            ("timer", regs::LVT_TIMER, &[Fixed]),
            ("thermal", regs::LVT_THERMAL, &[Fixed, Smi, Nmi]),
            ("perf", regs::LVT_PERF, &[Fixed, Smi, Nmi]),
            ("LINT0", regs::LVT_LINT0, &[Fixed, Smi, Nmi, Init, ExtInt]),
            ("LINT1", regs::LVT_LINT1, &[Fixed, Smi, Nmi, Init, ExtInt]),
            ("error", regs::LVT_ERROR, &[Fixed]),
            ("CMCI", regs::LVT_CMCI, &[Fixed, Smi, Nmi]),
        ];
        for (name, off, allowed) in checks {
            if off == regs::LVT_CMCI && conv.nr_lvt < 7 {
                continue;
            }
            let dm = Lvt(p.reg(off)).delivery_mode();
            if !allowed.contains(&dm) {
                let mode = ((p.reg(off) >> 8) & 7) as u8;
                // KVM_SET_LAPIC copies LVTs verbatim; it does not apply its MMIO write masks.
                out.push(Finding {
                    error: LapicError::ReservedLvtDeliveryMode { lvt: name, mode },
                    kvm_accepts: true,
                });
            }
        }
        out
    }

    /// Compact binary encoding: magic `LAPC`, format version (u16), reserved (u16), vCPU id
    /// (u32), APIC base (u64), the 1024-byte canonical page. Little endian.
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut out = [0u8; ENCODED_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[8..12].copy_from_slice(&self.vcpu_id.to_le_bytes());
        out[12..20].copy_from_slice(&self.apic_base.0.to_le_bytes());
        out[20..].copy_from_slice(&self.page.to_bytes());
        out
    }

    /// Decode [`LapicState::encode`] output from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<LapicState, DecodeError> {
        if bytes.len() < 4 || bytes[0..4] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if bytes.len() < 8 {
            return Err(DecodeError::Length {
                found: bytes.len(),
                expected: ENCODED_LEN,
            });
        }
        check_version(u16::from_le_bytes([bytes[4], bytes[5]]).into())?;
        let reserved = u16::from_le_bytes([bytes[6], bytes[7]]);
        if reserved != 0 {
            return Err(DecodeError::Reserved(reserved));
        }
        if bytes.len() != ENCODED_LEN {
            return Err(DecodeError::Length {
                found: bytes.len(),
                expected: ENCODED_LEN,
            });
        }
        let mut page = [0u8; 1024];
        page.copy_from_slice(&bytes[20..]);
        let mut base = [0u8; 8];
        base.copy_from_slice(&bytes[12..20]);
        Ok(LapicState {
            vcpu_id: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            apic_base: ApicBase(u64::from_le_bytes(base)),
            page: CanonicalPage::from_bytes(&page),
        })
    }
}

/// Encoding magic.
pub const MAGIC: [u8; 4] = *b"LAPC";
/// Newest encoding version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Length of [`LapicState::encode`] output.
pub const ENCODED_LEN: usize = 20 + 1024;

/// Errors decoding an encoded state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not an encoded LAPIC state.
    #[error("not an encoded LAPIC state (bad magic)")]
    BadMagic,
    /// Written by a newer version of this crate.
    #[error("LAPIC state format version {found} is newer than the supported version {supported}")]
    UnsupportedVersion {
        /// Version found.
        found: u32,
        /// Newest version supported.
        supported: u32,
    },
    /// Version 0 was never written: the bytes are damaged or not a state.
    #[error("LAPIC state format version 0 does not exist")]
    VersionZero,
    /// The reserved field is not zero (damaged, or written by a format this build does not
    /// know).
    #[error("LAPIC state reserved field is {0:#x}, not 0")]
    Reserved(u16),
    /// Wrong length.
    #[error("LAPIC state is {found} bytes, expected {expected}")]
    Length {
        /// Length found.
        found: usize,
        /// Length expected.
        expected: usize,
    },
}

/// A version this build reads: 1 ..= [`FORMAT_VERSION`].
fn check_version(version: u32) -> Result<(), DecodeError> {
    match version {
        0 => Err(DecodeError::VersionZero),
        v if v > u32::from(FORMAT_VERSION) => Err(DecodeError::UnsupportedVersion {
            found: v,
            supported: FORMAT_VERSION.into(),
        }),
        _ => Ok(()),
    }
}

/// Serde representation (versioned).
#[cfg(feature = "serde")]
#[derive(Serialize, Deserialize)]
struct Wire {
    version: u32,
    vcpu_id: u32,
    apic_base: u64,
    // Bytes, not a sequence of u8: compact in binary formats, and formats with a bytes type
    // (CBOR, MessagePack) get one; serde_bytes also reads a sequence (JSON arrays).
    #[serde(with = "serde_bytes")]
    page: Vec<u8>,
}

#[cfg(feature = "serde")]
impl From<LapicState> for Wire {
    fn from(s: LapicState) -> Wire {
        Wire {
            version: FORMAT_VERSION.into(),
            vcpu_id: s.vcpu_id,
            apic_base: s.apic_base.0,
            page: s.page.to_bytes().to_vec(),
        }
    }
}

#[cfg(feature = "serde")]
impl TryFrom<Wire> for LapicState {
    type Error = DecodeError;
    fn try_from(w: Wire) -> Result<LapicState, DecodeError> {
        check_version(w.version)?;
        let page: [u8; 1024] = w.page.as_slice().try_into().map_err(|_| DecodeError::Length {
            found: w.page.len(),
            expected: 1024,
        })?;
        Ok(LapicState {
            vcpu_id: w.vcpu_id,
            apic_base: ApicBase(w.apic_base),
            page: CanonicalPage::from_bytes(&page),
        })
    }
}
