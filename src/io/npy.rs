//! Reading and writing `.npy` arrays (NumPy's format) for embeddings and labels.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result, bail};
use npyz::WriterBuilder;

/// A 2-D float array read from a `.npy` file.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

fn open(path: &Path) -> Result<npyz::NpyFile<BufReader<File>>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    npyz::NpyFile::new(BufReader::new(file))
        .with_context(|| format!("{} is not a .npy file", path.display()))
}

fn type_str(npy: &npyz::NpyFile<BufReader<File>>) -> String {
    match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => format!("{other:?}"),
    }
}

/// Reads `[n, d]` float32 or float64 embeddings.
pub fn read_matrix(path: &Path) -> Result<Matrix> {
    let npy = open(path)?;
    let shape = npy.shape().to_vec();
    if shape.len() != 2 {
        bail!(
            "{}: expected a 2-D array [n, d], found shape {shape:?}",
            path.display()
        );
    }
    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
    let kind = type_str(&npy);
    let values: Vec<f32> = match kind.as_str() {
        "<f4" => npy.into_vec::<f32>()?,
        "<f8" => npy
            .into_vec::<f64>()?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        "<f2" => npy
            .into_vec::<half::f16>()
            .map(|v| v.into_iter().map(f32::from).collect())
            .with_context(|| format!("{}: cannot read float16 data", path.display()))?,
        other => bail!(
            "{}: expected float32 or float64 values, found dtype {other}",
            path.display()
        ),
    };
    Ok(Matrix { rows, cols, values })
}

/// Reads a 1-D array of integer labels (any signed or unsigned integer dtype).
pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    let npy = open(path)?;
    let shape = npy.shape().to_vec();
    if shape.len() != 1 && !(shape.len() == 2 && shape[1] == 1) {
        bail!(
            "{}: expected a 1-D array of labels, found shape {shape:?}",
            path.display()
        );
    }
    let kind = type_str(&npy);
    let labels: Vec<i64> = match kind.as_str() {
        "<i8" => npy.into_vec::<i64>()?,
        "<i4" => npy.into_vec::<i32>()?.into_iter().map(i64::from).collect(),
        "<i2" => npy.into_vec::<i16>()?.into_iter().map(i64::from).collect(),
        "|i1" => npy.into_vec::<i8>()?.into_iter().map(i64::from).collect(),
        "<u8" => npy
            .into_vec::<u64>()?
            .into_iter()
            .map(|v| v as i64)
            .collect(),
        "<u4" => npy.into_vec::<u32>()?.into_iter().map(i64::from).collect(),
        "<u2" => npy.into_vec::<u16>()?.into_iter().map(i64::from).collect(),
        "|u1" => npy.into_vec::<u8>()?.into_iter().map(i64::from).collect(),
        other => bail!(
            "{}: expected integer labels, found dtype {other}",
            path.display()
        ),
    };
    Ok(labels)
}

/// Writes `[rows, cols]` float32 values.
pub fn write_matrix(path: &Path, rows: usize, cols: usize, values: &[f32]) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = npyz::WriteOptions::<f32>::new()
        .default_dtype()
        .shape(&[rows as u64, cols as u64])
        .writer(std::io::BufWriter::new(file))
        .begin_nd()?;
    writer.extend(values.iter().copied())?;
    writer.finish()?;
    Ok(())
}

/// Writes 1-D int64 labels.
pub fn write_labels(path: &Path, labels: &[i64]) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = npyz::WriteOptions::<i64>::new()
        .default_dtype()
        .shape(&[labels.len() as u64])
        .writer(std::io::BufWriter::new(file))
        .begin_nd()?;
    writer.extend(labels.iter().copied())?;
    writer.finish()?;
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
        assert!(read_matrix(&l).unwrap_err().to_string().contains("l.npy"));
        assert!(read_labels(&e).unwrap_err().to_string().contains("e.npy"));
        let junk = dir.path().join("junk.npy");
        std::fs::write(&junk, b"nope").unwrap();
        assert!(format!("{:#}", read_matrix(&junk).unwrap_err()).contains("junk.npy"));
    }
}
