// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ACPI fixed-hardware event blocks for a non-hardware-reduced platform.
//!
//! [`AcpiPm`] models the PM1a event block (PM1_STS / PM1_EN), the PM1a control block (SCI_EN,
//! SLP_TYP, SLP_EN) and the GPE0 block (status half, then enable half; status bits are
//! write-one-to-clear). The SCI is a **level**: it is asserted exactly while any status bit is
//! set together with its enable bit, and the [`InterruptLine`] is told only when that level
//! changes. A write of SLP_EN with a sleep type is passed to a [`SleepSink`] (S5 = power off).
//!
//! No KVM inside: the VMM supplies the interrupt line and the sleep sink.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use acpi_cpu_hotplug::{AcpiPm, InterruptLine, PmLayout, SleepSink};
//!
//! #[derive(Default)]
//! struct Line(Mutex<bool>);
//! impl InterruptLine for Line {
//!     fn set_level(&self, high: bool) -> std::io::Result<()> {
//!         *self.0.lock().unwrap() = high;
//!         Ok(())
//!     }
//! }
//! struct NoSleep;
//! impl SleepSink for NoSleep { fn sleep(&self, _slp_typ: u8) {} }
//!
//! let line = Arc::new(Line::default());
//! let mut pm = AcpiPm::new(PmLayout::default(), line.clone(), Arc::new(NoSleep));
//! pm.set_gpe_status(2).unwrap();         // an event, not yet enabled by the guest
//! assert!(!*line.0.lock().unwrap());
//! pm.gpe0_write(2, &[0x04]);             // guest enables GPE 2 (enable half starts at len/2)
//! assert!(*line.0.lock().unwrap());      // SCI asserted
//! pm.gpe0_write(0, &[0x04]);             // guest clears the status bit (write 1 to clear)
//! assert!(!*line.0.lock().unwrap());     // SCI deasserted
//! ```

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod aml;
mod device;
pub mod hotplug;
mod pm;

pub use aml::{madt_cpu_entry, CpuEntry, CpuHotplugAml};
pub use device::{AcpiHotplugDevice, AcpiHotplugState, DeviceError, HotplugLayout};
pub use hotplug::{
    CpuHotplugController, CpuHotplugState, CpuSlot, HotplugError, HotplugSink, CPU_HOTPLUG_GPE,
};
pub use pm::{AcpiPm, AcpiPmState, InterruptLine, PmLayout, SleepSink, SLP_TYP_S5};

// The README's examples are compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
