//! Images named on a command line: files, folders of image files and embedded emoji icons.

use std::path::{Path, PathBuf};

use crate::data::{DataError, ImageSource, Sample, has_image_extension};
use crate::io::embedding_files::parse_source_line;

/// Image files given on a command line: files as they are, folders expanded to the image
/// files inside them (recursively, sorted), and `emoji:CLASS:ICON` for embedded icons.
pub fn collect_images(args: &[PathBuf]) -> Result<Vec<ImageSource>, DataError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| DataError::list(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if has_image_extension(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for arg in args {
        let text = arg.to_string_lossy();
        if text.starts_with("emoji:") {
            out.push(
                parse_source_line(&text)
                    .ok_or_else(|| argument(arg, "not of the form emoji:CLASS:ICON"))?,
            );
        } else if arg.is_dir() {
            let mut files = Vec::new();
            walk(arg, &mut files)?;
            if files.is_empty() {
                return Err(argument(arg, "holds no image files"));
            }
            out.extend(files.into_iter().map(ImageSource::File));
        } else if arg.is_file() {
            out.push(ImageSource::File(arg.clone()));
        } else {
            return Err(argument(arg, "does not exist"));
        }
    }
    Ok(out)
}

fn argument(path: &Path, message: &str) -> DataError {
    DataError::Argument {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Samples of images that have no class: label 0, which embedding ignores.
pub fn unlabelled_samples(sources: impl IntoIterator<Item = ImageSource>) -> Vec<Sample> {
    sources
        .into_iter()
        .map(|source| Sample { source, label: 0 })
        .collect()
}
