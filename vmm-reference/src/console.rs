// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Client side of the test guest's serial line protocol over `--serial socket=PATH`.
//! Used by the demo and the end-to-end tests.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A connected guest console.
pub struct GuestConsole {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// Every line received so far (for diagnostics).
    pub transcript: Vec<String>,
}

fn timeout_err(what: &str) -> std::io::Error {
    std::io::Error::new(ErrorKind::TimedOut, format!("timed out waiting for {what}"))
}

impl GuestConsole {
    /// Connect to the console socket, retrying until it exists or `timeout` passes.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Self> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    let reader = BufReader::new(stream.try_clone()?);
                    return Ok(GuestConsole {
                        stream,
                        reader,
                        transcript: Vec::new(),
                    });
                }
                Err(e) if start.elapsed() < timeout => {
                    log::trace!("console not there yet: {e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Next line, or an error after `timeout`.
    pub fn read_line(&mut self, timeout: Duration) -> std::io::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout_err("a console line"));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "console closed")),
                Ok(_) if line.ends_with('\n') => {
                    let l = line.trim_end().to_string();
                    self.transcript.push(l.clone());
                    return Ok(l);
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Read lines until one starts with `prefix`; return it.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> std::io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout_err(prefix));
            }
            let l = self.read_line(left)?;
            if l.starts_with(prefix) {
                return Ok(l);
            }
        }
    }

    /// Send one line without waiting for a reply.
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.write_all(format!("{line}\n").as_bytes())
    }

    /// Send a command line and collect the reply up to and including its `OK`/`ERR` line.
    pub fn command(&mut self, cmd: &str, timeout: Duration) -> std::io::Result<Vec<String>> {
        self.stream.write_all(format!("{cmd}\n").as_bytes())?;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout_err(&format!("the reply to {cmd:?}")));
            }
            let l = self.read_line(left)?;
            let done = l == "OK" || l.starts_with("OK ") || l.starts_with("ERR");
            out.push(l);
            if done {
                return Ok(out);
            }
        }
    }

    /// Run `status` and parse it.
    pub fn status(&mut self, timeout: Duration) -> std::io::Result<GuestStatus> {
        let lines = self.command("status", timeout)?;
        GuestStatus::parse(&lines).ok_or_else(|| {
            std::io::Error::new(ErrorKind::InvalidData, format!("bad status reply: {lines:?}"))
        })
    }
}

/// One CPU line of the guest's `status` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuStatus {
    /// CPU index (MADT order).
    pub index: u32,
    /// APIC id.
    pub apic_id: u32,
    /// `absent`, `stopped`, `booting`, `online`, `offline` or `failed`.
    pub state: String,
    /// LAPIC timer ticks counted on that CPU.
    pub ticks: u64,
    /// Longest interval between two ticks since the guest's last `resetgaps`, in µs.
    pub maxgap_us: u64,
}

/// The guest's `status` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestStatus {
    /// `xapic` or `x2apic`.
    pub apic_mode: String,
    /// Possible CPUs (MADT entries).
    pub possible: u32,
    /// Present CPUs.
    pub present: u32,
    /// Online CPUs.
    pub online: u32,
    /// SCIs the guest took.
    pub sci: u64,
    /// Insert events the guest handled.
    pub inserts: u64,
    /// CPUs the guest ejected.
    pub ejects: u64,
    /// Per-CPU lines.
    pub cpus: Vec<CpuStatus>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl GuestStatus {
    /// Parse the lines of a `status` reply.
    pub fn parse(lines: &[String]) -> Option<GuestStatus> {
        let head = lines.iter().find(|l| l.starts_with("STATUS "))?;
        let mut cpus = Vec::new();
        for l in lines.iter().filter(|l| l.starts_with("CPU ")) {
            cpus.push(CpuStatus {
                index: l.split_whitespace().nth(1)?.parse().ok()?,
                apic_id: field(l, "apic_id")?.parse().ok()?,
                state: field(l, "state")?.to_string(),
                ticks: field(l, "ticks")?.parse().ok()?,
                maxgap_us: field(l, "maxgap_us").and_then(|v| v.parse().ok()).unwrap_or(0),
            });
        }
        Some(GuestStatus {
            apic_mode: field(head, "apic_mode")?.to_string(),
            possible: field(head, "possible")?.parse().ok()?,
            present: field(head, "present")?.parse().ok()?,
            online: field(head, "online")?.parse().ok()?,
            sci: field(head, "sci").and_then(|v| v.parse().ok()).unwrap_or(0),
            inserts: field(head, "inserts").and_then(|v| v.parse().ok()).unwrap_or(0),
            ejects: field(head, "ejects").and_then(|v| v.parse().ok()).unwrap_or(0),
            cpus,
        })
    }

    /// A per-CPU table for people.
    pub fn table(&self) -> String {
        let mut s = format!(
            "  apic mode: {}   possible: {}   present: {}   online: {}\n  {:>4}  {:>7}  {:<8}  {:>8}\n",
            self.apic_mode, self.possible, self.present, self.online, "cpu", "apic_id", "state", "ticks"
        );
        for c in &self.cpus {
            s.push_str(&format!(
                "  {:>4}  {:>7}  {:<8}  {:>8}\n",
                c.index, c.apic_id, c.state, c.ticks
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_status() {
        let lines: Vec<String> = [
            "STATUS apic_mode=x2apic possible=3 present=2 online=2 bsp=0",
            "CPU 0 apic_id=0 state=online ticks=12",
            "CPU 1 apic_id=1 state=online ticks=11",
            "CPU 2 apic_id=2 state=absent ticks=0",
            "OK",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = GuestStatus::parse(&lines).unwrap();
        assert_eq!(s.possible, 3);
        assert_eq!(s.cpus[1].ticks, 11);
        assert_eq!(s.cpus[2].state, "absent");
        assert!(s.table().contains("absent"));
        assert!(GuestStatus::parse(&lines[1..]).is_none());
    }
}
