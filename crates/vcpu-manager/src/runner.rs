// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One thread per vCPU, a kick that cannot be lost, pause/resume, and requests served on the
//! vCPU thread.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMAX, SIGRTMIN};

use crate::exit::{ExitAction, ExitHandler, VcpuExitReason};
use crate::{Error, Result};

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal exists only to make KVM_RUN return EINTR.
}

/// Whether the kick handler is installed. Not a `Once`: a registration that failed must be
/// tried again, not remembered as done (a kick without the handler would kill the process,
/// SIGRTMIN's default action).
static REGISTERED: Mutex<bool> = Mutex::new(false);

/// How long [`VcpuRunner::stop_and_join`] kicks a vCPU thread before leaving it behind.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Exits taken while completing a pending I/O before a pause (a `rep ins/outs` makes one
/// exit per page of data): beyond it the pause goes ahead and the rest is finished later.
const COMPLETE_IO_MAX_EXITS: usize = 1 << 16;

/// The kick signal chosen with [`set_kick_signal`]; 0 until then (SIGRTMIN).
static KICK_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The signal that kicks vCPU threads out of `KVM_RUN`: SIGRTMIN unless
/// [`set_kick_signal`] chose another.
pub fn kick_signal() -> libc::c_int {
    match KICK_SIGNAL.load(Ordering::SeqCst) {
        0 => SIGRTMIN(),
        s => s,
    }
}

/// Kick vCPU threads with `signum` instead of SIGRTMIN, for a VMM (or a library in it) that
/// already uses SIGRTMIN. It must be a real-time signal (SIGRTMIN..=SIGRTMAX: they queue and
/// nothing in libc uses them) and be chosen before the first vCPU thread starts: once the
/// handler is installed another signal is refused, since threads already running would be
/// kicked with a signal they have no handler for.
pub fn set_kick_signal(signum: libc::c_int) -> Result<()> {
    if !(SIGRTMIN()..=SIGRTMAX()).contains(&signum) {
        return Err(Error::BadKickSignal(signum));
    }
    let done = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    if *done && kick_signal() != signum {
        return Err(Error::KickSignalInUse(kick_signal()));
    }
    KICK_SIGNAL.store(signum, Ordering::SeqCst);
    Ok(())
}

fn ensure_signal_handler() -> Result<()> {
    // Under the lock set_kick_signal takes: the signal cannot change while it is installed.
    ensure_registered(&REGISTERED, || {
        register_signal_handler(kick_signal(), kick_handler).map_err(Error::Signal)
    })
}

/// Run `register` unless `done` says an earlier call succeeded; only success is remembered.
fn ensure_registered(done: &Mutex<bool>, register: impl FnOnce() -> Result<()>) -> Result<()> {
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    if !*done {
        register()?;
        *done = true;
    }
    Ok(())
}

type Request = Box<dyn FnOnce(&mut VcpuFd) + Send>;

// Run states reported by the vCPU thread.
const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const EXITED: u8 = 2;

/// State shared between a runner handle and its thread.
struct Shared {
    requests: Mutex<Vec<Request>>,
    cv: Condvar,
    stop: AtomicBool,
    pause: AtomicBool,
    state: AtomicU8,
}

impl Shared {
    fn notify(&self) {
        let _g = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }
}

/// A running vCPU thread.
pub struct VcpuRunner {
    index: u32,
    handle: Option<JoinHandle<VcpuFd>>,
    /// Address of `kvm_run.immediate_exit` in the vCPU's mmap'ed run area.
    immediate_exit: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner").field("index", &self.index).finish()
    }
}

impl VcpuRunner {
    /// Start a thread that runs `fd` until it stops; exits go to `handler`.
    pub fn spawn(index: u32, fd: VcpuFd, handler: Arc<dyn ExitHandler>) -> Result<Self> {
        Self::spawn_inner(index, fd, handler, false)
    }

    /// Start the thread paused: it serves requests (e.g. a state restore) but does not enter
    /// `KVM_RUN` until [`VcpuRunner::resume`].
    pub fn spawn_paused(index: u32, fd: VcpuFd, handler: Arc<dyn ExitHandler>) -> Result<Self> {
        Self::spawn_inner(index, fd, handler, true)
    }

