//! LayerNorm over the last axis for burn's Flex backend: the forward pass and the backward
//! pass each one sweep over the rows, on every core.
//!
//! burn composes LayerNorm from nine element-wise and reduction operations (mean, centre,
//! square, mean, add, sqrt, divide, scale, shift) and its backward pass from about fifteen,
//! each a full pass over the tensor that allocates its result. Over the edge MLP's `E x 4d`
//! activations that made LayerNorm 2-3 times slower than PyTorch's fused kernel (BENCHMARKS.md,
//! "Where the head step's time goes"). Statistics are accumulated in f64, so the result is at
//! least as accurate as burn's f32 composition.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::nn::LayerNorm;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::autodiff::{backward, record};
use super::{
    contiguous, from_vec, is_flex, par_blocks, rows_per_task, sum_f64, sum_in_order, sum_pairs_f64,
    sum_sq_dev_f64,
};

/// `norm` applied to `x` with epsilon `eps` (burn's `LayerNorm` keeps its epsilon private, so
/// the caller passes the one it configured): our kernel on the CPU for f32 with a bias, burn's
/// `LayerNorm::forward` otherwise.
pub fn layer_norm<const D: usize>(norm: &LayerNorm, eps: f64, x: Tensor<D>) -> Tensor<D> {
    let beta = match &norm.beta {
        Some(beta) if is_flex(&x.device()) && x.dtype() == DType::F32 => beta.val(),
        _ => return norm.forward(x),
    };
    Tensor::from_dispatch(<Dispatch as LayerNormBackend>::fused_layer_norm(
        x.into_dispatch(),
        norm.gamma.val().into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

/// LayerNorm as a backend extension, so that autodiff records our backward kernel.
#[backend_extension(Flex, Autodiff)]
pub trait LayerNormBackend: Backend {
    /// `(x - mean) / sqrt(var + eps) * gamma + beta` over the last axis (biased variance).
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// The gradients of `x`, `gamma` and `beta` from the output's; not differentiable.
    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl LayerNormBackend for Flex {
    fn fused_layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let g = gamma.as_slice::<f32>().expect("contiguous f32");
        let b = beta.as_slice::<f32>().expect("contiguous f32");
        let n = g.len();
        let block = rows_per_task(n) * n;
        let out = par_blocks(xs.len(), block, |i, out| {
            forward_rows(&xs[i * block..i * block + out.len()], g, b, eps, out)
        });
        from_vec(out, &x)
    }

    fn fused_layer_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        grad: FlexTensor,
        eps: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, gamma, grad) = (contiguous(x), contiguous(gamma), contiguous(grad));
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let g = gamma.as_slice::<f32>().expect("contiguous f32");
        let gs = grad.as_slice::<f32>().expect("contiguous f32");
        let n = g.len();
        let block = rows_per_task(n) * n;
        let zeros = || (vec![0.0f64; n], vec![0.0f64; n]);
        // Every element is written below: no zero-fill first.
        let mut dx = Vec::with_capacity(xs.len());
        let (dgamma, dbeta) = dx.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(block)
            .zip(xs.par_chunks(block))
            .zip(gs.par_chunks(block))
            .map(|((dx, xs), gs)| {
                let (mut dgamma, mut dbeta) = zeros();
                backward_rows(xs, g, gs, eps, dx, &mut dgamma, &mut dbeta);
                (dgamma, dbeta)
            })
            .unzip::<_, _, Vec<_>, Vec<_>>();
        let (dgamma, dbeta) = (sum_in_order(dgamma, n), sum_in_order(dbeta, n));
        // SAFETY: the chunks cover the first `xs.len()` elements, each row written in full.
        unsafe { dx.set_len(xs.len()) };
        let narrow = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        (
            from_vec(dx, &x),
            from_vec(narrow(dgamma), &gamma),
            from_vec(narrow(dbeta), &gamma),
        )
    }
}

impl<B: LayerNormBackend, C: CheckpointStrategy> LayerNormBackend for Autodiff<B, C> {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormGrad;

        impl<B: LayerNormBackend> Backward<B, 3> for LayerNormGrad {
            type State = (FloatTensor<B>, FloatTensor<B>, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 3>(ops, grads, |(x, gamma, eps), grad, _| {
                    let (dx, dgamma, dbeta) = B::fused_layer_norm_backward(x, gamma, grad, eps);
                    [Some(dx), Some(dgamma), Some(dbeta)]
                });
            }
        }

        record::<C, _, _, _>(
            LayerNormGrad,
            [x, gamma, beta],
            |[x, gamma, beta]| B::fused_layer_norm(x, gamma, beta, eps),
            |[x, gamma, _], _| (x, gamma, eps),
        )
    }

    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dgamma, dbeta) = B::fused_layer_norm_backward(
            x.into_primitive(),
            gamma.into_primitive(),
            grad.into_primitive(),
            eps,
        );
        (
            FloatTensor::<Self>::new(dx),
            FloatTensor::<Self>::new(dgamma),
            FloatTensor::<Self>::new(dbeta),
        )
    }
}

