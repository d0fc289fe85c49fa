// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration between two VMM processes over a Unix or TCP socket, with KVM dirty
//! logging and `vm-migration`'s pre-copy driver.
//!
//! Source (`PUT /api/v1/vm.send-migration`): connect, send Hello with the VM's compatibility
//! description and wait for Accept (the destination checks CPU count, vendor, CPU features,
//! memory and versions *before* anything is paused), turn on dirty logging, copy all RAM and
//! then dirty pages in rounds until the rest fits the downtime target, pause, send the last
//! dirty pages and the state, and stop only once the destination says it has restored the
//! VM (Ack), then send Complete. Any failure before the Ack turns dirty logging off, tells the
//! destination to drop its copy (Abandon) and resumes the VM: nothing is lost.
//!
//! Destination (`vmm-reference run --incoming ADDR`): accept one connection, check the Hello,
//! create the KVM VM, receive RAM into fresh anonymous memory (every chunk bounds-checked),
//! restore from the state exactly like a snapshot restore but paused, Ack, and run the VM only
//! on Complete. Without Complete (the connection died after the Ack) the VM stays paused and
//! intact: it never runs in two places.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::memory::MemoryLayout;
use vm_migration::protocol::{
    apply_memory, recv, send, DirtySource, FrameLimits, Message, Precopy, PrecopyOptions, RoundStats,
    PROTOCOL_VERSION,
};

use crate::boot::GuestMemory;
use crate::config::SerialMode;
use crate::snapshot::{Compat, SavedVm};
use crate::vm::{register_memory, ControlError, Vm, VmEvent, VmInner, VmmError};

/// How long a destination waits for the next frame before it gives the source up.
const PEER_SILENCE: Duration = Duration::from_secs(60);

/// A byte stream to the peer.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Where to migrate to / listen on: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A Unix stream socket path.
    Unix(std::path::PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl Address {
    /// Parse `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<Address, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            Ok(Address::Unix(p.into()))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            if !a.contains(':') {
                return Err(format!("tcp:{a} needs HOST:PORT"));
            }
            Ok(Address::Tcp(a.into()))
        } else {
            Err(format!(
                "migration address {s:?} must be unix:PATH or tcp:HOST:PORT"
            ))
        }
    }

    /// Connect; every read and write on the stream then fails after `timeout` without
    /// progress, so a destination that hangs cannot keep the source paused.
    fn connect(&self, timeout: Duration) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Address::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Box::new(s)
            }
            Address::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Box::new(s)
            }
        })
    }

    /// Bind, then accept exactly one connection.
    pub fn accept_one(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Address::Unix(p) => {
                let (l, _lock) = crate::sock::bind_listening(p)?;
                let (s, _) = l.accept()?;
                let _ = std::fs::remove_file(p);
                s.set_read_timeout(Some(PEER_SILENCE))?;
                Box::new(s)
            }
            Address::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(PEER_SILENCE))?;
                Box::new(s)
            }
        })
    }
}

/// How to migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendOptions {
    /// Pre-copy tuning (downtime target, round limit).
    pub precopy: PrecopyOptions,
    /// Longest wait for the destination on any one read or write (its Accept, its Ack, a
    /// stalled copy); past it the migration fails and the VM resumes here.
    pub timeout: Duration,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            precopy: PrecopyOptions::default(),
            timeout: Duration::from_secs(30),
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
}

impl From<&RoundStats> for RoundReport {
    fn from(r: &RoundStats) -> Self {
        RoundReport {
            round: r.round,
            bytes: r.bytes,
            secs: r.secs,
            dirtied_pages: r.dirtied,
            dirty_rate: r.dirtied as f64 / r.secs.max(1e-6),
            expected_downtime_ms: r.expected_downtime_ms,
        }
    }
}

/// What `vm.info` shows while a migration runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MigrationStatus {
    /// `connecting`, `precopy`, `stopping` (paused, last pages and state), `done`, `failed`.
    pub phase: &'static str,
    /// Pre-copy rounds finished.
    pub rounds: u32,
    /// Bytes of RAM sent so far.
    pub bytes_sent: u64,
    /// Dirty rate of the last round (pages/s).
    pub dirty_rate: f64,
    /// Expected downtime after the last round (ms).
    pub expected_downtime_ms: f64,
    /// Why it failed, when it did.
    pub error: Option<String>,
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
        vm_migration::memory::populated_pages(host, r.len()).ok()
    }
}

