// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest register access sequences (block, offset, width, value, read/write) interleaved with
//! VMM insert/remove requests and snapshot/restore, against the whole ACPI CPU hotplug device.
//! Nothing may panic; the SCI line must equal (status & enable) != 0 and change only on level
//! changes; ejects reach the VMM only for CPUs it asked to remove, never the boot CPU; a
//! restore must reproduce the state and the line level exactly.
#![no_main]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use acpi_cpu_hotplug::{AcpiHotplugDevice, HotplugLayout, HotplugSink, InterruptLine, SleepSink};
use libfuzzer_sys::fuzz_target;
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;

#[derive(Default)]
struct Line(AtomicBool);
impl InterruptLine for Line {
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        assert_ne!(
            self.0.swap(high, Ordering::SeqCst),
            high,
            "set_level without a change"
        );
        Ok(())
    }
}
struct NoSleep;
impl SleepSink for NoSleep {
    fn sleep(&self, _: u8) {}
}
#[derive(Default)]
struct Sink(Mutex<Vec<u32>>);
impl HotplugSink for Sink {
    fn cpu_ejected(&self, cpu: u32) {
        self.0.lock().unwrap().push(cpu);
    }
}

const MAX: u32 = 8;

fuzz_target!(|data: &[u8]| {
    let layout = HotplugLayout::default();
    let ids: Vec<u32> = (0..MAX).collect();
    let sink = Arc::new(Sink::default());
    let mut line = Arc::new(Line::default());
    let mut dev = AcpiHotplugDevice::new(layout, &ids, 2, line.clone(), Arc::new(NoSleep), sink.clone());
    let bases = [
        layout.pm.pm1a_evt,
        layout.pm.pm1a_cnt,
        layout.pm.gpe0,
        layout.cpu_hotplug,
    ];
    let mut requested = [false; MAX as usize];
    for op in data.chunks_exact(6) {
        let width = [1usize, 2, 4, 4][usize::from(op[1] >> 6)];
        let base = PioAddress(bases[usize::from(op[1] & 3)]);
        let offset = u16::from((op[1] >> 2) & 0xf);
        let value = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        match op[0] % 8 {
            0..=2 => {
                // No S5 in the middle of a sequence.
                let v = if base.0 == layout.pm.pm1a_cnt {
                    value & !(1 << 13)
                } else {
                    value
                };
                dev.pio_write(base, offset, &v.to_le_bytes()[..width]);
            }
            3 | 4 => {
                let mut d = [0u8; 4];
                dev.pio_read(base, offset, &mut d[..width]);
            }
            5 => {
                let _ = dev.request_insert(value % (MAX + 1));
            }
            6 => {
                let cpu = value % (MAX + 1);
                if dev.request_remove(cpu).is_ok() {
                    requested[cpu as usize] = true;
                }
            }
            _ => {
                let st = dev.state();
                line = Arc::new(Line::default());
                dev = AcpiHotplugDevice::from_state(
                    layout,
                    &ids,
                    &st,
                    line.clone(),
                    Arc::new(NoSleep),
                    sink.clone(),
                )
                .expect("restore of a state this device produced");
                assert_eq!(dev.state(), st);
            }
        }
        let st = dev.state();
        let gpe = st.pm.gpe0_sts.iter().zip(&st.pm.gpe0_en).any(|(s, e)| s & e != 0);
        assert_eq!(dev.pm().sci_level(), gpe || st.pm.pm1_sts & st.pm.pm1_en != 0);
        assert_eq!(line.0.load(Ordering::SeqCst), dev.pm().sci_level());
        for cpu in sink.0.lock().unwrap().drain(..) {
            assert_ne!(cpu, 0, "boot CPU ejected");
            assert!(
                requested[cpu as usize],
                "eject of CPU {cpu} the VMM did not ask to remove"
            );
            requested[cpu as usize] = false;
        }
    }
});
