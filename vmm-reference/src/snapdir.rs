// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A snapshot directory on disk: written so that a crash at any point leaves the previous
//! snapshot usable, read so that only regular files of the expected sizes are accepted.
//!
//! `state.bin` names its memory image, `memory-<id>.bin`, by a random id; the image ends with
//! a trailer holding the same id and the image length, so a state and an image from
//! different snapshots are refused. A new snapshot writes a new image and a new state under
//! new names, syncs both, and then switches by renaming the state over `state.bin`: the one
//! atomic step. Superseded images are unlinked only after that. Unlinking (never truncating
//! or rewriting) is also what keeps a VM restored from this directory alive: its RAM is a
//! private mapping of the old image, which lives on until it is unmapped.
//!
//! Directories written before images had ids (`memory.bin`, no trailer) still restore.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_live_migration::memory::{map_image_private, write_image};

use crate::boot::GuestMemory;
use crate::snapshot::{ImageRef, SavedVm, SnapshotError, MAX_STATE_FILE, STATE_FILE};

/// The memory image of directories written before images had ids.
pub const LEGACY_MEMORY_FILE: &str = "memory.bin";
/// Bytes after the image: magic, id, image length, zeros (a page, so sizes stay aligned).
pub const TRAILER_LEN: u64 = 4096;
const MAGIC: &[u8; 16] = b"vmm-ref memory\x00\x01";
const LOCK_FILE: &str = ".lock";

/// The trailer after `image`'s RAM: it names the image, so a state can check it has its own.
fn trailer(image: &ImageRef) -> Vec<u8> {
    let mut t = vec![0u8; TRAILER_LEN as usize];
    t[..16].copy_from_slice(MAGIC);
    t[16..48].copy_from_slice(image.id.as_bytes());
    t[48..56].copy_from_slice(&image.len.to_le_bytes());
    t
}