fn internal(what: &str) -> impl Fn(&dyn std::fmt::Display) -> ControlError + '_ {
    move |e| ControlError::Internal(format!("{what}: {e}"))
}

impl VmInner {
    /// Live-migrate this VM to the VMM listening at `dest`. On success the VM runs there and
    /// this VMM ends (its `wait` returns `Migrated`); on any failure the VM keeps running here.
    pub fn send_migration(&self, dest: &str, opts: &SendOptions) -> Result<MigrationReport, ControlError> {
        let addr = Address::parse(dest).map_err(ControlError::BadRequest)?;
        if self.migrating.swap(true, Ordering::SeqCst) {
            return Err(ControlError::Busy(
                "a snapshot or migration is in progress".into(),
            ));
        }
        let was_paused = self.paused.load(Ordering::SeqCst);
        let mut logging = false;
        self.set_migration_phase("connecting", None);
        let result = self.migrate_inner(&addr, opts, &mut logging);
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
            if !was_paused {
                self.lock_vcpus().resume_all();
            }
            self.migrating.store(false, Ordering::SeqCst);
        }
        result
    }

    fn set_migration_phase(&self, phase: &'static str, error: Option<String>) {
        let mut st = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = st.take().unwrap_or_default();
        if phase == "connecting" {
            s = MigrationStatus::default();
        }
        s.phase = phase;
        s.error = error;
        *st = Some(s);
    }

    fn migrate_inner(
        &self,
        addr: &Address,
        opts: &SendOptions,
        logging: &mut bool,
    ) -> Result<MigrationReport, ControlError> {
        let start = Instant::now();
        let (timeout, opts) = (opts.timeout, &opts.precopy);
        let mut conn = addr
            .connect(timeout)
            .map_err(|e| ControlError::BadRequest(format!("connecting to {addr:?}: {e}")))?;
        let limits = FrameLimits::default();
        // The CPUID CPU 0 really has (a VM restored from elsewhere keeps its source's).
        let recorded = self.lock_vcpus().cpuid(0).cloned();
        let cpuid = recorded
            .unwrap_or_else(|| vcpu_manager::cpuid::for_vcpu(&self.supported_cpuid, &self.topology, 0));
        let tsc_khz = self.lock_vcpus().tsc_khz();
        let compat =
            Compat::of(self.topology.max_vcpus(), MemoryLayout::of(&self.mem), &cpuid).with_tsc_khz(tsc_khz);
        let compat = serde_json::to_vec(&compat).map_err(|e| internal("compat")(&e))?;
        send(
            &mut conn,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                compat,
            },
        )
        .map_err(|e| internal("sending Hello")(&e))?;
        match recv(&mut conn, &limits).map_err(|e| internal("waiting for the destination")(&e))? {
            Message::Accept => {}
            Message::Refuse(why) => {
                return Err(ControlError::BadRequest(format!(
                    "the destination refused: {why}"
                )))
            }
            m => {
                return Err(ControlError::Internal(format!(
                    "unexpected answer to Hello: {m:?}"
                )))
            }
        }
        // Dirty logging on (fresh: every page counts from here), then all RAM and dirty rounds.
        {
            let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
            register_memory(&vm, &self.mem, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)
                .map_err(|e| internal("enabling dirty logging")(&e))?;
            *logging = true;
        }
        let mut src = KvmDirty { inner: self };
        let mut pc = Precopy::default();
        let abandon = |conn: &mut Box<dyn Stream>, why: &str| {
            let _ = send(conn, &Message::Abandon(why.into()));
        };
        self.set_migration_phase("precopy", None);
        if let Err(e) = pc.iterate(&mut conn, &mut src, opts, |r| {
            if let Some(st) = self.migration.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                st.rounds = r.round + 1;
                st.bytes_sent += r.bytes;
                st.dirty_rate = r.dirtied as f64 / r.secs.max(1e-6);
                st.expected_downtime_ms = r.expected_downtime_ms;
            }
            log::info!(
                "migration round {}: {} bytes in {:.3}s, {} pages dirtied, expected downtime {:.1} ms",
                r.round,
                r.bytes,
                r.secs,
                r.dirtied,
                r.expected_downtime_ms
            );
        }) {
            abandon(&mut conn, &e.to_string());
            return Err(internal("pre-copy")(&e));
        }
        // Downtime starts: pause, last pages, state.
        self.set_migration_phase("stopping", None);
        let paused_at = Instant::now();
        let vcpus = self.lock_vcpus();
        if let Err(e) = vcpus.pause_all() {
            drop(vcpus);
            abandon(&mut conn, "pause failed");
            return Err(internal("pausing")(&e));
        }
        let saved = match self.save_paused(&vcpus) {
            Ok(s) => s,
            Err(e) => {
                drop(vcpus);
                abandon(&mut conn, &e.to_string());
                return Err(e);
            }
        };
        drop(vcpus);
        let final_bytes = pc
            .finish(&mut conn, &mut src, opts.chunk)
            .map_err(|e| internal("sending the last pages")(&e))?;
        let state = saved.encode().map_err(|e| internal("encoding the state")(&e))?;
        let state_bytes = state.len() as u64;
        send(&mut conn, &Message::State(state)).map_err(|e| internal("sending the state")(&e))?;
        let answer = recv(&mut conn, &limits);
        match answer {
            Ok(Message::Ack) => {}
            Ok(Message::Error(why)) => {
                return Err(ControlError::Internal(format!(
                    "the destination could not restore the VM: {why}"
                )))
            }
            other => {
                // No Ack: this side keeps the VM, so the destination must never run its copy.
                abandon(&mut conn, "no acknowledgement; the source keeps the VM");
                return Err(ControlError::Internal(match other {
                    Err(e) => format!("waiting for the acknowledgement: {e}"),
                    Ok(m) => format!("unexpected answer to State: {m:?}"),
                }));
            }
        }
        // Committed: this side never runs the VM again. Complete lets the destination run it
        // (if Complete is lost, its copy waits paused and intact: never two running copies).
        if let Err(e) = send(&mut conn, &Message::Complete) {
            log::error!("sending Complete: {e}; the destination keeps the VM paused until vm.resume");
        }
        // The destination runs the VM now: this side stays paused and ends.
        let report = MigrationReport {
            rounds: pc.rounds.iter().map(RoundReport::from).collect(),
            final_bytes,
            state_bytes,
            downtime_ms: paused_at.elapsed().as_secs_f64() * 1e3,
            total_ms: start.elapsed().as_secs_f64() * 1e3,
        };
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
}

