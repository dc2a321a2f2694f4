//! The one place where a batch becomes a burn tensor.

use burn::tensor::{Device, Tensor, TensorData};

use super::loader::HostBatch;

/// `[rows, 3, size, size]` on `device`.
pub fn images_tensor(batch: &HostBatch, device: &Device) -> Tensor<4> {
    let s = batch.size as usize;
    Tensor::<4>::from_data(
        TensorData::new(batch.images.clone(), [batch.rows(), 3, s, s]),
        device,
    )
}
