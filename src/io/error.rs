//! Errors of the file formats: weight files and state dicts ([`WeightsError`]), `.npy` arrays
//! and embedding files ([`IoError`]). Each names the file, and the tensor where there is one.

use std::path::PathBuf;

use crate::error::Cause;

/// How many names a list of offending tensors shows before it only counts the rest.
pub const NAMES_SHOWN: usize = 10;

/// A weight file or state dict that cannot be read, or does not fit a module.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    /// Weights holding NaN or infinite values; `tensors` lists the first few.
    #[error("{}: {count} tensors hold NaN or infinite values: {tensors}", path.display())]
    NotFinite {
        path: PathBuf,
        count: usize,
        tensors: String,
    },
    /// The disk is full: said once, naming the folder that needs room.
    #[error("no space left on the device of {}: {} was not written", path.parent().unwrap_or(path).display(), path.file_name().unwrap_or_default().to_string_lossy())]
    NoSpace { path: PathBuf },
    /// A finite value the output type cannot hold (it would become infinite).
    #[error("tensor `{tensor}` holds {value}, beyond the range of {dtype}; {} was not written", path.display())]
    OutOfRange {
        path: PathBuf,
        tensor: String,
        value: f64,
        dtype: &'static str,
    },
    #[error("{} is neither a PyTorch checkpoint (zip or legacy pickle) nor a safetensors file", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("{} is not a valid safetensors file", path.display())]
    NotSafetensors {
        path: PathBuf,
        #[source]
        source: Box<WeightsError>,
    },
    /// Bytes that are not a safetensors container (no file known at this level).
    #[error(transparent)]
    Safetensors(Cause),
    #[error("{} is not a readable PyTorch checkpoint (truncated, or not written by torch.save?)", path.display())]
    NotTorch {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    #[error("{}: cannot read tensor `{tensor}`", path.display())]
    TensorRead {
        path: PathBuf,
        tensor: String,
        #[source]
        source: std::io::Error,
    },
    /// A tensor whose values do not decode; the file, where known, is named by the layer above.
    #[error("tensor `{tensor}`")]
    Tensor {
        tensor: String,
        #[source]
        source: Box<WeightsError>,
    },
    #[error("{}: tensor `{tensor}`", path.display())]
    TensorInFile {
        path: PathBuf,
        tensor: String,
        #[source]
        source: Box<WeightsError>,
    },
    #[error("tensor `{tensor}` has a shape that does not match its data")]
    ShapeData { tensor: String },
    #[error("unsupported dtype {dtype}")]
    UnsupportedDtype { dtype: String },
    #[error("{bytes} bytes are not a whole number of {width}-byte values")]
    Ragged { bytes: usize, width: usize },
    #[error("expected a {rank}-d tensor, found shape {shape:?}")]
    Rank { rank: usize, shape: Vec<usize> },
    #[error("{} holds no tensors", path.display())]
    Empty { path: PathBuf },
    /// A state dict that does not fit a module. Shapes are in PyTorch's layout, as `weights
    /// inspect` prints them.
    #[error(
        "cannot load weights:{}",
        mismatch_lines(missing, unexpected, shapes, unused)
    )]
    Mismatch {
        missing: Vec<String>,
        unexpected: Vec<String>,
        shapes: Vec<ShapeMismatch>,
        /// Values prepared for parameters the module does not reach (a naming bug, not a file
        /// problem).
        unused: Vec<String>,
    },
}

