// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Untrusted bytes on the API socket: the request reader never panics, answers every bad
//! request with a 4xx, and keeps within its bounds, whether the bytes come at once or in
//! small pieces (the first input byte picks the piece size).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Read;
use vmm_reference::api::read_request;

/// Hands out at most `step` bytes per read, like a slow client.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&step, data)) = input.split_first() else {
        return;
    };
    let mut r = Trickle {
        data,
        step: usize::from(step % 16) + 1,
    };
    match read_request(&mut r) {
        Ok(req) => {
            assert!(req.body.len() <= 64 * 1024);
            assert!(req.method.len() + req.path.len() <= 8 * 1024);
        }
        Err(resp) => assert!((400..500).contains(&resp.status), "{}", resp.status),
    }
});
