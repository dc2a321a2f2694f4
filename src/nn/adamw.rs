//! AdamW that keeps PyTorch 1.x's gradient bookkeeping (METHOD.md section 7, "Gradients").
//!
//! burn's optimiser skips a parameter whenever the current backward pass did not reach it.
//! PyTorch's `zero_grad()` instead fills an existing gradient with zeros, so a parameter that
//! has had a gradient once keeps taking AdamW steps (moment decay, momentum, weight decay) with
//! a zero gradient. The release's exact parameter values depend on that, so this optimiser
//! tracks which parameters have had a gradient. The update is burn's `AdamW` arithmetic: on
//! the Flex device our kernel ([`crate::backends::adamw`]) steps all of a call's parameters
//! in one pass over every core, bit for bit burn's; elsewhere burn's `AdamW` itself.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, Optimizer,
};
use burn::tensor::{Device, Tensor, TensorData};

use crate::backends::adamw::{AdamWJob, AdamWScalars};
use crate::io::state_dict::{HostTensor, StateDict, TorchParam};

/// Saved optimiser state that does not fit the model it is restored into.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptimStateError {
    #[error("`{tensor}` is missing")]
    Missing { tensor: String },
    #[error("`{tensor}` has {values} values, the parameter {expected}")]
    Size {
        tensor: String,
        values: usize,
        expected: usize,
    },
    #[error("{count} optimiser entries under `{prefix}` name no parameter of the model")]
    Stray { count: usize, prefix: String },
}

/// Settings of one AdamW optimiser, PyTorch's defaults unless stated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWSettings {
    pub beta_1: f32,
    pub beta_2: f32,
    /// PyTorch's 1e-8 (burn's default is 1e-5).
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl AdamWSettings {
    pub fn with_weight_decay(weight_decay: f32) -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay,
        }
    }
}

/// AdamW over any number of parameter groups (sub-modules), each stepped with its own
/// learning rate, with optional clipping of gradients by value.
#[derive(Clone)]
pub struct TorchAdamW {
    inner: AdamW,
    settings: AdamWSettings,
    /// Flattened state of every parameter that has had a gradient.
    states: HashMap<ParamId, AdamWState<1>>,
    /// Clip every gradient element to [-c, c] before the step.
    pub clip_value: Option<f64>,
    /// With `Some`, every gradient a step applies is appended, in order: `verify reference`
    /// needs them to tell which updates rounding decides. `None` (no copies) in training.
    pub trace: Option<Vec<AppliedGradient>>,
}

/// One parameter's gradient as one AdamW step applied it (after clipping; zeros for a
/// parameter that had a gradient before but none this time), in burn's layout.
#[derive(Clone, Debug)]
pub struct AppliedGradient {
    pub id: ParamId,
    pub lr: f64,
    pub grad: HostTensor,
}

impl TorchAdamW {
    pub fn new(settings: AdamWSettings, clip_value: Option<f64>) -> Self {
        let inner = AdamWConfig::new()
            .with_beta_1(settings.beta_1)
            .with_beta_2(settings.beta_2)
            .with_epsilon(settings.epsilon)
            .with_weight_decay(settings.weight_decay)
            .build();
        Self {
            inner,
            settings,
            states: HashMap::new(),
            clip_value,
            trace: None,
        }
    }

    /// Steps every parameter of `module` that has a gradient in `grads` or has had one before.
    pub fn step<M: Module>(&mut self, lr: f64, module: M, grads: &mut GradientsParams) -> M {
        self.step_scaled(lr, module, grads, 1.0)
    }

