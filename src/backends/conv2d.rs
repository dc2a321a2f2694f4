//! Dense 2-D convolution (groups 1) for burn's Flex backend, forward and backward, as im2col
//! and GEMM on every core.
//!
//! The convolutions of ResNet-50 and GoogLeNet were lowered to burn tensor operations (pad,
//! strided slices, `stack`, matmul; `crate::backbones::conv`). That spent much of a ResNet-50
//! step copying on one thread: the padding, the stacked slices, transposes of whole
//! activations, zero-filled buffers, and the scatter of each slice's backward pass into a
//! zeroed padded tensor (BENCHMARKS.md, "CPU speed, fifth round"). Here the column matrix of a
//! group of images is written once, straight from the unpadded input, on every core, and
//! multiplied by calling `gemm` (the crate burn-flex itself calls) on the caller's buffers:
//!
//! - forward: `y = W [Cout, K] x cols [K, G*P]`, `K = Cin*kh*kw`, `P = out_h*out_w`;
//! - input gradient: `dcols = W^T x dy`, then col2im adds each column back onto the pixel it
//!   came from;
//! - weight gradient: `dW += dy x cols^T`, accumulated over the groups in order.
//!
//! Images go in groups of `G` so that each GEMM has at least [`MIN_COLUMNS`] columns: small
//! late-stage maps would make per-image matrices too narrow to keep the GEMM busy. `G`
//! depends only on the shapes. When there are at least as many groups as threads, the groups
//! run in parallel, each on one thread (one wake-up of the pool per call instead of several
//! per image); otherwise they run in turn, each on every core. Either way the arithmetic is
//! the same: `gemm` splits its work over the output, never over the sum, and the weight
//! gradient is summed over the groups in order, so results do not depend on the number of
//! threads. A 1x1 stride-1 unpadded convolution of one image per group multiplies the input
//! itself, without a copy.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Shape, Tensor};
use rayon::prelude::*;

pub use super::Geometry;
use super::autodiff::{backward, record};
use super::gemm::{Mat, matmul};
use super::{contiguous, from_vec_shaped, valid};

/// Each GEMM multiplies at least this many output columns (pixels of the images of a group),
/// or every image of the batch when there are fewer.
pub const MIN_COLUMNS: usize = 768;

/// `y[b, o] = sum_{c, i, j} w[o, c, i, j] * x[b, c, oy * sh + i - top, ox * sw + j - left]`,
/// input positions outside the image counting as zero.
///
/// # Shapes
/// - `x`: `[B, Cin, H, W]`
/// - `weight`: `[Cout, Cin, kh, kw]`
/// - output: `[B, Cout, out_h, out_w]`
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, geometry: Geometry) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as Conv2dBackend>::dense_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        geometry,
    ))
}

/// The dense convolution as a backend extension, so that autodiff records our backward
/// kernel.
#[backend_extension(Flex, Autodiff)]
pub trait Conv2dBackend: Backend {
    /// See [`conv2d`].
    fn dense_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        geometry: Geometry,
    ) -> FloatTensor<Self>;
    /// The gradients of `x` and `weight` from the output's, each only when asked for
    /// (`needs = [x, weight]`); not differentiable.
    fn dense_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: Geometry,
        needs: [bool; 2],
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>);
}

/// Sizes of one call.
struct Dims {
    batch: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    top: usize,
    left: usize,
    wo: usize,
    /// Output pixels per image.
    pixels: usize,
    /// Images per GEMM.
    group: usize,
    /// Per kernel row `i`, the output rows whose input row lies inside the image; per kernel
    /// column `j`, the output columns likewise.
    row_ranges: Vec<std::ops::Range<usize>>,
    col_ranges: Vec<std::ops::Range<usize>>,
}

impl Dims {
    fn new(x: &FlexTensor, weight: &FlexTensor, g: Geometry) -> Self {
        let xs = x.shape();
        let ws = weight.shape();
        let [sh, sw, top, left, ho, wo] = g;
        let (h, w, sh, sw) = (xs[2], xs[3], sh.max(1), sw.max(1));
        let pixels = ho * wo;
        Self {
            batch: xs[0],
            cin: xs[1],
            h,
            w,
            cout: ws[0],
            kh: ws[2],
            kw: ws[3],
            sh,
            sw,
            top,
            left,
            wo,
            pixels,
            group: MIN_COLUMNS.div_ceil(pixels.max(1)).clamp(1, xs[0].max(1)),
            row_ranges: (0..ws[2]).map(|i| valid(h, sh, top, i, ho)).collect(),
            col_ranges: (0..ws[3]).map(|j| valid(w, sw, left, j, wo)).collect(),
        }
    }

