//! `gelu(linear(x))` with the bias added inside the GELU kernel, for the Flex backend.
//!
//! burn's `Linear` adds its bias as a separate broadcast operation, one more single-threaded
//! pass over the output, and its backward pass sums the gradient over the rows in another.
//! In the GNN the two largest activations (the node update's edge messages, `E x d`, and the
//! edge MLP's hidden layer, `E x 4d`) are Linear outputs that go straight into GELU, so here
//! the bias is added in the GELU loop and its gradient is summed in the GELU-derivative loop,
//! both on every core. The values are those of `gelu(x W + b)`: `x W + b` is rounded to f32
//! before GELU, as burn computes it; only the bias gradient's summation order differs (its
//! partial sums are f64).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::nn::Linear;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::autodiff::{backward, record};
use super::gelu::{gelu, gelu_derivative_f32, gelu_f32};
use super::{contiguous, from_vec, is_flex, rows_per_task, sum_in_order};

/// `gelu(linear.forward(x))` (exact GELU): the fused kernel on the CPU for f32 with a bias,
/// burn's Linear and our [`gelu`] otherwise.
///
/// # Shapes
/// - `x`: `[..., d_in]`
/// - output: `[..., d_out]`
pub fn linear_gelu<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    let bias = match &linear.bias {
        Some(bias) if D == 2 && is_flex(&x.device()) && x.dtype() == DType::F32 => bias.val(),
        _ => return gelu(linear.forward(x)),
    };
    let product = super::matmul_weight(x, linear.weight.val());
    Tensor::from_dispatch(<Dispatch as BiasGeluBackend>::bias_gelu(
        product.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// GELU of a bias broadcast over the rows, as a backend extension so that autodiff records
/// our backward kernel.
#[backend_extension(Flex, Autodiff)]
pub trait BiasGeluBackend: Backend {
    /// `gelu(x + bias)`, `bias` added along the last axis.
    fn bias_gelu(x: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The gradients of `x` and `bias` from the output's; not differentiable.
    fn bias_gelu_backward(
        x: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

impl BiasGeluBackend for Flex {
    fn bias_gelu(x: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (x, bias) = (contiguous(x), contiguous(bias));
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let b = bias.as_slice::<f32>().expect("contiguous f32");
        let block = rows_per_task(b.len()) * b.len();
        let mut out = Vec::<f32>::with_capacity(xs.len());
        out.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(block)
            .zip(xs.par_chunks(block))
            .for_each(|(dst, xs)| forward_rows(xs, b, dst));
        // SAFETY: every element was written by `forward_rows`.
        unsafe { out.set_len(xs.len()) };
        from_vec(out, &x)
    }

    fn bias_gelu_backward(
        x: FlexTensor,
        bias: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (x, bias, grad) = (contiguous(x), contiguous(bias), contiguous(grad));
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let b = bias.as_slice::<f32>().expect("contiguous f32");
        let gs = grad.as_slice::<f32>().expect("contiguous f32");
        let n = b.len();
        let block = rows_per_task(n) * n;
        let mut dx = Vec::<f32>::with_capacity(xs.len());
        let dbias = dx.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(block)
            .zip(xs.par_chunks(block))
            .zip(gs.par_chunks(block))
            .map(|((dst, xs), gs)| {
                let mut dbias = vec![0.0f64; n];
                backward_rows(xs, b, gs, dst, &mut dbias);
                dbias
            })
            .collect::<Vec<_>>();
        let dbias = sum_in_order(dbias, n);
        // SAFETY: every element was written by `backward_rows`.
        unsafe { dx.set_len(xs.len()) };
        let dbias = dbias.into_iter().map(|v| v as f32).collect();
        (from_vec(dx, &x), from_vec(dbias, &bias))
    }
}

impl<B: BiasGeluBackend, C: CheckpointStrategy> BiasGeluBackend for Autodiff<B, C> {
    fn bias_gelu(x: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct BiasGeluGrad;

        impl<B: BiasGeluBackend> Backward<B, 2> for BiasGeluGrad {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 2>(ops, grads, |(x, bias), grad, _| {
                    let (dx, dbias) = B::bias_gelu_backward(x, bias, grad);
                    [Some(dx), Some(dbias)]
                });
            }
        }

        record::<C, _, _, _>(
            BiasGeluGrad,
            [x, bias],
            |[x, bias]| B::bias_gelu(x, bias),
            |[x, bias], _| (x, bias),
        )
    }

    fn bias_gelu_backward(
        x: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dbias) = B::bias_gelu_backward(
            x.into_primitive(),
            bias.into_primitive(),
            grad.into_primitive(),
        );
        (
            FloatTensor::<Self>::new(dx),
            FloatTensor::<Self>::new(dbias),
        )
    }
}

#[inline(always)]
fn forward_rows_generic(xs: &[f32], b: &[f32], dst: &mut [MaybeUninit<f32>]) {
    for (dst, xs) in dst.chunks_mut(b.len()).zip(xs.chunks(b.len())) {
        for ((o, &x), &b) in dst.iter_mut().zip(xs).zip(b) {
            o.write(gelu_f32(x + b));
        }
    }
}

#[inline(always)]
fn backward_rows_generic(
    xs: &[f32],
    b: &[f32],
    gs: &[f32],
    dst: &mut [MaybeUninit<f32>],
    dbias: &mut [f64],
) {
    let n = b.len();
    for ((dst, xs), gs) in dst.chunks_mut(n).zip(xs.chunks(n)).zip(gs.chunks(n)) {
        // The row's derivatives first, then their f64 sums: in one loop the conversions to f64
        // set the vector width, and the derivative ran at half the lanes (4 of AVX2's 8).
        for (((o, &x), &b), &g) in dst.iter_mut().zip(xs).zip(b).zip(gs) {
            o.write(g * gelu_derivative_f32(x + b));
        }
        // SAFETY: every element of `dst` was written just above, and `MaybeUninit<f32>` has
        // the layout of `f32`.
        let row = unsafe { &*(dst as *const [MaybeUninit<f32>] as *const [f32]) };
        for (db, &d) in dbias.iter_mut().zip(row) {
            *db += f64::from(d);
        }
    }
}

simd_dispatch!(fn forward_rows(xs: &[f32], b: &[f32], dst: &mut [MaybeUninit<f32>]) => forward_rows_generic);
simd_dispatch!(
    fn backward_rows(
        xs: &[f32],
        b: &[f32],
        gs: &[f32],
        dst: &mut [MaybeUninit<f32>],
        dbias: &mut [f64],
    ) => backward_rows_generic
);

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution, Tolerance};

    use super::*;

    /// The signature of [`backward_rows`] and of its portable form.
    type Rows = fn(&[f32], &[f32], &[f32], &mut [MaybeUninit<f32>], &mut [f64]);

    /// The backward rows, in either build, give the bits of the plain one-loop form: each
    /// derivative, and each column's f64 sum over the rows in order.
    #[test]
    fn backward_rows_equal_the_one_loop_form_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (rows, n) in [(6, 2048), (3, 37), (2, 5)] {
            let mut random = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-6.0f32..6.0)).collect()
            };
            let (xs, gs, b) = (random(rows * n), random(rows * n), random(n));
            let mut want = vec![0u32; rows * n];
            let mut want_db = vec![0.125f64; n];
            for r in 0..rows {
                for j in 0..n {
                    let d = gs[r * n + j] * gelu_derivative_f32(xs[r * n + j] + b[j]);
                    want[r * n + j] = d.to_bits();
                    want_db[j] += f64::from(d);
                }
            }
            let run = |f: Rows| {
                let mut dst = vec![MaybeUninit::<f32>::uninit(); rows * n];
                let mut db = vec![0.125f64; n];
                f(&xs, &b, &gs, &mut dst, &mut db);
                // SAFETY: the rows write every element.
                let dst: Vec<u32> = dst
                    .into_iter()
                    .map(|x| unsafe { x.assume_init() }.to_bits())
                    .collect();
                (dst, db.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            };
            let want_db: Vec<u64> = want_db.iter().map(|x| x.to_bits()).collect();
            for (name, f) in [
                (
                    "dispatched",
                    backward_rows
                        as fn(&[f32], &[f32], &[f32], &mut [MaybeUninit<f32>], &mut [f64]),
                ),
                ("portable", backward_rows_generic),
            ] {
                let (dst, db) = run(f);
                assert_eq!(dst, want, "{name} derivatives, {rows} x {n}");
                assert_eq!(db, want_db, "{name} bias sums, {rows} x {n}");
            }
        }
    }

    #[test]
    fn matches_linear_then_gelu_on_values_and_every_gradient() {
        let dev = Device::flex().autodiff();
        dev.seed(5);
        for (rows, d_in, d_out) in [(300, 24, 40), (3, 5, 2048), (1, 1, 1)] {
            let weight = Tensor::<2>::random([d_in, d_out], Distribution::Normal(0.0, 1.0), &dev);
            let bias = Tensor::<1>::random([d_out], Distribution::Normal(0.0, 2.0), &dev);
            // Two modules with the same values: one backward pass each.
            let linear = || {
                let mut linear = LinearConfig::new(d_in, d_out).init(&dev);
                linear.weight = Param::from_tensor(weight.clone());
                linear.bias = Some(Param::from_tensor(bias.clone()));
                linear
            };
            let (ours_linear, theirs_linear) = (linear(), linear());
            let x = Tensor::<2>::random([rows, d_in], Distribution::Normal(0.0, 3.0), &dev);
            let w = Tensor::<2>::random([rows, d_out], Distribution::Normal(0.0, 1.0), &dev);
            let a = x.clone().require_grad();
            let b = x.require_grad();
            let ours = linear_gelu(&ours_linear, a.clone());
            let theirs = gelu(theirs_linear.forward(b.clone()));
            // Same kernel on the same f32 pre-activations: equal values.
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&theirs.clone().into_data(), Tolerance::rel_abs(0.0, 0.0));
            let ga = (ours * w.clone()).sum().backward();
            let gb = (theirs * w).sum().backward();
            let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
            a.grad(&ga)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&b.grad(&gb).unwrap().into_data(), tol);
            let grad = |l: &Linear, g: &burn::tensor::Gradients| {
                (
                    l.weight.grad(g).unwrap().into_data(),
                    l.bias.as_ref().unwrap().grad(g).unwrap().into_data(),
                )
            };
            let (wa, ba) = grad(&ours_linear, &ga);
            let (wb, bb) = grad(&theirs_linear, &gb);
            wa.assert_approx_eq::<f32>(&wb, tol);
            ba.assert_approx_eq::<f32>(&bb, tol);
        }
    }

    #[test]
    fn falls_back_without_bias_and_on_other_ranks() {
        let dev = Device::flex();
        let mut linear = LinearConfig::new(6, 7).init(&dev);
        let x = Tensor::<3>::random([2, 3, 6], Distribution::Normal(0.0, 2.0), &dev);
        let tol = Tolerance::<f32>::rel_abs(0.0, 0.0);
        linear_gelu(&linear, x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&gelu(linear.forward(x.clone())).into_data(), tol);
        linear.bias = None;
        let x2 = Tensor::<2>::random([4, 6], Distribution::Normal(0.0, 2.0), &dev);
        linear_gelu(&linear, x2.clone())
            .into_data()
            .assert_approx_eq::<f32>(&gelu(linear.forward(x2)).into_data(), tol);
    }
}
