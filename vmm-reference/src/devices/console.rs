// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where COM1's output goes and its input comes from: stdout, a file, a Unix socket whose
//! latest client is the console, or a pseudo-terminal, each through a bounded outbox that
//! never stalls a vCPU.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use super::serial::{pump_input, wait_readable, SerialDevice};

/// Output sink of the console: stdout, a file, or the connected socket client.
pub enum ConsoleOut {
    /// Process stdout, written on the vCPU thread (a reader that stops stalls it).
    Stdout(std::io::Stdout),
    /// A file, written on the vCPU thread (a FIFO nobody reads stalls it).
    File(std::fs::File),
    /// A [`Console`]: bounded, written by its own thread (what the VMM uses for every mode).
    Socket(Arc<Console>),
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
    /// The socket's client or the pty's master.
    client: Option<File>,
    /// The writer thread holds data it took from `buf` and has not finished sending.
    sending: bool,
    /// Bytes the reader has taken so far.
    sent: u64,
}

/// A listening Unix socket whose (single, latest) client is the console, or a
/// pseudo-terminal's master. The guest's output never waits for the reader: it goes into a
/// bounded outbox (1 MiB) that a writer thread sends, so a client that stops reading (or a
/// pty nobody opened) cannot stall the vCPU writing to COM1. Output produced before a
/// client connects is kept the same way and sent when it connects, so nothing the guest
/// printed early (e.g. `READY`) is lost.
pub struct Console {
    /// The socket's path, the pty's slave, or the sink's name.
    path: PathBuf,
    /// A pseudo-terminal.
    pty: bool,
    /// A pty's master or a sink (stdout, a file): stays attached whatever a write says.
    fixed: bool,
    out: Mutex<Outbox>,
    ready: Condvar,
    lock: Mutex<Option<crate::sock::PathLock>>,
}

impl Console {
    /// Bind `path` (replacing a stale socket file) and start the writer thread.
    pub fn bind(path: &Path) -> std::io::Result<(Arc<Self>, UnixListener)> {
        let (listener, lock) = crate::sock::bind_listening(path)?;
        let console = Console::start(path.into(), false, Some(lock))?;
        Ok((console, listener))
    }

    /// Output to `file` (stdout, a log file) through the bounded outbox: a reader that stops
    /// (a full pipe, a FIFO nobody reads) cannot stall a vCPU; `name` says what it is.
    pub fn sink(file: File, name: PathBuf) -> std::io::Result<Arc<Self>> {
        let console = Console::start(name, false, None)?;
        console.lock().client = Some(file);
        Ok(console)
    }

    /// Open a pseudo-terminal (`--serial pty`): the console, and the master for input.
    pub fn pty() -> std::io::Result<(Arc<Self>, File)> {
        let (master, slave) = super::pty::open()?;
        let input = master.try_clone()?;
        let console = Console::start(slave, true, None)?;
        console.lock().client = Some(master);
        Ok((console, input))
    }

