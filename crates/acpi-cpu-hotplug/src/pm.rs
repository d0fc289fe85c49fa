// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! PM1a event/control and GPE0 blocks with a level-triggered SCI.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;

/// An interrupt line the device drives as a level (the SCI).
///
/// Fallible like vm-superio's `Trigger`: an irqfd write can fail. When it does, the device
/// keeps its previous idea of the level, so the next status or enable change (or
/// [`AcpiPm::resync_sci`]) drives the line again: a failure delays the SCI, it never loses it.
pub trait InterruptLine: Send + Sync {
    /// Set the line level; called only when the level changes.
    fn set_level(&self, high: bool) -> std::io::Result<()>;
}

/// Receives the guest's sleep requests (PM1a_CNT with SLP_EN set).
pub trait SleepSink: Send + Sync {
    /// The guest asked to enter the sleep state whose SLP_TYP value is `slp_typ`.
    fn sleep(&self, slp_typ: u8);
}

/// SLP_TYP value this device family advertises for S5 (soft off) in the DSDT's `\_S5_`.
pub const SLP_TYP_S5: u8 = 5;

/// PM1 events that have an enable bit and can raise the SCI: TMR (0), GBL (5), PWRBTN (8),
/// SLPBTN (9), RTC (10). PM1_EN's other bits are reserved (read 0, writes ignored), and status
/// bits without an enable (e.g. WAK_STS) never assert the SCI.
const PM1_EVENTS: u16 = (1 << 0) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 10);
const PM1_CNT_SCI_EN: u16 = 1;
const PM1_CNT_SLP_EN: u16 = 1 << 13;

/// Where the blocks live in I/O port space, and the SCI's interrupt number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmLayout {
    /// PM1a_EVT_BLK base (4 bytes: PM1_STS, PM1_EN).
    pub pm1a_evt: u16,
    /// PM1a_CNT_BLK base (2 bytes).
    pub pm1a_cnt: u16,
    /// GPE0_BLK base.
    pub gpe0: u16,
    /// GPE0_BLK length in bytes (even; half status, half enable). At most 16.
    pub gpe0_len: u8,
    /// SCI interrupt (ISA IRQ / GSI), level, active high.
    pub sci_irq: u8,
}

impl Default for PmLayout {
    fn default() -> Self {
        PmLayout {
            pm1a_evt: 0x600,
            pm1a_cnt: 0x604,
            gpe0: 0x620,
            gpe0_len: 4,
            sci_irq: 9,
        }
    }
}

impl PmLayout {
    /// Length of the PM1a event block in bytes.
    pub const PM1_EVT_LEN: u8 = 4;
    /// Length of the PM1a control block in bytes.
    pub const PM1_CNT_LEN: u8 = 2;

    fn half(&self) -> usize {
        usize::from(self.gpe0_len.min(16) / 2)
    }
}

/// The complete guest-visible state of [`AcpiPm`], for snapshot and migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// PM1_STS.
    pub pm1_sts: u16,
    /// PM1_EN.
    pub pm1_en: u16,
    /// PM1_CNT (SCI_EN always reads 1; SLP_EN never stays set).
    pub pm1_cnt: u16,
    /// GPE0 status bytes.
    pub gpe0_sts: Vec<u8>,
    /// GPE0 enable bytes.
    pub gpe0_en: Vec<u8>,
    /// SCI level last driven on the line.
    pub sci_level: bool,
}

/// PM1a event + control blocks and the GPE0 block, with a level SCI.
pub struct AcpiPm {
    layout: PmLayout,
    st: AcpiPmState,
    line: Arc<dyn InterruptLine>,
    sleep: Arc<dyn SleepSink>,
    /// Times the line refused a level change the guest's writes caused.
    sci_failures: u64,
}

impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPm")
            .field("layout", &self.layout)
            .field("state", &self.st)
            .finish()
    }
}

