//! Files replaced atomically: a reader sees the old file or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::IoError;

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never half of
/// one: a temporary file in the same folder, flushed to disk, then renamed over `path`.
/// On failure the temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    check_replaceable(path)?;
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

/// Refuses to replace `path` unless it is missing, a regular file or a link (the link itself
/// is replaced, not what it names). A rename over a device node replaces the node: run as
/// root, `--out /dev/zero` would have turned the system's `/dev/zero` into a regular file.
pub fn check_replaceable(path: &Path) -> Result<(), IoError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() && !meta.file_type().is_symlink() => {
            Err(IoError::NotReplaceable {
                path: path.to_path_buf(),
            })
        }
        _ => Ok(()),
    }
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
    let flushed = std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|source| match write_error(tmp, source) {
            IoError::Write { path, source } => IoError::Flush { path, source },
            e => e,
        });
    let done = flushed
        .and_then(|()| check_replaceable(path))
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

    /// A rename over a device node or a pipe would replace the node itself (found by running
    /// `index build --out /dev/zero` as root); folders, pipes and device nodes are refused
    /// and left alone, links are replaced as links.
    #[test]
    fn only_files_and_links_are_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        for target in [fifo.as_path(), dir.path()] {
            let err = write_atomic(target, b"new").unwrap_err();
            assert!(
                matches!(&err, IoError::NotReplaceable { path } if path == target),
                "{err}"
            );
        }
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert!(!temporary_path(&fifo).exists());
        let err = check_replaceable(Path::new("/dev/null")).unwrap_err();
        assert!(err.to_string().contains("not replaced"), "{err}");
        // A link to a file is replaced by the new file; what it named is untouched.
        let named = dir.path().join("named");
        std::fs::write(&named, b"kept").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&named, &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert_eq!(std::fs::read(&link).unwrap(), b"new");
        assert_eq!(std::fs::read(&named).unwrap(), b"kept");
        // A missing file is simply written.
        write_atomic(&dir.path().join("fresh"), b"new").unwrap();
    }

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
