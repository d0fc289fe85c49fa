// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Write a DSDT holding the CPU hotplug AML for `max` CPUs (first `boot` present).
//! `cargo run -p acpi-cpu-hotplug --example write_dsdt -- OUT.aml [max]`
use acpi_cpu_hotplug::{aml::CpuEntry, CpuHotplugAml};
use acpi_tables::{sdt::Sdt, Aml};

fn main() {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "DSDT.aml".into());
    let max: u32 = args.next().and_then(|v| v.parse().ok()).unwrap_or(8);
    let aml = CpuHotplugAml {
        io_base: 0x0cd8,
        cpus: (0..max).map(|i| CpuEntry { uid: i, apic_id: i }).collect(),
        boot_cpu: 0,
    };
    let mut body = Vec::new();
    aml.to_aml_bytes(&mut body);
    let mut t = Sdt::new(*b"DSDT", 36, 6, *b"RVMMRF", *b"RVMMDSDT", 1);
    t.append_slice(&body);
    std::fs::write(&out, t.as_slice()).expect("write");
}
