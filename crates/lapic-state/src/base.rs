// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! IA32_APIC_BASE (MSR 0x1b) decoding.

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

/// The value of the IA32_APIC_BASE MSR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct ApicBase(pub u64);

/// The APIC mode selected by IA32_APIC_BASE bits 11 (enable) and 10 (x2APIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub enum ApicMode {
    /// Bit 11 clear, bit 10 clear: the APIC is hardware-disabled.
    Disabled,
    /// Bit 11 set, bit 10 clear: xAPIC (MMIO) mode.
    XApic,
    /// Bit 11 set, bit 10 set: x2APIC (MSR) mode.
    X2Apic,
    /// Bit 11 clear, bit 10 set: architecturally invalid; KVM refuses to enter it.
    Invalid,
}

impl ApicBase {
    /// MSR index of IA32_APIC_BASE.
    pub const MSR: u32 = 0x1b;
    /// Bit 8: this is the bootstrap processor.
    pub const BSP: u64 = 1 << 8;
    /// Bit 10: x2APIC mode enable.
    pub const EXTD: u64 = 1 << 10;
    /// Bit 11: APIC global enable.
    pub const ENABLE: u64 = 1 << 11;
    /// Default physical base address of the xAPIC MMIO window.
    pub const DEFAULT_ADDRESS: u64 = 0xfee0_0000;

    /// The power-on value KVM gives a vCPU: enabled xAPIC at the default address, BSP bit as given.
    pub fn power_on(bsp: bool) -> Self {
        ApicBase(Self::DEFAULT_ADDRESS | Self::ENABLE | if bsp { Self::BSP } else { 0 })
    }

    /// The mode these bits select.
    pub fn mode(self) -> ApicMode {
        match (self.0 & Self::ENABLE != 0, self.0 & Self::EXTD != 0) {
            (false, false) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
            (false, true) => ApicMode::Invalid,
        }
    }

    /// Whether the BSP flag is set.
    pub fn is_bsp(self) -> bool {
        self.0 & Self::BSP != 0
    }

    /// The MMIO base address (bits 12 and up, up to 52 bits of physical address).
    pub fn address(self) -> u64 {
        self.0 & 0x000f_ffff_ffff_f000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(ApicBase(0).mode(), ApicMode::Disabled);
        assert_eq!(ApicBase(0xfee0_0900).mode(), ApicMode::XApic);
        assert_eq!(ApicBase(0xfee0_0d00).mode(), ApicMode::X2Apic);
        assert_eq!(ApicBase(0xfee0_0400).mode(), ApicMode::Invalid);
        assert!(ApicBase(0xfee0_0900).is_bsp());
        assert!(!ApicBase(0xfee0_0800).is_bsp());
        assert_eq!(ApicBase(0xfee0_0d00).address(), 0xfee0_0000);
        assert_eq!(ApicBase::power_on(true), ApicBase(0xfee0_0900));
        assert_eq!(ApicBase::power_on(false), ApicBase(0xfee0_0800));
    }
}