    /// [`step`](Self::step) with every gradient multiplied by `factor` first (before
    /// clipping): the unscaling of a loss-scaled gradient.
    pub fn step_scaled<M: Module>(
        &mut self,
        lr: f64,
        module: M,
        grads: &mut GradientsParams,
        factor: f64,
    ) -> M {
        // The parameters our kernel steps (f32 on the Flex device) are stepped all together,
        // in one pass over every core; a second pass puts the results in place and steps any
        // others through burn's AdamW.
        let mut collect = Collect {
            optim: self,
            lr,
            grads,
            factor,
            ids: Vec::new(),
            jobs: Vec::new(),
        };
        module.visit(&mut collect);
        let Collect { ids, jobs, .. } = collect;
        let times: Vec<usize> = jobs.iter().map(|j| j.scalars.time as usize).collect();
        let mut updated = HashMap::with_capacity(ids.len());
        let results = crate::backends::adamw::adamw_steps(jobs);
        for ((id, time), (p, m, v)) in ids.into_iter().zip(times).zip(results) {
            let momentum = AdaptiveMomentumState::new(time, m, v);
            self.states.insert(id, AdamWState { momentum });
            updated.insert(id, p);
        }
        let mut mapper = StepMapper {
            optim: self,
            lr,
            grads,
            factor,
            updated,
        };
        module.map(&mut mapper)
    }

    /// Writes the state of every parameter that has had a gradient into `dict` as
    /// `{prefix}{name}.exp_avg`, `.exp_avg_sq` and `.step` (PyTorch's names), flattened.
    /// `names` maps the model's parameters to names.
    pub fn export_state(&self, names: &[TorchParam], prefix: &str, dict: &mut StateDict) {
        for p in names {
            let Some(state) = self.states.get(&p.id) else {
                continue;
            };
            let m = &state.momentum;
            let key = format!("{prefix}{}", p.name);
            dict.insert(
                format!("{key}.exp_avg"),
                HostTensor::from_tensor(m.moment_1.clone()),
            );
            dict.insert(
                format!("{key}.exp_avg_sq"),
                HostTensor::from_tensor(m.moment_2.clone()),
            );
            dict.insert(
                format!("{key}.step"),
                HostTensor::new(vec![1], vec![m.time as f64]),
            );
        }
    }

    /// Replaces the state with the one [`export_state`](Self::export_state) wrote under
    /// `prefix`. Entries that name no parameter, or whose size does not match it, are errors.
    pub fn import_state(
        &mut self,
        dict: &StateDict,
        names: &[TorchParam],
        sizes: &HashMap<ParamId, usize>,
        prefix: &str,
        device: &Device,
    ) -> Result<(), OptimStateError> {
        let device = device.clone().inner();
        let mut states = HashMap::new();
        let mut used = 0;
        for p in names {
            let key = format!("{prefix}{}", p.name);
            let Some(step) = dict.get(&format!("{key}.step")) else {
                continue;
            };
            let moment = |what: &str| -> Result<Tensor<1>, OptimStateError> {
                let tensor = format!("{key}.{what}");
                let t = dict.get(&tensor).ok_or_else(|| OptimStateError::Missing {
                    tensor: tensor.clone(),
                })?;
                let want = sizes.get(&p.id).copied().unwrap_or(0);
                if t.numel() != want {
                    return Err(OptimStateError::Size {
                        tensor,
                        values: t.numel(),
                        expected: want,
                    });
                }
                Ok(Tensor::from_data(
                    TensorData::new(t.to_f32(), [t.numel()]),
                    &device,
                ))
            };
            let momentum = AdaptiveMomentumState::new(
                step.data.first().copied().unwrap_or(0.0) as usize,
                moment("exp_avg")?,
                moment("exp_avg_sq")?,
            );
            states.insert(p.id, AdamWState { momentum });
            used += 3;
        }
        let total = dict
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .count();
        if used != total {
            return Err(OptimStateError::Stray {
                count: total - used,
                prefix: prefix.to_string(),
            });
        }
        self.states = states;
        Ok(())
    }

    /// The gradient a step applies to `value`: `grad` (zeros when `None`) times `factor`, then
    /// clipped to the clipping value.
    fn applied_gradient<const D: usize>(
        &self,
        grad: Option<Tensor<D>>,
        value: &Tensor<D>,
        factor: f64,
    ) -> Tensor<D> {
        let grad = match grad {
            Some(g) if factor != 1.0 => g.mul_scalar(factor),
            Some(g) => g,
            None => value.zeros_like(),
        };
        match self.clip_value {
            Some(c) => grad.clamp(-c, c),
            None => grad,
        }
    }

    /// Appends `grad` to the trace, when one is kept.
    fn record<const D: usize>(&mut self, id: ParamId, lr: f64, grad: &Tensor<D>) {
        if let Some(trace) = self.trace.as_mut() {
            trace.push(AppliedGradient {
                id,
                lr,
                grad: HostTensor::from_tensor(grad.clone()),
            });
        }
    }

