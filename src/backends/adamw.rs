//! AdamW steps of all of an optimiser's parameters as one multi-threaded pass, for the Flex
//! backend.
//!
//! burn's `AdamW` composes about a dozen tensor operations per parameter (moment updates, bias
//! corrections, square root, decay, update), each a pass over memory on the calling thread with
//! a fresh allocation; with our gradient scaling and clipping in front, the optimisers took a
//! large share of the calling thread's time while the other cores waited (BENCHMARKS.md, "CPU
//! speed, fifth round"). A step of one parameter at a time still left a core idle: most of a
//! backbone's parameters (BatchNorm scales, biases, depthwise filters) are too small to be
//! worth splitting, so they ran one after another on one thread (BENCHMARKS.md, "CPU speed,
//! ninth round"). Here the parameters of a step are cut into tasks of at most `CHUNK`
//! elements, small parameters one task each, and every core takes tasks from the one list.
//!
//! Every element goes through the same f32 operations in the same order as burn's
//! composition (Rust does not contract them into fused multiply-adds), so the results are bit
//! for bit burn's: the unit test compares them, and `verify reference` checks the parameters
//! after AdamW steps against the release.

use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
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

/// Whether [`adamw_steps`] runs our kernel for `param` (f32 on the Flex backend).
pub fn applies<const D: usize>(param: &Tensor<D>) -> bool {
    param.dtype() == DType::F32 && is_flex(&param.device())
}

/// One parameter's part in [`adamw_steps`]. Every tensor is flat, on the Flex device and not
/// tracked by autodiff.
pub struct AdamWJob {
    pub param: Tensor<1>,
    /// `None`: a zero gradient (PyTorch keeps stepping a parameter that once had one).
    pub grad: Option<Tensor<1>>,
    /// The first and second moments; `None` on the parameter's first step.
    pub moments: Option<(Tensor<1>, Tensor<1>)>,
    pub scalars: AdamWScalars,
}

/// One AdamW step of every job's parameter, all in one pass over every core: returns, in the
/// jobs' order, each updated parameter and its new first and second moments.
///
/// # Shapes
/// - each job: `param`, `grad` and both moments `[n]` (`n` may differ between jobs)
/// - output: `[n]` three times per job (parameter, first moment, second moment)
///
/// # Panics
/// If a tensor is not on the Flex device ([`applies`] tells).
pub fn adamw_steps(jobs: Vec<AdamWJob>) -> Vec<(Tensor<1>, Tensor<1>, Tensor<1>)> {
    // burn's `#[backend_extension]` passes no list of tensors to an extension of ours, so the
    // Flex tensors are taken out of (and put back into) `Tensor` through burn's own downcast.
    let flex = |t: Tensor<1>| {
        contiguous(
            t.try_into_primitive::<Flex>()
                .expect("adamw_steps takes tensors on the Flex device"),
        )
    };
    let jobs: Vec<FlexJob> = jobs
        .into_iter()
        .map(|job| FlexJob {
            consts: Consts::new(job.scalars),
            param: flex(job.param),
            grad: job.grad.map(flex),
            moments: job.moments.map(|(m, v)| (flex(m), flex(v))),
        })
        .collect();
    let outs = step_all(&jobs);
    let tensor = |values: Vec<f32>, like: &FlexTensor| {
        Tensor::<1>::from_primitive::<Flex>(from_vec(values, like))
    };
    jobs.iter()
        .zip(outs)
        .map(|(job, [p, m, v])| {
            (
                tensor(p, &job.param),
                tensor(m, &job.param),
                tensor(v, &job.param),
            )
        })
        .collect()
}