impl AcpiPm {
    /// A device in its power-on state (SCI low).
    pub fn new(layout: PmLayout, line: Arc<dyn InterruptLine>, sleep: Arc<dyn SleepSink>) -> Self {
        let half = layout.half();
        AcpiPm {
            layout,
            st: AcpiPmState {
                pm1_cnt: PM1_CNT_SCI_EN,
                gpe0_sts: vec![0; half],
                gpe0_en: vec![0; half],
                ..Default::default()
            },
            line,
            sleep,
            sci_failures: 0,
        }
    }

    /// Rebuild from a saved state; drives the line to the saved level so nothing is lost. An
    /// error is the line's: the device is not returned, since its SCI would not be raised.
    pub fn from_state(
        layout: PmLayout,
        state: &AcpiPmState,
        line: Arc<dyn InterruptLine>,
        sleep: Arc<dyn SleepSink>,
    ) -> std::io::Result<Self> {
        let mut pm = AcpiPm::new(layout, line, sleep);
        let half = layout.half();
        for (d, s) in pm.st.gpe0_sts.iter_mut().zip(state.gpe0_sts.iter().take(half)) {
            *d = *s;
        }
        for (d, s) in pm.st.gpe0_en.iter_mut().zip(state.gpe0_en.iter().take(half)) {
            *d = *s;
        }
        pm.st.pm1_sts = state.pm1_sts;
        pm.st.pm1_en = state.pm1_en & PM1_EVENTS;
        pm.st.pm1_cnt = (state.pm1_cnt | PM1_CNT_SCI_EN) & !PM1_CNT_SLP_EN;
        // Recompute the level from status/enable rather than trusting the saved flag.
        pm.st.sci_level = false;
        pm.update_sci()?;
        Ok(pm)
    }

    /// Snapshot of the state.
    pub fn state(&self) -> AcpiPmState {
        self.st.clone()
    }

    /// The layout this device was built with.
    pub fn layout(&self) -> PmLayout {
        self.layout
    }

    /// Current SCI level.
    pub fn sci_level(&self) -> bool {
        self.st.sci_level
    }

    /// Times the line failed a level change that a guest write caused (each is retried at
    /// the next change, or by [`AcpiPm::resync_sci`]).
    pub fn sci_failures(&self) -> u64 {
        self.sci_failures
    }

    /// Set GPE status bit `gpe` (an event happened); raises the SCI if the guest enabled it.
    /// Out-of-range GPE numbers are ignored. If the line fails, the status bit is left as it
    /// was and the error returned: the event did not happen.
    pub fn set_gpe_status(&mut self, gpe: usize) -> std::io::Result<()> {
        let Some(b) = self.st.gpe0_sts.get_mut(gpe / 8) else {
            return Ok(());
        };
        let before = *b;
        *b |= 1 << (gpe % 8);
        self.update_sci().inspect_err(|_| {
            if let Some(b) = self.st.gpe0_sts.get_mut(gpe / 8) {
                *b = before;
            }
        })
    }

    /// Set GPE status bit `gpe` because of a guest write (a refused eject re-announces its
    /// CPU): the bit stays set even if the line fails, and the SCI follows at the next change.
    pub(crate) fn latch_gpe_after_guest_write(&mut self, gpe: usize) {
        if let Some(b) = self.st.gpe0_sts.get_mut(gpe / 8) {
            *b |= 1 << (gpe % 8);
        }
        self.update_sci_after_guest_write();
    }

    /// Drive the line to the level the registers call for, if an earlier change failed.
    pub fn resync_sci(&mut self) -> std::io::Result<()> {
        self.update_sci()
    }

    fn pending(&self) -> bool {
        let gpe = self
            .st
            .gpe0_sts
            .iter()
            .zip(self.st.gpe0_en.iter())
            .any(|(s, e)| s & e != 0);
        gpe || (self.st.pm1_sts & self.st.pm1_en & PM1_EVENTS) != 0
    }

