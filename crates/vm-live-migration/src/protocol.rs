// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live-migration wire protocol: length-prefixed frames over any byte stream (TCP, Unix
//! socket), and the dirty-page pre-copy driver.
//!
//! ```text
//! source                                   destination
//!                                  ◀──     Challenge(random)   (TCP: crate::auth)
//!   Proof(HMAC of it under the token) ──▶  wrong proof: Refuse, and nothing allocated
//!   Hello{version, compat}         ──▶     checks version + compatibility (before any pause)
//!                                  ◀──     Accept | Refuse(reason)
//!   Memory{pages}*  (round 0: all RAM, then dirty pages, until the rest fits the downtime)
//!   ── source pauses the VM ──
//!   Memory{pages}*  (the last dirty pages)
//!   State(snapshot container)      ──▶     restores vCPUs, devices, KVM VM state
//!                                  ◀──     Ack (restored, paused) | Error(reason)
//!   Complete                       ──▶     resumes the VM
//!   ── the source stops for good once it has the Ack; on any error before, it resumes ──
//!   ── the destination runs the VM only on Complete; without it the VM stays paused there
//!      (never running twice; `vm.resume` on the destination if the source is known gone) ──
//! ```
//!
//! Frame: `kind u8 | payload length u64 LE | payload`. Decoding is for an untrusted peer:
//! lengths are checked against [`FrameLimits`] before anything is allocated, and memory
//! chunks are checked against the destination's RAM before they are written.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::memory::{dirty_pages, dirty_ranges, PAGE_SIZE};

/// Protocol version this crate speaks (the destination refuses newer ones).
/// Version 2 added the token challenge ([`crate::auth`]) in front of Hello on TCP.
pub const PROTOCOL_VERSION: u32 = 2;

const K_HELLO: u8 = 1;
const K_ACCEPT: u8 = 2;
const K_REFUSE: u8 = 3;
const K_MEMORY: u8 = 4;
const K_STATE: u8 = 5;
const K_ACK: u8 = 6;
const K_ERROR: u8 = 7;
const K_ABANDON: u8 = 8;
const K_COMPLETE: u8 = 9;
const K_CHALLENGE: u8 = 10;
const K_PROOF: u8 = 11;

/// Protocol errors.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed or ended.
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something this side cannot accept.
    #[error("migration protocol violation: {0}")]
    Invalid(Violation),
    /// The peer refused or reported an error.
    #[error("peer: {0}")]
    Peer(String),
}

/// What a peer sent (or did) that this side cannot accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A Refuse, Error or Abandon text is not UTF-8.
    #[error("message text is not UTF-8")]
    TextNotUtf8,
    /// A Hello shorter than its version field.
    #[error("short Hello")]
    ShortHello,
    /// A Memory frame ends inside a chunk header.
    #[error("truncated memory chunk header")]
    TruncatedChunkHeader,
    /// A memory chunk claims more bytes than its frame holds.
    #[error("memory chunk longer than its frame")]
    ChunkBeyondFrame,
    /// An unknown frame kind, or a known one with a payload it cannot have.
    #[error("unknown or malformed frame kind {0}")]
    BadFrame(u8),
    /// A frame larger than [`FrameLimits::max_frame`] (refused before allocating).
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge {
        /// Declared payload length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A memory chunk whose end wraps the address space.
    #[error("memory chunk at {0:#x} wraps")]
    ChunkWraps(u64),
    /// A memory chunk outside every RAM region.
    #[error("memory chunk {start:#x}..{end:#x} is outside guest RAM")]
    ChunkOutsideRam {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// The peer's answer to the token challenge is wrong.
    #[error("the peer's migration token is wrong")]
    WrongToken,
    /// A message out of turn.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol calls for here.
        expected: &'static str,
        /// [`Message::name`] of what came.
        got: &'static str,
    },
    /// So many peers failed the token check that the destination stopped listening.
    #[error("{0} peers failed the token check; no longer listening")]
    TooManyAuthFailures(u32),
}

