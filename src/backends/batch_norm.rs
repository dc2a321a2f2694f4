//! BatchNorm and the activation after it as one kernel for burn's Flex backend, forward and
//! backward, on every core, with the batch statistics (training) or the running ones.
//!
//! burn composes BatchNorm from broadcast subtractions, divisions, products and sums, and an
//! activation from more passes (ReLU6 is two ReLUs and a difference); each is a separate pass
//! over the tensor that allocates its result, and most run on one thread. In the demo's
//! training step those element-wise passes were about a fifth of the time (BENCHMARKS.md,
//! "CPU speed, fourth round"). Here the forward pass is one sweep (two more for batch
//! statistics) and the backward pass one (two in training). Per-channel sums are f64, summed
//! in a fixed order, so the result does not depend on the thread count.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::activation::relu;
use burn::tensor::{DType, Shape, Tensor};
use rayon::prelude::*;

use super::autodiff::backward;
use super::{
    CHUNK, contiguous, from_vec, from_vec_shaped, is_flex, rows_per_task, sum_f64, sum_pairs_f64,
    sum_sq_dev_f64,
};

/// The activation applied right after a BatchNorm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)` (MobileNet's and EfficientNet-Lite's).
    Relu6,
}

impl Activation {
    /// The activation through burn's own operations, for devices and dtypes the kernel does
    /// not cover. ReLU6 is `relu(x) - relu(x - 6)`: the same values as a clamp (`x - 6` and
    /// `x - (x - 6)` are exact in f32 for `|x| < 2^24`), and two ReLUs instead of `clamp`,
    /// which burn's autodiff runs as two compare-and-`mask_fill` passes each way. Its gradient
    /// at exactly 6 is 1 where PyTorch's (and the kernel's) is 0.
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Identity => x,
            Self::Relu => relu(x),
            Self::Relu6 => relu(x.clone()) - relu(x - 6.0),
        }
    }
}

// The kernels are compiled once per activation (`A` is `Activation as u8`), so that the
// activation's branch leaves the inner loops and they vectorise.
const IDENTITY: u8 = Activation::Identity as u8;
const RELU: u8 = Activation::Relu as u8;
const RELU6: u8 = Activation::Relu6 as u8;

/// The activation's value; NaN passes through, as in burn's and PyTorch's ReLU.
#[inline(always)]
fn act_value<const A: u8>(v: f32) -> f32 {
    match A {
        RELU if v <= 0.0 => 0.0,
        RELU6 if v <= 0.0 => 0.0,
        RELU6 if v >= 6.0 => 6.0,
        _ => v,
    }
}

/// Whether the gradient passes, read from the output as PyTorch's `threshold_backward` and
/// `hardtanh_backward` do: `y > 0` for ReLU, `0 < y < 6` for ReLU6.
#[inline(always)]
fn act_passes<const A: u8>(y: f32) -> bool {
    match A {
        RELU => y > 0.0,
        RELU6 => (y > 0.0) & (y < 6.0),
        _ => true,
    }
}

/// `g` where the activation passes the gradient ([`act_passes`]), else `+0.0`: a select by bit
/// mask, which the compiler turns into vector compares and ANDs (written as a branch, it kept
/// the summing loops scalar, one compare and jump per element).
#[inline(always)]
fn gate<const A: u8>(y: f32, g: f32) -> f32 {
    let keep = 0u32.wrapping_sub(u32::from(act_passes::<A>(y)));
    f32::from_bits(g.to_bits() & keep)
}

/// Calls `$f::<A>($args)` with the activation's code as `A`.
macro_rules! by_activation {
    ($act:expr, $f:ident $(::<$($g:tt),*>)? ($($arg:expr),* $(,)?)) => {
        match $act {
            Activation::Identity => $f::<IDENTITY $($(, $g)*)?>($($arg),*),
            Activation::Relu => $f::<RELU $($(, $g)*)?>($($arg),*),
            Activation::Relu6 => $f::<RELU6 $($(, $g)*)?>($($arg),*),
        }
    };
}

/// `(sum(g'), sum(g' * xhat))` in f64 over one plane, `g'` the gradient past the activation
/// and `xhat = (x - mean) * rstd`.
#[inline(always)]
fn grad_sums<const A: u8>(x: &[f32], y: &[f32], g: &[f32], mean: f32, rstd: f32) -> (f64, f64) {
    sum_pairs_f64((x, y, g), |x, y, g| {
        let g = gate::<A>(y, g);
        (g, g * ((x - mean) * rstd))
    })
}

/// Per channel: the mean, `1 / sqrt(var + eps)` and the input gradient's `(k, a, b)`.
type DxParams<'a> = (&'a [f32], &'a [f32], &'a [(f32, f32, f32)]);

/// Outside training, over a run of whole planes of one image, the first in channel `first`:
/// the input gradient `k * g'`, and each plane's `(sum(g'), sum(g' * xhat))` added to its
/// channel's running sums in `acc` (`acc[0]` is channel `first`'s).
#[inline(always)]
fn eval_segment<const A: u8>(
    (dx, xs, ys, gs): (&mut [f32], &[f32], &[f32], &[f32]),
    first: usize,
    size: usize,
    (mean, rstd, coef): DxParams,
    acc: &mut [(f64, f64)],
) {
    let size = size.max(1);
    for (i, ((dx, y), g)) in dx
        .chunks_mut(size)
        .zip(ys.chunks(size))
        .zip(gs.chunks(size))
        .enumerate()
    {
        let k = coef[first + i].0;
        for ((d, &y), &g) in dx.iter_mut().zip(y).zip(g) {
            *d = k * gate::<A>(y, g);
        }
    }
    // Plain loops here and below: an iterator adapter's `fold` or `collect` is a function of
    // its own, compiled for the baseline instruction set even when called from a
    // `simd_dispatch!` copy, and the summing loop inlined into it ran on SSE2.
    for (i, ((x, y), g)) in xs
        .chunks(size)
        .zip(ys.chunks(size))
        .zip(gs.chunks(size))
        .enumerate()
    {
        let c = first + i;
        let (a, b) = grad_sums::<A>(x, y, g, mean[c], rstd[c]);
        acc[i].0 += a;
        acc[i].1 += b;
    }
}

