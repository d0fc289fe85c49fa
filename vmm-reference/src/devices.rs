// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Legacy devices: COM1 (vm-superio) on an irqfd, the console back ends, and the SCI as a
//! level-triggered line through irqfd + resamplefd.

use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use acpi_cpu_hotplug::InterruptLine;
use kvm_ioctls::VmFd;
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;
use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// vm-superio's interrupt trigger as an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Output sink of the console: stdout, a file, or the connected socket client.
pub enum ConsoleOut {
    /// Process stdout.
    Stdout(std::io::Stdout),
    /// A file.
    File(std::fs::File),
    /// The Unix socket console (shared with the accept thread).
    Socket(Arc<SocketConsole>),
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ConsoleOut::Stdout(s) => {
                let n = s.write(buf)?;
                s.flush()?;
                Ok(n)
            }
            ConsoleOut::File(f) => f.write(buf),
            ConsoleOut::Socket(s) => {
                s.output(buf);
                Ok(buf.len())
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ConsoleOut::Stdout(s) => s.flush(),
            ConsoleOut::File(f) => f.flush(),
            ConsoleOut::Socket(_) => Ok(()),
        }
    }
}

/// Console output held for a client that is slow or not connected yet; beyond it, output is
/// dropped and counted.
const OUTBOX_MAX: usize = 1 << 20;

/// Output waiting for the console client, and what did not fit.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    dropped: u64,
    client: Option<UnixStream>,
    /// The writer thread holds data it took from `buf` and has not finished sending.
    sending: bool,
}

/// A listening Unix socket whose (single, latest) client is the console. The guest's output
/// never waits for the client: it goes into a bounded outbox (1 MiB) that a writer thread
/// sends, so a client that stops reading cannot stall the vCPU writing to COM1. Output
/// produced before a client connects is kept the same way and sent when it connects, so
/// nothing the guest printed early (e.g. `READY`) is lost.
pub struct SocketConsole {
    path: PathBuf,
    out: Mutex<Outbox>,
    ready: Condvar,
    lock: Mutex<Option<crate::sock::PathLock>>,
}

impl SocketConsole {
    /// Bind `path` (replacing a stale socket file) and start the writer thread.
    pub fn bind(path: &Path) -> std::io::Result<(Arc<Self>, UnixListener)> {
        let (listener, lock) = crate::sock::bind_listening(path)?;
        let console = Arc::new(SocketConsole {
            path: path.into(),
            out: Mutex::new(Outbox::default()),
            ready: Condvar::new(),
            lock: Mutex::new(Some(lock)),
        });
        let weak = Arc::downgrade(&console);
        std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || {
                crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                write_out(&weak)
            })?;
        Ok((console, listener))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue guest output; never blocks on the client.
    fn output(&self, buf: &[u8]) {
        let mut o = self.lock();
        let room = OUTBOX_MAX.saturating_sub(o.buf.len()).min(buf.len());
        o.buf.extend_from_slice(&buf[..room]);
        o.dropped += (buf.len() - room) as u64;
        let dropped = o.dropped;
        drop(o);
        self.ready.notify_one();
        if room < buf.len() {
            static LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new();
            crate::rate_limited!(
                LOG,
                warn,
                "console client is not reading: {dropped} bytes of guest output dropped so far"
            );
        }
    }

    /// Remove the socket and give its path up (the VM ends; other owners of the console may
    /// outlive it until the process exits).
    pub fn close(&self) {
        // The guest's last words (a panic, the reply before a triple fault) go out first: the
        // writer thread gets up to a second to hand a connected client what is queued.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < deadline {
            let o = self.lock();
            if (o.buf.is_empty() && !o.sending) || o.client.is_none() {
                break;
            }
            drop(o);
            self.ready.notify_one();
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = std::fs::remove_file(&self.path);
        drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// Bytes of guest output dropped because the client did not keep up.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn attach(&self, s: UnixStream) -> std::io::Result<()> {
        // A bounded write: the writer thread must come back to check for a newer client.
        s.set_write_timeout(Some(Duration::from_millis(200)))?;
        self.lock().client = Some(s);
        self.ready.notify_one();
        Ok(())
    }
}

