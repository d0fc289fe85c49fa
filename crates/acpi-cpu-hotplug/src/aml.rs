// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! AML for the CPU hotplug controller, built with acpi_tables' AML builder, plus the MADT
//! entry helper the VMM shares with `_MAT`.
//!
//! ```text
//! Scope (\_SB) {
//!   Device (PRES) { _HID PNP0A06, _UID "CPU Hotplug resources", _CRS IO(base, 12), Mutex CPLK,
//!                   OperationRegion PRST SystemIO base 12,
//!                   Field ByteAcc WriteAsZeros { Offset(4), CPEN 1, CINS 1, CRMV 1, CEJ0 1, 4, CCMD 8 },
//!                   Field DWordAcc Preserve { CSEL 32, 32, CDAT 32 } }
//!   Device (CPUS) { _HID ACPI0010, _CID PNP0A05, CSTA, CEJ0, COST, CTFY, CSCN,
//!                   Device (Cnnn) { _HID ACPI0007, _UID n, _STA, _MAT, _EJ0 (not the boot CPU), _OST } ... }
//! }
//! Scope (\_GPE) { Method (_E02) { \_SB.CPUS.CSCN () } }
//! ```
//! CSCN asks the device for the next CPU with an event (command 0), notifies it (1 = device
//! check for inserts, 3 = eject request for removes), acknowledges the event, and repeats; it
//! runs at most `max_cpus` rounds, so no register value can keep the guest's ACPI thread busy.

use acpi_tables::aml::{
    Acquire, Add, Arg, BufferData, Device, EISAName, Else, Equal, Field, FieldAccessType, FieldEntry,
    FieldLockRule, FieldUpdateRule, If, LessThan, Local, Method, MethodCall, Mutex, Name, Notify, OpRegion,
    OpRegionSpace, Path, Release, ResourceTemplate, Return, Scope, Store, While, IO, ONE, ZERO,
};
use acpi_tables::{Aml, AmlSink};

use crate::hotplug::{CMD_GET_NEXT_CPU_WITH_EVENT, CMD_OST_EVENT, CMD_OST_STATUS, REG_LEN};

/// One possible CPU as the AML and MADT describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuEntry {
    /// ACPI processor UID (the CPU index).
    pub uid: u32,
    /// APIC id.
    pub apic_id: u32,
}

/// MADT flags: enabled.
pub const MADT_ENABLED: u32 = 1;
/// MADT flags: online capable (hot-pluggable, not enabled at boot; MADT revision 5+).
pub const MADT_ONLINE_CAPABLE: u32 = 2;

/// The MADT entry for a CPU: a Processor Local APIC (type 0) when both UID and APIC id fit
/// (APIC id < 255), otherwise a Processor Local x2APIC (type 9). Used for the MADT and, with
/// [`MADT_ENABLED`], for `_MAT` (Linux expects `_MAT` enabled even for CPUs the MADT lists as
/// not enabled).
pub fn madt_cpu_entry(cpu: CpuEntry, flags: u32) -> Vec<u8> {
    if cpu.apic_id < 255 && cpu.uid < 256 {
        let mut v = vec![0, 8, cpu.uid as u8, cpu.apic_id as u8];
        v.extend_from_slice(&flags.to_le_bytes());
        v
    } else {
        let mut v = vec![9, 16, 0, 0];
        v.extend_from_slice(&cpu.apic_id.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&cpu.uid.to_le_bytes());
        v
    }
}

/// ACPI device name of CPU `uid`: `C000` ... `CFFF`.
pub fn cpu_device_name(uid: u32) -> String {
    format!("C{:03X}", uid & 0xfff)
}

/// The CPU hotplug AML: `\_SB.PRES`, `\_SB.CPUS` with one device per possible CPU, and
/// `\_GPE._E02`. Append its bytes to the DSDT.
#[derive(Clone, Debug)]
pub struct CpuHotplugAml {
    /// I/O base of the register block.
    pub io_base: u16,
    /// Every possible CPU, in UID order.
    pub cpus: Vec<CpuEntry>,
    /// UID of the boot CPU (gets no `_EJ0`).
    pub boot_cpu: u32,
}

const PRES: &str = "\\_SB_.PRES";
const CPLK: &str = "\\_SB_.PRES.CPLK";
const CSEL: &str = "\\_SB_.PRES.CSEL";
const CDAT: &str = "\\_SB_.PRES.CDAT";
const CCMD: &str = "\\_SB_.PRES.CCMD";
const CPEN: &str = "\\_SB_.PRES.CPEN";
const CINS: &str = "\\_SB_.PRES.CINS";
const CRMV: &str = "\\_SB_.PRES.CRMV";
const CEJ0_FIELD: &str = "\\_SB_.PRES.CEJ0";

