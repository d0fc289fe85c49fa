// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The connection between two VMMs: addresses, connecting and accepting, and the source's
//! bounded view of it ([`Link`]).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// A byte stream to the peer whose blocking calls can be bounded.
pub trait Stream: Read + Write + Send {
    /// Bound each following read and write (`None`: no bound).
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Stream for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// Where to migrate to / listen on: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A Unix stream socket path (guarded by file permissions).
    Unix(std::path::PathBuf),
    /// A TCP `host:port` (reachable by anyone on the network: the peer must prove it holds
    /// the pre-shared token).
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

    /// Whether the peer must prove it holds the token.
    pub fn needs_token(&self) -> bool {
        matches!(self, Address::Tcp(_))
    }

    /// Connect within `timeout`, or until `cancelled` says so.
    pub(crate) fn connect(
        &self,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Address::Unix(p) => Box::new(connect_unix(p, Instant::now() + timeout, cancelled)?),
            Address::Tcp(a) => {
                let to = a.to_socket_addrs()?.next().ok_or_else(|| {
                    std::io::Error::new(ErrorKind::NotFound, format!("{a} resolves to nothing"))
                })?;
                let s = TcpStream::connect_timeout(&to, timeout.max(Duration::from_millis(1)))?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        })
    }
}

/// Connect to the Unix socket at `path` by `deadline`. `UnixStream::connect` waits without
/// bound on a listener whose backlog is full (a destination that stopped accepting), and std
/// has no bounded Unix connect: a non-blocking one (socket2) is tried again until then.
fn connect_unix(
    path: &std::path::Path,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> std::io::Result<UnixStream> {
    let addr = socket2::SockAddr::unix(path)?;
    loop {
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        match s.connect(&addr) {
            Ok(()) => {
                s.set_nonblocking(false)?;
                return Ok(UnixStream::from(std::os::fd::OwnedFd::from(s)));
            }
            // EAGAIN: the listener's backlog is full.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if cancelled() {
            return Err(std::io::Error::new(
                ErrorKind::Interrupted,
                "cancelled (vm.cancel-migration)",
            ));
        }
        if Instant::now() >= deadline {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "the destination accepts no connection (its backlog stays full)",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A listening destination.
pub(crate) enum Listener {
    Unix {
        listener: std::os::unix::net::UnixListener,
        /// Held while listening: no other process takes the path over. Dropped, it removes
        /// the socket.
        _lock: crate::sock::PathLock,
    },
    Tcp(TcpListener),
}

impl Listener {
    /// Bind `addr` (a Unix path is created 0600 under its lock).
    pub(crate) fn bind(addr: &Address) -> std::io::Result<Listener> {
        let l = match addr {
            Address::Unix(p) => {
                let (listener, lock) = crate::sock::bind_listening(p)?;
                Listener::Unix {
                    listener,
                    _lock: lock,
                }
            }
            Address::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
        };
        // Polled by accept_until: a connection that goes away between poll and accept
        // must not block it.
        match &l {
            Listener::Unix { listener, .. } => listener.set_nonblocking(true)?,
            Listener::Tcp(t) => t.set_nonblocking(true)?,
        }
        Ok(l)
    }

    /// The next connection, once one comes: `Ok(None)` at `deadline` or once `cancelled`
    /// says so (checked every [`SLICE`]).
    pub(crate) fn accept_until(
        &self,
        deadline: Option<Instant>,
        cancelled: &dyn Fn() -> bool,
    ) -> std::io::Result<Option<Box<dyn Stream>>> {
        loop {
            if cancelled() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            let fd = match self {
                Listener::Unix { listener, .. } => listener.as_raw_fd(),
                Listener::Tcp(l) => l.as_raw_fd(),
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, SLICE.as_millis() as libc::c_int) };
            if n > 0 {
                // Another thread may have taken it meanwhile: the listener does not block.
                match self.accept_now() {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    r => return r.map(Some),
                }
            } else if n < 0 {
                // A failing poll (EINTR) must not spin.
                std::thread::sleep(SLICE);
            }
        }
    }

    fn accept_now(&self) -> std::io::Result<Box<dyn Stream>> {
        // Accepted sockets do not inherit O_NONBLOCK on Linux: they block, with timeouts.
        Ok(match self {
            Listener::Unix { listener, .. } => Box::new(listener.accept()?.0),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        })
    }
}

/// How finely a blocked call is cut to notice a cancel.
const SLICE: Duration = Duration::from_millis(100);
/// Room for the last message after a failure (Abandon) or the commit (Complete).
const LAST_WORDS: Duration = Duration::from_secs(2);

/// The source's connection. Every read and write ends at the migration's overall deadline,
/// after `stall` without progress, or within [`SLICE`] of a cancel: the source gets its VM
/// back in bounded time whatever the destination or the link does.
pub(crate) struct Link<'a> {
    conn: Box<dyn Stream>,
    deadline: Instant,
    stall: Duration,
    /// The migration's control state: [`super::ctl::CANCELLED`] ends every call.
    cancel: &'a AtomicU8,
    /// Past the commit, or saying a last word: a cancel no longer applies.
    uncancellable: bool,
    /// Where the bytes written are counted, for progress reports.
    written: Option<&'a AtomicU64>,
}

impl<'a> Link<'a> {
    pub(crate) fn new(
        conn: Box<dyn Stream>,
        deadline: Instant,
        stall: Duration,
        cancel: &'a AtomicU8,
    ) -> Self {
        Link {
            conn,
            deadline,
            stall,
            cancel,
            uncancellable: false,
            written: None,
        }
    }

    /// Count every byte written into `counter`, as it goes out.
    pub(crate) fn counting(mut self, counter: &'a AtomicU64) -> Self {
        self.written = Some(counter);
        self
    }

    /// Give the link [`LAST_WORDS`] for one more message, whatever the deadline and a
    /// cancel say.
    pub(crate) fn last_words(&mut self) {
        self.deadline = Instant::now() + LAST_WORDS;
        self.uncancellable = true;
    }

    fn step<T>(&mut self, mut op: impl FnMut(&mut dyn Stream) -> std::io::Result<T>) -> std::io::Result<T> {
        let stalled = Instant::now() + self.stall;
        loop {
            if !self.uncancellable && self.cancel.load(Ordering::SeqCst) == super::ctl::CANCELLED {
                return Err(std::io::Error::other(
                    "the migration was cancelled (vm.cancel-migration)",
                ));
            }
            let now = Instant::now();
            if now >= self.deadline {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "the migration's deadline (timeout_ms) passed",
                ));
            }
            if now >= stalled {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("the destination made no progress for {:?}", self.stall),
                ));
            }
            let left = self.deadline.min(stalled) - now;
            self.conn.set_timeouts(Some(left.min(SLICE)))?;
            match op(&mut *self.conn) {
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                r => return r,
            }
        }
    }
}

