// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Compiles the freestanding guest kernel in `kernel/` with the same rustc that builds the
//! workspace (host target; no extra target or nightly needed) and links it with `linker.ld`.
//!
//! Why a direct rustc call and not a workspace binary: the guest needs panic=abort, no red zone
//! and SSE disabled, and a workspace binary would inherit the host profile; the VMM also needs
//! the image bytes at compile time (artifact dependencies are unstable).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let kernel = manifest.join("kernel");
    // Every file of the kernel (a fixed list went stale: hotplug.rs and dirty.rs were missing),
    // and the directory itself for files added later.
    println!("cargo:rerun-if-changed=kernel");
    let mut files: Vec<_> = std::fs::read_dir(&kernel)
        .expect("kernel/")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    files.sort();
    for f in files {
        println!("cargo:rerun-if-changed=kernel/{f}");
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let elf = out.join("test-guest.elf");
    let output = Command::new(&rustc)
        .arg("--edition=2021")
        .arg("--crate-type=bin")
        .arg("--crate-name=test_guest_kernel")
        .args(["-C", "panic=abort"])
        .args(["-C", "opt-level=2"])
        .args(["-C", "debuginfo=0"])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "code-model=small"])
        // Interrupts run on the interrupted stack (no IST): never use the red zone.
        .args(["-C", "no-redzone=yes"])
        // The CPL0 emulator of this project's KVM backend cannot execute SSE/AVX arithmetic
        // (pxor, xorps...). rustc warns once that disabling sse2 is being phased out
        // (rust-lang/rust#116344); that warning is expected and shows up here only.
        .args([
            "-C",
            "target-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2,-fma",
        ])
        .args(["-C", "link-arg=-nostartfiles"])
        .args(["-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static"])
        .args(["-C", "link-arg=-no-pie"])
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", kernel.join("linker.ld").display()))
        .arg("-o")
        .arg(&elf)
        .arg(kernel.join("main.rs"))
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("failed to run rustc for the test guest");
    let stderr = String::from_utf8_lossy(&output.stderr);
    std::fs::write(out.join("rustc-stderr.txt"), stderr.as_bytes()).ok();
    if !output.status.success() {
        panic!("building the test guest failed:\n{stderr}");
    }
    println!("cargo:rustc-env=TEST_GUEST_ELF={}", elf.display());
}
