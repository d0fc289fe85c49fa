// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Write seed inputs for the LAPIC fuzz targets from real `KVM_GET_LAPIC` blobs of test-guest
//! CPUs: an online BSP and AP, and an AP the guest offlined (SW-disabled APIC, cli; hlt), in
//! a VM with legacy x2APIC ids and one with 32-bit ids.
//!
//! `cargo run -p vmm-reference --example lapic_fuzz_seeds -- fuzz/seeds`
//! Input format: see fuzz/src/lib.rs (`LapicInput`).

use std::path::PathBuf;
use std::time::Duration;

use lapic_state::{kvm::probe_icr_layout, IcrLayout};
use vmm_reference::config::{CpuConfig, KernelSource, SerialMode, VmConfig};
use vmm_reference::console::GuestConsole;
use vmm_reference::vm::Vm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()));
    let merged = probe_icr_layout(&kvm_ioctls::Kvm::new()?)? == IcrLayout::Merged;
    let t = Duration::from_secs(20);
    for (max, ids32) in [(4u32, false), (300, true)] {
        let dir = std::env::temp_dir().join(format!("lapic-seeds-{}-{max}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let sock = dir.join("console.sock");
        let cfg = VmConfig {
            kernel: KernelSource::Embedded,
            initramfs: None,
            cmdline: None,
            cpus: CpuConfig { boot: 3, max },
            memory: 128 << 20,
            serial: SerialMode::Socket(sock.clone()),
        };
        let vm = Vm::start(&cfg)?;
        let mut con = GuestConsole::connect(&sock, t)?;
        con.wait_for("READY", t)?;
        let mut seeds = vec![];
        for (cpu, what) in [(0u32, "bsp-online"), (1, "ap-online")] {
            seeds.push((cpu, what.to_string()));
        }
        con.command("offline 2", t)?;
        std::thread::sleep(Duration::from_millis(50));
        seeds.push((2, "ap-offlined".into()));
        for (cpu, what) in seeds {
            let page = vm.lapic(cpu).ok_or("lapic")?;
            let base = vm.apic_base(cpu).ok_or("apic base")?;
            // conventions: 32-bit ids, merged ICR, 6 LVTs, TSC-deadline (fuzz/src/lib.rs bits).
            let conv = u8::from(ids32) | (u8::from(merged) << 1) | (1 << 3);
            let mut input = Vec::new();
            input.extend_from_slice(&cpu.to_le_bytes());
            input.extend_from_slice(&base.to_le_bytes());
            input.push(conv);
            input.push(4); // prior: one-shot, ISR count non-zero
            input.extend_from_slice(&page.to_bytes());
            for target in ["lapic_blob", "lapic_differential"] {
                let d = out.join(target);
                std::fs::create_dir_all(&d)?;
                let ids = if ids32 { "ids32" } else { "legacy" };
                std::fs::write(d.join(format!("test-guest-{what}-{ids}")), &input)?;
            }
            println!(
                "cpu {cpu} {what}: apic base {base:#x}, SPIV {:#x}",
                page.reg(lapic_state::regs::SPIV)
            );
        }
        con.command("poweroff", t)?;
        vm.wait(Some(t));
        vm.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
