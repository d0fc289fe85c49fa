// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory images: a raw file holding every RAM region back to back, described by a
//! [`MemoryLayout`], and restored by mapping the file copy-on-write (`MAP_PRIVATE`) so that
//! restore time does not grow with memory size and the image is never modified by the guest.
//!
//! Also the page-range helpers the dirty-page pre-copy uses: turning a KVM-style dirty bitmap
//! (one bit per 4 KiB page, `u64` words) into coalesced byte ranges.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

/// Page size of dirty bitmaps and of image alignment.
pub const PAGE_SIZE: u64 = 4096;

/// What is wrong with a memory layout (regions numbered from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A region is empty, or its address, length or file offset is not page-aligned.
    #[error("region {0} is empty or not page-aligned")]
    Unaligned(usize),
    /// A region's end wraps the address space.
    #[error("region {0} wraps the address space")]
    Wraps(usize),
    /// A region overlaps the previous one or comes before it.
    #[error("region {0} overlaps or is out of order")]
    Overlaps(usize),
    /// The regions add up to more than the limit (bytes).
    #[error("more than {0} bytes of RAM")]
    TooMuchRam(u64),
    /// A region's file range wraps.
    #[error("region {0} file range wraps")]
    FileRangeWraps(usize),
    /// A region's file range lies beyond the image.
    #[error("region {0} lies beyond the image")]
    BeyondImage(usize),
    /// No region at all.
    #[error("no RAM regions")]
    NoRam,
    /// The region at this guest address cannot be mapped on this host.
    #[error("region at {0:#x} does not fit")]
    DoesNotFit(u64),
}

/// Memory image errors.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The layout is malformed (overlap, misalignment, beyond the limits, ...).
    #[error("invalid memory layout: {0}")]
    Layout(LayoutError),
    /// The image file does not match the layout.
    #[error("memory image is {found} bytes, the layout needs {needed}")]
    ImageSize {
        /// Actual file size.
        found: u64,
        /// Size the layout needs.
        needed: u64,
    },
    /// Reading or writing the image failed.
    #[error("memory image I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Mapping the image or accessing guest memory failed (vm-memory's error as the source).
    #[error("guest memory: {what}: {source}")]
    Guest {
        /// What was being done.
        what: &'static str,
        /// vm-memory's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// `MemoryError::Guest` for a vm-memory error met while doing `what`.
fn guest<E: std::error::Error + Send + Sync + 'static>(what: &'static str) -> impl FnOnce(E) -> MemoryError {
    move |e| MemoryError::Guest {
        what,
        source: Box::new(e),
    }
}

/// One RAM region of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDesc {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub len: u64,
    /// Offset of the region's bytes in the image file (a multiple of [`PAGE_SIZE`]).
    pub file_offset: u64,
}

/// Where each guest RAM region lives in the image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// Regions sorted by guest address.
    pub regions: Vec<RegionDesc>,
}

impl MemoryLayout {
    /// The layout of `mem`: its regions in order, packed back to back in the file.
    pub fn of<M: GuestMemoryBackend>(mem: &M) -> MemoryLayout {
        let mut off = 0;
        let regions = mem
            .iter()
            .map(|r| {
                let d = RegionDesc {
                    guest_addr: r.start_addr().0,
                    len: r.len(),
                    file_offset: off,
                };
                off += r.len();
                d
            })
            .collect();
        MemoryLayout { regions }
    }

    /// Total bytes of RAM (saturating: this may be asked of a layout not yet validated).
    pub fn total(&self) -> u64 {
        self.regions.iter().fold(0, |t, r| t.saturating_add(r.len))
    }

    /// Check a layout that came from an untrusted file or peer: page-aligned, sorted and
    /// non-overlapping regions, at most `max_total` bytes in all, file ranges inside
    /// `0..max_total`. Nothing is allocated before this passes.
    pub fn validate(&self, max_total: u64) -> Result<(), MemoryError> {
        let mut total: u64 = 0;
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.len == 0
                || r.len % PAGE_SIZE != 0
                || r.guest_addr % PAGE_SIZE != 0
                || r.file_offset % PAGE_SIZE != 0
            {
                return Err(MemoryError::Layout(LayoutError::Unaligned(i)));
            }
            let end = r
                .guest_addr
                .checked_add(r.len)
                .ok_or(MemoryError::Layout(LayoutError::Wraps(i)))?;
            if i > 0 && r.guest_addr < prev_end {
                return Err(MemoryError::Layout(LayoutError::Overlaps(i)));
            }
            prev_end = end;
            total = total
                .checked_add(r.len)
                .filter(|t| *t <= max_total)
                .ok_or(MemoryError::Layout(LayoutError::TooMuchRam(max_total)))?;
            let fend = r
                .file_offset
                .checked_add(r.len)
                .ok_or(MemoryError::Layout(LayoutError::FileRangeWraps(i)))?;
            if fend > max_total {
                return Err(MemoryError::Layout(LayoutError::BeyondImage(i)));
            }
        }
        if self.regions.is_empty() {
            return Err(MemoryError::Layout(LayoutError::NoRam));
        }
        Ok(())
    }

    /// Bytes the image file must hold (`u64::MAX` for a range that wraps, which
    /// [`MemoryLayout::validate`] refuses: this may be asked of a layout not yet validated).
    pub fn image_len(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.file_offset.saturating_add(r.len))
            .max()
            .unwrap_or(0)
    }

    /// Whether `mem` has exactly these regions (addresses and sizes).
    pub fn matches<M: GuestMemoryBackend>(&self, mem: &M) -> bool {
        let ours = MemoryLayout::of(mem);
        ours.regions.len() == self.regions.len()
            && ours
                .regions
                .iter()
                .zip(&self.regions)
                .all(|(a, b)| a.guest_addr == b.guest_addr && a.len == b.len)
    }
}

