// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Register protocol of the whole device (PM1 + GPE0 + CPU hotplug):
//! - random interleavings of VMM requests and guest accesses never panic, never lose a
//!   pending event, and keep SCI level == (status & enable) != 0;
//! - save/restore at any point is invisible to the rest of the sequence;
//! - the exact accesses the AML's CSCN makes, replayed against the device, produce the right
//!   notifications and terminate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use acpi_cpu_hotplug::{
    AcpiHotplugDevice, AcpiHotplugState, HotplugLayout, HotplugSink, InterruptLine, SleepSink,
    CPU_HOTPLUG_GPE,
};
use proptest::prelude::*;
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;

#[derive(Default)]
struct Line(AtomicBool);
impl InterruptLine for Line {
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        assert_ne!(
            self.0.swap(high, Ordering::SeqCst),
            high,
            "set_level without a level change"
        );
        Ok(())
    }
}
struct NoSleep;
impl SleepSink for NoSleep {
    fn sleep(&self, _: u8) {}
}
#[derive(Default)]
struct Sink(Mutex<Vec<String>>);
impl HotplugSink for Sink {
    fn cpu_ejected(&self, cpu: u32) {
        self.0.lock().unwrap().push(format!("eject {cpu}"));
    }
    fn ost(&self, cpu: u32, e: u32, s: u32) {
        self.0.lock().unwrap().push(format!("ost {cpu} {e} {s}"));
    }
}

const MAX: u32 = 6;

struct Rig {
    dev: AcpiHotplugDevice,
    line: Arc<Line>,
    sink: Arc<Sink>,
}

fn ids() -> Vec<u32> {
    (0..MAX).map(|i| i * 2).collect()
}

fn rig() -> Rig {
    let (line, sink) = (Arc::new(Line::default()), Arc::new(Sink::default()));
    let dev = AcpiHotplugDevice::new(
        HotplugLayout::default(),
        &ids(),
        2,
        line.clone(),
        Arc::new(NoSleep),
        sink.clone(),
    );
    Rig { dev, line, sink }
}

fn restore(r: &Rig, st: &AcpiHotplugState) -> Rig {
    let (line, sink) = (Arc::new(Line::default()), r.sink.clone());
    let dev = AcpiHotplugDevice::from_state(
        HotplugLayout::default(),
        &ids(),
        st,
        line.clone(),
        Arc::new(NoSleep),
        sink.clone(),
    )
    .expect("restore");
    Rig { dev, line, sink }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u32),
    Remove(u32),
    /// Guest access: block (0 PM1 evt, 1 PM1 cnt, 2 GPE0, 3 CPU hotplug), offset, width, value.
    Write(u8, u16, u8, u32),
    Read(u8, u16, u8),
    Save,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..MAX + 1).prop_map(Op::Insert),
        (0..MAX + 1).prop_map(Op::Remove),
        (0u8..4, 0u16..12, 0u8..3, any::<u32>()).prop_map(|(b, o, w, v)| Op::Write(b, o, w, v)),
        (0u8..4, 0u16..12, 0u8..3).prop_map(|(b, o, w)| Op::Read(b, o, w)),
        Just(Op::Save),
    ]
}

fn base(b: u8) -> PioAddress {
    let l = HotplugLayout::default();
    PioAddress([l.pm.pm1a_evt, l.pm.pm1a_cnt, l.pm.gpe0, l.cpu_hotplug][usize::from(b)])
}

/// Apply one op; returns what the guest read (for comparing two runs).
fn apply(r: &mut Rig, o: &Op) -> Vec<u8> {
    let width = |w: u8| [1usize, 2, 4][usize::from(w)];
    match o {
        Op::Insert(c) => {
            let ok = r.dev.request_insert(*c).is_ok();
            vec![u8::from(ok)]
        }
        Op::Remove(c) => {
            let ok = r.dev.request_remove(*c).is_ok();
            vec![u8::from(ok)]
        }
        Op::Write(b, off, w, v) => {
            // Keep the guest from powering the machine off mid-sequence: SLP_EN stays clear.
            let v = if *b == 1 { v & !(1 << 13) } else { *v };
            r.dev.pio_write(base(*b), *off, &v.to_le_bytes()[..width(*w)]);
            vec![]
        }
        Op::Read(b, off, w) => {
            let mut d = vec![0u8; width(*w)];
            r.dev.pio_read(base(*b), *off, &mut d);
            d
        }
        Op::Save => vec![],
    }
}

