// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `ctl migrate`'s live progress: `vm.migration-status` polled on a second connection while
//! the `vm.send-migration` request waits for its answer. On a terminal one line is redrawn
//! (a bar of pre-copy rounds, bytes on the wire, dirty rate, expected downtime); otherwise a
//! plain line is printed whenever the phase or the round changes. Both go to stderr, so the
//! report on stdout stays machine-readable. (One line redrawn with `\r` is all this needs;
//! a progress-bar crate would bring its terminal handling along for nothing.)

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

/// How often the status is read.
const POLL: Duration = Duration::from_millis(200);
/// Width of the rounds bar, in cells.
const BAR: usize = 20;

/// `bytes` for people: B, KiB, MiB or GiB with one decimal.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{bytes} B"),
        _ => format!("{v:.1} {}", UNITS[u]),
    }
}

/// `[#####---------------] ` for `done` of `of`, full beyond it.
fn bar(done: u64, of: u32) -> String {
    let cells = (done as usize * BAR)
        .checked_div(of as usize)
        .unwrap_or(BAR)
        .min(BAR);
    format!("[{}{}] ", "#".repeat(cells), "-".repeat(BAR - cells))
}

/// One progress line for `st` (a `vm.migration-status` answer), with the rounds bar when
/// `with_bar`.
pub fn line(st: &Value, max_rounds: u32, with_bar: bool) -> String {
    let rounds = st["rounds"].as_u64().unwrap_or(0);
    let mut out = format!("migration: {:<9} ", st["phase"].as_str().unwrap_or("?"));
    if with_bar {
        out.push_str(&bar(rounds, max_rounds));
    }
    out.push_str(&format!(
        "rounds {rounds} (max {max_rounds})  sent {}  dirty {:.0} pages/s  expected downtime {:.1} ms",
        human(st["wire_bytes"].as_u64().unwrap_or(0)),
        st["dirty_rate"].as_f64().unwrap_or(0.0),
        st["expected_downtime_ms"].as_f64().unwrap_or(0.0),
    ));
    match st["throttle_percent"].as_u64() {
        Some(p) if p > 0 => out.push_str(&format!("  throttle {p}%")),
        _ => {}
    }
    out
}

/// The closing line for a migration's `report` (the `vm.send-migration` answer): a migration
/// quicker than one poll shows nothing else.
pub fn summary(report: &Value) -> String {
    let rounds = report["rounds"].as_array().map_or(0, Vec::len);
    let ram: u64 = report["rounds"]
        .as_array()
        .map_or(0, |r| r.iter().filter_map(|r| r["bytes"].as_u64()).sum());
    let last = report["final_bytes"].as_u64().unwrap_or(0);
    format!(
        "migrated: {rounds} pre-copy rounds, {} of RAM, {} after the pause, downtime {:.1} ms, total {:.1} ms",
        human(ram),
        human(last),
        report["downtime_ms"].as_f64().unwrap_or(0.0),
        report["total_ms"].as_f64().unwrap_or(0.0),
    )
}

/// Columns of the terminal on stderr (80 if it does not say): a redrawn line must not wrap,
/// or `\r` returns to its last row only and the rest piles up.
fn columns() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass and reads nothing else;
    // a failure (not a terminal) leaves it zeroed.
    let rc = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    match (rc, ws.ws_col) {
        (0, c) if c > 0 => c as usize,
        _ => 80,
    }
}

/// `line` cut to fit `width` columns, less one (the cursor stays on the row).
fn fit(line: &str, width: usize) -> &str {
    let keep = line
        .char_indices()
        .nth(width.saturating_sub(1))
        .map_or(line.len(), |(i, _)| i);
    &line[..keep]
}

/// Whether `st` belongs to the migration this `ctl` started: a finished one seen before any
/// phase of ours is the previous migration's.
fn ours(st: &Value, seen_running: &mut bool) -> bool {
    let phase = st["phase"].as_str().unwrap_or("");
    *seen_running |= matches!(phase, "connecting" | "precopy" | "stopping");
    *seen_running
}

/// Show the progress of the migration on the VMM at `sock` until `done` is set.
pub fn watch(sock: PathBuf, max_rounds: u32, done: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let tty = std::io::stderr().is_terminal();
        let (mut seen_running, mut last_key, mut drawn) = (false, None, false);
        while !done.load(Ordering::SeqCst) {
            let answer = vmm_reference::api::request(&sock, "GET", "vm.migration-status", None);
            let st = match answer {
                Ok((200, body)) => serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
                _ => Value::Null,
            };
            if !st.is_null() && ours(&st, &mut seen_running) {
                let mut err = std::io::stderr().lock();
                if tty {
                    let l = line(&st, max_rounds, true);
                    let _ = write!(err, "\r\x1b[K{}", fit(&l, columns()));
                    drawn = true;
                } else {
                    let key = (st["phase"].clone(), st["rounds"].clone());
                    if last_key.as_ref() != Some(&key) {
                        let _ = writeln!(err, "{}", line(&st, max_rounds, false));
                        last_key = Some(key);
                    }
                }
                let _ = err.flush();
            }
            std::thread::sleep(POLL);
        }
        if drawn {
            eprintln!();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_phase_round_bytes_rate_and_downtime() {
        let st = serde_json::json!({"phase": "precopy", "rounds": 3, "bytes_sent": 1,
            "wire_bytes": 5 * 1024 * 1024 + 512 * 1024, "dirty_rate": 1520.4,
            "expected_downtime_ms": 42.25, "throttle_percent": 20, "error": null});
        assert_eq!(
            line(&st, 30, false),
            "migration: precopy   rounds 3 (max 30)  sent 5.5 MiB  dirty 1520 pages/s  expected downtime 42.2 ms  throttle 20%"
        );
        let with_bar = line(&st, 30, true);
        assert!(
            with_bar.contains("[##------------------] rounds 3 (max 30)"),
            "{with_bar}"
        );
    }

    #[test]
    fn the_bar_and_sizes_stay_in_bounds() {
        assert_eq!(bar(0, 30), format!("[{}] ", "-".repeat(BAR)));
        assert_eq!(
            bar(38, 30),
            format!("[{}] ", "#".repeat(BAR)),
            "throttled rounds beyond max"
        );
        assert_eq!(bar(1, 0), format!("[{}] ", "#".repeat(BAR)));
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(human(u64::MAX), "17179869184.0 GiB");
    }

    #[test]
    fn the_summary_adds_up_the_rounds() {
        let r = serde_json::json!({"rounds": [{"bytes": 1024}, {"bytes": 2048}],
            "final_bytes": 4096, "downtime_ms": 30.84, "total_ms": 136.8});
        assert_eq!(
            summary(&r),
            "migrated: 2 pre-copy rounds, 3.0 KiB of RAM, 4.0 KiB after the pause, downtime 30.8 ms, total 136.8 ms"
        );
    }

    #[test]
    fn a_redrawn_line_fits_the_terminal() {
        assert_eq!(fit("migration: precopy", 11), "migration:");
        assert_eq!(fit("short", 80), "short");
        assert_eq!(fit("x", 0), "");
        assert_eq!(fit("ab€cd", 4), "ab€");
    }

    #[test]
    fn a_previous_migration_is_not_shown_as_this_one() {
        let mut seen = false;
        let done = serde_json::json!({"phase": "done"});
        assert!(!ours(&done, &mut seen), "the last migration's status");
        assert!(ours(&serde_json::json!({"phase": "connecting"}), &mut seen));
        assert!(
            ours(&serde_json::json!({"phase": "failed"}), &mut seen),
            "ours, ended"
        );
    }
}
