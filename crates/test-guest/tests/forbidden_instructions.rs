// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Disassemble the guest image and fail on any instruction this project's KVM backend cannot
//! run at CPL0 (it emulates ring-0 code; these end the VM with KVM_EXIT_INTERNAL_ERROR or
//! livelock it). See shared/reference/pvm-facts.md §2.

use std::process::Command;

/// Mnemonics (or prefixes of them) that must not appear anywhere in the image.
const FORBIDDEN: &[&str] = &[
    "int ",
    "into",
    "cmpxchg16b",
    "xsave",
    "xrstor",
    "xsetbv",
    "rdtscp",
    "monitor",
    "mwait",
    "vmcall",
    "vmmcall",
    "clwb",
    "syscall",
    "sysenter",
];

fn objdump() -> Option<String> {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "att", test_guest::elf_path()])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Returns every offending line. `int3` is allowed only as inter-function padding, i.e. a run
/// of int3 that reaches the next symbol without any other instruction in between.
fn violations(disasm: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut pending_int3: Vec<String> = Vec::new();
    for line in disasm.lines() {
        let t = line.trim();
        if t.ends_with(">:") || t.starts_with("Disassembly of section") {
            pending_int3.clear();
            continue;
        }
        // Instruction lines look like "  100004:\tmov    %rsi,0x...(%rip)".
        let Some((_, insn)) = t.split_once(":\t") else {
            continue;
        };
        let insn = insn.trim();
        if insn.is_empty() || insn.starts_with('(') {
            continue;
        }
        if insn == "int3" {
            pending_int3.push(t.to_string());
            continue;
        }
        bad.append(&mut pending_int3);
        let sse = ["%xmm", "%ymm", "%zmm", "%mm"].iter().any(|r| insn.contains(r));
        let forbidden = FORBIDDEN.iter().any(|f| insn.starts_with(f) || insn == f.trim());
        if sse || forbidden {
            bad.push(t.to_string());
        }
    }
    bad
}

#[test]
fn guest_image_has_no_forbidden_instructions() {
    let Some(d) = objdump() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "objdump (binutils) is required under CI for this test"
        );
        eprintln!("SKIP: objdump not installed");
        return;
    };
    assert!(
        d.contains("<kmain>:") && d.contains("<ap_main>:"),
        "disassembly does not look like the guest"
    );
    let bad = violations(&d);
    assert!(
        bad.is_empty(),
        "forbidden instructions in the guest image:\n{}",
        bad.join("\n")
    );
}

#[test]
fn checker_catches_what_it_must() {
    let sample = "0000000000100000 <f>:\n  100000:\tpxor   %xmm0,%xmm0\n  100004:\tint3\n  100005:\tret\n  100006:\tint3\n\n0000000000100010 <g>:\n  100010:\tcmpxchg16b (%rdi)\n  100014:\tint    $0x80\n";
    let v = violations(sample);
    assert_eq!(v.len(), 4, "{v:?}");
    assert!(v[0].contains("pxor"));
    assert!(v[1].contains("int3"));
    assert!(!v.iter().any(|l| l.contains("100006")), "padding int3 must pass");
}

#[test]
fn image_has_pvh_note_and_64bit_entry() {
    let elf = test_guest::elf();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "64-bit ELF");
    let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
    assert_eq!(entry, test_guest::LOAD_ADDRESS);
    // A XEN_ELFNOTE_PHYS32_ENTRY (18) note named "Xen" must be present for PVH loaders.
    let needle = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    assert!(elf.windows(needle.len()).any(|w| w == needle), "PVH note missing");
}
