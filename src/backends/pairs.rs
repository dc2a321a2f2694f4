//! The edge update's attention over the two endpoints of every edge, for the Flex backend.
//!
//! Each edge `(r, c)` of the complete graph attends over two tokens, its source `r` and its
//! target `c` (METHOD.md section 5). Composed from burn operations that took a broadcast
//! multiplication and a reduction over all `E x d` edge features for the scores, two
//! broadcast multiplications and an addition for the mixture, and about as many passes again
//! for their gradients, each on the calling thread. Three kernels do it here, on every core:
//!
//! - [`pair_dots`]: `s[r, c] = (x[r, c] · f[r], x[r, c] · f[c])`;
//! - [`pair_mix`]: `u[r, c] = w[r, c, 0] v[r] + w[r, c, 1] v[c]`;
//! - `pair_sums`: `out[i] = sum_c g[i, c, 0] x[i, c] + sum_r g[r, i, 1] x[r, i]`, the gradient
//!   of either with respect to its per-node operand.
//!
//! The gradients close over the same three: for the dots, `dx = pair_mix(g, f)` and
//! `df = pair_sums(g, x)`; for the mixture, `dw = pair_dots(du, v)` and `dv = pair_sums(w, du)`.
//! The mixture is burn's arithmetic exactly (two products and a sum, in f32); the dot
//! products and sums are f32 in a fixed order that does not depend on the threads.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::autodiff::{backward, record};
use super::{contiguous, from_vec_shaped, is_flex, par_blocks};

/// Per edge `(r, c)`, its features' dot products with the per-node vectors of its source and
/// of its target: `out[r, c] = (x[r, c] · f[r], x[r, c] · f[c])`.
///
/// # Shapes
/// - `x`: `[N, N, d]` (edge `(r, c)` at `[r, c]`)
/// - `f`: `[N, d]`
/// - output: `[N, N, 2]`
pub fn pair_dots(x: Tensor<3>, f: Tensor<2>) -> Tensor<3> {
    if applies(&x) {
        return Tensor::from_dispatch(<Dispatch as PairBackend>::pair_dots(
            x.into_dispatch(),
            f.into_dispatch(),
        ));
    }
    let src = x.clone().matmul(f.clone().unsqueeze_dim::<3>(2));
    let dst = (x * f.unsqueeze_dim::<3>(0)).sum_dim(2);
    Tensor::cat(vec![src, dst], 2)
}

/// Per edge `(r, c)`, the mixture of the per-node vectors of its source and target with the
/// edge's two weights: `out[r, c] = w[r, c, 0] v[r] + w[r, c, 1] v[c]`.
///
/// # Shapes
/// - `w`: `[N, N, 2]`
/// - `v`: `[N, d]`
/// - output: `[N, N, d]`
pub fn pair_mix(w: Tensor<3>, v: Tensor<2>) -> Tensor<3> {
    if applies(&w) {
        return Tensor::from_dispatch(<Dispatch as PairBackend>::pair_mix(
            w.into_dispatch(),
            v.into_dispatch(),
        ));
    }
    w.clone().narrow(2, 0, 1) * v.clone().unsqueeze_dim::<3>(1)
        + w.narrow(2, 1, 1) * v.unsqueeze_dim::<3>(0)
}

fn applies(t: &Tensor<3>) -> bool {
    t.dtype() == DType::F32 && is_flex(&t.device())
}

