//! What a dump of the release records about its run: the batch layout, the model's and the
//! step's settings under the release's names, and how they map onto ours.

use serde::Deserialize;

use std::collections::BTreeMap;

use crate::backbones::{BackboneConfig, LinearBackboneConfig};
use crate::method::embedder::EmbedderConfig;
use crate::method::gnn::GnnConfig;
use crate::method::graph::BatchLayout;
use crate::method::losses::HardnessMasking;
use crate::method::model::GcaHngConfig;
use crate::train::step::StepConfig;

/// Learning rates recorded in a dump.
#[derive(Clone, Debug, Deserialize)]
pub struct DumpLr {
    pub classifier: f64,
    pub gnn: f64,
    pub backbone: f64,
    pub fc: f64,
}

/// Weight decays recorded in a dump.
#[derive(Clone, Debug, Deserialize)]
pub struct DumpWeightDecay {
    pub classifier: f64,
    pub gnn: f64,
    pub metric: f64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DumpStep {
    pub metrics: BTreeMap<String, f64>,
}

/// The metadata of a dump (`__metadata__["meta"]`, also written as `tiny.json`).
#[derive(Clone, Debug, Deserialize)]
pub struct DumpMeta {
    pub classes_per_batch: usize,
    pub per_class: usize,
    pub embedding: usize,
    pub gnn_layers: usize,
    pub heads: usize,
    pub n_class: usize,
    pub input_shape: Vec<usize>,
    pub backbone_width: usize,
    pub j_avg: f64,
    pub j_gen: f64,
    /// The release's config names: `alpha` is our `hardness_alpha`, `beta` our
    /// `synthetic_beta`, `softmax_factor` our `classification_weight`, `div_weight` our
    /// `diversity_weight`, `dot_weight` our `hardness_weight`.
    pub alpha: f64,
    pub beta: f64,
    pub softmax_factor: f64,
    pub div_weight: f64,
    pub dot_weight: f64,
    pub grad_clip_value: Option<f64>,
    pub lr: DumpLr,
    pub weight_decay: DumpWeightDecay,
    pub steps: Vec<DumpStep>,
    /// Absent in dumps of the release, which always uses its own masking.
    #[serde(default)]
    pub hardness_masking: Option<HardnessMasking>,
}

impl DumpMeta {
    pub fn layout(&self) -> BatchLayout {
        BatchLayout::new(self.classes_per_batch, self.per_class)
    }

    pub fn model_config(&self) -> GcaHngConfig {
        let d_input = self.input_shape.iter().product();
        GcaHngConfig::new(
            EmbedderConfig::new(
                BackboneConfig::Linear(LinearBackboneConfig::new(d_input, self.backbone_width)),
                self.embedding,
            ),
            GnnConfig::new(self.embedding, self.n_class)
                .with_num_layers(self.gnn_layers)
                .with_num_heads(self.heads)
                // The dumps were made with attention dropout 0.
                .with_attention_dropout(0.0),
        )
    }

    pub fn step_config(&self) -> StepConfig {
        StepConfig {
            hardness_alpha: self.alpha,
            synthetic_beta: self.beta,
            classification_weight: self.softmax_factor,
            diversity_weight: self.div_weight,
            hardness_weight: self.dot_weight,
            grad_clip: self.grad_clip_value,
            masking: self.hardness_masking.unwrap_or(HardnessMasking::Release),
            generation: true,
            precision: Default::default(),
        }
    }
}