/// LayerNorm of whole rows of `xs` (`gamma.len()` wide) into `out`.
#[inline(always)]
fn forward_rows_generic(
    xs: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    out: &mut [MaybeUninit<f32>],
) {
    let n = gamma.len();
    for (o, x) in out.chunks_mut(n).zip(xs.chunks(n)) {
        let (mean, rstd) = row_stats(x, eps);
        for j in 0..n {
            o[j].write((x[j] - mean) * rstd * gamma[j] + beta[j]);
        }
    }
}

/// The input gradient of whole rows of `xs` into `dx`, and the rows' contributions added to
/// the f64 sums `dgamma` and `dbeta`, row by row.
#[inline(always)]
fn backward_rows_generic(
    xs: &[f32],
    gamma: &[f32],
    gs: &[f32],
    eps: f64,
    dx: &mut [MaybeUninit<f32>],
    dgamma: &mut [f64],
    dbeta: &mut [f64],
) {
    let n = gamma.len();
    for ((dx, x), go) in dx.chunks_mut(n).zip(xs.chunks(n)).zip(gs.chunks(n)) {
        let (mean, rstd) = row_stats(x, eps);
        // dx = rstd * (g*gamma - mean(g*gamma) - xhat * mean(g*gamma*xhat)).
        let (a, c) = sum_pairs_f64((x, go, gamma), |x, go, g| {
            let gg = go * g;
            (gg, gg * ((x - mean) * rstd))
        });
        for j in 0..n {
            let xhat = (x[j] - mean) * rstd;
            dgamma[j] += f64::from(go[j] * xhat);
            dbeta[j] += f64::from(go[j]);
        }
        let (a, c) = ((a / n as f64) as f32, (c / n as f64) as f32);
        for j in 0..n {
            let xhat = (x[j] - mean) * rstd;
            dx[j].write(rstd * (go[j] * gamma[j] - a - xhat * c));
        }
    }
}

// Compiled for AVX2 + FMA and AVX-512 as well, chosen at run time: the same operations in the
// same order (no contraction into fused multiply-adds), so every build gives the same bits.
simd_dispatch!(
    fn forward_rows(
        xs: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f64,
        out: &mut [MaybeUninit<f32>],
    ) => forward_rows_generic
);
simd_dispatch!(
    fn backward_rows(
        xs: &[f32],
        gamma: &[f32],
        gs: &[f32],
        eps: f64,
        dx: &mut [MaybeUninit<f32>],
        dgamma: &mut [f64],
        dbeta: &mut [f64],
    ) => backward_rows_generic
);