    fn update_sci(&mut self) -> std::io::Result<()> {
        let level = self.pending();
        if level != self.st.sci_level {
            self.line.set_level(level)?;
            self.st.sci_level = level;
        }
        Ok(())
    }

    /// After a guest write: a failure cannot be returned to the guest, so it is counted and
    /// logged (at powers of two: the guest can cause writes at will), and retried later.
    fn update_sci_after_guest_write(&mut self) {
        if let Err(e) = self.update_sci() {
            self.sci_failures += 1;
            if self.sci_failures.is_power_of_two() {
                log::error!("the SCI line failed: {e} ({} failures so far)", self.sci_failures);
            }
        }
    }

    /// Guest read of the PM1a event block at `offset`.
    pub fn pm1_evt_read(&self, offset: u16, data: &mut [u8]) {
        let bytes = [self.st.pm1_sts.to_le_bytes(), self.st.pm1_en.to_le_bytes()].concat();
        read_bytes(&bytes, offset, data);
    }

    /// Guest write of the PM1a event block at `offset` (STS: write 1 to clear; EN: plain).
    pub fn pm1_evt_write(&mut self, offset: u16, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let o = usize::from(offset) + i;
            match o {
                0 | 1 => self.st.pm1_sts &= !(u16::from(*b) << (8 * o)),
                2 | 3 => {
                    let sh = 8 * (o - 2);
                    let v = (self.st.pm1_en & !(0xff << sh)) | (u16::from(*b) << sh);
                    self.st.pm1_en = v & PM1_EVENTS;
                }
                _ => {}
            }
        }
        self.update_sci_after_guest_write();
    }

    /// Guest read of the PM1a control block.
    pub fn pm1_cnt_read(&self, offset: u16, data: &mut [u8]) {
        read_bytes(&self.st.pm1_cnt.to_le_bytes(), offset, data);
    }

    /// Guest write of the PM1a control block; SLP_EN with a sleep type calls the sleep sink.
    pub fn pm1_cnt_write(&mut self, offset: u16, data: &[u8]) {
        let mut v = self.st.pm1_cnt;
        for (i, b) in data.iter().enumerate() {
            let o = usize::from(offset) + i;
            if o < 2 {
                v = (v & !(0xff << (8 * o))) | (u16::from(*b) << (8 * o));
            }
        }
        let slp_en = v & PM1_CNT_SLP_EN != 0;
        // SCI_EN is hardwired to 1 (no legacy mode); SLP_EN is write-only and reads 0.
        self.st.pm1_cnt = (v | PM1_CNT_SCI_EN) & !PM1_CNT_SLP_EN;
        if slp_en {
            let typ = ((v >> 10) & 7) as u8;
            // Debug only: a guest can repeat this at will; the sink decides what to report.
            log::debug!("guest requested sleep, SLP_TYP={typ}");
            // No WAK_STS: nothing here resumes from a sleep state; S5 ends the VM.
            self.sleep.sleep(typ);
        }
        self.update_sci_after_guest_write();
    }

    /// Guest read of the GPE0 block at `offset`.
    pub fn gpe0_read(&self, offset: u16, data: &mut [u8]) {
        let bytes = [self.st.gpe0_sts.as_slice(), self.st.gpe0_en.as_slice()].concat();
        read_bytes(&bytes, offset, data);
    }

    /// Guest write of the GPE0 block at `offset` (status half W1C, enable half plain).
    pub fn gpe0_write(&mut self, offset: u16, data: &[u8]) {
        let half = self.layout.half();
        for (i, b) in data.iter().enumerate() {
            let o = usize::from(offset) + i;
            if o < half {
                if let Some(s) = self.st.gpe0_sts.get_mut(o) {
                    *s &= !*b;
                }
            } else if let Some(e) = self.st.gpe0_en.get_mut(o - half) {
                *e = *b;
            }
        }
        self.update_sci_after_guest_write();
    }
}

