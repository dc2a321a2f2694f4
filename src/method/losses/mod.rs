//! The losses of GCA-HNG (METHOD.md sections 3, 6 and 7).
//!
//! One loss per file, each with its formula: [`npair`] (J_m), [`synthetic_npair`] (J_syn),
//! [`proxy_anchor`] (the alternative base loss), [`hardness`] (J_hard), [`diversity`] (J_div)
//! and [`cross_entropy`] (J_cls and J_gce).

pub mod cross_entropy;
pub mod diversity;
pub mod hardness;
pub mod npair;
pub mod proxy_anchor;
pub mod synthetic_npair;

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

pub use cross_entropy::{cross_entropy, one_hot, soft_cross_entropy};
pub use diversity::diversity_loss;
pub use hardness::{HardnessMasking, hardness_loss, hardness_row_mask};
pub use npair::npair_loss;
pub use synthetic_npair::synthetic_npair_loss;

/// The metric loss the synthetic negatives are added to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BaseLoss {
    /// N-pair, as released.
    Npair,
    /// Proxy-Anchor (margin 0.1, alpha 32): the setting of the paper's headline numbers
    /// (see [`crate::method::losses::proxy_anchor`] for how the synthetic negatives enter it).
    ProxyAnchor,
}

crate::string_forms_from_value_enum!(BaseLoss: "base loss");

/// L2 normalisation as the release writes it: `x / sqrt(sum x^2 + 1e-12)`.
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).add_scalar(1e-12).sqrt();
    x / norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::graph::BatchLayout;
    use burn::tensor::{Device, TensorData};

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
