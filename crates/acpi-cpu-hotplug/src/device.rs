// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The whole ACPI CPU hotplug device a VMM registers: PM1a event/control, GPE0, and the CPU
//! hotplug register block, sharing one state so a snapshot holds the pending GPE, the SCI
//! level and the per-CPU flags together (nothing lost, nothing doubled).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;

use crate::aml::{CpuEntry, CpuHotplugAml};
use crate::hotplug::{
    CpuHotplugController, CpuHotplugState, HotplugError, HotplugSink, CPU_HOTPLUG_GPE, REG_LEN,
};
use crate::pm::{AcpiPm, AcpiPmState, InterruptLine, PmLayout, SleepSink};

/// Port layout of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotplugLayout {
    /// PM1a/GPE0/SCI.
    pub pm: PmLayout,
    /// Base of the 12-byte CPU hotplug block (QEMU's q35 uses 0x0cd8 too).
    pub cpu_hotplug: u16,
}

impl Default for HotplugLayout {
    fn default() -> Self {
        HotplugLayout {
            pm: PmLayout::default(),
            cpu_hotplug: 0x0cd8,
        }
    }
}

impl HotplugLayout {
    /// Every (base, length) port range the device answers, for bus registration.
    pub fn pio_ranges(&self) -> [(u16, u16); 4] {
        [
            (self.pm.pm1a_evt, u16::from(PmLayout::PM1_EVT_LEN)),
            (self.pm.pm1a_cnt, u16::from(PmLayout::PM1_CNT_LEN)),
            (self.pm.gpe0, u16::from(self.pm.gpe0_len)),
            (self.cpu_hotplug, REG_LEN),
        ]
    }
}

/// Saved state of [`AcpiHotplugDevice`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiHotplugState {
    /// PM1 and GPE0 registers and the SCI level.
    pub pm: AcpiPmState,
    /// CPU hotplug registers and per-CPU flags.
    pub cpus: CpuHotplugState,
}

/// Errors of the device's VMM-side calls.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The controller refused the request (nothing changed).
    #[error(transparent)]
    Hotplug(#[from] HotplugError),
    /// The SCI line failed ([`InterruptLine::set_level`]): the request was withdrawn, the
    /// guest never saw it, and it can be made again.
    #[error("the SCI could not be raised, so the request was withdrawn: {0}")]
    Sci(#[source] std::io::Error),
}

/// PM1 + GPE0 + CPU hotplug controller.
pub struct AcpiHotplugDevice {
    layout: HotplugLayout,
    pm: AcpiPm,
    cpus: CpuHotplugController,
    sink: Arc<dyn HotplugSink>,
    boot_cpu: u32,
}

impl std::fmt::Debug for AcpiHotplugDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiHotplugDevice")
            .field("pm", &self.pm)
            .field("cpus", &self.cpus)
            .finish()
    }
}

impl AcpiHotplugDevice {
    /// A device for CPUs `0..apic_ids.len()` (the first `present` present), signalling on
    /// `sci`, reporting sleep requests to `sleep` and ejects/OST to `sink`.
    pub fn new(
        layout: HotplugLayout,
        apic_ids: &[u32],
        present: u32,
        sci: Arc<dyn InterruptLine>,
        sleep: Arc<dyn SleepSink>,
        sink: Arc<dyn HotplugSink>,
    ) -> Self {
        let ids = apic_ids.iter().map(|a| u64::from(*a)).collect();
        AcpiHotplugDevice {
            layout,
            pm: AcpiPm::new(layout.pm, sci, sleep),
            cpus: CpuHotplugController::new(ids, present, 0),
            sink,
            boot_cpu: 0,
        }
    }

    /// Rebuild from a snapshot: registers, per-CPU flags, and the SCI level on the new line.
    #[allow(clippy::too_many_arguments)]
    pub fn from_state(
        layout: HotplugLayout,
        apic_ids: &[u32],
        state: &AcpiHotplugState,
        sci: Arc<dyn InterruptLine>,
        sleep: Arc<dyn SleepSink>,
        sink: Arc<dyn HotplugSink>,
    ) -> Result<Self, DeviceError> {
        let mut d = AcpiHotplugDevice::new(layout, apic_ids, 0, sci.clone(), sleep.clone(), sink);
        d.cpus.restore(&state.cpus)?;
        d.pm = AcpiPm::from_state(layout.pm, &state.pm, sci, sleep).map_err(DeviceError::Sci)?;
        Ok(d)
    }