/// Bounds on what a peer may make us allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest frame payload.
    pub max_frame: u64,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits { max_frame: 64 << 20 }
    }
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Source → destination: protocol version and the VMM's compatibility description.
    Hello {
        /// [`PROTOCOL_VERSION`] of the sender.
        version: u32,
        /// VMM-defined compatibility description (e.g. JSON: CPUs, memory, features).
        compat: Vec<u8>,
    },
    /// Destination → source: compatible, send memory.
    Accept,
    /// Destination → source: incompatible, with every mismatch spelled out.
    Refuse(String),
    /// Source → destination: pages as `(guest physical address, bytes)` chunks.
    Memory(Vec<(u64, Vec<u8>)>),
    /// Source → destination: the VM state (a snapshot container); the VM is paused.
    State(Vec<u8>),
    /// Destination → source: restored and running; the source may stop.
    Ack,
    /// Destination → source: the restore failed; the source keeps the VM.
    Error(String),
    /// Source → destination: the source gave up; discard everything.
    Abandon(String),
    /// Source → destination, after the Ack: the source has stopped the VM for good; the
    /// destination may run it now.
    Complete,
    /// Destination → source, first on an authenticated link: a random challenge
    /// ([`crate::auth`]).
    Challenge(Vec<u8>),
    /// Source → destination: the answer to the challenge under the pre-shared token.
    Proof(Vec<u8>),
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => K_HELLO,
            Message::Accept => K_ACCEPT,
            Message::Refuse(_) => K_REFUSE,
            Message::Memory(_) => K_MEMORY,
            Message::State(_) => K_STATE,
            Message::Ack => K_ACK,
            Message::Error(_) => K_ERROR,
            Message::Abandon(_) => K_ABANDON,
            Message::Complete => K_COMPLETE,
            Message::Challenge(_) => K_CHALLENGE,
            Message::Proof(_) => K_PROOF,
        }
    }

    /// The message's name, for errors (its `Debug` form can be megabytes of memory).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Accept => "Accept",
            Message::Refuse(_) => "Refuse",
            Message::Memory(_) => "Memory",
            Message::State(_) => "State",
            Message::Ack => "Ack",
            Message::Error(_) => "Error",
            Message::Abandon(_) => "Abandon",
            Message::Complete => "Complete",
            Message::Challenge(_) => "Challenge",
            Message::Proof(_) => "Proof",
        }
    }

    /// Frame bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Message::Hello { version, compat } => {
                p.extend_from_slice(&version.to_le_bytes());
                p.extend_from_slice(compat);
            }
            Message::Accept | Message::Ack | Message::Complete => {}
            Message::Refuse(s) | Message::Error(s) | Message::Abandon(s) => p.extend_from_slice(s.as_bytes()),
            Message::Memory(chunks) => {
                for (gpa, data) in chunks {
                    p.extend_from_slice(&gpa.to_le_bytes());
                    p.extend_from_slice(&(data.len() as u64).to_le_bytes());
                    p.extend_from_slice(data);
                }
            }
            Message::State(s) | Message::Challenge(s) | Message::Proof(s) => p.extend_from_slice(s),
        }
        let mut out = Vec::with_capacity(9 + p.len());
        out.push(self.kind());
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    /// Parse one frame's payload of kind `kind` (untrusted).
    pub fn decode(kind: u8, p: &[u8]) -> Result<Message, ProtocolError> {
        let text = |p: &[u8]| {
            String::from_utf8(p.to_vec()).map_err(|_| ProtocolError::Invalid(Violation::TextNotUtf8))
        };
        Ok(match kind {
            K_HELLO => {
                let v = p.get(..4).ok_or(ProtocolError::Invalid(Violation::ShortHello))?;
                Message::Hello {
                    version: u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
                    compat: p[4..].to_vec(),
                }
            }
            K_ACCEPT if p.is_empty() => Message::Accept,
            K_ACK if p.is_empty() => Message::Ack,
            K_COMPLETE if p.is_empty() => Message::Complete,
            K_REFUSE => Message::Refuse(text(p)?),
            K_ERROR => Message::Error(text(p)?),
            K_ABANDON => Message::Abandon(text(p)?),
            K_STATE => Message::State(p.to_vec()),
            K_CHALLENGE => Message::Challenge(p.to_vec()),
            K_PROOF => Message::Proof(p.to_vec()),
            K_MEMORY => {
                let mut chunks = Vec::new();
                let mut rest = p;
                while !rest.is_empty() {
                    let hdr = rest
                        .get(..16)
                        .ok_or(ProtocolError::Invalid(Violation::TruncatedChunkHeader))?;
                    let gpa = u64::from_le_bytes(hdr[..8].try_into().unwrap_or_default());
                    let len = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|l| *l <= rest.len() - 16)
                        .ok_or(ProtocolError::Invalid(Violation::ChunkBeyondFrame))?;
                    chunks.push((gpa, rest[16..16 + len].to_vec()));
                    rest = &rest[16 + len..];
                }
                Message::Memory(chunks)
            }
            k => return Err(ProtocolError::Invalid(Violation::BadFrame(k))),
        })
    }
}

