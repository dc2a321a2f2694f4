//! Cross-entropy with soft or integer targets: J_cls and J_gce (METHOD.md section 6), and the
//! inner term of both N-pair losses.
//!
//! ```text
//! CE(logits, t) = mean_i ( - sum_j t_ij * log_softmax(logits_i)_j )
//! ```

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};

/// One-hot targets `[rows, classes]` for integer labels.
pub fn one_hot(labels: &[usize], classes: usize, device: &Device) -> Tensor<2> {
    let mut values = vec![0.0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        values[i * classes + l] = 1.0;
    }
    Tensor::from_data(TensorData::new(values, [labels.len(), classes]), device)
}

/// Mean over rows of `-sum_j target_ij log_softmax(logits)_ij`; `target` rows may be soft.
pub fn soft_cross_entropy(logits: Tensor<2>, target: Tensor<2>) -> Tensor<1> {
    (log_softmax(logits, 1) * target).sum_dim(1).mean().neg()
}

/// Cross-entropy with integer labels (PyTorch's `CrossEntropyLoss`, mean reduction).
pub fn cross_entropy(logits: Tensor<2>, labels: &[usize]) -> Tensor<1> {
    let [_, classes] = logits.dims();
    let target = one_hot(labels, classes, &logits.device());
    soft_cross_entropy(logits, target)
}