/// `out = act((x - mean[c]) * scale[c] + bias[c])` over the planes of one task, the first
/// being plane `first`.
#[inline(always)]
fn forward_planes<const A: u8>(
    out: &mut [f32],
    xs: &[f32],
    first: usize,
    planes: &Planes,
    (mean, scale, bias): (&[f32], &[f32], &[f32]),
) {
    let size = planes.size.max(1);
    for (i, (o, x)) in out.chunks_mut(size).zip(xs.chunks(size)).enumerate() {
        let c = (first + i) % planes.channels;
        let (mc, sc, bc) = (mean[c], scale[c], bias[c]);
        for (o, &x) in o.iter_mut().zip(x) {
            *o = act_value::<A>((x - mc) * sc + bc);
        }
    }
}

/// In training, the input gradient over the planes of one task: `k * (g' - a - xhat * b)`
/// with `(k, a, b)` per channel.
#[inline(always)]
fn dx_planes<const A: u8>(
    (dx, xs, ys, gs): (&mut [f32], &[f32], &[f32], &[f32]),
    first: usize,
    planes: &Planes,
    (mean, rstd, coef): DxParams,
) {
    let size = planes.size.max(1);
    for (i, (((dx, x), y), g)) in dx
        .chunks_mut(size)
        .zip(xs.chunks(size))
        .zip(ys.chunks(size))
        .zip(gs.chunks(size))
        .enumerate()
    {
        let c = (first + i) % planes.channels;
        let (k, a, b) = coef[c];
        let (mc, rc) = (mean[c], rstd[c]);
        for (((d, &x), &y), &g) in dx.iter_mut().zip(x).zip(y).zip(g) {
            let g = gate::<A>(y, g);
            *d = k * (g - a - (x - mc) * rc * b);
        }
    }
}

// The per-task loops again, each compiled for AVX-512 and for AVX2 too (`simd_dispatch!`, chosen
// at run time; the binary itself targets SSE2). The dispatched copies are plain functions, so
// each takes the activation as an argument and picks the specialised loop.

/// One channel's `(sum(g'), sum(g' * xhat))` over its planes in batch order, from the inputs,
/// outputs and output gradients `(xs, ys, gs)` and the channel's `(mean, rstd)`.
#[inline(always)]
fn channel_sums(
    act: Activation,
    data: (&[f32], &[f32], &[f32]),
    planes: &Planes,
    c: usize,
    stats: (f32, f32),
) -> (f64, f64) {
    #[inline(always)]
    fn of<const A: u8>(
        (xs, ys, gs): (&[f32], &[f32], &[f32]),
        planes: &Planes,
        c: usize,
        (mean, rstd): (f32, f32),
    ) -> (f64, f64) {
        let (mut a, mut b) = (0.0, 0.0);
        for ((x, y), g) in planes
            .channel(xs, c)
            .zip(planes.channel(ys, c))
            .zip(planes.channel(gs, c))
        {
            let (pa, pb) = grad_sums::<A>(x, y, g, mean, rstd);
            a += pa;
            b += pb;
        }
        (a, b)
    }
    by_activation!(act, of(data, planes, c, stats))
}
simd_dispatch!(
    fn channel_sums_simd(
        act: Activation,
        data: (&[f32], &[f32], &[f32]),
        planes: &Planes,
        c: usize,
        stats: (f32, f32),
    ) -> (f64, f64) => channel_sums
);

/// One channel's batch mean and biased variance (two passes, f64).
#[inline(always)]
fn channel_stats(xs: &[f32], planes: &Planes, c: usize) -> (f32, f32) {
    let n = (planes.batch * planes.size) as f64;
    let mut sum = 0.0;
    for p in planes.channel(xs, c) {
        sum += sum_f64(p);
    }
    let mean = sum / n;
    let mut sq = 0.0;
    for p in planes.channel(xs, c) {
        sq += sum_sq_dev_f64(p, mean);
    }
    (mean as f32, (sq / n) as f32)
}
simd_dispatch!(fn channel_stats_simd(xs: &[f32], planes: &Planes, c: usize) -> (f32, f32) => channel_stats);

/// [`forward_planes`] for the activation `act`.
#[inline(always)]
fn forward_task(
    act: Activation,
    out: &mut [f32],
    xs: &[f32],
    first: usize,
    planes: &Planes,
    params: (&[f32], &[f32], &[f32]),
) {
    by_activation!(act, forward_planes(out, xs, first, planes, params))
}
simd_dispatch!(
    fn forward_task_simd(
        act: Activation,
        out: &mut [f32],
        xs: &[f32],
        first: usize,
        planes: &Planes,
        params: (&[f32], &[f32], &[f32]),
    ) => forward_task
);

/// [`dx_planes`] for the activation `act`.
#[inline(always)]
fn dx_task(
    act: Activation,
    args: (&mut [f32], &[f32], &[f32], &[f32]),
    first: usize,
    planes: &Planes,
    params: DxParams,
) {
    by_activation!(act, dx_planes(args, first, planes, params))
}
simd_dispatch!(
    fn dx_task_simd(
        act: Activation,
        args: (&mut [f32], &[f32], &[f32], &[f32]),
        first: usize,
        planes: &Planes,
        params: DxParams,
    ) => dx_task
);

/// [`eval_segment`] for the activation `act`.
#[inline(always)]
fn eval_task(
    act: Activation,
    args: (&mut [f32], &[f32], &[f32], &[f32]),
    first: usize,
    size: usize,
    params: DxParams,
    acc: &mut [(f64, f64)],
) {
    by_activation!(act, eval_segment(args, first, size, params, acc))
}
simd_dispatch!(
    fn eval_task_simd(
        act: Activation,
        args: (&mut [f32], &[f32], &[f32], &[f32]),
        first: usize,
        size: usize,
        params: DxParams,
        acc: &mut [(f64, f64)],
    ) => eval_task
);

