//! J_m, the N-pair loss as released (METHOD.md section 3).
//!
//! ```text
//! J_m = 1/(P-1) sum_{v=1}^{P-1} CE(z_0 z_v^T, T) + 0.003/4 * |z|^2 / C
//! ```
//!
//! with `T` the row-normalised same-label matrix of the anchors (view 0).

use burn::tensor::{Tensor, TensorData};

use super::cross_entropy::soft_cross_entropy;
use crate::method::graph::BatchLayout;

/// The N-pair loss's L2 penalty on embeddings: `0.003 * 0.25`.
pub(super) const L2_WEIGHT: f64 = 0.003 * 0.25;

/// J_m, the N-pair loss as released. `z` is view-major `[P*C, d]`; `labels` its labels.
/// Anchors are view 0; every other view is matched against them.
pub fn npair_loss(z: Tensor<2>, labels: &[usize], layout: BatchLayout) -> Tensor<1> {
    let (c, p) = (layout.classes, layout.per_class);
    let [_, d] = z.dims();
    let device = z.device();
    let views = z.reshape([p, c, d]);
    let anchors = views.clone().narrow(0, 0, 1).reshape([c, d]);
    // Row-normalised "same label" matrix of the anchors' labels.
    let anchor_labels = &labels[..c];
    let mut target = vec![0.0f32; c * c];
    for i in 0..c {
        let same: Vec<usize> = (0..c)
            .filter(|&j| anchor_labels[j] == anchor_labels[i])
            .collect();
        for &j in &same {
            target[i * c + j] = 1.0 / same.len() as f32;
        }
    }
    let target = Tensor::<2>::from_data(TensorData::new(target, [c, c]), &device);
    let mut ce = Tensor::<1>::zeros([1], &device);
    for v in 1..p {
        let others = views.clone().narrow(0, v, 1).reshape([c, d]);
        let logits = anchors.clone().matmul(others.transpose());
        ce = ce + soft_cross_entropy(logits, target.clone());
    }
    let l2 = views.square().sum().div_scalar(c as f64);
    ce.div_scalar((p.max(2) - 1) as f64) + l2.mul_scalar(L2_WEIGHT)
}
