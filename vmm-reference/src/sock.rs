// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unix sockets whose path appears only once they listen.
//!
//! `UnixListener::bind` creates the path at `bind(2)` and listens a moment later: a client that
//! waits for the path and connects in between is refused (seen on a loaded one-CPU host). So
//! the listener is bound under a temporary name in the same directory and renamed into place.
//!
//! A socket belongs to the process holding `PATH.lock` (an flock): a second VMM given the same
//! path is refused instead of silently taking the first one's socket over, and only a socket
//! nobody holds is replaced: anything else at the path (a snapshot's file, a directory) is
//! refused and left alone. Sockets are created 0600: they control the VM.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The lock that makes a socket path this process's. Dropping it removes the socket
/// [`bind_listening`] put there (if the path is still that socket) and the lock file.
#[derive(Debug)]
pub struct PathLock {
    path: PathBuf,
    _file: File,
    /// The socket this lock guards: its path, device and inode.
    socket: Option<(PathBuf, u64, u64)>,
}

impl PathLock {
    /// Remove the socket this lock guards, unless something else took its path since.
    fn remove_socket(&mut self) {
        if let Some((path, dev, ino)) = self.socket.take() {
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.dev() == dev && m.ino() == ino) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        self.remove_socket();
        // Unlinked while still held: a process that opened it meanwhile finds, after its
        // flock, that the path is another file now, and starts over.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Take `PATH.lock` without waiting; refused while another process holds it.
pub fn lock_path(path: &Path) -> std::io::Result<PathLock> {
    let mut name = path.as_os_str().to_os_string();
    name.push(".lock");
    let lock = PathBuf::from(name);
    for _ in 0..8 {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock)?;
        // SAFETY: flock on a descriptor `f` owns; the lock lives as long as `f`.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use by another process (it holds {})",
                    path.display(),
                    lock.display()
                ),
            ));
        }
        // The holder before us may have unlinked the file between our open and our flock.
        let same =
            std::fs::metadata(&lock).is_ok_and(|m| m.ino() == f.metadata().map(|n| n.ino()).unwrap_or(0));
        if same {
            return Ok(PathLock {
                path: lock,
                _file: f,
                socket: None,
            });
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::WouldBlock,
        format!("{} keeps changing", lock.display()),
    ))
}

/// Longest socket path (`sun_path` holds 108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Listen on `path` (mode 0600) once this process holds its lock, replacing a stale socket
/// there; the path exists only once connectable (except for a path too long to take the
/// temporary suffix: that one is bound in place). Keep the lock as long as the listener.
pub fn bind_listening(path: &Path) -> std::io::Result<(UnixListener, PathLock)> {
    let mut lock = lock_path(path)?;
    // A mistyped path must not cost a user their file: only a stale socket is replaced.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; it is left alone", path.display()),
            ));
        }
    }
    let tmp = temp_name(path);
    let owner_only = std::fs::Permissions::from_mode(0o600);
    let listener = if tmp.as_os_str().len() > SUN_PATH_MAX {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)?;
        std::fs::set_permissions(path, owner_only)?;
        l
    } else {
        let _ = std::fs::remove_file(&tmp);
        let l = UnixListener::bind(&tmp)?;
        // 0600 before the path appears; rename(2) then replaces a stale socket atomically.
        if let Err(e) = std::fs::set_permissions(&tmp, owner_only).and_then(|()| std::fs::rename(&tmp, path))
        {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        l
    };
    let m = std::fs::symlink_metadata(path)?;
    lock.socket = Some((path.to_path_buf(), m.dev(), m.ino()));
    Ok((listener, lock))
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{:x}~", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_is_connectable_as_soon_as_it_exists_and_stale_sockets_go() {
        let dir = std::env::temp_dir().join(format!("sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("api.sock");
        drop(UnixListener::bind(&p).unwrap());
        let (l, lock) = bind_listening(&p).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        assert!(l.accept().is_ok());
        assert!(!temp_name(&p).exists());
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // A second owner is refused while the first holds the path, and the first keeps it.
        let e = bind_listening(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("in use by another process"), "{e}");
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        drop(lock);
        assert!(!p.exists(), "the socket goes with its lock");
        assert!(bind_listening(&p).is_ok(), "free again once the lock is gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `--api-socket`, `--serial socket=` or a receiver URL naming a snapshot's file (a typo)
    /// replaced the file with a socket, then deleted it when the socket closed.
    #[test]
    fn a_path_that_is_not_a_socket_is_refused_and_kept() {
        let dir = std::env::temp_dir().join(format!("sock-keep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("state.bin");
        std::fs::write(&file, b"a snapshot").unwrap();
        let e = bind_listening(&file)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"a snapshot");
        assert!(bind_listening(&dir).is_err(), "a directory is no socket either");
        assert!(dir.is_dir());
        // A socket whose path someone else took meanwhile is not theirs to lose.
        let p = dir.join("s.sock");
        let (_l, lock) = bind_listening(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"theirs").unwrap();
        drop(lock);
        assert_eq!(std::fs::read(&p).unwrap(), b"theirs");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
