//! One AdamW step of one parameter as a single multi-threaded pass, for the Flex backend.
//!
//! burn's `AdamW` composes about a dozen tensor operations per parameter (moment updates, bias
//! corrections, square root, decay, update), each a pass over memory on the calling thread with
//! a fresh allocation; with our gradient scaling and clipping in front, the optimisers took a
//! large share of the calling thread's time while the other cores waited (BENCHMARKS.md, "CPU
//! speed, fifth round"). Here every element goes through the same f32
//! operations in the same order as burn's composition (Rust does not contract them into fused
//! multiply-adds), so the results are bit for bit burn's: the unit test compares them, and
//! `verify reference` checks the parameters after AdamW steps against the release.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::{CHUNK, contiguous, from_vec, is_flex};

/// The scalars of one step, as burn's `AdamW` and our optimiser apply them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    pub lr: f64,
    /// The parameter's step count after this step (1 on its first).
    pub time: i32,
    /// Every gradient element is multiplied by this first, when it is not 1 (loss-scale
    /// unscaling).
    pub factor: f64,
    /// Then clipped to `[-c, c]`.
    pub clip: Option<f64>,
}

/// Whether [`adamw_step`] runs our kernel for `param` (f32 on the Flex backend).
pub fn applies<const D: usize>(param: &Tensor<D>) -> bool {
    param.dtype() == DType::F32 && is_flex(&param.device())
}

