// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unix sockets whose path appears only once they listen.
//!
//! `UnixListener::bind` creates the path at `bind(2)` and listens a moment later: a client that
//! waits for the path and connects in between is refused (seen on a loaded one-CPU host). So
//! the listener is bound under a temporary name in the same directory and renamed into place.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Longest socket path (`sun_path` holds 108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Listen on `path`, replacing a stale socket there; the path exists only once connectable
/// (except for a path too long to take the temporary suffix: that one is bound in place).
pub fn bind_listening(path: &Path) -> std::io::Result<UnixListener> {
    let tmp = temp_name(path);
    if tmp.as_os_str().len() > SUN_PATH_MAX {
        let _ = std::fs::remove_file(path);
        return UnixListener::bind(path);
    }
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    // rename(2) replaces a stale socket file atomically.
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
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
    fn the_path_is_connectable_as_soon_as_it_exists_and_stale_files_go() {
        let dir = std::env::temp_dir().join(format!("sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("api.sock");
        std::fs::write(&p, b"stale").unwrap();
        let l = bind_listening(&p).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        assert!(l.accept().is_ok());
        assert!(!temp_name(&p).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
