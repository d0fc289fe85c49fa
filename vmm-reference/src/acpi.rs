// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ACPI tables for a non-hardware-reduced PC: RSDP, XSDT, FADT (PM1a event/control, GPE0,
//! SCI 9), FACS, MADT (IOAPIC, interrupt source overrides, LAPIC NMI, one entry per possible
//! CPU) and a DSDT (`\_S5_`, COM1, PM resources).
//!
//! Built with `acpi_tables` 0.2. That release has no MADT interrupt-source-override, LAPIC-NMI
//! or x2APIC structures and no MADT flags setter, so the MADT body is assembled here on top of
//! its generic `Sdt` (header and checksum handling stay the crate's).

use acpi_cpu_hotplug::aml::{MADT_ENABLED, MADT_ONLINE_CAPABLE};
use acpi_cpu_hotplug::{madt_cpu_entry, CpuEntry, CpuHotplugAml, HotplugLayout, PmLayout, SLP_TYP_S5};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::{aml, Aml};
use acpi_tables::{facs::FACS, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT};
use vcpu_manager::Topology;

/// OEM id in every table.
pub const OEM_ID: [u8; 6] = *b"RVMMRF";
/// Guest physical address of the RSDP (inside the BIOS read-only area, where an OS scans).
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// End (exclusive) of the area the tables may occupy.
pub const TABLES_END: u64 = 0x0010_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// LAPIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// COM1 ports and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt (ISA IRQ = GSI).
pub const COM1_IRQ: u32 = 4;

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiConfig {
    /// CPU topology (possible CPUs and APIC ids).
    pub topology: Topology,
    /// CPUs present at boot (indices `0..boot_cpus`).
    pub boot_cpus: u32,
    /// PM1/GPE0/SCI and CPU hotplug port layout.
    pub hotplug: HotplugLayout,
}

impl AcpiConfig {
    /// Every possible CPU with its APIC id (from the one topology map).
    pub fn cpus(&self) -> Vec<CpuEntry> {
        (0..self.topology.max_vcpus())
            .map(|i| CpuEntry {
                uid: i,
                apic_id: self.topology.apic_id(i),
            })
            .collect()
    }
}

/// One table and where it goes in guest memory.
#[derive(Clone, Debug)]
pub struct Table {
    /// File name stem: the signature, or `RSDP`.
    pub name: String,
    /// Guest physical address.
    pub addr: u64,
    /// Bytes exactly as the guest sees them.
    pub bytes: Vec<u8>,
}

/// Errors building the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables need {0} bytes, more than the {1} available below 1 MiB")]
    TooLarge(u64, u64),
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

fn set_checksum(table: &mut [u8]) {
    if table.len() < 10 {
        return;
    }
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// The MADT: LAPIC address + PCAT_COMPAT, IOAPIC, ISOs (IRQ0 -> GSI2; IRQ9 level/high for the
/// SCI), NMI on LINT1, and one (x2)APIC entry per possible CPU: present ones enabled, the
/// others online-capable.
pub fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    // Revision 5 (ACPI 6.3): the online-capable flag is defined from this revision on.
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"RVMMMADT", 1);
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, 1); // PCAT_COMPAT: 8259s are present (and masked by the OS)
    let mut body = Vec::new();
    let mut any_x2apic = false;
    for cpu in cfg.cpus() {
        let flags = if cpu.uid < cfg.boot_cpus {
            MADT_ENABLED
        } else {
            MADT_ONLINE_CAPABLE
        };
        let entry = madt_cpu_entry(cpu, flags);
        any_x2apic |= entry[0] == 9;
        body.extend_from_slice(&entry);
    }
    // IOAPIC id 0, GSI base 0.
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // ISA IRQ0 (PIT) -> GSI 2, bus-conforming polarity/trigger.
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // ISA IRQ9 (SCI) -> GSI 9, active high (01), level (11 << 2).
    body.extend_from_slice(&[2, 10, 0, cfg.hotplug.pm.sci_irq]);
    body.extend_from_slice(&u32::from(cfg.hotplug.pm.sci_irq).to_le_bytes());
    body.extend_from_slice(&0x000du16.to_le_bytes());
    // Local APIC NMI: all processors, LINT1, conforming.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    if any_x2apic {
        // Local x2APIC NMI: all processors, LINT1.
        body.extend_from_slice(&[0x0a, 12, 0, 0]);
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&[1, 0, 0, 0]);
    }
    t.append_slice(&body);
    t.as_slice().to_vec()
}

