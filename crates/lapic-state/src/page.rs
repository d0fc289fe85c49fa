// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Typed view of the 1 KiB KVM LAPIC register page.

/// The offset of a 32-bit register in the APIC page: 16-byte aligned and inside the page,
/// by construction. The named ones are in [`regs`]; [`Reg::new`] checks any other offset, so
/// [`LapicPage::reg`] and [`LapicPage::set_reg`] never meet a bad one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reg(usize);

/// An offset that names no register of the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("offset {0:#x} is not a register of the APIC page (16-byte aligned, below 0x400)")]
pub struct BadOffset(pub usize);

impl Reg {
    /// The register at `offset`: 16-byte aligned and below 0x400.
    pub const fn new(offset: usize) -> Result<Reg, BadOffset> {
        if offset % 16 != 0 || offset >= PAGE_LEN {
            return Err(BadOffset(offset));
        }
        Ok(Reg(offset))
    }

    /// The offset in bytes.
    pub const fn offset(self) -> usize {
        self.0
    }

    /// Word `i` (0..8) of a 256-bit vector register starting here (IRR, ISR, TMR); `None`
    /// beyond the page.
    pub const fn word(self, i: usize) -> Option<Reg> {
        if i >= 8 {
            return None;
        }
        match Reg::new(self.0 + 16 * i) {
            Ok(r) => Some(r),
            Err(_) => None,
        }
    }
}

/// Bytes in the register page KVM exchanges (`struct kvm_lapic_state`).
pub const PAGE_LEN: usize = 1024;

/// Byte offset of the upper half of KVM's merged x2APIC ICR (Intel: bits 63:32 of the ICR
/// at 0x304, inside the ICR's 16-byte slot).
pub const ICR_HIGH_MERGED: usize = 0x304;

/// The registers of the APIC page by name (16-byte stride, 32-bit registers).
pub mod regs {
    use super::Reg;

    /// Local APIC ID.
    pub const ID: Reg = Reg(0x20);
    /// Local APIC version.
    pub const LVR: Reg = Reg(0x30);
    /// Task priority.
    pub const TPR: Reg = Reg(0x80);
    /// Arbitration priority.
    pub const APR: Reg = Reg(0x90);
    /// Processor priority.
    pub const PPR: Reg = Reg(0xa0);
    /// Logical destination.
    pub const LDR: Reg = Reg(0xd0);
    /// Destination format.
    pub const DFR: Reg = Reg(0xe0);
    /// Spurious interrupt vector (bit 8: APIC software enable).
    pub const SPIV: Reg = Reg(0xf0);
    /// In-service register, 8 words.
    pub const ISR: Reg = Reg(0x100);
    /// Trigger-mode register, 8 words.
    pub const TMR: Reg = Reg(0x180);
    /// Interrupt-request register, 8 words.
    pub const IRR: Reg = Reg(0x200);
    /// Error status.
    pub const ESR: Reg = Reg(0x280);
    /// LVT corrected machine-check interrupt.
    pub const LVT_CMCI: Reg = Reg(0x2f0);
    /// Interrupt command, low half.
    pub const ICR: Reg = Reg(0x300);
    /// Interrupt command, high half.
    pub const ICR2: Reg = Reg(0x310);
    /// LVT timer.
    pub const LVT_TIMER: Reg = Reg(0x320);
    /// LVT thermal sensor.
    pub const LVT_THERMAL: Reg = Reg(0x330);
    /// LVT performance counter.
    pub const LVT_PERF: Reg = Reg(0x340);
    /// LVT LINT0.
    pub const LVT_LINT0: Reg = Reg(0x350);
    /// LVT LINT1.
    pub const LVT_LINT1: Reg = Reg(0x360);
    /// LVT error.
    pub const LVT_ERROR: Reg = Reg(0x370);
    /// Timer initial count.
    pub const TMICT: Reg = Reg(0x380);
    /// Timer current count.
    pub const TMCCT: Reg = Reg(0x390);
    /// Timer divide configuration.
    pub const TDCR: Reg = Reg(0x3e0);
}

