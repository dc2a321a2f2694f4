//! `verify backbone`: runs a backbone with given weights on the inputs stored in an
//! expected-outputs file and compares every output the fixtures record for that architecture.

use std::path::Path;

use burn::tensor::Device;

use crate::backbones::{BackboneConfig, BackboneKind, BatchNormMode, Pooling};
use crate::io::state_dict::{HostTensor, StateDict, load_torch};
use crate::io::weights::read_weights;
use crate::verify::compare::{Report, Row, Tolerance, compare};

/// A backbone check that could not run.
#[derive(Debug, thiserror::Error)]
pub enum BackboneCheckError {
    #[error(transparent)]
    Weights(#[from] crate::io::WeightsError),
    #[error("no `input*` tensor to run the model on")]
    NoInput,
    #[error("cannot run {kind} with {} on the inputs of {}", weights.display(), expected.display())]
    Run {
        kind: BackboneKind,
        weights: std::path::PathBuf,
        expected: std::path::PathBuf,
        #[source]
        source: Box<BackboneCheckError>,
    },
}

type Result<T, E = BackboneCheckError> = std::result::Result<T, E>;

/// Relative tolerance (max abs difference over max abs value) of the fixtures' README.
pub fn tolerance(kind: BackboneKind) -> Tolerance {
    match kind {
        BackboneKind::VitS16 => Tolerance::Relative(1e-3),
        _ => Tolerance::Relative(1e-4),
    }
}

/// The classifier width of a checkpoint that has a head under `key`, if it has one.
fn head_classes(weights: &StateDict, key: &str) -> Option<usize> {
    weights.get(key).map(|t| t.shape[0])
}

/// `(suffix, input)` for every `input*` tensor of the expected file.
fn inputs(expected: &StateDict) -> Vec<(String, &HostTensor)> {
    expected
        .tensors
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("input")
                .map(|suffix| (suffix.to_string(), t))
        })
        .collect()
}

/// Computes every output the fixtures record for `kind`, keyed by their names there.
pub fn backbone_outputs(
    kind: BackboneKind,
    weights: &StateDict,
    expected: &StateDict,
    device: &Device,
) -> Result<Vec<(String, HostTensor)>> {
    let inputs = inputs(expected);
    if inputs.is_empty() {
        return Err(BackboneCheckError::NoInput);
    }
    let mut out = Vec::new();
    // Running statistics: the fixtures record inference, except GoogLeNet's `pooled_train`.
    match kind.config(BatchNormMode::Eval, Pooling::AvgPlusMax) {
        BackboneConfig::ResNet50(config) => {
            let model = config
                .with_num_classes(head_classes(weights, "fc.weight"))
                .init(device);
            let model = load_torch(model, weights, "", device)?;
            for (suffix, input) in inputs {
                let o = model.outputs(input.to_tensor(device)?);
                out.push((format!("layer1{suffix}"), HostTensor::from_tensor(o.layer1)));
                out.push((
                    format!("features{suffix}"),
                    HostTensor::from_tensor(o.features),
                ));
                out.push((
                    format!("gap_plus_gmp{suffix}"),
                    HostTensor::from_tensor(o.gap.clone() + o.gmp.clone()),
                ));
                if let Some(logits) = model.logits(o.gap.clone()) {
                    out.push((format!("logits{suffix}"), HostTensor::from_tensor(logits)));
                }
                out.push((format!("gap{suffix}"), HostTensor::from_tensor(o.gap)));
                out.push((format!("gmp{suffix}"), HostTensor::from_tensor(o.gmp)));
            }
        }
        BackboneConfig::GoogLeNet(config) => {
            // Batch statistics are used only on a device that records gradients.
            for (mode, name, dev) in [
                (BatchNormMode::Eval, "pooled_eval", device.clone()),
                (
                    BatchNormMode::Train,
                    "pooled_train",
                    device.clone().autodiff(),
                ),
            ] {
                let model = config
                    .clone()
                    .with_batch_norm(mode)
                    .with_num_classes(head_classes(weights, "fc.weight"))
                    .init(&dev);
                let model = load_torch(model, weights, "", &dev)?;
                for (suffix, input) in &inputs {
                    let pooled = model.forward(input.to_tensor(&dev)?);
                    out.push((
                        format!("{name}{suffix}"),
                        HostTensor::from_tensor(pooled.detach()),
                    ));
                }
            }
        }
        BackboneConfig::Vit(config) => {
            let model = load_torch(config.init(device), weights, "", device)?;
            for (suffix, input) in inputs {
                let cls = model.forward(input.to_tensor(device)?);
                out.push((format!("cls{suffix}"), HostTensor::from_tensor(cls)));
            }
        }
        BackboneConfig::EfficientNetLite0(config) => {
            let model = config
                .with_num_classes(head_classes(weights, "_fc.weight"))
                .init(device);
            let model = load_torch(model, weights, "", device)?;
            for (suffix, input) in inputs {
                let features = model.features(input.to_tensor(device)?);
                let pooled = crate::backbones::layers::global_avg_pool(features.clone());
                out.push((
                    format!("features{suffix}"),
                    HostTensor::from_tensor(features),
                ));
                if let Some(logits) = model.logits(pooled.clone()) {
                    out.push((format!("logits{suffix}"), HostTensor::from_tensor(logits)));
                }
                out.push((format!("pooled{suffix}"), HostTensor::from_tensor(pooled)));
            }
        }
        BackboneConfig::Linear(_) | BackboneConfig::Identity { .. } => {
            unreachable!("no pretrained kind builds the stand-in backbones")
        }
    }
    Ok(out)
}

/// The outputs the fixtures' README names for `kind`, given the expected file's input suffixes.
fn required_outputs(kind: BackboneKind, expected: &StateDict) -> Vec<String> {
    let stems: &[&str] = match kind {
        BackboneKind::Resnet50 => &["layer1", "features", "gap", "gmp", "gap_plus_gmp", "logits"],
        BackboneKind::Googlenet => &["pooled_eval", "pooled_train"],
        BackboneKind::VitS16 => &["cls"],
        BackboneKind::EfficientnetLite0 => &["features", "pooled", "logits"],
    };
    inputs(expected)
        .iter()
        .flat_map(|(suffix, _)| stems.iter().map(move |s| format!("{s}{suffix}")))
        .collect()
}

/// Loads `weights` strictly into `kind`, runs it and compares with `expected`.
pub fn verify_backbone(
    kind: BackboneKind,
    weights_path: &Path,
    expected_path: &Path,
    device: &Device,
) -> Result<Report> {
    let weights = read_weights(weights_path)?;
    let expected = StateDict::read_safetensors(expected_path)?;
    let computed = backbone_outputs(kind, &weights, &expected, device).map_err(|e| {
        BackboneCheckError::Run {
            kind,
            weights: weights_path.to_path_buf(),
            expected: expected_path.to_path_buf(),
            source: Box::new(e),
        }
    })?;
    let tolerance = tolerance(kind);
    let rows = required_outputs(kind, &expected)
        .into_iter()
        .map(|name| {
            let Some(want) = expected.get(&name) else {
                return Row::failed(name, tolerance, "missing from the expected file");
            };
            match computed.iter().find(|(n, _)| *n == name) {
                Some((_, got)) => compare(&name, got, want, tolerance),
                None => Row::failed(
                    name,
                    tolerance,
                    "the model does not produce it (no classifier head in the weights?)",
                ),
            }
        })
        .collect();
    Ok(Report {
        rows,
        unchecked: Vec::new(),
    })
}