/// Write one message.
pub fn send<W: Write>(w: &mut W, m: &Message) -> Result<(), ProtocolError> {
    w.write_all(&m.encode())?;
    w.flush()?;
    Ok(())
}

/// Read one message, refusing frames beyond `limits` before allocating.
pub fn recv<R: Read>(r: &mut R, limits: &FrameLimits) -> Result<Message, ProtocolError> {
    let mut hdr = [0u8; 9];
    r.read_exact(&mut hdr)?;
    let len = u64::from_le_bytes(hdr[1..9].try_into().unwrap_or_default());
    if len > limits.max_frame {
        return Err(ProtocolError::Invalid(Violation::FrameTooLarge {
            len,
            limit: limits.max_frame,
        }));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p)?;
    Message::decode(hdr[0], &p)
}

/// What the pre-copy needs from the VMM: RAM regions, a dirty log, and page reads.
/// (The VMM's own writes to guest memory must be included in `take_dirty`.)
pub trait DirtySource {
    /// RAM regions as `(guest physical start, length)`, in a fixed order.
    fn regions(&self) -> Vec<(u64, u64)>;
    /// Dirty bitmaps (one bit per 4 KiB page) of every region since the last call, which
    /// resets them.
    fn take_dirty(&mut self) -> std::io::Result<Vec<Vec<u64>>>;
    /// Read guest memory.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Pages of region `index` that may hold anything but zeroes (one bit per 4 KiB page),
    /// if the source can tell (asked after dirty logging started, so a page populated later is
    /// in the dirty log), e.g. from [`crate::memory::populated_pages`] for anonymous
    /// memory. Round 0 reads only those. `None` (the default): every page is read.
    fn populated(&self, index: usize) -> Option<Vec<u64>> {
        let _ = index;
        None
    }
}

/// Pre-copy tuning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrecopyOptions {
    /// Stop iterating when the remaining dirty set can be sent within this time.
    pub downtime: Duration,
    /// Stop iterating after this many rounds whatever the dirty rate (then pause anyway).
    pub max_rounds: u32,
    /// Largest memory frame.
    pub chunk: usize,
    /// Longest the source stays silent while it reads RAM: round 0 of mostly-zero memory
    /// can take long to scan and finds nothing to send, and a destination that hears
    /// nothing gives up. A frame (empty if need be) goes out whenever this has passed.
    pub keepalive: Duration,
}

impl Default for PrecopyOptions {
    fn default() -> Self {
        PrecopyOptions {
            downtime: Duration::from_millis(300),
            max_rounds: 30,
            chunk: 4 << 20,
            keepalive: KEEPALIVE,
        }
    }
}

/// Default [`PrecopyOptions::keepalive`]: far below any sensible destination silence bound.
pub const KEEPALIVE: Duration = Duration::from_secs(1);

/// Progress of one pre-copy round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundStats {
    /// Round number (0 = all RAM).
    pub round: u32,
    /// Pages sent this round.
    pub pages: u64,
    /// Bytes sent this round.
    pub bytes: u64,
    /// Seconds the round took.
    pub secs: f64,
    /// Pages the guest dirtied while it ran.
    pub dirtied: u64,
    /// Time the remaining dirty set would take at this round's throughput (ms).
    pub expected_downtime_ms: f64,
}

/// Whether a buffer is all zeroes (word at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(8);
    let rest = words.remainder();
    words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    }) == 0
        && rest.iter().all(|b| *b == 0)
}

