//! J_hard, how close the synthetic negatives come to their anchors (METHOD.md section 6).
//!
//! ```text
//! J_hard = 1/(P C C) sum_rows keep_r * (1 - cos(z_anchor(r), m_r))
//! ```

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::l2_normalize;
use crate::method::graph::BatchLayout;

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

crate::string_forms_from_value_enum!(HardnessMasking: "hardness masking");

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
