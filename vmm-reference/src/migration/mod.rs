// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration between two VMM processes over a Unix or TCP socket, with KVM dirty
//! logging and `vm-live-migration`'s pre-copy driver.
//!
//! Source (`PUT /api/v1/vm.send-migration`): connect (on TCP, answer the destination's token
//! challenge), send Hello with the VM's compatibility description and wait for Accept (the
//! destination checks CPU count, vendor, CPU features, memory and versions *before*
//! anything is paused), turn on dirty logging, copy all RAM and then dirty pages in rounds
//! until the rest fits the downtime target, pause, send the last dirty pages and the state,
//! and stop only once the destination says it has restored the VM (Ack), then send
//! Complete. Any failure before the Ack turns dirty logging off, tells the destination to
//! drop its copy (Abandon) and resumes the VM: nothing is lost. The whole migration is
//! bounded by `timeout_ms` and can be cancelled (`vm.cancel-migration`) until the Ack.
//!
//! A guest that dirties memory faster than the link drains it does not converge within
//! `max_rounds`; the caller chooses what then happens ([`TimeoutStrategy`]).
//!
//! Destination ([`receive`]): see `receive.rs`.

mod link;
mod receive;
mod throttle;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_live_migration::auth::{self, Token};
use vm_live_migration::memory::MemoryLayout;
use vm_live_migration::protocol::{
    recv, send, Convergence, DirtySource, FrameLimits, Message, Precopy, PrecopyOptions, RoundStats,
    PROTOCOL_VERSION,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use link::{Address, Stream};
pub use receive::{receive, IncomingOptions, ReceiveControl};

use crate::error::ControlError;
use crate::exits::VmEvent;
use crate::machine::register_memory;
use crate::pause::PauseGuard;
use crate::snapshot::Compat;
pub use crate::status::MigrationStatus;
use crate::vm::VmInner;
use link::Link;

/// States of `VmInner::migration_ctl`: one atomic, so a cancel and the commit cannot both win.
pub(crate) mod ctl {
    /// Running (or none).
    pub const RUNNING: u8 = 0;
    /// `vm.cancel-migration` came first: the migration fails and the VM stays here.
    pub const CANCELLED: u8 = 1;
    /// The destination acknowledged the state: the VM is theirs, a cancel is too late.
    pub const COMMITTED: u8 = 2;
}

/// What to do when pre-copy has not converged after `max_rounds` (the expected downtime is
/// still above `downtime_ms`). Cloud Hypervisor's `timeout_strategy` has the first two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutStrategy {
    /// Give up: the VM keeps running here, the destination drops its copy.
    Cancel,
    /// Stop and copy anyway, with a longer downtime than asked for.
    #[default]
    Ignore,
    /// Slow the guest down (its vCPUs paused for a growing share of every 100 ms, up to
    /// 95 %) for up to 8 more rounds; then stop and copy.
    Throttle,
}

/// How to migrate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendOptions {
    /// Pre-copy tuning (downtime target, round limit).
    pub precopy: PrecopyOptions,
    /// The whole migration, from connecting to the destination's Ack (`timeout_ms`).
    pub deadline: Duration,
    /// Longest time the destination may make no progress on a read or write.
    pub stall: Duration,
    /// What to do if pre-copy does not converge.
    pub strategy: TimeoutStrategy,
    /// The token a TCP destination demands.
    pub token: Option<Token>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            precopy: PrecopyOptions::default(),
            deadline: Duration::from_secs(600),
            stall: Duration::from_secs(30),
            strategy: TimeoutStrategy::default(),
            token: None,
        }
    }
}

/// The source's report, returned by `vm.send-migration`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationReport {
    /// Pre-copy rounds (round 0 is all RAM).
    pub rounds: Vec<RoundReport>,
    /// Bytes of RAM sent after the pause.
    pub final_bytes: u64,
    /// Bytes of state sent.
    pub state_bytes: u64,
    /// Time from the pause to the destination's acknowledgement (ms).
    pub downtime_ms: f64,
    /// Whole migration (ms).
    pub total_ms: f64,
}