    fn start(path: PathBuf, pty: bool, lock: Option<crate::sock::PathLock>) -> std::io::Result<Arc<Self>> {
        // Every console but a socket's has one client for good.
        let fixed = pty || lock.is_none();
        let console = Arc::new(Console {
            path,
            pty,
            fixed,
            out: Mutex::new(Outbox::default()),
            ready: Condvar::new(),
            lock: Mutex::new(lock),
        });
        let weak = Arc::downgrade(&console);
        std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || {
                crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                write_out(&weak)
            })?;
        Ok(console)
    }

    /// The socket's path, or the pty's slave (what people attach to).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a pseudo-terminal.
    pub fn is_pty(&self) -> bool {
        self.pty
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue guest output; never blocks on the client (nor logs: stderr may be the same
    /// full pipe; the writer thread reports drops).
    fn output(&self, buf: &[u8]) {
        let mut o = self.lock();
        let room = OUTBOX_MAX.saturating_sub(o.buf.len()).min(buf.len());
        o.buf.extend_from_slice(&buf[..room]);
        o.dropped += (buf.len() - room) as u64;
        drop(o);
        self.ready.notify_one();
    }

    /// Remove the socket and give its path up (the VM ends; other owners of the console may
    /// outlive it until the process exits).
    pub fn close(&self) {
        // The guest's last words (a panic, the reply before a triple fault) go out first: the
        // writer thread gets up to a second to hand a connected client what is queued.
        // A reader that takes nothing for 300 ms (a pty nobody opened) is not waited for.
        // A sink (stdout, a file) was written synchronously before it had an outbox: its
        // reader (`| tee`, a terminal) gets 10 s, and 5 s without taking a whole 64 KiB
        // chunk (progress is counted per chunk).
        let sink = self.fixed && !self.pty;
        let (all, idle) = match sink {
            true => (Duration::from_secs(10), Duration::from_secs(5)),
            false => (Duration::from_secs(1), Duration::from_millis(300)),
        };
        let deadline = std::time::Instant::now() + all;
        let mut last = (u64::MAX, std::time::Instant::now());
        while std::time::Instant::now() < deadline {
            let o = self.lock();
            if (o.buf.is_empty() && !o.sending) || o.client.is_none() {
                break;
            }
            match o.sent {
                n if n != last.0 => last = (n, std::time::Instant::now()),
                _ if last.1.elapsed() > idle => break,
                _ => {}
            }
            drop(o);
            self.ready.notify_one();
            std::thread::sleep(Duration::from_millis(2));
        }
        // A pty's master goes now: an attached terminal sees the hangup with the VM's end.
        if self.fixed {
            self.lock().client = None;
        }
        // The lock is held for a socket only (a pty's slave is not ours to remove); dropping
        // it removes the socket, if the path is still ours.
        drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// Bytes of guest output dropped because the client did not keep up.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn attach(&self, s: UnixStream) -> std::io::Result<()> {
        // A bounded write: the writer thread must come back to check for a newer client.
        s.set_write_timeout(Some(Duration::from_millis(200)))?;
        self.lock().client = Some(File::from(OwnedFd::from(s)));
        self.ready.notify_one();
        Ok(())
    }
}

/// Say (rate-limited) that output was dropped since `*reported`.
fn report_drops(dropped: u64, reported: &mut u64) {
    if dropped != *reported {
        *reported = dropped;
        static LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new();
        crate::rate_limited!(
            LOG,
            warn,
            "console client is not reading: {dropped} bytes of guest output dropped so far"
        );
    }
}

/// The console's writer thread: sends the outbox to the client until the console is gone.
fn write_out(console: &Weak<Console>) {
    let mut reported = 0;
    loop {
        let Some(c) = console.upgrade() else { return };
        let dropped = c.lock().dropped;
        report_drops(dropped, &mut reported);
        let mut o = c.lock();
        if o.buf.is_empty() || o.client.is_none() {
            let _ = c.ready.wait_timeout(o, Duration::from_millis(200));
            continue;
        }
        // The client first: if it cannot be duplicated (no fds left), the outbox stays as it
        // is; a socket client is dropped, a pty's master is tried again later.
        let Some(mut client) = o.client.as_ref().and_then(|s| s.try_clone().ok()) else {
            if !c.fixed {
                o.client = None;
            }
            drop(o);
            std::thread::sleep(PTY_RETRY);
            continue;
        };
        // At most CHUNK at a time: `sent` then moves as a slow reader takes it, which is
        // what `close` waits on.
        let take = o.buf.len().min(CHUNK);
        let data: Vec<u8> = o.buf.drain(..take).collect();
        o.sending = true;
        drop(o);
        let (sent, gone) = send_some(&mut client, &data, c.fixed);
        let mut o = c.lock();
        o.sending = false;
        o.sent += sent as u64;
        // A pty's master stays whatever a write said: its slave may be opened again.
        if gone && !c.fixed {
            o.client = None;
        }
        // What was not sent goes back in front of what arrived meanwhile (bounded again).
        let rest = &data[sent..];
        if !rest.is_empty() {
            let newer = std::mem::take(&mut o.buf);
            let keep = OUTBOX_MAX.min(rest.len() + newer.len());
            o.buf = [rest, &newer[..]].concat();
            o.dropped += (o.buf.len() - keep) as u64;
            o.buf.truncate(keep);
        }
        drop(o);
        if gone && c.fixed {
            // Not under the lock: vCPUs queue output meanwhile.
            std::thread::sleep(PTY_RETRY);
        }
    }
}

/// Most output the writer thread takes from the outbox per send.
const CHUNK: usize = 64 * 1024;

/// How long the writer waits before trying a pty that failed a write (no slave open).
const PTY_RETRY: Duration = Duration::from_millis(100);

/// Wait up to `ms` for `fd` to take a write (or, for a socket, to have hung up: the write
/// then fails and the client is dropped). A pty master whose slave was closed reports POLLHUP
/// at once, without POLLOUT once its buffer is full: that waits the whole time, as does a
/// failing poll, so the writer does not spin.
fn wait_writable(fd: std::os::fd::RawFd, ms: i32, pty: bool) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    let hung_up = pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0;
    match n {
        0 => false,
        n if n > 0 && (pfd.revents & libc::POLLOUT != 0 || (hung_up && !pty)) => true,
        _ => {
            std::thread::sleep(Duration::from_millis(ms as u64));
            false
        }
    }
}

