//! In-Shop Clothes Retrieval: `list_eval_partition.txt` (a count line, a header line, then
//! `image_name item_id evaluation_status` rows) and `img/`. Splits `train`, `query` and
//! `gallery`; query and gallery share one label mapping so that a label names the same item
//! in both.

use std::path::{Path, PathBuf};

use super::error::read_text;
use super::labels::{Entry, labelled_split, labelled_splits};
use super::text::{expect_fields, expect_header, inside_root, parse_id, rows};
use super::{DataError, ImageSource, Split};

const HEADER: [&str; 3] = ["image_name", "item_id", "evaluation_status"];

/// The partition list under `root` (or under `root/Eval`, where the original archive has it).
pub fn list_path(root: &Path) -> PathBuf {
    let path = root.join("list_eval_partition.txt");
    if !path.exists() && root.join("Eval/list_eval_partition.txt").exists() {
        root.join("Eval/list_eval_partition.txt")
    } else {
        path
    }
}

/// Reads `root` (the folder holding `list_eval_partition.txt`; `Eval/` under it is also
/// looked in, as the original archive places the list there).
pub fn read(root: &Path) -> Result<Vec<Split>, DataError> {
    let path = list_path(root);
    let text = read_text(&path)?;
    let mut rows = rows(&text);
    let declared = match rows.next() {
        Some((line, f)) if f.len() == 1 => parse_id(&path, line, f[0], "image count")?,
        Some((line, _)) => {
            return Err(DataError::at(&path, line, "expected the image count"));
        }
        None => return Err(DataError::file(&path, "empty file")),
    };
    expect_header(&mut rows, &path, &HEADER, "no header line")?;
    let (mut train, mut query, mut gallery) = (Vec::new(), Vec::new(), Vec::new());
    let mut count = 0u64;
    for (line, f) in rows {
        expect_fields(&path, line, &f, 3, "image_name item_id evaluation_status")?;
        // Item ids read `id_00000001`; the number orders them.
        let number = f[1]
            .rsplit('_')
            .next()
            .ok_or_else(|| DataError::at(&path, line, "empty item id"))?;
        let item = parse_id(&path, line, number, "item id number")?;
        let entry = Entry {
            key: item,
            original_id: f[1].to_string(),
            name: None,
            source: ImageSource::File(
                root.join(inside_root(f[0]).map_err(|m| DataError::at(&path, line, m))?),
            ),
        };
        match f[2] {
            "train" => train.push(entry),
            "query" => query.push(entry),
            "gallery" => gallery.push(entry),
            other => {
                return Err(DataError::at(
                    &path,
                    line,
                    format!("evaluation status `{other}` is not train, query or gallery"),
                ));
            }
        }
        count += 1;
    }
    if count != declared {
        return Err(DataError::at(
            &path,
            1,
            format!("declares {declared} images but lists {count}"),
        ));
    }
    let mut splits = vec![labelled_split("train", train)];
    splits.extend(labelled_splits(vec![
        ("query", query),
        ("gallery", gallery),
    ]));
    Ok(splits)
}