/// One pre-copy round.
#[derive(Clone, Debug, Serialize)]
pub struct RoundReport {
    /// Round number.
    pub round: u32,
    /// Bytes sent.
    pub bytes: u64,
    /// Seconds.
    pub secs: f64,
    /// Pages dirtied meanwhile.
    pub dirtied_pages: u64,
    /// Dirty rate (pages/s).
    pub dirty_rate: f64,
    /// Expected downtime for what was left (ms).
    pub expected_downtime_ms: f64,
    /// Share of the time the guest's vCPUs were held paused during the round.
    pub throttle_percent: u32,
}

impl RoundReport {
    fn of(r: &RoundStats, throttle_percent: u32) -> Self {
        RoundReport {
            round: r.round,
            bytes: r.bytes,
            secs: r.secs,
            dirtied_pages: r.dirtied,
            dirty_rate: r.dirtied as f64 / r.secs.max(1e-6),
            expected_downtime_ms: r.expected_downtime_ms,
            throttle_percent,
        }
    }
}

/// KVM's dirty log over the VM's RAM slots.
struct KvmDirty<'a> {
    inner: &'a VmInner,
}

impl DirtySource for KvmDirty<'_> {
    fn regions(&self) -> Vec<(u64, u64)> {
        self.inner
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }
    fn take_dirty(&mut self) -> std::io::Result<Vec<Vec<u64>>> {
        let vm = self.inner.vm.lock().unwrap_or_else(|e| e.into_inner());
        // The VMM's own devices never write guest RAM (COM1 and the ACPI block are port I/O),
        // so KVM's log is the whole dirty set.
        self.inner
            .mem
            .iter()
            .enumerate()
            .map(|(slot, r)| {
                vm.get_dirty_log(slot as u32, r.len() as usize)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            })
            .collect()
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner
            .mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
    fn populated(&self, index: usize) -> Option<Vec<u64>> {
        let r = self.inner.mem.iter().nth(index)?;
        // Only anonymous RAM: a page never touched there is zero. (RAM restored from a
        // snapshot is file-backed: its untouched pages hold the image's bytes.)
        if r.file_offset().is_some() {
            return None;
        }
        let host = self.inner.mem.get_host_address(r.start_addr()).ok()? as u64;
        vm_live_migration::memory::populated_pages(host, r.len()).ok()
    }
}

/// The token in `path`: a regular file of UTF-8 text, 16 to 4096 bytes once a trailing
/// newline is dropped.
pub fn token_from_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let what = |e: &dyn std::fmt::Display| format!("token file {}: {e}", path.display());
    let f = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| what(&e))?;
    if !f.metadata().map_err(|e| what(&e))?.is_file() {
        return Err(what(&"not a regular file"));
    }
    let mut text = String::new();
    f.take(vm_live_migration::auth::MAX_TOKEN_LEN as u64 + 3)
        .read_to_string(&mut text)
        .map_err(|e| what(&e))?;
    let t = text.strip_suffix('\n').unwrap_or(&text);
    let t = t.strip_suffix('\r').unwrap_or(t).to_string();
    Token::new(t.clone().into_bytes()).map_err(|e| what(&e))?;
    Ok(t)
}

fn internal(what: &str) -> impl Fn(&dyn std::fmt::Display) -> ControlError + '_ {
    move |e| ControlError::Internal(format!("{what}: {e}"))
}

/// A refusal from the destination is the caller's to fix (400); anything else is ours (500).
fn peer_error(what: &str) -> impl Fn(vm_live_migration::protocol::ProtocolError) -> ControlError + '_ {
    move |e| match e {
        vm_live_migration::protocol::ProtocolError::Peer(why) => {
            ControlError::BadRequest(format!("the destination refused: {why}"))
        }
        e => ControlError::Internal(format!("{what}: {e}")),
    }
}

