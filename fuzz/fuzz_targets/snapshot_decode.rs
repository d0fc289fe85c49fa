// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Untrusted snapshot bytes: decode never panics, and whatever decodes re-encodes to the
//! same bytes (the format has exactly one encoding).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vm_live_migration::{Limits, Snapshot};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Snapshot::decode(data, &Limits::default()) {
        assert_eq!(s.encode(), data);
    }
});
