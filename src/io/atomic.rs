//! Files replaced atomically: a reader sees the old file or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::IoError;

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never half of
/// one: a temporary file in the same folder, flushed to disk, then renamed over `path`.
/// On failure the temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let tmp = temporary_path(path);
    let written = std::fs::File::create(&tmp)
        .map_err(|source| IoError::Create {
            path: tmp.clone(),
            source,
        })
        .and_then(|mut f| {
            f.write_all(bytes)
                .map_err(|source| write_error(&tmp, source))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    finish_atomic(&tmp, path)
}

/// A failed write; a full disk is said once, naming the folder.
fn write_error(path: &Path, source: std::io::Error) -> IoError {
    if source.kind() == std::io::ErrorKind::StorageFull {
        IoError::NoSpace {
            path: path.to_path_buf(),
        }
    } else {
        IoError::Write {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Flushes a finished temporary file to disk and renames it over `path`; on failure the
/// temporary file is removed.
pub fn finish_atomic(tmp: &Path, path: &Path) -> Result<(), IoError> {
    let done = std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|source| match write_error(tmp, source) {
            IoError::Write { path, source } => IoError::Flush { path, source },
            e => e,
        })
        .and_then(|()| {
            std::fs::rename(tmp, path).map_err(|source| IoError::Rename {
                from: tmp.to_path_buf(),
                to: path.to_path_buf(),
                source,
            })
        });
    if done.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    done
}

pub fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11: a full disk left the `.partial` file behind.
    #[test]
    fn a_full_disk_leaves_the_old_file_and_no_partial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, b"old").unwrap();
        let tmp = temporary_path(&path);
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let e = write_atomic(&path, b"new").unwrap_err();
        assert!(matches!(e, IoError::NoSpace { .. }), "{e}");
        assert_eq!(crate::error::chain(&e).matches("space").count(), 1, "{e}");
        assert!(tmp.symlink_metadata().is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
