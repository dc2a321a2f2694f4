//! Depthwise 2-D convolution (one filter per channel) for burn's Flex backend, forward and
//! backward, on every core.
//!
//! burn-flex runs a grouped convolution's forward pass as a general 3-D convolution and its
//! input gradient through `conv_transpose3d`, both on one thread; in EfficientNet-Lite0 (the
//! demo's backbone) those left the second core idle for much of each step (BENCHMARKS.md,
//! "The demo setting beside the release"). Here each (image, channel) plane is one rayon task:
//! the output and the input gradient are plane-local, and the weight gradient is summed per
//! plane, then over the images.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, from_vec_shaped};

/// Where the kernel runs over the input: `[stride_h, stride_w, pad_top, pad_left, out_h,
/// out_w]`. Padding is implicit zeros; the bottom and right padding follow from the output
/// size.
pub type Geometry = [usize; 6];

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
}

impl Dims {
    fn new(x: &FlexTensor, weight: &FlexTensor, g: Geometry) -> Self {
        let xs = x.shape();
        let ws = weight.shape();
        let [sh, sw, top, left, ho, wo] = g;
        Self {
            planes: xs[0] * xs[1],
            channels: xs[1],
            h: xs[2],
            w: xs[3],
            kh: ws[1],
            kw: ws[2],
            sh: sh.max(1),
            sw: sw.max(1),
            top,
            left,
            ho,
            wo,
        }
    }

    /// The output rows `oy` whose input row `oy * sh + i - top` lies inside the image.
    fn rows(&self, i: usize) -> std::ops::Range<usize> {
        valid(self.h, self.sh, self.top, i, self.ho)
    }

    fn cols(&self, j: usize) -> std::ops::Range<usize> {
        valid(self.w, self.sw, self.left, j, self.wo)
    }
}

/// `o` in `0..out` with `0 <= o * stride + k - pad < size`.
fn valid(size: usize, stride: usize, pad: usize, k: usize, out: usize) -> std::ops::Range<usize> {
    // o * stride >= pad - k
    let lo = pad.saturating_sub(k).div_ceil(stride);
    // o * stride + k - pad <= size - 1  <=>  o * stride <= size - 1 + pad - k
    let hi = if size + pad > k {
        ((size - 1 + pad - k) / stride + 1).min(out)
    } else {
        0
    };
    lo.min(hi)..hi
}

impl DepthwiseBackend for Flex {
    fn depthwise_conv2d(x: FlexTensor, weight: FlexTensor, geometry: Geometry) -> FlexTensor {
        let (x, weight) = (contiguous(x), contiguous(weight));
        let d = Dims::new(&x, &weight, geometry);
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let ws = weight.as_slice::<f32>().expect("contiguous f32");
        let (plane_in, plane_out, taps) = (d.h * d.w, d.ho * d.wo, d.kh * d.kw);
        let mut out = vec![0.0f32; d.planes * plane_out];
        out.par_chunks_mut(plane_out.max(1))
            .enumerate()
            .for_each(|(p, y)| {
                let x = &xs[p * plane_in..(p + 1) * plane_in];
                let w = &ws[(p % d.channels) * taps..(p % d.channels + 1) * taps];
                for i in 0..d.kh {
                    for oy in d.rows(i) {
                        let row = &x[(oy * d.sh + i - d.top) * d.w..][..d.w];
                        let yrow = &mut y[oy * d.wo..(oy + 1) * d.wo];
                        for j in 0..d.kw {
                            let wij = w[i * d.kw + j];
                            let cols = d.cols(j);
                            // An empty range may start left of the padding: skip it before
                            // computing an input position from it.
                            if cols.is_empty() {
                                continue;
                            }
                            if d.sw == 1 {
                                let start = cols.start + j - d.left;
                                let src = &row[start..start + cols.len()];
                                for (o, &v) in yrow[cols].iter_mut().zip(src) {
                                    *o += wij * v;
                                }
                            } else {
                                for ox in cols {
                                    yrow[ox] += wij * row[ox * d.sw + j - d.left];
                                }
                            }
                        }
                    }
                }
            });
        from_vec_shaped(
            out,
            Shape::new([d.planes / d.channels, d.channels, d.ho, d.wo]),
        )
    }