    /// Rows of the column matrix (and columns of the weight matrix).
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Whether the input of one image is its own column matrix: 1x1, stride 1, no padding.
    fn direct(&self, images: usize) -> bool {
        images == 1
            && (self.kh, self.kw, self.sh, self.sw, self.top, self.left) == (1, 1, 1, 1, 0, 0)
            && self.pixels == self.h * self.w
    }

    fn image_in(&self) -> usize {
        self.cin * self.h * self.w
    }

    fn image_out(&self) -> usize {
        self.cout * self.pixels
    }

    /// The groups of images: `(first, count)`.
    fn groups(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.batch)
            .step_by(self.group)
            .map(|b0| (b0, self.group.min(self.batch - b0)))
    }
}

/// `f(i, chunk)` over the `len`-element chunks of `data`, on every core when `parallel`.
fn for_each_chunk(
    data: &mut [f32],
    len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [f32]) + Send + Sync,
) {
    if parallel {
        data.par_chunks_mut(len.max(1))
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(len.max(1))
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// The column matrix `[K, n * P]` of images `x` (`n` whole images): row `(c, i, j)`, column
/// `(b, oy, ox)` holds `x[b, c, oy * sh + i - top, ox * sw + j - left]`, or zero outside.
fn im2col(d: &Dims, x: &[f32], n: usize, cols: &mut [f32], parallel: bool) {
    let (taps, plane) = (d.kh * d.kw, d.h * d.w);
    for_each_chunk(cols, n * d.pixels, parallel, |r, row| {
        let (c, i, j) = (r / taps, r % taps / d.kw, r % d.kw);
        let (rows, cs) = (&d.row_ranges[i], &d.col_ranges[j]);
        for (b, out) in row.chunks_mut(d.pixels.max(1)).enumerate() {
            let src = &x[(b * d.cin + c) * plane..][..plane];
            for (oy, out) in out.chunks_mut(d.wo.max(1)).enumerate() {
                if !rows.contains(&oy) {
                    out.fill(0.0);
                    continue;
                }
                out[..cs.start].fill(0.0);
                out[cs.end..].fill(0.0);
                if cs.is_empty() {
                    continue;
                }
                let line = &src[(oy * d.sh + i - d.top) * d.w..][..d.w];
                let first = cs.start * d.sw + j - d.left;
                if d.sw == 1 {
                    out[cs.clone()].copy_from_slice(&line[first..][..cs.len()]);
                } else {
                    for (o, v) in out[cs.clone()]
                        .iter_mut()
                        .zip(line[first..].iter().step_by(d.sw))
                    {
                        *o = *v;
                    }
                }
            }
        }
    });
}

/// The inverse scatter of [`im2col`]: each column entry added onto the input pixel it was
/// read from, into `dx` (`n` whole images, zeroed), one task per (image, channel) plane.
fn col2im(d: &Dims, dcols: &[f32], n: usize, dx: &mut [f32], parallel: bool) {
    let (taps, row_len) = (d.kh * d.kw, n * d.pixels);
    for_each_chunk(dx, d.h * d.w, parallel, |q, dst| {
        let (b, c) = (q / d.cin, q % d.cin);
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &dcols[(c * taps + i * d.kw + j) * row_len + b * d.pixels..][..d.pixels];
                let cs = &d.col_ranges[j];
                if cs.is_empty() {
                    continue;
                }
                let first = cs.start * d.sw + j - d.left;
                for oy in d.row_ranges[i].clone() {
                    let line = &mut dst[(oy * d.sh + i - d.top) * d.w..][..d.w];
                    let src = &row[oy * d.wo + cs.start..][..cs.len()];
                    if d.sw == 1 {
                        for (o, v) in line[first..][..cs.len()].iter_mut().zip(src) {
                            *o += *v;
                        }
                    } else {
                        for (o, v) in line[first..].iter_mut().step_by(d.sw).zip(src) {
                            *o += *v;
                        }
                    }
                }
            }
        }
    });
}

/// `[n, C, P]` (whole images) as `[C, n * P]`.
fn images_to_rows(src: &[f32], channels: usize, pixels: usize, dst: &mut [f32], parallel: bool) {
    let n = src.len() / (channels * pixels).max(1);
    for_each_chunk(dst, n * pixels, parallel, |c, row| {
        for (b, out) in row.chunks_mut(pixels.max(1)).enumerate() {
            out.copy_from_slice(&src[(b * channels + c) * pixels..][..pixels]);
        }
    });
}