/// One parameter's step on the Flex device: contiguous tensors of one length.
struct FlexJob {
    consts: Consts,
    param: FlexTensor,
    grad: Option<FlexTensor>,
    moments: Option<(FlexTensor, FlexTensor)>,
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

impl<'a> Inputs<'a> {
    fn range(self, r: std::ops::Range<usize>) -> Self {
        Self {
            p: &self.p[r.clone()],
            g: self.g.map(|g| &g[r.clone()]),
            m: self.m.map(|m| &m[r.clone()]),
            v: self.v.map(|v| &v[r]),
        }
    }
}

/// An output slice that the step writes once, every element (so it needs no zero-fill).
type Out<'a> = &'a mut [MaybeUninit<f32>];

/// [`Consts::step`] over one task's elements, into `po`, `mo` and `vo`. Which inputs are
/// present is decided once, outside the loops, so that each loop vectorises.
#[inline(always)]
fn step_slices(c: &Consts, ins: Inputs, po: Out, mo: Out, vo: Out) {
    let n = po.len();
    let (p, mo, vo) = (&ins.p[..n], &mut mo[..n], &mut vo[..n]);
    let mut put = |i: usize, (pn, mn, vn): (f32, f32, f32)| {
        po[i].write(pn);
        mo[i].write(mn);
        vo[i].write(vn);
    };
    match (ins.g, ins.m.zip(ins.v)) {
        (Some(g), Some((m, v))) => {
            let (g, m, v) = (&g[..n], &m[..n], &v[..n]);
            for i in 0..n {
                put(i, c.step(p[i], g[i], Some((m[i], v[i]))));
            }
        }
        (Some(g), None) => {
            let g = &g[..n];
            for i in 0..n {
                put(i, c.step(p[i], g[i], None));
            }
        }
        (None, Some((m, v))) => {
            let (m, v) = (&m[..n], &v[..n]);
            for i in 0..n {
                put(i, c.step(p[i], 0.0, Some((m[i], v[i]))));
            }
        }
        (None, None) => {
            for (i, &p) in p.iter().enumerate() {
                put(i, c.step(p, 0.0, None));
            }
        }
    }
}

simd_dispatch!(
    fn step_slices_simd(c: &Consts, ins: Inputs, po: Out, mo: Out, vo: Out) => step_slices
);

/// The new parameter, first and second moment of every job, in one pass over every core.
fn step_all(jobs: &[FlexJob]) -> Vec<[Vec<f32>; 3]> {
    let inputs: Vec<Inputs> = jobs
        .iter()
        .map(|job| Inputs {
            p: slice(&job.param),
            g: job.grad.as_ref().map(slice),
            m: job.moments.as_ref().map(|(m, _)| slice(m)),
            v: job.moments.as_ref().map(|(_, v)| slice(v)),
        })
        .collect();
    let mut outs: Vec<[Vec<f32>; 3]> = inputs
        .iter()
        .map(|ins| std::array::from_fn(|_| Vec::with_capacity(ins.p.len())))
        .collect();
    {
        // Every parameter cut into tasks of at most CHUNK elements, in one list that every
        // core takes from.
        let mut tasks = Vec::new();
        for ((job, ins), [po, mo, vo]) in jobs.iter().zip(&inputs).zip(outs.iter_mut()) {
            let n = ins.p.len();
            let chunks = po.spare_capacity_mut()[..n]
                .chunks_mut(CHUNK)
                .zip(mo.spare_capacity_mut()[..n].chunks_mut(CHUNK))
                .zip(vo.spare_capacity_mut()[..n].chunks_mut(CHUNK));
            for (i, ((po, mo), vo)) in chunks.enumerate() {
                let start = i * CHUNK;
                let part = ins.range(start..start + po.len());
                tasks.push((&job.consts, part, po, mo, vo));
            }
        }
        tasks
            .into_par_iter()
            .for_each(|(c, ins, po, mo, vo)| step_slices_simd(c, ins, po, mo, vo));
    }
    for (ins, out) in inputs.iter().zip(outs.iter_mut()) {
        for v in out {
            // SAFETY: the tasks above wrote each of the `n` elements of every output once.
            unsafe { v.set_len(ins.p.len()) };
        }
    }
    outs
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::{AdamW, AdamWConfig, AdamWState, Optimizer};
    use burn::tensor::{Device, TensorData};

    fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 997) as f32 / 498.5 - 1.0) * scale)
            .collect()
    }

    /// One parameter as our batched step and as burn's `AdamW` see it.
    struct Tracked {
        n: usize,
        ours: Tensor<1>,
        moments: Option<(Tensor<1>, Tensor<1>)>,
        theirs: Tensor<1>,
        state: Option<AdamWState<1>>,
        burn_adamw: AdamW,
        weight_decay: f32,
        clip: Option<f64>,
        factor: f64,
    }

    /// Several steps of our kernel against burn's `AdamW` (with the same scaling and clipping
    /// in front), bit for bit, for parameters stepped together in one batch: one large enough
    /// to split into several tasks with a short last one, one of exactly one task, and small
    /// ones, each with its own decay, clipping and scaling; zero gradients in between, and a
    /// parameter that joins the batch late (its first step while the others take their
    /// third).
    #[test]
    fn batched_steps_match_burns_adamw_bit_for_bit() {
        let device = Device::flex();
        let settings = [
            (5 * CHUNK + 17, 0.0, None, 1.0),
            (CHUNK, 1e-4, Some(0.05), 0.5),
            (3, 5e-4, None, 1.0 / 1024.0),
            (1000, 1e-4, Some(0.1), 1.0),
            (1, 0.0, None, 1.0),
        ];
        let mut tracked: Vec<Tracked> = settings
            .iter()
            .enumerate()
            .map(|(j, &(n, weight_decay, clip, factor))| {
                let start =
                    Tensor::<1>::from_data(TensorData::new(values(n, j + 1, 0.5), [n]), &device);
                Tracked {
                    n,
                    ours: start.clone(),
                    moments: None,
                    theirs: start,
                    state: None,
                    burn_adamw: AdamWConfig::new()
                        .with_beta_1(0.9)
                        .with_beta_2(0.999)
                        .with_epsilon(1e-8)
                        .with_weight_decay(weight_decay)
                        .build(),
                    weight_decay,
                    clip,
                    factor,
                }
            })
            .collect();
        let late = 3;
        for step in 1..=4usize {
            let lr = 1e-3 * step as f64;
            let mut jobs = Vec::new();
            let mut grads = Vec::new();
            let mut stepped = Vec::new();
            for (j, t) in tracked.iter().enumerate() {
                if j == late && step < 3 {
                    continue;
                }
                // A zero gradient on the third step for every other parameter (`None` for
                // ours), unless that is the parameter's first step.
                let zero = step == 3 && j % 2 == 0 && j != late;
                let grad = (!zero).then(|| {
                    Tensor::<1>::from_data(
                        TensorData::new(values(t.n, 10 * step + j, 0.2), [t.n]),
                        &device,
                    )
                });
                let time = t.state.as_ref().map_or(0, |s| s.momentum.time) + 1;
                jobs.push(AdamWJob {
                    param: t.ours.clone(),
                    grad: grad.clone(),
                    moments: t.moments.clone(),
                    scalars: AdamWScalars {
                        beta_1: 0.9,
                        beta_2: 0.999,
                        epsilon: 1e-8,
                        weight_decay: t.weight_decay,
                        lr,
                        time: time as i32,
                        factor: t.factor,
                        clip: t.clip,
                    },
                });
                grads.push(grad);
                stepped.push(j);
            }
            let results = adamw_steps(jobs);
            assert_eq!(results.len(), stepped.len());
            for ((j, (p, m, v)), grad) in stepped.into_iter().zip(results).zip(grads) {
                let t = &mut tracked[j];
                t.ours = p;
                t.moments = Some((m, v));
                let g = grad.unwrap_or_else(|| t.theirs.zeros_like());
                let g = if t.factor != 1.0 {
                    g.mul_scalar(t.factor)
                } else {
                    g
                };
                let g = match t.clip {
                    Some(c) => g.clamp(-c, c),
                    None => g,
                };
                let (p, s) = t.burn_adamw.step(lr, t.theirs.clone(), g, t.state.take());
                t.theirs = p;
                t.state = s;
                let moments = &t.state.as_ref().expect("state").momentum;
                let (m, v) = t.moments.as_ref().expect("moments");
                let what = format!("parameter {j} ({} values), step {step}", t.n);
                assert_eq!(t.ours.to_data(), t.theirs.to_data(), "value of {what}");
                assert_eq!(m.to_data(), moments.moment_1.to_data(), "m of {what}");
                assert_eq!(v.to_data(), moments.moment_2.to_data(), "v of {what}");
            }
        }
        assert_eq!(tracked[late].state.as_ref().unwrap().momentum.time, 2);
        assert_eq!(tracked[0].state.as_ref().unwrap().momentum.time, 4);
    }

    #[test]
    fn an_empty_batch_steps_nothing() {
        assert!(adamw_steps(Vec::new()).is_empty());
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
        type Fill<'a> = &'a dyn Fn(Out, Out, Out);
        let run = |f: Fill| {
            let uninit = || vec![MaybeUninit::<f32>::uninit(); n];
            let (mut po, mut mo, mut vo) = (uninit(), uninit(), uninit());
            f(&mut po, &mut mo, &mut vo);
            // SAFETY: the step wrote every element of the three outputs.
            let done = |o: Vec<MaybeUninit<f32>>| -> Vec<f32> {
                o.into_iter().map(|x| unsafe { x.assume_init() }).collect()
            };
            (done(po), done(mo), done(vo))
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