    fn depthwise_conv2d_backward(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        geometry: Geometry,
    ) -> (FlexTensor, FlexTensor) {
        let (x, weight, grad) = (contiguous(x), contiguous(weight), contiguous(grad));
        let d = Dims::new(&x, &weight, geometry);
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let ws = weight.as_slice::<f32>().expect("contiguous f32");
        let gs = grad.as_slice::<f32>().expect("contiguous f32");
        let (plane_in, plane_out, taps) = (d.h * d.w, d.ho * d.wo, d.kh * d.kw);
        let mut dx = vec![0.0f32; d.planes * plane_in];
        // Per plane: its input gradient, and its share of the weight gradient (f64 sums).
        let dw_planes: Vec<Vec<f64>> = dx
            .par_chunks_mut(plane_in.max(1))
            .enumerate()
            .map(|(p, dxp)| {
                let x = &xs[p * plane_in..(p + 1) * plane_in];
                let g = &gs[p * plane_out..(p + 1) * plane_out];
                let w = &ws[(p % d.channels) * taps..(p % d.channels + 1) * taps];
                let mut dw = vec![0.0f64; taps];
                for i in 0..d.kh {
                    for oy in d.rows(i) {
                        let iy = oy * d.sh + i - d.top;
                        let row = &x[iy * d.w..(iy + 1) * d.w];
                        let drow = &mut dxp[iy * d.w..(iy + 1) * d.w];
                        let grow = &g[oy * d.wo..(oy + 1) * d.wo];
                        for j in 0..d.kw {
                            let wij = w[i * d.kw + j];
                            let cols = d.cols(j);
                            if cols.is_empty() {
                                continue;
                            }
                            let mut acc = 0.0f32;
                            if d.sw == 1 {
                                let start = cols.start + j - d.left;
                                let n = cols.len();
                                let gsl = &grow[cols];
                                for ((dv, &xv), &gv) in drow[start..start + n]
                                    .iter_mut()
                                    .zip(&row[start..start + n])
                                    .zip(gsl)
                                {
                                    *dv += wij * gv;
                                    acc += gv * xv;
                                }
                            } else {
                                for ox in cols {
                                    let ix = ox * d.sw + j - d.left;
                                    drow[ix] += wij * grow[ox];
                                    acc += grow[ox] * row[ix];
                                }
                            }
                            dw[i * d.kw + j] += f64::from(acc);
                        }
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0.0f64; d.channels * taps];
        for (p, part) in dw_planes.iter().enumerate() {
            let c = p % d.channels;
            for (t, v) in part.iter().enumerate() {
                dw[c * taps + t] += v;
            }
        }
        let dw = dw.into_iter().map(|v| v as f32).collect();
        (
            from_vec_shaped(dx, x.shape()),
            from_vec_shaped(dw, Shape::new([d.channels, d.kh, d.kw])),
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
                let [node_x, node_w] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, weight, geometry) = ops.state;
                let (dx, dw) = B::depthwise_conv2d_backward(x, weight, grad, geometry);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, dx);
                }
                if let Some(node) = node_w {
                    grads.register::<B>(node.id, dw);
                }
            }
        }

        let (x, x_node) = x.into_parts();
        let (weight, w_node) = weight.into_parts();
        match DepthwiseGrad
            .prepare::<C>([x_node, w_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::depthwise_conv2d(x.clone(), weight.clone(), geometry);
                prep.finish((x, weight, geometry), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::depthwise_conv2d(x, weight, geometry)),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_output_ranges_keep_inputs_inside() {
        // size 5, stride 2, pad 1, kernel 3 -> out 3; tap 0 reads o*2 - 1: o in 1..3.
        assert_eq!(valid(5, 2, 1, 0, 3), 1..3);
        assert_eq!(valid(5, 2, 1, 1, 3), 0..3);
        assert_eq!(valid(5, 2, 1, 2, 3), 0..2);
        // A tap that never lands inside.
        assert!(valid(1, 1, 3, 0, 1).is_empty());
        for (size, stride, pad, k, out) in [(7, 1, 2, 4, 7), (8, 2, 2, 4, 4), (3, 3, 0, 2, 1)] {
            let r = valid(size, stride, pad, k, out);
            for o in 0..out {
                let pos = (o * stride + k) as isize - pad as isize;
                assert_eq!(r.contains(&o), pos >= 0 && pos < size as isize, "{o}");
            }
        }
    }
}