/// How [`send_ranges`] frames what it reads.
#[derive(Clone, Copy)]
struct Framing {
    /// Largest frame (bytes of page data).
    chunk: usize,
    /// Leave all-zero pages out (round 0: the destination's RAM starts zeroed).
    skip_zero: bool,
    /// Send what there is (an empty frame if nothing) once this long has passed.
    keepalive: Duration,
}

/// Send the given byte ranges of the regions as Memory frames; returns bytes sent.
fn send_ranges<W: Write, S: DirtySource>(
    w: &mut W,
    src: &S,
    ranges: &[(u64, u64)],
    how: Framing,
) -> Result<u64, ProtocolError> {
    let Framing {
        chunk,
        skip_zero,
        keepalive,
    } = how;
    let mut frame: Vec<(u64, Vec<u8>)> = Vec::new();
    let (mut in_frame, mut sent) = (0usize, 0u64);
    let mut last_send = Instant::now();
    let mut buf = vec![0u8; chunk.max(PAGE_SIZE as usize)];
    for &(gpa, len) in ranges {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            src.read(gpa + off, &mut buf[..n])?;
            // Runs of pages to send (all of them unless zero pages are skipped).
            let mut p = 0;
            while p < n {
                let page_end = |q: usize| (q + PAGE_SIZE as usize).min(n);
                if skip_zero && is_zero(&buf[p..page_end(p)]) {
                    p = page_end(p);
                    continue;
                }
                let start = p;
                while p < n && !(skip_zero && is_zero(&buf[p..page_end(p)])) {
                    p = page_end(p);
                }
                frame.push((gpa + off + start as u64, buf[start..p].to_vec()));
                in_frame += p - start;
                sent += (p - start) as u64;
            }
            off += n as u64;
            // A full frame, or a keepalive: a long scan that finds only zero pages must not
            // leave the destination in silence until its read timeout.
            if in_frame >= chunk || last_send.elapsed() >= keepalive {
                send(w, &Message::Memory(std::mem::take(&mut frame)))?;
                in_frame = 0;
                last_send = Instant::now();
            }
        }
    }
    if !frame.is_empty() {
        send(w, &Message::Memory(frame))?;
    }
    Ok(sent)
}

/// Round 0: every region, or only its populated pages where the source knows them.
fn initial_ranges<S: DirtySource>(src: &S, regions: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (i, (start, len)) in regions.iter().enumerate() {
        match src.populated(i) {
            Some(map) => out.extend(dirty_ranges(&map, *len).into_iter().map(|(o, l)| (start + o, l))),
            None => out.push((*start, *len)),
        }
    }
    out
}

fn bitmap_ranges(regions: &[(u64, u64)], maps: &[Vec<u64>]) -> (Vec<(u64, u64)>, u64) {
    let mut out = Vec::new();
    let mut pages = 0;
    for ((start, len), map) in regions.iter().zip(maps) {
        pages += dirty_pages(map);
        out.extend(dirty_ranges(map, *len).into_iter().map(|(o, l)| (start + o, l)));
    }
    (out, pages)
}

/// How [`Precopy::iterate`] ended.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convergence {
    /// What is left fits the downtime target.
    Converged,
    /// The round limit came first: the guest dirties memory faster than the link drains it.
    /// Stop and copy anyway (a longer downtime), give up, or slow the guest and go on.
    RoundLimit,
}

/// The source side of pre-copy. Call [`Precopy::iterate`] while the VM runs (dirty logging
/// on), pause the VM, then [`Precopy::finish`] to send what is left.
#[derive(Debug, Default)]
pub struct Precopy {
    /// Rounds so far.
    pub rounds: Vec<RoundStats>,
    /// Pages dirtied during the last round, sent by `finish`.
    pending: Vec<(u64, u64)>,
}

