//! Feature extractors that turn an image batch into one feature vector per image.
//!
//! Every backbone implements the same interface: `forward([B, C, H, W]) -> [B, width]`,
//! `width()`, and PyTorch naming for weight loading. The real ImageNet backbones plug in here
//! as further variants of [`Backbone`].

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::state_dict::{TorchNamed, TorchParam, join};

/// The stand-in backbone of the reference dumps: flatten, `Linear(in, width)`, ReLU.
#[derive(Config, Debug)]
pub struct LinearBackboneConfig {
    /// Number of input values per image (C*H*W).
    pub d_input: usize,
    /// Output width.
    pub width: usize,
}

#[derive(Module, Debug)]
pub struct LinearBackbone {
    pub lin: Linear,
}

impl LinearBackboneConfig {
    pub fn init(&self, device: &Device) -> LinearBackbone {
        LinearBackbone {
            lin: LinearConfig::new(self.d_input, self.width).init(device),
        }
    }
}

impl LinearBackbone {
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        relu(self.lin.forward(images.flatten::<2>(1, 3)))
    }
}

/// A backbone that passes precomputed features through (`[B, width, 1, 1]` or any
/// `[B, ...]` flattening to `width`): training on cached features, and timing the method
/// without a backbone.
#[derive(Module, Debug, Default)]
pub struct IdentityBackbone;

/// The feature extractor of an embedder.
#[derive(Module, Debug)]
pub enum Backbone {
    Linear(LinearBackbone),
    Identity(IdentityBackbone),
}

/// Which backbone to build.
#[derive(Config, Debug)]
pub enum BackboneConfig {
    /// The stand-in of the reference dumps.
    Linear(LinearBackboneConfig),
    /// Features are the input; `width` is their size.
    Identity { width: usize },
}

impl BackboneConfig {
    pub fn init(&self, device: &Device) -> Backbone {
        match self {
            Self::Linear(c) => Backbone::Linear(c.init(device)),
            Self::Identity { .. } => Backbone::Identity(IdentityBackbone),
        }
    }

    /// Width of the feature vector the backbone returns.
    pub fn width(&self) -> usize {
        match self {
            Self::Linear(c) => c.width,
            Self::Identity { width } => *width,
        }
    }
}

impl Backbone {
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::Linear(b) => b.forward(images),
            Self::Identity(_) => images.flatten::<2>(1, 3),
        }
    }
}

impl TorchNamed for Backbone {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        match self {
            Self::Linear(b) => b.lin.torch_names(&join(prefix, "lin"), out),
            Self::Identity(_) => {}
        }
    }
}