impl VmInner {
    /// Live-migrate this VM to the VMM listening at `dest`. On success the VM runs there and
    /// this VMM ends (its `wait` returns `Migrated`); on any failure the VM keeps running here.
    pub fn send_migration(&self, dest: &str, opts: &SendOptions) -> Result<MigrationReport, ControlError> {
        let addr = Address::parse(dest).map_err(ControlError::BadRequest)?;
        if addr.needs_token() && opts.token.is_none() {
            return Err(ControlError::BadRequest(
                "a tcp: destination demands the migration token: give it as \"token\"".into(),
            ));
        }
        // A capture already running answers busy at once, not after it ends.
        self.not_migrating()?;
        let hello = self.hello()?;
        if self.migrating.swap(true, Ordering::SeqCst) {
            return Err(ControlError::Busy(
                "a snapshot or migration is in progress".into(),
            ));
        }
        self.migration_ctl.store(ctl::RUNNING, Ordering::SeqCst);
        let mut logging = false;
        self.set_migration_phase("connecting", None);
        let result = self.migrate_inner(&addr, opts, &mut logging, hello);
        match &result {
            Ok(_) => self.set_migration_phase("done", None),
            Err(e) => self.set_migration_phase("failed", Some(e.to_string())),
        }
        if result.is_err() {
            // Nothing was handed over: logging off, vCPUs on, the VM is ours as before.
            if logging {
                let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = register_memory(&vm, &self.mem, 0) {
                    log::error!("turning dirty logging off: {e}");
                }
            }
            // (The vCPUs already run again: the pause guard of `hand_over` resumed them.)
            self.resume_input();
            self.migrating.store(false, Ordering::SeqCst);
        }
        result
    }