    /// Number of AdamW steps taken by a parameter (0 if it never had a gradient).
    pub fn steps_of(&self, id: ParamId) -> usize {
        self.states.get(&id).map(|s| s.momentum.time).unwrap_or(0)
    }
}

/// The first pass of a step: takes the gradient and state of every parameter that our kernel
/// steps, in the module's order, as one job each.
struct Collect<'a> {
    optim: &'a mut TorchAdamW,
    lr: f64,
    grads: &'a mut GradientsParams,
    factor: f64,
    ids: Vec<ParamId>,
    jobs: Vec<AdamWJob>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let id = param.id;
        let value = param.val().inner();
        if !crate::backends::adamw::applies(&value) {
            return;
        }
        let grad = self.grads.remove::<D>(id);
        let state = self.optim.states.remove(&id);
        if grad.is_none() && state.is_none() {
            return;
        }
        if self.optim.trace.is_some() {
            // The record of the applied gradient, composed as burn's path applies it (the
            // kernel does the same arithmetic inside).
            let applied = self
                .optim
                .applied_gradient(grad.clone(), &value, self.factor);
            self.optim.record(id, self.lr, &applied);
        }
        let numel = value.shape().num_elements();
        let grad = grad.map(|g| g.reshape([numel]));
        let (time, moments) = match state {
            Some(s) => (
                s.momentum.time + 1,
                Some((s.momentum.moment_1, s.momentum.moment_2)),
            ),
            None => (1, None),
        };
        let settings = self.optim.settings;
        self.ids.push(id);
        self.jobs.push(AdamWJob {
            param: value.reshape([numel]),
            grad,
            moments,
            scalars: AdamWScalars {
                beta_1: settings.beta_1,
                beta_2: settings.beta_2,
                epsilon: settings.epsilon,
                weight_decay: settings.weight_decay,
                lr: self.lr,
                time: time as i32,
                factor: self.factor,
                clip: self.optim.clip_value,
            },
        });
    }
}

/// The second pass of a step: puts the kernel's results in place, and steps every other
/// parameter with a gradient or a state through burn's AdamW.
struct StepMapper<'a> {
    optim: &'a mut TorchAdamW,
    lr: f64,
    grads: &'a mut GradientsParams,
    factor: f64,
    /// The kernel's new values, flat.
    updated: HashMap<ParamId, Tensor<1>>,
}

