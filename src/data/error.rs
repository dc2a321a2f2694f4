//! The one error type of the data code: a message with the file and line it is about.

use std::fmt;
use std::path::{Path, PathBuf};

/// Bad input: what is wrong, and where (file and 1-based line, when known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataError {
    pub path: Option<PathBuf>,
    pub line: Option<usize>,
    pub message: String,
}

impl DataError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            path: None,
            line: None,
            message: message.into(),
        }
    }

    pub fn with_path(mut self, path: &Path) -> Self {
        self.path = Some(path.to_path_buf());
        self
    }

    pub fn with_line(mut self, line: usize) -> Self {
        self.line = Some(line);
        self
    }

    /// An error about line `line` (1-based) of `path`.
    pub fn at(path: &Path, line: usize, message: impl Into<String>) -> Self {
        Self::new(message).with_path(path).with_line(line)
    }

    /// An error about the file `path` as a whole.
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self::new(message).with_path(path)
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path, self.line) {
            (Some(p), Some(l)) => write!(f, "{}:{}: {}", p.display(), l, self.message),
            (Some(p), None) => write!(f, "{}: {}", p.display(), self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

impl std::error::Error for DataError {}

/// Reads a whole text file, naming it when it is missing or not UTF-8.
pub fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes =
        std::fs::read(path).map_err(|e| DataError::file(path, format!("cannot read: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        DataError::file(
            path,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}
