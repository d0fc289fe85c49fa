// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Legacy devices: COM1 (vm-superio) on an irqfd, the console back ends, and the SCI as a
//! level-triggered line through irqfd + resamplefd.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// Cap on output kept for a client that has not connected yet.
const BACKLOG_MAX: usize = 1 << 20;

/// A listening Unix socket whose (single, latest) client is the console. Output produced
/// before a client connects is kept (up to 1 MiB) and sent when it connects, so nothing the
/// guest printed early (e.g. `READY`) is lost.
pub struct SocketConsole {
    path: PathBuf,
    state: Mutex<(Option<UnixStream>, Vec<u8>)>,
}

impl SocketConsole {
    /// Bind `path` (replacing a stale socket file).
    pub fn bind(path: &Path) -> std::io::Result<(Arc<Self>, UnixListener)> {
        let listener = crate::sock::bind_listening(path)?;
        Ok((
            Arc::new(SocketConsole {
                path: path.into(),
                state: Mutex::new((None, Vec::new())),
            }),
            listener,
        ))
    }

    fn output(&self, buf: &[u8]) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (stream, backlog) = &mut *st;
        if let Some(s) = stream {
            if s.write_all(buf).is_ok() {
                return;
            }
            *stream = None;
        }
        if backlog.len() + buf.len() <= BACKLOG_MAX {
            backlog.extend_from_slice(buf);
        }
    }

    fn attach(&self, mut s: UnixStream) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(&st.1)?;
        st.1.clear();
        st.0 = Some(s);
        Ok(())
    }
}

impl Drop for SocketConsole {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// COM1 as a port I/O device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    /// COM1 writing to `out`, interrupting through `irq` (registered by the caller as irqfd).
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
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
        Ok(SerialDevice { serial })
    }

    /// Registers and FIFO.
    pub fn state(&self) -> crate::snapshot::SerialSnapshot {
        self.serial.state().into()
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

/// Feed bytes from `input` into the serial FIFO, waiting while it is full. Ends at EOF.
pub fn pump_input(serial: &Arc<Mutex<SerialDevice>>, mut input: impl Read, stop: &AtomicBool) {
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut off = 0;
        while off < n && !stop.load(Ordering::Relaxed) {
            let took = serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue(&buf[off..n]);
            off += took;
            if off < n {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
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
            .spawn(move || loop {
                if resample.read().is_err() {
                    return;
                }
                if l2.load(Ordering::SeqCst) {
                    let _ = fd2.write(1);
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