fn check(r: &Rig) -> Result<(), TestCaseError> {
    let st = r.dev.state();
    let gpe = st.pm.gpe0_sts.iter().zip(&st.pm.gpe0_en).any(|(s, e)| s & e != 0);
    let pm1 = st.pm.pm1_sts & st.pm.pm1_en != 0;
    prop_assert_eq!(r.dev.pm().sci_level(), gpe || pm1);
    prop_assert_eq!(r.line.0.load(Ordering::SeqCst), r.dev.pm().sci_level());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn interleavings_keep_the_invariants(ops in prop::collection::vec(op(), 0..80)) {
        let mut r = rig();
        // Which CPUs have a VMM request whose event the guest has not taken yet.
        for o in &ops {
            let gpe_before = r.dev.state().pm.gpe0_sts[0] & (1 << CPU_HOTPLUG_GPE) != 0;
            let out = apply(&mut r, o);
            check(&r)?;
            match o {
                Op::Insert(c) | Op::Remove(c) if out == vec![1] => {
                    // A request always leaves its event pending and GPE 2 set.
                    let s = *r.dev.controller().slot(*c).unwrap();
                    prop_assert!(s.inserting || s.removing);
                    prop_assert!(r.dev.state().pm.gpe0_sts[0] & (1 << CPU_HOTPLUG_GPE) != 0);
                }
                Op::Insert(_) | Op::Remove(_) => {
                    // A refused request changes nothing the guest can see.
                    prop_assert_eq!(r.dev.state().pm.gpe0_sts[0] & (1 << CPU_HOTPLUG_GPE) != 0, gpe_before);
                }
                _ => {}
            }
            // A remove event exists only for a VMM-requested removal; an insert only for a
            // present CPU.
            for c in r.dev.controller().state().cpus {
                prop_assert!(!c.removing || c.remove_requested);
                prop_assert!(!c.inserting || c.present);
                prop_assert!(!c.remove_requested || c.present);
            }
        }
    }

    #[test]
    fn save_restore_is_invisible(ops in prop::collection::vec(op(), 0..80)) {
        let mut a = rig();
        let mut b = rig();
        for o in &ops {
            if let Op::Save = o {
                // Restore `b` from its own snapshot onto a fresh line: the line comes back at
                // the saved level, and everything that follows must match `a` exactly.
                let st = b.dev.state();
                let json = serde_json::to_string(&st).unwrap();
                let st2: AcpiHotplugState = serde_json::from_str(&json).unwrap();
                b = restore(&b, &st2);
                prop_assert_eq!(b.line.0.load(Ordering::SeqCst), a.line.0.load(Ordering::SeqCst));
            }
            let (ra, rb) = (apply(&mut a, o), apply(&mut b, o));
            prop_assert_eq!(ra, rb);
            prop_assert_eq!(a.dev.state(), b.dev.state());
            check(&b)?;
        }
        prop_assert_eq!(a.sink.0.lock().unwrap().clone(), b.sink.0.lock().unwrap().clone());
    }
}