    fn spawn_inner(index: u32, mut fd: VcpuFd, handler: Arc<dyn ExitHandler>, paused: bool) -> Result<Self> {
        ensure_signal_handler()?;
        let immediate_exit = &mut fd.get_kvm_run().immediate_exit as *mut u8 as usize;
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(paused),
            state: AtomicU8::new(RUNNING),
        });
        let sh = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // A panicking handler must not take the fd with it: the slot stays usable.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    match handler.vcpu_thread_started(index) {
                        Ok(()) => run_loop(&mut fd, index, &*handler, &sh),
                        Err(why) => VcpuExitReason::SetupFailed(error_chain(&*why)),
                    }
                }));
                let reason = run.unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(not text)".into());
                    VcpuExitReason::Panicked(msg)
                });
                sh.state.store(EXITED, Ordering::SeqCst);
                sh.notify();
                handler.vcpu_stopped(index, &reason);
                fd
            })
            .map_err(|source| Error::Spawn { index, source })?;
        Ok(VcpuRunner {
            index,
            handle: Some(handle),
            immediate_exit,
            shared,
        })
    }

    /// CPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Force the vCPU out of `KVM_RUN` once: set `immediate_exit`, then signal the thread.
    /// If the thread is about to enter `KVM_RUN`, the flag makes it return at once; if it is
    /// inside, the signal interrupts it. Either way KVM_RUN returns EINTR, no retry loop.
    pub fn kick(&self) {
        // SAFETY: the address points into the vCPU's kvm_run mapping, which lives as long as
        // the VcpuFd; the fd is owned by the thread or its join result, both outlive `self`'s
        // JoinHandle, and we only kick while holding it.
        unsafe { std::ptr::write_volatile(self.immediate_exit as *mut u8, 1) };
        if let Some(h) = &self.handle {
            // SAFETY: the pthread_t is valid until the thread is joined, which needs `self`.
            let r = unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            // EAGAIN: the real-time signal queue is full; a vCPU blocked in KVM_RUN then
            // does not see the kick until something else wakes it.
            if r != 0 {
                log::warn!("kicking vCPU {}: pthread_kill: errno {r}", self.index);
            }
        }
    }

    /// Whether the run loop has ended.
    pub fn is_finished(&self) -> bool {
        self.shared.state.load(Ordering::SeqCst) == EXITED
            || self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Ask the vCPU to pause (out of `KVM_RUN`, pending PIO/MMIO completed). Returns at once;
    /// see [`VcpuRunner::wait_paused`].
    pub fn request_pause(&self) {
        self.shared.pause.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Wait until the vCPU acknowledged the pause (or ended). `false` on timeout.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.shared.state.load(Ordering::SeqCst) {
                PAUSED | EXITED => return true,
                _ => {}
            }
            if Instant::now() >= deadline {
                return false;
            }
            // Kick again in case the signal landed between two KVM_RUNs of an EAGAIN retry.
            self.kick();
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether the thread is paused now.
    pub fn is_paused(&self) -> bool {
        self.shared.state.load(Ordering::SeqCst) == PAUSED
    }

    /// Let a paused vCPU run again.
    pub fn resume(&self) {
        self.shared.pause.store(false, Ordering::SeqCst);
        self.shared.notify();
    }

    /// Run `f` on the vCPU thread while the vCPU is outside `KVM_RUN`, and return its result.
    ///
    /// vCPU ioctls from another thread would block on KVM's per-vCPU mutex for as long as the
    /// vCPU sits in `KVM_RUN` (forever for a halted CPU with interrupts off), so the request
    /// is queued, the vCPU kicked, and the closure runs between two `KVM_RUN`s (or while
    /// paused). Returns `None` if the vCPU thread has ended or did not answer within `timeout`.
    pub fn with_vcpu<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Option<R> {
        if self.is_finished() {
            return None;
        }
        let (tx, rx) = mpsc::channel();
        {
            let mut q = self.shared.requests.lock().unwrap_or_else(|e| e.into_inner());
            q.push(Box::new(move |fd| {
                let _ = tx.send(f(fd));
            }));
            self.shared.cv.notify_all();
        }
        self.kick();
        let answer = rx.recv_timeout(timeout).ok();
        if answer.is_none() && !self.is_finished() {
            // Starved or stuck: said here, since callers usually just report "no answer".
            log::warn!("vCPU {} did not answer a request within {timeout:?}", self.index);
        }
        answer
    }

    /// Stop the vCPU, join its thread and give the fd back (KVM cannot destroy a vCPU;
    /// callers park the fd for reuse). `None` if the thread panicked.
    pub fn stop_and_join(mut self) -> Option<VcpuFd> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.notify();
        // Kick until the thread has ended, within a bound: a thread blocked outside KVM_RUN
        // (in an exit handler) is left running rather than waited for forever.
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !self.handle.as_ref().is_none_or(|h| h.is_finished()) {
            if Instant::now() >= deadline {
                log::error!(
                    "vCPU {} did not stop within {JOIN_TIMEOUT:?}; its thread is left behind",
                    self.index
                );
                // Detached: its fd stays with it (the slot becomes absent, not parked).
                drop(self.handle.take());
                return None;
            }
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.handle.take().and_then(|h| h.join().ok())
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.shared.stop.store(true, Ordering::SeqCst);
            self.shared.notify();
            // SAFETY: as in kick(): the handle (and so the fd) is still alive here.
            unsafe { std::ptr::write_volatile(self.immediate_exit as *mut u8, 1) };
            // SAFETY: the thread has not been joined yet.
            unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            let _ = h.join();
        }
    }
}

