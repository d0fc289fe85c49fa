// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! CPU topology and the CPU index -> APIC id map.

/// The VM's CPU topology: `max_vcpus` possible CPUs, one thread per core, one package.
///
/// Every place that needs an APIC id (KVM vCPU id, MADT, `_MAT`, CPUID) calls
/// [`Topology::apic_id`]; nothing else computes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    max_vcpus: u32,
}

impl Topology {
    /// A topology for `max_vcpus` possible CPUs (at least 1).
    pub fn new(max_vcpus: u32) -> Self {
        Topology {
            max_vcpus: max_vcpus.max(1),
        }
    }

    /// Number of possible CPUs.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    /// APIC id of CPU `index`. With one thread per core and one package, ids are dense.
    pub fn apic_id(&self, index: u32) -> u32 {
        index
    }

    /// Highest APIC id any possible CPU has.
    pub fn max_apic_id(&self) -> u32 {
        self.apic_id(self.max_vcpus - 1)
    }

    /// Bits of the APIC id that select the core within the package (CPUID 0xB level 1 shift).
    pub fn core_bits(&self) -> u32 {
        let n = self.max_vcpus;
        if n <= 1 {
            0
        } else {
            32 - (n - 1).leading_zeros()
        }
    }

    /// Whether some APIC id does not fit xAPIC's 8 bits (0xff is broadcast), so KVM's
    /// `KVM_CAP_X2APIC_API` with 32-bit ids is needed and the guest must use x2APIC.
    pub fn needs_x2apic(&self) -> bool {
        self.max_apic_id() > 254
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_bits() {
        let t = Topology::new(8);
        assert_eq!(t.apic_id(7), 7);
        assert_eq!(t.core_bits(), 3);
        assert!(!t.needs_x2apic());
        assert_eq!(Topology::new(1).core_bits(), 0);
        assert_eq!(Topology::new(9).core_bits(), 4);
        assert!(Topology::new(300).needs_x2apic());
        assert!(!Topology::new(255).needs_x2apic());
        assert_eq!(Topology::new(0).max_vcpus(), 1);
    }
}
