// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination: accept a peer (on TCP only one that proves it holds the token), check
//! its Hello against this host and the memory cap before allocating anything, receive RAM
//! and the state, restore paused, and run the VM only on Complete.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_live_migration::auth::{self, Token};
use vm_live_migration::protocol::{
    apply_memory, recv, send, FrameLimits, Message, ProtocolError, Violation, PROTOCOL_VERSION,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::link::{Address, Listener, Stream};
use crate::boot::GuestMemory;
use crate::config::SerialMode;
use crate::error::VmmError;
use crate::snapshot::{Compat, SavedVm, SnapshotError};
use crate::vm::{Vm, VmInner};

/// How long a destination waits for the next frame before it gives the source up.
const PEER_SILENCE: Duration = Duration::from_secs(60);
/// How long a peer on TCP has to answer the token challenge.
const AUTH_SILENCE: Duration = Duration::from_secs(10);
/// Peers that fail the token check before the destination stops listening.
const MAX_AUTH_FAILURES: u32 = 64;
/// Largest Hello (its compatibility description) read from an authenticated peer.
const HELLO_LIMIT: u64 = 1 << 20;

/// What a destination accepts.
#[derive(Clone, Debug)]
pub struct IncomingOptions {
    /// The token a TCP peer must prove it holds (required for `tcp:` addresses).
    pub token: Option<Token>,
    /// Most guest RAM (bytes) this destination allocates for an incoming VM.
    pub max_memory: u64,
    /// How long to wait for a source to connect (`None`: until cancelled).
    pub wait: Option<Duration>,
    /// Ends a receive before its VM is restored (shared by the clones of these options).
    pub cancel: ReceiveControl,
}

/// A receive's state, one atomic so that a cancel and the restore cannot both win.
#[derive(Clone, Debug, Default)]
pub struct ReceiveControl(Arc<AtomicU8>);

const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const CANCELLED: u8 = 2;
const COMMITTED: u8 = 3;

impl ReceiveControl {
    /// A receive starts.
    pub fn begin(&self) {
        self.0.store(RUNNING, Ordering::SeqCst);
    }

    /// The receive is over, however it ended.
    pub fn end(&self) {
        self.0.store(IDLE, Ordering::SeqCst);
    }

    /// Cancel a running receive: whether it will stop (it stops at its next step: waiting
    /// for the source, after the Hello, between memory frames, before the restore).
    pub fn cancel(&self) -> bool {
        match self
            .0
            .compare_exchange(RUNNING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(CANCELLED) => true,
            Err(_) => false,
        }
    }

    fn cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CANCELLED
    }

    /// The point of no return (the state is in, the restore begins): false if a cancel won.
    /// (A receive nobody began, `run --incoming`, cannot be cancelled.)
    fn commit(&self) -> bool {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                (s != CANCELLED).then_some(COMMITTED)
            })
            .is_ok()
    }
}

impl IncomingOptions {
    /// No token; RAM up to this host's physical memory.
    pub fn new() -> Self {
        IncomingOptions {
            token: None,
            max_memory: host_memory(),
            wait: None,
            cancel: ReceiveControl::default(),
        }
    }

    /// Whether these options can listen on `addr` (TCP needs a token).
    pub fn check(&self, addr: &Address) -> Result<(), String> {
        if addr.needs_token() && self.token.is_none() {
            return Err("a tcp: destination needs the migration token (--migration-token-file, or \"token\" in vm.receive-migration): anyone on the network could send it a VM".into());
        }
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cancel.cancelled()
    }

    /// Why no source came: a cancel, or the wait ran out.
    fn ended_waiting(&self, addr: &Address) -> VmmError {
        if self.cancelled() {
            return cancelled();
        }
        let secs = self.wait.unwrap_or_default().as_secs_f64();
        io(format!("no source connected to {addr:?} within {secs} s"))(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        ))
    }
}