impl Precopy {
    /// Round 0 sends all RAM except all-zero pages (the destination's RAM must start zeroed);
    /// later rounds send every page dirtied during the previous one, until the remaining
    /// dirty set would fit in `opts.downtime` at the measured throughput
    /// ([`Convergence::Converged`]) or `opts.max_rounds` rounds (counted over every call)
    /// are done ([`Convergence::RoundLimit`]). `progress` sees each round. The dirty log must
    /// have been started (and reset) before the first call. A caller that slows the guest
    /// down may call again with a higher `max_rounds`: the rounds go on from where they
    /// stopped.
    pub fn iterate<W: Write, S: DirtySource>(
        &mut self,
        w: &mut W,
        src: &mut S,
        opts: &PrecopyOptions,
        mut progress: impl FnMut(&RoundStats),
    ) -> Result<Convergence, ProtocolError> {
        let regions = src.regions();
        let mut ranges = if self.rounds.is_empty() {
            initial_ranges(src, &regions)
        } else {
            std::mem::take(&mut self.pending)
        };
        loop {
            let round = self.rounds.len() as u32;
            let t = Instant::now();
            // Round 0 leaves zero pages out: the destination starts from zeroed RAM.
            let how = Framing {
                chunk: opts.chunk,
                skip_zero: round == 0,
                keepalive: opts.keepalive,
            };
            let bytes = send_ranges(w, src, &ranges, how)?;
            let secs = t.elapsed().as_secs_f64();
            let maps = src.take_dirty()?;
            let (next, dirtied) = bitmap_ranges(&regions, &maps);
            // Throughput of this round; a tiny round measures nothing useful, so floor it.
            let rate = bytes as f64 / secs.max(1e-3);
            let expected_downtime_ms = (dirtied * PAGE_SIZE) as f64 / rate.max(1.0) * 1e3;
            let st = RoundStats {
                round,
                pages: bytes / PAGE_SIZE,
                bytes,
                secs,
                dirtied,
                expected_downtime_ms,
            };
            progress(&st);
            self.rounds.push(st);
            // What the last round left dirty goes out in the next round or in `finish`.
            ranges = next;
            if expected_downtime_ms <= opts.downtime.as_secs_f64() * 1e3 {
                self.pending = ranges;
                return Ok(Convergence::Converged);
            }
            if round + 1 >= opts.max_rounds {
                self.pending = ranges;
                return Ok(Convergence::RoundLimit);
            }
        }
    }

    /// After the VM is paused: send the pages dirtied since the last round (plus those left
    /// from it). Returns bytes sent.
    pub fn finish<W: Write, S: DirtySource>(
        &mut self,
        w: &mut W,
        src: &mut S,
        chunk: usize,
    ) -> Result<u64, ProtocolError> {
        let regions = src.regions();
        let maps = src.take_dirty()?;
        let (mut ranges, _) = bitmap_ranges(&regions, &maps);
        ranges.append(&mut self.pending);
        ranges.sort_unstable();
        let how = Framing {
            chunk,
            skip_zero: false,
            keepalive: KEEPALIVE,
        };
        send_ranges(w, src, &ranges, how)
    }
}

