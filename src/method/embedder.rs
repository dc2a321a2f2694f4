//! The embedder: backbone features -> BatchNorm1d -> Linear to the embedding width.
//! No L2 normalisation while training (METHOD.md section 2).

use crate::nn::precision::Precision;
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use crate::backbones::{Backbone, BackboneConfig};
use crate::io::state_dict::{TorchNamed, TorchParam, join};
use crate::nn::batch_norm::{BatchNorm1d, BatchNorm1dConfig};

/// Configuration of the embedding head (`fc` in the release).
#[derive(Config, Debug)]
pub struct EmbeddingHeadConfig {
    /// Backbone feature width.
    pub d_input: usize,
    /// Embedding width `d`.
    pub embedding_dim: usize,
}

#[derive(Module, Debug)]
pub struct EmbeddingHead {
    pub norm: BatchNorm1d,
    pub linear: Linear,
}

impl EmbeddingHeadConfig {
    pub fn init(&self, device: &Device) -> EmbeddingHead {
        EmbeddingHead {
            norm: BatchNorm1dConfig::new(self.d_input).init(device),
            linear: LinearConfig::new(self.d_input, self.embedding_dim).init(device),
        }
    }
}

impl EmbeddingHead {
    pub fn forward(&self, features: Tensor<2>) -> Tensor<2> {
        crate::backends::linear(&self.linear, self.norm.forward(features))
    }
}

impl TorchNamed for EmbeddingHead {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.norm.torch_names(&join(prefix, "0"), out);
        self.linear.torch_names(&join(prefix, "1"), out);
    }
}

/// Configuration of an [`Embedder`].
#[derive(Config, Debug)]
pub struct EmbedderConfig {
    pub backbone: BackboneConfig,
    /// Embedding width `d`.
    pub embedding_dim: usize,
}

/// `z = Linear(BatchNorm1d(backbone(x)))` (`feature_extractor` in the release).
#[derive(Module, Debug)]
pub struct Embedder {
    pub backbone: Backbone,
    pub head: EmbeddingHead,
}

impl EmbedderConfig {
    pub fn init(&self, device: &Device) -> Embedder {
        Embedder {
            backbone: self.backbone.init(device),
            head: EmbeddingHeadConfig::new(self.backbone.width(), self.embedding_dim).init(device),
        }
    }
}

impl Embedder {
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.backbone.forward(images))
    }

    /// `forward` with the backbone in `precision`; the head is always f32.
    ///
    /// # Shapes
    /// - images: `[batch, 3, height, width]`
    /// - output: `[batch, embedding_dim]`
    pub fn forward_in(&self, images: Tensor<4>, precision: Precision) -> Tensor<2> {
        self.head
            .forward(self.backbone.forward_in(images, precision))
    }
}

impl TorchNamed for Embedder {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.backbone.torch_names(&join(prefix, "backbone"), out);
        self.head.torch_names(&join(prefix, "fc"), out);
    }
}
