//! Cars196: `cars_annos.mat` (MAT-file v5/v7, struct array `annotations` with fields
//! `relative_im_path` and `class`, and cell array `class_names`) and `car_ims/`. Classes 1-98
//! train, 99-196 test; the file's `test` flag is ignored, as the benchmark does.

use std::path::Path;

use super::labels::{Entry, labelled_split};
use super::mat5::{self, MatValue};
use super::{DataError, ImageSource, Split};

/// The last training class (1-based, inclusive) of the standard split.
pub const LAST_TRAIN_CLASS: u64 = 98;

pub fn read(root: &Path) -> Result<Vec<Split>, DataError> {
    let mat_path = root.join("cars_annos.mat");
    let bytes = crate::io::regular::read(&mat_path).map_err(|e| DataError::read(&mat_path, e))?;
    let vars = mat5::parse(&bytes).map_err(|e| DataError::Mat {
        path: mat_path.clone(),
        source: e,
    })?;
    let var = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v);

    let annotations = var("annotations")
        .ok_or_else(|| DataError::file(&mat_path, "no variable `annotations`"))?;
    let MatValue::Struct { elements, .. } = annotations else {
        return Err(DataError::file(
            &mat_path,
            "`annotations` is not a struct array",
        ));
    };
    let class_names: Vec<Option<String>> = match var("class_names") {
        Some(MatValue::Cell { items, .. }) => items
            .iter()
            .map(|v| v.as_text().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };

    let (mut train, mut test) = (Vec::new(), Vec::new());
    for i in 0..elements.len() {
        // Errors name the annotation as MATLAB would index it (1-based).
        let at = |m: &str| DataError::file(&mat_path, format!("annotations({}): {m}", i + 1));
        let rel = annotations
            .field(i, "relative_im_path")
            .and_then(MatValue::as_text)
            .ok_or_else(|| at("field `relative_im_path` missing or not a char array"))?;
        let class = annotations
            .field(i, "class")
            .and_then(MatValue::as_scalar)
            .filter(|c| *c >= 1.0 && c.fract() == 0.0 && *c < 1e9)
            .ok_or_else(|| at("field `class` missing or not a positive integer"))?
            as u64;
        let entry = Entry {
            key: class,
            original_id: class.to_string(),
            name: class_names.get(class as usize - 1).cloned().flatten(),
            source: ImageSource::File(
                root.join(super::text::inside_root(rel).map_err(|m| at(&m))?),
            ),
        };
        if class <= LAST_TRAIN_CLASS {
            train.push(entry);
        } else {
            test.push(entry);
        }
    }
    Ok(vec![
        labelled_split("train", train),
        labelled_split("test", test),
    ])
}