fn image_err(reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Image(reason.into())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

/// 16 random bytes as hex, from the kernel's generator (no crate needed for one call).
fn new_id() -> Result<String, SnapshotError> {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`, which lives across the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(io("getrandom")(std::io::Error::last_os_error()));
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A new file, 0600 (it holds guest memory), never an existing one or a symlink.
fn create_new(path: &Path) -> Result<File, SnapshotError> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))
}

/// Open `path` for reading only if it is a regular file: no symlink (O_NOFOLLOW), and no FIFO
/// or device (O_NONBLOCK keeps a FIFO from blocking the open; fstat then refuses it).
pub fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    let meta = f.metadata().map_err(io(format!("reading {}", path.display())))?;
    if !meta.is_file() {
        return Err(image_err(format!("{} is not a regular file", path.display())));
    }
    Ok(f)
}

/// An exclusive lock on the directory for one writer: two VMMs writing snapshots into one
/// directory would otherwise unlink each other's new image.
fn lock_dir(dir: &Path) -> Result<File, SnapshotError> {
    let path = dir.join(LOCK_FILE);
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    // SAFETY: flock on a descriptor owned by `f`; the lock goes with the descriptor.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        // errno first: the message's allocation may change it, and its kind decides 429.
        let e = std::io::Error::last_os_error();
        return Err(io(format!(
            "another snapshot is being written into {}",
            dir.display()
        ))(e));
    }
    Ok(f)
}

/// Write `saved` and `mem` into `dir` (created if missing), crash-safely: see the module
/// docs. Returns the size of the state file.
pub fn write_dir(dir: &Path, saved: &SavedVm, mem: &GuestMemory) -> Result<u64, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let _lock = lock_dir(dir)?;
    let image = ImageRef {
        id: new_id()?,
        len: saved.vm.memory.image_len(),
    };
    let image_path = dir.join(image.file_name());
    let state_tmp = dir.join(format!("{STATE_FILE}.{}.tmp", image.id));
    let written = write_image_file(&image_path, &image, saved, mem)
        .and_then(|()| write_state_file(&state_tmp, &image, saved));
    let len = match written {
        Ok(len) => len,
        Err(e) => {
            let _ = std::fs::remove_file(&image_path);
            let _ = std::fs::remove_file(&state_tmp);
            return Err(e);
        }
    };
    // The switch: before it the previous snapshot is whole, after it the new one is.
    std::fs::rename(&state_tmp, dir.join(STATE_FILE))
        .map_err(io(format!("renaming {}", state_tmp.display())))?;
    sync_dir(dir)?;
    remove_superseded(dir, &image);
    Ok(len)
}

/// The RAM image and its trailer, synced.
fn write_image_file(
    path: &Path,
    image: &ImageRef,
    saved: &SavedVm,
    mem: &GuestMemory,
) -> Result<(), SnapshotError> {
    let mut f = create_new(path)?;
    let layout = write_image(mem, &mut f)?;
    if layout != saved.vm.memory {
        return Err(image_err("the memory layout changed while saving"));
    }
    f.write_all_at(&trailer(image), image.len)
        .map_err(io(format!("writing {}", path.display())))?;
    f.sync_all().map_err(io(format!("syncing {}", path.display())))
}

/// The state naming `image`, synced under its temporary name; returns its size.
fn write_state_file(path: &Path, image: &ImageRef, saved: &SavedVm) -> Result<u64, SnapshotError> {
    let mut vm = saved.vm.clone();
    vm.image = Some(image.clone());
    let bytes = saved.encode_with(&vm)?;
    let f = create_new(path)?;
    f.write_all_at(&bytes, 0)
        .map_err(io(format!("writing {}", path.display())))?;
    f.sync_all().map_err(io(format!("syncing {}", path.display())))?;
    Ok(bytes.len() as u64)
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", dir.display())))
}

/// Unlink images and temporary states the new state does not name (left by earlier
/// snapshots, or by a writer that crashed). Only names this module writes are touched.
fn remove_superseded(dir: &Path, keep: &ImageRef) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let keep = keep.file_name();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let image = name.starts_with("memory-") && name.ends_with(".bin") && name != keep;
        let tmp = name.starts_with(&format!("{STATE_FILE}.")) && name.ends_with(".tmp");
        if image || tmp || name == LEGACY_MEMORY_FILE {
            if let Err(err) = std::fs::remove_file(e.path()) {
                log::warn!("snapshot: could not remove the superseded {name}: {err}");
            }
        }
    }
}

/// Read and check a snapshot directory; RAM is mapped copy-on-write from its image.
pub fn read_dir(dir: &Path) -> Result<(SavedVm, GuestMemory), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = read_bounded(&state_path, MAX_STATE_FILE)?;
    let saved = SavedVm::decode(&bytes)?;
    let layout = &saved.vm.memory;
    let (name, want) = match &saved.vm.image {
        Some(r) => (r.file_name(), r.len + TRAILER_LEN),
        None => (LEGACY_MEMORY_FILE.to_string(), layout.image_len()),
    };
    let path: PathBuf = dir.join(&name);
    let f = open_regular(&path)?;
    let found = f
        .metadata()
        .map_err(io(format!("reading {}", path.display())))?
        .len();
    if found != want {
        return Err(image_err(format!(
            "{name} is {found} bytes; the state needs {want}"
        )));
    }
    if let Some(r) = &saved.vm.image {
        let mut t = vec![0u8; TRAILER_LEN as usize];
        f.read_exact_at(&mut t, r.len)
            .map_err(io(format!("reading {}", path.display())))?;
        if t != trailer(r) {
            return Err(image_err(format!(
                "{name} belongs to another snapshot than {STATE_FILE}"
            )));
        }
    }
    let mem = map_image_private(&f, layout)?;
    Ok((saved, mem))
}

/// A regular file's bytes, refused beyond `max` (read through a bound, not trusting its size).
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, SnapshotError> {
    let f = open_regular(path)?;
    let mut bytes = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io(format!("reading {}", path.display())))?;
    if bytes.len() as u64 > max {
        return Err(image_err(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use vm_memory::{Bytes, GuestAddress};

    use crate::snapshot::tests::sample;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmmref-snapdir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// 1 MiB of RAM (the sample's layout) whose first page is filled with `byte`.
    fn ram(byte: u8) -> GuestMemory {
        let m = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        m.write_slice(&[byte; 4096], GuestAddress(0)).unwrap();
        m
    }

    fn first_byte(m: &GuestMemory) -> u8 {
        m.read_obj(GuestAddress(100)).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_vm_restored_from_a_directory_snapshots_into_it_and_keeps_running() {
        let dir = temp("resnap");
        write_dir(&dir, &sample(), &ram(0xa1)).unwrap();
        let (_, live) = read_dir(&dir).unwrap();
        // The restored VM's RAM is a private mapping of the image being superseded.
        live.write_slice(&[0xb2; 16], GuestAddress(4096)).unwrap();
        write_dir(&dir, &sample(), &live).unwrap();
        // Reading the old mapping would fault (SIGBUS) had the image been truncated.
        assert_eq!(first_byte(&live), 0xa1);
        let (_, again) = read_dir(&dir).unwrap();
        assert_eq!(first_byte(&again), 0xa1);
        assert_eq!(again.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0xb2);
        let images: Vec<_> = names(&dir)
            .into_iter()
            .filter(|n| n.starts_with("memory-"))
            .collect();
        assert_eq!(images.len(), 1, "the superseded image is unlinked");
    }

    #[test]
    fn a_crash_before_the_switch_leaves_the_previous_snapshot_whole() {
        let dir = temp("crash");
        write_dir(&dir, &sample(), &ram(0xa1)).unwrap();
        // A second snapshot that dies after writing its image and state, before the rename.
        let b = ImageRef {
            id: new_id().unwrap(),
            len: 1 << 20,
        };
        write_image_file(&dir.join(b.file_name()), &b, &sample(), &ram(0xb2)).unwrap();
        write_state_file(&dir.join(format!("{STATE_FILE}.{}.tmp", b.id)), &b, &sample()).unwrap();
        let (_, m) = read_dir(&dir).unwrap();
        assert_eq!(first_byte(&m), 0xa1, "the previous snapshot is what restores");
        // The next snapshot clears what the dead one left.
        write_dir(&dir, &sample(), &ram(0xc3)).unwrap();
        let left = names(&dir);
        assert_eq!(left.len(), 3, "{left:?}"); // .lock, memory-<id>.bin, state.bin
        assert_eq!(first_byte(&read_dir(&dir).unwrap().1), 0xc3);
    }

    #[test]
    fn files_other_than_the_snapshots_own_are_refused() {
        let dir = temp("refuse");
        write_dir(&dir, &sample(), &ram(0xa1)).unwrap();
        let (saved, _) = read_dir(&dir).unwrap();
        let image = dir.join(saved.vm.image.clone().unwrap().file_name());
        let err = |d: &Path| read_dir(d).err().map(|e| e.to_string()).unwrap_or_default();

        // An image from another snapshot, of the right size.
        let other = temp("refuse-other");
        write_dir(&other, &sample(), &ram(0xb2)).unwrap();
        let (o, _) = read_dir(&other).unwrap();
        let saved_copy = std::fs::read(&image).unwrap();
        std::fs::copy(other.join(o.vm.image.unwrap().file_name()), &image).unwrap();
        assert!(err(&dir).contains("belongs to another snapshot"), "{}", err(&dir));
        // An image of the wrong size.
        std::fs::write(&image, &saved_copy[..4096]).unwrap();
        assert!(err(&dir).contains("bytes; the state needs"), "{}", err(&dir));
        // A link to a device in the image's place: never read.
        std::fs::remove_file(&image).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &image).unwrap();
        assert!(err(&dir).contains("opening"), "{}", err(&dir));
        // A FIFO as state.bin: refused at once instead of blocking the restore.
        let state = dir.join(STATE_FILE);
        std::fs::remove_file(&state).unwrap();
        let c = std::ffi::CString::new(state.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(err(&dir).contains("not a regular file"), "{}", err(&dir));
    }

    #[test]
    fn an_image_id_can_only_name_an_image_of_the_layouts_size() {
        let mut s = sample();
        let len = s.vm.memory.image_len();
        for (id, l) in [
            ("../../etc/passwd".to_string(), len),
            ("A".repeat(32), len),
            ("a".repeat(32), len + 1),
        ] {
            s.vm.image = Some(ImageRef { id, len: l });
            assert!(SavedVm::decode(&s.encode().unwrap()).is_err());
        }
        s.vm.image = Some(ImageRef {
            id: "0123456789abcdef".repeat(2),
            len,
        });
        assert!(SavedVm::decode(&s.encode().unwrap()).is_ok());
    }

    #[test]
    fn a_directory_from_before_image_ids_still_restores() {
        let dir = temp("legacy");
        let s = sample();
        let mut f = File::create(dir.join(LEGACY_MEMORY_FILE)).unwrap();
        write_image(&ram(0xa1), &mut f).unwrap();
        std::fs::write(dir.join(STATE_FILE), s.encode().unwrap()).unwrap();
        assert_eq!(first_byte(&read_dir(&dir).unwrap().1), 0xa1);
        // A legacy image of the wrong size is refused too.
        f.set_len(4096).unwrap();
        assert!(read_dir(&dir).is_err());
    }
}
