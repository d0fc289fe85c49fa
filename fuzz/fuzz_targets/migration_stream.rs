// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Untrusted live-migration stream (what a destination reads from the source): frames decode
//! without panicking, nothing beyond the frame limit is allocated, memory chunks outside RAM
//! are refused and never written, and every message that decodes re-encodes to its frame.
//! The same bytes as an unauthenticated peer's answer to the token challenge are refused
//! (the fuzzer cannot know the challenge) without a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vm_live_migration::auth::{demand, Token};
use vm_live_migration::protocol::{apply_memory, recv, FrameLimits, Message};

/// The peer's bytes to read; what the destination writes goes nowhere.
struct Peer<'a>(&'a [u8]);

impl std::io::Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const RAM: [(u64, u64); 2] = [(0x1000, 0x4000), (0x10000, 0x2000)];

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = Token::new(b"fuzzing token, 16+ bytes".to_vec()) {
        assert!(demand(&mut Peer(data), &token).is_err(), "a guessed proof passed");
    }
    let limits = FrameLimits { max_frame: 1 << 16 };
    let mut ram = vec![0u8; 0x6000];
    let mut r = data;
    for _ in 0..64 {
        let before = r;
        let Ok(m) = recv(&mut r, &limits) else { return };
        let used = before.len() - r.len();
        assert_eq!(m.encode(), before[..used], "one encoding per message");
        if let Message::Memory(chunks) = m {
            let _ = apply_memory(&chunks, &RAM, |gpa, d| {
                let (base, off) = if gpa >= 0x10000 {
                    (0x4000, gpa - 0x10000)
                } else {
                    (0, gpa - 0x1000)
                };
                let start = base + off as usize;
                // apply_memory only calls this for chunks inside RAM.
                ram[start..start + d.len()].copy_from_slice(d);
                Ok(())
            });
        }
    }
});