impl ModuleMapper for StepMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        if let Some(updated) = self.updated.remove(&id) {
            let updated = updated.reshape(tensor.shape());
            return Param::from_mapped_value(id, Self::as_param_value(&tensor, updated), mapper);
        }
        let grad = self.grads.remove::<D>(id);
        let state = self.optim.states.remove(&id);
        let value = tensor.clone().inner();
        if grad.is_none() && state.is_none() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        // A parameter with neither a gradient nor a state was returned unchanged above.
        let grad = self.optim.applied_gradient(grad, &value, self.factor);
        self.optim.record(id, self.lr, &grad);
        let shape = value.shape();
        let numel = shape.num_elements();
        let (updated, state) = self.optim.inner.step::<1>(
            self.lr,
            value.reshape([numel]),
            grad.reshape([numel]),
            state,
        );
        if let Some(state) = state {
            self.optim.states.insert(id, state);
        }
        let updated = Self::as_param_value(&tensor, updated.reshape(shape));
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl StepMapper<'_> {
    /// `updated` as the new value of the parameter `old`: on the autodiff device and requiring
    /// gradients when `old` did.
    fn as_param_value<const D: usize>(old: &Tensor<D>, updated: Tensor<D>) -> Tensor<D> {
        let mut updated: Tensor<D> = if old.is_autodiff() {
            Tensor::from_inner(updated)
        } else {
            updated
        };
        if old.is_require_grad() {
            updated = updated.require_grad();
        }
        updated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};

    /// PyTorch's AdamW for one scalar, step by step.
    struct Reference {
        p: f64,
        m: f64,
        v: f64,
        t: i32,
    }

    impl Reference {
        fn step(&mut self, g: f64, lr: f64, wd: f64) {
            self.t += 1;
            self.p *= 1.0 - lr * wd;
            self.m = 0.9 * self.m + 0.1 * g;
            self.v = 0.999 * self.v + 0.001 * g * g;
            let mh = self.m / (1.0 - 0.9f64.powi(self.t));
            let denom = self.v.sqrt() / (1.0 - 0.999f64.powi(self.t)).sqrt() + 1e-8;
            self.p -= lr * mh / denom;
        }
    }

    fn linear(device: &Device) -> Linear {
        let mut l = LinearConfig::new(1, 1).init(device);
        l.weight = Param::from_data(TensorData::new(vec![1.0f32], [1, 1]), device);
        l.bias = Some(Param::from_data(
            TensorData::new(vec![-0.5f32], [1]),
            device,
        ));
        l
    }

    fn grads_for(l: &Linear, weight: Option<f32>, device: &Device) -> GradientsParams {
        let mut g = GradientsParams::new();
        if let Some(w) = weight {
            g.register::<2>(
                l.weight.id,
                Tensor::from_data(TensorData::new(vec![w], [1, 1]), device),
            );
        }
        g
    }

    fn value(p: &Param<Tensor<2>>) -> f64 {
        p.val().into_data().try_to_vec::<f32>().unwrap()[0] as f64
    }

    #[test]
    fn a_scaled_gradient_is_unscaled_before_clipping() {
        let device = Device::flex();
        let (lr, wd, scale) = (0.1, 0.01, 65536.0f32);
        let mut plain = TorchAdamW::new(AdamWSettings::with_weight_decay(wd as f32), Some(0.5));
        let mut scaled = plain.clone();
        let (mut a, mut b) = (linear(&device), linear(&device));
        let mut reference = Reference {
            p: 1.0,
            m: 0.0,
            v: 0.0,
            t: 0,
        };
        // Both gradients are inside the clipping range and their scaled values far outside
        // it: clipping before unscaling would step as if they were 0.5 and -0.5, which the
        // second AdamW step tells apart from 0.3 and -0.1.
        for g in [0.3f32, -0.1] {
            let mut ga = grads_for(&a, Some(g), &device);
            a = plain.step(lr, a, &mut ga);
            let mut gb = grads_for(&b, Some(g * scale), &device);
            b = scaled.step_scaled(lr, b, &mut gb, 1.0 / scale as f64);
            reference.step(g as f64, lr, wd);
        }
        for got in [value(&a.weight), value(&b.weight)] {
            assert!((got - reference.p).abs() < 1e-6, "{got} vs {}", reference.p);
        }
    }

    #[test]
    fn matches_pytorch_with_zero_grad_bookkeeping_and_value_clipping() {
        let device = Device::flex();
        let mut l = linear(&device);
        let (lr, wd) = (0.1, 0.01);
        let mut opt = TorchAdamW::new(AdamWSettings::with_weight_decay(wd as f32), Some(0.5));
        let mut reference = Reference {
            p: 1.0,
            m: 0.0,
            v: 0.0,
            t: 0,
        };
        // Before any gradient nothing moves, weight decay included.
        let mut g = grads_for(&l, None, &device);
        l = opt.step(lr, l, &mut g);
        assert_eq!(value(&l.weight), 1.0);
        assert_eq!(opt.steps_of(l.weight.id), 0);
        // A gradient of 2.0 is clipped to 0.5; then a step without a gradient still moves the
        // parameter (zero gradient, as after PyTorch's zero_grad); then a small gradient.
        for (g, clipped) in [(Some(2.0f32), 0.5), (None, 0.0), (Some(-0.2f32), -0.2)] {
            let mut g = grads_for(&l, g, &device);
            l = opt.step(lr, l, &mut g);
            reference.step(clipped, lr, wd);
            assert!(
                (value(&l.weight) - reference.p).abs() < 1e-6,
                "{} vs {}",
                value(&l.weight),
                reference.p
            );
        }
        assert_eq!(opt.steps_of(l.weight.id), 3);
        // The bias never had a gradient: untouched.
        let bias = l
            .bias
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()[0];
        assert_eq!(bias, -0.5);
    }
}
