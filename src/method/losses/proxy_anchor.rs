//! Proxy-Anchor loss (Kim et al., CVPR 2020): the base loss of the paper's headline numbers.
//!
//! One learnable proxy per training class. With cosine similarities `s(x, p)` between
//! L2-normalised embeddings and proxies,
//!
//! ```text
//! J = 1/|P+| Σ_{p∈P+} log(1 + Σ_{x∈X_p+} exp(-α (s(x,p) - δ)))
//!   + 1/|P|  Σ_{p∈P}  log(1 + Σ_{x∈X_p-} exp( α (s(x,p) + δ)))
//! ```
//!
//! where `P+` are the proxies with a positive in the batch and `X_p+`/`X_p-` the embeddings of
//! the proxy's class and of every other class.
//!
//! How GCA-HNG's synthetic negatives enter (the release wires only N-pair, so this is ours, and
//! documented in the README): the synthetic row made from anchor slot `a` towards negative slot
//! `n` (`n != a`) carries the label of slot `n`, as it does in the generator's classification
//! loss. `J_syn` is this same loss over the synthetic rows alone: each is a negative of every
//! other proxy — above all of the anchor's, which it was made to lie close to — and a positive
//! of its own class's proxy, which keeps it on the class side the classifier checks. Rows with
//! `n == a` are positives in the N-pair layout and are left out.

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::io::state_dict::{Layout, TorchNamed, TorchParam, push};
use crate::method::graph::BatchLayout;
use crate::method::losses::{l2_normalize, one_hot};

/// Configuration of a [`ProxyAnchor`] loss.
#[derive(Config, Debug)]
pub struct ProxyAnchorConfig {
    /// Number of training classes (one proxy each).
    pub num_classes: usize,
    /// Embedding width d.
    pub embedding_dim: usize,
    /// Margin δ. Default: 0.1 (the Proxy-Anchor paper's).
    #[config(default = 0.1)]
    pub margin: f64,
    /// Scale (the Proxy-Anchor paper's α, not GCA-HNG's hardness α). Default: 32 (the paper's).
    #[config(default = 32.0)]
    pub scale: f64,
}

/// The proxies and the loss's constants.
#[derive(Module, Debug)]
pub struct ProxyAnchor {
    /// `[num_classes, d]`.
    pub proxies: Param<Tensor<2>>,
    pub margin: f64,
    pub scale: f64,
}

impl ProxyAnchorConfig {
    /// Proxies drawn as the Proxy-Anchor code draws them (`kaiming_normal_`, mode `fan_out`:
    /// standard deviation `sqrt(2 / num_classes)`).
    pub fn init(&self, device: &Device) -> ProxyAnchor {
        let std = (2.0 / self.num_classes as f64).sqrt();
        ProxyAnchor {
            proxies: Initializer::Normal { mean: 0.0, std }
                .init([self.num_classes, self.embedding_dim], device),
            margin: self.margin,
            scale: self.scale,
        }
    }
}

impl ProxyAnchor {
    /// The loss of embeddings `z` (`[rows, d]`, not normalised) with labels in `0..num_classes`.
    pub fn forward(&self, z: Tensor<2>, labels: &[usize]) -> Tensor<1> {
        let [classes, _] = self.proxies.dims();
        let device = z.device();
        let cos = l2_normalize(z).matmul(l2_normalize(self.proxies.val()).transpose());
        let positive = one_hot(labels, classes, &device);
        let negative = positive.clone().neg().add_scalar(1.0);
        let pos_sum = ((cos.clone().sub_scalar(self.margin))
            .mul_scalar(-self.scale)
            .exp()
            * positive)
            .sum_dim(0);
        let neg_sum =
            ((cos.add_scalar(self.margin)).mul_scalar(self.scale).exp() * negative).sum_dim(0);
        let mut present = vec![false; classes];
        for &l in labels {
            present[l] = true;
        }
        let with_positives = present.iter().filter(|&&p| p).count().max(1);
        let present: Vec<f32> = present.iter().map(|&p| p as u8 as f32).collect();
        let present = Tensor::<2>::from_data(TensorData::new(present, [1, classes]), &device);
        let pos_term = (pos_sum.log1p() * present)
            .sum()
            .div_scalar(with_positives as f64);
        let neg_term = neg_sum.log1p().sum().div_scalar(classes as f64);
        pos_term + neg_term
    }