/// Write every RAM region of `mem` into `file` at the offsets of [`MemoryLayout::of`].
/// Returns the layout. The guest must not run meanwhile (or the image is torn).
pub fn write_image<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    file: &mut File,
) -> Result<MemoryLayout, MemoryError> {
    let layout = MemoryLayout::of(mem);
    // Start from an empty sparse file: what is not written below reads as zero.
    file.set_len(0)?;
    file.set_len(layout.image_len())?;
    let mut buf = vec![0u8; 1 << 20];
    for (r, region) in layout.regions.iter().zip(mem.iter()) {
        // Anonymous RAM: only populated pages can be non-zero, and reading the others would
        // fault them in (and make them look populated to the next migration).
        let ranges = match region.file_offset() {
            None => {
                let host = mem
                    .get_host_address(GuestAddress(r.guest_addr))
                    .map_err(guest("finding a region's host address"))?;
                dirty_ranges(&populated_pages(host as u64, r.len)?, r.len)
            }
            Some(_) => vec![(0, r.len)],
        };
        for (start, len) in ranges {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                let at = start + off;
                mem.read_slice(&mut buf[..n], GuestAddress(r.guest_addr + at))
                    .map_err(guest("reading guest RAM"))?;
                // Pages of zeroes stay holes in the (sparse) file.
                if !crate::protocol::is_zero(&buf[..n]) {
                    file.write_all_at(&buf[..n], r.file_offset + at)?;
                }
                off += n as u64;
            }
        }
    }
    file.sync_data()?;
    Ok(layout)
}

/// Map `file` as guest memory, copy-on-write: guest writes go to private pages and never to
/// the image, and pages are read from the file only when first touched, so this takes the
/// same time for 128 MiB and 64 GiB. `layout` must have passed [`MemoryLayout::validate`];
/// the file must be at least [`MemoryLayout::image_len`] bytes (checked here).
pub fn map_image_private(file: &File, layout: &MemoryLayout) -> Result<GuestMemoryMmap<()>, MemoryError> {
    let found = file.metadata()?.len();
    if found < layout.image_len() {
        return Err(MemoryError::ImageSize {
            found,
            needed: layout.image_len(),
        });
    }
    let mut regions = Vec::with_capacity(layout.regions.len());
    for r in &layout.regions {
        let len =
            usize::try_from(r.len).map_err(|_| MemoryError::Layout(LayoutError::DoesNotFit(r.guest_addr)))?;
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file.try_clone()?, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(guest("mapping the image"))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or(MemoryError::Layout(LayoutError::DoesNotFit(r.guest_addr)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(guest("assembling the mapped regions"))
}

/// Dirty pages of a bitmap (bit `i` of word `w` = page `w * 64 + i`) as coalesced
/// `(byte offset, byte length)` ranges, clipped to `len` bytes.
pub fn dirty_ranges(bitmap: &[u64], len: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, word) in bitmap.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            let bit = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            let start = (w as u64 * 64 + bit) * PAGE_SIZE;
            if start >= len {
                return out;
            }
            let n = PAGE_SIZE.min(len - start);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += n,
                _ => out.push((start, n)),
            }
        }
    }
    out
}

