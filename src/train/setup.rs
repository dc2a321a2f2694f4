//! From an experiment configuration to the things a run needs: the splits (with the
//! validation classes carved out), the model with its pretrained backbone, and the step's
//! settings.

use std::path::Path;

use burn::tensor::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::backbones::{BackboneConfig, BackboneKind};
use crate::config::{BaseLoss, ConfigError, ExperimentConfig, SelectOn};
use crate::data::transform::Normalisation;
use crate::data::{Dataset, DatasetKind, Sample, Split};
use crate::error::Cause;
use crate::error::{Error, Result};
use crate::io::state_dict::{StateDict, load_torch};
use crate::io::weights::read_weights;
use crate::method::embedder::EmbedderConfig;
use crate::method::gnn::GnnConfig;
use crate::method::graph::BatchLayout;
use crate::method::losses::proxy_anchor::ProxyAnchorConfig;
use crate::method::model::{GcaHng, GcaHngConfig};
use crate::train::checkpoint::CheckpointError;
use crate::train::step::{StepConfig, WeightDecays};

/// EfficientNet-Lite0's ImageNet weights (Apache-2.0, see `assets/efficientnet-lite0/`),
/// embedded so that the demo and emoji runs need no download.
const EFFICIENTNET_LITE0_F16: &[u8] =
    include_bytes!("../../assets/efficientnet-lite0/efficientnet-lite0-f16.safetensors");

/// The embedded EfficientNet-Lite0 weights.
pub fn embedded_efficientnet_lite0() -> StateDict {
    StateDict::from_safetensors_bytes(EFFICIENTNET_LITE0_F16)
        .expect("the embedded EfficientNet-Lite0 asset is a valid safetensors file")
}

/// What a run evaluates on.
#[derive(Clone, Debug)]
pub enum EvalSet {
    /// Every image queries all the others (CUB, Cars, SOP, emoji, a validation split).
    Single(Split),
    /// In-Shop: queries against a separate gallery.
    QueryGallery { query: Split, gallery: Split },
}

impl EvalSet {
    pub fn images(&self) -> usize {
        match self {
            EvalSet::Single(s) => s.samples.len(),
            EvalSet::QueryGallery { query, gallery } => query.samples.len() + gallery.samples.len(),
        }
    }
}

/// The splits of a run.
#[derive(Clone, Debug)]
pub struct RunData {
    pub train: Split,
    /// Classes held out of `train` for model selection.
    pub validation: Option<EvalSet>,
    pub test: EvalSet,
    /// Recall@k of this dataset's protocol.
    pub ks: Vec<usize>,
}

/// The k of Recall@k each benchmark reports (METHOD.md section 8).
pub fn recall_ks(kind: DatasetKind) -> Vec<usize> {
    match kind {
        DatasetKind::Sop => vec![1, 10, 100, 1000],
        DatasetKind::Inshop => vec![1, 10, 20, 30, 40, 50],
        _ => vec![1, 2, 4, 8],
    }
}

fn take_split(dataset: &Dataset, name: &str) -> Result<Split> {
    Ok(dataset.require_split(name)?.clone())
}

/// Reads the dataset of `config` and carves the validation classes out of its training split
/// when the configuration selects on validation.
pub fn run_data(config: &ExperimentConfig, root_override: Option<&Path>) -> Result<RunData> {
    let d = &config.data;
    let root = match (root_override, &d.root) {
        (Some(r), _) => r.to_path_buf(),
        (None, Some(r)) => r.into(),
        (None, None) if d.kind == DatasetKind::Emoji => Default::default(),
        (None, None) => {
            return Err(ConfigError::Unset {
                key: "data.root",
                hint: "give --data-root DIR".into(),
            }
            .into());
        }
    };
    let dataset = Dataset::open(d.kind, &root)?;
    let train = take_split(&dataset, "train")?;
    let test = match d.kind {
        DatasetKind::Inshop => EvalSet::QueryGallery {
            query: take_split(&dataset, "query")?,
            gallery: take_split(&dataset, "gallery")?,
        },
        _ => EvalSet::Single(take_split(&dataset, "test")?),
    };
    let (train, validation) = match config.train.select_on {
        SelectOn::Test => (train, None),
        SelectOn::Validation => {
            if d.validation_fraction <= 0.0 {
                return Err(ConfigError::Invalid {
                    key: "train.select_on",
                    rule: "= \"validation\" needs `data.validation_fraction` > 0 (or select on the test set with `train.select_on = \"test\"`)",
                }
                .into());
            }
            let (train, validation) =
                carve_validation(&train, d.validation_fraction, config.train.seed)?;
            (train, Some(EvalSet::Single(validation)))
        }
    };
    Ok(RunData {
        train,
        validation,
        test,
        ks: recall_ks(d.kind),
    })
}

