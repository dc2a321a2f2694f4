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

fn open(path: &Path) -> Result<npyz::NpyFile<BufReader<File>>, IoError> {
    let file = File::open(path).map_err(|source| IoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    npyz::NpyFile::new(BufReader::new(file)).map_err(|source| IoError::NotNpy {
        path: path.to_path_buf(),
        source,
    })
}

fn data(path: &Path) -> impl Fn(std::io::Error) -> IoError + '_ {
    move |source| IoError::NpyData {
        path: path.to_path_buf(),
        source,
    }
}

fn type_str(npy: &npyz::NpyFile<BufReader<File>>) -> String {
    match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => format!("{other:?}"),
    }
}

/// Reads `[n, d]` float32 or float64 embeddings.
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
    let kind = type_str(&npy);
    let values: Vec<f32> = match kind.as_str() {
        "<f4" => npy.into_vec::<f32>().map_err(data(path))?,
        "<f8" => npy
            .into_vec::<f64>()
            .map_err(data(path))?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        "<f2" => npy
            .into_vec::<half::f16>()
            .map_err(data(path))?
            .into_iter()
            .map(f32::from)
            .collect(),
        other => {
            return Err(IoError::NpyDtype {
                path: path.to_path_buf(),
                expected: "float32 or float64 values",
                found: other.to_string(),
            });
        }
    };
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
    let labels: Vec<i64> = match kind.as_str() {
        "<i8" => npy.into_vec::<i64>().map_err(data(path))?,
        "<i4" => npy
            .into_vec::<i32>()
            .map_err(data(path))?
            .into_iter()
            .map(i64::from)
            .collect(),
        "<i2" => npy
            .into_vec::<i16>()
            .map_err(data(path))?
            .into_iter()
            .map(i64::from)
            .collect(),
        "|i1" => npy
            .into_vec::<i8>()
            .map_err(data(path))?
            .into_iter()
            .map(i64::from)
            .collect(),
        "<u8" => npy
            .into_vec::<u64>()
            .map_err(data(path))?
            .into_iter()
            .map(|v| v as i64)
            .collect(),
        "<u4" => npy
            .into_vec::<u32>()
            .map_err(data(path))?
            .into_iter()
            .map(i64::from)
            .collect(),
        "<u2" => npy
            .into_vec::<u16>()
            .map_err(data(path))?
            .into_iter()
            .map(i64::from)
            .collect(),
        "|u1" => npy
            .into_vec::<u8>()
            .map_err(data(path))?
            .into_iter()
            .map(i64::from)
            .collect(),
        other => {
            return Err(IoError::NpyDtype {
                path: path.to_path_buf(),
                expected: "integer labels",
                found: other.to_string(),
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
}