/// LVT delivery mode (bits 8..10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// 000: fixed vector.
    Fixed,
    /// 010: SMI.
    Smi,
    /// 100: NMI.
    Nmi,
    /// 101: INIT.
    Init,
    /// 111: external interrupt (8259-style, vector from the PIC).
    ExtInt,
    /// Any other (reserved) encoding, with its raw value.
    Reserved(u8),
}

impl DeliveryMode {
    fn from_bits(v: u32) -> Self {
        match ((v >> 8) & 7) as u8 {
            0 => DeliveryMode::Fixed,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            7 => DeliveryMode::ExtInt,
            r => DeliveryMode::Reserved(r),
        }
    }

    fn bits(self) -> u32 {
        (match self {
            DeliveryMode::Fixed => 0,
            DeliveryMode::Smi => 2,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::ExtInt => 7,
            DeliveryMode::Reserved(r) => u32::from(r & 7),
        }) << 8
    }
}

/// LVT timer mode (bits 17..18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    /// One-shot countdown from TMICT.
    OneShot,
    /// Periodic reload from TMICT.
    Periodic,
    /// TSC-deadline (IA32_TSC_DEADLINE MSR).
    TscDeadline,
    /// The reserved encoding 11b.
    Reserved,
}

/// One decoded local vector table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lvt(pub u32);

impl Lvt {
    /// Bit 16: masked.
    pub const MASKED: u32 = 1 << 16;

    /// Interrupt vector (bits 0..7).
    pub fn vector(self) -> u8 {
        self.0 as u8
    }
    /// Delivery mode.
    pub fn delivery_mode(self) -> DeliveryMode {
        DeliveryMode::from_bits(self.0)
    }
    /// Whether the entry is masked.
    pub fn masked(self) -> bool {
        self.0 & Self::MASKED != 0
    }
    /// Level-triggered (bit 15; LINT0/LINT1 only).
    pub fn level_triggered(self) -> bool {
        self.0 & (1 << 15) != 0
    }
    /// Timer mode (meaningful for the LVT timer entry only).
    pub fn timer_mode(self) -> TimerMode {
        match (self.0 >> 17) & 3 {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::Reserved,
        }
    }
    /// This entry with another delivery mode (other bits kept).
    pub fn with_delivery_mode(self, m: DeliveryMode) -> Lvt {
        Lvt((self.0 & !(7 << 8)) | m.bits())
    }
    /// This entry masked or unmasked.
    pub fn with_masked(self, masked: bool) -> Lvt {
        Lvt(if masked {
            self.0 | Self::MASKED
        } else {
            self.0 & !Self::MASKED
        })
    }
}

/// The LAPIC register page as KVM exchanges it (`KVM_GET_LAPIC` / `KVM_SET_LAPIC`): the raw,
/// convention-laden form, whose x2APIC ID word and ICR layout depend on the KVM and the VM
/// (see [`crate::KvmConventions`]). The convention-free form is [`CanonicalPage`], inside a
/// [`crate::LapicState`]; [`crate::LapicState::normalise`] and
/// [`crate::LapicState::denormalise`] are the only ways between them.
///
/// 1 KiB by value (`Copy`). With the `kvm-bindings` feature it converts to and from
/// `kvm_bindings::kvm_lapic_state`, and [`LapicPage::view`] / [`LapicPage::as_kvm`] borrow
/// one as the other without copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct LapicPage([u8; PAGE_LEN]);

impl Default for LapicPage {
    fn default() -> Self {
        LapicPage([0; PAGE_LEN])
    }
}

#[cfg(feature = "kvm-bindings")]
mod kvm_layout {
    use super::{LapicPage, PAGE_LEN};
    use kvm_bindings::kvm_lapic_state;