/// The inverse of [`images_to_rows`]: `[C, n * P]` as `[n, C, P]`.
fn rows_to_images(src: &[f32], channels: usize, pixels: usize, dst: &mut [f32], parallel: bool) {
    let n = dst.len() / (channels * pixels).max(1);
    for_each_chunk(dst, pixels, parallel, |q, out| {
        let (b, c) = (q / channels, q % channels);
        out.copy_from_slice(&src[c * n * pixels + b * pixels..][..pixels]);
    });
}

/// Buffers reused from call to call on each thread: the column matrix, its gradient and a
/// transposed output or output gradient. Fresh buffers of megabytes for every image of every
/// layer would be zero-filled again each time.
#[derive(Default)]
struct Scratch {
    cols: Vec<f32>,
    dcols: Vec<f32>,
    rows: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// `f` with this thread's [`Scratch`], or fresh buffers when they are in use already (a
/// thread waiting inside one call can run another call's task).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// The first `len` elements of `v`, grown (zero-filled) when shorter.
fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Whether `groups` equal tasks keep `threads` cores at least 90% busy when each core takes
/// whole groups: 3 groups on 2 cores leave one core idle for a third of the time, which the
/// GEMMs of one group split over every core do not.
fn groups_share_evenly(groups: usize, threads: usize) -> bool {
    threads > 1 && groups >= threads && 10 * groups >= 9 * threads * groups.div_ceil(threads)
}

/// Runs `f((first image, images), part, parallel_inside)` for every group of images, `part`
/// being the group's images in `buf` (`per_image` elements each; empty when `buf` is): the
/// groups on every core when they share out evenly enough ([`groups_share_evenly`]), else one
/// after the other with the work inside each group on every core. Results come back in group
/// order, and neither way changes a value (the groups are the same; GEMM splits no sum).
fn map_groups<T: Send>(
    d: &Dims,
    buf: &mut [f32],
    per_image: usize,
    f: impl Fn((usize, usize), &mut [f32], bool) -> T + Send + Sync,
) -> Vec<T> {
    let groups: Vec<(usize, usize)> = d.groups().collect();
    let parts: Vec<&mut [f32]> = if buf.is_empty() {
        groups.iter().map(|_| <&mut [f32]>::default()).collect()
    } else {
        buf.chunks_mut((d.group * per_image).max(1)).collect()
    };
    if groups_share_evenly(groups.len(), rayon::current_num_threads()) {
        groups
            .into_par_iter()
            .zip(parts)
            .map(|(g, part)| f(g, part, false))
            .collect()
    } else {
        groups
            .into_iter()
            .zip(parts)
            .map(|(g, part)| f(g, part, true))
            .collect()
    }
}

impl Conv2dBackend for Flex {
    fn dense_conv2d(x: FlexTensor, weight: FlexTensor, geometry: Geometry) -> FlexTensor {
        let (x, weight) = (contiguous(x), contiguous(weight));
        let d = Dims::new(&x, &weight, geometry);
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let ws = weight.as_slice::<f32>().expect("contiguous f32");
        let (k, co) = (d.k(), d.cout);
        let mut out = super::zeroed(d.batch * d.image_out());
        map_groups(&d, &mut out, d.image_out(), |(b0, n), y, par| {
            let x = &xs[b0 * d.image_in()..][..n * d.image_in()];
            let width = n * d.pixels;
            with_scratch(|s| {
                let cols: &[f32] = if d.direct(n) {
                    x
                } else {
                    let cols = sized(&mut s.cols, k * width);
                    im2col(&d, x, n, cols, par);
                    cols
                };
                let (w, c) = (Mat::rows(ws, k), Mat::rows(cols, width));
                if n == 1 {
                    matmul(co, width, k, y, w, c, false, par);
                } else {
                    let rows = sized(&mut s.rows, co * width);
                    matmul(co, width, k, rows, w, c, false, par);
                    rows_to_images(rows, co, d.pixels, y, par);
                }
            });
        });
        from_vec_shaped(out, Shape::new([d.batch, co, geometry[4], geometry[5]]))
    }