fn serve_requests(fd: &mut VcpuFd, sh: &Shared) {
    let pending: Vec<Request> = std::mem::take(&mut *sh.requests.lock().unwrap_or_else(|e| e.into_inner()));
    for r in pending {
        r(fd);
    }
}

/// An I/O exit dispatched to the handler: its answer, or `None` for any other exit.
fn dispatch_io(handler: &dyn ExitHandler, exit: &mut VcpuExit<'_>) -> Option<ExitAction> {
    Some(match exit {
        VcpuExit::IoIn(port, data) => handler.pio_read(*port, data),
        VcpuExit::IoOut(port, data) => handler.pio_write(*port, data),
        VcpuExit::MmioRead(addr, data) => handler.mmio_read(*addr, data),
        VcpuExit::MmioWrite(addr, data) => handler.mmio_write(*addr, data),
        _ => return None,
    })
}

/// Complete a PIO/MMIO exit the thread already handled: KVM finishes the instruction on the
/// next entry, which `immediate_exit` turns into a return without running guest code. That
/// entry can itself exit again (the next page of a `rep ins/outs`, the second half of a split
/// MMIO access): each such exit is dispatched like any other, until KVM_RUN answers EINTR.
/// Returns whether an exit is still pending (only past [`COMPLETE_IO_MAX_EXITS`]) and a stop
/// the handler asked for meanwhile.
fn complete_pending_io(fd: &mut VcpuFd, handler: &dyn ExitHandler) -> (bool, Option<VcpuExitReason>) {
    fd.set_kvm_immediate_exit(1);
    let (mut pending, mut stop) = (true, None);
    for _ in 0..COMPLETE_IO_MAX_EXITS {
        // EINTR (immediate_exit honoured: nothing pending) or anything else: done.
        let action = match fd.run() {
            Ok(mut exit) => dispatch_io(handler, &mut exit),
            Err(_) => None,
        };
        pending = action.is_some();
        if let Some(ExitAction::Stop(reason)) = action {
            stop.get_or_insert(reason);
        }
        if !pending {
            break;
        }
    }
    fd.set_kvm_immediate_exit(0);
    (pending, stop)
}