    // What the casts below rely on: one layout, one alignment.
    const _: () = assert!(std::mem::size_of::<kvm_lapic_state>() == PAGE_LEN);
    const _: () = assert!(std::mem::align_of::<kvm_lapic_state>() == 1);

    impl From<kvm_lapic_state> for LapicPage {
        fn from(s: kvm_lapic_state) -> Self {
            *LapicPage::view(&s)
        }
    }

    impl From<LapicPage> for kvm_lapic_state {
        fn from(p: LapicPage) -> Self {
            *p.as_kvm()
        }
    }

    impl LapicPage {
        /// Borrow a `kvm_lapic_state` as a typed page without copying it.
        pub fn view(state: &kvm_lapic_state) -> &LapicPage {
            // SAFETY: LapicPage is repr(transparent) over [u8; 1024]; kvm_lapic_state is a
            // repr(C) struct of one [c_char; 1024] (size and alignment asserted above), and
            // every byte pattern is valid for both. The lifetime is carried over.
            unsafe { &*(state as *const kvm_lapic_state as *const LapicPage) }
        }

        /// Mutable typed view of a `kvm_lapic_state` without copying it.
        pub fn view_mut(state: &mut kvm_lapic_state) -> &mut LapicPage {
            // SAFETY: as in `view`.
            unsafe { &mut *(state as *mut kvm_lapic_state as *mut LapicPage) }
        }

        /// Borrow as the KVM structure (for `VcpuFd::set_lapic`).
        pub fn as_kvm(&self) -> &kvm_lapic_state {
            // SAFETY: as in `view`, the other way round.
            unsafe { &*(self as *const LapicPage as *const kvm_lapic_state) }
        }
    }
}

/// A 256-bit vector register (IRR, ISR or TMR): eight 32-bit words at a 16-byte stride.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VectorSet(pub [u32; 8]);

impl VectorSet {
    /// Whether `vector` is set.
    pub fn contains(&self, vector: u8) -> bool {
        self.0[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
    }
    /// Set or clear `vector`.
    pub fn set(&mut self, vector: u8, on: bool) {
        let w = &mut self.0[usize::from(vector >> 5)];
        if on {
            *w |= 1 << (vector & 31);
        } else {
            *w &= !(1 << (vector & 31));
        }
    }
    /// Highest set vector, if any.
    pub fn highest(&self) -> Option<u8> {
        self.0
            .iter()
            .enumerate()
            .rev()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| (i as u32 * 32 + 31 - w.leading_zeros()) as u8)
    }
    /// Number of vectors set.
    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
    /// Whether no vector is set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
}

impl LapicPage {
    /// Build from raw bytes.
    pub fn from_bytes(bytes: &[u8; PAGE_LEN]) -> Self {
        LapicPage(*bytes)
    }

    /// The raw bytes.
    pub fn to_bytes(&self) -> [u8; PAGE_LEN] {
        self.0
    }

    /// Read the 32-bit register `r`.
    pub fn reg(&self, r: Reg) -> u32 {
        let o = r.offset();
        u32::from_le_bytes([self.0[o], self.0[o + 1], self.0[o + 2], self.0[o + 3]])
    }

    /// Write the 32-bit register `r`.
    pub fn set_reg(&mut self, r: Reg, val: u32) {
        let o = r.offset();
        self.0[o..o + 4].copy_from_slice(&val.to_le_bytes());
    }

    /// Read a 256-bit vector register at `base` (`regs::IRR`, `regs::ISR` or `regs::TMR`).
    pub fn vectors(&self, base: Reg) -> VectorSet {
        let mut v = VectorSet::default();
        for (i, w) in v.0.iter_mut().enumerate() {
            *w = base.word(i).map_or(0, |r| self.reg(r));
        }
        v
    }

    /// Write a 256-bit vector register at `base`.
    pub fn set_vectors(&mut self, base: Reg, v: &VectorSet) {
        for (i, w) in v.0.iter().enumerate() {
            if let Some(r) = base.word(i) {
                self.set_reg(r, *w);
            }
        }
    }

