//! The errors of the data code. Each names the file (and 1-based line) it is about, so that a
//! bad annotation file can be fixed without a debugger.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::emoji::RasterError;
use super::mat5::MatError;
use super::transform::TransformError;
use crate::error::Cause;

/// Bad input to the data code. `Clone` because the embedded emoji asset caches its outcome
/// and the loader hands skipped images to more than one reader; sources sit behind `Arc`
/// for that reason.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("cannot list {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// `at` is the offset of the first byte that is not valid UTF-8.
    #[error("{}: not UTF-8 text (byte {at})", path.display())]
    NotUtf8 { path: PathBuf, at: usize },
    /// A line of an annotation file that does not read.
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The file reads, but what it says is wrong as a whole (counts, missing variables).
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: not a readable MAT-file", path.display())]
    Mat {
        path: PathBuf,
        #[source]
        source: MatError,
    },
    #[error("{}: split `{split}` has no images", annotation.display())]
    EmptySplit { annotation: PathBuf, split: String },
    /// Listed images that are not files; `shown` holds the first few, `count` all of them,
    /// `why` what each shown one is instead.
    #[error("{count} listed image files are missing or not files:{}", list_paths(shown, why, *count))]
    MissingImages {
        count: usize,
        shown: Vec<PathBuf>,
        why: Vec<&'static str>,
    },
    /// `image`'s errors print their own cause and return it as their source too; only the
    /// text is kept, so that the cause is printed once.
    #[error("cannot decode image {}", path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    #[error("cannot write image {}", path.display())]
    WriteImage {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    #[error("{}: image has no pixels", path.display())]
    NoPixels { path: PathBuf },
    #[error("{}: not valid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: Arc<serde_json::Error>,
    },
    #[error("{sample}")]
    Transform {
        sample: String,
        #[source]
        source: TransformError,
    },
    #[error("emoji `{name}` ({set})")]
    Rasterise {
        name: String,
        set: String,
        #[source]
        source: RasterError,
    },
    #[error("emoji class {class} does not exist")]
    NoEmojiClass { class: usize },
    #[error("emoji class `{name}` has no icon {icon}")]
    NoEmojiIcon { name: String, icon: usize },
    #[error("emoji sample given to a store without emoji")]
    NoEmojiStore,
    #[error("sample {index} is not in the split")]
    NoSample { index: usize },
    #[error("the {kind} dataset has no split `{split}` (it has {})", available.join(", "))]
    NoSplit {
        kind: super::DatasetKind,
        split: String,
        available: Vec<String>,
    },
    /// A batch plan that the split cannot fill.
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("cannot start loader threads")]
    Threads {
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A folder, file or `emoji:` argument given on a command line.
    #[error("{}: {message}", path.display())]
    Argument { path: PathBuf, message: String },
}

/// Why the class-balanced sampler cannot plan batches over a split.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error(
        "a batch needs at least one class and one image per class (got {classes} x {per_class}: `data.classes_per_batch` x `data.per_class`)"
    )]
    Empty { classes: usize, per_class: usize },
    #[error(
        "the split has {have} classes with images, fewer than the {need} classes a batch draws (`data.classes_per_batch`)"
    )]
    TooFewClasses { have: usize, need: usize },
    #[error(
        "the split has {have} images, fewer than one batch of {classes} x {per_class} (`data.classes_per_batch` x `data.per_class`)"
    )]
    TooFewImages {
        have: usize,
        classes: usize,
        per_class: usize,
    },
    #[error("class {class} has {have} images, fewer than the {need} per batch (`data.per_class`)")]
    ShortClass {
        class: String,
        have: usize,
        need: usize,
    },
}

impl DataError {
    pub fn read(path: &Path, source: std::io::Error) -> Self {
        Self::Read {
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }

    pub fn list(path: &Path, source: std::io::Error) -> Self {
        Self::List {
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }

    /// An error about line `line` (1-based) of `path`.
    pub fn at(path: &Path, line: usize, message: impl Into<String>) -> Self {
        Self::Parse {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }

    /// An error about the file `path` as a whole.
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// The file the error is about, where there is one: what sorts a list of bad images.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Read { path, .. }
            | Self::List { path, .. }
            | Self::NotUtf8 { path, .. }
            | Self::Parse { path, .. }
            | Self::Invalid { path, .. }
            | Self::Mat { path, .. }
            | Self::Image { path, .. }
            | Self::WriteImage { path, .. }
            | Self::NoPixels { path }
            | Self::Argument { path, .. } => Some(path),
            Self::EmptySplit { annotation, .. } => Some(annotation),
            Self::MissingImages { shown, .. } => shown.first().map(PathBuf::as_path),
            _ => None,
        }
    }
}

/// How many missing images a message lists before it only counts the rest.
pub const MISSING_SHOWN: usize = 20;

fn list_paths(shown: &[PathBuf], why: &[&str], count: usize) -> String {
    let mut out: String = shown
        .iter()
        .zip(why.iter().chain(std::iter::repeat(&"does not exist")))
        .map(|(p, w)| format!("\n  {} ({w})", p.display()))
        .collect();
    if count > shown.len() {
        out.push_str(&format!("\n  ... and {} more", count - shown.len()));
    }
    out
}

/// What a listed image path that is not a readable file is instead.
pub fn not_a_file(path: &Path) -> &'static str {
    match path.symlink_metadata() {
        Err(_) => "does not exist",
        Ok(m) if m.file_type().is_symlink() && !path.exists() => "is a link to nothing",
        Ok(_) if path.is_dir() => "is a folder",
        Ok(_) => "is not a regular file",
    }
}

/// Reads a whole text file, naming it when it is missing or not UTF-8. A UTF-8 byte-order
/// mark (what Windows editors put first) is dropped, so that it does not spoil a header.
pub fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = crate::io::regular::read(path).map_err(|e| DataError::read(path, e))?;
    let mut text = String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_path_buf(),
        at: e.utf8_error().valid_up_to(),
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}
