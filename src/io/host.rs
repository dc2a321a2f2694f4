//! Tensors on the host: the one way values leave the device ([`host_values`],
//! [`HostTensor::from_tensor`]), come back ([`HostTensor::to_tensor`]), and are decoded from
//! the bytes of a weight file ([`decode`]).

use super::WeightsError;
use burn::tensor::{Device, Tensor, TensorData};
use pytorch_reader::DType;

/// A tensor on the host, in PyTorch layout. Values are kept as f64 so that integer buffers and
/// float64 records survive a round trip exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// A tensor's values, row-major, as f32 whatever its element type on the device.
pub fn host_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    data_values(t.into_data())
}

fn data_values(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .try_into_vec()
        .expect("converted tensor data is f32")
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }

    pub fn from_tensor<const D: usize>(t: Tensor<D>) -> Self {
        Self::from_tensor_data(t.into_data())
    }

    fn from_tensor_data(data: TensorData) -> Self {
        let shape = data.shape().to_vec();
        let values = data_values(data);
        Self::new(shape, values.into_iter().map(f64::from).collect())
    }

    /// The tensor on `device`, if it has `D` axes.
    pub fn to_tensor<const D: usize>(&self, device: &Device) -> Result<Tensor<D>, WeightsError> {
        if self.shape.len() != D {
            return Err(WeightsError::Rank {
                rank: D,
                shape: self.shape.clone(),
            });
        }
        Ok(Tensor::from_data(
            TensorData::new(self.to_f32(), self.shape.clone()),
            device,
        ))
    }

    /// Swaps the two axes of a matrix.
    pub fn transposed(&self) -> Self {
        assert_eq!(self.shape.len(), 2, "only matrices can be transposed");
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut out = vec![0.0; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = self.data[r * cols + c];
            }
        }
        Self::new(vec![cols, rows], out)
    }
}

/// The element type of a safetensors tensor in the terms [`decode`] reads.
pub fn safetensors_dtype(dtype: safetensors::Dtype) -> Result<DType, WeightsError> {
    use safetensors::Dtype as S;
    Ok(match dtype {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::I8 => DType::I8,
        S::U64 => DType::U64,
        S::U32 => DType::U32,
        S::U16 => DType::U16,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        other => {
            return Err(WeightsError::UnsupportedDtype {
                dtype: format!("{other:?}"),
            });
        }
    })
}

/// The byte order of raw values handed to [`decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteOrder {
    /// As stored in a safetensors file.
    Little,
    /// As `pytorch-reader` hands values over, converted from the file's little-endian.
    Native,
}

/// The values of `raw`, stored as `dtype`, widened to f64 (which holds every one of these
/// types exactly, but 64-bit integers beyond 2^53).
pub fn decode(dtype: DType, raw: &[u8], order: ByteOrder) -> Result<Vec<f64>, WeightsError> {
    let swap = order == ByteOrder::Native && cfg!(target_endian = "big");
    let each = |n: usize, f: &dyn Fn(&[u8]) -> f64| -> Result<Vec<f64>, WeightsError> {
        if !raw.len().is_multiple_of(n) {
            return Err(WeightsError::Ragged {
                bytes: raw.len(),
                width: n,
            });
        }
        Ok(raw
            .chunks_exact(n)
            .map(|b| {
                if swap {
                    let mut le = b.to_vec();
                    le.reverse();
                    f(&le)
                } else {
                    f(b)
                }
            })
            .collect())
    };
    fn le<const N: usize>(b: &[u8]) -> [u8; N] {
        b.try_into().expect("chunk has N bytes")
    }
    match dtype {
        DType::F64 => each(8, &|b| f64::from_le_bytes(le(b))),
        DType::F32 => each(4, &|b| f32::from_le_bytes(le(b)) as f64),
        DType::F16 => each(2, &|b| half::f16::from_le_bytes(le(b)).to_f64()),
        DType::BF16 => each(2, &|b| half::bf16::from_le_bytes(le(b)).to_f64()),
        DType::I64 => each(8, &|b| i64::from_le_bytes(le(b)) as f64),
        DType::I32 => each(4, &|b| i32::from_le_bytes(le(b)) as f64),
        DType::I16 => each(2, &|b| i16::from_le_bytes(le(b)) as f64),
        DType::I8 => each(1, &|b| b[0] as i8 as f64),
        DType::U64 => each(8, &|b| u64::from_le_bytes(le(b)) as f64),
        DType::U32 => each(4, &|b| u32::from_le_bytes(le(b)) as f64),
        DType::U16 => each(2, &|b| u16::from_le_bytes(le(b)) as f64),
        DType::U8 => each(1, &|b| b[0] as f64),
        DType::Bool => each(1, &|b| f64::from(u8::from(b[0] != 0))),
    }
}