    fn dense_conv2d_backward(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        geometry: Geometry,
        [need_x, need_w]: [bool; 2],
    ) -> (Option<FlexTensor>, Option<FlexTensor>) {
        let (x, weight, grad) = (contiguous(x), contiguous(weight), contiguous(grad));
        let d = Dims::new(&x, &weight, geometry);
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let ws = weight.as_slice::<f32>().expect("contiguous f32");
        let gs = grad.as_slice::<f32>().expect("contiguous f32");
        let (k, co) = (d.k(), d.cout);
        let mut dx = super::zeroed(if need_x { xs.len() } else { 0 });
        // The weight gradient of each group, summed over the groups in order below, so that
        // the sum does not depend on how the groups were spread over the threads.
        let partials = map_groups(&d, &mut dx, d.image_in(), |(b0, n), dx, par| {
            let width = n * d.pixels;
            with_scratch(|s| {
                let Scratch { cols, dcols, rows } = s;
                let g = &gs[b0 * d.image_out()..][..n * d.image_out()];
                // The output gradient as `[Cout, n * P]`.
                let g: &[f32] = if n == 1 {
                    g
                } else {
                    let rows = sized(rows, co * width);
                    images_to_rows(g, co, d.pixels, rows, par);
                    rows
                };
                let mut dw = Vec::new();
                if need_w {
                    let x = &xs[b0 * d.image_in()..][..n * d.image_in()];
                    let cols: &[f32] = if d.direct(n) {
                        x
                    } else {
                        let cols = sized(cols, k * width);
                        im2col(&d, x, n, cols, par);
                        cols
                    };
                    dw = vec![0.0f32; co * k];
                    let (a, b) = (Mat::rows(g, width), Mat::transposed(cols, width));
                    matmul(co, k, width, &mut dw, a, b, false, par);
                }
                if need_x {
                    let (a, b) = (Mat::transposed(ws, k), Mat::rows(g, width));
                    if d.direct(n) {
                        matmul(k, width, co, dx, a, b, false, par);
                    } else {
                        let dcols = sized(dcols, k * width);
                        matmul(k, width, co, dcols, a, b, false, par);
                        col2im(&d, dcols, n, dx, par);
                    }
                }
                dw
            })
        });
        let dw = need_w.then(|| {
            let mut partials = partials.into_iter();
            let mut dw = partials.next().unwrap_or_else(|| vec![0.0f32; co * k]);
            for p in partials {
                for (s, v) in dw.iter_mut().zip(&p) {
                    *s += v;
                }
            }
            from_vec_shaped(dw, weight.shape())
        });
        (need_x.then(|| from_vec_shaped(dx, x.shape())), dw)
    }
}

impl<B: Conv2dBackend, C: CheckpointStrategy> Conv2dBackend for Autodiff<B, C> {
    fn dense_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        geometry: Geometry,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Conv2dGrad;

        impl<B: Conv2dBackend> Backward<B, 2> for Conv2dGrad {
            type State = (FloatTensor<B>, FloatTensor<B>, Geometry);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 2>(ops, grads, |(x, weight, geometry), grad, needs| {
                    let (dx, dw) = B::dense_conv2d_backward(x, weight, grad, geometry, needs);
                    [dx, dw]
                });
            }
        }

        record::<C, _, _, _>(
            Conv2dGrad,
            [x, weight],
            |[x, weight]| B::dense_conv2d(x, weight, geometry),
            |[x, weight], _| (x, weight, geometry),
        )
    }

    fn dense_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: Geometry,
        needs: [bool; 2],
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let (dx, dw) = B::dense_conv2d_backward(
            x.into_primitive(),
            weight.into_primitive(),
            grad.into_primitive(),
            geometry,
            needs,
        );
        (
            dx.map(FloatTensor::<Self>::new),
            dw.map(FloatTensor::<Self>::new),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_go_to_separate_cores_only_when_they_share_out_evenly() {
        // (groups, threads, shared): even counts always; 3, 5 and 7 on two cores leave one
        // core idle for 1/4 to 1/8 of the time; 9 and more for at most a tenth.
        for (groups, threads, shared) in [
            (1, 2, false),
            (2, 2, true),
            (3, 2, false),
            (4, 2, true),
            (7, 2, false),
            (9, 2, true),
            (11, 2, true),
            (32, 2, true),
            (5, 4, false),
            (8, 4, true),
            (19, 4, true),
            (64, 1, false),
        ] {
            assert_eq!(
                groups_share_evenly(groups, threads),
                shared,
                "{groups} groups on {threads} threads"
            );
        }
    }
}
