//! Mixed precision for the backbones: `--precision f16|bf16` computes convolutions, linear
//! layers and element-wise work in the half type while parameters, optimiser state,
//! normalisation statistics, the GCA-HNG head and every loss stay f32, as PyTorch's autocast
//! does. Half-precision arithmetic is what reaches a GPU's tensor cores; on the CPU it only
//! adds conversions, so the CPU default stays f32.
//!
//! The half copies of the weights are made inside each layer's forward pass (a cast is
//! differentiable), so the gradients land on the f32 parameters and the optimisers never see
//! a half tensor. f16 has a narrow exponent range: [`LossScaler`] keeps the backbone's
//! gradients above its underflow, the way PyTorch's `GradScaler` does.

use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

/// The arithmetic a backbone runs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Everything in f32 (the default, and the only setting that reproduces the release's
    /// numbers to the tolerances of `verify`).
    #[default]
    F32,
    /// Backbone arithmetic in IEEE half precision, with dynamic loss scaling.
    F16,
    /// Backbone arithmetic in bfloat16 (f32's exponent range: no loss scaling needed).
    Bf16,
}

crate::string_forms_from_value_enum!(Precision: "precision");

impl Precision {
    /// The dtype activations are computed in.
    pub fn dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::F16 => FloatDType::F16,
            Self::Bf16 => FloatDType::BF16,
        }
    }

    /// Whether gradients need [`LossScaler`] to stay representable.
    pub fn scales_loss(self) -> bool {
        self == Self::F16
    }

    /// `x` in this precision's dtype: the entry of a backbone.
    pub fn enter<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        x.cast(self.dtype())
    }
}

/// `x` back in f32: the exit of a backbone, and the entry of every layer that keeps f32
/// statistics (BatchNorm, LayerNorm).
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(FloatDType::F32)
}

/// `w` in the dtype of the activations `like` it meets (a no-op in f32).
pub fn weight_for<const D: usize, const E: usize>(w: Tensor<D>, like: &Tensor<E>) -> Tensor<D> {
    w.cast(like.dtype())
}

/// Whether `x` is in a reduced precision.
pub fn is_reduced<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() != DType::F32
}

/// `conv.forward(x)` with the layer's parameters cast to `x`'s dtype (burn's own kernel).
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let pair = |axis: usize, size: usize| {
        crate::backbones::conv::padding_pair(
            &conv.padding,
            axis,
            size,
            conv.kernel_size[axis],
            conv.stride[axis],
        )
    };
    let ((top, bottom), (left, right)) = (pair(0, h), pair(1, w));
    let options = ConvOptions::new_with_padding(
        conv.stride,
        [(top, bottom), (left, right)],
        conv.dilation,
        conv.groups,
    );
    let weight = weight_for(conv.weight.val(), &x);
    let bias = conv.bias.as_ref().map(|b| weight_for(b.val(), &x));
    burn::tensor::module::conv2d(x, weight, bias, options)
}

/// `linear.forward(x)` with the layer's parameters cast to `x`'s dtype ([`crate::backends::linear`]
/// in f32).
pub fn linear<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    if !is_reduced(&x) {
        return crate::backends::linear(linear, x);
    }
    let weight = weight_for(linear.weight.val(), &x);
    let bias = linear.bias.as_ref().map(|b| weight_for(b.val(), &x));
    burn::tensor::module::linear(x, weight, bias)
}

/// Dynamic loss scaling with PyTorch `GradScaler`'s defaults: the backbone's gradient is
/// multiplied by `scale` on its way in (so that small values survive f16) and divided by it
/// before the optimiser; a step whose scaled gradient overflowed is skipped for the backbone
/// and halves the scale, and every `growth_interval` clean steps double it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: usize,
    clean_steps: usize,
    /// Backbone steps skipped for overflow so far.
    pub skipped: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            clean_steps: 0,
            skipped: 0,
        }
    }
}

impl LossScaler {
    /// Records whether the last scaled gradient was finite and adapts the scale; returns
    /// whether the backbone may step.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                // 2^24 keeps the scaled f32 gradient of any loss near 1 far from f32's range.
                self.scale = (self.scale * self.growth_factor).min(16_777_216.0);
                self.clean_steps = 0;
            }
        } else {
            self.scale = (self.scale * self.backoff_factor).max(1.0);
            self.clean_steps = 0;
            self.skipped += 1;
        }
        finite
    }
}

/// `x` unchanged, whose gradient is multiplied by `scale` on the way back.
///
/// The value is `x + (s x - s x)`, and the two products are the same operation on the same
/// values, so their difference is exactly zero and the value exactly `x`; autodiff sees
/// `d/dx = s` through the undetached product.
pub fn scale_gradient<const D: usize>(x: Tensor<D>, scale: f64) -> Tensor<D> {
    if scale == 1.0 {
        return x;
    }
    let scaled = x.clone().mul_scalar(scale);
    x.detach() + (scaled.clone() - scaled.detach())
}

#[cfg(test)]
mod tests;
