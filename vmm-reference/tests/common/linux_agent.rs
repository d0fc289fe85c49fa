// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The Linux guest payload (ci/linux-guest.sh) and its agent's replies: shared by the Linux
//! guest tests and the Linux side-by-side benchmark (which includes this file by path).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

/// What the agent prints once it reads commands on the console.
pub const READY: &str = "LINUX_GUEST_READY";

/// A Linux guest is slow to boot under nested TCG (the L1 CPU is emulated).
pub const BOOT: Duration = Duration::from_secs(180);

/// Hardware virtualization (vmx/svm) on a KVM that is not PVM: where a stock kernel runs.
pub fn hardware_virt() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm");
    flags && !std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The guest kernel and the agent initramfs ci/linux-guest.sh builds.
pub fn payload() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/linux-guest");
    (root.join("vmlinuz"), root.join("initramfs.cpio.gz"))
}

/// What the agent's `status` says.
#[derive(Debug, Clone)]
pub struct Status {
    pub online: Vec<u32>,
    pub present: Vec<u32>,
    pub uptime: f64,
    /// Local APIC timer interrupts per online CPU.
    pub loc: Vec<(u32, u64)>,
}

/// "0-1,3" -> [0, 1, 3]; `None` for anything else.
pub fn cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        out.extend(a.parse::<u32>().ok()?..=b.parse::<u32>().ok()?);
    }
    Some(out)
}

impl Status {
    /// Parse the agent's `OK online=.. present=.. uptime=.. loc=cpu:n,..` line.
    pub fn try_parse(line: &str) -> Option<Status> {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
        };
        let mut loc = Vec::new();
        for p in field("loc")?.split(',').filter(|p| !p.is_empty()) {
            let (c, n) = p.split_once(':')?;
            loc.push((c.parse().ok()?, n.parse().ok()?));
        }
        Some(Status {
            online: cpu_list(field("online")?)?,
            present: cpu_list(field("present")?)?,
            uptime: field("uptime")?.parse().ok()?,
            loc,
        })
    }

    /// [`Status::try_parse`] for tests: a line that does not parse fails the test.
    pub fn parse(line: &str) -> Status {
        Status::try_parse(line).unwrap_or_else(|| panic!("not an agent status line: {line:?}"))
    }

    /// Timer interrupts CPU `cpu` took so far (0 if it is not online).
    pub fn loc_of(&self, cpu: u32) -> u64 {
        self.loc.iter().find(|(c, _)| *c == cpu).map_or(0, |(_, n)| *n)
    }
}
