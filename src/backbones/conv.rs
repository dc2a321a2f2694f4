//! 2-D convolutions: our CPU kernels (`crate::backends::conv2d` for dense ones,
//! `crate::backends::depthwise` for depthwise ones), and a lowering to plain tensor ops (pad,
//! strided slices, matmul) that runs on any backend, which GPUs use for dense convolutions.
//!
//! burn-flex's own convolution is slow on this workload: its forward runs many small GEMMs
//! (512 output pixels at a time), its input gradient goes through `conv_transpose`, and the
//! weight gradient of a grouped (depthwise) convolution loops over the groups, one
//! convolution each. Expressed with ordinary tensor ops, the same convolutions become:
//!
//! - dense `k x k` (groups 1): im2col from `k*k` strided slices of the padded input, stacked,
//!   then a matmul with the `[Cout, Cin*k*k]` weight: one per image on large maps, one for the
//!   whole batch (batch and channel axes swapped) on small ones. A 1x1 convolution needs no
//!   im2col at all: it is the matmul on the reshaped input, after a strided slice when the
//!   stride is 2;
//! - depthwise (groups = channels): the sum over the `k*k` taps of a strided slice times that
//!   tap's per-channel weight.
//!
//! Autodiff differentiates these ops like any others, and they run on every backend. The
//! lowering still copies much (padding, stacked slices, transposes, the zeroed scatter of each
//! slice's backward), which the dense kernel does not (BENCHMARKS.md, "CPU speed, fifth
//! round"). The weights keep burn's [`Conv2d`] module and its `[out, in / groups, kh, kw]`
//! layout, so loading and naming are unchanged. [`conv2d`] picks our kernels on the Flex (CPU)
//! device in f32. On the GPU backends it picks the lowering for dense convolutions: without
//! burn's `autotune` feature (off in our GPU builds, see `Cargo.toml`), burn-cubecl computes
//! every convolution with its direct kernel, and the weight gradient as a direct convolution
//! whose kernel is the whole output gradient, while the lowering's work is in cubecl's tiled
//! matrix products (BENCHMARKS.md, "GPU convolutions through matrix products"). Depthwise and
//! other grouped convolutions keep burn's kernels there, and so does every convolution in a
//! build with `gpu-tuning`, whose autotune picks among burn's im2col and implicit-GEMM kernels.
//! `GCA_CONV=burn` or `GCA_CONV=lowered` forces burn's convolution or the lowering everywhere,
//! for comparisons.

use std::sync::OnceLock;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::ops::PadMode;
use burn::tensor::{Device, Slice, Tensor};

/// How a convolution is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvImpl {
    /// burn's `conv2d` (the backend's own kernel).
    Burn,
    /// [`lowered_conv2d`]: pad, slices, matmul.
    Lowered,
    /// Our dense im2col + GEMM kernel ([`crate::backends::conv2d`]), Flex only.
    Dense,
    /// Our multi-threaded depthwise kernel ([`crate::backends::depthwise`]), Flex only.
    Depthwise,
}

/// The `GCA_CONV` override, read once.
fn forced() -> Option<ConvImpl> {
    static FORCED: OnceLock<Option<ConvImpl>> = OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var("GCA_CONV").ok()?.as_str() {
        "burn" => Some(ConvImpl::Burn),
        "lowered" => Some(ConvImpl::Lowered),
        other => {
            eprintln!("warning: GCA_CONV must be `burn` or `lowered`, not `{other}`; ignored");
            None
        }
    })
}