/// One AdamW step: returns the updated parameter and moments. `grad` `None` is a zero
/// gradient (PyTorch keeps stepping a parameter that once had one); `moments` `None` is a
/// parameter's first step. Every tensor is on the Flex device, not tracked by autodiff.
///
/// # Shapes
/// - `param`, `grad`, both moments: `[n]`
/// - output: `[n]` three times (parameter, first moment, second moment)
pub fn adamw_step(
    param: Tensor<1>,
    grad: Option<Tensor<1>>,
    moments: Option<(Tensor<1>, Tensor<1>)>,
    scalars: AdamWScalars,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    // The extension takes no optional tensors: an absent one is passed as `param` (shared,
    // not copied) with a flag saying it is not to be read.
    let present = Present {
        grad: grad.is_some(),
        moments: moments.is_some(),
    };
    let grad = grad.unwrap_or_else(|| param.clone());
    let (m, v) = moments.unwrap_or_else(|| (param.clone(), param.clone()));
    let (p, m, v) = <Dispatch as AdamWBackend>::adamw_step(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        scalars,
        present,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// Which of the optional inputs of [`AdamWBackend::adamw_step`] hold values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Present {
    /// `false`: the gradient is zero.
    pub grad: bool,
    /// `false`: the parameter's first step.
    pub moments: bool,
}

/// The step as a backend extension.
#[backend_extension(Flex)]
pub trait AdamWBackend: Backend {
    /// See [`adamw_step`]; `grad`, `m` and `v` are read only where `present` says so.
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scalars: AdamWScalars,
        present: Present,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The per-element arithmetic, each constant already in f32 as burn's scalar operations
/// round it.
#[derive(Clone, Copy)]
struct Consts {
    beta_1: f32,
    beta_2: f32,
    factor_1: f32,
    factor_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    /// `1 - lr * weight_decay`, or `None` when the decay is zero (burn then skips it).
    keep: Option<f32>,
    lr: f32,
    factor: Option<f32>,
    clip: Option<(f32, f32)>,
}

impl Consts {
    fn new(s: AdamWScalars) -> Self {
        let decay = s.lr * f64::from(s.weight_decay);
        Self {
            beta_1: s.beta_1,
            beta_2: s.beta_2,
            factor_1: 1.0 - s.beta_1,
            factor_2: 1.0 - s.beta_2,
            correction_1: 1.0 - s.beta_1.powi(s.time),
            correction_2: 1.0 - s.beta_2.powi(s.time),
            epsilon: s.epsilon,
            keep: (decay != 0.0).then_some((1.0 - decay) as f32),
            lr: s.lr as f32,
            factor: (s.factor != 1.0).then_some(s.factor as f32),
            clip: s.clip.map(|c| (-c as f32, c as f32)),
        }
    }

    /// `(param, m, v)` after the step, from the old ones (`None` moments on the first step).
    #[inline(always)]
    fn step(&self, p: f32, g: f32, moments: Option<(f32, f32)>) -> (f32, f32, f32) {
        let mut g = g;
        if let Some(f) = self.factor {
            g *= f;
        }
        if let Some((lo, hi)) = self.clip {
            // As burn's clamp: `f32::clamp` (NaN stays NaN).
            g = g.clamp(lo, hi);
        }
        let (m, v) = match moments {
            Some((m, v)) => (
                m * self.beta_1 + g * self.factor_1,
                v * self.beta_2 + (g * g) * self.factor_2,
            ),
            None => (g * self.factor_1, (g * g) * self.factor_2),
        };
        let delta = (m / self.correction_1) / ((v / self.correction_2).sqrt() + self.epsilon);
        let p = match self.keep {
            Some(keep) => p * keep,
            None => p,
        };
        (p - delta * self.lr, m, v)
    }
}

/// The values of a contiguous f32 tensor.
fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// One task's inputs, all of the same length: the parameter, and the gradient and moments
/// when present.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    p: &'a [f32],
    g: Option<&'a [f32]>,
    m: Option<&'a [f32]>,
    v: Option<&'a [f32]>,
}

/// [`Consts::step`] over one task's elements, into `po`, `mo` and `vo`. Which inputs are
/// present is decided once, outside the loops, so that each loop vectorises.
#[inline(always)]
fn step_slices(c: &Consts, ins: Inputs, po: &mut [f32], mo: &mut [f32], vo: &mut [f32]) {
    let n = po.len();
    let (p, mo, vo) = (&ins.p[..n], &mut mo[..n], &mut vo[..n]);
    match (ins.g, ins.m.zip(ins.v)) {
        (Some(g), Some((m, v))) => {
            let (g, m, v) = (&g[..n], &m[..n], &v[..n]);
            for i in 0..n {
                (po[i], mo[i], vo[i]) = c.step(p[i], g[i], Some((m[i], v[i])));
            }
        }
        (Some(g), None) => {
            let g = &g[..n];
            for i in 0..n {
                (po[i], mo[i], vo[i]) = c.step(p[i], g[i], None);
            }
        }
        (None, Some((m, v))) => {
            let (m, v) = (&m[..n], &v[..n]);
            for i in 0..n {
                (po[i], mo[i], vo[i]) = c.step(p[i], 0.0, Some((m[i], v[i])));
            }
        }
        (None, None) => {
            for i in 0..n {
                (po[i], mo[i], vo[i]) = c.step(p[i], 0.0, None);
            }
        }
    }
}

simd_dispatch!(
    fn step_slices_simd(c: &Consts, ins: Inputs, po: &mut [f32], mo: &mut [f32], vo: &mut [f32])
        => step_slices
);

impl AdamWBackend for Flex {
    fn adamw_step(
        param: FlexTensor,
        grad: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        scalars: AdamWScalars,
        present: Present,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let c = Consts::new(scalars);
        let (param, grad) = (contiguous(param), contiguous(grad));
        let (m, v) = (contiguous(m), contiguous(v));
        let ps = slice(&param);
        let gs = present.grad.then(|| slice(&grad));
        let moments = present.moments.then(|| (slice(&m), slice(&v)));
        let n = ps.len();
        let (mut po, mut mo, mut vo) = (super::zeroed(n), super::zeroed(n), super::zeroed(n));
        let run = |start: usize, (po, mo, vo): (&mut [f32], &mut [f32], &mut [f32])| {
            let range = start..start + po.len();
            let ins = Inputs {
                p: &ps[range.clone()],
                g: gs.map(|g| &g[range.clone()]),
                m: moments.map(|(m, _)| &m[range.clone()]),
                v: moments.map(|(_, v)| &v[range.clone()]),
            };
            step_slices_simd(&c, ins, po, mo, vo);
        };
        if n < 4 * CHUNK {
            run(0, (&mut po, &mut mo, &mut vo));
        } else {
            po.par_chunks_mut(CHUNK)
                .zip(mo.par_chunks_mut(CHUNK))
                .zip(vo.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(i, ((p, m), v))| run(i * CHUNK, (p, m, v)));
        }
        (
            from_vec(po, &param),
            from_vec(mo, &param),
            from_vec(vo, &param),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::{AdamWConfig, AdamWState, AdaptiveMomentumState, Optimizer};
    use burn::tensor::{Device, TensorData};

    fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 997) as f32 / 498.5 - 1.0) * scale)
            .collect()
    }

    /// Several steps of our kernel against burn's `AdamW` (with the same scaling and clipping
    /// in front), bit for bit, on a parameter large enough to split over threads, with zero
    /// gradients in between and with and without weight decay.
    #[test]
    fn steps_match_burns_adamw_bit_for_bit() {
        let device = Device::flex();
        let n = 5 * CHUNK + 17;
        for (weight_decay, clip, factor) in [
            (0.0, None, 1.0),
            (1e-4, Some(0.05), 0.5),
            (5e-4, None, 1.0 / 1024.0),
        ] {
            let config = AdamWConfig::new()
                .with_beta_1(0.9)
                .with_beta_2(0.999)
                .with_epsilon(1e-8)
                .with_weight_decay(weight_decay);
            let burn_adamw = config.build();
            let tensor = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [n]), &device);
            let start = tensor(values(n, 1, 0.5));
            let (mut ours, mut theirs) = (start.clone(), start);
            let mut our_moments: Option<(Tensor<1>, Tensor<1>)> = None;
            let mut state: Option<AdamWState<1>> = None;
            for step in 1..=4 {
                let lr = 1e-3 * step as f64;
                // A zero gradient on the third step (`None` for ours).
                let grad = (step != 3).then(|| tensor(values(n, step + 1, 0.2)));
                let scalars = AdamWScalars {
                    beta_1: 0.9,
                    beta_2: 0.999,
                    epsilon: 1e-8,
                    weight_decay,
                    lr,
                    time: step as i32,
                    factor,
                    clip,
                };
                let (p, m, v) = adamw_step(ours, grad.clone(), our_moments, scalars);
                ours = p;
                our_moments = Some((m, v));
                let g = grad.unwrap_or_else(|| theirs.zeros_like());
                let g = if factor != 1.0 {
                    g.mul_scalar(factor)
                } else {
                    g
                };
                let g = match clip {
                    Some(c) => g.clamp(-c, c),
                    None => g,
                };
                let (p, s) = burn_adamw.step(lr, theirs, g, state);
                theirs = p;
                state = s;
                let moments: &AdaptiveMomentumState<1> = &state.as_ref().expect("state").momentum;
                let (m, v) = our_moments.as_ref().expect("moments");
                assert_eq!(ours.to_data(), theirs.to_data(), "parameter, step {step}");
                assert_eq!(m.to_data(), moments.moment_1.to_data(), "m, step {step}");
                assert_eq!(v.to_data(), moments.moment_2.to_data(), "v, step {step}");
                assert_eq!(moments.time, step);
            }
        }
    }

    /// The AVX2 and AVX-512 copies of the loop against the portable one, bit for bit.
    #[test]
    fn vector_copies_match_the_portable_loop() {
        let n = 1000;
        let (p, g, m, v) = (
            values(n, 1, 0.5),
            values(n, 2, 0.2),
            values(n, 3, 0.01),
            values(n, 4, 0.01),
        );
        let v: Vec<f32> = v.iter().map(|x| x.abs()).collect();
        let scalars = AdamWScalars {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 1e-4,
            lr: 3e-4,
            time: 7,
            factor: 0.25,
            clip: Some(0.03),
        };
        let c = Consts::new(scalars);
        let ins = Inputs {
            p: &p,
            g: Some(&g),
            m: Some(&m),
            v: Some(&v),
        };
        type Fill<'a> = &'a dyn Fn(&mut [f32], &mut [f32], &mut [f32]);
        let run = |f: Fill| {
            let (mut po, mut mo, mut vo) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            f(&mut po, &mut mo, &mut vo);
            (po, mo, vo)
        };
        let want = run(&|po, mo, vo| step_slices(&c, ins, po, mo, vo));
        #[cfg(target_arch = "x86_64")]
        {
            if crate::backends::has_avx2() {
                // SAFETY: the CPU has AVX2 and FMA (checked).
                let got = run(&|po, mo, vo| unsafe { step_slices_simd::avx2(&c, ins, po, mo, vo) });
                assert_eq!(got, want, "AVX2");
            }
            if crate::backends::has_avx512() {
                // SAFETY: the CPU has AVX-512 (checked).
                let got =
                    run(&|po, mo, vo| unsafe { step_slices_simd::avx512(&c, ins, po, mo, vo) });
                assert_eq!(got, want, "AVX-512");
            }
        }
    }
}
