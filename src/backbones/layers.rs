//! Building blocks shared by the convolutional backbones.

use burn::config::Config;
use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Tensor};

use super::BatchNormMode;
use crate::backends::batch_norm::Activation;
use crate::io::state_dict::{TorchNamed, TorchParam, join};
use crate::nn::batch_norm::{BatchNorm1d, BatchNorm1dConfig};

impl BatchNormMode {
    /// Puts a BatchNorm layer into this mode.
    pub fn apply(&self, bn: BatchNorm1d) -> BatchNorm1d {
        match self {
            Self::Train => bn.set_training(true),
            Self::Eval => bn.set_training(false),
            Self::Frozen => {
                let mut bn = bn.set_training(false);
                bn.weight = bn.weight.set_require_grad(false);
                bn.bias = bn.bias.set_require_grad(false);
                bn
            }
        }
    }
}

/// Settings of one [`ConvBn`].
#[derive(Config, Debug)]
pub struct ConvBnConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    #[config(default = 1)]
    pub stride: usize,
    /// Symmetric zero padding, or `None` for TensorFlow's "SAME" (extra pixel right and bottom).
    #[config(default = "Some(0)")]
    pub padding: Option<usize>,
    /// 1 for a dense convolution, `in_channels` for a depthwise one.
    #[config(default = 1)]
    pub groups: usize,
    /// BatchNorm epsilon. Default: PyTorch's 1e-5.
    #[config(default = 1e-5)]
    pub epsilon: f64,
}

/// A bias-free convolution followed by BatchNorm: the unit every CNN backbone here repeats.
#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm1d,
}

impl ConvBnConfig {
    pub fn init(&self, mode: &BatchNormMode, device: &Device) -> ConvBn {
        let padding = match self.padding {
            Some(p) => PaddingConfig2d::Explicit(p, p, p, p),
            None => PaddingConfig2d::Same,
        };
        ConvBn {
            conv: Conv2dConfig::new([self.in_channels, self.out_channels], [self.kernel; 2])
                .with_stride([self.stride; 2])
                .with_padding(padding)
                .with_groups(self.groups)
                .with_bias(false)
                .init(device),
            bn: mode.apply(
                BatchNorm1dConfig::new(self.out_channels)
                    .with_epsilon(self.epsilon)
                    .init(device),
            ),
        }
    }
}

impl ConvBn {
    /// Convolution and BatchNorm, no activation.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn.forward(super::conv::conv2d(&self.conv, x))
    }

    pub fn forward_relu(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_act(x, Activation::Relu)
    }

    /// Convolution, BatchNorm and `act` (the last two fused on the CPU).
    pub fn forward_act(&self, x: Tensor<4>, act: Activation) -> Tensor<4> {
        self.bn.forward_act(super::conv::conv2d(&self.conv, x), act)
    }

    /// Registers the two layers under their own names (`conv1`/`bn1`, `conv`/`bn`, ...).
    pub fn torch_names_as(&self, prefix: &str, conv: &str, bn: &str, out: &mut Vec<TorchParam>) {
        self.conv.torch_names(&join(prefix, conv), out);
        self.bn.torch_names(&join(prefix, bn), out);
    }
}

/// Global average and max pooling of `[B, C, H, W]` to `[B, C]`.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    x.flatten::<3>(2, 3).mean_dim(2).flatten::<2>(1, 2)
}

pub fn global_max_pool(x: Tensor<4>) -> Tensor<2> {
    x.flatten::<3>(2, 3).max_dim(2).flatten::<2>(1, 2)
}
