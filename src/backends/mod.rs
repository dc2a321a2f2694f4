//! Our own CPU kernels for burn's Flex backend, reached through burn's backend-extension
//! mechanism: burn-flex runs element-wise operations on one thread with libm's scalar
//! special functions, which left a core idle for much of a training step. Other devices keep
//! burn's own operations.

pub mod batch_norm;
pub mod depthwise;
pub mod gelu;
pub mod layer_norm;
pub mod linear_gelu;
pub mod subnormals;

pub use gelu::gelu;
pub use layer_norm::layer_norm;
pub use linear_gelu::linear_gelu;
pub use subnormals::flush_subnormals_on_cpu_threads;

use burn::backend::DispatchDevice;
use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::Device;
use burn::tensor::{Bytes, DType, Shape};

/// Whether tensors on `device` run on burn's Flex backend (with or without autodiff), where
/// the kernels of this module apply.
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    )
}

/// Element count of one rayon task: large enough that scheduling costs little, small enough
/// that the tensors of a step (tens of thousands to millions of elements) split over every core.
pub(crate) const CHUNK: usize = 1 << 14;

/// Rows per rayon task: about `CHUNK` elements, at least one row.
pub(crate) fn rows_per_task(row: usize) -> usize {
    (CHUNK / row.max(1)).max(1)
}

/// `t` with a contiguous layout, copied only when it is a strided view.
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// A contiguous f32 tensor of `values` in the shape of `like`.
pub(crate) fn from_vec(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    from_vec_shaped(values, like.layout().shape().clone())
}

/// A contiguous f32 tensor of `values` in `shape`.
pub(crate) fn from_vec_shaped(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}
