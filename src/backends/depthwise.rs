//! Depthwise 2-D convolution (one filter per channel) for burn's Flex backend, forward and
//! backward, on every core.
//!
//! burn-flex runs a grouped convolution's forward pass as a general 3-D convolution and its
//! input gradient through `conv_transpose3d`, both on one thread; in EfficientNet-Lite0 (the
//! demo's backbone) those left the second core idle for much of each step (BENCHMARKS.md,
//! "The demo setting beside the release"). Here each image is one rayon task that copies its
//! planes channels-last (`[H, W, C]`) into task-local buffers, so that every inner loop is a
//! contiguous vector over the channels whatever the size of the map: loops over the rows of
//! each channel's plane spent most of their time on 2- to 16-pixel rows and stride-2 gathers,
//! and whole-tensor transposes cost as much again in memory traffic (BENCHMARKS.md, "CPU
//! speed, fourth round"). The weight gradient is summed per output row in f32, then in f64
//! over the rows and over the images in order.

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
use super::{contiguous, from_vec_shaped, valid};

/// `y[b, c] = sum_{i, j} w[c, i, j] * x[b, c, oy * sh + i - top, ox * sw + j - left]`, input
/// positions outside the image counting as zero.
///
/// # Shapes
/// - `x`: `[B, C, H, W]`
/// - `weight`: `[C, kh, kw]`
/// - output: `[B, C, out_h, out_w]`
pub fn depthwise_conv2d(x: Tensor<4>, weight: Tensor<3>, geometry: Geometry) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as DepthwiseBackend>::depthwise_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        geometry,
    ))
}

/// The depthwise convolution as a backend extension, so that autodiff records our backward
/// kernel.
#[backend_extension(Flex, Autodiff)]
pub trait DepthwiseBackend: Backend {
    /// See [`depthwise_conv2d`].
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        geometry: Geometry,
    ) -> FloatTensor<Self>;
    /// The gradients of `x` and `weight` from the output's; not differentiable.
    fn depthwise_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: Geometry,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// Plane sizes and kernel of one call.
struct Dims {
    planes: usize,
    channels: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    top: usize,
    left: usize,
    ho: usize,
    wo: usize,
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
        Self {
            row_ranges: (0..ws[1]).map(|i| valid(h, sh, top, i, ho)).collect(),
            col_ranges: (0..ws[2]).map(|j| valid(w, sw, left, j, wo)).collect(),
            planes: xs[0] * xs[1],
            channels: xs[1],
            h,
            w,
            kh: ws[1],
            kw: ws[2],
            sh,
            sw,
            top,
            left,
            ho,
            wo,
        }
    }
}

/// One image `[C, P]` (channel planes of `P` pixels) as channels-last `[P, C]` in `dst`.
/// Done per image inside the task, so that the copy stays in cache and the tensor is read
/// from memory once.
fn to_channels_last(src: &[f32], channels: usize, dst: &mut [f32]) {
    let pixels = src.len() / channels.max(1);
    for (c, plane) in src.chunks_exact(pixels.max(1)).enumerate() {
        for (p, &v) in plane.iter().enumerate() {
            dst[p * channels + c] = v;
        }
    }
}

/// The inverse of [`to_channels_last`]: `[P, C]` into channel planes `[C, P]`.
fn to_channels_first(src: &[f32], channels: usize, dst: &mut [f32]) {
    let pixels = src.len() / channels.max(1);
    for (c, plane) in dst.chunks_exact_mut(pixels.max(1)).enumerate() {
        for (p, v) in plane.iter_mut().enumerate() {
            *v = src[p * channels + c];
        }
    }
}

/// The weights as `[kh * kw, C]`: the channel vector of each tap.
fn taps_by_channel(ws: &[f32], channels: usize, taps: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; ws.len()];
    for c in 0..channels {
        for t in 0..taps {
            out[t * channels + c] = ws[c * taps + t];
        }
    }
    out
}

/// `acc += w * x` over one channel vector.
#[inline(always)]
fn axpy(acc: &mut [f32], w: &[f32], x: &[f32]) {
    for ((a, &w), &x) in acc.iter_mut().zip(w).zip(x) {
        *a += w * x;
    }
}