/// Pages of the host mapping `host_addr..host_addr + len` that are populated (present in RAM
/// or swapped out), one bit per 4 KiB page, from `/proc/self/pagemap`. For private anonymous
/// memory a page that is neither has never been written (or was discarded) and reads as
/// zero, so it need not be copied. Do not use it for file-backed mappings: their unpopulated
/// pages read from the file.
pub fn populated_pages(host_addr: u64, len: u64) -> std::io::Result<Vec<u64>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    if host_addr % PAGE_SIZE != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "unaligned mapping",
        ));
    }
    let pages = len.div_ceil(PAGE_SIZE);
    let f = File::open("/proc/self/pagemap")?;
    let mut map = vec![0u64; pages.div_ceil(64) as usize];
    // One 8-byte entry per page; read in batches of 64 Ki entries.
    let mut buf = vec![0u8; 8 * 65536];
    let mut page = 0u64;
    while page < pages {
        let n = (pages - page).min(65536);
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact_at(bytes, (host_addr / PAGE_SIZE + page) * 8)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if e & (PRESENT | SWAPPED) != 0 {
                let p = page + i as u64;
                map[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        page += n;
    }
    Ok(map)
}

/// Number of set bits (dirty pages) in a bitmap.
pub fn dirty_pages(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 10), (GuestAddress(1 << 20), 32 << 10)])
            .unwrap()
    }

    /// A peer's Hello is sized before it is validated: a file range that wraps panicked
    /// the destination (debug builds) instead of being refused.
    #[test]
    fn a_wrapping_file_range_is_sized_without_panic_and_refused() {
        let layout = MemoryLayout {
            regions: vec![RegionDesc {
                guest_addr: 0,
                len: 8192,
                file_offset: u64::MAX - 4095,
            }],
        };
        assert_eq!(layout.image_len(), u64::MAX);
        assert!(layout.validate(1 << 30).is_err());
        let huge = RegionDesc {
            guest_addr: 0,
            len: u64::MAX - 4095,
            file_offset: 0,
        };
        let two = MemoryLayout {
            regions: vec![huge, huge],
        };
        assert_eq!(two.total(), u64::MAX, "saturates instead of overflowing");
    }

    #[test]
    fn image_round_trip_is_copy_on_write() {
        let m = mem();
        m.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        m.write_slice(b"world", GuestAddress((1 << 20) + 0x2000)).unwrap();
        let path = std::env::temp_dir().join(format!("vm-live-migration-mem-{}", std::process::id()));
        let mut f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let layout = write_image(&m, &mut f).unwrap();
        layout.validate(1 << 30).unwrap();
        assert!(layout.matches(&m));
        let back = map_image_private(&f, &layout).unwrap();
        let mut b = [0u8; 5];
        back.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        back.read_slice(&mut b, GuestAddress((1 << 20) + 0x2000)).unwrap();
        assert_eq!(&b, b"world");
        // Writes stay private: the image keeps the saved bytes.
        back.write_slice(b"XXXXX", GuestAddress(0x1000)).unwrap();
        let again = map_image_private(&f, &layout).unwrap();
        again.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        // A short file is refused before mapping.
        f.set_len(4096).unwrap();
        assert!(matches!(
            map_image_private(&f, &layout),
            Err(MemoryError::ImageSize { .. })
        ));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn layouts_from_untrusted_input_are_checked() {
        let ok = MemoryLayout::of(&mem());
        assert!(ok.validate(1 << 30).is_ok());
        assert!(ok.validate(4096).is_err(), "over the size limit");
        let mut overlap = ok.clone();
        overlap.regions[1].guest_addr = 0x1000;
        assert!(overlap.validate(1 << 30).is_err());
        let mut odd = ok.clone();
        odd.regions[0].len = 100;
        assert!(odd.validate(1 << 30).is_err());
        let mut wrap = ok.clone();
        wrap.regions[1].guest_addr = u64::MAX - 4095;
        assert!(wrap.validate(u64::MAX).is_err());
        assert!(MemoryLayout::default().validate(1 << 30).is_err());
    }

    #[test]
    fn populated_pages_of_anonymous_memory() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 10)]).unwrap();
        m.write_slice(&[1], GuestAddress(0x3000)).unwrap();
        m.write_slice(&[1], GuestAddress(0x3f000)).unwrap();
        let host = m.get_host_address(GuestAddress(0)).unwrap() as u64;
        let map = populated_pages(host, 256 << 10).unwrap();
        assert_eq!(map, vec![(1 << 3) | (1 << 63)], "only the two written pages");
    }

    #[test]
    fn dirty_bitmaps_become_coalesced_ranges() {
        let bm = [0b1011u64, 1 << 63, 1];
        assert_eq!(
            dirty_ranges(&bm, 1 << 30),
            vec![
                (0, 2 * PAGE_SIZE),
                (3 * PAGE_SIZE, PAGE_SIZE),
                (127 * PAGE_SIZE, 2 * PAGE_SIZE)
            ]
        );
        assert_eq!(dirty_pages(&bm), 5);
        // Clipped to the region length.
        assert_eq!(dirty_ranges(&bm, 2 * PAGE_SIZE), vec![(0, 2 * PAGE_SIZE)]);
    }
}
