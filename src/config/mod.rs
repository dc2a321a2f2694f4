//! Experiment configuration: every setting of a training run, the release's twelve presets and
//! the demo, TOML in and out, `key=value` overrides, and a run's configuration
//! assembled from a preset or file and typed settings.

use std::path::Path;

use serde::{Deserialize, Serialize};

mod assemble;
mod error;
mod presets;

pub use assemble::{ConfigBase, RunSettings};
pub use error::ConfigError;
pub use presets::PRESETS;

pub use crate::method::losses::{BaseLoss, HardnessMasking};

pub use crate::data::DatasetKind;

pub use crate::backbones::{BackboneKind, BatchNormMode};

/// Where the best epoch is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SelectOn {
    /// A validation split carved from the training classes (our default).
    Validation,
    /// The test set (the release's protocol; optimistic).
    Test,
}

crate::string_forms_from_value_enum!(SelectOn: "selection split");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub kind: DatasetKind,
    /// Dataset root; unused for `emoji`.
    pub root: Option<String>,
    /// Training crop size (pixels).
    pub image_size: usize,
    /// Test images: resize the shorter side to this, then centre-crop `image_size`.
    pub resize: usize,
    /// RandomResizedCrop scale range.
    pub crop_scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range.
    pub crop_ratio: [f64; 2],
    /// C: classes per batch.
    pub classes_per_batch: usize,
    /// P: images per class.
    pub per_class: usize,
    /// Share of the training classes held out for model selection (0 disables).
    pub validation_fraction: f64,
    /// Loader threads.
    pub workers: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub backbone: BackboneKind,
    /// Pretrained weights (`.pth` or `.safetensors`); the embedded EfficientNet-Lite0 when
    /// absent for that backbone.
    pub weights: Option<String>,
    /// ResNet-50 pooling: `avg`, `max` or `avg+max`.
    pub pooling: String,
    pub batch_norm: BatchNormMode,
    /// Embedding width d (METHOD.md section 2). Read also under its earlier name `embedding`.
    #[serde(alias = "embedding")]
    pub embedding_dim: usize,
    pub gnn_layers: usize,
    pub heads: usize,
    pub attention_dropout: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    pub base: BaseLoss,
    /// `false` trains the plain baseline (no graph, no synthesis).
    pub generation: bool,
    pub masking: HardnessMasking,
    /// α of the hardness schedule `λ = exp(-α / J̄_m)` (METHOD.md section 6; the release's
    /// `alpha`).
    #[serde(alias = "alpha")]
    pub hardness_alpha: f64,
    /// β of J_syn's weight `1 - exp(-β / J̄_gen)` (METHOD.md section 7; the release's `beta`).
    #[serde(alias = "beta")]
    pub synthetic_beta: f64,
    /// Weight of J_cls in J_gen (the release's `softmax_factor`).
    #[serde(alias = "softmax_factor")]
    pub classification_weight: f64,
    /// Weight of J_div in J_gen (the release's `div_weight`).
    #[serde(alias = "div_weight")]
    pub diversity_weight: f64,
    /// Weight of J_hard in J_gen (the release's `dot_weight`).
    #[serde(alias = "dot_weight")]
    pub hardness_weight: f64,
    /// Proxy-Anchor's margin δ.
    pub proxy_margin: f64,
    /// Proxy-Anchor's scale (the α of the Proxy-Anchor paper, unrelated to `hardness_alpha`).
    #[serde(alias = "proxy_alpha")]
    pub proxy_scale: f64,
    /// Proxy learning rate = `lr * proxy_lr_ratio` (100 in the Proxy-Anchor paper).
    pub proxy_lr_ratio: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Backbone learning rate.
    pub lr: f64,
    /// Embedding head learning rate = `lr * embedding_ratio`.
    pub embedding_ratio: f64,
    pub gnn_lr: f64,
    pub classifier_lr: f64,
    pub weight_decay: f64,
    pub classifier_weight_decay: f64,
    /// Clip embedder and GNN gradients by value; 0 disables.
    pub grad_clip: f64,
    /// StepLR of the embedder: every `metric_decay_steps` epochs multiply by `metric_gamma`.
    pub metric_decay_steps: usize,
    pub metric_gamma: f64,
    /// Epochs during which only the embedding head trains.
    pub warm_up_epochs: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub eval_every: usize,
    pub seed: u64,
    pub device: String,
    /// The backbone's arithmetic in training and embedding (`f32`, `f16`, `bf16`); reduced
    /// precision is meant for GPUs. Default: f32.
    #[serde(default)]
    pub precision: crate::nn::precision::Precision,
    pub out: String,
    pub select_on: SelectOn,
    /// At most this many steps per epoch (smoke runs); absent: whole epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps_per_epoch: Option<usize>,
    /// Evaluate on the first N classes of each evaluation split only (smoke runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_class_limit: Option<usize>,
    /// Leave out unreadable images instead of stopping; every one left out is reported.
    #[serde(default)]
    pub skip_bad_images: bool,
}

