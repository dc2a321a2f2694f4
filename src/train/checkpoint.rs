//! Checkpoints of a run: one safetensors file each, written atomically.
//!
//! The model is stored under `model.` + the release's PyTorch names (in PyTorch layout, so a
//! PyTorch user can strip the prefix and `load_state_dict` it into the release's `GCA_HNG`).
//! `last` also holds the three optimisers' AdamW moments and step counts under
//! `optim.{embedder,gnn,classifier}.` + parameter name, and the run's progress (epoch, step,
//! running loss sums, history, records) as JSON metadata: everything a resumed run needs to
//! continue exactly where this one stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::state_dict::{HostTensor, StateDict, TorchNamed, export_torch, load_torch};
use crate::io::{IoError, WeightsError};
use crate::method::model::GcaHng;
use crate::nn::adamw::OptimStateError;
use crate::train::step::{LearningRates, Loss, LossHistory, StepMetrics, Trainer};

use super::EpochRecord;
use crate::io::atomic::{finish_atomic, temporary_path};

const MODEL_PREFIX: &str = "model.";
const META_CONFIG: &str = "gca-hng.config";
const META_PROGRESS: &str = "gca-hng.progress";
const META_CLASSES: &str = "gca-hng.num_classes";
const META_KIND: &str = "gca-hng.checkpoint";
const META_CHECKSUM: &str = "gca-hng.checksum";

/// A checkpoint that cannot be written, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    File(#[from] IoError),
    #[error("{} is not a gca-hng checkpoint (no configuration inside)", path.display())]
    NotACheckpoint { path: PathBuf },
    #[error("{}: checkpoint metadata lacks the class count", path.display())]
    NoClassCount { path: PathBuf },
    #[error("{}: unreadable progress record", path.display())]
    BadProgress {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} holds no training progress", path.display())]
    NoProgress { path: PathBuf },
    #[error("cannot encode the run's progress for {}", path.display())]
    EncodeProgress {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: the configuration inside is invalid", path.display())]
    BadConfig {
        path: PathBuf,
        #[source]
        source: crate::error::Cause,
    },
    #[error("{} does not hold what was written to it (a damaged file or a failing disk?)", path.display())]
    ReadBack { path: PathBuf },
    #[error("the checkpoint holds no model tensors")]
    NoModel,
    #[error("optimiser `{which}`")]
    Optimiser {
        which: &'static str,
        #[source]
        source: OptimStateError,
    },
    /// An error of the checkpoint `path`, whose own message does not name it.
    #[error("{}", path.display())]
    In {
        path: PathBuf,
        #[source]
        source: Box<CheckpointError>,
    },
}

impl CheckpointError {
    /// Names `path` unless the error already does.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            e @ (Self::NotACheckpoint { .. }
            | Self::BadConfig { .. }
            | Self::NoClassCount { .. }
            | Self::BadProgress { .. }
            | Self::NoProgress { .. }
            | Self::EncodeProgress { .. }
            | Self::ReadBack { .. }
            | Self::In { .. }) => e,
            Self::Weights(
                e @ (WeightsError::Read { .. }
                | WeightsError::NotSafetensors { .. }
                | WeightsError::NoSpace { .. }
                | WeightsError::Write { .. }),
            ) => Self::Weights(e),
            e => Self::In {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
        }
    }
}

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
) -> Result<(), CheckpointError> {
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
        let json =
            serde_json::to_string(progress).map_err(|source| CheckpointError::EncodeProgress {
                path: path.to_path_buf(),
                source,
            })?;
        dict.metadata.insert(META_PROGRESS.into(), json);
    }
    dict.metadata
        .insert(META_CHECKSUM.into(), format!("{:016x}", checksum(&dict)));
    let tmp = temporary_path(path);
    let written = dict
        .write_safetensors(&tmp)
        .map_err(CheckpointError::from)
        .and_then(|()| sync(&tmp))
        .and_then(|()| verify(&tmp, &dict));
    if let Err(e) = written {
        // Nothing half-written stays behind; the checkpoint at `path` is untouched.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // A resumable checkpoint keeps its predecessor until the new one is in place, so that a
    // damaged `last` still leaves one to resume from.
    crate::io::atomic::check_replaceable(path)?;
    if meta.progress.is_some() && path.exists() {
        let previous = previous_path(path);
        std::fs::rename(path, &previous).map_err(|source| IoError::Rename {
            from: path.to_path_buf(),
            to: previous,
            source,
        })?;
    }
    let renamed = finish_atomic(&tmp, path);
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(renamed?)
}

/// Where the checkpoint `path` is kept while its successor is written (`last.safetensors`:
/// `last.previous.safetensors`).
pub fn previous_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{stem}.previous.safetensors"))
}

fn sync(path: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::StorageFull {
                WeightsError::NoSpace {
                    path: path.to_path_buf(),
                }
                .into()
            } else {
                IoError::Flush {
                    path: path.to_path_buf(),
                    source,
                }
                .into()
            }
        })
}