    /// `vm.cancel-migration`: end the outgoing migration before the destination has the VM;
    /// it keeps running here.
    pub fn cancel_migration(&self) -> Result<(), ControlError> {
        let phase = self
            .migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.phase);
        if !matches!(phase, Some("connecting" | "precopy" | "stopping"))
            || !self.migrating.load(Ordering::SeqCst)
        {
            return Err(ControlError::BadRequest(
                "no outgoing migration is in progress".into(),
            ));
        }
        match self.migration_ctl.compare_exchange(
            ctl::RUNNING,
            ctl::CANCELLED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) | Err(ctl::CANCELLED) => Ok(()),
            Err(_) => Err(ControlError::BadRequest(
                "too late to cancel: the destination has the VM".into(),
            )),
        }
    }

    fn set_migration_phase(&self, phase: &'static str, error: Option<String>) {
        let mut st = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = st.take().unwrap_or_default();
        if phase == "connecting" {
            s = MigrationStatus::default();
            self.wire_bytes.store(0, Ordering::SeqCst);
        }
        s.phase = phase;
        s.error = error;
        *st = Some(s);
    }

    /// The current or last migration as `vm.info` and `vm.migration-status` show it. Takes
    /// no vCPU lock: it answers while a migration holds the vCPUs.
    pub fn migration_status(&self) -> Option<MigrationStatus> {
        let mut st = self.migration.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        if !matches!(st.phase, "awaiting-complete" | "received" | "incomplete") {
            st.wire_bytes = self.wire_bytes.load(Ordering::SeqCst);
        }
        Some(st)
    }

    /// Destination: record where the incoming migration stands; while `migrating`, control
    /// operations (`vm.resume` among them) answer busy.
    pub(crate) fn incoming_phase(&self, phase: &'static str, error: Option<String>, migrating: bool) {
        self.set_migration_phase(phase, error);
        self.migrating.store(migrating, Ordering::SeqCst);
    }

    fn record_round(&self, r: &RoundStats, throttle_percent: u32) {
        if let Some(st) = self.migration.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            st.rounds = r.round + 1;
            st.bytes_sent += r.bytes;
            st.dirty_rate = r.dirtied as f64 / r.secs.max(1e-6);
            st.expected_downtime_ms = r.expected_downtime_ms;
            st.throttle_percent = throttle_percent;
        }
        log::info!(
            "migration round {}: {} bytes in {:.3}s, {} pages dirtied, expected downtime {:.1} ms, throttle {throttle_percent}%",
            r.round,
            r.bytes,
            r.secs,
            r.dirtied,
            r.expected_downtime_ms
        );
    }

    fn migrate_inner(
        &self,
        addr: &Address,
        opts: &SendOptions,
        logging: &mut bool,
        hello: Message,
    ) -> Result<MigrationReport, ControlError> {
        let start = Instant::now();
        let mut link = self.open_link(addr, opts, start, hello)?;
        let result = self.hand_over(&mut link, opts, logging, start);
        if result.is_err() {
            // The destination must never run its copy: tell it, whatever the deadline says.
            link.last_words();
            let why = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            let _ = send(&mut link, &Message::Abandon(why));
        }
        let report = result?;
        // Committed: this side never runs the VM again. Complete lets the destination run it
        // (if Complete is lost, its copy waits paused and intact: never two running copies).
        link.last_words();
        if let Err(e) = send(&mut link, &Message::Complete) {
            log::error!("sending Complete: {e}; the destination keeps the VM paused until vm.resume");
        }
        log::info!(
            "migration complete after {:.1} ms with a downtime of {:.1} ms",
            report.total_ms,
            report.downtime_ms
        );
        let _ = self
            .events_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(VmEvent::Migrated);
        Ok(report)
    }

    /// The Hello that tells a destination what it must offer: CPU count, RAM layout, the
    /// CPUID CPU 0 really has (a VM restored from elsewhere keeps its source's), TSC rate.
    /// Built before the migration is marked as running: it takes the vCPU lock for a moment,
    /// and an API call polled meanwhile would read that as a capture and answer 429.
    fn hello(&self) -> Result<Message, ControlError> {
        let (recorded, tsc_khz) = {
            // Busy at once if a snapshot took the vCPUs since the caller checked.
            let vcpus = self.lock_vcpus_or_busy()?;
            (vcpus.cpuid(0).cloned(), vcpus.tsc_khz())
        };
        let cpuid = recorded
            .unwrap_or_else(|| vcpu_manager::cpuid::for_vcpu(&self.supported_cpuid, &self.topology, 0));
        let compat =
            Compat::of(self.topology.max_vcpus(), MemoryLayout::of(&self.mem), &cpuid).with_tsc_khz(tsc_khz);
        let compat = serde_json::to_vec(&compat).map_err(|e| internal("compat")(&e))?;
        Ok(Message::Hello {
            version: PROTOCOL_VERSION,
            compat,
        })
    }

    /// Connect, prove the token (TCP), and get the destination's Accept of our Hello.
    fn open_link<'a>(
        &'a self,
        addr: &Address,
        opts: &SendOptions,
        start: Instant,
        hello: Message,
    ) -> Result<Link<'a>, ControlError> {
        let conn = addr
            .connect(opts.stall.min(opts.deadline), &|| {
                self.migration_ctl.load(Ordering::SeqCst) == ctl::CANCELLED
            })
            .map_err(|e| ControlError::BadRequest(format!("connecting to {addr:?}: {e}")))?;
        let mut link = Link::new(conn, start + opts.deadline, opts.stall, &self.migration_ctl)
            .counting(&self.wire_bytes);
        if let (true, Some(token)) = (addr.needs_token(), &opts.token) {
            auth::answer(&mut link, token).map_err(peer_error("the token challenge"))?;
        }
        send(&mut link, &hello).map_err(|e| internal("sending Hello")(&e))?;
        match recv(&mut link, &FrameLimits::default())
            .map_err(|e| internal("waiting for the destination")(&e))?
        {
            Message::Accept => Ok(link),
            Message::Refuse(why) => Err(ControlError::BadRequest(format!(
                "the destination refused: {why}"
            ))),
            m => Err(ControlError::Internal(format!(
                "unexpected answer to Hello: {}",
                m.name()
            ))),
        }
    }

    /// Pre-copy, pause, last pages and state, until the destination's Ack.
    fn hand_over(
        &self,
        link: &mut Link<'_>,
        opts: &SendOptions,
        logging: &mut bool,
        start: Instant,
    ) -> Result<MigrationReport, ControlError> {
        // Dirty logging on (fresh: every page counts from here), then all RAM and dirty rounds.
        {
            let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
            register_memory(&vm, &self.mem, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)
                .map_err(|e| internal("enabling dirty logging")(&e))?;
            *logging = true;
        }
        let mut src = KvmDirty { inner: self };
        let mut pc = Precopy::default();
        self.set_migration_phase("precopy", None);
        let throttles = self.precopy(link, &mut src, &mut pc, opts)?;
        // Downtime starts: pause, last pages, state.
        self.set_migration_phase("stopping", None);
        let paused_at = Instant::now();
        // Resumes the vCPUs on any failure from here; kept once the destination has the VM.
        let mut paused = PauseGuard::new(&self.vcpus, self.lock_vcpus(), self.paused.load(Ordering::SeqCst))
            .map_err(ControlError::pausing)?;
        let saved = self.save_paused(paused.manager())?;
        paused.unlock();
        let final_bytes = pc
            .finish(link, &mut src, opts.precopy.chunk)
            .map_err(|e| internal("sending the last pages")(&e))?;
        let state = saved.encode().map_err(|e| internal("encoding the state")(&e))?;
        let state_bytes = state.len() as u64;
        send(link, &Message::State(state)).map_err(|e| internal("sending the state")(&e))?;
        match recv(link, &FrameLimits::default()) {
            // The commit point. A cancel that came first wins: the destination is told to
            // drop its copy and the VM runs on here.
            Ok(Message::Ack) => {
                let committed = self.migration_ctl.compare_exchange(
                    ctl::RUNNING,
                    ctl::COMMITTED,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                if committed.is_err() {
                    return Err(ControlError::Internal(
                        "the migration was cancelled (vm.cancel-migration)".into(),
                    ));
                }
                paused.keep();
            }
            Ok(Message::Error(why)) => {
                return Err(ControlError::Internal(format!(
                    "the destination could not restore the VM: {why}"
                )))
            }
            Ok(m) => return Err(internal("answer to State")(&format!("unexpected {}", m.name()))),
            Err(e) => return Err(internal("waiting for the acknowledgement")(&e)),
        }
        Ok(MigrationReport {
            rounds: pc
                .rounds
                .iter()
                .zip(throttles)
                .map(|(r, t)| RoundReport::of(r, t))
                .collect(),
            final_bytes,
            state_bytes,
            downtime_ms: paused_at.elapsed().as_secs_f64() * 1e3,
            total_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The pre-copy rounds, and what [`TimeoutStrategy`] says when they do not converge.
    /// Returns the throttle of each round.
    fn precopy(
        &self,
        link: &mut Link<'_>,
        src: &mut KvmDirty<'_>,
        pc: &mut Precopy,
        opts: &SendOptions,
    ) -> Result<Vec<u32>, ControlError> {
        let throttle = throttle::Throttle::default();
        std::thread::scope(|scope| {
            // Stops the throttle thread whichever way this returns (the scope then joins it).
            let _stop = throttle.stop_on_drop();
            let mut percents = Vec::new();
            let mut limit = opts.precopy;
            loop {
                let percent = throttle.percent();
                let end = pc
                    .iterate(link, src, &limit, |r| {
                        self.record_round(r, percent);
                        percents.push(percent);
                    })
                    .map_err(|e| internal("pre-copy")(&e))?;
                let expected = pc.rounds.last().map_or(0.0, |r| r.expected_downtime_ms);
                match (end, opts.strategy) {
                    (Convergence::Converged, _) | (Convergence::RoundLimit, TimeoutStrategy::Ignore) => {
                        return Ok(percents)
                    }
                    (Convergence::RoundLimit, TimeoutStrategy::Cancel) => {
                        return Err(ControlError::Internal(format!(
                            "pre-copy did not converge: after {} rounds the expected downtime is {expected:.0} ms, above downtime_ms {}; the VM keeps running here (timeout_strategy \"cancel\")",
                            pc.rounds.len(),
                            opts.precopy.downtime.as_millis()
                        )))
                    }
                    (Convergence::RoundLimit, TimeoutStrategy::Throttle) => {
                        if !throttle.step_up(scope, self) {
                            return Ok(percents);
                        }
                        limit.max_rounds = pc.rounds.len() as u32 + 1;
                    }
                }
            }
        })
    }
}