/// The samples of the split `name` of the configuration's dataset (`root_override` replaces
/// `data.root`), as the dataset lists them: no validation classes carved out.
pub fn split_samples(
    config: &ExperimentConfig,
    root_override: Option<&Path>,
    name: &str,
) -> Result<Vec<Sample>> {
    let kind = config.data.kind;
    let root = match root_override {
        Some(r) => r.to_path_buf(),
        None => config.data.root.clone().map(Into::into).unwrap_or_default(),
    };
    let dataset = Dataset::open(kind, &root)?;
    Ok(dataset.require_split(name)?.samples.clone())
}

/// Splits `train` by class: a seeded `fraction` of its classes (at least 2) become the
/// validation split; both parts are relabelled `0..K` in their original order.
pub fn carve_validation(
    train: &Split,
    fraction: f64,
    seed: u64,
) -> Result<(Split, Split), ConfigError> {
    let k = train.classes.len();
    let held = ((k as f64 * fraction).round() as usize).max(2);
    if held + 2 > k {
        return Err(ConfigError::ValidationFraction {
            fraction,
            classes: k,
        });
    }
    let mut order: Vec<usize> = (0..k).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5A11_DA7E));
    let mut is_val = vec![false; k];
    for &c in &order[..held] {
        is_val[c] = true;
    }
    let part = |want: bool, name: &str| {
        let mut new_label = vec![usize::MAX; k];
        let mut classes = Vec::new();
        for c in 0..k {
            if is_val[c] == want {
                new_label[c] = classes.len();
                classes.push(train.classes[c].clone());
            }
        }
        let samples = train
            .samples
            .iter()
            .filter(|s| is_val[s.label] == want)
            .map(|s| crate::data::Sample {
                source: s.source.clone(),
                label: new_label[s.label],
            })
            .collect();
        Split {
            name: name.into(),
            samples,
            classes,
        }
    };
    Ok((part(false, "train"), part(true, "validation")))
}

/// Keeps the first `classes` classes of an evaluation split (smoke runs).
pub fn limit_classes(split: &Split, classes: usize) -> Split {
    Split {
        name: split.name.clone(),
        samples: split
            .samples
            .iter()
            .filter(|s| s.label < classes)
            .cloned()
            .collect(),
        classes: split.classes.iter().take(classes).cloned().collect(),
    }
}

impl EvalSet {
    /// The same set restricted to its first `classes` classes.
    pub fn limited(&self, classes: usize) -> EvalSet {
        match self {
            EvalSet::Single(s) => EvalSet::Single(limit_classes(s, classes)),
            EvalSet::QueryGallery { query, gallery } => EvalSet::QueryGallery {
                query: limit_classes(query, classes),
                gallery: limit_classes(gallery, classes),
            },
        }
    }
}

/// Input normalisation each backbone's pretrained weights expect.
pub fn normalisation(kind: BackboneKind) -> Normalisation {
    match kind {
        BackboneKind::EfficientnetLite0 => Normalisation::EfficientNet,
        _ => Normalisation::ImageNet,
    }
}

/// The backbone a configuration describes (no classification head).
pub fn backbone_config(config: &ExperimentConfig) -> Result<BackboneConfig> {
    let m = &config.model;
    let pooling = m.pooling.parse()?;
    Ok(m.backbone.config(m.batch_norm, pooling))
}

/// Whether a pretrained checkpoint's tensor belongs to a classification head the embedding
/// backbone does not have. Everything else must match strictly.
fn is_classifier_head(kind: BackboneKind, name: &str) -> bool {
    kind.classifier_heads().iter().any(|h| name.starts_with(h))
}

