// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! VM snapshots and live migration, independent of any VMM's device set:
//! - the snapshot container (this module): the on-disk/on-wire envelope that carries a VM's
//!   state sections;
//! - [`memory`]: raw memory images restored copy-on-write, dirty-bitmap ranges;
//! - [`protocol`]: the live-migration wire protocol and the dirty-page pre-copy driver;
//! - [`auth`]: pre-shared-token challenge and response for links anyone can reach (TCP).
//!
//! The container:
//!
//! Layout (all integers little endian):
//! ```text
//! magic "VMMSNAP\0" | format version u32 | section count u32
//! { name length u16 | name (UTF-8) | payload length u64 | payload } * count
//! CRC32 (IEEE) over everything before it, u32
//! ```
//! Decoding is for untrusted input: every length is checked against explicit limits and
//! the remaining input *before* anything is allocated, the checksum is verified before any
//! section is returned, and unknown newer format versions are refused with a clear error.
//! What goes *into* the sections (vCPU, LAPIC, device state) belongs to the crates that own
//! that state; this crate only moves bytes safely.
//!
//! ```
//! use vm_live_migration::{Snapshot, Limits};
//! let mut s = Snapshot::default();
//! s.add("vcpu0", b"state".to_vec()).unwrap();
//! let bytes = s.encode();
//! let back = Snapshot::decode(&bytes, &Limits::default()).unwrap();
//! assert_eq!(back.section("vcpu0"), Some(&b"state"[..]));
//! ```

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod auth;
pub mod memory;
pub mod protocol;

/// File magic.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\0";
/// Format version this crate writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Decoder limits (checked before allocating).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most sections accepted.
    pub max_sections: u32,
    /// Longest section name.
    pub max_name_len: u16,
    /// Largest single section payload.
    pub max_section_len: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sections: 4096,
            max_name_len: 128,
            max_section_len: 64 << 20,
        }
    }
}

/// Decoding errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not a snapshot.
    #[error("not a snapshot (bad magic)")]
    BadMagic,
    /// Written by a newer format, or version 0 (never written: a zeroed or forged header).
    #[error("snapshot format version {found} is not supported (this build reads 1 to {supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },
    /// Input ended early.
    #[error("snapshot truncated while reading {0}")]
    Truncated(&'static str),
    /// A declared size is beyond the limits.
    #[error("snapshot {what} {value} exceeds the limit of {limit}")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Declared value.
        value: u64,
        /// Limit.
        limit: u64,
    },
    /// A section name that cannot be stored or read.
    #[error("invalid section name: {0}")]
    BadName(NameError),
    /// Checksum mismatch.
    #[error("snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// Bytes after the checksum.
    #[error("{0} unexpected bytes after the snapshot checksum")]
    TrailingBytes(usize),
}

/// An ordered set of named state sections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    sections: Vec<(String, Vec<u8>)>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], Error> {
        let n = usize::try_from(n).map_err(|_| Error::Truncated(what))?;
        let end = self.pos.checked_add(n).ok_or(Error::Truncated(what))?;
        let s = self.buf.get(self.pos..end).ok_or(Error::Truncated(what))?;
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, Error> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, Error> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// What is wrong with a section name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Read from a file or peer: the name is not UTF-8.
    #[error("not UTF-8")]
    NotUtf8,
    /// A section of this name is already in the snapshot.
    #[error("{0:?} is already used")]
    Duplicate(String),
    /// Longer than the format's 16-bit length field.
    #[error("{0} bytes long, the format allows 65535")]
    TooLong(usize),
}

impl Snapshot {
    /// Add a section; names must be unique.
    pub fn add(&mut self, name: &str, payload: Vec<u8>) -> Result<(), Error> {
        if self.section(name).is_some() || name.len() > usize::from(u16::MAX) {
            return Err(Error::BadName(if name.len() > usize::from(u16::MAX) {
                NameError::TooLong(name.len())
            } else {
                NameError::Duplicate(name.into())
            }));
        }
        self.sections.push((name.into(), payload));
        Ok(())
    }

