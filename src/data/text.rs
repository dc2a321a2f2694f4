//! Whitespace-separated annotation files, read line by line with line numbers for errors.

use std::path::Path;

use super::DataError;

/// The non-blank lines of `text` as `(1-based line number, fields)`.
pub fn rows(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split_whitespace().collect::<Vec<_>>()))
        .filter(|(_, f)| !f.is_empty())
}

/// Checks that the next row is the header `header`; `missing` says what is wrong when there
/// is no row at all.
pub fn expect_header<'a>(
    rows: &mut impl Iterator<Item = (usize, Vec<&'a str>)>,
    path: &Path,
    header: &[&str],
    missing: &str,
) -> Result<(), DataError> {
    match rows.next() {
        Some((_, f)) if f == header => Ok(()),
        Some((line, _)) => Err(DataError::at(
            path,
            line,
            format!("expected the header `{}`", header.join(" ")),
        )),
        None => Err(DataError::file(path, missing)),
    }
}

/// Checks that a row has exactly `n` fields.
pub fn expect_fields(
    path: &Path,
    line: usize,
    fields: &[&str],
    n: usize,
    what: &str,
) -> Result<(), DataError> {
    if fields.len() == n {
        Ok(())
    } else {
        Err(DataError::at(
            path,
            line,
            format!("expected {n} fields ({what}), found {}", fields.len()),
        ))
    }
}

/// Parses a non-negative integer field.
pub fn parse_id(path: &Path, line: usize, field: &str, what: &str) -> Result<u64, DataError> {
    field.parse::<u64>().map_err(|e| {
        let why = match e.kind() {
            std::num::IntErrorKind::PosOverflow => {
                format!("is larger than the largest {what} ({})", u64::MAX)
            }
            _ => "is not a non-negative integer".to_string(),
        };
        DataError::at(path, line, format!("{what} `{field}` {why}"))
    })
}

/// Checks that an image path from an annotation file stays inside the data set's folder: it
/// must be relative and must not climb out with `..`. A list edited by hand or taken from
/// elsewhere could otherwise make `train` or `embed` read any file the user can read.
pub fn inside_root(field: &str) -> Result<&Path, String> {
    use std::path::Component;
    let path = Path::new(field);
    match path
        .components()
        .find(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        None if !field.is_empty() => Ok(path),
        None => Err("the image path is empty".to_string()),
        Some(Component::ParentDir) => Err(format!(
            "image path `{field}` climbs out of the data set's folder with `..`"
        )),
        Some(_) => Err(format!(
            "image path `{field}` is absolute; paths are read relative to the data set's folder"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::inside_root;

    #[test]
    fn image_paths_must_stay_inside_the_root() {
        assert!(inside_root("001.Albatross/a.jpg").is_ok());
        assert!(inside_root("./img/a.jpg").is_ok());
        assert!(inside_root("a..b/c...jpg").is_ok());
        for bad in ["/etc/passwd", "../a.jpg", "img/../../a.jpg", ""] {
            assert!(inside_root(bad).is_err(), "{bad}");
        }
        assert!(inside_root("/etc/passwd").unwrap_err().contains("absolute"));
        assert!(inside_root("x/../../a.jpg").unwrap_err().contains(".."));
    }
}
