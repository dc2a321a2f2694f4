//! AdamW that keeps PyTorch 1.x's gradient bookkeeping (METHOD.md section 7, "Gradients").
//!
//! burn's optimiser skips a parameter whenever the current backward pass did not reach it.
//! PyTorch's `zero_grad()` instead fills an existing gradient with zeros, so a parameter that
//! has had a gradient once keeps taking AdamW steps (moment decay, momentum, weight decay) with
//! a zero gradient. The release's exact parameter values depend on that, so this optimiser
//! tracks which parameters have had a gradient. The update itself is burn's `AdamW`.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::{AdamW, AdamWConfig, AdamWState, GradientsParams, Optimizer};
use burn::tensor::Tensor;

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
    /// Flattened state of every parameter that has had a gradient.
    states: HashMap<ParamId, AdamWState<1>>,
    /// Clip every gradient element to [-c, c] before the step.
    pub clip_value: Option<f64>,
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
            states: HashMap::new(),
            clip_value,
        }
    }

    /// Steps every parameter of `module` that has a gradient in `grads` or has had one before.
    pub fn step<M: Module>(&mut self, lr: f64, module: M, grads: &mut GradientsParams) -> M {
        let mut mapper = StepMapper {
            optim: self,
            lr,
            grads,
        };
        module.map(&mut mapper)
    }

    /// Number of AdamW steps taken by a parameter (0 if it never had a gradient).
    pub fn steps_of(&self, id: ParamId) -> usize {
        self.states
            .get(&id)
            .map(|s| s.momentum.time)
            .unwrap_or(0)
    }
}

struct StepMapper<'a> {
    optim: &'a mut TorchAdamW,
    lr: f64,
    grads: &'a mut GradientsParams,
}

impl ModuleMapper for StepMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = self.grads.remove::<D>(id);
        let state = self.optim.states.remove(&id);
        let value = tensor.clone().inner();
        let grad = match (grad, &state) {
            (Some(g), _) => g,
            (None, Some(_)) => value.zeros_like(),
            (None, None) => return Param::from_mapped_value(id, tensor, mapper),
        };
        let grad = match self.optim.clip_value {
            Some(c) => grad.clamp(-c, c),
            None => grad,
        };
        let shape = value.shape();
        let numel = shape.num_elements();
        let (updated, state) =
            self.optim
                .inner
                .step::<1>(self.lr, value.reshape([numel]), grad.reshape([numel]), state);
        if let Some(state) = state {
            self.optim.states.insert(id, state);
        }
        let mut updated: Tensor<D> = Tensor::from_inner(updated.reshape(shape));
        if tensor.is_require_grad() {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}
