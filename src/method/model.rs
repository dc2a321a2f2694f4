//! The whole trainable model: embedder, GNN decoder and the softmax classifier that judges
//! synthetic negatives.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Device;

use crate::io::state_dict::{TorchNamed, TorchParam, join};
use crate::method::embedder::{Embedder, EmbedderConfig};
use crate::method::gnn::{Gnn, GnnConfig};
use crate::method::losses::proxy_anchor::{ProxyAnchor, ProxyAnchorConfig};

/// Configuration of a [`GcaHng`] model.
#[derive(Config, Debug)]
pub struct GcaHngConfig {
    pub embedder: EmbedderConfig,
    pub gnn: GnnConfig,
    /// Proxies of the Proxy-Anchor base loss; `None` trains with N-pair (the release).
    #[config(default = "None")]
    pub proxy_anchor: Option<ProxyAnchorConfig>,
}

/// The GCA-HNG model (the release's `GCA_HNG` module, names included).
#[derive(Module, Debug)]
pub struct GcaHng {
    pub embedder: Embedder,
    pub gnn: Gnn,
    /// `W_s`: classifies embeddings, and so tells whether a synthetic negative still looks
    /// like the class it was made from.
    pub classifier: Linear,
    /// The Proxy-Anchor proxies when that is the base loss.
    pub proxies: Option<ProxyAnchor>,
}

impl GcaHngConfig {
    pub fn init(&self, device: &Device) -> GcaHng {
        GcaHng {
            embedder: self.embedder.init(device),
            gnn: self.gnn.init(device),
            classifier: LinearConfig::new(self.embedder.embedding_dim, self.gnn.num_classes)
                .init(device),
            proxies: self.proxy_anchor.as_ref().map(|c| c.init(device)),
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
        if let Some(p) = &self.proxies {
            p.torch_names(&join(prefix, "criterion"), out);
        }
    }
}
