//! J_syn, the N-pair loss of anchors against their synthetic negatives (METHOD.md section 7).
//!
//! ```text
//! J_syn = 1/P sum_v [ CE(<z_v[a], m_v(a, n)>_n, a) + 0.003/4 * (|z_v|^2 / C + |m_v|^2 / C^2) ]
//! ```
//!
//! where candidate `m_v(a, a)` is replaced by the positive `z_{(v+1) % P}[a]`.

use burn::tensor::Tensor;

use super::cross_entropy::cross_entropy;
use super::npair::L2_WEIGHT;
use crate::method::graph::BatchLayout;

/// J_syn before its weight: for each view v, anchors `z_v` against their C candidates
/// `negatives_v(a, ·)` with the n == a candidate replaced by the positive `z_{(v+1)%P}[a]`;
/// cross-entropy towards that positive plus the L2 penalty; averaged over views.
pub fn synthetic_npair_loss(z: Tensor<2>, negatives: Tensor<2>, layout: BatchLayout) -> Tensor<1> {
    let (c, p) = (layout.classes, layout.per_class);
    let [_, d] = z.dims();
    let device = z.device();
    let views = z.reshape([p, c, d]);
    let negatives = negatives.reshape([p, c, c, d]);
    let diagonal = Tensor::<2>::eye(c, &device)
        .bool()
        .reshape([c, c, 1])
        .expand([c, c, d]);
    let labels: Vec<usize> = (0..c).collect();
    let mut total = Tensor::<1>::zeros([1], &device);
    for v in 0..p {
        let anchor = views.clone().narrow(0, v, 1).reshape([c, d]);
        let positive = views.clone().narrow(0, (v + 1) % p, 1).reshape([c, 1, d]);
        let candidates = negatives
            .clone()
            .narrow(0, v, 1)
            .reshape([c, c, d])
            .mask_where(diagonal.clone(), positive.expand([c, c, d]));
        let logits = (candidates.clone() * anchor.clone().reshape([c, 1, d]))
            .sum_dim(2)
            .reshape([c, c]);
        let l2 = anchor.square().sum().div_scalar(c as f64)
            + candidates.square().sum().div_scalar((c * c) as f64);
        total = total + cross_entropy(logits, &labels) + l2.mul_scalar(L2_WEIGHT);
    }
    total.div_scalar(p as f64)
}