/// `acc += a * b` over one channel vector.
#[inline(always)]
fn mul_acc(acc: &mut [f32], a: &[f32], b: &[f32]) {
    for ((s, &a), &b) in acc.iter_mut().zip(a).zip(b) {
        *s += a * b;
    }
}

/// One image's forward pass, channels last: `y[oy, ox, :] += w[tap, :] * x[iy, ix, :]` over
/// the taps that land inside the image.
#[inline(always)]
fn forward_image(d: &Dims, xt: &[f32], wt: &[f32], yt: &mut [f32]) {
    let c = d.channels;
    for (oy, out) in yt.chunks_mut((d.wo * c).max(1)).enumerate() {
        for i in 0..d.kh {
            if !d.row_ranges[i].contains(&oy) {
                continue;
            }
            let xrow = &xt[(oy * d.sh + i - d.top) * d.w * c..][..d.w * c];
            for j in 0..d.kw {
                let w = &wt[(i * d.kw + j) * c..][..c];
                for ox in d.col_ranges[j].clone() {
                    let ix = ox * d.sw + j - d.left;
                    axpy(&mut out[ox * c..][..c], w, &xrow[ix * c..][..c]);
                }
            }
        }
    }
}

/// One image's backward pass, channels last: the input gradient into `dx`, and the weight
/// gradient `[taps, C]` summed per output row in f32, over the rows in f64.
#[inline(always)]
fn backward_image(d: &Dims, xt: &[f32], gt: &[f32], wt: &[f32], dx: &mut [f32]) -> Vec<f64> {
    let c = d.channels;
    let taps = d.kh * d.kw;
    let mut dw = vec![0.0f64; taps * c];
    let mut row_dw = vec![0.0f32; taps * c];
    for oy in 0..d.ho {
        row_dw.fill(0.0);
        let grow = &gt[oy * d.wo * c..][..d.wo * c];
        for i in 0..d.kh {
            if !d.row_ranges[i].contains(&oy) {
                continue;
            }
            let iy = oy * d.sh + i - d.top;
            let xrow = &xt[iy * d.w * c..][..d.w * c];
            let dxrow = &mut dx[iy * d.w * c..][..d.w * c];
            for j in 0..d.kw {
                let t = i * d.kw + j;
                let w = &wt[t * c..][..c];
                let acc = &mut row_dw[t * c..][..c];
                for ox in d.col_ranges[j].clone() {
                    let ix = ox * d.sw + j - d.left;
                    let g = &grow[ox * c..][..c];
                    axpy(&mut dxrow[ix * c..][..c], w, g);
                    mul_acc(acc, g, &xrow[ix * c..][..c]);
                }
            }
        }
        for (s, &r) in dw.iter_mut().zip(&row_dw) {
            *s += f64::from(r);
        }
    }
    dw
}

simd_dispatch!(fn forward_image_simd(d: &Dims, xt: &[f32], wt: &[f32], yt: &mut [f32]) => forward_image);
simd_dispatch!(
    fn backward_image_simd(d: &Dims, xt: &[f32], gt: &[f32], wt: &[f32], dx: &mut [f32]) -> Vec<f64>
        => backward_image
);

impl DepthwiseBackend for Flex {
    fn depthwise_conv2d(x: FlexTensor, weight: FlexTensor, geometry: Geometry) -> FlexTensor {
        let (x, weight) = (contiguous(x), contiguous(weight));
        let d = Dims::new(&x, &weight, geometry);
        let batch = d.planes / d.channels.max(1);
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let wt = taps_by_channel(
            weight.as_slice::<f32>().expect("contiguous f32"),
            d.channels,
            d.kh * d.kw,
        );
        let (img_in, img_out) = (d.h * d.w * d.channels, d.ho * d.wo * d.channels);
        let mut out = super::zeroed(batch * img_out);
        // One task per image: its input and output go channels-last in task-local buffers.
        out.par_chunks_mut(img_out.max(1))
            .zip(xs.par_chunks(img_in.max(1)))
            .for_each(|(y, x)| {
                let mut xt = vec![0.0f32; img_in];
                to_channels_last(x, d.channels, &mut xt);
                let mut yt = vec![0.0f32; img_out];
                forward_image_simd(&d, &xt, &wt, &mut yt);
                to_channels_first(&yt, d.channels, y);
            });
        from_vec_shaped(out, Shape::new([batch, d.channels, d.ho, d.wo]))
    }