/// The DSDT: `\_S5_` first (the test guest finds it with a short scan), then COM1 and the PM
/// register resources under `\_SB`, then the CPU hotplug AML (`\_SB.PRES`, `\_SB.CPUS`,
/// `\_GPE._E02`) from acpi-cpu-hotplug.
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();
    let s5 = [SLP_TYP_S5, SLP_TYP_S5, 0u8, 0u8];
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5[0], &s5[1], &s5[2], &s5[3]]),
    )
    .to_aml_bytes(&mut body);

    // Each device is serialized in one expression: acpi_tables' builders borrow their
    // children, so temporaries must live until the bytes are written.
    let mut sb = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);
    let pm = cfg.hotplug.pm;
    aml::Device::new(
        "PMRS".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(pm.pm1a_evt, pm.pm1a_evt, 1, PmLayout::PM1_EVT_LEN),
                    &aml::IO::new(pm.pm1a_cnt, pm.pm1a_cnt, 1, PmLayout::PM1_CNT_LEN),
                    &aml::IO::new(pm.gpe0, pm.gpe0, 1, pm.gpe0_len),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);
    body.extend_from_slice(&aml::Scope::raw("\\_SB_".into(), sb));
    CpuHotplugAml {
        io_base: cfg.hotplug.cpu_hotplug,
        cpus: cfg.cpus(),
        boot_cpu: 0,
    }
    .to_aml_bytes(&mut body);

    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"RVMMDSDT", 1);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

