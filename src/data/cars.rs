//! Cars196: `cars_annos.mat` (MAT-file v5/v7, struct array `annotations` with fields
//! `relative_im_path` and `class`, and cell array `class_names`) and `car_ims/`. Classes 1-98
//! train, 99-196 test; the file's `test` flag is ignored, as the benchmark does.

use std::path::Path;

use matrw::{MatFile, MatVariable};

use super::labels::{Entry, labelled_split};
use super::{DataError, ImageSource, Split};

/// The last training class (1-based, inclusive) of the standard split.
pub const LAST_TRAIN_CLASS: u64 = 98;

pub fn read(root: &Path) -> Result<Vec<Split>, DataError> {
    let mat_path = root.join("cars_annos.mat");
    let bytes = std::fs::read(&mat_path)
        .map_err(|e| DataError::file(&mat_path, format!("cannot read: {e}")))?;
    let mat = parse_mat(&bytes).map_err(|m| DataError::file(&mat_path, m))?;

    let annotations = match &mat["annotations"] {
        MatVariable::StructureArray(a) => &a.value,
        MatVariable::Null => {
            return Err(DataError::file(&mat_path, "no variable `annotations`"));
        }
        _ => {
            return Err(DataError::file(
                &mat_path,
                "`annotations` is not a struct array",
            ));
        }
    };
    let class_names: Vec<Option<String>> = match &mat["class_names"] {
        MatVariable::CellArray(c) => c.value.iter().map(char_string).collect(),
        _ => Vec::new(),
    };

    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (i, a) in annotations.iter().enumerate() {
        // Errors name the annotation as MATLAB would index it (1-based).
        let at = |m: &str| DataError::file(&mat_path, format!("annotations({}): {m}", i + 1));
        let rel = char_string(&a["relative_im_path"])
            .ok_or_else(|| at("field `relative_im_path` missing or not a char array"))?;
        let class = integer(&a["class"])
            .ok_or_else(|| at("field `class` missing or not a positive integer scalar"))?;
        if class == 0 {
            return Err(at("class ids start at 1"));
        }
        let entry = Entry {
            key: class,
            original_id: class.to_string(),
            name: class_names.get(class as usize - 1).cloned().flatten(),
            source: ImageSource::File(root.join(&rel)),
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

/// Parses a MAT-file with `matrw`. Its parser can panic on some malformed input instead of
/// returning an error; a corrupt annotation file must not take the program down, so the
/// panic is caught and reported as an error about the file.
fn parse_mat(bytes: &[u8]) -> Result<MatFile, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let parsed = std::panic::catch_unwind(|| matrw::load_matfile_from_u8(bytes));
    std::panic::set_hook(hook);
    match parsed {
        Ok(Ok(mat)) => Ok(mat),
        Ok(Err(e)) => Err(format!("not a readable MAT-file (v5/v7): {e}")),
        Err(_) => Err("not a readable MAT-file (v5/v7): the parser gave up".to_string()),
    }
}

/// A char array as a string (MATLAB stores a row of UTF-16 code units).
fn char_string(v: &MatVariable) -> Option<String> {
    let chars = v.to_vec_char()?;
    Some(chars.into_iter().collect())
}

/// A numeric scalar holding a non-negative integer, whatever its MATLAB class.
fn integer(v: &MatVariable) -> Option<u64> {
    let as_f64 = v
        .to_f64()
        .or_else(|| v.to_f32().map(f64::from))
        .or_else(|| v.to_u8().map(f64::from))
        .or_else(|| v.to_u16().map(f64::from))
        .or_else(|| v.to_u32().map(f64::from))
        .or_else(|| v.to_i8().map(f64::from))
        .or_else(|| v.to_i16().map(f64::from))
        .or_else(|| v.to_i32().map(f64::from))
        .or_else(|| v.to_u64().map(|x| x as f64))
        .or_else(|| v.to_i64().map(|x| x as f64))?;
    (as_f64 >= 0.0 && as_f64.fract() == 0.0 && as_f64 < 1e15).then_some(as_f64 as u64)
}
