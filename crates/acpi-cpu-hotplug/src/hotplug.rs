// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! CPU hotplug controller with the register layout of QEMU's "modern CPU hotplug interface"
//! (docs/specs/acpi_cpu_hotplug.rst), so people who know that interface know this one.
//!
//! ```text
//! offset  read                                   write
//! 0x0     command data 2 (u32): cmd 3 -> arch id  CPU selector (u32)
//!         bits 63..32, otherwise 0
//! 0x4     status byte: bit0 enabled (present),    control byte: bit1 clear insert event,
//!         bit1 insert event, bit2 remove event    bit2 clear remove event, bit3 eject
//!                                                 (handled with priority 1 > 2 > 3)
//! 0x5     0                                       command (u8): 0 next CPU with event,
//!                                                 1 OST event, 2 OST status, 3 get CPU id
//! 0x8     command data (u32): cmd 0 -> selector,  command data (u32): cmd 1 -> OST event,
//!         cmd 3 -> arch id bits 31..0             cmd 2 -> OST status (reported to the VMM)
//! ```
//! A selector that names no possible CPU makes every read return 0 and every write other
//! than to the selector be ignored.

use serde::{Deserialize, Serialize};

/// Length of the register block in I/O space.
pub const REG_LEN: u16 = 12;
/// GPE0 status bit the controller raises (`\_GPE._E02`), as QEMU does.
pub const CPU_HOTPLUG_GPE: usize = 2;

/// Command: select the next CPU with a pending insert or remove event (from the selector on,
/// wrapping around).
pub const CMD_GET_NEXT_CPU_WITH_EVENT: u8 = 0;
/// Command: command-data writes go to the selected CPU's OST event.
pub const CMD_OST_EVENT: u8 = 1;
/// Command: command-data writes go to the selected CPU's OST status (and are reported).
pub const CMD_OST_STATUS: u8 = 2;
/// Command: command data reads return the selected CPU's arch (APIC) id.
pub const CMD_GET_CPU_ID: u8 = 3;
const CMD_MAX: u8 = 4;

const STATUS_ENABLED: u8 = 1 << 0;
const STATUS_INSERTING: u8 = 1 << 1;
const STATUS_REMOVING: u8 = 1 << 2;
const CTRL_CLEAR_INSERT: u8 = 1 << 1;
const CTRL_CLEAR_REMOVE: u8 = 1 << 2;
const CTRL_EJECT: u8 = 1 << 3;

/// Receives what the guest does that the VMM must act on. Called with the device lock held:
/// implementations must only record or queue (never wait for vCPUs).
pub trait HotplugSink: Send + Sync {
    /// The guest ejected CPU `cpu` after the VMM asked to remove it: stop and park it.
    fn cpu_ejected(&self, cpu: u32);
    /// The guest reported `_OST` (event, status) for CPU `cpu`.
    fn ost(&self, cpu: u32, event: u32, status: u32) {
        let _ = (cpu, event, status);
    }
}

/// Per-CPU hotplug state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSlot {
    /// The CPU exists (the guest's `_STA` reports it).
    pub present: bool,
    /// Insert event pending for the guest (cleared by the guest).
    pub inserting: bool,
    /// Remove event pending for the guest (cleared by the guest when it takes the event).
    pub removing: bool,
    /// The VMM asked to remove this CPU and the guest has not ejected it yet. Owned by the
    /// VMM: the guest clearing `removing` does not clear it, so the eject guard stays right.
    pub remove_requested: bool,
    /// The guest answered the removal with a failing `_OST` (Linux does when it cannot
    /// offline the CPU): the removal stays requested until the VMM retries or cancels it.
    #[serde(default)]
    pub remove_refused: bool,
    /// Last `_OST` event the guest wrote.
    pub ost_event: u32,
    /// Last `_OST` status the guest wrote.
    pub ost_status: u32,
}

/// Everything guest-visible about the controller, for snapshot and migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuHotplugState {
    /// CPU selector.
    pub selector: u32,
    /// Last command.
    pub command: u8,
    /// One slot per possible CPU.
    pub cpus: Vec<CpuSlot>,
    /// Eject requests refused by the guard so far.
    pub refused_ejects: u64,
}