fn read_bytes(src: &[u8], offset: u16, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = src.get(usize::from(offset) + i).copied().unwrap_or(0);
    }
}

impl MutDevicePio for AcpiPm {
    fn pio_read(&mut self, base: PioAddress, offset: u16, data: &mut [u8]) {
        match base.0 {
            b if b == self.layout.pm1a_evt => self.pm1_evt_read(offset, data),
            b if b == self.layout.pm1a_cnt => self.pm1_cnt_read(offset, data),
            b if b == self.layout.gpe0 => self.gpe0_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: u16, data: &[u8]) {
        match base.0 {
            b if b == self.layout.pm1a_evt => self.pm1_evt_write(offset, data),
            b if b == self.layout.pm1a_cnt => self.pm1_cnt_write(offset, data),
            b if b == self.layout.gpe0 => self.gpe0_write(offset, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Line {
        level: Mutex<bool>,
        changes: Mutex<u32>,
        /// While set, every level change fails (an irqfd write that returns an error).
        broken: Mutex<bool>,
    }
    impl InterruptLine for Line {
        fn set_level(&self, high: bool) -> std::io::Result<()> {
            if *self.broken.lock().unwrap() {
                return Err(std::io::Error::other("irqfd write failed"));
            }
            let mut l = self.level.lock().unwrap();
            assert_ne!(*l, high, "set_level called without a level change");
            *l = high;
            *self.changes.lock().unwrap() += 1;
            Ok(())
        }
    }
    #[derive(Default)]
    struct Sleep(Mutex<Vec<u8>>);
    impl SleepSink for Sleep {
        fn sleep(&self, t: u8) {
            self.0.lock().unwrap().push(t);
        }
    }

    fn dev() -> (AcpiPm, Arc<Line>, Arc<Sleep>) {
        let line = Arc::new(Line::default());
        let sleep = Arc::new(Sleep::default());
        (
            AcpiPm::new(PmLayout::default(), line.clone(), sleep.clone()),
            line,
            sleep,
        )
    }

    #[test]
    fn s5_request_reaches_sink_and_sci_en_reads_one() {
        let (mut pm, _, sleep) = dev();
        let mut d = [0u8; 2];
        pm.pio_read(PioAddress(0x604), 0, &mut d);
        assert_eq!(u16::from_le_bytes(d) & 1, 1);
        let v: u16 = (u16::from(SLP_TYP_S5) << 10) | (1 << 13);
        pm.pio_write(PioAddress(0x604), 0, &v.to_le_bytes());
        assert_eq!(*sleep.0.lock().unwrap(), vec![SLP_TYP_S5]);
        pm.pio_read(PioAddress(0x604), 0, &mut d);
        assert_eq!(u16::from_le_bytes(d) & (1 << 13), 0, "SLP_EN reads 0");
    }

    #[test]
    fn word_access_to_gpe0() {
        let (mut pm, line, _) = dev();
        pm.set_gpe_status(9).unwrap();
        pm.pio_write(PioAddress(0x620), 2, &0x0200u16.to_le_bytes());
        assert!(*line.level.lock().unwrap());
        let mut d = [0u8; 4];
        pm.pio_read(PioAddress(0x620), 0, &mut d);
        assert_eq!(d, [0, 2, 0, 2]);
        pm.pio_write(PioAddress(0x620), 0, &0x0200u16.to_le_bytes());
        assert!(!*line.level.lock().unwrap());
    }

    #[test]
    fn sleep_with_all_pm1_enables_does_not_raise_sci() {
        // Found by the acpi_pm_registers fuzz target: PM1_EN all ones, then an S5 request.
        let (mut pm, line, sleep) = dev();
        pm.pio_write(PioAddress(0x600), 0, &[0xff, 0xff, 0xff, 0xff]);
        pm.pio_write(PioAddress(0x604), 0, &0x71abu16.to_le_bytes());
        assert_eq!(sleep.0.lock().unwrap().len(), 1);
        assert!(!pm.sci_level());
        assert!(!*line.level.lock().unwrap());
        let mut d = [0u8; 4];
        pm.pio_read(PioAddress(0x600), 0, &mut d);
        assert_eq!(
            u16::from_le_bytes([d[2], d[3]]),
            0x0721,
            "reserved PM1_EN bits read 0"
        );
    }

    #[test]
    fn pm1_event_raises_sci_when_enabled() {
        let (mut pm, line, _) = dev();
        pm.st.pm1_sts |= 1 << 8; // power button pressed
        pm.update_sci().unwrap();
        assert!(!*line.level.lock().unwrap());
        pm.pio_write(PioAddress(0x600), 2, &[0x00, 0x01]);
        assert!(*line.level.lock().unwrap());
        pm.pio_write(PioAddress(0x600), 0, &[0x00, 0x01]);
        assert!(!*line.level.lock().unwrap());
    }

    #[test]
    fn a_failing_line_delays_the_sci_and_loses_no_event() {
        let (mut pm, line, _) = dev();
        pm.gpe0_write(2, &[0x04]);
        *line.broken.lock().unwrap() = true;
        // A VMM-raised event whose SCI cannot be raised did not happen: status unchanged.
        assert!(pm.set_gpe_status(2).is_err());
        assert_eq!(pm.state().gpe0_sts[0], 0);
        assert!(!pm.sci_level());
        // Raised once the line works.
        *line.broken.lock().unwrap() = false;
        pm.set_gpe_status(2).unwrap();
        assert!(*line.level.lock().unwrap() && pm.sci_level());
        // A guest write whose level change fails is counted, and the level stays high in
        // the device's view until the line takes the change.
        *line.broken.lock().unwrap() = true;
        pm.gpe0_write(0, &[0x04]);
        assert_eq!(pm.sci_failures(), 1);
        assert!(pm.sci_level() && *line.level.lock().unwrap());
        assert!(pm.resync_sci().is_err());
        *line.broken.lock().unwrap() = false;
        pm.resync_sci().unwrap();
        assert!(!pm.sci_level() && !*line.level.lock().unwrap());
        // Restoring onto a failing line is refused.
        let st = AcpiPmState {
            gpe0_sts: vec![4, 0],
            gpe0_en: vec![4, 0],
            ..pm.state()
        };
        *line.broken.lock().unwrap() = true;
        let sleep: Arc<dyn SleepSink> = Arc::new(Sleep::default());
        assert!(AcpiPm::from_state(PmLayout::default(), &st, line.clone(), sleep).is_err());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Event(usize),
        Write(u8, u16, u8),
        Save,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..20).prop_map(Op::Event),
            (0u8..3, 0u16..5, any::<u8>()).prop_map(|(b, o, v)| Op::Write(b, o, v)),
            Just(Op::Save),
        ]
    }

    proptest! {
        #[test]
        fn sci_level_tracks_status_and_enable(ops in proptest::collection::vec(op(), 0..64)) {
            let (mut pm, mut line, _) = dev();
            let layout = pm.layout();
            for o in ops {
                match o {
                    Op::Event(g) => pm.set_gpe_status(g).unwrap(),
                    Op::Write(blk, off, v) => {
                        let base = [layout.pm1a_evt, layout.gpe0, layout.gpe0][usize::from(blk)];
                        pm.pio_write(PioAddress(base), off, &[v]);
                    }
                    Op::Save => {
                        let st = pm.state();
                        // Restore onto a fresh (low) line, as a destination VMM does: the
                        // saved level must come back on it.
                        line = Arc::new(Line::default());
                        pm = AcpiPm::from_state(layout, &st, line.clone(), Arc::new(Sleep::default())).unwrap();
                        prop_assert_eq!(pm.state(), st);
                    }
                }
                prop_assert_eq!(pm.sci_level(), pm.pending());
                prop_assert_eq!(*line.level.lock().unwrap(), pm.sci_level());
            }
        }
    }
}
