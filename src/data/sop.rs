//! Stanford Online Products: `Ebay_train.txt` and `Ebay_test.txt`, each a header line then
//! `image_id class_id super_class_id path` rows; paths are relative to the root.

use std::path::{Path, PathBuf};

use super::error::read_text;
use super::labels::{Entry, labelled_split};
use super::text::{expect_fields, expect_header, inside_root, parse_id, rows};
use super::{DataError, ImageSource, Split};

const HEADER: [&str; 4] = ["image_id", "class_id", "super_class_id", "path"];

/// Reads `root` (the `Stanford_Online_Products` folder, or a folder containing it).
pub fn read(root: &Path) -> Result<Vec<Split>, DataError> {
    let root = resolve_root(root);
    Ok(vec![read_list(&root, "train")?, read_list(&root, "test")?])
}

/// The folder that holds the lists: `root`, or `Stanford_Online_Products` under it.
pub fn resolve_root(root: &Path) -> PathBuf {
    if root.join("Stanford_Online_Products").is_dir() {
        root.join("Stanford_Online_Products")
    } else {
        root.to_path_buf()
    }
}

/// The list file of split `split` (`train` or `test`) under a resolved root.
pub fn list_path(root: &Path, split: &str) -> PathBuf {
    root.join(if split == "train" {
        "Ebay_train.txt"
    } else {
        "Ebay_test.txt"
    })
}

fn read_list(root: &Path, split: &str) -> Result<Split, DataError> {
    let path = list_path(root, split);
    let text = read_text(&path)?;
    let mut rows = rows(&text);
    expect_header(&mut rows, &path, &HEADER, "empty file")?;
    let mut entries = Vec::new();
    for (line, f) in rows {
        expect_fields(&path, line, &f, 4, "image_id class_id super_class_id path")?;
        parse_id(&path, line, f[0], "image id")?;
        let class = parse_id(&path, line, f[1], "class id")?;
        parse_id(&path, line, f[2], "super class id")?;
        entries.push(Entry {
            key: class,
            original_id: class.to_string(),
            name: None,
            source: ImageSource::File(
                root.join(inside_root(f[3]).map_err(|m| DataError::at(&path, line, m))?),
            ),
        });
    }
    Ok(labelled_split(split, entries))
}