/// The console's writer thread: sends the outbox to the client until the console is gone.
fn write_out(console: &Weak<SocketConsole>) {
    loop {
        let Some(c) = console.upgrade() else { return };
        let mut o = c.lock();
        if o.buf.is_empty() || o.client.is_none() {
            let _ = c.ready.wait_timeout(o, Duration::from_millis(200));
            continue;
        }
        let data = std::mem::take(&mut o.buf);
        let Some(mut client) = o.client.as_ref().and_then(|s| s.try_clone().ok()) else {
            o.client = None;
            o.buf = data;
            continue;
        };
        o.sending = true;
        drop(o);
        let sent = send_some(&mut client, &data);
        let mut o = c.lock();
        o.sending = false;
        if sent.is_none() {
            o.client = None;
        }
        // What was not sent goes back in front of what arrived meanwhile (bounded again).
        let rest = &data[sent.unwrap_or(0)..];
        if !rest.is_empty() {
            let newer = std::mem::take(&mut o.buf);
            let keep = OUTBOX_MAX.min(rest.len() + newer.len());
            o.buf = [rest, &newer[..]].concat();
            o.dropped += (o.buf.len() - keep) as u64;
            o.buf.truncate(keep);
        }
    }
}

/// Write as much of `data` as the client takes before its write timeout: `Some(bytes)`, or
/// `None` when the client is gone.
fn send_some(client: &mut UnixStream, data: &[u8]) -> Option<usize> {
    let mut off = 0;
    while off < data.len() {
        match client.write(&data[off..]) {
            Ok(0) => return None,
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Some(off)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(off)
}

impl Drop for SocketConsole {
    fn drop(&mut self) {
        self.close();
    }
}

/// COM1 as a port I/O device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleOut>,
    /// A capture took the device's state: input waits (in the client's socket) until
    /// [`SerialDevice::resume_input`].
    input_quiesced: bool,
}

impl SerialDevice {
    /// COM1 writing to `out`, interrupting through `irq` (registered by the caller as irqfd).
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
            input_quiesced: false,
        }
    }

    /// COM1 with the registers and FIFO of a snapshot.
    pub fn from_state(
        state: &crate::snapshot::SerialSnapshot,
        irq: EventFd,
        out: ConsoleOut,
    ) -> std::io::Result<Self> {
        let serial = Serial::from_state(&state.into(), EventFdTrigger(irq), NoEvents, out).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("serial state: {e:?}"))
        })?;
        Ok(SerialDevice {
            serial,
            input_quiesced: false,
        })
    }

    /// Registers and FIFO.
    pub fn state(&self) -> crate::snapshot::SerialSnapshot {
        self.serial.state().into()
    }

    /// Stop taking console input; the caller captures the state under the same lock, so no
    /// byte the client sent afterwards is lost with it.
    pub fn quiesce_input(&mut self) {
        self.input_quiesced = true;
    }

    /// Take console input again (the capture is over and this VM runs on).
    pub fn resume_input(&mut self) {
        self.input_quiesced = false;
    }

    /// Bytes the input pump may read now: the FIFO's free room, none while quiesced.
    fn input_room(&self) -> usize {
        if self.input_quiesced {
            0
        } else {
            self.serial.fifo_capacity()
        }
    }

    /// Queue input bytes; returns how many were accepted (the FIFO holds 64).
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity();
        let n = room.min(bytes.len());
        if n == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: u16, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: u16, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                static LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new();
                crate::rate_limited!(LOG, warn, "serial write: {e}");
            }
        }
    }
}