/// Write as much of `data` as the client takes within 200 ms per write: the bytes sent, and
/// whether the client is gone (for a pty: a write failed).
fn send_some(client: &mut File, data: &[u8], pty: bool) -> (usize, bool) {
    let mut off = 0;
    while off < data.len() {
        if !wait_writable(client.as_raw_fd(), 200, pty) {
            return (off, false);
        }
        match client.write(&data[off..]) {
            Ok(0) => return (off, true),
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (off, false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (off, true),
        }
    }
    (off, false)
}

impl Drop for Console {
    fn drop(&mut self) {
        self.close();
    }
}

/// The kernel's send buffer of a console connection: small, since the VMM keeps what a slow
/// client has not read in its own bounded outbox (`OUTBOX_MAX`), where it is counted and
/// dropped beyond the bound; a large kernel buffer would only hide that.
const CONSOLE_SNDBUF: libc::c_int = 16 * 1024;

fn limit_send_buffer(conn: &std::os::unix::net::UnixStream) {
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

/// Feed what is typed on a pty into the serial port until `stop`. With no slave open, reads
/// of the master fail (EIO): they are tried again every 100 ms, so a later `screen
/// /dev/pts/N` gets a working console.
pub fn serve_pty(master: &File, serial: &Arc<Mutex<SerialDevice>>, stop: &AtomicBool) {
    use std::os::fd::AsFd;
    while !stop.load(Ordering::Relaxed) {
        pump_input(serial, master.as_fd(), stop);
        std::thread::sleep(PTY_RETRY);
    }
}

/// Accept console clients on `listener` until `stop`; each new client replaces the previous
/// one and its input goes to the serial port.
pub fn serve_socket(
    console: Arc<Console>,
    listener: UnixListener,
    serial: Arc<Mutex<SerialDevice>>,
    stop: Arc<AtomicBool>,
) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    /// A pty nobody opened takes what its kernel buffer holds, the outbox 1 MiB more, and
    /// drops (and counts) the rest; queueing never waits. Someone who opens the slave later
    /// gets what was kept, in order.
    #[test]
    fn an_unread_pty_is_bounded_and_keeps_what_it_can() {
        let _alone = crate::devices::DEVICE_THREADS
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (console, _input) = Console::pty().expect("a pty");
        let t = std::time::Instant::now();
        let total = 3 * OUTBOX_MAX;
        for i in 0..total / 1024 {
            console.output(&[b'a' + (i % 26) as u8; 1024]);
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "queueing waited: {:?}",
            t.elapsed()
        );
        // The writer thread moves what the pty takes out of the outbox, then it stays full:
        // wait until the pty has taken nothing for half a second (at most 10 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut last = (u64::MAX, std::time::Instant::now());
        while std::time::Instant::now() < deadline && last.1.elapsed() < Duration::from_millis(500) {
            let sent = console.lock().sent;
            if sent != last.0 {
                last = (sent, std::time::Instant::now());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let dropped = console.dropped() as usize;
        assert!(dropped >= total - 2 * OUTBOX_MAX, "dropped {dropped} of {total}");
        assert!(dropped < total, "everything dropped");
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY)
            .open(console.path())
            .expect("the slave");
        let mut first = [0u8; 2048];
        slave.read_exact(&mut first).expect("what was kept");
        assert!(first[..1024].iter().all(|b| *b == b'a'), "oldest first");
        assert!(first[1024..].iter().all(|b| *b == b'b'));
    }
}
