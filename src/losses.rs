//! The losses of GCA-HNG (METHOD.md sections 3, 6 and 7).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::graph::BatchLayout;

/// The N-pair loss's L2 penalty on embeddings: `0.003 * 0.25`.
const L2_WEIGHT: f64 = 0.003 * 0.25;

/// Which rows of J_hard are zeroed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HardnessMasking {
    /// The rows whose negative slot is the anchor's own class (n == a): the evident intent,
    /// since those rows are positives, not negatives. Our default.
    #[default]
    SameClass,
    /// What the release computes: it views the P*C*C vector as a C x N matrix and zeroes the
    /// entries (i, j) with j % C == i, which equals `same-class` only when P == 1. Needed to
    /// reproduce the release's numbers exactly.
    Release,
}

/// The metric loss the synthetic negatives are added to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseLoss {
    /// N-pair, as released.
    Npair,
    /// Proxy-Anchor (margin 0.1, alpha 32): the setting of the paper's headline numbers
    /// (see [`crate::proxy_anchor`] for how the synthetic negatives enter it).
    ProxyAnchor,
}

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

/// J_div before its 0.01 factor: `1 - sqrt(sum_e |ω_e - ω̄_source(e)|^2 / E)`, low when
/// coefficients vary across the edges of a node.
pub fn diversity_loss(coeff: Tensor<2>, nodes: usize) -> Tensor<1> {
    let [e, d] = coeff.dims();
    let per_source = coeff.reshape([nodes, nodes, d]);
    let mean = per_source.clone().mean_dim(1);
    let spread = (per_source - mean)
        .square()
        .sum()
        .div_scalar(e as f64)
        .sqrt();
    spread.neg().add_scalar(1.0)
}

/// L2 normalisation as the release writes it: `x / sqrt(sum x^2 + 1e-12)`.
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).add_scalar(1e-12).sqrt();
    x / norm
}

/// `[P*C*C]` row weights of J_hard: 1 for rows that count, 0 for masked ones.
pub fn hardness_row_mask(layout: BatchLayout, masking: HardnessMasking) -> Vec<f32> {
    let (c, p) = (layout.classes, layout.per_class);
    let n = c * p;
    let rows = p * c * c;
    let mut keep = vec![1.0f32; rows];
    match masking {
        HardnessMasking::SameClass => {
            for v in 0..p {
                for a in 0..c {
                    keep[v * c * c + a * c + a] = 0.0;
                }
            }
        }
        HardnessMasking::Release => {
            // Entries (i, j) of a C x N matrix with j % C == i, flattened as i*N + j.
            for i in 0..c {
                for j in (0..n).filter(|j| j % c == i) {
                    keep[i * n + j] = 0.0;
                }
            }
        }
    }
    keep
}

/// J_hard: mean over all P*C*C rows of `1 - cos(anchor, negative)`, masked rows counted as 0.
/// `z` is detached by the caller.
pub fn hardness_loss(
    z: Tensor<2>,
    negatives: Tensor<2>,
    layout: BatchLayout,
    masking: HardnessMasking,
) -> Tensor<1> {
    let (c, p) = (layout.classes, layout.per_class);
    let [_, d] = z.dims();
    let device = z.device();
    let anchors = z
        .reshape([p, c, 1, d])
        .expand([p, c, c, d])
        .reshape([p * c * c, d]);
    let a = l2_normalize(anchors);
    let m = l2_normalize(negatives);
    let dot = (a.clone() * m.clone()).sum_dim(1);
    let norms = (a.square().sum_dim(1) * m.square().sum_dim(1))
        .sqrt()
        .clamp_min(1e-8);
    let cosine = (dot / norms).reshape([p * c * c]);
    let keep = hardness_row_mask(layout, masking);
    let keep = Tensor::<1>::from_data(TensorData::new(keep, [p * c * c]), &device);
    (cosine.neg().add_scalar(1.0) * keep).mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeroed(keep: &[f32], c: usize) -> Vec<(usize, usize, usize)> {
        keep.iter()
            .enumerate()
            .filter(|(_, k)| **k == 0.0)
            .map(|(i, _)| (i / (c * c), (i / c) % c, i % c))
            .collect()
    }

    #[test]
    fn release_masking_is_the_c_by_n_view() {
        let layout = BatchLayout::new(4, 3);
        let z = zeroed(&hardness_row_mask(layout, HardnessMasking::Release), 4);
        // METHOD.md's example for C=4, P=3.
        assert_eq!(
            &z[..5],
            &[(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 1), (1, 0, 1)]
        );
        assert_eq!(z.len(), 12);
    }

    #[test]
    fn same_class_masking_zeroes_the_positives() {
        let layout = BatchLayout::new(4, 3);
        let z = zeroed(&hardness_row_mask(layout, HardnessMasking::SameClass), 4);
        let expected: Vec<_> = (0..3)
            .flat_map(|v| (0..4).map(move |a| (v, a, a)))
            .collect();
        assert_eq!(z, expected);
    }

    #[test]
    fn maskings_agree_when_one_view() {
        let layout = BatchLayout::new(5, 1);
        assert_eq!(
            hardness_row_mask(layout, HardnessMasking::Release),
            hardness_row_mask(layout, HardnessMasking::SameClass)
        );
    }

    #[test]
    fn hardness_loss_counts_masked_rows_as_zero() {
        let device = Device::flex();
        let layout = BatchLayout::new(2, 2);
        // Anchors along x; every negative along y: 1 - cos = 1 on every row.
        let z = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0], [4, 2]),
            &device,
        );
        let negatives = Tensor::<2>::from_data(
            TensorData::new(
                (0..8).flat_map(|_| [0.0f32, 1.0]).collect::<Vec<_>>(),
                [8, 2],
            ),
            &device,
        );
        let loss = hardness_loss(z, negatives, layout, HardnessMasking::SameClass);
        let v: Vec<f32> = loss.into_data().try_to_vec().unwrap();
        // 8 rows, 4 of them (n == a) masked.
        assert!((v[0] - 0.5).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_k() {
        let device = Device::flex();
        let logits = Tensor::<2>::zeros([3, 4], &device);
        let v: Vec<f32> = cross_entropy(logits, &[0, 1, 3])
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!((v[0] as f64 - 4f64.ln()).abs() < 1e-6);
    }
}
