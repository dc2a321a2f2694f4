//! A folder tree `train/<class>/<image>` and `test/<class>/<image>` (the release's converted
//! layout, read as torchvision's `ImageFolder` does: class folders sorted by name, files with
//! an image extension, sorted).

use std::path::{Path, PathBuf};

use super::labels::{Entry, labelled_split};
use super::{DataError, ImageSource, Split, has_image_extension};

pub fn read(root: &Path) -> Result<Vec<Split>, DataError> {
    Ok(vec![read_split(root, "train")?, read_split(root, "test")?])
}

fn read_split(root: &Path, split: &str) -> Result<Split, DataError> {
    let dir = root.join(split);
    let mut entries = Vec::new();
    for class_dir in sorted_entries(&dir)? {
        if !class_dir.is_dir() {
            continue;
        }
        let class = class_dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| DataError::file(&class_dir, "class folder name is not UTF-8"))?
            .to_string();
        for file in sorted_entries(&class_dir)? {
            if has_image_extension(&file) && file.is_file() {
                entries.push(Entry {
                    key: class.clone(),
                    original_id: class.clone(),
                    name: Some(class.clone()),
                    source: ImageSource::File(file),
                });
            }
        }
    }
    Ok(labelled_split(split, entries))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let read = std::fs::read_dir(dir).map_err(|e| DataError::list(dir, e))?;
    let mut paths = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| DataError::list(dir, e))?;
        paths.push(entry.path());
    }
    paths.sort();
    Ok(paths)
}