/// The implementation [`conv2d`] uses for `conv` on `device`: on the Flex device our kernels
/// for dense and depthwise convolutions (both measured faster than burn-flex's own and than
/// the lowering: see BENCHMARKS.md); on other devices (the GPU backends) the lowering for
/// dense convolutions, unless the build has `gpu-tuning`; burn's own everywhere else.
pub fn conv_impl_for(conv: &Conv2d, device: &Device) -> ConvImpl {
    forced().unwrap_or_else(|| {
        let dense = conv.groups == 1 && conv.dilation == [1, 1];
        if device.clone().inner() != Device::flex() {
            // With `gpu-tuning`, burn's autotune chooses among its own im2col and
            // implicit-GEMM kernels, which is what the lowering stands in for.
            if dense && !cfg!(feature = "gpu-tuning") {
                ConvImpl::Lowered
            } else {
                ConvImpl::Burn
            }
        } else if dense {
            ConvImpl::Dense
        } else if is_depthwise(conv) && conv.dilation == [1, 1] {
            ConvImpl::Depthwise
        } else {
            ConvImpl::Burn
        }
    })
}

/// One filter per channel: `groups == in == out channels`.
fn is_depthwise(conv: &Conv2d) -> bool {
    let [co, cig, _, _] = conv.weight.dims();
    cig == 1 && co == conv.groups
}

/// `conv.forward(x)`, computed the fastest known way for `x`'s device.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let choice = conv_impl_for(conv, &x.device());
    if crate::nn::precision::is_reduced(&x) && choice != ConvImpl::Lowered {
        // Our CPU kernels are f32 only: reduced precision takes burn's kernel, weights cast.
        return crate::nn::precision::conv2d(conv, x);
    }
    match choice {
        ConvImpl::Burn => conv.forward(x),
        ConvImpl::Lowered => lowered_conv2d(conv, x),
        ConvImpl::Dense => kernel_dense_conv2d(conv, x),
        ConvImpl::Depthwise => kernel_depthwise_conv2d(conv, x),
    }
}

/// `conv.forward(x)` for a dense convolution through our kernel on the Flex device in f32;
/// burn's own convolution for anything else.
pub fn kernel_dense_conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let weight = conv.weight.val();
    let [_, ci, _, _] = weight.dims();
    match kernel_geometry(conv, &x) {
        Some(geometry) if conv.groups == 1 && ci == x.dims()[1] => {
            with_bias(conv, crate::backends::conv2d::conv2d(x, weight, geometry))
        }
        _ => conv.forward(x),
    }
}

/// `conv.forward(x)` for a depthwise convolution through our kernel on the Flex device in f32;
/// burn's own convolution for anything else.
pub fn kernel_depthwise_conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let weight = conv.weight.val();
    let [co, _, kh, kw] = weight.dims();
    match kernel_geometry(conv, &x) {
        Some(geometry) if is_depthwise(conv) && co == x.dims()[1] => {
            let weight = weight.reshape([co, kh, kw]);
            with_bias(
                conv,
                crate::backends::depthwise::depthwise_conv2d(x, weight, geometry),
            )
        }
        _ => conv.forward(x),
    }
}

/// Where our kernels run `conv` over `x`: strides, top and left padding, output size; `None`
/// where they do not apply (dilation, a padded map smaller than the kernel, a dtype other
/// than f32, a device other than Flex).
fn kernel_geometry(conv: &Conv2d, x: &Tensor<4>) -> Option<crate::backends::Geometry> {
    let [_, _, h, w] = x.dims();
    let [_, _, kh, kw] = conv.weight.val().dims();
    let stride = conv.stride;
    let (top, bottom) = padding_pair(&conv.padding, 0, h, kh, stride[0]);
    let (left, right) = padding_pair(&conv.padding, 1, w, kw, stride[1]);
    let (hp, wp) = (h + top + bottom, w + left + right);
    if conv.dilation != [1, 1]
        || hp < kh
        || wp < kw
        || x.dtype() != burn::tensor::DType::F32
        || !crate::backends::is_flex(&x.device())
    {
        return None;
    }
    let (ho, wo) = ((hp - kh) / stride[0] + 1, (wp - kw) / stride[1] + 1);
    Some([stride[0], stride[1], top, left, ho, wo])
}

/// `y` plus `conv`'s bias, when it has one.
fn with_bias(conv: &Conv2d, y: Tensor<4>) -> Tensor<4> {
    match &conv.bias {
        Some(bias) => {
            let [co] = bias.val().dims();
            y + bias.val().reshape([1, co, 1, 1])
        }
        None => y,
    }
}