/// Every setting of one experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
}

impl ExperimentConfig {
    /// Reads a TOML file; errors name the file, and the key or line at fault.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            crate::io::regular::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        let config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            line: e.span().map(|s| error::line_of(&text, s.start)),
            message: e.message().to_string(),
        })?;
        config.validate().map_err(|e| ConfigError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        Ok(config)
    }

    /// The full configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config always serialises")
    }

    /// Applies `key=value` overrides (dotted keys such as `optim.lr=3e-4`). Values are TOML
    /// literals; a bare word is taken as a string. Unknown keys and values of the wrong type are
    /// errors naming the key.
    pub fn with_overrides(self, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut tree = toml::Value::try_from(&self).expect("a config always serialises");
        for item in overrides {
            let Some((key, raw)) = item.split_once('=') else {
                return Err(ConfigError::NotAnOverride { item: item.clone() });
            };
            let key = current_key(key.trim());
            let value = parse_value(raw.trim());
            let parts: Vec<&str> = key.split('.').collect();
            set_path(&mut tree, &parts, value, key)?;
            // Checked one override at a time so that a type error names its key.
            tree.clone()
                .try_into::<Self>()
                .map_err(|e| ConfigError::BadValue {
                    key: key.to_string(),
                    message: e.message().to_string(),
                })?;
        }
        // Every override was checked on its own above, so the whole tree converts.
        let config: Self = tree
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::BadValue {
                key: overrides.join(" "),
                message: e.message().to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that the types alone do not; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        let m = &self.model;
        let o = &self.optim;
        let check = |ok: bool, key: &'static str, rule: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid { key, rule })
            }
        };
        check(
            d.classes_per_batch >= 2,
            "data.classes_per_batch",
            "must be at least 2",
        )?;
        check(d.per_class >= 2, "data.per_class", "must be at least 2")?;
        check(d.image_size >= 16, "data.image_size", "must be at least 16")?;
        check(
            d.resize >= d.image_size,
            "data.resize",
            "must be at least data.image_size",
        )?;
        check(
            d.image_size <= limits::IMAGE_SIZE,
            "data.image_size",
            "must be at most 4096",
        )?;
        check(
            d.resize <= limits::RESIZE,
            "data.resize",
            "must be at most 8192",
        )?;
        check(
            d.classes_per_batch <= limits::BATCH_IMAGES
                && d.per_class <= limits::BATCH_IMAGES
                && d.classes_per_batch * d.per_class <= limits::BATCH_IMAGES,
            "data.classes_per_batch",
            "times data.per_class must be at most 4096 images",
        )?;
        check(
            (d.classes_per_batch * d.per_class) as u64 * (d.image_size as u64).pow(2) * 3 * 4
                <= limits::BATCH_BYTES,
            "data.image_size",
            "makes one batch of images larger than 16 GiB (lower it or the batch size)",
        )?;
        check(
            d.workers <= limits::WORKERS,
            "data.workers",
            "must be at most 256",
        )?;
        check(
            0.0 < d.crop_scale[0] && d.crop_scale[0] <= d.crop_scale[1] && d.crop_scale[1] <= 1.0,
            "data.crop_scale",
            "must be [low, high] with 0 < low <= high <= 1",
        )?;
        check(
            0.0 < d.crop_ratio[0]
                && d.crop_ratio[0] <= d.crop_ratio[1]
                && d.crop_ratio[1].is_finite(),
            "data.crop_ratio",
            "must be [low, high] with 0 < low <= high, both finite",
        )?;
        check(
            (0.0..0.9).contains(&d.validation_fraction),
            "data.validation_fraction",
            "must be in [0, 0.9)",
        )?;
        check(
            d.kind == DatasetKind::Emoji || d.root.is_some(),
            "data.root",
            "is required for this dataset kind",
        )?;
        check(
            matches!(m.pooling.as_str(), "avg" | "max" | "avg+max"),
            "model.pooling",
            "must be avg, max or avg+max",
        )?;
        check(
            m.embedding_dim > 0,
            "model.embedding_dim",
            "must be positive",
        )?;
        check(
            m.heads > 0 && m.embedding_dim.is_multiple_of(m.heads),
            "model.heads",
            "must divide model.embedding_dim",
        )?;
        check(m.gnn_layers >= 1, "model.gnn_layers", "must be at least 1")?;
        check(
            m.embedding_dim <= limits::EMBEDDING_DIM,
            "model.embedding_dim",
            "must be at most 65536",
        )?;
        check(
            m.gnn_layers <= limits::GNN_LAYERS,
            "model.gnn_layers",
            "must be at most 64",
        )?;
        check(
            (0.0..1.0).contains(&m.attention_dropout),
            "model.attention_dropout",
            "must be in [0, 1)",
        )?;
        for (key, v) in [
            ("optim.lr", o.lr),
            ("optim.gnn_lr", o.gnn_lr),
            ("optim.classifier_lr", o.classifier_lr),
            ("optim.embedding_ratio", o.embedding_ratio),
        ] {
            check(v > 0.0 && v.is_finite(), key, "must be positive")?;
        }
        check(
            o.metric_gamma > 0.0 && o.metric_gamma.is_finite(),
            "optim.metric_gamma",
            "must be positive",
        )?;
        let l = &self.loss;
        check(
            l.proxy_scale > 0.0 && l.proxy_scale.is_finite(),
            "loss.proxy_scale",
            "must be positive",
        )?;
        check(
            l.proxy_lr_ratio > 0.0 && l.proxy_lr_ratio.is_finite(),
            "loss.proxy_lr_ratio",
            "must be positive",
        )?;
        // Cosine similarities lie in [-1, 1], so a margin outside [0, 2] leaves nothing to
        // separate.
        check(
            (0.0..=2.0).contains(&l.proxy_margin),
            "loss.proxy_margin",
            "must be in [0, 2]",
        )?;
        for (key, v) in [
            ("optim.weight_decay", o.weight_decay),
            ("optim.classifier_weight_decay", o.classifier_weight_decay),
            ("optim.grad_clip", o.grad_clip),
            ("loss.hardness_alpha", l.hardness_alpha),
            ("loss.synthetic_beta", l.synthetic_beta),
            ("loss.classification_weight", l.classification_weight),
            ("loss.diversity_weight", l.diversity_weight),
            ("loss.hardness_weight", l.hardness_weight),
        ] {
            check(
                v >= 0.0 && v.is_finite(),
                key,
                "must be a finite number, not negative",
            )?;
        }
        check(
            o.metric_decay_steps >= 1,
            "optim.metric_decay_steps",
            "must be at least 1",
        )?;
        check(self.train.epochs >= 1, "train.epochs", "must be at least 1")?;
        check(
            self.train.epochs <= limits::EPOCHS,
            "train.epochs",
            "must be at most 100000",
        )?;
        check(
            self.train.max_steps_per_epoch != Some(0),
            "train.max_steps_per_epoch",
            "must be at least 1 (leave it out for whole epochs)",
        )?;
        check(
            self.train.eval_class_limit != Some(0),
            "train.eval_class_limit",
            "must be at least 1 (leave it out to evaluate on every class)",
        )?;
        check(
            self.train.eval_every >= 1,
            "train.eval_every",
            "must be at least 1",
        )?;
        check(
            !self.train.out.trim().is_empty(),
            "train.out",
            "must name a folder",
        )?;
        crate::device::configured(&self.train.device)?;
        Ok(())
    }

    /// Learning rates of an epoch: StepLR for the embedder, cosine over all epochs for the GNN
    /// (`CosineAnnealingLR(T_max = epochs)`), constant for the classifier.
    pub fn learning_rates(&self, epoch: usize) -> crate::train::step::LearningRates {
        let o = &self.optim;
        let step = o.metric_gamma.powi((epoch / o.metric_decay_steps) as i32);
        let t = self.train.epochs as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / t).cos());
        crate::train::step::LearningRates {
            backbone: o.lr * step,
            head: o.lr * o.embedding_ratio * step,
            gnn: o.gnn_lr * cosine,
            classifier: o.classifier_lr,
            proxies: o.lr * self.loss.proxy_lr_ratio * step,
        }
    }
}

