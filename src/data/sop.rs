//! Stanford Online Products: `Ebay_train.txt` and `Ebay_test.txt`, each a header line then
//! `image_id class_id super_class_id path` rows; paths are relative to the root.

use std::path::Path;

use super::error::read_text;
use super::labels::{Entry, labelled_split};
use super::text::{expect_fields, expect_header, parse_id, rows};
use super::{DataError, ImageSource, Split};

const HEADER: [&str; 4] = ["image_id", "class_id", "super_class_id", "path"];

/// Reads `root` (the `Stanford_Online_Products` folder, or a folder containing it).
pub fn read(root: &Path) -> Result<Vec<Split>, DataError> {
    let root = if root.join("Stanford_Online_Products").is_dir() {
        root.join("Stanford_Online_Products")
    } else {
        root.to_path_buf()
    };
    Ok(vec![
        read_list(&root, "Ebay_train.txt", "train")?,
        read_list(&root, "Ebay_test.txt", "test")?,
    ])
}

fn read_list(root: &Path, file: &str, split: &str) -> Result<Split, DataError> {
    let path = root.join(file);
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
            source: ImageSource::File(root.join(f[3])),
        });
    }
    Ok(labelled_split(split, entries))
}