    /// Interrupt-request register.
    pub fn irr(&self) -> VectorSet {
        self.vectors(regs::IRR)
    }
    /// In-service register.
    pub fn isr(&self) -> VectorSet {
        self.vectors(regs::ISR)
    }
    /// Trigger-mode register.
    pub fn tmr(&self) -> VectorSet {
        self.vectors(regs::TMR)
    }

    /// The interrupt command register as one 64-bit value from the ICR (low) and ICR2 (high)
    /// words, i.e. the split layout (xAPIC, and x2APIC on AMD). See
    /// [`crate::KvmConventions`] for the merged Intel x2APIC layout.
    pub fn icr(&self) -> u64 {
        u64::from(self.reg(regs::ICR)) | (u64::from(self.reg(regs::ICR2)) << 32)
    }

    /// Set ICR (low word) and ICR2 (high word) from one 64-bit value.
    pub fn set_icr(&mut self, icr: u64) {
        self.set_reg(regs::ICR, icr as u32);
        self.set_reg(regs::ICR2, (icr >> 32) as u32);
    }

    /// Timer divisor selected by TDCR bits 0, 1 and 3 (1, 2, 4, ... 128).
    pub fn timer_divisor(&self) -> u32 {
        let t = self.reg(regs::TDCR);
        let v = (t & 3) | ((t & 8) >> 1);
        1 << ((v + 1) & 7)
    }

    /// Read 4 bytes at any 4-byte aligned `offset` in the page (e.g. [`ICR_HIGH_MERGED`]).
    pub fn raw_u32(&self, offset: usize) -> Result<u32, BadOffset> {
        let b = self.raw_slot(offset)?;
        Ok(u32::from_le_bytes([
            self.0[b],
            self.0[b + 1],
            self.0[b + 2],
            self.0[b + 3],
        ]))
    }

    /// Write 4 bytes at any 4-byte aligned `offset` in the page.
    pub fn set_raw_u32(&mut self, offset: usize, val: u32) -> Result<(), BadOffset> {
        let b = self.raw_slot(offset)?;
        self.0[b..b + 4].copy_from_slice(&val.to_le_bytes());
        Ok(())
    }

    fn raw_slot(&self, offset: usize) -> Result<usize, BadOffset> {
        match offset % 4 == 0 && offset + 4 <= PAGE_LEN {
            true => Ok(offset),
            false => Err(BadOffset(offset)),
        }
    }

    /// The upper half of KVM's merged x2APIC ICR ([`ICR_HIGH_MERGED`]).
    #[cfg(any(feature = "kvm", test))]
    pub(crate) fn icr_high_merged(&self) -> u32 {
        let o = ICR_HIGH_MERGED;
        u32::from_le_bytes([self.0[o], self.0[o + 1], self.0[o + 2], self.0[o + 3]])
    }

    /// Write the upper half of KVM's merged x2APIC ICR.
    pub(crate) fn set_icr_high_merged(&mut self, val: u32) {
        self.0[ICR_HIGH_MERGED..ICR_HIGH_MERGED + 4].copy_from_slice(&val.to_le_bytes());
    }

    /// SPIV bit 8: the APIC is software-enabled.
    pub fn sw_enabled(&self) -> bool {
        self.reg(regs::SPIV) & (1 << 8) != 0
    }

    /// Decoded LVT entry at `r` (one of the `regs::LVT_*` registers).
    pub fn lvt(&self, r: Reg) -> Lvt {
        Lvt(self.reg(r))
    }