impl Read for Link<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step(|s| s.read(&mut *buf))
    }
}

impl Write for Link<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.step(|s| s.write(buf))?;
        if let Some(c) = self.written {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.step(|s| s.flush())
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
        assert!(Address::parse("tcp:h:1").unwrap().needs_token());
    }

    /// A peer that takes one byte a second keeps a per-call timeout happy forever; the
    /// overall deadline ends the write anyway.
    #[test]
    fn a_trickling_peer_cannot_outlast_the_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let drain = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while !st.load(Ordering::SeqCst) && b.read(&mut byte).is_ok_and(|n| n > 0) {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let never = AtomicU8::new(super::super::ctl::RUNNING);
        let start = Instant::now();
        let mut link = Link::new(
            Box::new(a),
            start + Duration::from_millis(500),
            Duration::from_secs(5),
            &never,
        );
        let e = link.write_all(&vec![7u8; 8 << 20]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("deadline"), "{e}");
        stop.store(true, Ordering::SeqCst);
        drop(link);
        drain.join().unwrap();
    }

    #[test]
    fn a_cancel_ends_a_blocked_read_but_not_the_last_words() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let cancel = AtomicU8::new(super::super::ctl::RUNNING);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                cancel.store(super::super::ctl::CANCELLED, Ordering::SeqCst);
            });
            let mut link = Link::new(
                Box::new(a),
                Instant::now() + Duration::from_secs(60),
                Duration::from_secs(60),
                &cancel,
            );
            let e = link.read(&mut [0u8; 4]).unwrap_err();
            assert!(e.to_string().contains("cancelled"), "{e}");
            link.last_words();
            link.write_all(b"bye").unwrap();
        });
        let mut got = [0u8; 3];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"bye");
    }
}