/// Paused: out of KVM_RUN with pending I/O completed, serving requests until resumed or
/// stopped. No lock the exit path needs is held while waiting. A stop the handler asked for
/// while completing the I/O is returned.
fn stay_paused(
    fd: &mut VcpuFd,
    handler: &dyn ExitHandler,
    sh: &Shared,
    pending_io: &mut bool,
) -> Option<VcpuExitReason> {
    if *pending_io {
        let (still, stop) = complete_pending_io(fd, handler);
        *pending_io = still;
        if stop.is_some() {
            return stop;
        }
    }
    sh.state.store(PAUSED, Ordering::SeqCst);
    let mut q = sh.requests.lock().unwrap_or_else(|e| e.into_inner());
    while sh.pause.load(Ordering::SeqCst) && !sh.stop.load(Ordering::SeqCst) {
        if !q.is_empty() {
            let pending: Vec<Request> = std::mem::take(&mut *q);
            drop(q);
            for r in pending {
                r(fd);
            }
            q = sh.requests.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        q = sh
            .cv
            .wait_timeout(q, Duration::from_millis(100))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
    drop(q);
    sh.state.store(RUNNING, Ordering::SeqCst);
    // A kick that arrived while paused left immediate_exit set: clear it.
    fd.set_kvm_immediate_exit(0);
    None
}

/// One `KVM_RUN` and what to do about its exit: `Err` ends the thread with that reason.
fn run_once(
    fd: &mut VcpuFd,
    index: u32,
    handler: &dyn ExitHandler,
    pending_io: &mut bool,
) -> std::result::Result<ExitAction, VcpuExitReason> {
    *pending_io = false;
    let mut exit = match fd.run() {
        Ok(exit) => exit,
        // A kick: clear the flag so the next KVM_RUN really runs, then re-check.
        Err(e) if e.errno() == libc::EINTR => {
            fd.set_kvm_immediate_exit(0);
            return Ok(ExitAction::Continue);
        }
        // An AP returns EAGAIN once after INIT while it waits for SIPI: just run again.
        Err(e) if e.errno() == libc::EAGAIN => return Ok(ExitAction::Continue),
        Err(e) => return Err(VcpuExitReason::RunError(e.errno())),
    };
    if let Some(action) = dispatch_io(handler, &mut exit) {
        *pending_io = true;
        return Ok(action);
    }
    match exit {
        VcpuExit::Shutdown => Err(VcpuExitReason::Shutdown),
        VcpuExit::FailEntry(reason, _) => Err(VcpuExitReason::FailEntry(reason)),
        VcpuExit::InternalError => {
            // SAFETY: reading the `internal` member of the union is what KVM filled in
            // for KVM_EXIT_INTERNAL_ERROR.
            let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
            let rip = fd.get_regs().ok().map(|r| r.rip);
            Err(VcpuExitReason::InternalError { suberror, rip })
        }
        VcpuExit::Intr => Ok(ExitAction::Continue),
        other => Ok(handler.other_exit(index, other)),
    }
}

fn run_loop(fd: &mut VcpuFd, index: u32, handler: &dyn ExitHandler, sh: &Shared) -> VcpuExitReason {
    let mut pending_io = false;
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return VcpuExitReason::Stopped;
        }
        serve_requests(fd, sh);
        if sh.pause.load(Ordering::SeqCst) {
            if let Some(reason) = stay_paused(fd, handler, sh, &mut pending_io) {
                return reason;
            }
            continue;
        }
        match run_once(fd, index, handler, &mut pending_io) {
            Ok(ExitAction::Continue) => {}
            Ok(ExitAction::Pause) => sh.pause.store(true, Ordering::SeqCst),
            Ok(ExitAction::Stop(reason)) | Err(reason) => {
                if matches!(
                    reason,
                    VcpuExitReason::Unhandled(_) | VcpuExitReason::Unsupported(_)
                ) {
                    log::warn!("vCPU {index}: {reason}");
                }
                if pending_io {
                    // The handler stopped the vCPU on an I/O exit: finish that instruction so
                    // a saved state does not repeat it.
                    let _ = complete_pending_io(fd, handler);
                }
                return reason;
            }
        }
    }
}

/// An error and its sources, as one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed registration is tried again on the next call instead of being remembered as
    /// done (with `Once`, the second call returned Ok without a handler, and the next kick
    /// killed the process); a successful one runs once.
    #[test]
    fn a_failed_kick_handler_registration_is_retried() {
        let done = Mutex::new(false);
        let calls = std::cell::Cell::new(0);
        let failing = || {
            calls.set(calls.get() + 1);
            Err(Error::Signal(vmm_sys_util::errno::Error::new(libc::EINVAL)))
        };
        assert!(ensure_registered(&done, failing).is_err());
        assert!(
            ensure_registered(&done, failing).is_err(),
            "a failure is not remembered as done"
        );
        let working = || {
            calls.set(calls.get() + 1);
            Ok(())
        };
        assert!(ensure_registered(&done, working).is_ok());
        assert!(ensure_registered(&done, working).is_ok());
        assert_eq!(calls.get(), 3, "registered once after two failures");
    }
}
