//! Reading and writing `.npy` arrays (NumPy's format) for embeddings and labels.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use npyz::WriterBuilder;

use super::IoError;

/// A 2-D float array read from a `.npy` file.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

/// Opens `path` and checks that it holds the bytes its header declares, before anything is
/// allocated from the declared shape.
fn open(path: &Path) -> Result<npyz::NpyFile<BufReader<File>>, IoError> {
    let file = super::regular::open(path).map_err(|source| IoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| IoError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let npy = npyz::NpyFile::new(BufReader::new(file)).map_err(|source| IoError::NotNpy {
        path: path.to_path_buf(),
        source,
    })?;
    let declared = npy
        .shape()
        .iter()
        .try_fold(npy.dtype().num_bytes().unwrap_or(1) as u64, |a, &d| {
            a.checked_mul(d)
        });
    match declared {
        Some(bytes) if bytes <= size => Ok(npy),
        _ => Err(IoError::NpyTruncated {
            path: path.to_path_buf(),
            shape: npy.shape().to_vec(),
            size,
        }),
    }
}

/// The error of reading the values of the `shape` array its header declares.
fn data<'a>(path: &'a Path, shape: &'a [u64]) -> impl Fn(std::io::Error) -> IoError + 'a {
    move |source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            return IoError::NpyTruncated {
                path: path.to_path_buf(),
                shape: shape.to_vec(),
                size: std::fs::metadata(path).map_or(0, |m| m.len()),
            };
        }
        IoError::NpyData {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn type_str(npy: &npyz::NpyFile<BufReader<File>>) -> String {
    match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => format!("{other:?}"),
    }
}

/// The dtype with a big-endian `>` read as little-endian `<`: `npyz` swaps the bytes of
/// either order as it reads, so one match covers files written on any machine.
fn any_order(kind: &str) -> String {
    match kind.strip_prefix('>') {
        Some(rest) => format!("<{rest}"),
        None => kind.to_string(),
    }
}

/// Every value of `npy`, stored as `T`, converted by `convert`; a short file is an error that
/// names `path` and the declared shape.
fn values_as<T: npyz::Deserialize, U>(
    npy: npyz::NpyFile<BufReader<File>>,
    path: &Path,
    shape: &[u64],
    convert: impl Fn(T) -> U,
) -> Result<Vec<U>, IoError> {
    Ok(npy
        .into_vec::<T>()
        .map_err(data(path, shape))?
        .into_iter()
        .map(convert)
        .collect())
}

/// Reads `[n, d]` float16, float32 or float64 embeddings, in C or Fortran order (transposed
/// on read into rows). A value that is not finite (or not as f32) is refused: it would rank
/// first or last in every search without saying so.
pub fn read_matrix(path: &Path) -> Result<Matrix, IoError> {
    let npy = open(path)?;
    let shape = npy.shape().to_vec();
    if shape.len() != 2 {
        return Err(IoError::NpyShape {
            path: path.to_path_buf(),
            expected: "a 2-D array [n, d]",
            shape,
        });
    }
    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
    let fortran = npy.order() == npyz::Order::Fortran;
    let kind = type_str(&npy);
    let values: Vec<f32> = match any_order(&kind).as_str() {
        "<f4" => npy.into_vec::<f32>().map_err(data(path, &shape))?,
        "<f8" => values_as::<f64, _>(npy, path, &shape, |v| v as f32)?,
        "<f2" => values_as::<half::f16, _>(npy, path, &shape, f32::from)?,
        _ => {
            return Err(IoError::NpyDtype {
                path: path.to_path_buf(),
                expected: "float16, float32 or float64 values",
                found: kind,
            });
        }
    };
    let values = if fortran && rows > 1 && cols > 1 {
        // Column-major: value (r, c) is stored at c * rows + r.
        let mut out = vec![0f32; values.len()];
        for (c, column) in values.chunks_exact(rows).enumerate() {
            for (r, &v) in column.iter().enumerate() {
                out[r * cols + c] = v;
            }
        }
        out
    } else {
        values
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(IoError::NpyNotFinite {
            path: path.to_path_buf(),
            row: i / cols.max(1),
            col: i % cols.max(1),
        });
    }
    Ok(Matrix { rows, cols, values })
}

/// Reads a 1-D array of integer labels (any signed or unsigned integer dtype).
pub fn read_labels(path: &Path) -> Result<Vec<i64>, IoError> {
    let npy = open(path)?;
    let shape = npy.shape().to_vec();
    if shape.len() != 1 && !(shape.len() == 2 && shape[1] == 1) {
        return Err(IoError::NpyShape {
            path: path.to_path_buf(),
            expected: "a 1-D array of labels",
            shape,
        });
    }
    let kind = type_str(&npy);
    let labels: Vec<i64> = match any_order(&kind).as_str() {
        "<i8" => npy.into_vec::<i64>().map_err(data(path, &shape))?,
        "<i4" => values_as::<i32, _>(npy, path, &shape, i64::from)?,
        "<i2" => values_as::<i16, _>(npy, path, &shape, i64::from)?,
        "|i1" => values_as::<i8, _>(npy, path, &shape, i64::from)?,
        "<u8" => npy
            .into_vec::<u64>()
            .map_err(data(path, &shape))?
            .into_iter()
            .enumerate()
            .map(|(index, v)| {
                i64::try_from(v).map_err(|_| IoError::NpyLabel {
                    path: path.to_path_buf(),
                    index,
                    value: v,
                })
            })
            .collect::<Result<_, _>>()?,
        "<u4" => values_as::<u32, _>(npy, path, &shape, i64::from)?,
        "<u2" => values_as::<u16, _>(npy, path, &shape, i64::from)?,
        "|u1" => values_as::<u8, _>(npy, path, &shape, i64::from)?,
        _ => {
            return Err(IoError::NpyDtype {
                path: path.to_path_buf(),
                expected: "integer labels",
                found: kind,
            });
        }
    };
    Ok(labels)
}

/// Writes `[rows, cols]` float32 values.
pub fn write_matrix(path: &Path, rows: usize, cols: usize, values: &[f32]) -> Result<(), IoError> {
    let file = File::create(path).map_err(|source| IoError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    let write = |source| IoError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut writer = npyz::WriteOptions::<f32>::new()
        .default_dtype()
        .shape(&[rows as u64, cols as u64])
        .writer(std::io::BufWriter::new(file))
        .begin_nd()
        .map_err(write)?;
    writer.extend(values.iter().copied()).map_err(write)?;
    writer.finish().map_err(write)?;
    Ok(())
}

/// Writes 1-D int64 labels.
pub fn write_labels(path: &Path, labels: &[i64]) -> Result<(), IoError> {
    let file = File::create(path).map_err(|source| IoError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    let write = |source| IoError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut writer = npyz::WriteOptions::<i64>::new()
        .default_dtype()
        .shape(&[labels.len() as u64])
        .writer(std::io::BufWriter::new(file))
        .begin_nd()
        .map_err(write)?;
    writer.extend(labels.iter().copied()).map_err(write)?;
    writer.finish().map_err(write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path().join("e.npy");
        let l = dir.path().join("l.npy");
        write_matrix(&e, 2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        write_labels(&l, &[7, -1]).unwrap();
        let m = read_matrix(&e).unwrap();
        assert_eq!((m.rows, m.cols), (2, 3));
        assert_eq!(m.values[5], 6.0);
        assert_eq!(read_labels(&l).unwrap(), vec![7, -1]);
        // Labels are not a matrix, a matrix is not labels.
        assert!(matches!(read_matrix(&l), Err(IoError::NpyShape { path, .. }) if path == l));
        assert!(matches!(read_labels(&e), Err(IoError::NpyShape { path, .. }) if path == e));
        let junk = dir.path().join("junk.npy");
        std::fs::write(&junk, b"nope").unwrap();
        assert!(matches!(read_matrix(&junk), Err(IoError::NotNpy { path, .. }) if path == junk));
    }

    /// A version 1.0 `.npy` file with `header` (the dict) and raw `data`.
    pub(crate) fn npy_bytes(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Issue 11: Fortran order was read as C order.
    #[test]
    fn fortran_order_is_transposed_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.npy");
        // [[1, 2, 3], [4, 5, 6]] stored column by column.
        let data = f32_bytes(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let header = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }";
        std::fs::write(&path, npy_bytes(header, &data)).unwrap();
        let m = read_matrix(&path).unwrap();
        assert_eq!(m.values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    /// Big-endian files (NumPy's `>f4`, `>i4`, written on such machines or by `astype('>f4')`)
    /// were refused as "expected float32"; their values are the same numbers.
    #[test]
    fn big_endian_values_and_labels_read_as_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path().join("e.npy");
        let data: Vec<u8> = [1.5f32, -2.0, 3.25, 4.0]
            .iter()
            .flat_map(|x| x.to_be_bytes())
            .collect();
        let header = "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }";
        std::fs::write(&e, npy_bytes(header, &data)).unwrap();
        assert_eq!(read_matrix(&e).unwrap().values, vec![1.5, -2.0, 3.25, 4.0]);
        let l = dir.path().join("l.npy");
        let data: Vec<u8> = [7i32, -1].iter().flat_map(|x| x.to_be_bytes()).collect();
        let header = "{'descr': '>i4', 'fortran_order': False, 'shape': (2,), }";
        std::fs::write(&l, npy_bytes(header, &data)).unwrap();
        assert_eq!(read_labels(&l).unwrap(), vec![7, -1]);
        // Another type is still refused, by its own name.
        let header = "{'descr': '>c8', 'fortran_order': False, 'shape': (1, 1), }";
        std::fs::write(&e, npy_bytes(header, &[0; 8])).unwrap();
        let err = read_matrix(&e).unwrap_err().to_string();
        assert!(err.contains(">c8"), "{err}");
    }

    #[test]
    fn truncated_files_and_huge_shapes_are_named_not_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.npy");
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        std::fs::write(&path, npy_bytes(header, &f32_bytes(&[1.0; 5]))).unwrap();
        let e = read_matrix(&path).unwrap_err();
        assert!(
            matches!(&e, IoError::NpyTruncated { path: p, .. } if *p == path),
            "{e}"
        );
        assert!(e.to_string().contains("t.npy: truncated"), "{e}");
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4000000000, 4000000), }";
        std::fs::write(&path, npy_bytes(header, &[])).unwrap();
        assert!(matches!(
            read_matrix(&path),
            Err(IoError::NpyTruncated { .. })
        ));
    }

    #[test]
    fn non_finite_values_and_oversized_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path().join("e.npy");
        write_matrix(&e, 2, 2, &[1.0, 0.0, f32::NAN, 1.0]).unwrap();
        assert!(matches!(
            read_matrix(&e),
            Err(IoError::NpyNotFinite { row: 1, col: 0, .. })
        ));
        let l = dir.path().join("l.npy");
        let header = "{'descr': '<u8', 'fortran_order': False, 'shape': (1,), }";
        std::fs::write(&l, npy_bytes(header, &u64::MAX.to_le_bytes())).unwrap();
        assert!(matches!(
            read_labels(&l),
            Err(IoError::NpyLabel { index: 0, .. })
        ));
    }
}