fn p(s: &str) -> Path {
    Path::new(s)
}

impl CpuHotplugAml {
    fn pres(&self, sink: &mut dyn AmlSink) {
        let base = self.io_base;
        let len = REG_LEN;
        Device::new(
            p(PRES),
            vec![
                &Name::new("_HID".into(), &EISAName::new("PNP0A06")),
                &Name::new("_UID".into(), &"CPU Hotplug resources"),
                &Name::new(
                    "_CRS".into(),
                    &ResourceTemplate::new(vec![&IO::new(base, base, 1, len as u8)]),
                ),
                &Mutex::new("CPLK".into(), 0),
                &OpRegion::new("PRST".into(), OpRegionSpace::SystemIO, &base, &len),
                &Field::new(
                    "PRST".into(),
                    FieldAccessType::Byte,
                    FieldLockRule::NoLock,
                    FieldUpdateRule::WriteAsZeroes,
                    vec![
                        FieldEntry::Reserved(32),
                        FieldEntry::Named(*b"CPEN", 1),
                        FieldEntry::Named(*b"CINS", 1),
                        FieldEntry::Named(*b"CRMV", 1),
                        FieldEntry::Named(*b"CEJ0", 1),
                        FieldEntry::Reserved(4),
                        FieldEntry::Named(*b"CCMD", 8),
                    ],
                ),
                &Field::new(
                    "PRST".into(),
                    FieldAccessType::DWord,
                    FieldLockRule::NoLock,
                    FieldUpdateRule::Preserve,
                    vec![
                        FieldEntry::Named(*b"CSEL", 32),
                        FieldEntry::Reserved(32),
                        FieldEntry::Named(*b"CDAT", 32),
                    ],
                ),
            ],
        )
        .to_aml_bytes(sink);
    }

    fn methods(&self, out: &mut Vec<u8>) {
        let acquire = Acquire::new(p(CPLK), 0xffff);
        let release = Release::new(p(CPLK));
        // CSTA(uid): 0xF if present, else 0.
        Method::new(
            "CSTA".into(),
            1,
            true,
            vec![
                &acquire,
                &Store::new(&p(CSEL), &Arg(0)),
                &Store::new(&Local(0), &ZERO),
                &If::new(&Equal::new(&p(CPEN), &ONE), vec![&Store::new(&Local(0), &0xfu8)]),
                &release,
                &Return::new(&Local(0)),
            ],
        )
        .to_aml_bytes(out);
        // CEJ0(uid): ask the device to eject (the device's guard decides).
        Method::new(
            "CEJ0".into(),
            1,
            true,
            vec![
                &acquire,
                &Store::new(&p(CSEL), &Arg(0)),
                &Store::new(&p(CEJ0_FIELD), &ONE),
                &release,
            ],
        )
        .to_aml_bytes(out);
        // COST(uid, event, status): report _OST.
        Method::new(
            "COST".into(),
            3,
            true,
            vec![
                &acquire,
                &Store::new(&p(CSEL), &Arg(0)),
                &Store::new(&p(CCMD), &CMD_OST_EVENT),
                &Store::new(&p(CDAT), &Arg(1)),
                &Store::new(&p(CCMD), &CMD_OST_STATUS),
                &Store::new(&p(CDAT), &Arg(2)),
                &release,
            ],
        )
        .to_aml_bytes(out);
        // CTFY(uid, event): Notify the CPU device with that UID.
        let names: Vec<Path> = self.cpus.iter().map(|c| p(&cpu_device_name(c.uid))).collect();
        let uids: Vec<u32> = self.cpus.iter().map(|c| c.uid).collect();
        let conds: Vec<Equal> = uids.iter().map(|u| Equal::new(&Arg(0), u)).collect();
        let notifies: Vec<Notify> = names.iter().map(|n| Notify::new(n, &Arg(1))).collect();
        let ifs: Vec<If> = conds
            .iter()
            .zip(notifies.iter())
            .map(|(c, n)| If::new(c, vec![n]))
            .collect();
        Method::new(
            "CTFY".into(),
            2,
            true,
            ifs.iter().map(|i| i as &dyn Aml).collect(),
        )
        .to_aml_bytes(out);
        // CSCN: bounded scan; Local1 counts rounds, Local0 says whether this round found one.
        let max = self.cpus.len() as u32;
        Method::new(
            "CSCN".into(),
            0,
            true,
            vec![
                &acquire,
                // Start the search at CPU 0: a selector the OS left at or beyond the last CPU
                // makes the device ignore the command, and the event would wait for the next GPE.
                &Store::new(&p(CSEL), &ZERO),
                &Store::new(&Local(1), &ZERO),
                &While::new(
                    &LessThan::new(&Local(1), &max),
                    vec![
                        &Store::new(&p(CCMD), &CMD_GET_NEXT_CPU_WITH_EVENT),
                        &Store::new(&Local(2), &p(CDAT)),
                        &Store::new(&Local(0), &ZERO),
                        &If::new(
                            &Equal::new(&p(CINS), &ONE),
                            vec![
                                &MethodCall::new("CTFY".into(), vec![&Local(2), &ONE]),
                                &Store::new(&p(CINS), &ONE),
                                &Store::new(&Local(0), &ONE),
                            ],
                        ),
                        &If::new(
                            &Equal::new(&p(CRMV), &ONE),
                            vec![
                                &MethodCall::new("CTFY".into(), vec![&Local(2), &3u8]),
                                &Store::new(&p(CRMV), &ONE),
                                &Store::new(&Local(0), &ONE),
                            ],
                        ),
                        &If::new(&Equal::new(&Local(0), &ZERO), vec![&Store::new(&Local(1), &max)]),
                        &Else::new(vec![&Add::new(&Local(1), &Local(1), &ONE)]),
                    ],
                ),
                &release,
            ],
        )
        .to_aml_bytes(out);
    }