    /// A section's payload.
    pub fn section(&self, name: &str) -> Option<&[u8]> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_slice())
    }

    /// Section names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sections.iter().map(|(n, _)| n.as_str())
    }

    /// Serialize.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        for (name, payload) in &self.sections {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            out.extend_from_slice(payload);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parse untrusted bytes.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<Snapshot, Error> {
        if buf.len() < MAGIC.len() || buf[..MAGIC.len()] != MAGIC {
            return Err(Error::BadMagic);
        }
        let body_len = buf.len().checked_sub(4).ok_or(Error::Truncated("checksum"))?;
        let mut r = Reader {
            buf: &buf[..body_len],
            pos: MAGIC.len(),
        };
        let version = r.u32("version")?;
        if version == 0 || version > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let count = r.u32("section count")?;
        if count > limits.max_sections {
            return Err(Error::TooLarge {
                what: "section count",
                value: count.into(),
                limit: limits.max_sections.into(),
            });
        }
        let stored = u32::from_le_bytes([
            buf[body_len],
            buf[body_len + 1],
            buf[body_len + 2],
            buf[body_len + 3],
        ]);
        let computed = crc32fast::hash(&buf[..body_len]);
        if stored != computed {
            return Err(Error::Checksum { stored, computed });
        }
        let mut snap = Snapshot::default();
        for _ in 0..count {
            let nlen = r.u16("section name length")?;
            if nlen > limits.max_name_len {
                return Err(Error::TooLarge {
                    what: "section name length",
                    value: nlen.into(),
                    limit: limits.max_name_len.into(),
                });
            }
            let name = std::str::from_utf8(r.take(nlen.into(), "section name")?)
                .map_err(|_| Error::BadName(NameError::NotUtf8))?;
            let plen = r.u64("section length")?;
            if plen > limits.max_section_len {
                return Err(Error::TooLarge {
                    what: "section length",
                    value: plen,
                    limit: limits.max_section_len,
                });
            }
            let payload = r.take(plen, "section payload")?.to_vec();
            snap.add(name, payload)?;
        }
        if r.pos != body_len {
            return Err(Error::TrailingBytes(body_len - r.pos));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_input() {
        let mut s = Snapshot::default();
        s.add("a", vec![1, 2, 3]).unwrap();
        assert!(s.add("a", vec![]).is_err());
        let good = s.encode();
        assert_eq!(
            Snapshot::decode(b"nope", &Limits::default()),
            Err(Error::BadMagic)
        );
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            Snapshot::decode(&flipped, &Limits::default()),
            Err(Error::Checksum { .. })
        ));
        let mut newer = good.clone();
        newer[8] = 2;
        assert!(matches!(
            Snapshot::decode(&newer, &Limits::default()),
            Err(Error::UnsupportedVersion { found: 2, .. })
        ));
        let mut zero = good.clone();
        zero[8] = 0;
        assert!(matches!(
            Snapshot::decode(&zero, &Limits::default()),
            Err(Error::UnsupportedVersion { found: 0, .. })
        ));
        let tight = Limits {
            max_section_len: 2,
            ..Limits::default()
        };
        assert!(matches!(
            Snapshot::decode(&good, &tight),
            Err(Error::TooLarge { .. })
        ));
        assert!(Snapshot::decode(&good[..good.len() - 1], &Limits::default()).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(secs in proptest::collection::btree_map("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut s = Snapshot::default();
            for (k, v) in &secs {
                s.add(k, v.clone()).unwrap();
            }
            prop_assert_eq!(Snapshot::decode(&s.encode(), &Limits::default()).unwrap(), s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Snapshot::decode(&bytes, &Limits::default());
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = Snapshot::decode(&with_magic, &Limits::default());
        }
    }
}

// The README's examples are compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