/// Errors of the VMM-side API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HotplugError {
    /// No such possible CPU.
    #[error("CPU {0} is not a possible CPU")]
    NoSuchCpu(u32),
    /// Insert of a CPU that is already present.
    #[error("CPU {0} is already present")]
    AlreadyPresent(u32),
    /// Remove of a CPU that is not present.
    #[error("CPU {0} is not present")]
    NotPresent(u32),
    /// The boot CPU cannot be removed.
    #[error("CPU {0} is the boot CPU and cannot be removed")]
    BootCpu(u32),
    /// A removal of this CPU is already in progress.
    #[error("removal of CPU {0} is already in progress")]
    RemovalPending(u32),
    /// No removal of this CPU is requested.
    #[error("no removal of CPU {0} is pending")]
    NoRemoval(u32),
    /// A saved state does not fit this controller.
    #[error("saved hotplug state has {found} CPUs, this controller {expected}")]
    StateMismatch {
        /// CPUs in the state.
        found: usize,
        /// CPUs of the controller.
        expected: usize,
    },
}

/// `_OST` source events about removal: the eject request (notify 3) and ejection
/// processing (0x103).
fn is_eject_event(event: u32) -> bool {
    event == 0x03 || event == 0x103
}

/// `_OST` status codes that say an event failed: non-specific failure (1), unrecognized
/// notify (2), and for ejects 0x80-0x83 (not supported, in use, busy, dependency busy).
/// 0x84 (ejection in progress) is not a failure.
fn is_ost_failure(status: u32) -> bool {
    matches!(status, 1 | 2 | 0x80..=0x83)
}

/// The controller: register protocol, per-CPU state machine, eject guard.
pub struct CpuHotplugController {
    arch_ids: Vec<u64>,
    boot_cpu: u32,
    st: CpuHotplugState,
}

impl std::fmt::Debug for CpuHotplugController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuHotplugController")
            .field("state", &self.st)
            .finish()
    }
}

impl CpuHotplugController {
    /// A controller for CPUs `0..arch_ids.len()` (index = ACPI `_UID`, `arch_ids[i]` = APIC id),
    /// the first `present` of them present, CPU `boot_cpu` never removable.
    pub fn new(arch_ids: Vec<u64>, present: u32, boot_cpu: u32) -> Self {
        let cpus = (0..arch_ids.len() as u32)
            .map(|i| CpuSlot {
                present: i < present,
                ..Default::default()
            })
            .collect();
        CpuHotplugController {
            arch_ids,
            boot_cpu,
            st: CpuHotplugState {
                cpus,
                ..Default::default()
            },
        }
    }

    /// Number of possible CPUs.
    pub fn max_cpus(&self) -> u32 {
        self.arch_ids.len() as u32
    }

    /// Snapshot of the state.
    pub fn state(&self) -> CpuHotplugState {
        self.st.clone()
    }

    /// Restore a saved state (same possible-CPU count required).
    pub fn restore(&mut self, state: &CpuHotplugState) -> Result<(), HotplugError> {
        if state.cpus.len() != self.arch_ids.len() {
            return Err(HotplugError::StateMismatch {
                found: state.cpus.len(),
                expected: self.arch_ids.len(),
            });
        }
        self.st = state.clone();
        Ok(())
    }

    /// Slot of CPU `cpu`.
    pub fn slot(&self, cpu: u32) -> Option<&CpuSlot> {
        self.st.cpus.get(cpu as usize)
    }

    /// Whether any insert or remove event is pending for the guest.
    pub fn event_pending(&self) -> bool {
        self.st.cpus.iter().any(|c| c.inserting || c.removing)
    }

    /// Last `_OST` (event, status) the guest reported for `cpu`.
    pub fn ost_status(&self, cpu: u32) -> Option<(u32, u32)> {
        self.slot(cpu).map(|c| (c.ost_event, c.ost_status))
    }

    /// Eject requests the guard refused.
    pub fn refused_ejects(&self) -> u64 {
        self.st.refused_ejects
    }