/// `x[.., .., i.., j..]` with the given strides, `ho x wo` positions.
fn tap(
    x: &Tensor<4>,
    (i, j): (usize, usize),
    (ho, wo): (usize, usize),
    [sh, sw]: [usize; 2],
) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let end_h = i + (ho - 1) * sh + 1;
    let end_w = j + (wo - 1) * sw + 1;
    if (i, j, end_h, end_w, sh, sw) == (0, 0, h, w, 1, 1) {
        return x.clone();
    }
    x.clone().slice([
        Slice::full(),
        Slice::full(),
        Slice::new(i as isize, Some(end_h as isize), sh as isize),
        Slice::new(j as isize, Some(end_w as isize), sw as isize),
    ])
}

/// From this many output pixels per image on, [`im2col_matmul`] multiplies image by image;
/// below it, channels first with one GEMM for the whole batch. Small maps make per-image
/// matrices too small to keep the GEMM busy; large maps would pay for transposing copies of
/// big activations. The threshold and its measurements: BENCHMARKS.md, "What changed".
const PER_IMAGE_MIN_PIXELS: usize = 700;

/// A dense convolution of the already padded `xp` as im2col and matmul: the `k*k` strided
/// slices stacked into columns in the (cin, kh, kw) order of the weight's rows.
fn im2col_matmul(
    xp: &Tensor<4>,
    weight: Tensor<4>,
    stride: [usize; 2],
    (ho, wo): (usize, usize),
) -> Tensor<4> {
    let [b, ci, _, _] = xp.dims();
    let [co, _, kh, kw] = weight.dims();
    let taps = (0..kh).flat_map(|i| (0..kw).map(move |j| (i, j)));
    let k = ci * kh * kw;
    if ho * wo >= PER_IMAGE_MIN_PIXELS {
        // `[1, Cout, K] x [B, K, Ho*Wo]`, one GEMM per image.
        let cols = if kh * kw == 1 {
            tap(xp, (0, 0), (ho, wo), stride).reshape([b, ci, ho * wo])
        } else {
            let slices: Vec<Tensor<4>> = taps.map(|ij| tap(xp, ij, (ho, wo), stride)).collect();
            Tensor::stack::<5>(slices, 2).reshape([b, k, ho * wo])
        };
        weight
            .reshape([1, co, k])
            .matmul(cols)
            .reshape([b, co, ho, wo])
    } else {
        // Channels first, `[Cin, B, Hp, Wp]`: `[Cout, K] x [K, B*Ho*Wo]`, one GEMM in all.
        let xt = xp.clone().swap_dims(0, 1);
        let cols = if kh * kw == 1 {
            tap(&xt, (0, 0), (ho, wo), stride).reshape([ci, b * ho * wo])
        } else {
            let slices: Vec<Tensor<4>> = taps.map(|ij| tap(&xt, ij, (ho, wo), stride)).collect();
            Tensor::stack::<5>(slices, 1).reshape([k, b * ho * wo])
        };
        weight
            .reshape([co, k])
            .matmul(cols)
            .reshape([co, b, ho, wo])
            .swap_dims(0, 1)
    }
}

/// Padding before and after along spatial axis `axis` (0 height, 1 width), as burn's
/// `Conv2d` computes it: TensorFlow/ONNX "SAME" puts the odd pixel after.
pub(crate) fn padding_pair(
    padding: &PaddingConfig2d,
    axis: usize,
    size: usize,
    kernel: usize,
    stride: usize,
) -> (usize, usize) {
    match *padding {
        PaddingConfig2d::Valid => (0, 0),
        PaddingConfig2d::Explicit(top, left, bottom, right) => {
            if axis == 0 {
                (top, bottom)
            } else {
                (left, right)
            }
        }
        PaddingConfig2d::Same => {
            let out = size.div_ceil(stride);
            let total = ((out.max(1) - 1) * stride + kernel).saturating_sub(size);
            (total / 2, total - total / 2)
        }
    }
}

