//! Files replaced atomically: a reader sees the old file or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never half of
/// one: a temporary file in the same folder, flushed to disk, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_path(path);
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    finish_atomic(&tmp, path)
}

/// Flushes a finished temporary file to disk and renames it over `path`.
pub fn finish_atomic(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {}", tmp.display()))?;
    std::fs::rename(tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

pub fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}