    /// `J_syn` with Proxy-Anchor: the loss over the synthetic negatives (`[P*C*C, d]`, row
    /// `v*C*C + a*C + n`), each labelled with its negative slot's class; rows with `n == a`
    /// are left out.
    pub fn synthetic(
        &self,
        negatives: Tensor<2>,
        labels: &[usize],
        layout: BatchLayout,
    ) -> Tensor<1> {
        let (c, p) = (layout.classes, layout.per_class);
        let mut rows = Vec::with_capacity(p * c * (c - 1));
        let mut row_labels = Vec::with_capacity(rows.capacity());
        for v in 0..p {
            for a in 0..c {
                for n in (0..c).filter(|&n| n != a) {
                    rows.push((v * c * c + a * c + n) as i64);
                    row_labels.push(labels[n]);
                }
            }
        }
        let device = negatives.device();
        let count = rows.len();
        let index = Tensor::<1, Int>::from_data(TensorData::new(rows, [count]), &device);
        self.forward(negatives.select(0, index), &row_labels)
    }
}

impl TorchNamed for ProxyAnchor {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        push(out, prefix, "proxies", &self.proxies, Layout::Plain);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss written out with plain loops, in f64.
    fn reference(z: &[[f64; 2]], proxies: &[[f64; 2]], labels: &[usize], m: f64, a: f64) -> f64 {
        let norm = |v: &[f64; 2]| {
            let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
            [v[0] / n, v[1] / n]
        };
        let k = proxies.len();
        let (mut pos, mut neg, mut with_pos) = (0.0, 0.0, 0);
        for (c, p) in proxies.iter().enumerate() {
            let p = norm(p);
            let (mut sp, mut sn, mut any) = (0.0, 0.0, false);
            for (x, &l) in z.iter().zip(labels) {
                let x = norm(x);
                let s = x[0] * p[0] + x[1] * p[1];
                if l == c {
                    sp += (-a * (s - m)).exp();
                    any = true;
                } else {
                    sn += (a * (s + m)).exp();
                }
            }
            if any {
                pos += (1.0 + sp).ln();
                with_pos += 1;
            }
            neg += (1.0 + sn).ln();
        }
        pos / with_pos as f64 + neg / k as f64
    }

    #[test]
    fn matches_the_formula_including_proxies_without_positives() {
        let device = Device::flex();
        let z = [[1.0, 0.2], [0.3, -1.0], [-0.5, 0.5], [0.9, 0.1]];
        let proxies = [[1.0, 0.0], [0.0, -1.0], [-1.0, 1.0]];
        let labels = [0, 1, 1, 0];
        let flat = |v: &[[f64; 2]]| v.iter().flatten().map(|&x| x as f32).collect::<Vec<_>>();
        let loss = ProxyAnchor {
            proxies: Param::from_tensor(Tensor::from_data(
                TensorData::new(flat(&proxies), [3, 2]),
                &device,
            )),
            margin: 0.1,
            scale: 32.0,
        };
        let zt = Tensor::<2>::from_data(TensorData::new(flat(&z), [4, 2]), &device);
        let ours = crate::train::step::scalar(&loss.forward(zt, &labels));
        let want = reference(&z, &proxies, &labels, 0.1, 32.0);
        assert!((ours - want).abs() < 1e-4 * want.abs(), "{ours} vs {want}");
    }

    #[test]
    fn synthetic_rows_skip_the_anchor_class_and_take_the_negative_label() {
        let device = Device::flex();
        let layout = BatchLayout::new(3, 2);
        let labels = [4, 7, 1, 4, 7, 1];
        let loss = ProxyAnchorConfig::new(8, 2).init(&device);
        // Row k holds the point (k, 1): with distinct directions every row matters.
        let values: Vec<f32> = (0..18).flat_map(|k| [k as f32, 1.0]).collect();
        let negatives = Tensor::<2>::from_data(TensorData::new(values.clone(), [18, 2]), &device);
        let ours = crate::train::step::scalar(&loss.synthetic(negatives, &labels, layout));
        let mut kept = Vec::new();
        let mut kept_labels = Vec::new();
        for v in 0..2 {
            for a in 0..3 {
                for (n, &label) in labels.iter().take(3).enumerate() {
                    if n != a {
                        let k = v * 9 + a * 3 + n;
                        kept.extend_from_slice(&values[2 * k..2 * k + 2]);
                        kept_labels.push(label);
                    }
                }
            }
        }
        let rows = kept_labels.len();
        let direct = loss.forward(
            Tensor::from_data(TensorData::new(kept, [rows, 2]), &device),
            &kept_labels,
        );
        assert_eq!(rows, 12);
        assert!((ours - crate::train::step::scalar(&direct)).abs() < 1e-6);
    }
}