    fn depthwise_conv2d_backward(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        geometry: Geometry,
    ) -> (FlexTensor, FlexTensor) {
        let (x, weight, grad) = (contiguous(x), contiguous(weight), contiguous(grad));
        let d = Dims::new(&x, &weight, geometry);
        let taps = d.kh * d.kw;
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let gs = grad.as_slice::<f32>().expect("contiguous f32");
        let wt = taps_by_channel(
            weight.as_slice::<f32>().expect("contiguous f32"),
            d.channels,
            taps,
        );
        let (img_in, img_out) = (d.h * d.w * d.channels, d.ho * d.wo * d.channels);
        let mut dx = super::zeroed(xs.len());
        // One task per image (rows of one image write overlapping input rows); the weight
        // gradient is summed over the images in order, so it does not depend on the threads.
        let parts: Vec<Vec<f64>> = dx
            .par_chunks_mut(img_in.max(1))
            .zip(xs.par_chunks(img_in.max(1)))
            .zip(gs.par_chunks(img_out.max(1)))
            .map(|((dx, x), g)| {
                let (mut xt, mut gt) = (vec![0.0f32; img_in], vec![0.0f32; img_out]);
                to_channels_last(x, d.channels, &mut xt);
                to_channels_last(g, d.channels, &mut gt);
                let mut dxt = vec![0.0f32; img_in];
                let dw = backward_image_simd(&d, &xt, &gt, &wt, &mut dxt);
                to_channels_first(&dxt, d.channels, dx);
                dw
            })
            .collect();
        // The images' weight gradients summed in image order, and `[taps, C]` turned back into
        // the weight's `[C, kh, kw]`, both on every core: on the calling thread alone they
        // kept the other cores waiting (BENCHMARKS.md, "CPU speed, fifth round").
        let mut dw = vec![0.0f64; taps * d.channels];
        dw.par_chunks_mut(super::CHUNK)
            .enumerate()
            .for_each(|(i, out)| {
                for part in &parts {
                    for (s, v) in out.iter_mut().zip(&part[i * super::CHUNK..]) {
                        *s += v;
                    }
                }
            });
        let mut dw_out = vec![0.0f32; taps * d.channels];
        dw_out
            .par_chunks_mut(taps.max(1))
            .enumerate()
            .for_each(|(c, out)| {
                for (t, o) in out.iter_mut().enumerate() {
                    *o = dw[t * d.channels + c] as f32;
                }
            });
        (
            from_vec_shaped(dx, x.shape()),
            from_vec_shaped(dw_out, Shape::new([d.channels, d.kh, d.kw])),
        )
    }
}

impl<B: DepthwiseBackend, C: CheckpointStrategy> DepthwiseBackend for Autodiff<B, C> {
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        geometry: Geometry,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DepthwiseGrad;

        impl<B: DepthwiseBackend> Backward<B, 2> for DepthwiseGrad {
            type State = (FloatTensor<B>, FloatTensor<B>, Geometry);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 2>(ops, grads, |(x, weight, geometry), grad, _| {
                    let (dx, dw) = B::depthwise_conv2d_backward(x, weight, grad, geometry);
                    [Some(dx), Some(dw)]
                });
            }
        }

        record::<C, _, _, _>(
            DepthwiseGrad,
            [x, weight],
            |[x, weight]| B::depthwise_conv2d(x, weight, geometry),
            |[x, weight], _| (x, weight, geometry),
        )
    }

    fn depthwise_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: Geometry,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) = B::depthwise_conv2d_backward(
            x.into_primitive(),
            weight.into_primitive(),
            grad.into_primitive(),
            geometry,
        );
        (FloatTensor::<Self>::new(dx), FloatTensor::<Self>::new(dw))
    }
}
