//! Exact (erf) GELU and its derivative, multi-threaded, for the Flex backend.
//!
//! burn-flex evaluates `0.5 x (1 + erf(x / sqrt 2))` element by element on one thread with
//! libm's `erff`. Here the normal CDF comes from the complementary error function in the
//! Chebyshev form of Numerical Recipes (`erfcc`, fractional error below 1.2e-7 everywhere),
//! evaluated in f32 with a branch-free `exp` so that the loops vectorise, and with `x^2 / 2`
//! kept exact so that the relative error of GELU and of its derivative stays within about
//! 1e-6 on both tails, far inside the parity tolerances of `verify reference`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::Flex;
use burn::backend::ops::ActivationOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, Tensor};
use std::mem::MaybeUninit;

use super::autodiff::{backward, record};
use super::{contiguous, from_vec, is_flex, par_map};

/// GELU with the exact (erf) formulation, as PyTorch's `nn.GELU()`: our multi-threaded kernel
/// on the CPU, burn's `gelu` on other devices.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if is_flex(&x.device()) {
        Tensor::from_dispatch(<Dispatch as GeluBackend>::exact_gelu(x.into_dispatch()))
    } else {
        burn::tensor::activation::gelu(x)
    }
}

/// The GELU operation as a backend extension, so that autodiff records our backward kernel.
#[backend_extension(Flex, Autodiff)]
pub trait GeluBackend: Backend {
    /// `x * Phi(x)`.
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `grad * (Phi(x) + x * phi(x))`; not itself differentiable (no double backward).
    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl GeluBackend for Flex {
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return Flex::gelu(x);
        }
        let x = contiguous(x);
        let src = x.as_slice::<f32>().expect("contiguous f32");
        let out = par_map(src.len(), |range, dst| gelu_slice(&src[range], dst));
        from_vec(out, &x)
    }

    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 || grad.dtype() != DType::F32 || x.shape() != grad.shape() {
            return Flex::gelu_backward(x, grad);
        }
        let x = contiguous(x);
        let grad = contiguous(grad);
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let gs = grad.as_slice::<f32>().expect("contiguous f32");
        let out = par_map(xs.len(), |range, dst| {
            gelu_backward_slice(&xs[range.clone()], &gs[range], dst)
        });
        from_vec(out, &x)
    }
}

impl<B: GeluBackend, C: CheckpointStrategy> GeluBackend for Autodiff<B, C> {
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluGrad;

        impl<B: GeluBackend> Backward<B, 1> for GeluGrad {
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 1>(ops, grads, |input, grad, _| {
                    [Some(B::exact_gelu_backward(input, grad))]
                });
            }
        }

        record::<C, _, _, _>(GeluGrad, [x], |[x]| B::exact_gelu(x), |[x], _| x)
    }

    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        FloatTensor::<Self>::new(B::exact_gelu_backward(
            x.into_primitive(),
            grad.into_primitive(),
        ))
    }
}

/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;
/// `1.5 * 2^23`: adding it rounds an f32 of magnitude below 2^22 to an integer, which then
/// sits in the low bits of the sum's representation (no float-to-int conversion, so the loops
/// vectorise the same way on every instruction set).
const ROUND: f32 = 12_582_912.0;
/// `ln 2` split so that `n * LN2_HI` is exact for `|n| < 256` (Cody and Waite).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Below `exp(-87)` the results round to zero (or to subnormals that the CPU flushes).
const EXP_MIN: f32 = -87.0;

/// `exp(p - s)` for `s = s_hi + s_lo >= 0` given as an unevaluated sum, branch-free so that
/// the loops vectorise. `s` is `x^2 / 2` in the Gaussian tails, up to 87: rounded to one f32,
/// its last place alone (4e-6 at 32) would cost the result that much relative accuracy, so
/// the reduction `p - s = n ln 2 + r`, `|r| <= ln 2 / 2`, subtracts `n ln 2` from `s_hi` first
/// (exactly) and then brings in `p` and the low parts. `exp(r)` is a degree-7 Taylor
/// polynomial (truncation below 6e-9).
#[inline(always)]
fn exp_diff(p: f32, s_hi: f32, s_lo: f32) -> f32 {
    let a = p - s_hi;
    let k = a.max(EXP_MIN) * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = ((-s_hi - n * LN2_HI) + p) - n * LN2_LO - s_lo;
    let e = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // The low bits of `k`'s representation are `n` (in [-126, 1] here); `n + 127` shifted
    // into the exponent field is `2^n`.
    let scale = f32::from_bits(k.to_bits().wrapping_add(127) << 23);
    if a < EXP_MIN { 0.0 } else { e * scale }
}