fn cancelled() -> VmmError {
    io("the incoming migration was cancelled (vm.cancel-migration)")(std::io::Error::from(
        std::io::ErrorKind::Interrupted,
    ))
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// This host's physical RAM (bytes); `u64::MAX` if unknown.
fn host_memory() -> u64 {
    // SAFETY: sysinfo fills the zeroed struct it is given.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `si` is a valid, writable sysinfo.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return u64::MAX;
    }
    (si.totalram as u64).saturating_mul(si.mem_unit.max(1) as u64)
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

fn proto(e: ProtocolError) -> VmmError {
    // A read timeout is the source's silence, not damaged data: say so.
    if let ProtocolError::Io(io) = &e {
        if matches!(
            io.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            return VmmError::Io {
                what: format!(
                    "migration stream: the source sent nothing for {} s",
                    PEER_SILENCE.as_secs()
                ),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            };
        }
    }
    VmmError::Io {
        what: format!("migration stream: {e}"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    }
}

fn refuse(conn: &mut Box<dyn Stream>, why: String) -> VmmError {
    let _ = send(conn, &Message::Refuse(why.clone()));
    VmmError::Snapshot(SnapshotError::Incompatible(why))
}

/// Accept connections until one passes the token check (every Unix peer does).
fn accept_peer(addr: &Address, opts: &IncomingOptions) -> Result<Box<dyn Stream>, VmmError> {
    if let Err(e) = opts.check(addr) {
        return Err(io(e)(std::io::Error::from(std::io::ErrorKind::PermissionDenied)));
    }
    let token = if addr.needs_token() {
        opts.token.as_ref()
    } else {
        None
    };
    let listener = Listener::bind(addr).map_err(io(format!("--incoming {addr:?}")))?;
    let deadline = opts.wait.map(|w| Instant::now() + w);
    let mut failures = 0;
    loop {
        let accepted = listener
            .accept_until(deadline, &|| opts.cancelled())
            .map_err(io(format!("accepting on {addr:?}")))?;
        let Some(mut conn) = accepted else {
            return Err(opts.ended_waiting(addr));
        };
        let Some(token) = token else {
            conn.set_timeouts(Some(PEER_SILENCE))
                .map_err(io("socket timeouts"))?;
            return Ok(conn);
        };
        conn.set_timeouts(Some(AUTH_SILENCE))
            .map_err(io("socket timeouts"))?;
        match auth::demand(&mut conn, token) {
            Ok(()) => {
                conn.set_timeouts(Some(PEER_SILENCE))
                    .map_err(io("socket timeouts"))?;
                return Ok(conn);
            }
            Err(e) => {
                failures += 1;
                log::warn!("incoming migration: a peer failed the token check ({e}); {failures} so far");
                if failures >= MAX_AUTH_FAILURES {
                    return Err(proto(ProtocolError::Invalid(Violation::TooManyAuthFailures(
                        failures,
                    ))));
                }
            }
        }
    }
}

/// Read the Hello and check it against this host and the memory cap.
fn hello(conn: &mut Box<dyn Stream>, opts: &IncomingOptions) -> Result<Compat, VmmError> {
    let limits = FrameLimits {
        max_frame: HELLO_LIMIT,
    };
    let compat = match recv(conn, &limits).map_err(proto)? {
        Message::Hello { version, .. } if version > PROTOCOL_VERSION => {
            return Err(refuse(
                conn,
                format!("protocol version {version} is newer than this VMM's {PROTOCOL_VERSION}"),
            ))
        }
        Message::Hello { compat, .. } => serde_json::from_slice::<Compat>(&compat)
            .map_err(|e| refuse(conn, format!("malformed compatibility description: {e}")))?,
        m => return Err(refuse(conn, format!("expected Hello, got {}", m.name()))),
    };
    // What would be allocated (the regions) and what the image spans: file ranges may
    // overlap, so the latter alone could let a peer past the cap.
    let ram = compat.memory.total().max(compat.memory.image_len());
    if ram > opts.max_memory {
        return Err(refuse(
            conn,
            format!(
                "the VM's {} MiB of RAM exceed this destination's limit of {} MiB",
                ram >> 20,
                opts.max_memory >> 20
            ),
        ));
    }
    let kvm = crate::machine::open_kvm()?;
    let cpuid = crate::restore::host_cpuid(&kvm, &vcpu_manager::Topology::new(compat.max_vcpus.max(1)))?;
    let tsc = crate::restore::host_tsc(&kvm).map_err(|e| refuse(conn, e.to_string()))?;
    compat
        .check(kvm.get_max_vcpus() as u32, &cpuid, tsc)
        .map_err(|e| refuse(conn, e.to_string()))?;
    Ok(compat)
}

/// Destination: wait for one incoming migration on `addr`, restore the VM and return it.
/// `publish` sees the VM as soon as it is restored (paused, waiting for Complete), and
/// `None` if the source then keeps it after all. Errors leave nothing behind; the source
/// keeps its VM.
pub fn receive(
    addr: &Address,
    serial: &SerialMode,
    opts: &IncomingOptions,
    publish: &dyn Fn(Option<Arc<VmInner>>),
) -> Result<Vm, VmmError> {
    let mut conn = accept_peer(addr, opts)?;
    let compat = hello(&mut conn, opts)?;
    let ranges: Vec<(GuestAddress, usize)> = compat
        .memory
        .regions
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.len as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&ranges)
        .map_err(|e| refuse(&mut conn, format!("cannot allocate guest RAM: {e}")))?;
    // The KVM VM and the LAPIC conventions probe are made before Accept: the source then
    // copies RAM into a VM that is ready, and none of it lands in the downtime.
    let prepared = crate::restore::Prepared::new(vcpu_manager::Topology::new(compat.max_vcpus), &mem)
        .map_err(|e| refuse(&mut conn, format!("cannot create the VM: {e}")))?;
    if opts.cancelled() {
        refuse(&mut conn, "the destination cancelled".into());
        return Err(cancelled());
    }
    send(&mut conn, &Message::Accept).map_err(proto)?;
    let state = receive_memory(&mut conn, &mem, &opts.cancel)?;
    // Before Ack the source keeps its VM: a cancel up to here is safe, none after.
    if !opts.cancel.commit() {
        let _ = send(&mut conn, &Message::Error("the destination cancelled".into()));
        return Err(cancelled());
    }
    let restored = SavedVm::decode(&state)
        .map_err(VmmError::Snapshot)
        .and_then(|saved| {
            if saved.vm.memory != compat.memory {
                return Err(VmmError::Snapshot(SnapshotError::Incompatible(
                    "the state's memory layout differs from the Hello's".into(),
                )));
            }
            let was_paused = saved.vm.paused;
            Vm::from_saved(saved, mem, serial, true, Some(prepared)).map(|vm| (vm, was_paused))
        });
    match restored {
        Ok((vm, was_paused)) => commit(conn, vm, was_paused, publish),
        Err(e) => {
            let _ = send(&mut conn, &Message::Error(e.to_string()));
            Err(e)
        }
    }
}

/// Memory frames into `mem` (each chunk bounds-checked) until the State; returns it.
fn receive_memory(
    conn: &mut Box<dyn Stream>,
    mem: &GuestMemory,
    cancel: &ReceiveControl,
) -> Result<Vec<u8>, VmmError> {
    let limits = FrameLimits::default();
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    loop {
        if cancel.cancelled() {
            // The source sees the link drop before the Ack and keeps its VM.
            return Err(cancelled());
        }
        match recv(conn, &limits).map_err(proto)? {
            Message::Memory(chunks) => {
                apply_memory(&chunks, &regions, |gpa, data| {
                    mem.write_slice(data, GuestAddress(gpa))
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
                .map_err(proto)?;
            }
            Message::State(bytes) => return Ok(bytes),
            Message::Abandon(why) => {
                return Err(io(format!("the source abandoned the migration: {why}"))(
                    std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
                ))
            }
            m => {
                return Err(proto(ProtocolError::Invalid(Violation::Unexpected {
                    expected: "memory or the state",
                    got: m.name(),
                })))
            }
        }
    }
}

/// Restored and paused: Ack, then run only once the source confirms it stopped for good
/// (Complete). If it says it kept the VM (Abandon), never run. Meanwhile `vm.info` shows
/// the wait (`migration.phase`: `awaiting-complete`) and `vm.resume` answers busy.
fn commit(
    mut conn: Box<dyn Stream>,
    vm: Vm,
    was_paused: bool,
    publish: &dyn Fn(Option<Arc<VmInner>>),
) -> Result<Vm, VmmError> {
    let inner = vm.control();
    inner.incoming_phase("awaiting-complete", None, true);
    publish(Some(inner.clone()));
    if let Err(e) = send(&mut conn, &Message::Ack) {
        // The source never hears of the restore: it keeps the VM, this copy goes.
        publish(None);
        return Err(proto(e));
    }
    match recv(&mut conn, &FrameLimits::default()) {
        Ok(Message::Complete) => {
            inner.incoming_phase("received", None, false);
            if !was_paused {
                inner.resume();
            }
        }
        Ok(Message::Abandon(why)) => {
            publish(None);
            vm.shutdown();
            return Err(io(format!("the source kept the VM after all: {why}"))(
                std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
            ));
        }
        other => {
            let why = match other {
                Ok(m) => format!("{} instead of Complete", m.name()),
                Err(e) => e.to_string(),
            };
            log::warn!(
                "no Complete from the source ({why}): the VM stays paused here; \
                 resume it (vm.resume) only if the source is known to be gone"
            );
            inner.incoming_phase(
                "incomplete",
                Some(format!(
                    "no Complete from the source ({why}); vm.resume only if the source is known to be gone"
                )),
                false,
            );
        }
    }
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cancel and the restore cannot both win; a receive that is over takes no cancel.
    #[test]
    fn a_cancel_wins_only_before_the_restore() {
        let c = ReceiveControl::default();
        assert!(!c.cancel(), "nothing runs");
        c.begin();
        assert!(c.cancel() && c.cancel() && c.cancelled());
        assert!(!c.commit(), "cancelled first");
        c.begin();
        assert!(c.commit());
        assert!(!c.cancel(), "the VM is being restored");
        c.end();
        assert!(!c.cancel());
        assert!(c.commit(), "a receive nobody began (run --incoming) commits");
    }
}
