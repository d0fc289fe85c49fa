// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An independent AML interpreter (rust-osdev `acpi` 6.1) evaluates the CPU hotplug AML with
//! its port I/O wired to the real `AcpiHotplugDevice`: `_STA`, `_MAT`, `_EJ0` and `_OST`
//! against real device state, and the eject guard. (That interpreter does not implement
//! Notify yet; the scan's register sequence is replayed against the device in
//! `crates/acpi-cpu-hotplug/tests/protocol.rs` and executed by ACPICA in `tests/acpica.rs`.)

use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use acpi::aml::namespace::AmlName;
use acpi::aml::object::{Object, WrappedObject};
use acpi::aml::{AmlError, Interpreter};
use acpi::platform::AcpiPlatform;
use acpi::{AcpiTables, Handle, PciAddress, PhysicalMapping};
use acpi_cpu_hotplug::{
    madt_cpu_entry, AcpiHotplugDevice, CpuEntry, HotplugLayout, HotplugSink, InterruptLine, SleepSink,
};
use acpi_tables::fadt::FADTBuilder;
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::{rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;

const RSDP: usize = 0xe0000;
const MEM: usize = 0x100000;

#[derive(Default)]
struct Events {
    ejected: Mutex<Vec<u32>>,
    ost: Mutex<Vec<(u32, u32, u32)>>,
}
struct Sink(Arc<Events>);
impl HotplugSink for Sink {
    fn cpu_ejected(&self, cpu: u32) {
        self.0.ejected.lock().unwrap().push(cpu);
    }
    fn ost(&self, cpu: u32, e: u32, s: u32) {
        self.0.ost.lock().unwrap().push((cpu, e, s));
    }
}
struct Line;
impl InterruptLine for Line {
    fn set_level(&self, _: bool) -> std::io::Result<()> {
        Ok(())
    }
}
struct NoSleep;
impl SleepSink for NoSleep {
    fn sleep(&self, _: u8) {}
}

/// "Physical memory" holding the ACPI tables, and the device behind port I/O.
#[derive(Clone)]
struct Host {
    mem: Arc<Vec<u8>>,
    dev: Arc<Mutex<AcpiHotplugDevice>>,
    mutexes: Arc<AtomicU32>,
}

impl Host {
    fn pio(&self, port: u16, data: &mut [u8], write: bool) {
        let mut dev = self.dev.lock().unwrap();
        let ranges = dev.layout().pio_ranges();
        let Some((base, _)) = ranges.iter().find(|(b, l)| port >= *b && port < b + l) else {
            data.fill(0xff);
            return;
        };
        if write {
            dev.pio_write(PioAddress(*base), port - base, data);
        } else {
            dev.pio_read(PioAddress(*base), port - base, data);
        }
    }
    fn rd<const N: usize>(&self, addr: usize) -> [u8; N] {
        let mut b = [0u8; N];
        b.copy_from_slice(&self.mem[addr..addr + N]);
        b
    }
}

impl acpi::Handler for Host {
    unsafe fn map_physical_region<T>(&self, physical_address: usize, size: usize) -> PhysicalMapping<Self, T> {
        assert!(physical_address + size <= MEM, "mapping outside the table area");
        // The pointer is inside `mem`, which lives as long as every clone of the host.
        let ptr = self.mem.as_ptr().wrapping_add(physical_address) as *mut T;
        PhysicalMapping {
            physical_start: physical_address,
            virtual_start: NonNull::new(ptr).unwrap(),
            region_length: size,
            mapped_length: size,
            handler: self.clone(),
        }
    }
    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    fn read_u8(&self, a: usize) -> u8 {
        self.rd::<1>(a)[0]
    }
    fn read_u16(&self, a: usize) -> u16 {
        u16::from_le_bytes(self.rd(a))
    }
    fn read_u32(&self, a: usize) -> u32 {
        u32::from_le_bytes(self.rd(a))
    }
    fn read_u64(&self, a: usize) -> u64 {
        u64::from_le_bytes(self.rd(a))
    }
    fn write_u8(&self, _: usize, _: u8) {
        panic!("the AML must not write memory");
    }
    fn write_u16(&self, _: usize, _: u16) {
        panic!("the AML must not write memory");
    }
    fn write_u32(&self, _: usize, _: u32) {
        panic!("the AML must not write memory");
    }
    fn write_u64(&self, _: usize, _: u64) {
        panic!("the AML must not write memory");
    }
    fn read_io_u8(&self, port: u16) -> u8 {
        let mut d = [0u8; 1];
        self.pio(port, &mut d, false);
        d[0]
    }
    fn read_io_u16(&self, port: u16) -> u16 {
        let mut d = [0u8; 2];
        self.pio(port, &mut d, false);
        u16::from_le_bytes(d)
    }
    fn read_io_u32(&self, port: u16) -> u32 {
        let mut d = [0u8; 4];
        self.pio(port, &mut d, false);
        u32::from_le_bytes(d)
    }
    fn write_io_u8(&self, port: u16, v: u8) {
        self.pio(port, &mut [v], true);
    }
    fn write_io_u16(&self, port: u16, v: u16) {
        self.pio(port, &mut v.to_le_bytes(), true);
    }
    fn write_io_u32(&self, port: u16, v: u32) {
        self.pio(port, &mut v.to_le_bytes(), true);
    }
    fn read_pci_u8(&self, _: PciAddress, _: u16) -> u8 {
        0xff
    }
    fn read_pci_u16(&self, _: PciAddress, _: u16) -> u16 {
        0xffff
    }
    fn read_pci_u32(&self, _: PciAddress, _: u16) -> u32 {
        u32::MAX
    }
    fn write_pci_u8(&self, _: PciAddress, _: u16, _: u8) {}
    fn write_pci_u16(&self, _: PciAddress, _: u16, _: u16) {}
    fn write_pci_u32(&self, _: PciAddress, _: u16, _: u32) {}
    fn nanos_since_boot(&self) -> u64 {
        0
    }
    fn stall(&self, _: u64) {}
    fn sleep(&self, _: u64) {}
    fn create_mutex(&self) -> Handle {
        Handle(self.mutexes.fetch_add(1, Ordering::SeqCst))
    }
    fn acquire(&self, _: Handle, _: u16) -> Result<(), AmlError> {
        Ok(()) // one thread evaluates at a time here
    }
    fn release(&self, _: Handle) {}
}

fn bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// RSDP, XSDT, FADT (PM1a/GPE0 in I/O space) and a DSDT with the device's AML, laid out in
/// a 1 MiB "physical memory".
fn machine(max: u32, present: u32) -> (Host, Arc<Events>, Vec<u32>) {
    let layout = HotplugLayout::default();
    let apic_ids: Vec<u32> = (0..max).collect();
    let events = Arc::new(Events::default());
    let dev = AcpiHotplugDevice::new(
        layout,
        &apic_ids,
        present,
        Arc::new(Line),
        Arc::new(NoSleep),
        Arc::new(Sink(events.clone())),
    );
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, *b"RVMMRF", *b"RVMMDSDT", 1);
    dsdt.append_slice(&bytes(&dev.aml(&apic_ids)));
    let mut madt = Sdt::new(*b"APIC", 44, 5, *b"RVMMRF", *b"RVMMMADT", 1);
    madt.write_u32(36, 0xfee0_0000);
    for (i, a) in apic_ids.iter().enumerate() {
        let flags = if (i as u32) < present { 1 } else { 2 };
        madt.append_slice(&madt_cpu_entry(CpuEntry { uid: i as u32, apic_id: *a }, flags));
    }
    madt.append_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]); // IOAPIC at 0xfec00000
    let (xsdt_at, fadt_at, madt_at, dsdt_at) = (0xe0040usize, 0xe0100usize, 0xe0400usize, 0xe4000usize);
    let mut f = FADTBuilder::new(*b"RVMMRF", *b"RVMMFACP", 1).dsdt_64(dsdt_at as u64);
    let pm = layout.pm;
    f.sci_int = u16::from(pm.sci_irq).into();
    f.pm1a_evt_blk = u32::from(pm.pm1a_evt).into();
    f.pm1a_cnt_blk = u32::from(pm.pm1a_cnt).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.x_pm1a_evt_blk = GAS::new(AddressSpace::SystemIo, 32, 0, AccessSize::WordAccess, pm.pm1a_evt.into());
    f.x_pm1a_cnt_blk = GAS::new(AddressSpace::SystemIo, 16, 0, AccessSize::WordAccess, pm.pm1a_cnt.into());
    let f = f.gpe_info(u32::from(pm.gpe0), 0, pm.gpe0_len, 0, 0);
    let mut xsdt = XSDT::new(*b"RVMMRF", *b"RVMMXSDT", 1);
    xsdt.add_entry(fadt_at as u64);
    xsdt.add_entry(madt_at as u64);
    let mut mem = vec![0u8; MEM];
    for (at, b) in [
        (RSDP, bytes(&Rsdp::new(*b"RVMMRF", xsdt_at as u64))),
        (xsdt_at, bytes(&xsdt)),
        (fadt_at, bytes(&f.finalize())),
        (madt_at, madt.as_slice().to_vec()),
        (dsdt_at, dsdt.as_slice().to_vec()),
    ] {
        mem[at..at + b.len()].copy_from_slice(&b);
    }
    let host = Host { mem: Arc::new(mem), dev: Arc::new(Mutex::new(dev)), mutexes: Arc::default() };
    (host, events, apic_ids)
}