/// `(Phi(x), exp(-x^2 / 2))`, the latter only when `GAUSS` (the derivative needs it), in f32.
/// `1 - Phi(|x|) = erfc(z) / 2` with `z = |x| / sqrt 2` and Numerical Recipes' `erfcc`:
/// `erfc(z) = t exp(-z^2 + P(t))`, `t = 1 / (1 + z / 2)`, fractional error below 1.2e-7.
/// `z^2 = x^2 / 2` is kept exactly as a sum of two f32 (the low part by a fused multiply-add),
/// so the tails keep their relative accuracy (about 1e-6 at worst, unit-tested against tables
/// and an f64 evaluation). An f64 evaluation was twice as slow: half the vector lanes.
#[inline(always)]
fn normal_cdf<const GAUSS: bool>(x: f32) -> (f32, f32) {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.5 * (ax * std::f32::consts::FRAC_1_SQRT_2));
    let p = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_24 + t * 0.170_872_77))))))));
    let sq = ax * ax;
    let (s_hi, s_lo) = (0.5 * sq, 0.5 * ax.mul_add(ax, -sq));
    let tail = 0.5 * t * exp_diff(p, s_hi, s_lo);
    let cdf = if x < 0.0 { tail } else { 1.0 - tail };
    let gauss = if GAUSS {
        exp_diff(0.0, s_hi, s_lo)
    } else {
        0.0
    };
    (cdf, gauss)
}

#[inline(always)]
pub(super) fn gelu_f32(x: f32) -> f32 {
    x * normal_cdf::<false>(x).0
}

#[inline(always)]
pub(super) fn gelu_derivative_f32(x: f32) -> f32 {
    let (cdf, gauss) = normal_cdf::<true>(x);
    cdf + x * INV_SQRT_2PI * gauss
}

#[inline(always)]
fn gelu_slice_generic(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    for (o, &v) in dst.iter_mut().zip(src) {
        o.write(gelu_f32(v));
    }
}

#[inline(always)]
fn gelu_backward_slice_generic(xs: &[f32], gs: &[f32], dst: &mut [MaybeUninit<f32>]) {
    for ((o, &v), &g) in dst.iter_mut().zip(xs).zip(gs) {
        o.write(g * gelu_derivative_f32(v));
    }
}

// The loops compiled for AVX2 + FMA (8 lanes instead of SSE2's 4) and AVX-512 (16 lanes),
// chosen at run time.
simd_dispatch!(fn gelu_slice(src: &[f32], dst: &mut [MaybeUninit<f32>]) => gelu_slice_generic);
simd_dispatch!(
    fn gelu_backward_slice(xs: &[f32], gs: &[f32], dst: &mut [MaybeUninit<f32>])
        => gelu_backward_slice_generic
);