    fn slot_mut(&mut self, cpu: u32) -> Result<&mut CpuSlot, HotplugError> {
        self.st
            .cpus
            .get_mut(cpu as usize)
            .ok_or(HotplugError::NoSuchCpu(cpu))
    }

    /// VMM: plug CPU `cpu` (it becomes present with an insert event). The caller raises the
    /// GPE ([`CPU_HOTPLUG_GPE`]).
    pub fn request_insert(&mut self, cpu: u32) -> Result<(), HotplugError> {
        let s = self.slot_mut(cpu)?;
        if s.present {
            return Err(HotplugError::AlreadyPresent(cpu));
        }
        *s = CpuSlot {
            present: true,
            inserting: true,
            ..Default::default()
        };
        Ok(())
    }

    /// VMM: ask the guest to remove CPU `cpu` (remove event). The caller raises the GPE.
    pub fn request_remove(&mut self, cpu: u32) -> Result<(), HotplugError> {
        if cpu == self.boot_cpu {
            return Err(HotplugError::BootCpu(cpu));
        }
        let s = self.slot_mut(cpu)?;
        if !s.present {
            return Err(HotplugError::NotPresent(cpu));
        }
        // Busy only while the event waits for the guest to take it: a removal the guest
        // refused, or took and never finished (an OS that lost or ignores it), is raised
        // again, as QEMU does for a repeated device_del.
        if s.remove_requested && s.removing {
            return Err(HotplugError::RemovalPending(cpu));
        }
        // A new request, or a retry: the event is raised again.
        s.removing = true;
        s.remove_requested = true;
        s.remove_refused = false;
        Ok(())
    }

    /// VMM: withdraw the removal of CPU `cpu`, at any stage before its eject. If the guest
    /// took the event and ejects later after all, the eject guard refuses it and announces
    /// the CPU again, so both sides agree it is present; a guest that never finishes cannot
    /// keep hotplug busy for good.
    pub fn cancel_remove(&mut self, cpu: u32) -> Result<(), HotplugError> {
        let s = self.slot_mut(cpu)?;
        if !s.remove_requested {
            return Err(HotplugError::NoRemoval(cpu));
        }
        s.removing = false;
        s.remove_requested = false;
        s.remove_refused = false;
        Ok(())
    }

    fn selected(&self) -> Option<&CpuSlot> {
        self.st.cpus.get(self.st.selector as usize)
    }