/// Upper bounds of the size settings, checked before anything is allocated from them: far
/// above what any experiment uses, low enough that a typo cannot ask for terabytes.
pub mod limits {
    /// `data.image_size`, pixels.
    pub const IMAGE_SIZE: usize = 4096;
    /// `data.resize`, pixels.
    pub const RESIZE: usize = 8192;
    /// Images in one batch (`data.classes_per_batch` x `data.per_class`).
    pub const BATCH_IMAGES: usize = 4096;
    /// Bytes of one batch of f32 images.
    pub const BATCH_BYTES: u64 = 16 << 30;
    /// `data.workers`.
    pub const WORKERS: usize = 256;
    /// `model.embedding_dim`.
    pub const EMBEDDING_DIM: usize = 65536;
    /// `model.gnn_layers`.
    pub const GNN_LAYERS: usize = 64;
    /// `train.epochs`.
    pub const EPOCHS: usize = 100_000;
}

/// Keys renamed since they were first written, old name first: config files and run folders
/// keep loading through serde aliases, and `--set` takes the old names through this table.
const RENAMED_KEYS: [(&str, &str); 7] = [
    ("model.embedding", "model.embedding_dim"),
    ("loss.alpha", "loss.hardness_alpha"),
    ("loss.beta", "loss.synthetic_beta"),
    ("loss.softmax_factor", "loss.classification_weight"),
    ("loss.div_weight", "loss.diversity_weight"),
    ("loss.dot_weight", "loss.hardness_weight"),
    ("loss.proxy_alpha", "loss.proxy_scale"),
];

fn current_key(key: &str) -> &str {
    RENAMED_KEYS
        .iter()
        .find(|(old, _)| *old == key)
        .map_or(key, |(_, new)| new)
}

fn set_path(
    node: &mut toml::Value,
    parts: &[&str],
    value: toml::Value,
    key: &str,
) -> Result<(), ConfigError> {
    let unknown = || ConfigError::UnknownKey {
        key: key.to_string(),
    };
    let table = node.as_table_mut().ok_or_else(unknown)?;
    match parts {
        [last] => {
            if !table.contains_key(*last) && !is_optional_key(key) {
                return Err(unknown());
            }
            table.insert(last.to_string(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let child = table.get_mut(*first).ok_or_else(unknown)?;
            set_path(child, rest, value, key)
        }
        [] => Err(ConfigError::EmptyKey),
    }
}

/// Optional keys may be absent from the serialised tree and still be set.
fn is_optional_key(key: &str) -> bool {
    matches!(
        key,
        "data.root" | "model.weights" | "train.max_steps_per_epoch" | "train.eval_class_limit"
    )
}

fn parse_value(raw: &str) -> toml::Value {
    // Parse as the right-hand side of a TOML assignment; fall back to a plain string.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests;
