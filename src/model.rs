//! The whole trainable model: embedder, GNN decoder and the softmax classifier that judges
//! synthetic negatives.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Device;

use crate::embedding::{Embedder, EmbedderConfig};
use crate::gnn::{Gnn, GnnConfig};
use crate::state_dict::{TorchNamed, TorchParam, join};

/// Configuration of a [`GcaHng`] model.
#[derive(Config, Debug)]
pub struct GcaHngConfig {
    pub embedder: EmbedderConfig,
    pub gnn: GnnConfig,
}

/// The GCA-HNG model (the release's `GCA_HNG` module, names included).
#[derive(Module, Debug)]
pub struct GcaHng {
    pub embedder: Embedder,
    pub gnn: Gnn,
    /// `W_s`: classifies embeddings, and so tells whether a synthetic negative still looks
    /// like the class it was made from.
    pub classifier: Linear,
}

impl GcaHngConfig {
    pub fn init(&self, device: &Device) -> GcaHng {
        GcaHng {
            embedder: self.embedder.init(device),
            gnn: self.gnn.init(device),
            classifier: LinearConfig::new(self.embedder.d_embedding, self.gnn.num_classes)
                .init(device),
        }
    }
}

impl TorchNamed for GcaHng {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.embedder
            .torch_names(&join(prefix, "feature_extractor"), out);
        self.gnn.torch_names(&join(prefix, "gnn"), out);
        self.classifier
            .torch_names(&join(prefix, "softmax_classifier"), out);
    }
}
