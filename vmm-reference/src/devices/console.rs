// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where COM1's output goes and its input comes from: stdout, a file, or a Unix socket
//! whose latest client is the console (bounded output, never stalling a vCPU).

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use super::serial::{pump_input, wait_readable, SerialDevice};

/// Output sink of the console: stdout, a file, or the connected socket client.
pub enum ConsoleOut {
    /// Process stdout.
    Stdout(std::io::Stdout),
    /// A file.
    File(std::fs::File),
    /// The Unix socket console (shared with the accept thread).
    Socket(Arc<SocketConsole>),
    /// Nowhere (`--serial null` / `off`).
    Null,
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
            ConsoleOut::Null => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ConsoleOut::Stdout(s) => s.flush(),
            ConsoleOut::File(f) => f.flush(),
            ConsoleOut::Socket(_) | ConsoleOut::Null => Ok(()),
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

/// The kernel's send buffer of a console connection: small, since the VMM keeps what a slow
/// client has not read in its own bounded outbox (`OUTBOX_MAX`), where it is counted and
/// dropped beyond the bound; a large kernel buffer would only hide that.
const CONSOLE_SNDBUF: libc::c_int = 16 * 1024;

fn limit_send_buffer(conn: &std::os::unix::net::UnixStream) {
    use std::os::fd::AsRawFd;
    let size = CONSOLE_SNDBUF;
    // SAFETY: a valid socket fd, and a c_int option value of the size given.
    let r = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        log::warn!("console: SO_SNDBUF: {}", std::io::Error::last_os_error());
    }
}

/// Accept console clients on `listener` until `stop`; each new client replaces the previous
/// one and its input goes to the serial port.
pub fn serve_socket(
    console: Arc<SocketConsole>,
    listener: UnixListener,
    serial: Arc<Mutex<SerialDevice>>,
    stop: Arc<AtomicBool>,
) {
    use std::os::fd::AsRawFd;
    // Polled, not a blocking accept: the thread ends with the VM (`stop`) instead of holding
    // the console and COM1 until the process exits.
    while !stop.load(Ordering::Relaxed) {
        match wait_readable(listener.as_raw_fd(), 100) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                log::warn!("console socket: {e}; no more console clients");
                return;
            }
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        limit_send_buffer(&conn);
        let Ok(reader) = conn.try_clone() else { continue };
        if console.attach(conn).is_err() {
            continue;
        }
        let serial = serial.clone();
        let stop = stop.clone();
        std::thread::spawn(move || pump_input(&serial, reader, &stop));
    }
}
