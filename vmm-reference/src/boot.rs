// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory layout, kernel loading (linux-loader) and the BSP's 64-bit entry state.
//!
//! Memory map (guest physical):
//! ```text
//! 0x0000_0500  boot GDT                 0x0000_9000  PML4, then PDPT, then 4 PDs (4 GiB identity)
//! 0x0000_7000  Linux zero page          0x0002_0000  kernel command line
//! 0x0000_8ff0  initial stack            0x000e_0000  RSDP, then XSDT/FACS/FADT/MADT/DSDT
//! 0x0010_0000  kernel (test guest ELF, bzImage protected-mode part; vmlinux at its p_paddr)
//! RAM up to 3 GiB, then the MMIO gap (IOAPIC, LAPIC) up to 4 GiB, then the rest of RAM.
//! ```

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::config::KernelSource;

/// Guest memory type used by the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Boot GDT.
pub const BOOT_GDT: u64 = 0x500;
/// Linux zero page.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot identity map.
pub const PML4: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Maximum command line size.
pub const CMDLINE_MAX: usize = 4096;
/// Where the kernel proper goes.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the EBDA / reserved low area.
const EBDA_START: u64 = 0x9fc00;
/// Highest address for the initramfs (what older kernels accept).
const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Default kernel command line for Linux guests.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Boot errors.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Guest memory could not be created.
    #[error("creating guest memory: {0}")]
    Memory(String),
    /// The kernel could not be read.
    #[error("reading kernel {0}: {1}")]
    KernelRead(String, std::io::Error),
    /// linux-loader refused the kernel.
    #[error("loading kernel {0}: {1}")]
    KernelLoad(String, loader::Error),
    /// The initramfs could not be loaded.
    #[error("loading initramfs {0}: {1}")]
    Initramfs(String, String),
    /// The command line is invalid.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures failed.
    #[error("writing boot structures: {0}")]
    Write(String),
}

/// RAM ranges for `size` bytes of memory around the MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Create the guest memory (anonymous, private mappings).
pub fn create_memory(size: u64) -> Result<GuestMemory, BootError> {
    GuestMemory::from_ranges(&ram_ranges(size)).map_err(|e| BootError::Memory(e.to_string()))
}

/// Where the BSP starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    /// 64-bit entry RIP.
    pub rip: u64,
    /// Value for RSI (the Linux zero page).
    pub rsi: u64,
}

fn load_image<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemory,
    name: &str,
    image: &mut F,
) -> Result<(u64, u64, Option<linux_loader::loader::bootparam::setup_header>), BootError> {
    let mut magic = [0u8; 4];
    image
        .read_exact(&mut magic)
        .map_err(|e| BootError::KernelRead(name.into(), e))?;
    image
        .rewind()
        .map_err(|e| BootError::KernelRead(name.into(), e))?;
    if &magic == b"\x7fELF" {
        // ELF: the 64-bit entry point (test guest `_start64`, Linux `startup_64`).
        let r = Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| BootError::KernelLoad(name.into(), e))?;
        Ok((r.kernel_load.0, r.kernel_end, None))
    } else {
        let r = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| BootError::KernelLoad(name.into(), e))?;
        // bzImage: the 64-bit entry is 0x200 past the protected-mode code start.
        Ok((r.kernel_load.0 + 0x200, r.kernel_end, r.setup_header))
    }
}

/// Whether `path` is a Linux bzImage: its boot-protocol magic "HdrS" at offset 0x202.
pub fn is_bzimage(path: &Path) -> bool {
    let mut head = [0u8; 0x206];
    File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && &head[0x202..] == b"HdrS"
}