fn interpreter(host: &Host) -> Interpreter<Host> {
    // SAFETY: the RSDP address is inside the host's table memory.
    let tables = unsafe { AcpiTables::from_rsdp(host.clone(), RSDP) }.expect("tables");
    let platform = AcpiPlatform::new(tables, host.clone()).expect("platform");
    Interpreter::new_from_platform(&platform).expect("interpreter")
}

fn eval(i: &Interpreter<Host>, path: &str, args: Vec<WrappedObject>) -> WrappedObject {
    i.evaluate(AmlName::from_str(path).expect("name"), args).unwrap_or_else(|e| panic!("{path}: {e:?}"))
}

fn int(v: u64) -> WrappedObject {
    WrappedObject::new(Object::Integer(v))
}

#[test]
fn sta_reflects_real_presence() {
    let (host, _, _) = machine(8, 3);
    let i = interpreter(&host);
    for cpu in 0..8u32 {
        let v = eval(&i, &format!("\\_SB.CPUS.C{cpu:03X}._STA"), vec![]).as_integer().unwrap();
        assert_eq!(v, if cpu < 3 { 0xf } else { 0 }, "_STA of CPU {cpu}");
    }
    // Hot-add CPU 5 in the device: _STA follows.
    host.dev.lock().unwrap().request_insert(5).unwrap();
    assert_eq!(eval(&i, "\\_SB.CPUS.C005._STA", vec![]).as_integer().unwrap(), 0xf);
}

