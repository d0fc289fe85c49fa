// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! COM1: vm-superio's 16550 as a port I/O device interrupting through an irqfd, and the
//! pump that feeds it console input without ever holding a byte the guest has not taken.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;
use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleOut;

/// vm-superio's interrupt trigger as an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
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
pub(super) fn wait_readable(fd: RawFd, ms: i32) -> std::io::Result<bool> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

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