/// Feed bytes from `input` into the serial FIFO until EOF, an error or `stop`. Bytes are read
/// only as far as the FIFO has room, with the device locked, so none is ever held between
/// the client and the device: once a capture quiesces input
/// ([`SerialDevice::quiesce_input`]), what the guest has not received stays in the client's
/// socket instead of being lost with a VM that migrated away.
pub fn pump_input(serial: &Arc<Mutex<SerialDevice>>, input: impl AsRawFd, stop: &AtomicBool) {
    let fd = input.as_raw_fd();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        match wait_readable(fd, 100) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let mut dev = serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = dev.input_room().min(buf.len());
        if room == 0 {
            drop(dev);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match read_now(fd, &mut buf[..room]) {
            Ok(0) => return,
            Ok(n) => {
                dev.enqueue(&buf[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => return,
        }
    }
}

/// Wait up to `ms` for `fd` to be readable (or at EOF).
fn wait_readable(fd: RawFd, ms: i32) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    match unsafe { libc::poll(&mut pfd, 1, ms) } {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Read what is there without blocking: `recv(MSG_DONTWAIT)` on a socket (setting
/// O_NONBLOCK would also change the console's output side, which shares the open file), a
/// plain read otherwise (stdin, after poll said it is readable; this thread is its only
/// reader).
fn read_now(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `fd` is open for the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOTSOCK) {
        return Err(e);
    }
    // SAFETY: as above.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Accept console clients on `listener` forever; each new client replaces the previous one
/// and its input goes to the serial port.
pub fn serve_socket(
    console: Arc<SocketConsole>,
    listener: UnixListener,
    serial: Arc<Mutex<SerialDevice>>,
    stop: Arc<AtomicBool>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let Ok(reader) = conn.try_clone() else { continue };
        if console.attach(conn).is_err() {
            continue;
        }
        let serial = serial.clone();
        let stop = stop.clone();
        std::thread::spawn(move || pump_input(&serial, reader, &stop));
    }
}

/// A level-triggered interrupt line on a KVM GSI via irqfd + resamplefd: asserting writes
/// the irqfd; KVM keeps the line high until the guest's EOI, then signals the resamplefd and
/// the resample thread re-asserts it if the level is still high. (Deasserting with
/// KVM_IRQ_LINE inside the guest's handler duplicates interrupts on some KVM backends.)
pub struct LevelIrq {
    irqfd: EventFd,
    resample: EventFd,
    gsi: u32,
    level: Arc<AtomicBool>,
}

impl LevelIrq {
    /// Register the line on `gsi` and start its resample thread.
    pub fn new(vm: &VmFd, gsi: u32) -> std::io::Result<Self> {
        let line = LevelIrq::unregistered(gsi)?;
        line.register(vm)?;
        Ok(line)
    }

    /// The line for `gsi` with its resample thread, not yet attached to a VM: a restore
    /// attaches it (with [`LevelIrq::register`]) only after the vCPUs and the IOAPIC state
    /// exist, so a level that is high in the saved state cannot be delivered to nobody.
    pub fn unregistered(gsi: u32) -> std::io::Result<Self> {
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        let resample = EventFd::new(0)?;
        let level = Arc::new(AtomicBool::new(false));
        let line = LevelIrq {
            irqfd,
            resample: resample.try_clone()?,
            gsi,
            level,
        };
        let (l2, fd2) = (line.level.clone(), line.irqfd.try_clone()?);
        std::thread::Builder::new()
            .name(format!("irq{gsi}-resample"))
            .spawn(move || {
                crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                loop {
                    if resample.read().is_err() {
                        return;
                    }
                    if l2.load(Ordering::SeqCst) {
                        let _ = fd2.write(1);
                    }
                }
            })?;
        Ok(line)
    }

    /// Register the same line on another VM (a VM rebuilt from saved state); re-asserts it if
    /// it is high, since the new VM's IOAPIC starts from the saved pin state.
    pub fn register(&self, vm: &VmFd) -> std::io::Result<()> {
        vm.register_irqfd_with_resample(&self.irqfd, &self.resample, self.gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if self.level.load(Ordering::SeqCst) {
            self.irqfd.write(1)?;
        }
        Ok(())
    }

    /// Detach the line from `vm`.
    pub fn unregister(&self, vm: &VmFd) -> std::io::Result<()> {
        vm.unregister_irqfd(&self.irqfd, self.gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl InterruptLine for LevelIrq {
    fn set_level(&self, high: bool) {
        self.level.store(high, Ordering::SeqCst);
        if high {
            if let Err(e) = self.irqfd.write(1) {
                log::error!("asserting level irq: {e}");
            }
        }
        // Going low needs no action: KVM drops the line at the next EOI (resample) and the
        // resample thread does not re-assert it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn fifo(serial: &Mutex<SerialDevice>) -> Vec<u8> {
        serial.lock().unwrap().state().in_buffer
    }

    fn wait_fifo(serial: &Mutex<SerialDevice>, len: usize) -> Vec<u8> {
        for _ in 0..500 {
            let f = fifo(serial);
            if f.len() >= len {
                return f;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        fifo(serial)
    }

    /// A capture quiesces console input: what the client sends afterwards stays in its
    /// socket (nothing read and held by the pump), and flows once input resumes. The FIFO
    /// never takes more than it has room for; the rest waits in the socket too.
    #[test]
    fn quiesced_console_input_stays_in_the_socket() {
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFd::new(0).unwrap(),
            ConsoleOut::File(null),
        )));
        let (mut client, vmm_side) = UnixStream::pair().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, side) = (serial.clone(), stop.clone(), vmm_side.try_clone().unwrap());
        let pump = std::thread::spawn(move || pump_input(&s, side, &st));

        client.write_all(b"before").unwrap();
        assert_eq!(wait_fifo(&serial, 6), b"before");
        serial.lock().unwrap().quiesce_input();
        client.write_all(b"after").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(fifo(&serial), b"before", "input entered a captured device");

        // 100 more bytes than the FIFO's 64: the pump takes only what fits.
        client.write_all(&[b'x'; 100]).unwrap();
        serial.lock().unwrap().resume_input();
        let f = wait_fifo(&serial, 64);
        assert_eq!(f.len(), 64);
        assert_eq!(&f[..11], b"beforeafter");
        stop.store(true, Ordering::Relaxed);
        pump.join().unwrap();
        // What did not fit is still in the socket, not lost in the pump's hands.
        drop(client);
        let mut rest = Vec::new();
        let mut vmm_side = vmm_side;
        vmm_side.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, vec![b'x'; 100 - 53]);
    }
}