/// Load the kernel (and initramfs), write the zero page with e820 map, command line and
/// RSDP pointer. Returns the BSP entry point.
pub fn load_kernel(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &KernelSource,
    initramfs: Option<&Path>,
    cmdline: Option<&str>,
    rsdp: u64,
) -> Result<EntryPoint, BootError> {
    let (rip, kernel_end, setup_header) = match kernel {
        KernelSource::Embedded => load_image(mem, "test-guest", &mut Cursor::new(test_guest::elf()))?,
        KernelSource::Path(p) => {
            let name = p.display().to_string();
            let mut f = File::open(p).map_err(|e| BootError::KernelRead(name.clone(), e))?;
            load_image(mem, &name, &mut f)?
        }
    };

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.acpi_rsdp_addr = rsdp;

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline.unwrap_or(DEFAULT_CMDLINE))
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE), &cl).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cl_len = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cl_len as u32 + 1;

    if let Some(path) = initramfs {
        let name = path.display().to_string();
        let data = std::fs::read(path).map_err(|e| BootError::Initramfs(name.clone(), e.to_string()))?;
        let top = mem_size.min(MMIO_GAP_START).min(INITRD_ADDR_MAX + 1);
        let addr = top
            .checked_sub(data.len() as u64)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end)
            .ok_or_else(|| BootError::Initramfs(name.clone(), "does not fit in guest memory".into()))?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| BootError::Initramfs(name.clone(), e.to_string()))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = data.len() as u32;
    }

    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    e820.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if mem_size > MMIO_GAP_START {
        e820.push((MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    for (i, (addr, size, typ)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *typ,
        };
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| BootError::Write(e.to_string()))?;

    write_gdt_and_page_tables(mem)?;
    Ok(EntryPoint { rip, rsi: ZERO_PAGE })
}

const GDT: [u64; 4] = [
    0,                     // null
    0x00af_9b00_0000_ffff, // 0x08: 64-bit code, accessed
    0x00cf_9300_0000_ffff, // 0x10: data, accessed
    0x0080_8b00_0000_0067, // 0x18: 64-bit TSS (busy), base 0, limit 0x67 (low half)
];

fn write_gdt_and_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    let w = |e: vm_memory::GuestMemoryError| BootError::Write(e.to_string());
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT + 8 * i as u64))
            .map_err(w)?;
    }
    // TSS descriptor high half.
    mem.write_obj(0u64, GuestAddress(BOOT_GDT + 8 * GDT.len() as u64))
        .map_err(w)?;
    // PML4[0] -> PDPT; PDPT[0..4] -> PD0..PD3; each PD maps 1 GiB with 2 MiB pages.
    let pdpt = PML4 + 0x1000;
    let pd = PML4 + 0x2000;
    mem.write_obj(pdpt | 0x3, GuestAddress(PML4)).map_err(w)?;
    for i in 0..4u64 {
        mem.write_obj((pd + i * 0x1000) | 0x3, GuestAddress(pdpt + i * 8))
            .map_err(w)?;
    }
    for i in 0..2048u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(pd + i * 8))
            .map_err(w)?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, l: u8, db: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: if s == 0 { 0x67 } else { 0xffff_ffff },
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: if s == 0 { 0 } else { 1 },
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode system registers for the BSP's 64-bit entry (starting from KVM's values so the
/// APIC base and other fields KVM set stay intact).
pub fn bsp_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(0x08, 0xb, 1, 0, 1);
    let data = segment(0x10, 0x3, 0, 1, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(0x18, 0xb, 0, 0, 0);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (8 * (GDT.len() + 1) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x8000_0033; // PG | ET | MP | PE (NE too, bit 5)
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME | LMA
    sregs
}

/// General-purpose registers for the BSP's 64-bit entry.
pub fn bsp_regs(entry: EntryPoint) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: entry.rsi,
        ..Default::default()
    }
}

/// FPU state at entry (x87 control word and MXCSR at their reset values).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn ranges_split_around_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
    }

    #[test]
    fn embedded_guest_loads_at_its_entry() {
        let mem = create_memory(64 << 20).unwrap();
        let e = load_kernel(&mem, 64 << 20, &KernelSource::Embedded, None, None, 0xe0000).unwrap();
        assert_eq!(e.rip, test_guest::LOAD_ADDRESS);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pml4, (PML4 + 0x1000) | 3);
        assert_eq!(mem.num_regions(), 1);
    }
}
