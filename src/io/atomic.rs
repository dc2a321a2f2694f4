//! Files replaced atomically: a reader sees the old file or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::IoError;

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never half of
/// one: a temporary file in the same folder, flushed to disk, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let tmp = temporary_path(path);
    let mut f = std::fs::File::create(&tmp).map_err(|source| IoError::Create {
        path: tmp.clone(),
        source,
    })?;
    f.write_all(bytes).map_err(|source| IoError::Write {
        path: tmp.clone(),
        source,
    })?;
    drop(f);
    finish_atomic(&tmp, path)
}

/// Flushes a finished temporary file to disk and renames it over `path`.
pub fn finish_atomic(tmp: &Path, path: &Path) -> Result<(), IoError> {
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|source| IoError::Flush {
            path: tmp.to_path_buf(),
            source,
        })?;
    std::fs::rename(tmp, path).map_err(|source| IoError::Rename {
        from: tmp.to_path_buf(),
        to: path.to_path_buf(),
        source,
    })
}

pub fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}