/// The three kernels as a backend extension, so that autodiff records our backward passes.
#[backend_extension(Flex, Autodiff)]
pub trait PairBackend: Backend {
    /// See [`pair_dots`].
    fn pair_dots(x: FloatTensor<Self>, f: FloatTensor<Self>) -> FloatTensor<Self>;
    /// See [`pair_mix`].
    fn pair_mix(w: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `out[i] = sum_c g[i, c, 0] x[i, c] + sum_r g[r, i, 1] x[r, i]` (`g` `[N, N, 2]`, `x`
    /// `[N, N, d]`, output `[N, d]`); not differentiable.
    fn pair_sums(g: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `(N, d)` of an `[N, N, d]` tensor.
fn nd(t: &FlexTensor) -> (usize, usize) {
    let shape = t.shape();
    (shape[0], shape[2])
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

impl PairBackend for Flex {
    fn pair_dots(x: FlexTensor, f: FlexTensor) -> FlexTensor {
        let (x, f) = (contiguous(x), contiguous(f));
        let ((n, d), xs, fs) = (nd(&x), values(&x), values(&f));
        let out = par_blocks(n * n * 2, n * 2, |r, dst| {
            dots_row(&xs[r * n * d..(r + 1) * n * d], fs, r, d, dst)
        });
        from_vec_shaped(out, Shape::new([n, n, 2]))
    }

    fn pair_mix(w: FlexTensor, v: FlexTensor) -> FlexTensor {
        let (w, v) = (contiguous(w), contiguous(v));
        let (n, d) = (w.shape()[0], v.shape()[1]);
        let (ws, vs) = (values(&w), values(&v));
        let out = par_blocks(n * n * d, n * d, |r, dst| {
            mix_row(&ws[r * n * 2..(r + 1) * n * 2], vs, r, d, dst)
        });
        from_vec_shaped(out, Shape::new([n, n, d]))
    }

    fn pair_sums(g: FlexTensor, x: FlexTensor) -> FlexTensor {
        let (g, x) = (contiguous(g), contiguous(x));
        let ((n, d), gs, xs) = (nd(&x), values(&g), values(&x));
        let mut out = vec![0.0f32; n * d];
        out.par_chunks_mut(d.max(1))
            .enumerate()
            .for_each(|(i, acc)| sums_node(gs, xs, n, i, acc));
        from_vec_shaped(out, Shape::new([n, d]))
    }
}

/// Lanes of the dot products: independent running sums in vector registers.
const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Row `r` of [`pair_dots`]: `x` holds the `N` edges `(r, c)`.
#[inline(always)]
fn dots_row_generic(x: &[f32], f: &[f32], r: usize, d: usize, dst: &mut [MaybeUninit<f32>]) {
    let own = &f[r * d..(r + 1) * d];
    for ((xc, fc), out) in x
        .chunks_exact(d)
        .zip(f.chunks_exact(d))
        .zip(dst.chunks_exact_mut(2))
    {
        out[0].write(dot(xc, own));
        out[1].write(dot(xc, fc));
    }
}

/// Row `r` of [`pair_mix`]: `w` holds the weights of the `N` edges `(r, c)`.
#[inline(always)]
fn mix_row_generic(w: &[f32], v: &[f32], r: usize, d: usize, dst: &mut [MaybeUninit<f32>]) {
    let own = &v[r * d..(r + 1) * d];
    for ((wc, vc), out) in w
        .chunks_exact(2)
        .zip(v.chunks_exact(d))
        .zip(dst.chunks_exact_mut(d))
    {
        let (a, b) = (wc[0], wc[1]);
        for ((o, &s), &t) in out.iter_mut().zip(own).zip(vc) {
            o.write(a * s + b * t);
        }
    }
}

/// Node `i` of `pair_sums`, added into `acc` (zeros on entry): the edges leaving `i` in
/// order, then the edges entering it.
#[inline(always)]
fn sums_node_generic(g: &[f32], x: &[f32], n: usize, i: usize, acc: &mut [f32]) {
    let d = acc.len();
    let row = &x[i * n * d..(i + 1) * n * d];
    for (xc, gc) in row.chunks_exact(d).zip(g[i * n * 2..].chunks_exact(2)) {
        let a = gc[0];
        acc.iter_mut().zip(xc).for_each(|(s, &x)| *s += a * x);
    }
    for r in 0..n {
        let b = g[(r * n + i) * 2 + 1];
        let xr = &x[(r * n + i) * d..(r * n + i + 1) * d];
        acc.iter_mut().zip(xr).for_each(|(s, &x)| *s += b * x);
    }
}

simd_dispatch!(fn dots_row(x: &[f32], f: &[f32], r: usize, d: usize, dst: &mut [MaybeUninit<f32>]) => dots_row_generic);
simd_dispatch!(fn mix_row(w: &[f32], v: &[f32], r: usize, d: usize, dst: &mut [MaybeUninit<f32>]) => mix_row_generic);
simd_dispatch!(fn sums_node(g: &[f32], x: &[f32], n: usize, i: usize, acc: &mut [f32]) => sums_node_generic);

impl<B: PairBackend, C: CheckpointStrategy> PairBackend for Autodiff<B, C> {
    fn pair_dots(x: FloatTensor<Self>, f: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DotsGrad;

        impl<B: PairBackend> Backward<B, 2> for DotsGrad {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 2>(ops, grads, |(x, f), g, [nx, nf]| {
                    [
                        nx.then(|| B::pair_mix(g.clone(), f)),
                        nf.then(|| B::pair_sums(g, x)),
                    ]
                });
            }
        }

        record::<C, _, _, _>(
            DotsGrad,
            [x, f],
            |[x, f]| B::pair_dots(x, f),
            |[x, f], _| (x, f),
        )
    }

    fn pair_mix(w: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MixGrad;

        impl<B: PairBackend> Backward<B, 2> for MixGrad {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 2>(ops, grads, |(w, v), du, [nw, nv]| {
                    [
                        nw.then(|| B::pair_dots(du.clone(), v)),
                        nv.then(|| B::pair_sums(w, du)),
                    ]
                });
            }
        }

        record::<C, _, _, _>(
            MixGrad,
            [w, v],
            |[w, v]| B::pair_mix(w, v),
            |[w, v], _| (w, v),
        )
    }

    fn pair_sums(g: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        FloatTensor::<Self>::new(B::pair_sums(g.into_primitive(), x.into_primitive()))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tolerance};

    use super::*;

    /// [`pair_dots`] and [`pair_mix`] as burn operations (the code they replaced).
    fn composed_dots(x: Tensor<3>, f: Tensor<2>) -> Tensor<3> {
        let src = x.clone().matmul(f.clone().unsqueeze_dim::<3>(2));
        let dst = (x * f.unsqueeze_dim::<3>(0)).sum_dim(2);
        Tensor::cat(vec![src, dst], 2)
    }

    fn composed_mix(w: Tensor<3>, v: Tensor<2>) -> Tensor<3> {
        w.clone().narrow(2, 0, 1) * v.clone().unsqueeze_dim::<3>(1)
            + w.narrow(2, 1, 1) * v.unsqueeze_dim::<3>(0)
    }

    #[test]
    fn match_burns_composition_on_values_and_every_gradient() {
        let dev = Device::flex().autodiff();
        let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
        // d below, at and above the lane count; one node; a graph as wide as a batch.
        for (n, d) in [(5, 7), (3, 16), (1, 33), (27, 40)] {
            let x = Tensor::<3>::random([n, n, d], Distribution::Normal(0.0, 1.0), &dev);
            let f = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &dev);
            let w = Tensor::<3>::random([n, n, 2], Distribution::Uniform(-1.0, 1.0), &dev);
            let up_dots = Tensor::<3>::random([n, n, 2], Distribution::Normal(0.0, 1.0), &dev);
            let up_mix = Tensor::<3>::random([n, n, d], Distribution::Normal(0.0, 1.0), &dev);
            let leaves = || {
                (
                    x.clone().require_grad(),
                    f.clone().require_grad(),
                    w.clone().require_grad(),
                )
            };
            let ((xa, fa, wa), (xb, fb, wb)) = (leaves(), leaves());
            let ours = (
                pair_dots(xa.clone(), fa.clone()),
                pair_mix(wa.clone(), fa.clone()),
            );
            let theirs = (
                composed_dots(xb.clone(), fb.clone()),
                composed_mix(wb.clone(), fb.clone()),
            );
            ours.0
                .clone()
                .into_data()
                .assert_approx_eq::<f32>(&theirs.0.clone().into_data(), tol);
            // The mixture is the same f32 arithmetic.
            ours.1.clone().into_data().assert_approx_eq::<f32>(
                &theirs.1.clone().into_data(),
                Tolerance::rel_abs(0.0, 0.0),
            );
            let loss = |(dots, mix): (Tensor<3>, Tensor<3>)| {
                (dots * up_dots.clone()).sum() + (mix * up_mix.clone()).sum()
            };
            let (ga, gb) = (loss(ours).backward(), loss(theirs).backward());
            for (a, b) in [(xa, xb), (wa, wb)] {
                a.grad(&ga)
                    .unwrap()
                    .into_data()
                    .assert_approx_eq::<f32>(&b.grad(&gb).unwrap().into_data(), tol);
            }
            // `f` feeds both: the dots' and the mixture's gradients add up.
            fa.grad(&ga)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&fb.grad(&gb).unwrap().into_data(), tol);
        }
    }

    #[test]
    fn sums_do_not_depend_on_the_threads() {
        let dev = Device::flex();
        let g = Tensor::<3>::random([9, 9, 2], Distribution::Normal(0.0, 1.0), &dev);
        let x = Tensor::<3>::random([9, 9, 37], Distribution::Normal(0.0, 1.0), &dev);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (g, x) = (g.clone().into_dispatch(), x.clone().into_dispatch());
                let t: Tensor<2> =
                    Tensor::from_dispatch(<Dispatch as PairBackend>::pair_sums(g, x));
                t.into_data().try_to_vec::<f32>().unwrap()
            })
        };
        assert_eq!(run(1), run(3));
    }
}