/// The pretrained weights of the configured backbone: `model.weights`, or the embedded
/// EfficientNet-Lite0 when that is the backbone and no file is given. Returns the weights
/// without classification heads and a description of where they came from.
pub fn pretrained_weights(config: &ExperimentConfig) -> Result<(StateDict, String)> {
    let kind = config.model.backbone;
    let (mut dict, source) = match (&config.model.weights, kind) {
        (Some(path), _) => (read_weights(Path::new(path))?, path.clone()),
        (None, BackboneKind::EfficientnetLite0) => (
            embedded_efficientnet_lite0(),
            "embedded EfficientNet-Lite0 (ImageNet)".to_string(),
        ),
        (None, other) => {
            let hint = match other {
                BackboneKind::Resnet50 => {
                    "torchvision's resnet50-0676ba61.pth or resnet50-19c8e357.pth"
                }
                BackboneKind::Googlenet => "torchvision's googlenet-1378be20.pth",
                BackboneKind::VitS16 => "DINO's dino_deitsmall16_pretrain.pth",
                BackboneKind::EfficientnetLite0 => unreachable!(),
            };
            return Err(ConfigError::Unset {
                key: "model.weights",
                hint: format!(
                    "the {other} backbone needs ImageNet weights ({hint}); give --weights FILE"
                ),
            }
            .into());
        }
    };
    dict.tensors
        .retain(|name, _| !is_classifier_head(kind, name));
    // Checked here because a NaN in the weights shows only later, as a diverged loss.
    let bad: Vec<String> = dict
        .tensors
        .iter()
        .filter(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
        .map(|(name, _)| name.clone())
        .collect();
    if !bad.is_empty() {
        return Err(crate::io::WeightsError::NotFinite {
            path: source.into(),
            count: bad.len(),
            tensors: crate::io::error::short_list(&bad),
        }
        .into());
    }
    Ok((dict, source))
}

/// The model a configuration describes, freshly initialised (backbone included) on `device`.
pub fn init_model(
    config: &ExperimentConfig,
    num_classes: usize,
    device: &Device,
) -> Result<GcaHng> {
    let m = &config.model;
    let embedder = EmbedderConfig::new(backbone_config(config)?, m.embedding_dim);
    let gnn = GnnConfig::new(m.embedding_dim, num_classes)
        .with_num_layers(m.gnn_layers)
        .with_num_heads(m.heads)
        .with_attention_dropout(m.attention_dropout);
    let proxy_anchor = (config.loss.base == BaseLoss::ProxyAnchor).then(|| {
        ProxyAnchorConfig::new(num_classes, m.embedding_dim)
            .with_margin(config.loss.proxy_margin)
            .with_scale(config.loss.proxy_scale)
    });
    Ok(GcaHngConfig::new(embedder, gnn)
        .with_proxy_anchor(proxy_anchor)
        .init(device))
}

/// The model of a run at the start of training: its backbone loaded from `weights`.
pub fn build_model(
    config: &ExperimentConfig,
    num_classes: usize,
    weights: &StateDict,
    device: &Device,
) -> Result<GcaHng> {
    let mut model = init_model(config, num_classes, device)?;
    model.embedder.backbone =
        load_torch(model.embedder.backbone, weights, "", device).map_err(|source| {
            Error::Pretrained {
                weights: config
                    .model
                    .weights
                    .clone()
                    .unwrap_or_else(|| "(embedded EfficientNet-Lite0)".into()),
                backbone: config.model.backbone,
                source,
            }
        })?;
    Ok(model)
}

/// A trained model read from a checkpoint file.
pub struct LoadedCheckpoint {
    pub model: GcaHng,
    pub config: ExperimentConfig,
    /// [`checkpoint::model_fingerprint`](super::checkpoint::model_fingerprint) of its tensors.
    pub fingerprint: String,
}

/// A trained model and its configuration from a checkpoint file (`best` or `last`).
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    let (dict, meta) = super::checkpoint::read(path)?;
    let config: ExperimentConfig =
        toml::from_str(&meta.config_toml).map_err(|e| CheckpointError::BadConfig {
            path: path.to_path_buf(),
            source: Cause(e.message().to_string()),
        })?;
    let model = init_model(&config, meta.num_classes, device)?;
    let model = super::checkpoint::load_model(model, &dict, device).map_err(|e| e.in_file(path))?;
    Ok(LoadedCheckpoint {
        model,
        config,
        fingerprint: super::checkpoint::model_fingerprint(&dict),
    })
}

/// The step's loss settings.
pub fn step_config(config: &ExperimentConfig) -> StepConfig {
    let l = &config.loss;
    StepConfig {
        hardness_alpha: l.hardness_alpha,
        synthetic_beta: l.synthetic_beta,
        classification_weight: l.classification_weight,
        diversity_weight: l.diversity_weight,
        hardness_weight: l.hardness_weight,
        grad_clip: (config.optim.grad_clip > 0.0).then_some(config.optim.grad_clip),
        masking: l.masking,
        generation: l.generation,
        precision: config.train.precision,
    }
}

pub fn weight_decays(config: &ExperimentConfig) -> WeightDecays {
    WeightDecays {
        metric: config.optim.weight_decay,
        gnn: config.optim.weight_decay,
        classifier: config.optim.classifier_weight_decay,
    }
}

pub fn layout(config: &ExperimentConfig) -> BatchLayout {
    BatchLayout::new(config.data.classes_per_batch, config.data.per_class)
}

#[cfg(test)]
mod tests;
