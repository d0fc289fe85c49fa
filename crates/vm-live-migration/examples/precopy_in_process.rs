// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live-migrate 16 MiB of "guest RAM" that another thread keeps dirtying, over a Unix socket
//! pair, with `vm-live-migration`'s protocol and pre-copy driver, and check the destination ends up
//! identical. A VMM does the same with KVM's dirty log in place of the bitmap below.
//!
//! `cargo run -p vm-live-migration --example precopy_in_process`

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_live_migration::memory::PAGE_SIZE;
use vm_live_migration::protocol::{
    apply_memory, recv, send, DirtySource, FrameLimits, Message, Precopy, PrecopyOptions, PROTOCOL_VERSION,
};

const RAM_BASE: u64 = 0x10_0000;
const PAGES: usize = 4096;

/// RAM plus a dirty bitmap that the writer sets, like KVM's dirty log.
struct Ram {
    bytes: Mutex<Vec<u8>>,
    dirty: Vec<AtomicU64>,
}

impl Ram {
    fn write_page(&self, page: usize, value: u8) {
        let mut b = self.bytes.lock().unwrap();
        let o = page * PAGE_SIZE as usize;
        b[o..o + PAGE_SIZE as usize].fill(value);
        self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::SeqCst);
    }
}

struct Source(Arc<Ram>);

impl DirtySource for Source {
    fn regions(&self) -> Vec<(u64, u64)> {
        vec![(RAM_BASE, (PAGES as u64) * PAGE_SIZE)]
    }
    fn take_dirty(&mut self) -> std::io::Result<Vec<Vec<u64>>> {
        Ok(vec![self
            .0
            .dirty
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()])
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let o = (gpa - RAM_BASE) as usize;
        buf.copy_from_slice(&self.0.bytes.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ram = Arc::new(Ram {
        bytes: Mutex::new(vec![0; PAGES * PAGE_SIZE as usize]),
        dirty: (0..PAGES / 64).map(|_| AtomicU64::new(0)).collect(),
    });
    for p in 0..PAGES / 2 {
        ram.write_page(p, 1);
    }
    // The "guest": rewrites pages until the source pauses it.
    let running = Arc::new(AtomicBool::new(true));
    let guest = {
        let (ram, running) = (ram.clone(), running.clone());
        std::thread::spawn(move || {
            let mut n = 0usize;
            while running.load(Ordering::SeqCst) {
                ram.write_page((n * 7919) % PAGES, (n % 250) as u8 + 2);
                n += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };

    let (mut src_end, mut dst_end) = UnixStream::pair()?;
    let destination = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        let limits = FrameLimits::default();
        let mut ram = vec![0u8; PAGES * PAGE_SIZE as usize];
        let regions = [(RAM_BASE, ram.len() as u64)];
        match recv(&mut dst_end, &limits).map_err(|e| e.to_string())? {
            Message::Hello { version, .. } if version <= PROTOCOL_VERSION => {
                send(&mut dst_end, &Message::Accept).map_err(|e| e.to_string())?
            }
            m => return Err(format!("unexpected {m:?}")),
        }
        loop {
            match recv(&mut dst_end, &limits).map_err(|e| e.to_string())? {
                Message::Memory(chunks) => {
                    apply_memory(&chunks, &regions, |gpa, d| {
                        let o = (gpa - RAM_BASE) as usize;
                        ram[o..o + d.len()].copy_from_slice(d);
                        Ok(())
                    })
                    .map_err(|e| e.to_string())?;
                }
                Message::State(_) => {
                    send(&mut dst_end, &Message::Ack).map_err(|e| e.to_string())?;
                    return Ok(ram);
                }
                m => return Err(format!("unexpected {m:?}")),
            }
        }
    });

    // Source: Hello, logging is on from the start (the bitmap), pre-copy rounds, pause, rest.
    send(
        &mut src_end,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            compat: b"{}".to_vec(),
        },
    )?;
    assert_eq!(recv(&mut src_end, &FrameLimits::default())?, Message::Accept);
    let mut src = Source(ram.clone());
    src.take_dirty()?; // start from a clean log: round 0 sends everything anyway
    let opts = PrecopyOptions {
        downtime: Duration::from_millis(5),
        max_rounds: 10,
        chunk: 1 << 20,
        ..PrecopyOptions::default()
    };
    let mut pc = Precopy::default();
    let end = pc.iterate(&mut src_end, &mut src, &opts, |r| {
        println!(
            "round {}: {:>8} bytes in {:.4} s, {:>4} pages dirtied meanwhile, expected downtime {:.2} ms",
            r.round, r.bytes, r.secs, r.dirtied, r.expected_downtime_ms
        )
    })?;
    // A VMM decides here what a migration that did not converge does; this one stops anyway.
    println!("pre-copy ended: {end:?}");
    running.store(false, Ordering::SeqCst); // pause the guest
    guest.join().map_err(|_| "guest thread panicked")?;
    let last = pc.finish(&mut src_end, &mut src, opts.chunk)?;
    send(&mut src_end, &Message::State(b"device state goes here".to_vec()))?;
    assert_eq!(recv(&mut src_end, &FrameLimits::default())?, Message::Ack);
    println!("after the pause: {last} bytes");

    let copied = destination.join().map_err(|_| "destination panicked")??;
    assert!(*ram.bytes.lock().unwrap() == copied, "destination RAM differs");
    println!("destination RAM is identical to the source's");
    Ok(())
}
