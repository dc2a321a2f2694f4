//! CUB-200-2011: `images.txt` (`image_id path`), `image_class_labels.txt`
//! (`image_id class_id`), images under `images/`. Classes 1-100 train, 101-200 test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::read_text;
use super::labels::{Entry, labelled_split};
use super::text::{expect_fields, inside_root, parse_id, rows};
use super::{DataError, ImageSource, Split};

/// The last training class (1-based, inclusive) of the standard split.
pub const LAST_TRAIN_CLASS: u64 = 100;

/// Reads `root` (the `CUB_200_2011` folder, or a folder containing it).
/// The folder that holds the annotation files: `root`, or `CUB_200_2011` under it.
pub fn resolve_root(root: &Path) -> PathBuf {
    if root.join("CUB_200_2011").is_dir() {
        root.join("CUB_200_2011")
    } else {
        root.to_path_buf()
    }
}

pub fn read(root: &Path) -> Result<Vec<Split>, DataError> {
    let root = resolve_root(root);
    let images_txt = root.join("images.txt");
    let labels_txt = root.join("image_class_labels.txt");
    let images = read_text(&images_txt)?;
    let labels = read_text(&labels_txt)?;

    let mut class_of: HashMap<u64, (u64, usize)> = HashMap::new();
    for (line, f) in rows(&labels) {
        expect_fields(&labels_txt, line, &f, 2, "image_id class_id")?;
        let id = parse_id(&labels_txt, line, f[0], "image id")?;
        let class = parse_id(&labels_txt, line, f[1], "class id")?;
        if class == 0 {
            return Err(DataError::at(&labels_txt, line, "class ids start at 1"));
        }
        if let Some((_, first)) = class_of.insert(id, (class, line)) {
            return Err(DataError::at(
                &labels_txt,
                line,
                format!("image id {id} already labelled on line {first}"),
            ));
        }
    }

    let (mut train, mut test) = (Vec::new(), Vec::new());
    let mut seen = HashMap::new();
    for (line, f) in rows(&images) {
        expect_fields(&images_txt, line, &f, 2, "image_id path")?;
        let id = parse_id(&images_txt, line, f[0], "image id")?;
        if let Some(first) = seen.insert(id, line) {
            return Err(DataError::at(
                &images_txt,
                line,
                format!("image id {id} already listed on line {first}"),
            ));
        }
        let Some(&(class, _)) = class_of.get(&id) else {
            return Err(DataError::at(
                &images_txt,
                line,
                format!("image id {id} has no class in {}", labels_txt.display()),
            ));
        };
        // `001.Black_footed_Albatross/...`: the folder names the class.
        let name = f[1]
            .split('/')
            .next()
            .and_then(|d| d.split_once('.'))
            .map(|(_, n)| n.to_string());
        let entry = Entry {
            key: class,
            original_id: class.to_string(),
            name,
            source: ImageSource::File(
                root.join("images")
                    .join(inside_root(f[1]).map_err(|m| DataError::at(&images_txt, line, m))?),
            ),
        };
        if class <= LAST_TRAIN_CLASS {
            train.push(entry);
        } else {
            test.push(entry);
        }
    }
    if seen.len() != class_of.len() {
        return Err(DataError::file(
            &labels_txt,
            format!(
                "labels {} images but {} lists {}",
                class_of.len(),
                images_txt.display(),
                seen.len()
            ),
        ));
    }
    Ok(vec![
        labelled_split("train", train),
        labelled_split("test", test),
    ])
}
