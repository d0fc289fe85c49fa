// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest register accesses (block, offset, width, value, read/write) and VMM events against
//! the PM1/GPE0 device: never panics, and the SCI line always equals (status & enable) != 0,
//! changing only on level changes.
#![no_main]
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use acpi_cpu_hotplug::{AcpiPm, InterruptLine, PmLayout, SleepSink};
use libfuzzer_sys::fuzz_target;
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;

#[derive(Default)]
struct Line(AtomicBool, AtomicU32);
impl InterruptLine for Line {
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        assert_ne!(
            self.0.swap(high, Ordering::SeqCst),
            high,
            "set_level without a change"
        );
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
struct Sleep;
impl SleepSink for Sleep {
    fn sleep(&self, _: u8) {}
}

fuzz_target!(|data: &[u8]| {
    let layout = PmLayout::default();
    let line = Arc::new(Line::default());
    let mut pm = AcpiPm::new(layout, line.clone(), Arc::new(Sleep));
    for op in data.chunks_exact(4) {
        let base = [layout.pm1a_evt, layout.pm1a_cnt, layout.gpe0, 0x1234][usize::from(op[0] & 3)];
        let width = [1usize, 2, 4, 0][usize::from((op[0] >> 2) & 3)];
        let offset = u16::from(op[1] & 7);
        let mut buf = [op[2], op[3], op[2], op[3]];
        match op[0] >> 4 {
            0..=6 => pm.pio_write(PioAddress(base), offset, &buf[..width]),
            7..=12 => pm.pio_read(PioAddress(base), offset, &mut buf[..width]),
            13 => pm
                .set_gpe_status(usize::from(op[2]))
                .expect("this line never fails"),
            _ => {
                let st = pm.state();
                let fresh = Arc::new(Line::default());
                pm = AcpiPm::from_state(layout, &st, fresh.clone(), Arc::new(Sleep))
                    .expect("this line never fails");
                assert_eq!(pm.state(), st);
                assert_eq!(fresh.0.load(Ordering::SeqCst), pm.sci_level());
                continue;
            }
        }
        let st = pm.state();
        let gpe = st.gpe0_sts.iter().zip(&st.gpe0_en).any(|(s, e)| s & e != 0);
        assert_eq!(pm.sci_level(), gpe || st.pm1_sts & st.pm1_en != 0);
    }
});