    fn cpu_device(&self, cpu: &CpuEntry, out: &mut Vec<u8>) {
        let uid = cpu.uid;
        let mat = BufferData::new(madt_cpu_entry(*cpu, MADT_ENABLED));
        let csta = MethodCall::new("CSTA".into(), vec![&uid]);
        let ret = Return::new(&csta);
        let sta = Method::new("_STA".into(), 0, false, vec![&ret]);
        let cej0 = MethodCall::new("CEJ0".into(), vec![&uid]);
        let ej0 = Method::new("_EJ0".into(), 1, false, vec![&cej0]);
        let cost = MethodCall::new("COST".into(), vec![&uid, &Arg(0), &Arg(1)]);
        let ost = Method::new("_OST".into(), 3, false, vec![&cost]);
        let hid = Name::new("_HID".into(), &"ACPI0007");
        let uid_name = Name::new("_UID".into(), &uid);
        let mat_name = Name::new("_MAT".into(), &mat);
        let mut children: Vec<&dyn Aml> = vec![&hid, &uid_name, &sta, &mat_name, &ost];
        if uid != self.boot_cpu {
            children.push(&ej0);
        }
        Device::new(p(&cpu_device_name(uid)), children).to_aml_bytes(out);
    }
}

impl Aml for CpuHotplugAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mut sb = Vec::new();
        self.pres(&mut sb);
        let mut cpus = Vec::new();
        Name::new("_HID".into(), &"ACPI0010").to_aml_bytes(&mut cpus);
        Name::new("_CID".into(), &EISAName::new("PNP0A05")).to_aml_bytes(&mut cpus);
        self.methods(&mut cpus);
        for c in &self.cpus {
            self.cpu_device(c, &mut cpus);
        }
        Device::new("CPUS".into(), vec![&Raw(cpus)]).to_aml_bytes(&mut sb);
        sink.vec(&Scope::raw("\\_SB_".into(), sb));
        let mut gpe = Vec::new();
        Method::new(
            "_E02".into(),
            0,
            false,
            vec![&MethodCall::new("\\_SB_.CPUS.CSCN".into(), vec![])],
        )
        .to_aml_bytes(&mut gpe);
        sink.vec(&Scope::raw("\\_GPE".into(), gpe));
    }
}

/// Already-encoded AML, so large generated blocks can be nested without keeping every
/// builder object alive at once (acpi_tables' builders borrow their children).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn madt_entries() {
        assert_eq!(
            madt_cpu_entry(CpuEntry { uid: 3, apic_id: 3 }, 1),
            vec![0, 8, 3, 3, 1, 0, 0, 0]
        );
        let x = madt_cpu_entry(
            CpuEntry {
                uid: 300,
                apic_id: 300,
            },
            2,
        );
        assert_eq!(x.len(), 16);
        assert_eq!(x[0], 9);
        assert_eq!(u32::from_le_bytes(x[4..8].try_into().unwrap()), 300);
        assert_eq!(u32::from_le_bytes(x[12..16].try_into().unwrap()), 300);
        assert_eq!(
            madt_cpu_entry(
                CpuEntry {
                    uid: 254,
                    apic_id: 255
                },
                1
            )[0],
            9
        );
    }

    #[test]
    fn names() {
        assert_eq!(cpu_device_name(0), "C000");
        assert_eq!(cpu_device_name(299), "C12B");
    }
}
