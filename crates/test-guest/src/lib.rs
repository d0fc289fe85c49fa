// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `test-guest` kernel image, embedded.
//!
//! The kernel itself lives in `kernel/` and is compiled by this crate's build script into a
//! static ELF (64-bit entry `_start64` at the ELF entry point, plus a PVH
//! `XEN_ELFNOTE_PHYS32_ENTRY` note so QEMU's `-kernel` can boot it too). See the crate README
//! for the serial line protocol.
//!
//! ```
//! let elf = test_guest::elf();
//! assert_eq!(&elf[..4], b"\x7fELF");
//! ```

#![deny(missing_docs)]

/// The guest kernel ELF image.
pub fn elf() -> &'static [u8] {
    include_bytes!(env!("TEST_GUEST_ELF"))
}

/// Path of the built ELF on disk (inside Cargo's `OUT_DIR`), e.g. for `qemu-system-x86_64 -kernel`.
pub fn elf_path() -> &'static str {
    env!("TEST_GUEST_ELF")
}

/// Guest physical address the image is linked at.
pub const LOAD_ADDRESS: u64 = 0x10_0000;

/// Highest number of CPUs the guest tracks.
pub const MAX_CPUS: usize = 512;