    fn read_u32(&self, offset: u16) -> u32 {
        let Some(c) = self.selected() else { return 0 };
        let arch = self.arch_ids.get(self.st.selector as usize).copied().unwrap_or(0);
        match offset {
            0 if self.st.command == CMD_GET_CPU_ID => (arch >> 32) as u32,
            4 => u32::from(
                if c.present { STATUS_ENABLED } else { 0 }
                    | if c.inserting { STATUS_INSERTING } else { 0 }
                    | if c.removing { STATUS_REMOVING } else { 0 },
            ),
            8 => match self.st.command {
                CMD_GET_NEXT_CPU_WITH_EVENT => self.st.selector,
                CMD_GET_CPU_ID => arch as u32,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Guest read at `offset` into the block (1 to 4 bytes).
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        // Assemble the 12-byte register image and return the requested bytes of it.
        let mut image = [0u8; REG_LEN as usize];
        image[0..4].copy_from_slice(&self.read_u32(0).to_le_bytes());
        image[4] = self.read_u32(4) as u8;
        image[8..12].copy_from_slice(&self.read_u32(8).to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = image.get(usize::from(offset) + i).copied().unwrap_or(0);
        }
    }

    /// Guest write at `offset` (1 to 4 bytes); side effects go to `sink`. Returns true when
    /// the write left a new event for the guest (a refused eject re-announces its CPU): the
    /// caller raises the GPE ([`CPU_HOTPLUG_GPE`]).
    pub fn write(&mut self, offset: u16, data: &[u8], sink: &dyn HotplugSink) -> bool {
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        let value = u32::from_le_bytes(b);
        if offset == 0 {
            self.st.selector = value;
            return false;
        }
        let sel = self.st.selector;
        if sel as usize >= self.st.cpus.len() {
            return false;
        }
        match offset {
            4 => return self.write_control(sel, value as u8, sink),
            5 => {
                let cmd = value as u8;
                if cmd >= CMD_MAX {
                    return false;
                }
                self.st.command = cmd;
                if cmd == CMD_GET_NEXT_CPU_WITH_EVENT {
                    self.select_next_event();
                }
            }
            8 => match self.st.command {
                CMD_OST_EVENT => self.st.cpus[sel as usize].ost_event = value,
                CMD_OST_STATUS => {
                    let c = &mut self.st.cpus[sel as usize];
                    c.ost_status = value;
                    if c.remove_requested && is_eject_event(c.ost_event) && is_ost_failure(value) {
                        c.remove_refused = true;
                    }
                    sink.ost(sel, c.ost_event, value);
                }
                _ => {}
            },
            _ => {}
        }
        false
    }

    fn select_next_event(&mut self) {
        let n = self.st.cpus.len() as u32;
        let start = self.st.selector;
        for k in 0..n {
            let i = (start + k) % n;
            let c = &self.st.cpus[i as usize];
            if c.inserting || c.removing {
                self.st.selector = i;
                return;
            }
        }
    }

    fn write_control(&mut self, sel: u32, ctrl: u8, sink: &dyn HotplugSink) -> bool {
        let boot = self.boot_cpu;
        let c = &mut self.st.cpus[sel as usize];
        if ctrl & CTRL_CLEAR_INSERT != 0 {
            c.inserting = false;
        } else if ctrl & CTRL_CLEAR_REMOVE != 0 {
            c.removing = false;
        } else if ctrl & CTRL_EJECT != 0 {
            // The guard: only CPUs the VMM asked to remove, never the boot CPU.
            if sel == boot || !c.remove_requested || !c.present {
                // Saturating: the count comes from a snapshot too.
                self.st.refused_ejects = self.st.refused_ejects.saturating_add(1);
                // A guest ejecting on its own (Linux: the ACPI device's sysfs `eject`) has
                // already torn the CPU down before _EJ0. The CPU stays, so announce it again
                // (Device Check): the guest re-adds it and both sides agree it is present.
                let reannounce = c.present && sel != boot;
                c.inserting |= reannounce;
                // The guest can repeat this at will: logged at the 1st, 2nd, 4th, 8th, ...
                if !self.st.refused_ejects.is_power_of_two() {
                    return reannounce;
                }
                log::warn!(
                    "refused eject of CPU {sel} (boot CPU: {}, removal requested: {}, present: {}); {} refused so far (logged at powers of two)",
                    sel == boot,
                    c.remove_requested,
                    c.present,
                    self.st.refused_ejects
                );
                return reannounce;
            }
            *c = CpuSlot {
                ost_event: c.ost_event,
                ost_status: c.ost_status,
                ..Default::default()
            };
            sink.cpu_ejected(sel);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sink {
        ejected: Mutex<Vec<u32>>,
        ost: Mutex<Vec<(u32, u32, u32)>>,
    }
    impl HotplugSink for Sink {
        fn cpu_ejected(&self, cpu: u32) {
            self.ejected.lock().unwrap().push(cpu);
        }
        fn ost(&self, cpu: u32, e: u32, s: u32) {
            self.ost.lock().unwrap().push((cpu, e, s));
        }
    }

    fn ctl() -> CpuHotplugController {
        CpuHotplugController::new((0..8).map(|i| i * 2).collect(), 2, 0)
    }

    fn rd32(c: &CpuHotplugController, off: u16) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn rd8(c: &CpuHotplugController, off: u16) -> u8 {
        let mut d = [0u8; 1];
        c.read(off, &mut d);
        d[0]
    }

    #[test]
    fn insert_scan_ack() {
        let (mut c, s) = (ctl(), Sink::default());
        c.request_insert(5).unwrap();
        assert!(c.event_pending());
        assert_eq!(c.request_insert(5), Err(HotplugError::AlreadyPresent(5)));
        // CSCN: selector 0, command 0 -> selector moves to 5.
        c.write(0, &0u32.to_le_bytes(), &s);
        c.write(5, &[CMD_GET_NEXT_CPU_WITH_EVENT], &s);
        assert_eq!(rd32(&c, 8), 5);
        assert_eq!(rd8(&c, 4), STATUS_ENABLED | STATUS_INSERTING);
        c.write(4, &[CTRL_CLEAR_INSERT], &s);
        assert_eq!(rd8(&c, 4), STATUS_ENABLED);
        assert!(!c.event_pending());
        // GET_CPU_ID.
        c.write(5, &[CMD_GET_CPU_ID], &s);
        assert_eq!(rd32(&c, 8), 10);
        assert_eq!(rd32(&c, 0), 0);
    }

    #[test]
    fn eject_guard() {
        let (mut c, s) = (ctl(), Sink::default());
        // Ejecting a CPU the VMM did not ask to remove is refused and counted, and the CPU is
        // announced again (the guest may have torn it down already).
        c.write(0, &1u32.to_le_bytes(), &s);
        assert!(c.write(4, &[CTRL_EJECT], &s), "the caller must raise the GPE");
        assert_eq!(c.refused_ejects(), 1);
        assert!(c.slot(1).unwrap().present && c.slot(1).unwrap().inserting);
        c.write(4, &[CTRL_CLEAR_INSERT], &s);
        // The boot CPU is never removable nor ejectable, and never re-announced.
        assert_eq!(c.request_remove(0), Err(HotplugError::BootCpu(0)));
        c.write(0, &0u32.to_le_bytes(), &s);
        assert!(!c.write(4, &[CTRL_EJECT], &s));
        assert_eq!(c.refused_ejects(), 2);
        assert!(!c.event_pending());
        // A requested removal: the guest takes the event (clears `removing`), then ejects.
        c.request_remove(1).unwrap();
        assert_eq!(c.request_remove(1), Err(HotplugError::RemovalPending(1)));
        c.write(0, &1u32.to_le_bytes(), &s);
        c.write(4, &[CTRL_CLEAR_REMOVE], &s);
        assert!(!c.slot(1).unwrap().removing && c.slot(1).unwrap().remove_requested);
        c.write(4, &[CTRL_EJECT], &s);
        assert_eq!(*s.ejected.lock().unwrap(), vec![1]);
        assert!(!c.slot(1).unwrap().present);
        assert_eq!(c.refused_ejects(), 2);
        assert_eq!(c.request_remove(1), Err(HotplugError::NotPresent(1)));
    }

    #[test]
    fn ost_and_out_of_range_selector() {
        let (mut c, s) = (ctl(), Sink::default());
        c.write(0, &1u32.to_le_bytes(), &s);
        c.write(5, &[CMD_OST_EVENT], &s);
        c.write(8, &0x103u32.to_le_bytes(), &s);
        c.write(5, &[CMD_OST_STATUS], &s);
        c.write(8, &0x80u32.to_le_bytes(), &s);
        assert_eq!(c.ost_status(1), Some((0x103, 0x80)));
        assert_eq!(*s.ost.lock().unwrap(), vec![(1, 0x103, 0x80)]);
        // Selector beyond the possible CPUs: reads 0, writes ignored.
        c.write(0, &99u32.to_le_bytes(), &s);
        assert_eq!(rd32(&c, 4) | rd32(&c, 8) | rd32(&c, 0), 0);
        let before = c.state();
        c.write(4, &[CTRL_EJECT], &s);
        c.write(5, &[CMD_OST_EVENT], &s);
        c.write(8, &[1, 2, 3, 4], &s);
        assert_eq!(c.state(), before);
        // Unknown commands are ignored.
        c.write(0, &1u32.to_le_bytes(), &s);
        c.write(5, &[9], &s);
        assert_eq!(c.state().command, CMD_OST_STATUS);
    }

    /// The guest reports `_OST(event, status)` for CPU `cpu`.
    fn ost(c: &mut CpuHotplugController, s: &Sink, cpu: u32, event: u32, status: u32) {
        c.write(0, &cpu.to_le_bytes(), s);
        c.write(5, &[CMD_OST_EVENT], s);
        c.write(8, &event.to_le_bytes(), s);
        c.write(5, &[CMD_OST_STATUS], s);
        c.write(8, &status.to_le_bytes(), s);
    }

    /// A guest that takes the removal event and then neither ejects nor reports kept
    /// resize, remove, add and cancel busy for good (the state survived snapshots too).
    #[test]
    fn a_removal_the_guest_took_and_dropped_is_raised_again_or_withdrawn() {
        let (mut c, s) = (ctl(), Sink::default());
        c.request_remove(1).unwrap();
        c.write(0, &1u32.to_le_bytes(), &s);
        c.write(4, &[CTRL_CLEAR_REMOVE], &s);
        assert!(!c.event_pending());
        // Raised again.
        c.request_remove(1).unwrap();
        assert!(c.event_pending() && c.slot(1).unwrap().removing);
        c.write(4, &[CTRL_CLEAR_REMOVE], &s);
        // Withdrawn while the guest holds it; its late eject is refused and the CPU announced
        // again, so the guest re-adds what it tore down.
        c.cancel_remove(1).unwrap();
        assert!(c.slot(1).unwrap().present && !c.slot(1).unwrap().remove_requested);
        assert!(c.write(4, &[CTRL_EJECT], &s), "the late eject raises the GPE");
        assert!(s.ejected.lock().unwrap().is_empty());
        assert!(c.slot(1).unwrap().present && c.slot(1).unwrap().inserting);
        assert_eq!(c.refused_ejects(), 1);
    }

    /// The refused-eject count comes from a snapshot: it saturates instead of overflowing.
    #[test]
    fn a_saved_refused_eject_count_cannot_overflow() {
        let (mut c, s) = (ctl(), Sink::default());
        let mut st = c.state();
        st.refused_ejects = u64::MAX;
        c.restore(&st).unwrap();
        c.write(0, &1u32.to_le_bytes(), &s);
        c.write(4, &[CTRL_EJECT], &s);
        assert_eq!(c.refused_ejects(), u64::MAX);
    }

    #[test]
    fn a_refused_removal_can_be_retried_and_cancelled() {
        let (mut c, s) = (ctl(), Sink::default());
        c.request_remove(1).unwrap();
        // Nothing refused yet: a second request is busy, a cancel before the guest took the
        // event is fine, and then the CPU stays.
        assert_eq!(c.request_remove(1), Err(HotplugError::RemovalPending(1)));
        c.cancel_remove(1).unwrap();
        assert!(!c.event_pending() && c.slot(1).unwrap().present);
        assert_eq!(c.cancel_remove(1), Err(HotplugError::NoRemoval(1)));
        // The guest takes the event, cannot offline the CPU and says so (Linux: 0x103 or 3
        // with "device busy"): the removal is refused, not stuck.
        c.request_remove(1).unwrap();
        c.write(0, &1u32.to_le_bytes(), &s);
        c.write(4, &[CTRL_CLEAR_REMOVE], &s);
        ost(&mut c, &s, 1, 0x103, 0x82);
        assert!(c.slot(1).unwrap().remove_refused);
        // Retry: the event is raised again.
        c.request_remove(1).unwrap();
        let slot = *c.slot(1).unwrap();
        assert!(slot.removing && slot.remove_requested && !slot.remove_refused);
        // Refused again, then withdrawn.
        c.write(4, &[CTRL_CLEAR_REMOVE], &s);
        ost(&mut c, &s, 1, 0x03, 0x01);
        c.cancel_remove(1).unwrap();
        let slot = *c.slot(1).unwrap();
        assert!(slot.present && !slot.remove_requested && !slot.removing && !slot.remove_refused);
        // Success reports and the in-progress code refuse nothing; neither do other events.
        c.request_remove(1).unwrap();
        for (event, status) in [(0x03, 0x00), (0x103, 0x84), (0x01, 0x82)] {
            ost(&mut c, &s, 1, event, status);
            assert!(!c.slot(1).unwrap().remove_refused);
        }
    }
}