    /// Program LINT0 as ExtINT and LINT1 as NMI, both unmasked: the PC-compatible boot wiring
    /// the BIOS would leave for a Linux kernel (the 8259 on LINT0, NMI on LINT1).
    pub fn set_lint_boot_defaults(&mut self) {
        let l0 = self
            .lvt(regs::LVT_LINT0)
            .with_delivery_mode(DeliveryMode::ExtInt)
            .with_masked(false);
        let l1 = self
            .lvt(regs::LVT_LINT1)
            .with_delivery_mode(DeliveryMode::Nmi)
            .with_masked(false);
        self.set_reg(regs::LVT_LINT0, l0.0);
        self.set_reg(regs::LVT_LINT1, l1.0);
    }
}

/// The register page of a [`crate::LapicState`]: canonical, free of KVM conventions (in
/// x2APIC mode the ID word is the full 32-bit x2APIC id and the ICR is split, low word at
/// 0x300, high at 0x310; every other byte as KVM keeps it). A separate type from the raw
/// [`LapicPage`] so that one cannot be handed to KVM as the other: it has no `as_kvm`, and
/// becomes a raw page only through [`crate::LapicState::denormalise`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CanonicalPage(LapicPage);

impl CanonicalPage {
    /// A canonical page from its bytes (the layout described above; nothing is converted).
    pub fn from_bytes(bytes: &[u8; PAGE_LEN]) -> Self {
        CanonicalPage(LapicPage::from_bytes(bytes))
    }

    /// Wrap a page already in canonical layout (crate-internal: `normalise` produces it).
    pub(crate) fn from_canonical(page: LapicPage) -> Self {
        CanonicalPage(page)
    }

    /// The page, for `denormalise` to convert (crate-internal).
    pub(crate) fn inner(&self) -> &LapicPage {
        &self.0
    }

