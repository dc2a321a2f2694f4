//! Feature extractors that turn an image batch into one feature vector per image.
//!
//! Every backbone implements the same interface: `forward([B, C, H, W]) -> [B, width]`,
//! `width()`, and PyTorch naming (torchvision's, DINO's, efficientnet-lite-pytorch's) for
//! loading pretrained weights. One file per architecture.

pub mod classify;
pub mod conv;
pub mod efficientnet;
pub mod googlenet;
pub mod kind;
pub mod layers;
pub mod resnet;
pub mod vit;

use crate::nn::precision::{self, Precision};
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::io::state_dict::{TorchNamed, TorchParam, join};

pub use efficientnet::{EfficientNetLite, EfficientNetLiteConfig};
pub use googlenet::{GoogLeNet, GoogLeNetConfig};
pub use kind::{BackboneKind, BatchNormMode};
pub use resnet::{Pooling, ResNet50, ResNet50Config};
pub use vit::{Vit, VitConfig};

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
        relu(precision::linear(&self.lin, images.flatten::<2>(1, 3)))
    }
}

/// A backbone that passes precomputed features through (`[B, width, 1, 1]` or any
/// `[B, ...]` flattening to `width`): training on cached features, and timing the method
/// without a backbone.
#[derive(Module, Debug, Default)]
pub struct IdentityBackbone;

/// The feature extractor of an embedder.
// One backbone lives per model and is moved only when a training step hands the model back,
// so the few kilobytes of the largest variant cost nothing worth a `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone {
    Linear(LinearBackbone),
    Identity(IdentityBackbone),
    ResNet50(ResNet50),
    GoogLeNet(GoogLeNet),
    Vit(Vit),
    EfficientNetLite0(EfficientNetLite),
}

/// Which backbone to build.
#[derive(Config, Debug)]
pub enum BackboneConfig {
    /// The stand-in of the reference dumps.
    Linear(LinearBackboneConfig),
    /// Features are the input; `width` is their size.
    Identity { width: usize },
    /// torchvision ResNet-50 trunk (2048-d).
    ResNet50(ResNet50Config),
    /// torchvision GoogLeNet trunk (1024-d).
    GoogLeNet(GoogLeNetConfig),
    /// DINO ViT-S/16 (384-d CLS token).
    Vit(VitConfig),
    /// EfficientNet-Lite0 trunk (1280-d).
    EfficientNetLite0(EfficientNetLiteConfig),
}

impl BackboneConfig {
    pub fn init(&self, device: &Device) -> Backbone {
        match self {
            Self::Linear(c) => Backbone::Linear(c.init(device)),
            Self::Identity { .. } => Backbone::Identity(IdentityBackbone),
            Self::ResNet50(c) => Backbone::ResNet50(c.init(device)),
            Self::GoogLeNet(c) => Backbone::GoogLeNet(c.init(device)),
            Self::Vit(c) => Backbone::Vit(c.init(device)),
            Self::EfficientNetLite0(c) => Backbone::EfficientNetLite0(c.init(device)),
        }
    }

    /// Width of the feature vector the backbone returns.
    pub fn width(&self) -> usize {
        match self {
            Self::Linear(c) => c.width,
            Self::Identity { width } => *width,
            Self::ResNet50(_) => ResNet50::WIDTH,
            Self::GoogLeNet(_) => GoogLeNet::WIDTH,
            Self::Vit(c) => c.dim,
            Self::EfficientNetLite0(_) => EfficientNetLite::WIDTH,
        }
    }
}

impl Backbone {
    /// `forward` with the arithmetic in `precision` (see [`crate::nn::precision`]); the
    /// features come back in f32 whatever it is.
    ///
    /// # Shapes
    /// - images: `[batch, 3, height, width]`
    /// - output: `[batch, width]`
    pub fn forward_in(&self, images: Tensor<4>, precision: Precision) -> Tensor<2> {
        match precision {
            Precision::F32 => self.forward(images),
            reduced => precision::to_f32(self.forward(reduced.enter(images))),
        }
    }

    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::Linear(b) => b.forward(images),
            Self::Identity(_) => images.flatten::<2>(1, 3),
            Self::ResNet50(b) => b.forward(images),
            Self::GoogLeNet(b) => b.forward(images),
            Self::Vit(b) => b.forward(images),
            Self::EfficientNetLite0(b) => b.forward(images),
        }
    }
}

impl TorchNamed for Backbone {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        match self {
            Self::Linear(b) => b.lin.torch_names(&join(prefix, "lin"), out),
            Self::Identity(_) => {}
            Self::ResNet50(b) => b.torch_names(prefix, out),
            Self::GoogLeNet(b) => b.torch_names(prefix, out),
            Self::Vit(b) => b.torch_names(prefix, out),
            Self::EfficientNetLite0(b) => b.torch_names(prefix, out),
        }
    }
}