fn refuse(conn: &mut Box<dyn Stream>, why: String) -> VmmError {
    let _ = send(conn, &Message::Refuse(why.clone()));
    VmmError::Snapshot(crate::snapshot::SnapshotError::Incompatible(why))
}

/// Destination: wait for one incoming migration on `addr`, restore the VM and return it
/// running. Errors leave nothing behind; the source keeps its VM.
pub fn receive(addr: &Address, serial: &SerialMode) -> Result<Vm, VmmError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source: std::io::Error| VmmError::Io { what, source }
    };
    let mut conn = addr.accept_one().map_err(io(&format!("--incoming {addr:?}")))?;
    let limits = FrameLimits::default();
    let proto = |e: vm_migration::protocol::ProtocolError| VmmError::Io {
        what: format!("migration stream: {e}"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    };
    let compat = match recv(&mut conn, &limits).map_err(proto)? {
        Message::Hello { version, compat } => {
            if version > PROTOCOL_VERSION {
                return Err(refuse(
                    &mut conn,
                    format!("protocol version {version} is newer than this VMM's {PROTOCOL_VERSION}"),
                ));
            }
            match serde_json::from_slice::<Compat>(&compat) {
                Ok(c) => c,
                Err(e) => {
                    return Err(refuse(
                        &mut conn,
                        format!("malformed compatibility description: {e}"),
                    ))
                }
            }
        }
        m => return Err(refuse(&mut conn, format!("expected Hello, got {m:?}"))),
    };
    let kvm = crate::vm::open_kvm()?;
    let cpuid = crate::restore::host_cpuid(&kvm, &vcpu_manager::Topology::new(compat.max_vcpus.max(1)))?;
    let tsc = match crate::restore::host_tsc(&kvm) {
        Ok(t) => t,
        Err(e) => return Err(refuse(&mut conn, e.to_string())),
    };
    if let Err(e) = compat.check(kvm.get_max_vcpus() as u32, &cpuid, tsc) {
        return Err(refuse(&mut conn, e.to_string()));
    }
    drop(kvm);
    let ranges: Vec<(GuestAddress, usize)> = compat
        .memory
        .regions
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.len as usize))
        .collect();
    let mem = match GuestMemory::from_ranges(&ranges) {
        Ok(m) => m,
        Err(e) => return Err(refuse(&mut conn, format!("cannot allocate guest RAM: {e}"))),
    };
    // The KVM VM and the LAPIC conventions probe are made before Accept: the source then
    // copies RAM into a VM that is ready, and none of it lands in the downtime.
    let prepared = match crate::restore::Prepared::new(vcpu_manager::Topology::new(compat.max_vcpus), &mem) {
        Ok(p) => p,
        Err(e) => return Err(refuse(&mut conn, format!("cannot create the VM: {e}"))),
    };
    send(&mut conn, &Message::Accept).map_err(proto)?;
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    loop {
        match recv(&mut conn, &limits).map_err(proto)? {
            Message::Memory(chunks) => {
                apply_memory(&chunks, &regions, |gpa, data| {
                    mem.write_slice(data, GuestAddress(gpa))
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
                .map_err(proto)?;
            }
            Message::State(bytes) => {
                let restored = SavedVm::decode(&bytes)
                    .map_err(VmmError::Snapshot)
                    .and_then(|saved| {
                        if saved.vm.memory != compat.memory {
                            return Err(VmmError::Snapshot(crate::snapshot::SnapshotError::Incompatible(
                                "the state's memory layout differs from the Hello's".into(),
                            )));
                        }
                        let was_paused = saved.vm.paused;
                        Vm::from_saved(saved, mem, serial, true, Some(prepared)).map(|vm| (vm, was_paused))
                    });
                return match restored {
                    Ok((vm, was_paused)) => {
                        // Restored and paused. Run only once the source confirms it stopped
                        // for good (Complete); if it says it kept the VM (Abandon), never run.
                        send(&mut conn, &Message::Ack).map_err(proto)?;
                        match recv(&mut conn, &limits) {
                            Ok(Message::Complete) => {
                                if !was_paused {
                                    vm.control().resume();
                                }
                            }
                            Ok(Message::Abandon(why)) => {
                                vm.shutdown();
                                return Err(VmmError::Io {
                                    what: format!("the source kept the VM after all: {why}"),
                                    source: std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
                                });
                            }
                            other => log::warn!(
                                "no Complete from the source ({other:?}): the VM stays paused here; \
                                 resume it (vm.resume) only if the source is known to be gone"
                            ),
                        }
                        Ok(vm)
                    }
                    Err(e) => {
                        let _ = send(&mut conn, &Message::Error(e.to_string()));
                        Err(e)
                    }
                };
            }
            Message::Abandon(why) => {
                return Err(VmmError::Io {
                    what: format!("the source abandoned the migration: {why}"),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
                })
            }
            m => {
                return Err(proto(vm_migration::protocol::ProtocolError::Invalid(format!(
                    "unexpected {m:?}"
                ))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("unix:/tmp/x").unwrap(),
            Address::Unix("/tmp/x".into())
        );
        assert_eq!(
            Address::parse("tcp:127.0.0.1:4000").unwrap(),
            Address::Tcp("127.0.0.1:4000".into())
        );
        assert!(Address::parse("unix:").is_err());
        assert!(Address::parse("tcp:nohost").is_err());
        assert!(Address::parse("/tmp/x").is_err());
    }
}