/// `(mean, 1 / sqrt(var + eps))` of one row, two passes with f64 sums.
#[inline(always)]
fn row_stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = sum_f64(x) / n;
    let var = sum_sq_dev_f64(x, mean) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Device, Distribution, Tolerance};

    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect()
    }

    /// `MaybeUninit` slots that were all written, as plain values.
    fn written(v: Vec<MaybeUninit<f32>>) -> Vec<u32> {
        // SAFETY: the callers pass buffers whose every element the kernel wrote.
        v.into_iter()
            .map(|x| unsafe { x.assume_init() }.to_bits())
            .collect()
    }

    /// The rows compiled for this CPU's vector unit (AVX2 or AVX-512 where it has them) give
    /// the portable build's bits: the guarantee that lets one binary choose at run time.
    #[test]
    fn dispatched_rows_equal_the_portable_rows_bit_for_bit() {
        for (rows, n) in [(5, 2048), (3, 37), (4, 8), (2, 3)] {
            let (xs, gs) = (random(rows * n, 1), random(rows * n, 2));
            let (gamma, beta) = (random(n, 3), random(n, 4));
            let mut a = vec![MaybeUninit::uninit(); rows * n];
            let mut b = vec![MaybeUninit::uninit(); rows * n];
            forward_rows(&xs, &gamma, &beta, 1e-5, &mut a);
            forward_rows_generic(&xs, &gamma, &beta, 1e-5, &mut b);
            assert_eq!(written(a), written(b), "forward, {rows} x {n}");

            let mut a = vec![MaybeUninit::uninit(); rows * n];
            let mut b = vec![MaybeUninit::uninit(); rows * n];
            let (mut ga, mut ba) = (vec![0.5f64; n], vec![-0.25f64; n]);
            let (mut gb, mut bb) = (ga.clone(), ba.clone());
            backward_rows(&xs, &gamma, &gs, 1e-5, &mut a, &mut ga, &mut ba);
            backward_rows_generic(&xs, &gamma, &gs, 1e-5, &mut b, &mut gb, &mut bb);
            assert_eq!(written(a), written(b), "input gradient, {rows} x {n}");
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ga), bits(&gb), "weight gradient, {rows} x {n}");
            assert_eq!(bits(&ba), bits(&bb), "bias gradient, {rows} x {n}");
        }
    }

    #[test]
    fn matches_burns_layer_norm_on_values_and_every_gradient() {
        let dev = Device::flex().autodiff();
        dev.seed(3);
        for (rows, n) in [(37, 64), (5, 2048), (1, 3)] {
            // Non-trivial scale and shift, so that their gradients differ from the defaults'.
            let gamma = Tensor::<1>::random([n], Distribution::Normal(1.0, 0.5), &dev);
            let beta = Tensor::<1>::random([n], Distribution::Normal(0.0, 0.5), &dev);
            // Two modules with the same values: one backward pass each.
            let norm = || {
                let mut norm = LayerNormConfig::new(n).init(&dev);
                norm.gamma = Param::from_tensor(gamma.clone());
                norm.beta = Some(Param::from_tensor(beta.clone()));
                norm
            };
            let (ours_norm, theirs_norm) = (norm(), norm());
            let x = Tensor::<2>::random([rows, n], Distribution::Normal(1.5, 3.0), &dev);
            let w = Tensor::<2>::random([rows, n], Distribution::Normal(0.0, 1.0), &dev);
            let a = x.clone().require_grad();
            let b = x.require_grad();
            let ours = layer_norm(&ours_norm, 1e-5, a.clone());
            let theirs = theirs_norm.forward(b.clone());
            let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&theirs.clone().into_data(), tol);
            let ga = (ours * w.clone()).sum().backward();
            let gb = (theirs * w).sum().backward();
            a.grad(&ga)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&b.grad(&gb).unwrap().into_data(), tol);
            let gamma_a = ours_norm.gamma.grad(&ga).unwrap();
            let gamma_b = theirs_norm.gamma.grad(&gb).unwrap();
            gamma_a
                .into_data()
                .assert_approx_eq::<f32>(&gamma_b.into_data(), tol);
            let beta_a = ours_norm.beta.as_ref().unwrap().grad(&ga).unwrap();
            let beta_b = theirs_norm.beta.as_ref().unwrap().grad(&gb).unwrap();
            beta_a
                .into_data()
                .assert_approx_eq::<f32>(&beta_b.into_data(), tol);
        }
    }

    #[test]
    fn runs_without_autodiff_on_views_and_rank_three() {
        let dev = Device::flex();
        let norm = LayerNormConfig::new(40).init(&dev);
        let x = Tensor::<2>::random([40, 70], Distribution::Normal(0.0, 2.0), &dev).transpose();
        layer_norm(&norm, 1e-5, x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&norm.forward(x).into_data(), Tolerance::rel_abs(1e-5, 1e-5));
        let x3 = Tensor::<3>::random([3, 5, 40], Distribution::Normal(0.0, 2.0), &dev);
        layer_norm(&norm, 1e-5, x3.clone())
            .into_data()
            .assert_approx_eq::<f32>(
                &norm.forward(x3).into_data(),
                Tolerance::rel_abs(1e-5, 1e-5),
            );
    }
}