/// Outside training: the input gradient and the per-channel `(sum(g'), sum(g' * xhat))`. Each
/// task takes a block of channels through the whole batch, so that it adds a channel's plane
/// sums in batch order itself: no per-plane results to keep and add up afterwards on one
/// thread, which for the 2 x 2 planes late in a small network had cost more than the planes.
fn eval_backward(
    act: Activation,
    (xs, ys, gs): (&[f32], &[f32], &[f32]),
    planes: &Planes,
    params: DxParams,
) -> (Vec<f32>, Vec<(f64, f64)>) {
    let (channels, size) = (planes.channels, planes.size.max(1));
    let per_task = (CHUNK / (planes.batch * size).max(1)).max(1);
    let mut dx = Vec::with_capacity(xs.len());
    let out = super::SharedOut::of(&mut dx);
    let sums: Vec<Vec<(f64, f64)>> = (0..channels.div_ceil(per_task))
        .into_par_iter()
        .map(|task| {
            let (c0, c1) = (task * per_task, ((task + 1) * per_task).min(channels));
            let mut acc = vec![(0.0, 0.0); c1 - c0];
            for b in 0..planes.batch {
                let r = (b * channels + c0) * size..(b * channels + c1) * size;
                // SAFETY: `r` is channels `c0..c1` of image `b`: inside `xs.len()`, the
                // capacity, and disjoint from every other task's and image's range.
                let dx = unsafe { out.range(r.clone()) };
                let args = (dx, &xs[r.clone()], &ys[r.clone()], &gs[r]);
                eval_task_simd(act, args, c0, size, params, &mut acc);
            }
            acc
        })
        .collect();
    // SAFETY: the tasks wrote every element: their channel blocks cover `0..channels` for
    // every image, and `xs.len() = batch * channels * size`.
    unsafe { dx.set_len(xs.len()) };
    (dx, sums.concat())
}

/// Whether [`batch_norm_act`] runs our kernel for `x` (f32 on the Flex backend); elsewhere the
/// caller composes burn's BatchNorm and [`Activation::apply`].
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    D >= 2 && x.dtype() == DType::F32 && is_flex(&x.device())
}

/// `act((x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c])` over channel axis 1. With
/// `train`, `mean` and `var` are the batch's (over every axis but 1; biased variance) and
/// `running_mean`/`running_var` are not read; otherwise they are the running statistics.
/// Returns the output and the statistics used, which do not take part in autodiff.
///
/// # Shapes
/// - `x`: `[batch, channels, ...]`
/// - `weight`, `bias`, `running_mean`, `running_var`: `[channels]`
/// - output: `x`'s shape, then `[channels]` twice (mean, variance)
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_act<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    running_mean: Tensor<1>,
    running_var: Tensor<1>,
    eps: f64,
    act: Activation,
    train: bool,
) -> (Tensor<D>, Tensor<1>, Tensor<1>) {
    let (y, mean, var) = <Dispatch as BatchNormBackend>::fused_batch_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        running_mean.into_dispatch(),
        running_var.into_dispatch(),
        eps,
        act,
        train,
    );
    (
        Tensor::from_dispatch(y),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(var),
    )
}

/// BatchNorm with its activation as a backend extension, so that autodiff records our
/// backward kernel.
#[backend_extension(Flex, Autodiff)]
pub trait BatchNormBackend: Backend {
    /// See [`batch_norm_act`].
    #[allow(clippy::too_many_arguments)]
    fn fused_batch_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        eps: f64,
        act: Activation,
        train: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// The gradients of `x`, `weight` and `bias` from the output's, given the forward pass's
    /// output `y` and statistics; not differentiable.
    #[allow(clippy::too_many_arguments)]
    fn fused_batch_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
        act: Activation,
        train: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `[batch, channels, rest...]` as planes of `size` elements, plane `p` in channel
/// `p % channels`.
struct Planes {
    channels: usize,
    batch: usize,
    size: usize,
}

impl Planes {
    fn of(x: &FlexTensor) -> Self {
        let shape = x.shape();
        Self {
            batch: shape[0],
            channels: shape[1],
            size: shape.iter().skip(2).product(),
        }
    }

    /// Elements per rayon task: whole planes, about `CHUNK` elements.
    fn block(&self) -> usize {
        (CHUNK / self.size.max(1)).max(1) * self.size.max(1)
    }

    /// The planes of channel `c`, in batch order.
    #[inline(always)]
    fn channel<'a>(&self, data: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> {
        let (s, ch) = (self.size, self.channels);
        (0..self.batch).map(move |b| &data[(b * ch + c) * s..][..s])
    }

    /// Per-channel results of `f`, channels in parallel (each channel's sum is sequential, so
    /// the result does not depend on the thread count).
    fn per_channel<T: Send>(&self, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
        // Small channels are grouped so that a task covers about `CHUNK` elements.
        let per_channel = self.batch * self.size;
        let min_len = (CHUNK / per_channel.max(1)).max(1);
        (0..self.channels)
            .into_par_iter()
            .with_min_len(min_len)
            .map(f)
            .collect()
    }
}