/// One tensor whose shape differs from the parameter it should fill (PyTorch layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub tensor: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// `names`, at most [`NAMES_SHOWN`] of them, then how many more.
pub fn short_list(names: &[String]) -> String {
    let mut out = names
        .iter()
        .take(NAMES_SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_SHOWN {
        out.push_str(&format!(" and {} more", names.len() - NAMES_SHOWN));
    }
    out
}

fn mismatch_lines(
    missing: &[String],
    unexpected: &[String],
    shapes: &[ShapeMismatch],
    unused: &[String],
) -> String {
    let mut out = String::new();
    for s in shapes.iter().take(NAMES_SHOWN) {
        out.push_str(&format!(
            "\n  `{}`: expected shape {:?}, found {:?}",
            s.tensor, s.expected, s.found
        ));
    }
    if shapes.len() > NAMES_SHOWN {
        out.push_str(&format!(
            "\n  ... and {} more shape mismatches",
            shapes.len() - NAMES_SHOWN
        ));
    }
    for (what, names) in [
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("parameters the module does not have", unused),
    ] {
        if !names.is_empty() {
            out.push_str(&format!("\n  {what}: {}", short_list(names)));
        }
    }
    out
}

/// A `.npy` array or an embedding set that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The disk is full: said once, naming the folder that needs room.
    #[error("no space left on the device of {}: {} was not written", path.parent().unwrap_or(path).display(), path.file_name().unwrap_or_default().to_string_lossy())]
    NoSpace { path: PathBuf },
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot flush {}", path.display())]
    Flush {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a regular file but a folder, a device, a pipe or a socket: it is not replaced; name a file", path.display())]
    NotReplaceable { path: PathBuf },
    #[error("cannot move {} to {}", from.display(), to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a .npy file", path.display())]
    NotNpy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: expected {expected}, found shape {shape:?}", path.display())]
    NpyShape {
        path: PathBuf,
        expected: &'static str,
        shape: Vec<u64>,
    },
    #[error("{}: expected {expected}, found dtype {found}", path.display())]
    NpyDtype {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
    #[error("{}: cannot read the values", path.display())]
    NpyData {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: truncated: {size} bytes cannot hold the {shape:?} array its header declares", path.display())]
    NpyTruncated {
        path: PathBuf,
        shape: Vec<u64>,
        size: u64,
    },
    /// `row` and `col` are 0-based, as NumPy indexes.
    #[error("{}: value [{row}, {col}] is not finite as float32 (NaN, infinite, or beyond float32's range)", path.display())]
    NpyNotFinite {
        path: PathBuf,
        row: usize,
        col: usize,
    },
    #[error("{}: label {index} is {value}, beyond the largest label (2^63 - 1)", path.display())]
    NpyLabel {
        path: PathBuf,
        index: usize,
        value: u64,
    },
    #[error("{}:{line}: `{text}` is not an image", path.display())]
    SourceLine {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{}: not a model record (delete it if these embeddings' model is unknown)", path.display())]
    ModelRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: not a model record, which is a few hundred bytes: this file holds more than {limit} bytes (delete it if these embeddings' model is unknown)", path.display())]
    ModelRecordSize { path: PathBuf, limit: u64 },
    #[error("{} lists {listed} images but {} has {rows} rows", paths.display(), embeddings.display())]
    RowMismatch {
        paths: PathBuf,
        listed: usize,
        embeddings: PathBuf,
        rows: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lists_of_tensors_are_cut_to_ten_and_a_count() {
        let names: Vec<String> = (0..13).map(|i| format!("t{i}")).collect();
        assert_eq!(
            short_list(&names),
            "t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 and 3 more"
        );
        let e = WeightsError::Mismatch {
            missing: names,
            unexpected: Vec::new(),
            shapes: Vec::new(),
            unused: Vec::new(),
        };
        assert_eq!(e.to_string().lines().count(), 2, "{e}");
    }

    /// The printed chain states the cause once, although `safetensors` repeats it in its own
    /// source.
    #[test]
    fn a_foreign_file_prints_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.safetensors");
        std::fs::write(&path, b"x").unwrap();
        let e = crate::io::state_dict::StateDict::read_safetensors(&path).unwrap_err();
        assert_eq!(
            crate::error::chain(&e),
            format!(
                "{} is not a valid safetensors file: header too small",
                path.display()
            )
        );
    }
}