/// The same result as `conv.forward(x)` from pad, slice, stack, multiply and matmul.
/// Dilated convolutions and groups other than 1 and "depthwise" fall back to burn's
/// convolution.
/// The weights are cast to `x`'s dtype, so that the lowering also runs in reduced precision.
pub fn lowered_conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    use crate::nn::precision::weight_for;
    let [_, ci, h, w] = x.dims();
    let weight = weight_for(conv.weight.val(), &x);
    let [co, cig, kh, kw] = weight.dims();
    let depthwise = conv.groups == ci && cig == 1 && co == ci;
    if conv.dilation != [1, 1] || !(conv.groups == 1 || depthwise) {
        return crate::nn::precision::conv2d(conv, x);
    }
    let stride = conv.stride;
    let (top, bottom) = padding_pair(&conv.padding, 0, h, kh, stride[0]);
    let (left, right) = padding_pair(&conv.padding, 1, w, kw, stride[1]);
    let (hp, wp) = (h + top + bottom, w + left + right);
    let (ho, wo) = ((hp - kh) / stride[0] + 1, (wp - kw) / stride[1] + 1);
    let xp = if top + bottom + left + right > 0 {
        x.pad([(top, bottom), (left, right)], PadMode::Constant(0.0))
    } else {
        x
    };
    let taps = (0..kh).flat_map(|i| (0..kw).map(move |j| (i, j)));
    let y = if depthwise {
        let w = weight.reshape([co, kh * kw]);
        taps.enumerate()
            .map(|(k, ij)| {
                let wk = w.clone().slice([0..co, k..k + 1]).reshape([1, co, 1, 1]);
                tap(&xp, ij, (ho, wo), stride) * wk
            })
            .reduce(|a, t| a + t)
            .expect("a kernel has at least one tap")
    } else {
        im2col_matmul(&xp, weight, stride, (ho, wo))
    };
    match &conv.bias {
        Some(bias) => {
            let bias = weight_for(bias.val(), &y).reshape([1, co, 1, 1]);
            y + bias
        }
        None => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    struct Case {
        batch: usize,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: PaddingConfig2d,
        groups: usize,
        bias: bool,
        size: [usize; 2],
    }

    fn case(cin: usize, cout: usize, k: usize, stride: usize, padding: PaddingConfig2d) -> Case {
        Case {
            batch: 2,
            cin,
            cout,
            k,
            stride,
            padding,
            groups: 1,
            bias: false,
            size: [9, 8],
        }
    }

    fn data(t: Tensor<4>) -> TensorData {
        t.into_data()
    }

    /// Forward output and the input and weight gradients of the lowered convolution against
    /// burn's `Conv2d` on the same random input, weights and output gradient.
    fn check(c: Case) {
        check_on(c, Device::flex().autodiff());
    }

    /// [`check`] on `device`; our kernels are compared only where they run (Flex).
    fn check_on(c: Case, device: Device) {
        let mut conv = Conv2dConfig::new([c.cin, c.cout], [c.k; 2])
            .with_stride([c.stride; 2])
            .with_padding(c.padding.clone())
            .with_groups(c.groups)
            .with_bias(c.bias)
            .init(&device);
        if let Some(bias) = &conv.bias {
            // Non-zero so that the bias path is exercised.
            let dims = bias.val().dims();
            conv.bias = Some(Param::from_tensor(Tensor::random(
                dims,
                Distribution::Normal(0.0, 1.0),
                &device,
            )));
        }
        let x = Tensor::<4>::random(
            [c.batch, c.cin, c.size[0], c.size[1]],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let run = |how: ConvImpl| {
            let x = x.clone().detach().require_grad();
            let y = match how {
                ConvImpl::Burn => conv.forward(x.clone()),
                ConvImpl::Lowered => lowered_conv2d(&conv, x.clone()),
                ConvImpl::Dense => kernel_dense_conv2d(&conv, x.clone()),
                ConvImpl::Depthwise => kernel_depthwise_conv2d(&conv, x.clone()),
            };
            // A fixed, non-uniform output gradient: sum(y * g).
            let g = Tensor::<4>::from_data(
                TensorData::new(
                    (0..y.dims().iter().product::<usize>())
                        .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
                        .collect::<Vec<_>>(),
                    y.dims(),
                ),
                &device,
            );
            let grads = (y.clone() * g).sum().backward();
            let gx = x.grad(&grads).expect("input gradient");
            let gw = conv.weight.val().grad(&grads).expect("weight gradient");
            let gb = conv
                .bias
                .as_ref()
                .map(|b| b.val().grad(&grads).expect("bias gradient").into_data());
            (data(y), gx.into_data(), gw.into_data(), gb)
        };
        let (y0, gx0, gw0, gb0) = run(ConvImpl::Burn);
        let mut ours = vec![ConvImpl::Lowered];
        let flex = crate::backends::is_flex(&device);
        if is_depthwise(&conv) && flex {
            ours.push(ConvImpl::Depthwise);
        }
        if c.groups == 1 && flex {
            ours.push(ConvImpl::Dense);
        }
        for how in ours {
            let (y1, gx1, gw1, gb1) = run(how);
            assert_eq!(y0.shape(), y1.shape(), "{how:?}: output shape");
            let tol = Tolerance::<f32>::absolute(1e-4).set_relative(1e-4);
            y1.assert_approx_eq::<f32>(&y0, tol);
            gx1.assert_approx_eq::<f32>(&gx0, tol);
            gw1.assert_approx_eq::<f32>(&gw0, tol);
            if let (Some(a), Some(b)) = (gb1, gb0.clone()) {
                a.assert_approx_eq::<f32>(&b, tol);
            }
        }
    }

    #[test]
    fn flex_runs_dense_and_depthwise_convolutions_through_the_kernels() {
        if forced().is_some() {
            return; // GCA_CONV overrides the policy.
        }
        let d = Device::flex();
        let dense = Conv2dConfig::new([4, 4], [3, 3]).init(&d);
        let depthwise = Conv2dConfig::new([4, 4], [3, 3]).with_groups(4).init(&d);
        assert_eq!(conv_impl_for(&dense, &d), ConvImpl::Dense);
        assert_eq!(
            conv_impl_for(&dense, &d.clone().autodiff()),
            ConvImpl::Dense
        );
        assert_eq!(conv_impl_for(&depthwise, &d), ConvImpl::Depthwise);
        let grouped = Conv2dConfig::new([4, 4], [3, 3]).with_groups(2).init(&d);
        assert_eq!(conv_impl_for(&grouped, &d), ConvImpl::Burn);
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn gpus_run_dense_convolutions_through_the_lowering() {
        if forced().is_some() {
            return; // GCA_CONV overrides the policy.
        }
        // Naming the device opens no adapter.
        let d = crate::device::DeviceSpec::Wgpu(crate::device::Adapter::Cpu)
            .device()
            .unwrap();
        let dense = Conv2dConfig::new([4, 4], [3, 3]).init(&Device::flex());
        let depthwise = Conv2dConfig::new([4, 4], [3, 3])
            .with_groups(4)
            .init(&Device::flex());
        let expected = if cfg!(feature = "gpu-tuning") {
            ConvImpl::Burn
        } else {
            ConvImpl::Lowered
        };
        assert_eq!(conv_impl_for(&dense, &d), expected);
        assert_eq!(conv_impl_for(&dense, &d.clone().autodiff()), expected);
        assert_eq!(conv_impl_for(&depthwise, &d), ConvImpl::Burn);
    }

    /// The lowering against burn-cubecl's own convolution on Mesa's llvmpipe through wgpu:
    /// forward and both gradients, on the paths ResNet-50 takes (per-image and whole-batch
    /// GEMMs, 1x1 with stride 2, the 7x7 stem with bias).
    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a Vulkan driver with a CPU adapter (Mesa's llvmpipe; CI installs it)"]
    fn the_lowering_matches_burns_convolution_on_llvmpipe() {
        let device = crate::device::DeviceSpec::Wgpu(crate::device::Adapter::Cpu)
            .open()
            .expect("wgpu:cpu (llvmpipe)")
            .autodiff();
        let same = |k: usize| PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2);
        check_on(case(5, 6, 3, 1, same(3)), device.clone());
        check_on(case(6, 4, 1, 2, PaddingConfig2d::Valid), device.clone());
        check_on(
            Case {
                size: [28, 26],
                ..case(3, 5, 3, 1, same(3))
            },
            device.clone(),
        );
        check_on(
            Case {
                size: [56, 56],
                bias: true,
                ..case(3, 4, 7, 2, same(7))
            },
            device.clone(),
        );
        check_on(
            Case {
                size: [30, 28],
                ..case(4, 3, 1, 1, PaddingConfig2d::Valid)
            },
            device,
        );
    }

    #[test]
    fn pointwise_matches_burn() {
        check(case(5, 7, 1, 1, PaddingConfig2d::Valid));
    }

    #[test]
    fn pointwise_stride2_matches_burn() {
        check(case(5, 7, 1, 2, PaddingConfig2d::Valid));
    }

    #[test]
    fn dense_3x3_padded_matches_burn() {
        check(case(4, 6, 3, 1, PaddingConfig2d::Explicit(1, 1, 1, 1)));
    }

    #[test]
    fn dense_3x3_per_image_path_matches_burn() {
        // 28 x 26 = 728 output pixels: the image-by-image GEMMs.
        let mut c = case(3, 4, 3, 1, PaddingConfig2d::Explicit(1, 1, 1, 1));
        c.size = [28, 26];
        check(c);
    }

    #[test]
    fn pointwise_per_image_path_with_bias_matches_burn() {
        let mut c = case(3, 4, 1, 1, PaddingConfig2d::Valid);
        c.size = [28, 26];
        c.bias = true;
        check(c);
    }

    #[test]
    fn dense_kernel_image_groups_match_burn() {
        // 20 x 20 = 400 output pixels: two images per GEMM, the last group holding one.
        let mut c = case(3, 5, 3, 1, PaddingConfig2d::Explicit(1, 1, 1, 1));
        c.size = [20, 20];
        c.batch = 3;
        check(c);
        // 28 x 28 = 784: one image per GEMM, the 1x1 input multiplied in place.
        let mut c = case(6, 4, 1, 1, PaddingConfig2d::Valid);
        c.size = [28, 28];
        check(c);
        // Stride 2 and a map smaller than the kernel's reach: columns of padding only.
        let mut c = case(3, 4, 5, 2, PaddingConfig2d::Explicit(2, 2, 2, 2));
        c.size = [3, 2];
        c.batch = 3;
        check(c);
    }

    #[test]
    fn dense_kernel_results_do_not_depend_on_the_thread_count() {
        let device = Device::flex().autodiff();
        let conv = Conv2dConfig::new([16, 24], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = Tensor::<4>::random([3, 16, 30, 30], Distribution::Normal(0.0, 1.0), &device);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                let x = x.clone().detach().require_grad();
                let y = kernel_dense_conv2d(&conv, x.clone());
                let grads = (y.clone() * y.clone()).sum().backward();
                let gx = x.grad(&grads).expect("input gradient").into_data();
                let gw = conv.weight.val().grad(&grads).expect("weight gradient");
                (y.into_data(), gx, gw.into_data())
            })
        };
        let (y1, gx1, gw1) = run(1);
        let (y3, gx3, gw3) = run(3);
        assert_eq!(y1, y3);
        assert_eq!(gx1, gx3);
        assert_eq!(gw1, gw3);
    }

    #[test]
    fn dense_kernel_weight_gradient_without_an_input_gradient_matches_burn() {
        // An image batch needs no gradient: the kernel skips the input gradient.
        let device = Device::flex().autodiff();
        let conv = Conv2dConfig::new([3, 8], [7, 7])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(3, 3, 3, 3))
            .init(&device);
        let x = Tensor::<4>::random([2, 3, 33, 31], Distribution::Normal(0.0, 1.0), &device);
        let gw = |y: Tensor<4>| {
            let grads = (y.clone() * y).sum().backward();
            conv.weight
                .val()
                .grad(&grads)
                .expect("weight gradient")
                .into_data()
        };
        let ours = gw(kernel_dense_conv2d(&conv, x.clone()));
        let burns = gw(conv.forward(x));
        ours.assert_approx_eq::<f32>(&burns, Tolerance::<f32>::absolute(1e-3).set_relative(1e-4));
    }

    #[test]
    fn dense_3x3_stride2_padded_matches_burn() {
        check(case(4, 6, 3, 2, PaddingConfig2d::Explicit(1, 1, 1, 1)));
    }

    #[test]
    fn dense_7x7_stride2_pad3_with_bias_matches_burn() {
        let mut c = case(3, 5, 7, 2, PaddingConfig2d::Explicit(3, 3, 3, 3));
        c.bias = true;
        c.size = [13, 12];
        check(c);
    }

    #[test]
    fn dense_same_stride2_matches_burn() {
        // Even input, stride 2: TensorFlow "SAME" pads one more pixel right and bottom.
        check(case(3, 4, 3, 2, PaddingConfig2d::Same));
    }

    #[test]
    fn depthwise_with_asymmetric_padding_and_tiny_maps_matches_burn() {
        // Explicit padding on one side only, a map smaller than the kernel in one axis.
        let mut c = case(3, 3, 3, 1, PaddingConfig2d::Explicit(2, 0, 0, 1));
        c.groups = 3;
        c.size = [4, 2];
        check(c);
        let mut c = case(5, 5, 5, 2, PaddingConfig2d::Same);
        c.groups = 5;
        c.size = [1, 1];
        check(c);
        // Stride 1 on maps of one and two pixels: taps whose every position is padding.
        for (k, size) in [(3, [1, 1]), (5, [1, 1]), (5, [2, 1]), (5, [1, 3])] {
            let mut c = case(4, 4, k, 1, PaddingConfig2d::Same);
            c.groups = 4;
            c.size = size;
            check(c);
        }
    }

    #[test]
    fn depthwise_at_efficientnet_widths_matches_burn() {
        // EfficientNet-Lite0's depthwise layers at 32 px: wide channel vectors, maps down to
        // one pixel.
        for (ch, k, stride, size) in [
            (32, 3, 1, [16, 16]),
            (96, 3, 2, [16, 16]),
            (144, 5, 2, [8, 8]),
            (240, 3, 2, [4, 4]),
            (672, 5, 2, [2, 2]),
            (1152, 5, 1, [1, 1]),
        ] {
            let mut c = case(ch, ch, k, stride, PaddingConfig2d::Same);
            c.groups = ch;
            c.size = size;
            check(c);
        }
    }

    #[test]
    fn depthwise_3x3_same_matches_burn() {
        let mut c = case(6, 6, 3, 1, PaddingConfig2d::Same);
        c.groups = 6;
        check(c);
    }

    #[test]
    fn depthwise_5x5_same_stride2_matches_burn() {
        let mut c = case(6, 6, 5, 2, PaddingConfig2d::Same);
        c.groups = 6;
        c.size = [10, 11];
        check(c);
    }

    #[test]
    fn depthwise_3x3_explicit_stride2_with_bias_matches_burn() {
        let mut c = case(4, 4, 3, 2, PaddingConfig2d::Explicit(1, 1, 1, 1));
        c.groups = 4;
        c.bias = true;
        check(c);
    }

    #[test]
    fn other_groups_fall_back_to_burn() {
        let mut c = case(4, 6, 3, 1, PaddingConfig2d::Explicit(1, 1, 1, 1));
        c.groups = 2;
        check(c);
    }
}