/// The FADT: full (not hardware-reduced) ACPI with PM1a event/control and GPE0 in I/O space.
pub fn fadt(cfg: &AcpiConfig, dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let pm = cfg.hotplug.pm;
    let mut f = FADTBuilder::new(OEM_ID, *b"RVMMFACP", 1)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .gpe_info(u32::from(pm.gpe0), 0, pm.gpe0_len, 0, 0);
    f.sci_int = u16::from(pm.sci_irq).into();
    f.pm1a_evt_blk = u32::from(pm.pm1a_evt).into();
    f.pm1a_cnt_blk = u32::from(pm.pm1a_cnt).into();
    f.pm1_evt_len = PmLayout::PM1_EVT_LEN;
    f.pm1_cnt_len = PmLayout::PM1_CNT_LEN;
    // IA-PC boot architecture: no VGA (bit 2), no CMOS RTC (bit 5). No 8042 (bit 1 clear).
    f.iapc_boot_arch = ((1u16 << 2) | (1u16 << 5)).into();
    f.x_pm1a_evt_blk = GAS::new(
        AddressSpace::SystemIo,
        32,
        0,
        AccessSize::WordAccess,
        pm.pm1a_evt.into(),
    );
    f.x_pm1a_cnt_blk = GAS::new(
        AddressSpace::SystemIo,
        16,
        0,
        AccessSize::WordAccess,
        pm.pm1a_cnt.into(),
    );
    f.x_gpe0_blk = GAS::new(
        AddressSpace::SystemIo,
        pm.gpe0_len * 8,
        0,
        AccessSize::ByteAccess,
        pm.gpe0.into(),
    );
    aml_bytes(&f.finalize())
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// All tables with their guest addresses: RSDP at [`RSDP_ADDR`], the rest after it.
pub fn build(cfg: &AcpiConfig) -> Result<Vec<Table>, AcpiError> {
    let dsdt = dsdt(cfg);
    let madt = madt(cfg);
    let facs = aml_bytes(&FACS::new());

    let xsdt_addr = align(RSDP_ADDR + 36, 64);
    // XSDT: header + 2 entries (FADT, MADT).
    let xsdt_len = 36 + 2 * 8;
    let facs_addr = align(xsdt_addr + xsdt_len, 64);
    let fadt_addr = align(facs_addr + facs.len() as u64, 64);
    let fadt_len = aml_bytes(&FADTBuilder::new(OEM_ID, *b"RVMMFACP", 1).finalize()).len() as u64;
    let madt_addr = align(fadt_addr + fadt_len, 64);
    let dsdt_addr = align(madt_addr + madt.len() as u64, 64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > TABLES_END {
        return Err(AcpiError::TooLarge(end - RSDP_ADDR, TABLES_END - RSDP_ADDR));
    }
    let fadt = fadt(cfg, dsdt_addr, facs_addr);
    let mut xsdt = XSDT::new(OEM_ID, *b"RVMMXSDT", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    let mut out = vec![
        Table {
            name: "RSDP".into(),
            addr: RSDP_ADDR,
            bytes: rsdp,
        },
        Table {
            name: "XSDT".into(),
            addr: xsdt_addr,
            bytes: xsdt,
        },
        Table {
            name: "FACS".into(),
            addr: facs_addr,
            bytes: facs,
        },
        Table {
            name: "FACP".into(),
            addr: fadt_addr,
            bytes: fadt,
        },
        Table {
            name: "APIC".into(),
            addr: madt_addr,
            bytes: madt,
        },
        Table {
            name: "DSDT".into(),
            addr: dsdt_addr,
            bytes: dsdt,
        },
    ];
    for t in out.iter_mut() {
        if t.name != "RSDP" && t.name != "FACS" {
            // Defensive: every SDT must sum to zero; acpi_tables does this, keep it true.
            let sum = t.bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
            if sum != 0 {
                set_checksum(&mut t.bytes);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(boot: u32, max: u32) -> AcpiConfig {
        AcpiConfig {
            topology: Topology::new(max),
            boot_cpus: boot,
            hotplug: HotplugLayout::default(),
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_layout() {
        let tables = build(&cfg(2, 8)).unwrap();
        for t in &tables {
            match t.name.as_str() {
                "RSDP" => {
                    assert_eq!(sum(&t.bytes[..20]), 0);
                    assert_eq!(sum(&t.bytes), 0);
                }
                "FACS" => assert_eq!(t.addr % 64, 0),
                _ => {
                    assert_eq!(sum(&t.bytes), 0, "{}", t.name);
                    assert_eq!(&t.bytes[..4], t.name.as_bytes());
                    let len = u32::from_le_bytes(t.bytes[4..8].try_into().unwrap());
                    assert_eq!(len as usize, t.bytes.len());
                }
            }
        }
        let last = tables.last().unwrap();
        assert!(last.addr + last.bytes.len() as u64 <= TABLES_END);
    }

    fn madt_cpus(m: &[u8]) -> Vec<(u8, u32, u32)> {
        let mut v = Vec::new();
        let mut p = 44;
        while p < m.len() {
            let (t, l) = (m[p], m[p + 1] as usize);
            match t {
                0 => v.push((
                    0,
                    u32::from(m[p + 3]),
                    u32::from_le_bytes(m[p + 4..p + 8].try_into().unwrap()),
                )),
                9 => v.push((
                    9,
                    u32::from_le_bytes(m[p + 4..p + 8].try_into().unwrap()),
                    u32::from_le_bytes(m[p + 8..p + 12].try_into().unwrap()),
                )),
                _ => {}
            }
            p += l;
        }
        v
    }

    #[test]
    fn madt_lists_every_possible_cpu() {
        let m = madt(&cfg(2, 8));
        let cpus = madt_cpus(&m);
        assert_eq!(cpus.len(), 8);
        assert_eq!(cpus[0], (0, 0, 1));
        assert_eq!(cpus[1], (0, 1, 1));
        assert!(cpus[2..].iter().all(|c| c.2 == 2));
        assert_eq!(u32::from_le_bytes(m[40..44].try_into().unwrap()), 1);

        let m = madt(&cfg(2, 300));
        let cpus = madt_cpus(&m);
        assert_eq!(cpus.len(), 300);
        assert_eq!(cpus[254].0, 0);
        assert_eq!(cpus[255], (9, 255, 2));
        assert_eq!(cpus[299], (9, 299, 2));
    }

    #[test]
    fn fadt_is_not_hw_reduced_and_has_pm_blocks() {
        let tables = build(&cfg(1, 1)).unwrap();
        let f = &tables.iter().find(|t| t.name == "FACP").unwrap().bytes;
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_eq!(flags & (1 << 20), 0);
        assert_eq!(u16::from_le_bytes(f[46..48].try_into().unwrap()), 9);
        assert_eq!(u32::from_le_bytes(f[56..60].try_into().unwrap()), 0x600);
        assert_eq!(u32::from_le_bytes(f[64..68].try_into().unwrap()), 0x604);
        assert_eq!(u32::from_le_bytes(f[80..84].try_into().unwrap()), 0x620);
        assert_eq!(f[92], 4);
    }

    #[test]
    fn dsdt_starts_with_s5() {
        let d = dsdt(&cfg(1, 1));
        assert_eq!(&d[36..41], &[0x08, b'_', b'S', b'5', b'_']);
    }
}