    /// The bytes.
    pub fn to_bytes(&self) -> [u8; PAGE_LEN] {
        self.0.to_bytes()
    }
    /// Read register `r`.
    pub fn reg(&self, r: Reg) -> u32 {
        self.0.reg(r)
    }
    /// Write register `r` (an ID or LDR that breaks the canonical form is reported by
    /// [`crate::LapicState::validate`]).
    pub fn set_reg(&mut self, r: Reg, val: u32) {
        self.0.set_reg(r, val)
    }
    /// A 256-bit vector register.
    pub fn vectors(&self, base: Reg) -> VectorSet {
        self.0.vectors(base)
    }
    /// Write a 256-bit vector register.
    pub fn set_vectors(&mut self, base: Reg, v: &VectorSet) {
        self.0.set_vectors(base, v)
    }
    /// Interrupt-request register.
    pub fn irr(&self) -> VectorSet {
        self.0.irr()
    }
    /// In-service register.
    pub fn isr(&self) -> VectorSet {
        self.0.isr()
    }
    /// Trigger-mode register.
    pub fn tmr(&self) -> VectorSet {
        self.0.tmr()
    }
    /// The 64-bit ICR (always split here).
    pub fn icr(&self) -> u64 {
        self.0.icr()
    }
    /// Set the 64-bit ICR.
    pub fn set_icr(&mut self, icr: u64) {
        self.0.set_icr(icr)
    }
    /// Timer divisor from TDCR.
    pub fn timer_divisor(&self) -> u32 {
        self.0.timer_divisor()
    }
    /// SPIV bit 8: software-enabled.
    pub fn sw_enabled(&self) -> bool {
        self.0.sw_enabled()
    }
    /// Decoded LVT entry.
    pub fn lvt(&self, r: Reg) -> Lvt {
        self.0.lvt(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lint_defaults_keep_other_bits() {
        let mut p = LapicPage::default();
        p.set_reg(regs::LVT_LINT0, Lvt::MASKED | 0x30);
        p.set_lint_boot_defaults();
        assert_eq!(p.reg(regs::LVT_LINT0), 0x730);
        assert_eq!(p.reg(regs::LVT_LINT1), 0x400);
    }

    #[test]
    fn bad_offsets_are_errors_not_silence() {
        assert_eq!(Reg::new(0x21), Err(BadOffset(0x21)));
        assert_eq!(Reg::new(0x400), Err(BadOffset(0x400)));
        assert_eq!(Reg::new(0x3f0).map(Reg::offset), Ok(0x3f0));
        assert_eq!(regs::IRR.word(7), Reg::new(0x270).ok());
        assert_eq!(regs::IRR.word(8), None);
        assert_eq!(regs::TDCR.word(4), None, "beyond the page");
        let mut p = LapicPage::default();
        assert_eq!(p.set_raw_u32(0x3fe, 1), Err(BadOffset(0x3fe)));
        assert_eq!(p.set_raw_u32(0x400, 1), Err(BadOffset(0x400)));
        assert_eq!(p.raw_u32(0x3fd), Err(BadOffset(0x3fd)));
        assert_eq!(p, LapicPage::default());
        p.set_raw_u32(ICR_HIGH_MERGED, 7).unwrap();
        assert_eq!((p.raw_u32(0x304), p.icr_high_merged()), (Ok(7), 7));
    }

    #[test]
    fn timer_modes() {
        assert_eq!(Lvt(0x20).timer_mode(), TimerMode::OneShot);
        assert_eq!(Lvt(0x20020).timer_mode(), TimerMode::Periodic);
        assert_eq!(Lvt(0x40020).timer_mode(), TimerMode::TscDeadline);
        assert_eq!(Lvt(0x60020).timer_mode(), TimerMode::Reserved);
        assert_eq!(Lvt(0x10000).delivery_mode(), DeliveryMode::Fixed);
        assert_eq!(Lvt(0x300).delivery_mode(), DeliveryMode::Reserved(3));
    }

    #[test]
    fn vector_sets_and_divisor() {
        let mut p = LapicPage::default();
        let mut v = VectorSet::default();
        assert_eq!(v.highest(), None);
        v.set(0x31, true);
        v.set(0xef, true);
        p.set_vectors(regs::ISR, &v);
        assert_eq!(p.isr().highest(), Some(0xef));
        assert_eq!(p.isr().count(), 2);
        assert_eq!(p.reg(regs::ISR.word(7).unwrap()), 1 << 15);
        for (tdcr, div) in [
            (0u32, 2u32),
            (1, 4),
            (2, 8),
            (3, 16),
            (8, 32),
            (9, 64),
            (10, 128),
            (11, 1),
        ] {
            p.set_reg(regs::TDCR, tdcr);
            assert_eq!(p.timer_divisor(), div, "tdcr {tdcr}");
        }
        p.set_icr(0x0000_0003_0000_4500);
        assert_eq!(p.reg(regs::ICR2), 3);
        assert_eq!(p.icr(), 0x0000_0003_0000_4500);
        #[cfg(feature = "kvm-bindings")]
        {
            let k: kvm_bindings::kvm_lapic_state = p.into();
            assert_eq!(LapicPage::view(&k).icr(), p.icr());
            assert_eq!(LapicPage::from(k), p);
        }
    }

    proptest! {
        #[test]
        fn highest_matches_scan(words: [u32; 8]) {
            let v = VectorSet(words);
            let scan = (0..=255u8).rev().find(|x| v.contains(*x));
            prop_assert_eq!(v.highest(), scan);
        }

        #[test]
        fn reg_round_trip(off in 0usize..64, v: u32) {
            let mut p = LapicPage::default();
            let r = Reg::new(off * 16).unwrap();
            p.set_reg(r, v);
            prop_assert_eq!(p.reg(r), v);
            let bytes = p.to_bytes();
            prop_assert_eq!(LapicPage::from_bytes(&bytes), p);
        }

        #[test]
        fn delivery_mode_round_trip(v: u32, m in 0u8..8) {
            let l = Lvt(v).with_delivery_mode(DeliveryMode::Reserved(m));
            let back = l.delivery_mode();
            prop_assert_eq!(Lvt(v).with_delivery_mode(back), l);
            prop_assert_eq!(l.0 & !(7 << 8), v & !(7 << 8));
        }
    }
}