/// `1 / sqrt(var + eps)`, computed the same way in both passes.
#[inline]
fn inv_std(var: f32, eps: f64) -> f32 {
    (1.0 / (f64::from(var) + eps).sqrt()) as f32
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// The kernels over `[N, C]` (a size-1 plane per channel): per-channel work walks a column,
/// so these go row by row instead, with one f64 vector of partial sums per block of rows,
/// added in block order (the blocks depend only on `C`, not on the threads).
mod rows {
    use super::*;

    fn blocks(c: usize) -> usize {
        rows_per_task(c) * c
    }

    /// Per-channel f64 sums of `f(row)` over every row, `f` adding into its accumulator.
    fn column_sums<const K: usize>(
        n_rows_len: usize,
        c: usize,
        f: impl Fn(std::ops::Range<usize>, &mut [Vec<f64>; K]) + Sync + Send,
    ) -> [Vec<f64>; K] {
        let block = blocks(c);
        let starts: Vec<usize> = (0..n_rows_len).step_by(block.max(1)).collect();
        let parts: Vec<[Vec<f64>; K]> = starts
            .par_iter()
            .map(|&s| {
                let mut acc = std::array::from_fn(|_| vec![0.0f64; c]);
                f(s..(s + block).min(n_rows_len), &mut acc);
                acc
            })
            .collect();
        let mut total = std::array::from_fn(|_| vec![0.0f64; c]);
        for part in parts {
            for (t, p) in total.iter_mut().zip(part) {
                for (t, p) in t.iter_mut().zip(p) {
                    *t += p;
                }
            }
        }
        total
    }

    /// Batch mean and biased variance per column, two passes.
    pub(super) fn stats(xs: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
        let n = (xs.len() / c.max(1)) as f64;
        let [sum] = column_sums::<1>(xs.len(), c, |r, [acc]| {
            for row in xs[r].chunks_exact(c) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += f64::from(v);
                }
            }
        });
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let [sq] = column_sums::<1>(xs.len(), c, |r, [acc]| {
            for row in xs[r].chunks_exact(c) {
                for ((a, &v), &m) in acc.iter_mut().zip(row).zip(&mean) {
                    let d = f64::from(v) - m;
                    *a += d * d;
                }
            }
        });
        (
            mean.iter().map(|&m| m as f32).collect(),
            sq.iter().map(|&s| (s / n) as f32).collect(),
        )
    }

    pub(super) fn forward<const A: u8>(
        out: &mut [f32],
        xs: &[f32],
        (mean, scale, bias): (&[f32], &[f32], &[f32]),
    ) {
        let c = mean.len();
        out.par_chunks_mut(blocks(c).max(1))
            .zip(xs.par_chunks(blocks(c).max(1)))
            .for_each(|(out, xs)| {
                for (o, x) in out.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                    for ((((o, &x), &m), &s), &b) in
                        o.iter_mut().zip(x).zip(mean).zip(scale).zip(bias)
                    {
                        *o = act_value::<A>((x - m) * s + b);
                    }
                }
            });
    }

    /// Per-channel `(sum(g'), sum(g' * xhat))`.
    pub(super) fn grad_sums<const A: u8>(
        (xs, ys, gs): (&[f32], &[f32], &[f32]),
        (mean, rstd): (&[f32], &[f32]),
    ) -> Vec<(f64, f64)> {
        let c = mean.len();
        let [sg, sgx] = column_sums::<2>(xs.len(), c, |r, [a, b]| {
            let rows = xs[r.clone()]
                .chunks_exact(c)
                .zip(ys[r.clone()].chunks_exact(c))
                .zip(gs[r].chunks_exact(c));
            for ((x, y), g) in rows {
                for (k, ((&x, &y), &g)) in x.iter().zip(y).zip(g).enumerate() {
                    let g = gate::<A>(y, g);
                    a[k] += f64::from(g);
                    b[k] += f64::from(g * ((x - mean[k]) * rstd[k]));
                }
            }
        });
        sg.into_iter().zip(sgx).collect()
    }

    /// `dx = k * (g' - a - xhat * b)` in training, `k * g'` otherwise.
    pub(super) fn dx<const A: u8, const TRAIN: bool>(
        dx: &mut [f32],
        (xs, ys, gs): (&[f32], &[f32], &[f32]),
        (mean, rstd, coef): DxParams,
    ) {
        let c = mean.len();
        let block = blocks(c).max(1);
        dx.par_chunks_mut(block)
            .zip(xs.par_chunks(block))
            .zip(ys.par_chunks(block).zip(gs.par_chunks(block)))
            .for_each(|((dx, xs), (ys, gs))| {
                let rows = dx
                    .chunks_exact_mut(c)
                    .zip(xs.chunks_exact(c))
                    .zip(ys.chunks_exact(c).zip(gs.chunks_exact(c)));
                for ((d, x), (y, g)) in rows {
                    for (k, (((d, &x), &y), &g)) in d.iter_mut().zip(x).zip(y).zip(g).enumerate() {
                        let g = gate::<A>(y, g);
                        let (kk, a, b) = coef[k];
                        *d = if TRAIN {
                            kk * (g - a - (x - mean[k]) * rstd[k] * b)
                        } else {
                            kk * g
                        };
                    }
                }
            });
    }
}

use rows::{dx as rows_dx, forward as rows_forward, grad_sums as rows_grad_sums};

impl BatchNormBackend for Flex {
    fn fused_batch_norm(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        running_mean: FlexTensor,
        running_var: FlexTensor,
        eps: f64,
        act: Activation,
        train: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, weight, bias) = (contiguous(x), contiguous(weight), contiguous(bias));
        let xs = slice(&x);
        let (w, b) = (slice(&weight), slice(&bias));
        let planes = Planes::of(&x);
        let (mean, var) = if train && planes.size == 1 {
            let (m, v) = rows::stats(xs, planes.channels);
            let shape = Shape::new([planes.channels]);
            (from_vec_shaped(m, shape.clone()), from_vec_shaped(v, shape))
        } else if train {
            let stats = planes.per_channel(|c| channel_stats_simd(xs, &planes, c));
            let (m, v): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
            let shape = Shape::new([planes.channels]);
            (from_vec_shaped(m, shape.clone()), from_vec_shaped(v, shape))
        } else {
            (contiguous(running_mean), contiguous(running_var))
        };
        let (m, v) = (slice(&mean), slice(&var));
        let scale: Vec<f32> = (0..planes.channels)
            .map(|c| inv_std(v[c], eps) * w[c])
            .collect();
        if planes.size == 1 {
            let mut out = super::zeroed(xs.len());
            by_activation!(act, rows_forward(&mut out, xs, (m, &scale[..], b)));
            return (from_vec(out, &x), mean, var);
        }
        let block = planes.block();
        let per_task = block / planes.size.max(1);
        let out = super::par_blocks_zeroed(xs.len(), block, |task, out| {
            let xs = &xs[task * block..][..out.len()];
            let params = (m, &scale[..], b);
            forward_task_simd(act, out, xs, task * per_task, &planes, params);
        });
        (from_vec(out, &x), mean, var)
    }

    fn fused_batch_norm_backward(
        x: FlexTensor,
        weight: FlexTensor,
        mean: FlexTensor,
        var: FlexTensor,
        y: FlexTensor,
        grad: FlexTensor,
        eps: f64,
        act: Activation,
        train: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, weight) = (contiguous(x), contiguous(weight));
        let (y, grad) = (contiguous(y), contiguous(grad));
        let (mean, var) = (contiguous(mean), contiguous(var));
        let (xs, ys, gs) = (slice(&x), slice(&y), slice(&grad));
        let (w, m, v) = (slice(&weight), slice(&mean), slice(&var));
        let planes = Planes::of(&x);
        let rstd: Vec<f32> = v.iter().map(|&v| inv_std(v, eps)).collect();
        if planes.size == 1 {
            let mut dx = super::zeroed(xs.len());
            let sums = by_activation!(act, rows_grad_sums((xs, ys, gs), (m, &rstd[..])));
            let n = planes.batch as f64;
            let coef: Vec<(f32, f32, f32)> = (0..planes.channels)
                .map(|c| {
                    let (sg, sgx) = sums[c];
                    (w[c] * rstd[c], (sg / n) as f32, (sgx / n) as f32)
                })
                .collect();
            let params = (m, &rstd[..], &coef[..]);
            if train {
                by_activation!(act, rows_dx::<true>(&mut dx, (xs, ys, gs), params));
            } else {
                by_activation!(act, rows_dx::<false>(&mut dx, (xs, ys, gs), params));
            }
            return grads(dx, &x, &sums);
        }
        if !train {
            // dx = w * rstd * g' needs no sums first: one pass.
            let coef: Vec<(f32, f32, f32)> = (0..planes.channels)
                .map(|c| (w[c] * rstd[c], 0.0, 0.0))
                .collect();
            let params = (m, &rstd[..], &coef[..]);
            let (dx, sums) = eval_backward(act, (xs, ys, gs), &planes, params);
            return grads(dx, &x, &sums);
        }
        // Per channel: the sum of the gradient past the activation (bias gradient) and of its
        // product with the normalised input (weight gradient); then
        // dx = w * rstd * (g' - mean(g') - xhat * mean(g' * xhat)).
        let sums = planes
            .per_channel(|c| channel_sums_simd(act, (xs, ys, gs), &planes, c, (m[c], rstd[c])));
        let n = (planes.batch * planes.size) as f64;
        let coef: Vec<(f32, f32, f32)> = (0..planes.channels)
            .map(|c| {
                let (sg, sgx) = sums[c];
                (w[c] * rstd[c], (sg / n) as f32, (sgx / n) as f32)
            })
            .collect();
        let block = planes.block();
        let per_task = block / planes.size.max(1);
        let dx = super::par_blocks_zeroed(xs.len(), block, |task, dx| {
            let r = task * block..task * block + dx.len();
            let params = (m, &rstd[..], &coef[..]);
            let args = (dx, &xs[r.clone()], &ys[r.clone()], &gs[r]);
            dx_task_simd(act, args, task * per_task, &planes, params);
        });
        grads(dx, &x, &sums)
    }
}