/// The AML's CSCN, access by access (Field ByteAcc/WriteAsZeros for CPEN..CCMD at 4..5,
/// DWordAcc for CSEL at 0 and CDAT at 8), against the device. Returns the Notify calls.
fn cscn(dev: &mut AcpiHotplugDevice, max: u32) -> Vec<(u32, u32)> {
    let hp = base(3);
    let mut notes = Vec::new();
    let mut rounds = 0;
    dev.pio_write(hp, 0, &0u32.to_le_bytes()); // CSEL = 0: the search starts at CPU 0
    while rounds < max {
        dev.pio_write(hp, 5, &[0]); // CCMD = 0: next CPU with event
        let mut d = [0u8; 4];
        dev.pio_read(hp, 8, &mut d); // Local2 = CDAT
        let sel = u32::from_le_bytes(d);
        let mut found = false;
        let mut f = [0u8; 1];
        dev.pio_read(hp, 4, &mut f);
        if f[0] & 2 != 0 {
            notes.push((sel, 1)); // CTFY(Local2, 1)
            dev.pio_write(hp, 4, &[2]); // CINS = 1 (WriteAsZeros: other bits 0)
            found = true;
        }
        dev.pio_read(hp, 4, &mut f);
        if f[0] & 4 != 0 {
            notes.push((sel, 3)); // CTFY(Local2, 3)
            dev.pio_write(hp, 4, &[4]); // CRMV = 1
            found = true;
        }
        rounds = if found { rounds + 1 } else { max };
    }
    notes
}

#[test]
fn cscn_replay_notifies_each_event_once_and_terminates() {
    let mut r = rig();
    // Guest enables GPE 2 (enable half of GPE0 starts at byte 2).
    r.dev.pio_write(base(2), 2, &[1 << CPU_HOTPLUG_GPE]);
    r.dev.request_insert(2).unwrap();
    r.dev.request_insert(5).unwrap();
    r.dev.request_remove(1).unwrap();
    assert!(r.line.0.load(Ordering::SeqCst), "SCI asserted");
    // OSPM clears the GPE status, then runs _E02 -> CSCN.
    r.dev.pio_write(base(2), 0, &[1 << CPU_HOTPLUG_GPE]);
    assert!(!r.line.0.load(Ordering::SeqCst));
    let notes = cscn(&mut r.dev, MAX);
    assert_eq!(notes, vec![(1, 3), (2, 1), (5, 1)]);
    assert!(!r.dev.controller().event_pending());
    assert!(cscn(&mut r.dev, MAX).is_empty(), "nothing twice");
    // The removal is still owned by the VMM until the guest ejects: _EJ0 on CPU 1.
    assert!(r.dev.controller().slot(1).unwrap().remove_requested);
    r.dev.pio_write(base(3), 0, &1u32.to_le_bytes());
    r.dev.pio_write(base(3), 4, &[8]);
    assert_eq!(*r.sink.0.lock().unwrap(), vec!["eject 1".to_string()]);
}

#[test]
fn a_selector_left_beyond_the_last_cpu_does_not_hide_an_event() {
    let mut r = rig();
    r.dev.pio_write(base(2), 2, &[1 << CPU_HOTPLUG_GPE]);
    // The OS left the selector out of range (probing, or a CPU number it computed itself).
    r.dev.pio_write(base(3), 0, &(MAX + 7).to_le_bytes());
    r.dev.request_insert(5).unwrap();
    r.dev.pio_write(base(2), 0, &[1 << CPU_HOTPLUG_GPE]);
    assert_eq!(cscn(&mut r.dev, MAX), vec![(5, 1)]);
    assert!(!r.dev.controller().event_pending());
}

#[test]
fn event_during_scan_is_not_lost() {
    let mut r = rig();
    r.dev.pio_write(base(2), 2, &[1 << CPU_HOTPLUG_GPE]);
    r.dev.request_insert(3).unwrap();
    r.dev.pio_write(base(2), 0, &[1 << CPU_HOTPLUG_GPE]);
    // The scan takes CPU 3; meanwhile the VMM inserts CPU 4 (after the guest cleared GPE).
    let first = cscn(&mut r.dev, MAX);
    r.dev.request_insert(4).unwrap();
    assert_eq!(first, vec![(3, 1)]);
    assert!(
        r.line.0.load(Ordering::SeqCst),
        "the new event raises the SCI again"
    );
    r.dev.pio_write(base(2), 0, &[1 << CPU_HOTPLUG_GPE]);
    assert_eq!(cscn(&mut r.dev, MAX), vec![(4, 1)]);
}