#[cfg(test)]
mod tests {
    use crate::backends::{has_avx2, has_avx512};
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};

    use super::*;

    fn device() -> burn::tensor::Device {
        burn::tensor::Device::flex()
    }

    #[test]
    fn matches_burns_gelu_on_values_and_gradients() {
        let dev = device().autodiff();
        let x = Tensor::<2>::random([123, 301], Distribution::Normal(0.0, 3.0), &dev);
        // Both tails and zero, where the relative error matters most.
        let edges =
            Tensor::<2>::from_floats([[-12.0, -8.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 9.0]], &dev);
        for x in [x, edges] {
            let w = Tensor::<2>::random(x.shape(), Distribution::Normal(0.0, 1.0), &dev);
            let a = x.clone().require_grad();
            let b = x.require_grad();
            let ours = gelu(a.clone());
            let theirs = burn::tensor::activation::gelu(b.clone());
            // burn's (and PyTorch's) `1 + erf` cancels in f32 on the negative tail, to an
            // absolute error of a few 1e-8 |x|: the absolute part of the tolerance covers that.
            let tol = Tolerance::<f32>::rel_abs(2e-6, 1e-6);
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&theirs.clone().into_data(), tol);
            let ga = (ours * w.clone()).sum().backward();
            let gb = (theirs * w).sum().backward();
            a.grad(&ga)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&b.grad(&gb).unwrap().into_data(), tol);
        }
    }

    #[test]
    fn keeps_its_relative_accuracy_on_both_tails() {
        // Phi(x) in double precision from tables of the normal distribution.
        for (x, cdf) in [
            (-8.0, 6.220_960_574_271_785e-16),
            (-5.0, 2.866_515_718_791_939e-7),
            (-1.0, 0.158_655_253_931_457_07),
            (-1e-3, 0.499_601_057_046_081_4),
            (0.5, 0.691_462_461_274_013_1),
            (2.0, 0.977_249_868_051_820_8),
            (6.0, 0.999_999_999_013_412_4),
        ] {
            let gelu = f64::from(gelu_f32(x as f32));
            let exact = x * cdf;
            assert!(
                ((gelu - exact) / exact).abs() < 1e-6,
                "gelu({x}) = {gelu}, not {exact}"
            );
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_values() {
        let xs: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.0071).collect();
        let gs: Vec<f32> = xs.iter().map(|x| 1.0 - 0.3 * x).collect();
        let run = |f: &dyn Fn(&mut [MaybeUninit<f32>])| {
            let mut out = vec![MaybeUninit::new(0.0f32); xs.len()];
            f(&mut out);
            out.into_iter()
                .map(|v| unsafe { v.assume_init() })
                .collect::<Vec<f32>>()
        };
        let reference = run(&|d| gelu_slice(&xs, d));
        let reference_grad = run(&|d| gelu_backward_slice(&xs, &gs, d));
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                // SAFETY: checked just above.
                assert_eq!(run(&|d| unsafe { gelu_slice::avx2(&xs, d) }), reference);
                let grad = run(&|d| unsafe { gelu_backward_slice::avx2(&xs, &gs, d) });
                assert_eq!(grad, reference_grad);
            }
            if has_avx512() {
                // SAFETY: checked just above.
                assert_eq!(run(&|d| unsafe { gelu_slice::avx512(&xs, d) }), reference);
                let grad = run(&|d| unsafe { gelu_backward_slice::avx512(&xs, &gs, d) });
                assert_eq!(grad, reference_grad);
            }
        }
        // The portable loop, without FMA, may round differently in the last place only.
        let portable = run(&|d| gelu_slice_generic(&xs, d));
        for (a, b) in portable.iter().zip(&reference) {
            assert!(
                (a - b).abs() <= 2.0 * f32::EPSILON * b.abs().max(1e-30),
                "{a} vs {b}"
            );
        }
    }

    #[test]
    fn its_exp_matches_std() {
        for i in 0..=8800 {
            let s = f64::from(i) * 0.01;
            for p in [0.0f32, -1.3, 0.4] {
                let (hi, lo) = (s as f32, (s - f64::from(s as f32)) as f32);
                let want = (f64::from(p) - s).exp();
                let got = f64::from(exp_diff(p, hi, lo));
                if f64::from(p) - s > f64::from(EXP_MIN) + 0.01 {
                    let rel = (got - want).abs() / want;
                    assert!(rel < 4e-7, "exp({p} - {s}): relative error {rel}");
                } else {
                    // Near or below the cut: zero, or the last normal values.
                    assert!(got < 2e-38, "exp({p} - {s}) = {got}");
                }
            }
        }
    }

    /// GELU and its derivative against the same formula evaluated in f64, on a fine sweep:
    /// relative error below 1e-6 wherever the value is not negligibly small.
    #[test]
    fn follows_the_f64_formula_everywhere() {
        fn reference(x: f64) -> (f64, f64) {
            let z = x.abs() * std::f64::consts::FRAC_1_SQRT_2;
            let t = 1.0 / (1.0 + 0.5 * z);
            let p = -1.265_512_23
                + t * (1.000_023_68
                    + t * (0.374_091_96
                        + t * (0.096_784_18
                            + t * (-0.186_288_06
                                + t * (0.278_868_07
                                    + t * (-1.135_203_98
                                        + t * (1.488_515_87
                                            + t * (-0.822_152_23 + t * 0.170_872_77))))))));
            let tail = 0.5 * t * (p - z * z).exp();
            let cdf = if x < 0.0 { tail } else { 1.0 - tail };
            let gauss = (-z * z).exp();
            (x * cdf, cdf + x * 0.398_942_280_401_432_7 * gauss)
        }
        for i in -13_000..=13_000 {
            let x = i as f32 * 0.001_03;
            let (want, want_d) = reference(f64::from(x));
            let (got, got_d) = (f64::from(gelu_f32(x)), f64::from(gelu_derivative_f32(x)));
            let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-30);
            if want.abs() > 1e-30 {
                assert!(rel(got, want) < 1e-6, "gelu({x}) = {got}, not {want}");
            }
            if want_d.abs() > 1e-30 {
                assert!(
                    rel(got_d, want_d) < 1e-6 || (got_d - want_d).abs() < 1e-7,
                    "gelu'({x}) = {got_d}, not {want_d}"
                );
            }
        }
        assert!(gelu_f32(f32::NAN).is_nan());
        assert_eq!(gelu_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu_f32(-30.0), 0.0);
        assert_eq!(gelu_derivative_f32(-30.0), 0.0);
        assert_eq!(gelu_derivative_f32(30.0), 1.0);
    }

    #[test]
    fn runs_without_autodiff_and_on_views() {
        let x = Tensor::<2>::random([70, 40], Distribution::Normal(0.0, 2.0), &device());
        let view = x.clone().transpose();
        let ours = gelu(view.clone());
        let theirs = burn::tensor::activation::gelu(view);
        // As above: burn's f32 `1 + erf` cancels on the negative tail.
        ours.into_data()
            .assert_approx_eq::<f32>(&theirs.into_data(), Tolerance::rel_abs(2e-6, 1e-6));
        assert_eq!(gelu(x.clone()).shape(), x.shape());
        let _: TensorData = gelu(x).into_data();
    }
}
