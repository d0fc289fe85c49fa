// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A budget for log lines a guest can trigger at will (`_OST` writes, sleep requests, serial
//! errors): at most [`RateLimit::PER_SECOND`] lines per second per limiter; the lines dropped
//! are counted and reported with the next line let through. A guest looping on a register
//! then costs a few lines a second, not a filled disk.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One log budget (one per kind of guest-triggered line).
#[derive(Debug, Default)]
pub struct RateLimit {
    /// (start of the current second, lines let through in it, lines dropped since the last
    /// line let through)
    window: Mutex<Option<(Instant, u32, u64)>>,
}

impl RateLimit {
    /// Lines let through per second.
    pub const PER_SECOND: u32 = 10;

    /// A new limiter with a full budget.
    pub const fn new() -> Self {
        RateLimit {
            window: Mutex::new(None),
        }
    }

    /// `Some(dropped)` when a line may be logged now (`dropped`: lines suppressed since the
    /// last one, to mention in it), `None` when the budget of this second is spent.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (start, used, dropped) = w.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= Duration::from_secs(1) {
            (*start, *used) = (now, 0);
        }
        if *used >= Self::PER_SECOND {
            *dropped += 1;
            return None;
        }
        *used += 1;
        Some(std::mem::take(dropped))
    }
}

/// Log at `level` through `limit`: `rate_limited!(LIMIT, warn, "...", args)`.
#[macro_export]
macro_rules! rate_limited {
    ($limit:expr, $level:ident, $($arg:tt)+) => {
        if let Some(dropped) = $limit.allow() {
            if dropped > 0 {
                log::$level!("({dropped} similar lines suppressed)");
            }
            log::$level!($($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_costs_ten_lines_a_second_and_the_rest_is_counted() {
        let r = RateLimit::new();
        let t0 = Instant::now();
        let allowed = (0..1000).filter(|_| r.allow_at(t0).is_some()).count();
        assert_eq!(allowed, RateLimit::PER_SECOND as usize);
        // The next second: a line again, reporting the 990 dropped.
        assert_eq!(r.allow_at(t0 + Duration::from_millis(1000)), Some(990));
        assert_eq!(r.allow_at(t0 + Duration::from_millis(1001)), Some(0));
    }
}
