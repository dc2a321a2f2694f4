//! Checkpoints of a run: one safetensors file each, written atomically.
//!
//! The model is stored under `model.` + the release's PyTorch names (in PyTorch layout, so a
//! PyTorch user can strip the prefix and `load_state_dict` it into the release's `GCA_HNG`).
//! `last` also holds the three optimisers' AdamW moments and step counts under
//! `optim.{embedder,gnn,classifier}.` + parameter name, and the run's progress (epoch, step,
//! running loss sums, history, records) as JSON metadata: everything a resumed run needs to
//! continue exactly where this one stopped.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::state_dict::{StateDict, TorchNamed, export_torch, load_torch};
use crate::method::model::GcaHng;
use crate::train::step::{LearningRates, Loss, LossHistory, StepMetrics, Trainer};

use super::EpochRecord;
use crate::io::atomic::{finish_atomic, temporary_path};

const MODEL_PREFIX: &str = "model.";
const META_CONFIG: &str = "gca-hng.config";
const META_PROGRESS: &str = "gca-hng.progress";
const META_CLASSES: &str = "gca-hng.num_classes";
const META_KIND: &str = "gca-hng.checkpoint";

/// Running sums of the step losses within an epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossSums {
    pub steps: usize,
    pub sums: StepMetrics,
}

impl LossSums {
    pub fn add(&mut self, m: &StepMetrics) {
        self.steps += 1;
        for loss in Loss::ALL {
            *self.sums.get_mut(loss) += m.get(loss);
        }
    }

    /// Mean of every loss over the steps so far.
    pub fn means(&self) -> Vec<(&'static str, f64)> {
        let n = self.steps.max(1) as f64;
        self.sums.named().iter().map(|&(k, v)| (k, v / n)).collect()
    }

    /// The previous-epoch means that drive λ and the J_syn weight, floored at 1e-6 as in the
    /// release.
    pub fn history(&self) -> LossHistory {
        let n = self.steps.max(1) as f64;
        LossHistory {
            metric: (self.sums.j_m / n).max(1e-6),
            generator: (self.sums.j_gen / n).max(1e-6),
        }
    }
}

/// The best evaluation so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// Epochs trained when it was measured.
    pub epoch: usize,
    /// Recall@1 on the selection split.
    pub score: f64,
}

/// Where a run stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The epoch being trained (0-based); equals the number of finished epochs.
    pub epoch: usize,
    /// Steps of `epoch` already taken.
    pub step: usize,
    /// Loss sums of the steps of `epoch` taken so far.
    pub sums: LossSums,
    /// Means of the previous epoch.
    pub history: Option<LossHistory>,
    /// One record per finished epoch (and one for the untrained model, epoch 0).
    pub records: Vec<EpochRecord>,
    pub best: Option<Best>,
    /// Training and evaluation time so far, seconds.
    pub elapsed_s: f64,
    /// Learning rates of the epoch in progress.
    pub lr: Option<LearningRates>,
}

/// What a checkpoint file holds besides tensors.
pub struct CheckpointMeta {
    pub config_toml: String,
    pub num_classes: usize,
    pub progress: Option<Progress>,
}

fn optimiser_names(trainer: &Trainer) -> [(&'static str, &crate::nn::adamw::TorchAdamW); 3] {
    [
        ("embedder", &trainer.optim.embedder),
        ("gnn", &trainer.optim.gnn),
        ("classifier", &trainer.optim.classifier),
    ]
}

/// Saves the model (and with `trainer` and `progress`, everything needed to resume).
pub fn save(
    path: &Path,
    model: &GcaHng,
    trainer: Option<&Trainer>,
    meta: &CheckpointMeta,
) -> Result<()> {
    let mut dict = export_torch(model, "model");
    if let Some(trainer) = trainer {
        let names = model.torch_param_list("");
        for (key, optim) in optimiser_names(trainer) {
            optim.export_state(&names, &format!("optim.{key}."), &mut dict);
        }
    }
    dict.metadata
        .insert(META_CONFIG.into(), meta.config_toml.clone());
    dict.metadata
        .insert(META_CLASSES.into(), meta.num_classes.to_string());
    dict.metadata.insert(
        META_KIND.into(),
        if meta.progress.is_some() {
            "last"
        } else {
            "model"
        }
        .into(),
    );
    if let Some(progress) = &meta.progress {
        dict.metadata
            .insert(META_PROGRESS.into(), serde_json::to_string(progress)?);
    }
    let tmp = temporary_path(path);
    dict.write_safetensors(&tmp)?;
    finish_atomic(&tmp, path)
}

/// Reads a checkpoint's metadata and tensors.
pub fn read(path: &Path) -> Result<(StateDict, CheckpointMeta)> {
    let dict = StateDict::read_safetensors(path)?;
    let config_toml = dict.metadata.get(META_CONFIG).cloned().with_context(|| {
        format!(
            "{} is not a gca-hng checkpoint (no configuration inside)",
            path.display()
        )
    })?;
    let num_classes = dict
        .metadata
        .get(META_CLASSES)
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "{}: checkpoint metadata lacks the class count",
                path.display()
            )
        })?;
    let progress = match dict.metadata.get(META_PROGRESS) {
        Some(json) => Some(
            serde_json::from_str(json)
                .with_context(|| format!("{}: unreadable progress record", path.display()))?,
        ),
        None => None,
    };
    Ok((
        dict,
        CheckpointMeta {
            config_toml,
            num_classes,
            progress,
        },
    ))
}

/// Loads a checkpoint's model tensors into `model` (strictly).
pub fn load_model(model: GcaHng, dict: &StateDict, device: &Device) -> Result<GcaHng> {
    let mut models_only = StateDict::default();
    for (k, v) in &dict.tensors {
        if k.starts_with(MODEL_PREFIX) {
            models_only.insert(k.clone(), v.clone());
        }
    }
    if models_only.tensors.is_empty() {
        bail!("the checkpoint holds no model tensors");
    }
    load_torch(model, &models_only, MODEL_PREFIX, device)
}

/// Restores the optimisers' state from a `last` checkpoint.
pub fn load_optimisers(
    trainer: &mut Trainer,
    model: &GcaHng,
    dict: &StateDict,
    device: &Device,
) -> Result<()> {
    let names = model.torch_param_list("");
    let sizes = param_sizes(model);
    for (key, optim) in [
        ("embedder", &mut trainer.optim.embedder),
        ("gnn", &mut trainer.optim.gnn),
        ("classifier", &mut trainer.optim.classifier),
    ] {
        optim
            .import_state(dict, &names, &sizes, &format!("optim.{key}."), device)
            .with_context(|| format!("optimiser `{key}`"))?;
    }
    Ok(())
}

/// Number of values of every parameter.
fn param_sizes<M: Module>(module: &M) -> HashMap<ParamId, usize> {
    struct Sizes(HashMap<ParamId, usize>);
    impl ModuleVisitor for Sizes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.insert(param.id, param.shape().num_elements());
        }
    }
    let mut s = Sizes(HashMap::new());
    module.visit(&mut s);
    s.0
}