/// Destination side: write a Memory frame's chunks into RAM after checking each lies wholly
/// inside one of `regions` (`(start, len)`); `write` does the copy.
pub fn apply_memory(
    chunks: &[(u64, Vec<u8>)],
    regions: &[(u64, u64)],
    mut write: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<u64, ProtocolError> {
    let mut n = 0;
    for (gpa, data) in chunks {
        let end = gpa
            .checked_add(data.len() as u64)
            .ok_or(ProtocolError::Invalid(Violation::ChunkWraps(*gpa)))?;
        if !regions.iter().any(|(s, l)| *gpa >= *s && end <= s + l) {
            return Err(ProtocolError::Invalid(Violation::ChunkOutsideRam {
                start: *gpa,
                end,
            }));
        }
        write(*gpa, data)?;
        n += data.len() as u64;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct FakeRam {
        bytes: Vec<u8>,
        dirty: Vec<u64>,
        rounds: u32,
    }

    impl DirtySource for FakeRam {
        fn regions(&self) -> Vec<(u64, u64)> {
            vec![(0x10000, self.bytes.len() as u64)]
        }
        fn take_dirty(&mut self) -> std::io::Result<Vec<Vec<u64>>> {
            // The "guest" dirties fewer pages each round and changes their contents.
            self.rounds += 1;
            let pages = (self.bytes.len() as u64 / PAGE_SIZE) >> self.rounds;
            for p in 0..pages {
                self.dirty[(p / 64) as usize] |= 1 << (p % 64);
                self.bytes[(p * PAGE_SIZE) as usize] = self.rounds as u8;
            }
            let n = self.dirty.len();
            Ok(vec![std::mem::replace(&mut self.dirty, vec![0; n])])
        }
        fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let o = (gpa - 0x10000) as usize;
            buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn precopy_converges_and_the_destination_ends_identical() {
        let pages = 256u64;
        let mut src = FakeRam {
            bytes: (0..pages * PAGE_SIZE).map(|i| (i % 251) as u8).collect(),
            dirty: vec![0; (pages / 64) as usize],
            rounds: 0,
        };
        let mut wire = Vec::new();
        let mut pc = Precopy::default();
        let opts = PrecopyOptions {
            downtime: Duration::from_nanos(1),
            max_rounds: 5,
            chunk: 64 << 10,
            ..PrecopyOptions::default()
        };
        let end = pc.iterate(&mut wire, &mut src, &opts, |_| {}).unwrap();
        assert_eq!(end, Convergence::RoundLimit);
        assert_eq!(
            pc.rounds.len(),
            5,
            "a 1 ns target is never met: max_rounds ends it"
        );
        assert_eq!(pc.rounds[0].pages, pages);
        assert!(pc.rounds[1].pages < pages);
        // Two more rounds (a caller that throttled the guest): they go on from round 5 and
        // send what round 4 left dirty, or the destination below would differ.
        let more = PrecopyOptions {
            max_rounds: 7,
            ..opts
        };
        let end = pc.iterate(&mut wire, &mut src, &more, |_| {}).unwrap();
        assert_eq!(end, Convergence::RoundLimit);
        assert_eq!(
            pc.rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
            (0..7).collect::<Vec<_>>()
        );
        assert!(pc.rounds[5].pages < pages, "round 5 re-sent all RAM");
        // "Pause", change memory once more, finish.
        src.bytes[5] = 0xee;
        src.dirty[0] |= 1;
        pc.finish(&mut wire, &mut src, opts.chunk).unwrap();
        let mut dst = vec![0u8; src.bytes.len()];
        let mut r = &wire[..];
        while !r.is_empty() {
            match recv(&mut r, &FrameLimits::default()).unwrap() {
                Message::Memory(chunks) => {
                    apply_memory(&chunks, &src.regions(), |gpa, d| {
                        let o = (gpa - 0x10000) as usize;
                        dst[o..o + d.len()].copy_from_slice(d);
                        Ok(())
                    })
                    .unwrap();
                }
                m => panic!("unexpected {m:?}"),
            }
        }
        assert!(dst == src.bytes, "destination RAM differs from the source");
    }

    /// RAM that is slow to read (a file-backed image faulting in under load), all zeroes.
    struct SlowZeroes {
        len: u64,
        per_read: Duration,
    }

    impl DirtySource for SlowZeroes {
        fn regions(&self) -> Vec<(u64, u64)> {
            vec![(0, self.len)]
        }
        fn take_dirty(&mut self) -> std::io::Result<Vec<Vec<u64>>> {
            Ok(vec![vec![0; (self.len / PAGE_SIZE).div_ceil(64) as usize]])
        }
        fn read(&self, _: u64, buf: &mut [u8]) -> std::io::Result<()> {
            std::thread::sleep(self.per_read);
            buf.fill(0);
            Ok(())
        }
    }

    /// Round 0 of mostly-zero RAM used to send nothing until the scan ended: the destination,
    /// which gives up after a minute of silence, closed the link in a loaded nested run and
    /// the source got EPIPE. The source now sends a frame, empty if need be, whenever
    /// `keepalive` has passed. Each read here takes longer than `keepalive`, so every read is
    /// followed by one (no clock figure is asserted: sleeping only makes it longer).
    #[test]
    fn a_long_scan_of_zero_pages_keeps_the_link_talking() {
        let mut src = SlowZeroes {
            len: 8 * PAGE_SIZE,
            per_read: Duration::from_millis(30),
        };
        let opts = PrecopyOptions {
            downtime: Duration::from_secs(3600),
            max_rounds: 1,
            chunk: PAGE_SIZE as usize,
            keepalive: Duration::from_millis(20),
        };
        let mut wire = Vec::new();
        let end = Precopy::default()
            .iterate(&mut wire, &mut src, &opts, |_| {})
            .unwrap();
        assert_eq!(end, Convergence::Converged);
        let mut r = &wire[..];
        let mut frames = 0;
        while !r.is_empty() {
            assert_eq!(
                recv(&mut r, &FrameLimits::default()).unwrap(),
                Message::Memory(vec![])
            );
            frames += 1;
        }
        assert_eq!(frames, 8, "one keepalive after each 4 KiB read");
    }

    #[test]
    fn round_zero_skips_zero_pages_later_rounds_do_not() {
        let pages = 128u64;
        let mut bytes = vec![0u8; (pages * PAGE_SIZE) as usize];
        bytes[5 * PAGE_SIZE as usize] = 1; // one non-zero page
        let mut src = FakeRam {
            bytes,
            dirty: vec![0; 2],
            rounds: 0,
        };
        let mut wire = Vec::new();
        let mut pc = Precopy::default();
        let opts = PrecopyOptions {
            downtime: Duration::from_secs(3600),
            max_rounds: 1,
            chunk: 64 << 10,
            ..PrecopyOptions::default()
        };
        let end = pc.iterate(&mut wire, &mut src, &opts, |_| {}).unwrap();
        assert_eq!(end, Convergence::Converged);
        assert_eq!(pc.rounds[0].pages, 1, "only the non-zero page goes in round 0");
        // A page the guest zeroes later must still be sent.
        src.bytes[5 * PAGE_SIZE as usize] = 0;
        src.dirty = vec![1 << 5, 0];
        let before = wire.len();
        pc.finish(&mut wire, &mut src, opts.chunk).unwrap();
        let mut r = &wire[before..];
        let mut got = Vec::new();
        while !r.is_empty() {
            if let Message::Memory(c) = recv(&mut r, &FrameLimits::default()).unwrap() {
                got.extend(c.into_iter().map(|(gpa, d)| (gpa, d.len())));
            }
        }
        let page5 = 0x10000 + 5 * PAGE_SIZE;
        assert!(
            got.iter()
                .any(|(gpa, len)| *gpa <= page5 && page5 + PAGE_SIZE <= gpa + *len as u64),
            "the dirtied page is sent after round 0: {got:?}"
        );
        assert!(is_zero(&[0; 13]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn memory_outside_ram_and_oversized_frames_are_refused() {
        let regions = [(0x1000u64, 0x2000u64)];
        assert!(apply_memory(&[(0x2000, vec![0; 0x1000])], &regions, |_, _| Ok(())).is_ok());
        assert!(apply_memory(&[(0x2800, vec![0; 0x1000])], &regions, |_, _| Ok(())).is_err());
        assert!(apply_memory(&[(u64::MAX, vec![0; 2])], &regions, |_, _| Ok(())).is_err());
        let big = Message::State(vec![0; 100]).encode();
        let tight = FrameLimits { max_frame: 10 };
        assert!(matches!(
            recv(&mut &big[..], &tight),
            Err(ProtocolError::Invalid(_))
        ));
    }

    proptest! {
        #[test]
        fn messages_round_trip(kind in 0usize..9, data in proptest::collection::vec(any::<u8>(), 0..64), gpa in any::<u64>()) {
            let s = String::from_utf8_lossy(&data).into_owned();
            let m = match kind {
                0 => Message::Hello { version: 7, compat: data.clone() },
                1 => Message::Accept,
                2 => Message::Refuse(s),
                3 => Message::Memory(vec![(gpa, data.clone()), (gpa ^ 1, vec![])]),
                4 => Message::State(data.clone()),
                5 => Message::Ack,
                6 => Message::Error(s),
                7 => Message::Complete,
                _ => Message::Abandon(s),
            };
            let bytes = m.encode();
            prop_assert_eq!(recv(&mut &bytes[..], &FrameLimits::default()).unwrap(), m);
        }

        #[test]
        fn arbitrary_frames_never_panic(kind in any::<u8>(), data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Message::decode(kind, &data);
        }
    }
}