#[test]
fn mat_is_the_enabled_madt_entry() {
    let (host, _, ids) = machine(300, 1);
    let i = interpreter(&host);
    for cpu in [0u32, 1, 254, 255, 299] {
        let v = eval(&i, &format!("\\_SB.CPUS.C{cpu:03X}._MAT"), vec![]);
        let want = madt_cpu_entry(CpuEntry { uid: cpu, apic_id: ids[cpu as usize] }, 1);
        assert_eq!(v.as_buffer().unwrap(), &want[..], "_MAT of CPU {cpu}");
    }
}

#[test]
fn ej0_reaches_the_sink_only_for_requested_removals() {
    let (host, events, _) = machine(8, 4);
    let i = interpreter(&host);
    // CPU 3 was not asked to go: the guard refuses, nothing reaches the VMM.
    eval(&i, "\\_SB.CPUS.C003._EJ0", vec![int(1)]);
    assert!(events.ejected.lock().unwrap().is_empty());
    assert_eq!(host.dev.lock().unwrap().controller().refused_ejects(), 1);
    assert_eq!(eval(&i, "\\_SB.CPUS.C003._STA", vec![]).as_integer().unwrap(), 0xf);
    // The VMM requests removal of CPU 2: _EJ0 on C002 ejects it.
    host.dev.lock().unwrap().request_remove(2).unwrap();
    eval(&i, "\\_SB.CPUS.C002._EJ0", vec![int(1)]);
    assert_eq!(*events.ejected.lock().unwrap(), vec![2]);
    assert_eq!(eval(&i, "\\_SB.CPUS.C002._STA", vec![]).as_integer().unwrap(), 0);
    // The boot CPU has no _EJ0 at all.
    assert!(i.evaluate(AmlName::from_str("\\_SB.CPUS.C000._EJ0").unwrap(), vec![int(1)]).is_err());
}

#[test]
fn ost_reaches_the_device() {
    let (host, events, _) = machine(8, 2);
    let i = interpreter(&host);
    let buf = WrappedObject::new(Object::Buffer(vec![0]));
    eval(&i, "\\_SB.CPUS.C001._OST", vec![int(0x103), int(0x80), buf]);
    assert_eq!(host.dev.lock().unwrap().ost_status(1), Some((0x103, 0x80)));
    assert_eq!(*events.ost.lock().unwrap(), vec![(1, 0x103, 0x80)]);
}