/// Reads a written checkpoint back and compares it with what was meant to be written: the
/// same tensors with the same f32 values, and the same metadata.
fn verify(path: &Path, written: &StateDict) -> Result<(), CheckpointError> {
    let back = StateDict::read_safetensors(path)?;
    let same = back.metadata == written.metadata
        && back.tensors.len() == written.tensors.len()
        && written.tensors.iter().all(|(k, t)| {
            back.tensors.get(k).is_some_and(|b| {
                b.shape == t.shape
                    && b.data.len() == t.data.len()
                    && b.data
                        .iter()
                        .zip(&t.data)
                        .all(|(x, y)| (*x as f32).to_bits() == (*y as f32).to_bits())
            })
        });
    if same {
        Ok(())
    } else {
        Err(CheckpointError::ReadBack {
            path: path.to_path_buf(),
        })
    }
}

/// FNV-1a over every tensor's name, shape and f32 values as stored, so that a checkpoint
/// damaged after it was written (the container itself has no checksum) is told apart from a
/// good one.
fn checksum(dict: &StateDict) -> u64 {
    fnv1a(dict.tensors.iter())
}

/// Which model a checkpoint holds: FNV-1a over its model tensors alone (names, shapes, f32
/// values), so that `best` and `last` of one epoch, whose optimiser state and metadata differ,
/// name the same model. Embeddings record it (`ModelRecord`) so that `search` and `serve` can
/// tell a gallery another model embedded.
pub fn model_fingerprint(dict: &StateDict) -> String {
    format!(
        "fnv1a64:{:016x}",
        fnv1a(
            dict.tensors
                .iter()
                .filter(|(k, _)| k.starts_with(MODEL_PREFIX))
        )
    )
}

/// [`model_fingerprint`] of a model in memory: the one its checkpoint will carry.
pub fn fingerprint_of(model: &GcaHng) -> String {
    model_fingerprint(&export_torch(model, "model"))
}

// A hand-written FNV-1a rather than a hashing crate: it is a dozen lines, and the checkpoint
// checksums already written with it must keep their values.
fn fnv1a<'a>(tensors: impl Iterator<Item = (&'a String, &'a HostTensor)>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |word: u64| {
        h ^= word;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for (name, t) in tensors {
        name.bytes().for_each(|b| eat(b.into()));
        t.shape.iter().for_each(|&d| eat(d as u64));
        t.data
            .iter()
            .for_each(|&v| eat((v as f32).to_bits().into()));
    }
    h
}

/// Reads a checkpoint's metadata and tensors; one whose values do not match the checksum it
/// was written with is refused.
pub fn read(path: &Path) -> Result<(StateDict, CheckpointMeta), CheckpointError> {
    let dict = StateDict::read_safetensors(path)?;
    if let Some(stored) = dict.metadata.get(META_CHECKSUM)
        && *stored != format!("{:016x}", checksum(&dict))
    {
        return Err(CheckpointError::ReadBack {
            path: path.to_path_buf(),
        });
    }
    let config_toml =
        dict.metadata
            .get(META_CONFIG)
            .cloned()
            .ok_or_else(|| CheckpointError::NotACheckpoint {
                path: path.to_path_buf(),
            })?;
    let num_classes = dict
        .metadata
        .get(META_CLASSES)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CheckpointError::NoClassCount {
            path: path.to_path_buf(),
        })?;
    let progress = match dict.metadata.get(META_PROGRESS) {
        Some(json) => {
            Some(
                serde_json::from_str(json).map_err(|source| CheckpointError::BadProgress {
                    path: path.to_path_buf(),
                    source,
                })?,
            )
        }
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
pub fn load_model(
    model: GcaHng,
    dict: &StateDict,
    device: &Device,
) -> Result<GcaHng, CheckpointError> {
    let mut models_only = StateDict::default();
    for (k, v) in &dict.tensors {
        if k.starts_with(MODEL_PREFIX) {
            models_only.insert(k.clone(), v.clone());
        }
    }
    if models_only.tensors.is_empty() {
        return Err(CheckpointError::NoModel);
    }
    Ok(load_torch(model, &models_only, MODEL_PREFIX, device)?)
}

/// Restores the optimisers' state from a `last` checkpoint.
pub fn load_optimisers(
    trainer: &mut Trainer,
    model: &GcaHng,
    dict: &StateDict,
    device: &Device,
) -> Result<(), CheckpointError> {
    let names = model.torch_param_list("");
    let sizes = param_sizes(model);
    for (key, optim) in [
        ("embedder", &mut trainer.optim.embedder),
        ("gnn", &mut trainer.optim.gnn),
        ("classifier", &mut trainer.optim.classifier),
    ] {
        optim
            .import_state(dict, &names, &sizes, &format!("optim.{key}."), device)
            .map_err(|source| CheckpointError::Optimiser { which: key, source })?;
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
