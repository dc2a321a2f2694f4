//! Reading a file a user named, refusing what is not a regular file: a device such as
//! `/dev/zero` never ends, so reading it whole fills memory, and opening a named pipe waits
//! until something writes to it. Every reader of a user's files goes through here, so that
//! such a name is an error that says what it is rather than a hang.

use std::fs::File;
use std::io;
use std::path::Path;

/// Fails unless `path`, links followed, is a regular file; the error says what it is instead.
pub fn check(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        return Ok(());
    }
    let what = if meta.is_dir() {
        "it is a folder, not a file"
    } else {
        "it is not a regular file but a device, a pipe or a socket, which can be endless"
    };
    Err(io::Error::new(io::ErrorKind::InvalidInput, what))
}

/// [`File::open`] of a regular file.
pub fn open(path: &Path) -> io::Result<File> {
    check(path)?;
    File::open(path)
}

/// [`std::fs::read`] of a regular file.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    check(path)?;
    std::fs::read(path)
}

/// [`std::fs::read_to_string`] of a regular file.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    check(path)?;
    std::fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_pipes_and_folders_are_refused_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, "text").unwrap();
        assert_eq!(read_to_string(&file).unwrap(), "text");
        // Through a link, too.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read(&link).unwrap(), b"text");
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for endless in [Path::new("/dev/zero"), &zero] {
            let err = read(endless).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains("device"), "{err}");
        }
        // A named pipe: opening it would wait for a writer forever.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(open(&fifo).is_err());
        assert!(
            read_to_string(dir.path())
                .unwrap_err()
                .to_string()
                .contains("folder")
        );
        assert_eq!(
            read(&dir.path().join("missing")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