    /// Snapshot.
    pub fn state(&self) -> AcpiHotplugState {
        AcpiHotplugState {
            pm: self.pm.state(),
            cpus: self.cpus.state(),
        }
    }

    /// The layout.
    pub fn layout(&self) -> HotplugLayout {
        self.layout
    }

    /// The controller (read-only: flags, OST, refusal count).
    pub fn controller(&self) -> &CpuHotplugController {
        &self.cpus
    }

    /// The PM block (read-only).
    pub fn pm(&self) -> &AcpiPm {
        &self.pm
    }

    /// VMM: hot-add CPU `cpu`; raises GPE 2 (SCI if the guest enabled it). On an error
    /// nothing changed.
    pub fn request_insert(&mut self, cpu: u32) -> Result<(), DeviceError> {
        let before = self.cpus.state();
        self.cpus.request_insert(cpu)?;
        self.raise_or_roll_back(before)
    }

    /// VMM: ask the guest to remove CPU `cpu`; raises GPE 2. The CPU goes away only when the
    /// guest ejects it ([`HotplugSink::cpu_ejected`]). On an error nothing changed.
    pub fn request_remove(&mut self, cpu: u32) -> Result<(), DeviceError> {
        let before = self.cpus.state();
        self.cpus.request_remove(cpu)?;
        self.raise_or_roll_back(before)
    }

    /// Raise the hotplug GPE for a request just recorded; if the line fails, put the
    /// controller back as it was `before` so that the VMM and the guest still agree.
    fn raise_or_roll_back(&mut self, before: CpuHotplugState) -> Result<(), DeviceError> {
        if let Err(e) = self.pm.set_gpe_status(CPU_HOTPLUG_GPE) {
            self.cpus.restore(&before)?;
            return Err(DeviceError::Sci(e));
        }
        Ok(())
    }

    /// Drive the SCI to the level the registers call for, after the line failed a change
    /// ([`AcpiPm::resync_sci`]).
    pub fn resync_sci(&mut self) -> std::io::Result<()> {
        self.pm.resync_sci()
    }

    /// Withdraw a removal the guest refused or has not taken yet
    /// ([`CpuHotplugController::cancel_remove`]).
    pub fn cancel_remove(&mut self, cpu: u32) -> Result<(), HotplugError> {
        self.cpus.cancel_remove(cpu)
    }

    /// Last `_OST` (event, status) for `cpu`.
    pub fn ost_status(&self, cpu: u32) -> Option<(u32, u32)> {
        self.cpus.ost_status(cpu)
    }

    /// The AML describing this device and its CPUs (append to the DSDT).
    pub fn aml(&self, apic_ids: &[u32]) -> CpuHotplugAml {
        CpuHotplugAml {
            io_base: self.layout.cpu_hotplug,
            cpus: apic_ids
                .iter()
                .enumerate()
                .map(|(i, a)| CpuEntry {
                    uid: i as u32,
                    apic_id: *a,
                })
                .collect(),
            boot_cpu: self.boot_cpu,
        }
    }
}

impl MutDevicePio for AcpiHotplugDevice {
    fn pio_read(&mut self, base: PioAddress, offset: u16, data: &mut [u8]) {
        if base.0 == self.layout.cpu_hotplug {
            self.cpus.read(offset, data);
        } else {
            self.pm.pio_read(base, offset, data);
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: u16, data: &[u8]) {
        if base.0 == self.layout.cpu_hotplug {
            if self.cpus.write(offset, data, &*self.sink) {
                self.pm.latch_gpe_after_guest_write(CPU_HOTPLUG_GPE);
            }
        } else {
            self.pm.pio_write(base, offset, data);
        }
    }
}