/// The three gradients from the input gradient and the per-channel `(sum(g'), sum(g' * xhat))`.
fn grads(
    dx: Vec<f32>,
    x: &FlexTensor,
    sums: &[(f64, f64)],
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = Shape::new([sums.len()]);
    let dw = sums.iter().map(|&(_, sgx)| sgx as f32).collect();
    let db = sums.iter().map(|&(sg, _)| sg as f32).collect();
    (
        from_vec(dx, x),
        from_vec_shaped(dw, shape.clone()),
        from_vec_shaped(db, shape),
    )
}

impl<B: BatchNormBackend, C: CheckpointStrategy> BatchNormBackend for Autodiff<B, C> {
    fn fused_batch_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        eps: f64,
        act: Activation,
        train: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct BatchNormGrad;

        /// Input, weight, statistics, output; epsilon, activation, training.
        type State<B> = ([FloatTensor<B>; 5], f64, Activation, bool);

        impl<B: BatchNormBackend> Backward<B, 3> for BatchNormGrad {
            type State = State<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 3>(ops, grads, |state, grad, _| {
                    let ([x, w, mean, var, y], eps, act, train) = state;
                    let (dx, dw, db) =
                        B::fused_batch_norm_backward(x, w, mean, var, y, grad, eps, act, train);
                    [Some(dx), Some(dw), Some(db)]
                });
            }
        }

        let (x, x_node) = x.into_parts();
        let (weight, w_node) = weight.into_parts();
        let (bias, b_node) = bias.into_parts();
        let (rm, rv) = (running_mean.into_primitive(), running_var.into_primitive());
        let (y, mean, var) = match BatchNormGrad
            .prepare::<C>([x_node, w_node, b_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, mean, var) =
                    B::fused_batch_norm(x.clone(), weight.clone(), bias, rm, rv, eps, act, train);
                let state = (
                    [x, weight, mean.clone(), var.clone(), y.clone()],
                    eps,
                    act,
                    train,
                );
                (prep.finish(state, y), mean, var)
            }
            OpsKind::UnTracked(prep) => {
                let (y, mean, var) = B::fused_batch_norm(x, weight, bias, rm, rv, eps, act, train);
                (prep.finish(y), mean, var)
            }
        };
        (
            y,
            FloatTensor::<Self>::new(mean),
            FloatTensor::<Self>::new(var),
        )
    }

    fn fused_batch_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
        act: Activation,
        train: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw, db) = B::fused_batch_norm_backward(
            x.into_primitive(),
            weight.into_primitive(),
            mean.into_primitive(),
            var.into_primitive(),
            y.into_primitive(),
            grad.into_primitive(),
            eps,
            act,
            train,
        );
        (
            FloatTensor::<Self>::new(dx),
            FloatTensor::<Self>::new(dw),
            FloatTensor::<Self>::new(db),
        )
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, TensorData, Tolerance};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn the_gradient_gate_is_the_branch_bit_for_bit() {
        let special = [
            0.0,
            -0.0,
            6.0,
            5.999_999_5,
            1e-45,
            -1e-45,
            f32::INFINITY,
            f32::NAN,
        ];
        let values: Vec<f32> = special.iter().copied().chain([-3.5, 0.25, 7.0]).collect();
        for &y in &values {
            for &g in &values {
                let want = |pass: bool| (if pass { g } else { 0.0 }).to_bits();
                assert_eq!(gate::<IDENTITY>(y, g).to_bits(), want(true));
                assert_eq!(gate::<RELU>(y, g).to_bits(), want(y > 0.0));
                assert_eq!(gate::<RELU6>(y, g).to_bits(), want(y > 0.0 && y < 6.0));
            }
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        // 37-element planes: whole 8-lane chunks and a tail; values around ReLU6's bounds.
        let planes = Planes {
            batch: 3,
            channels: 5,
            size: 37,
        };
        let len = planes.batch * planes.channels * planes.size;
        let mut rng = StdRng::seed_from_u64(7);
        let mut draw = || -> Vec<f32> { (0..len).map(|_| rng.random_range(-2.0..8.0)).collect() };
        let (xs, ys, gs) = (draw(), draw(), draw());
        let mean: Vec<f32> = (0..planes.channels).map(|c| 0.3 * c as f32 - 0.5).collect();
        let rstd: Vec<f32> = (0..planes.channels).map(|c| 0.7 + 0.1 * c as f32).collect();
        let coef: Vec<(f32, f32, f32)> = (0..planes.channels)
            .map(|c| (0.9 - 0.05 * c as f32, 0.01 * c as f32, -0.02 * c as f32))
            .collect();
        let params = (&mean[..], &rstd[..], &coef[..]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let run = |act: Activation, isa: u8| -> (Vec<u64>, Vec<u32>) {
            // SAFETY (isa 1, 2): only called where the CPU has the instruction set.
            let mut sums = Vec::new();
            for c in 0..planes.channels {
                let (m, r) = (mean[c], rstd[c]);
                let (a, b) = match isa {
                    0 => channel_sums(act, (&xs, &ys, &gs), &planes, c, (m, r)),
                    #[cfg(target_arch = "x86_64")]
                    1 => unsafe {
                        channel_sums_simd::avx2(act, (&xs, &ys, &gs), &planes, c, (m, r))
                    },
                    #[cfg(target_arch = "x86_64")]
                    _ => unsafe {
                        channel_sums_simd::avx512(act, (&xs, &ys, &gs), &planes, c, (m, r))
                    },
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => unreachable!(),
                };
                let (sm, sv) = match isa {
                    0 => channel_stats(&xs, &planes, c),
                    #[cfg(target_arch = "x86_64")]
                    1 => unsafe { channel_stats_simd::avx2(&xs, &planes, c) },
                    #[cfg(target_arch = "x86_64")]
                    _ => unsafe { channel_stats_simd::avx512(&xs, &planes, c) },
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => unreachable!(),
                };
                sums.extend([
                    a.to_bits(),
                    b.to_bits(),
                    sm.to_bits() as u64,
                    sv.to_bits() as u64,
                ]);
            }
            let (mut fwd, mut dx, mut ev) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
            let fparams = (&mean[..], &rstd[..], &xs[..planes.channels]);
            let mut eval = vec![(0.0, 0.0); planes.channels];
            let image = planes.channels * planes.size;
            match isa {
                0 => {
                    forward_task(act, &mut fwd, &xs, 0, &planes, fparams);
                    dx_task(act, (&mut dx, &xs, &ys, &gs), 0, &planes, params);
                }
                #[cfg(target_arch = "x86_64")]
                1 => unsafe {
                    forward_task_simd::avx2(act, &mut fwd, &xs, 0, &planes, fparams);
                    dx_task_simd::avx2(act, (&mut dx, &xs, &ys, &gs), 0, &planes, params);
                },
                #[cfg(target_arch = "x86_64")]
                _ => unsafe {
                    forward_task_simd::avx512(act, &mut fwd, &xs, 0, &planes, fparams);
                    dx_task_simd::avx512(act, (&mut dx, &xs, &ys, &gs), 0, &planes, params);
                },
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!(),
            }
            for b in 0..planes.batch {
                let r = b * image..(b + 1) * image;
                let args = (&mut ev[r.clone()], &xs[r.clone()], &ys[r.clone()], &gs[r]);
                let (size, acc) = (planes.size, &mut eval[..]);
                match isa {
                    0 => eval_task(act, args, 0, size, params, acc),
                    #[cfg(target_arch = "x86_64")]
                    1 => unsafe { eval_task_simd::avx2(act, args, 0, size, params, acc) },
                    #[cfg(target_arch = "x86_64")]
                    _ => unsafe { eval_task_simd::avx512(act, args, 0, size, params, acc) },
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => unreachable!(),
                }
            }
            sums.extend(eval.iter().flat_map(|&(a, b)| [a.to_bits(), b.to_bits()]));
            (sums, [bits(&fwd), bits(&dx), bits(&ev)].concat())
        };
        for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
            let reference = run(act, 0);
            // The per-plane sums are those of `sum_pairs_f64`'s lanes.
            for (p, chunk) in xs.chunks(planes.size).enumerate() {
                let c = p % planes.channels;
                let (y, g) = (
                    &ys[p * planes.size..][..planes.size],
                    &gs[p * planes.size..][..planes.size],
                );
                let want = by_activation!(act, grad_sums(chunk, y, g, mean[c], rstd[c]));
                // The gate written as the branch it replaces.
                let lanes = sum_pairs_f64((chunk, y, g), |x, y, g| {
                    let passes = match act {
                        Activation::Identity => true,
                        Activation::Relu => y > 0.0,
                        Activation::Relu6 => y > 0.0 && y < 6.0,
                    };
                    let g = if passes { g } else { 0.0 };
                    (g, g * ((x - mean[c]) * rstd[c]))
                });
                assert_eq!(want, lanes, "plane {p}");
            }
            #[cfg(target_arch = "x86_64")]
            {
                use crate::backends::{has_avx2, has_avx512};
                if has_avx2() {
                    assert_eq!(run(act, 1), reference, "{act:?}, AVX2");
                }
                if has_avx512() {
                    assert_eq!(run(act, 2), reference, "{act:?}, AVX-512");
                }
            }
        }
    }

    /// burn's BatchNorm (training or running statistics), then the activation.
    fn composed(
        x: Tensor<4>,
        w: Tensor<1>,
        b: Tensor<1>,
        rm: Tensor<1>,
        rv: Tensor<1>,
        act: Activation,
        train: bool,
    ) -> (Tensor<4>, Option<(Tensor<1>, Tensor<1>)>) {
        let eps = 1e-3;
        if train {
            let r = burn::tensor::module::batch_norm_train(x, w, b, eps);
            (act.apply(r.output), Some((r.mean, r.variance)))
        } else {
            (
                act.apply(burn::tensor::module::batch_norm(x, w, b, rm, rv, eps)),
                None,
            )
        }
    }

    /// `n` draws from a normal distribution, from a generator of the test's own: burn's seed
    /// is one per process, so tests running beside each other would change each other's draws.
    fn normal(rng: &mut StdRng, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller; `1 - u` keeps the logarithm finite.
                let (u, v): (f64, f64) = (rng.random(), rng.random());
                let z = (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                (mean + std * z) as f32
            })
            .collect()
    }

    #[test]
    fn matches_burn_on_values_and_an_f64_reference_on_every_gradient() {
        let dev = Device::flex().autodiff();
        let mut rng = StdRng::seed_from_u64(11);
        let tol = Tolerance::<f32>::rel_abs(2e-5, 2e-5);
        for (shape, act, train) in [
            ([4, 3, 5, 7], Activation::Relu6, false),
            ([4, 3, 5, 7], Activation::Relu6, true),
            ([2, 40, 3, 3], Activation::Relu, true),
            ([2, 40, 3, 3], Activation::Relu, false),
            // Size-1 planes (`[N, C]`) go row by row; 300 rows of 64 are two blocks.
            ([3, 1000, 1, 1], Activation::Identity, true),
            ([300, 64, 1, 1], Activation::Relu, false),
            ([300, 64, 1, 1], Activation::Relu6, true),
            // Planes of 899 elements: two rayon tasks, the second starting mid-batch.
            ([5, 6, 31, 29], Activation::Identity, false),
            ([5, 6, 31, 29], Activation::Relu6, true),
        ] {
            let c = shape[1];
            let len = shape.iter().product();
            let vector = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c]), &dev);
            let image = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, shape), &dev);
            let w = vector(normal(&mut rng, c, 1.0, 0.5));
            let b = vector(normal(&mut rng, c, 1.0, 1.0));
            let rm = vector(normal(&mut rng, c, 0.5, 1.0));
            let rv = vector((0..c).map(|_| rng.random_range(0.5f32..4.0)).collect());
            // Wide enough that ReLU6 clips at both ends.
            let x = image(normal(&mut rng, len, 1.0, 4.0));
            let up = image(normal(&mut rng, len, 0.0, 1.0));
            let x_host = x.clone();
            let leaf = |t: &Tensor<1>| t.clone().require_grad();
            let (xa, wa, ba) = (x.clone().require_grad(), leaf(&w), leaf(&b));
            let (xb, wb, bb) = (x.require_grad(), leaf(&w), leaf(&b));
            let (ours, mean, var) = batch_norm_act(
                xa.clone(),
                wa.clone(),
                ba.clone(),
                rm.clone(),
                rv.clone(),
                1e-3,
                act,
                train,
            );
            let (theirs, stats) = composed(
                xb.clone(),
                wb.clone(),
                bb.clone(),
                rm.clone(),
                rv.clone(),
                act,
                train,
            );
            let what = format!("{shape:?} {act:?} train={train}");
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&theirs.clone().into_data(), tol);
            match stats {
                Some((m, v)) => {
                    mean.into_data()
                        .assert_approx_eq::<f32>(&m.reshape([c]).into_data(), tol);
                    var.into_data()
                        .assert_approx_eq::<f32>(&v.reshape([c]).into_data(), tol);
                }
                None => {
                    assert_eq!(mean.into_data(), rm.clone().into_data(), "{what}");
                    assert_eq!(var.into_data(), rv.clone().into_data(), "{what}");
                }
            }
            let ga = (ours * up.clone()).sum().backward();
            // burn's f32 composition of the training-mode gradients loses up to ~4e-5 to
            // cancellation, so the gradients are checked against an f64 reference, within
            // what f32 arithmetic on the same inputs can reach (see `Reference`).
            let host = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
            let want = Reference::new(
                &host(x_host),
                &host(up),
                shape,
                [&w, &b, &rm, &rv],
                act,
                train,
            );
            let leaf_grad = |t: Tensor<1>| t.grad(&ga).unwrap().into_data().try_to_vec().unwrap();
            for (name, got, want) in [
                (
                    "dx",
                    xa.grad(&ga).unwrap().into_data().try_to_vec().unwrap(),
                    &want.dx,
                ),
                ("dw", leaf_grad(wa), &want.dw),
                ("db", leaf_grad(ba), &want.db),
            ] {
                for (i, (g, (w, r))) in got.iter().zip(want).enumerate() {
                    let g: f32 = *g;
                    assert!(
                        (f64::from(g) - w).abs() <= 1e-5 + 1e-5 * w.abs() + 2.0 * r,
                        "{what}: {name}[{i}] = {g}, f64 reference {w}, f32 rounding reach {r}"
                    );
                }
            }
        }
    }

    /// The gradients of `sum(up * act(batch_norm(x)))` in f64 (eps 1e-3), each value beside
    /// how far one f32 rounding of each input to the kernel's formulas can move it.
    ///
    /// The mean is rounded to f32 before `x - mean`, so a channel whose few values lie close
    /// together (a batch of 3, say) amplifies that rounding by `rstd` twice: that is the
    /// arithmetic of the kernel (and of PyTorch), not a fault of either.
    struct Reference {
        dx: Vec<(f64, f64)>,
        dw: Vec<(f64, f64)>,
        db: Vec<(f64, f64)>,
    }

    impl Reference {
        fn new(
            x: &[f32],
            up: &[f32],
            shape: [usize; 4],
            params: [&Tensor<1>; 4],
            act: Activation,
            train: bool,
        ) -> Self {
            let v = |t: &Tensor<1>| t.clone().into_data().try_to_vec::<f32>().unwrap();
            let [w, b, rm, rv] = params.map(v);
            let [n, c, h, wd] = shape;
            let s = h * wd;
            let u = f64::from(f32::EPSILON) / 2.0;
            let idx = |i: usize, ch: usize, k: usize| (i * c + ch) * s + k;
            let mut dx = vec![(0.0, 0.0); x.len()];
            let (mut dw, mut db) = (Vec::new(), Vec::new());
            for ch in 0..c {
                let all: Vec<usize> = (0..n)
                    .flat_map(|i| (0..s).map(move |k| idx(i, ch, k)))
                    .collect();
                let count = all.len() as f64;
                let (mean, var) = if train {
                    let m = all.iter().map(|&j| f64::from(x[j])).sum::<f64>() / count;
                    let v = all
                        .iter()
                        .map(|&j| (f64::from(x[j]) - m).powi(2))
                        .sum::<f64>()
                        / count;
                    (m, v)
                } else {
                    (f64::from(rm[ch]), f64::from(rv[ch]))
                };
                let rstd = 1.0 / (var + 1e-3).sqrt();
                let xhat = |j: usize| (f64::from(x[j]) - mean) * rstd;
                // The error one rounding of x - mean (and of the mean) puts into xhat.
                let xhat_err = |j: usize| u * rstd * (f64::from(x[j]).abs() + mean.abs());
                let g = |j: usize| {
                    let pre = xhat(j) * f64::from(w[ch]) + f64::from(b[ch]);
                    let pass = match act {
                        Activation::Identity => true,
                        Activation::Relu => pre > 0.0,
                        Activation::Relu6 => pre > 0.0 && pre < 6.0,
                    };
                    if pass { f64::from(up[j]) } else { 0.0 }
                };
                let sum = |f: &dyn Fn(usize) -> f64| all.iter().map(|&j| f(j)).sum::<f64>();
                let (sg, sgx) = (sum(&|j| g(j)), sum(&|j| g(j) * xhat(j)));
                let sgx_err = sum(&|j| g(j).abs() * (xhat_err(j) + u * xhat(j).abs()));
                dw.push((sgx, sgx_err));
                db.push((sg, u * sum(&|j| g(j).abs())));
                let (a, bb) = (sg / count, sgx / count);
                let k = f64::from(w[ch]) * rstd;
                for &j in &all {
                    dx[j] = if train {
                        let value = k * (g(j) - a - xhat(j) * bb);
                        let terms = g(j).abs() + a.abs() + (xhat(j) * bb).abs();
                        let err =
                            u * terms + xhat_err(j) * bb.abs() + xhat(j).abs() * sgx_err / count;
                        (value, k.abs() * err)
                    } else {
                        (k * g(j), k.abs() * u * g(j).abs())
                    };
                }
            }
            Self { dx, dw, db }
        }
    }

    #[test]
    fn relu6_gradient_is_pytorchs_at_the_ends() {
        let dev = Device::flex().autodiff();
        let x = Tensor::<2>::from_floats([[-1.0, 0.0, 3.0, 6.0, 7.0, f32::NAN]], &dev)
            .reshape([1, 1, 1, 6])
            .require_grad();
        let one = |d: &Device| Tensor::<1>::ones([1], d);
        let zero = |d: &Device| Tensor::<1>::zeros([1], d);
        // eps = 0 with unit variance: the identity before the activation.
        let (y, _, _) = batch_norm_act(
            x.clone(),
            one(&dev),
            zero(&dev),
            zero(&dev),
            one(&dev),
            0.0,
            Activation::Relu6,
            false,
        );
        let values = y.clone().into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(&values[..5], &[0.0, 0.0, 3.0, 6.0, 6.0]);
        assert!(values[5].is_nan());
        let g = y.sum().backward();
        let grad = x.grad(&g).unwrap().into_data().try_to_vec::<f32>().unwrap();
        // hardtanh_backward: 1 strictly inside (0, 6), 0 at both ends and outside.
        assert_eq!(grad, vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn the_frozen_backward_adds_each_channels_planes_in_batch_order() {
        // 2 x 2 planes and enough channels for several tasks with a short last one, then one
        // task of planes larger than a task's share.
        for (batch, channels, size) in [(3, 5001, 4), (2, 3, 40_000)] {
            let planes = Planes {
                batch,
                channels,
                size,
            };
            let len = batch * channels * size;
            let mut rng = StdRng::seed_from_u64(11);
            let mut draw =
                || -> Vec<f32> { (0..len).map(|_| rng.random_range(-2.0..8.0)).collect() };
            let (xs, ys) = (draw(), draw());
            // Gradients over 2^-30..2^30, so that their f64 sums round, and any other order of
            // adding a channel's planes shows in the bits.
            let gs: Vec<f32> = (0..len)
                .map(|_| rng.random_range(-2.0f32..2.0) * 2f32.powi(rng.random_range(-30..=30)))
                .collect();
            let mean: Vec<f32> = (0..channels).map(|c| (c % 7) as f32 * 0.3 - 0.5).collect();
            let rstd: Vec<f32> = (0..channels).map(|c| 0.7 + (c % 5) as f32 * 0.1).collect();
            let coef: Vec<(f32, f32, f32)> = (0..channels)
                .map(|c| (0.9 - (c % 3) as f32 * 0.05, 0.0, 0.0))
                .collect();
            for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
                let params = (&mean[..], &rstd[..], &coef[..]);
                let (dx, sums) = eval_backward(act, (&xs, &ys, &gs), &planes, params);
                // One plane at a time, in memory order (images outer), on one thread.
                let mut want_dx = vec![0.0f32; len];
                let mut want = vec![(0.0f64, 0.0f64); channels];
                for p in 0..batch * channels {
                    let (c, r) = (p % channels, p * size..(p + 1) * size);
                    for i in r.clone() {
                        let g = by_activation!(act, gate(ys[i], gs[i]));
                        want_dx[i] = coef[c].0 * g;
                    }
                    let (x, y, g) = (&xs[r.clone()], &ys[r.clone()], &gs[r]);
                    let (a, b) = by_activation!(act, grad_sums(x, y, g, mean[c], rstd[c]));
                    want[c].0 += a;
                    want[c].1 += b;
                }
                // The first element whose bits differ, if any (the vectors are long).
                let dx_diff = dx
                    .iter()
                    .zip(&want_dx)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(dx_diff, None, "dx, {act:?}, planes of {size}");
                let sum_diff = sums.iter().zip(&want).position(|(a, b)| {
                    (a.0.to_bits(), a.1.to_bits()) != (b.0.to_bits(), b.1.to_bits())
                });
                assert_eq!(sum_diff, None, "channel sums, {act:?}, planes of {size}");
                assert_eq!((dx.len(), sums.len()), (len, channels));
            }
        }
    }

    #[test]
    fn runs_on_views_without_autodiff_for_rank_two() {
        let dev = Device::flex();
        let x = Tensor::<2>::random([7, 9], Distribution::Normal(0.0, 2.0), &dev).transpose();
        let (w, b) = (Tensor::<1>::ones([7], &dev), Tensor::<1>::zeros([7], &dev));
        let (rm, rv) = (Tensor::<1>::zeros([7], &dev), Tensor::<1>::ones([7], &dev));
        let (y, _, _) = batch_norm_act(
            x.clone(),
            w.clone(),
            b.clone(),
            rm,
            rv,
            1e-5,
            Activation::Relu,
            true,
        );
        let want = relu(burn::tensor::module::batch_norm_train(x, w, b, 1e-5).output);
        y.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
    }
}
