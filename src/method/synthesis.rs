//! Channel-adaptive hard negative synthesis (METHOD.md section 6).

use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::method::graph::BatchLayout;

/// Where the mixing weights ρ come from: one draw per (anchor view, negative view > 0), in the
/// order anchor view major. Injectable so that a dump's recorded draws can be replayed.
pub trait MixSource {
    /// The next ρ in [0, 1).
    fn next_rho(&mut self) -> f64;
}

/// Uniform draws from a seeded generator.
pub struct SeededMix(StdRng);

impl SeededMix {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
}

impl MixSource for SeededMix {
    fn next_rho(&mut self) -> f64 {
        self.0.random::<f64>()
    }
}

/// Replays recorded draws, remembering how many were used.
pub struct ReplayMix {
    draws: Vec<f64>,
    used: usize,
}

impl ReplayMix {
    pub fn new(draws: Vec<f64>) -> Self {
        Self { draws, used: 0 }
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn remaining(&self) -> usize {
        self.draws.len() - self.used
    }
}

impl MixSource for ReplayMix {
    fn next_rho(&mut self) -> f64 {
        // Callers check `remaining()` against `draws_per_call` first; running past the record
        // is a bug in the caller, not bad input.
        let rho = self.draws[self.used];
        self.used += 1;
        rho
    }
}

/// Number of ρ draws one synthesis call makes: P * (P - 1).
pub fn draws_per_call(layout: BatchLayout) -> usize {
    layout.per_class * (layout.per_class - 1)
}

/// Adaptive hardness `λ = exp(-alpha / J̄_m)`: small while the metric loss is high, towards 1
/// as the embedder learns.
pub fn hardness(alpha: f64, mean_metric_loss: f64) -> f64 {
    (-alpha / mean_metric_loss).exp()
}

/// The synthetic negatives of one batch.
#[derive(Clone, Debug)]
pub struct Synthesis {
    /// `[P*C*C, d]`: row `v*C*C + a*C + n` is the negative for anchor (view v, slot a) made
    /// from slot n, mixed over all negative views.
    pub negatives: Tensor<2>,
    /// The running mix after each negative view, `[P, C, 1, C, d]` each: assembled into one
    /// tensor only when asked for ([`all_negatives`](Self::all_negatives)), since training
    /// never reads it and the copy is a pass over `P` times the negatives, twice a step.
    history: Vec<Tensor<5>>,
}

impl Synthesis {
    /// `[P*P*C*C, d]`: row `((v*P + u)*C + a)*C + n`, the running mix after negative view u
    /// (the release appends each view's tensor and then mixes into it in place, so what it
    /// records is the mix, not the unmixed view).
    pub fn all_negatives(&self) -> Tensor<2> {
        let [p, c, _, _, d] = self.history[0].dims();
        let views = self.history.len();
        Tensor::cat(self.history.clone(), 2)
            .swap_dims(1, 2)
            .reshape([p * views * c * c, d])
    }
}

/// Synthesises hard negatives from embeddings `z` `[N, d]` (view-major) and edge coefficients
/// `[N*N, d]` with hardness `lambda`.
pub fn synthesize(
    z: Tensor<2>,
    coeff: Tensor<2>,
    layout: BatchLayout,
    lambda: f64,
    mix: &mut dyn MixSource,
) -> Synthesis {
    let (c, p) = (layout.classes, layout.per_class);
    let [n, d] = z.dims();
    assert_eq!(n, c * p, "batch does not match the layout");
    let device = z.device();

    let views = z.reshape([p, c, d]);
    // Positive of anchor view v is view (v + 1) % P.
    let positives = if p > 1 {
        Tensor::cat(
            vec![
                views.clone().narrow(0, 1, p - 1),
                views.clone().narrow(0, 0, 1),
            ],
            0,
        )
    } else {
        views.clone()
    };
    // Axes: [v, a, u, n, d].
    let anchor = views.clone().reshape([p, c, 1, 1, d]);
    let negative = views.reshape([1, 1, p, c, d]);
    let positive = positives.reshape([p, c, 1, 1, d]);

    // PyTorch's pairwise_distance adds 1e-6 to the difference.
    let dist = |x: Tensor<5>| x.add_scalar(1e-6).square().sum_dim(4).sqrt();
    let d_pos = dist(anchor.clone() - positive); // [P, C, 1, 1, 1]
    let d_neg = dist(anchor.clone() - negative.clone()); // [P, C, P, C, 1]

    let w = coeff.reshape([p, c, p, c, d]).mul_scalar(lambda);
    let ratio = (d_pos.clone() + (d_neg.clone() - d_pos.clone()) * w) / d_neg.clone();
    let shape = [p, c, p, c, d];
    let pulled = anchor.clone() + (negative.clone() - anchor) * ratio;
    // A negative already closer than the positive is hard enough as it is.
    let already_hard = d_pos.greater_equal(d_neg).expand(shape);
    let generated = pulled.mask_where(already_hard, negative.expand(shape));

    // Mix over the negative views: m_0 = g(0); m_u = g(u) + ρ (m_{u-1} - g(u)).
    let mut rho = vec![0.0f32; p * p];
    for v in 0..p {
        for u in 1..p {
            rho[v * p + u] = mix.next_rho() as f32;
        }
    }
    let mut running = generated.clone().narrow(2, 0, 1); // [P, C, 1, C, d]
    let mut history = vec![running.clone()];
    for u in 1..p {
        let g = generated.clone().narrow(2, u, 1);
        let r: Vec<f32> = (0..p).map(|v| rho[v * p + u]).collect();
        let r = Tensor::<5>::from_data(TensorData::new(r, [p, 1, 1, 1, 1]), &device);
        running = g.clone() + (running - g) * r;
        history.push(running.clone());
    }
    Synthesis {
        negatives: running.reshape([p * c * c, d]),
        history,
    }
}

/// A `[rows, cols]` float tensor from host values.
pub fn host_matrix(values: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(t: Tensor<2>) -> Vec<Vec<f32>> {
        let [_, d] = t.dims();
        let v: Vec<f32> = t.into_data().try_to_vec().unwrap();
        v.chunks(d).map(|c| c.to_vec()).collect()
    }

    struct Fixed(f64);
    impl MixSource for Fixed {
        fn next_rho(&mut self) -> f64 {
            self.0
        }
    }

    #[test]
    fn pulls_easy_negatives_and_keeps_hard_ones() {
        let device = Device::flex();
        let layout = BatchLayout::new(2, 2);
        // View 0: slots at (0,0) and (4,0); view 1: (1,0) and (0.5,0).
        // Anchor (v0, a0) = (0,0), positive (1,0): d+ ~ 1.
        // Anchor (v1, a1) = (0.5,0), positive (4,0): d+ ~ 3.5, and the negative (1,0) of
        // view 1 slot 0 is closer (d- ~ 0.5): already hard, kept as it is.
        let z = host_matrix(vec![0.0, 0.0, 4.0, 0.0, 1.0, 0.0, 0.5, 0.0], 4, 2, &device);
        let coeff = Tensor::<2>::full([16, 2], 0.5, &device);
        // ρ = 1: the mix keeps the first negative view only.
        let out = synthesize(z, coeff, layout, 1.0, &mut Fixed(1.0));
        let neg = rows(out.negatives);
        // (v0, a0, n1): A=(0,0), N=(4,0): d+=1+, d-=4+; r=(d+ + (d- - d+)/2)/d- = 2.5/4.
        let dp = ((1.0f64 - 0.0) - 1e-6).abs();
        let dn = (4.0f64 - 1e-6).abs();
        let dp = ((1e-6f64).powi(2) + dp.powi(2)).sqrt();
        let dn = ((1e-6f64).powi(2) + dn.powi(2)).sqrt();
        let r = (dp + (dn - dp) * 0.5) / dn;
        assert!((neg[1][0] as f64 - 4.0 * r).abs() < 1e-5, "{neg:?}");
        // (v1, a1, n0) from negative view 0 (slot 0 at (0,0)): d- = 0.5 < d+ = 3.5: kept.
        // Row v*C*C + a*C + n = 4 + 2 + 0.
        assert!(neg[6][0].abs() < 1e-6, "{neg:?}");
    }

    #[test]
    fn mixes_views_with_rho() {
        let device = Device::flex();
        let layout = BatchLayout::new(2, 2);
        let z = host_matrix(vec![0.0, 0.0, 4.0, 0.0, 10.0, 0.0, 8.0, 0.0], 4, 2, &device);
        let coeff = Tensor::<2>::full([16, 2], 1.0, &device);
        let a = synthesize(z.clone(), coeff.clone(), layout, 1.0, &mut Fixed(0.0));
        let b = synthesize(z.clone(), coeff.clone(), layout, 1.0, &mut Fixed(1.0));
        let h = synthesize(z, coeff, layout, 1.0, &mut Fixed(0.25));
        let (a, b, h) = (rows(a.negatives), rows(b.negatives), rows(h.negatives));
        for i in 0..a.len() {
            let expected = a[i][0] + 0.25 * (b[i][0] - a[i][0]);
            assert!((h[i][0] - expected).abs() < 1e-4, "row {i}");
        }
        assert_eq!(draws_per_call(layout), 2);
    }

    /// `all_negatives` holds the running mix after each view, view-major, and its last
    /// view's block is the final negatives.
    #[test]
    fn all_negatives_records_the_mix_after_each_view() {
        let device = Device::flex();
        let layout = BatchLayout::new(2, 3);
        let z = host_matrix((0..12).map(|v| v as f32).collect(), 6, 2, &device);
        let coeff = Tensor::<2>::full([36, 2], 0.5, &device);
        let out = synthesize(z, coeff, layout, 1.0, &mut Fixed(0.25));
        let (p, c) = (3, 2);
        let all = rows(out.all_negatives());
        let negatives = rows(out.negatives.clone());
        assert_eq!(all.len(), p * p * c * c);
        for v in 0..p {
            for k in 0..c * c {
                assert_eq!(all[(v * p + p - 1) * c * c + k], negatives[v * c * c + k]);
            }
            // The first view's block is unmixed, so it differs from the last one's.
            assert_ne!(all[v * p * c * c], all[(v * p + p - 1) * c * c]);
        }
    }

    #[test]
    fn hardness_grows_as_the_loss_falls() {
        assert!(hardness(5.0, 1e6) > 0.99999);
        assert!((hardness(5.0, 2.5) - (-2f64).exp()).abs() < 1e-12);
    }
}
