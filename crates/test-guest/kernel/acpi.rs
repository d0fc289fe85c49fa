// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Just enough ACPI: RSDP -> XSDT/RSDT -> MADT (CPUs) and FADT (PM1a, GPE0, SCI, DSDT -> \_S5_).
//! Tables come from the VMM, but every length is bounded so odd input cannot hang the guest.

use crate::{MAX_CPUS, MAX_PRESENT_SCAN};

fn rd8(a: u64) -> u8 {
    // SAFETY: identity-mapped guest RAM below 4 GiB; tables are read-only here.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}
fn rd16(a: u64) -> u16 {
    u16::from(rd8(a)) | (u16::from(rd8(a + 1)) << 8)
}
fn rd32(a: u64) -> u32 {
    // SAFETY: as rd8; unaligned reads are fine on x86.
    unsafe { core::ptr::read_unaligned(a as *const u32) }
}
fn rd64(a: u64) -> u64 {
    // SAFETY: as rd8.
    unsafe { core::ptr::read_unaligned(a as *const u64) }
}

fn sig_is(a: u64, sig: &[u8; 4]) -> bool {
    rd32(a) == u32::from_le_bytes(*sig)
}

/// One CPU from the MADT: its APIC id and whether it is present (enabled) at boot.
#[derive(Clone, Copy)]
pub struct MadtCpu {
    pub apic_id: u32,
    pub enabled: bool,
}

pub struct AcpiInfo {
    pub cpus: [MadtCpu; MAX_CPUS],
    pub ncpus: usize,
    pub pm1a_evt: u16,
    pub pm1a_cnt: u16,
    pub gpe0_blk: u16,
    pub gpe0_len: u8,
    pub sci: u16,
    pub dsdt: u64,
    pub ioapic: u64,
    pub found_fadt: bool,
    pub found_madt: bool,
    pub rsdp: u64,
}

impl AcpiInfo {
    pub const fn empty() -> Self {
        AcpiInfo {
            cpus: [MadtCpu {
                apic_id: 0,
                enabled: false,
            }; MAX_CPUS],
            ncpus: 0,
            pm1a_evt: 0,
            pm1a_cnt: 0,
            gpe0_blk: 0,
            gpe0_len: 0,
            sci: 0,
            dsdt: 0,
            ioapic: 0xfec0_0000,
            found_fadt: false,
            found_madt: false,
            rsdp: 0,
        }
    }
}

fn rsdp_valid(a: u64) -> bool {
    if rd64(a) != u64::from_le_bytes(*b"RSD PTR ") {
        return false;
    }
    let mut sum: u8 = 0;
    let mut i = 0;
    while i < 20 {
        sum = sum.wrapping_add(rd8(a + i));
        i += 1;
    }
    sum == 0
}

/// Find the RSDP: the boot protocol's pointer first, else the BIOS read-only area.
pub fn find_rsdp(hint: u64) -> u64 {
    if hint != 0 && hint < 0x1_0000_0000 && rsdp_valid(hint) {
        return hint;
    }
    let mut a = 0xe0000u64;
    while a < 0x100000 {
        if rsdp_valid(a) {
            return a;
        }
        a += 16;
    }
    0
}

pub fn parse(info: &mut AcpiInfo, rsdp: u64) {
    info.rsdp = rsdp;
    if rsdp == 0 {
        return;
    }
    let rev = rd8(rsdp + 15);
    let (root, entry_size) = if rev >= 2 && rd64(rsdp + 24) != 0 {
        (rd64(rsdp + 24), 8u64)
    } else {
        (u64::from(rd32(rsdp + 16)), 4u64)
    };
    if root == 0 || root >= 0x1_0000_0000 {
        return;
    }
    let len = u64::from(rd32(root + 4)).min(4096);
    if len < 36 {
        return;
    }
    let n = (len - 36) / entry_size;
    let mut i = 0;
    while i < n {
        let p = root + 36 + i * entry_size;
        let t = if entry_size == 8 {
            rd64(p)
        } else {
            u64::from(rd32(p))
        };
        i += 1;
        if t == 0 || t >= 0x1_0000_0000 {
            continue;
        }
        if sig_is(t, b"APIC") {
            parse_madt(info, t);
        } else if sig_is(t, b"FACP") {
            parse_fadt(info, t);
        }
    }
}

fn add_cpu(info: &mut AcpiInfo, apic_id: u32, flags: u32, online_capable_defined: bool) {
    // Flags: bit 0 enabled, bit 1 online capable (ACPI 6.3, MADT revision 5). Like Linux: from
    // revision 5 on, neither bit means "not a usable CPU"; before it (QEMU's MADT), a disabled
    // entry is a CPU that can be hot-added. APIC id 0xff in an xAPIC entry is no CPU at all.
    let hotpluggable = if online_capable_defined {
        flags & 0x2 != 0
    } else {
        apic_id != 0xff
    };
    if (flags & 1 == 0 && !hotpluggable) || info.ncpus >= MAX_CPUS {
        return;
    }
    if let Some(slot) = info.cpus.get_mut(info.ncpus) {
        *slot = MadtCpu {
            apic_id,
            enabled: flags & 1 != 0,
        };
        info.ncpus += 1;
    }
}

fn parse_madt(info: &mut AcpiInfo, t: u64) {
    info.found_madt = true;
    let len = u64::from(rd32(t + 4)).min(64 * 1024);
    let online_capable_defined = rd8(t + 8) >= 5;
    let mut p = t + 44;
    let mut guard = 0;
    while p + 2 <= t + len && guard < MAX_PRESENT_SCAN {
        guard += 1;
        let typ = rd8(p);
        let elen = u64::from(rd8(p + 1));
        if elen < 2 {
            break;
        }
        match typ {
            0 if elen >= 8 => add_cpu(info, u32::from(rd8(p + 3)), rd32(p + 4), online_capable_defined),
            1 if elen >= 12 => info.ioapic = u64::from(rd32(p + 4)),
            9 if elen >= 16 => add_cpu(info, rd32(p + 4), rd32(p + 8), online_capable_defined),
            _ => {}
        }
        p += elen;
    }
}

fn parse_fadt(info: &mut AcpiInfo, t: u64) {
    let len = rd32(t + 4);
    if len < 116 {
        return;
    }
    info.found_fadt = true;
    info.sci = rd16(t + 46);
    info.pm1a_evt = rd32(t + 56) as u16;
    info.pm1a_cnt = rd32(t + 64) as u16;
    info.gpe0_blk = rd32(t + 80) as u16;
    info.gpe0_len = rd8(t + 92);
    let mut dsdt = u64::from(rd32(t + 40));
    if len >= 148 && rd64(t + 140) != 0 {
        dsdt = rd64(t + 140);
    }
    if dsdt != 0 && dsdt < 0x1_0000_0000 && sig_is(dsdt, b"DSDT") {
        info.dsdt = dsdt;
    }
}

/// Look for `Name(_S5_, Package(){ a, ... })` in the DSDT and return SLP_TYPa.
/// Done only at power-off: a byte scan is slow under the CPL0 emulator.
pub fn find_s5(dsdt: u64) -> u16 {
    let len = u64::from(rd32(dsdt + 4)).min(256 * 1024);
    let mut p = dsdt + 36;
    while p + 8 < dsdt + len {
        if sig_is(p, b"_S5_") && rd8(p + 4) == 0x12 {
            // PackageOp, PkgLength (1-4 bytes), NumElements, first element.
            let lead = rd8(p + 5);
            let pkglen_bytes = 1 + u64::from(lead >> 6);
            let e = p + 5 + pkglen_bytes + 1;
            return match rd8(e) {
                0x00 => 0,
                0x01 => 1,
                0x0a => u16::from(rd8(e + 1)),
                0x0b => rd16(e + 1),
                other => u16::from(other),
            };
        }
        p += 1;
    }
    0
}

/// Find the CPU hotplug register block: the DSDT's `OperationRegion (PRST, SystemIO, base, 12)`
/// (bytes 5B 80 "PRST" 01, then the base as an AML integer). 0 if there is none.
pub fn find_hotplug_base(dsdt: u64) -> u16 {
    if dsdt == 0 {
        return 0;
    }
    let len = u64::from(rd32(dsdt + 4)).min(256 * 1024);
    let mut p = dsdt + 36;
    while p + 10 < dsdt + len {
        if rd8(p) == 0x5b && rd8(p + 1) == 0x80 && sig_is(p + 2, b"PRST") && rd8(p + 6) == 0x01 {
            return match rd8(p + 7) {
                0x0a => u16::from(rd8(p + 8)),
                0x0b => rd16(p + 8),
                0x0c => rd32(p + 8) as u16,
                _ => 0,
            };
        }
        p += 1;
    }
    0
}
