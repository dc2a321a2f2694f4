//! `verify backbone`: runs a backbone with given weights on the inputs stored in an
//! expected-outputs file and compares every output the fixtures record for that architecture.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};

use crate::backbones::{
    BatchNormMode, EfficientNetLiteConfig, GoogLeNetConfig, ResNet50Config, VitConfig,
};
use crate::io::state_dict::{HostTensor, StateDict, load_torch};
use crate::io::weights::read_weights;

/// The architectures with pretrained PyTorch weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    ResNet50,
    GoogLeNet,
    VitS16,
    EfficientNetLite0,
}

impl std::str::FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "resnet50" => Ok(Self::ResNet50),
            "googlenet" => Ok(Self::GoogLeNet),
            "vit-s16" => Ok(Self::VitS16),
            "efficientnet-lite0" => Ok(Self::EfficientNetLite0),
            _ => Err(format!(
                "unknown architecture `{s}`: expected resnet50, googlenet, vit-s16 or efficientnet-lite0"
            )),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ResNet50 => "resnet50",
            Self::GoogLeNet => "googlenet",
            Self::VitS16 => "vit-s16",
            Self::EfficientNetLite0 => "efficientnet-lite0",
        })
    }
}

impl Arch {
    /// Relative tolerance (max abs difference over max abs value) of the fixtures' README.
    pub fn tolerance(&self) -> f64 {
        match self {
            Self::VitS16 => 1e-3,
            _ => 1e-4,
        }
    }
}

/// One compared output.
#[derive(Clone, Debug)]
pub struct OutputRow {
    pub name: String,
    pub max_abs: f64,
    pub relative: f64,
    pub ok: bool,
    /// Why the output could not be compared, when it could not.
    pub problem: Option<String>,
}

#[derive(Clone, Debug)]
pub struct BackboneReport {
    pub arch: Arch,
    pub tolerance: f64,
    pub rows: Vec<OutputRow>,
}

impl BackboneReport {
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.ok)
    }
}

fn to_tensor<const D: usize>(t: &HostTensor, device: &Device) -> Result<Tensor<D>> {
    if t.shape.len() != D {
        bail!("expected a {D}-d tensor, found shape {:?}", t.shape);
    }
    Ok(Tensor::from_data(
        TensorData::new(t.to_f32(), t.shape.clone()),
        device,
    ))
}

fn to_host<const D: usize>(t: Tensor<D>) -> HostTensor {
    HostTensor::from_tensor_data(t.into_data())
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

/// Computes every output the fixtures record for `arch`, keyed by their names there.
pub fn backbone_outputs(
    arch: Arch,
    weights: &StateDict,
    expected: &StateDict,
    device: &Device,
) -> Result<Vec<(String, HostTensor)>> {
    let inputs = inputs(expected);
    if inputs.is_empty() {
        bail!("no `input*` tensor to run the model on");
    }
    let mut out = Vec::new();
    match arch {
        Arch::ResNet50 => {
            let model = ResNet50Config::new()
                .with_num_classes(head_classes(weights, "fc.weight"))
                .init(device);
            let model = load_torch(model, weights, "", device)?;
            for (suffix, input) in inputs {
                let o = model.outputs(to_tensor(input, device)?);
                out.push((format!("layer1{suffix}"), to_host(o.layer1)));
                out.push((format!("features{suffix}"), to_host(o.features)));
                out.push((
                    format!("gap_plus_gmp{suffix}"),
                    to_host(o.gap.clone() + o.gmp.clone()),
                ));
                if let Some(logits) = model.logits(o.gap.clone()) {
                    out.push((format!("logits{suffix}"), to_host(logits)));
                }
                out.push((format!("gap{suffix}"), to_host(o.gap)));
                out.push((format!("gmp{suffix}"), to_host(o.gmp)));
            }
        }
        Arch::GoogLeNet => {
            // Batch statistics are used only on a device that records gradients.
            for (mode, name, dev) in [
                (BatchNormMode::Eval, "pooled_eval", device.clone()),
                (
                    BatchNormMode::Train,
                    "pooled_train",
                    device.clone().autodiff(),
                ),
            ] {
                let model = GoogLeNetConfig::new()
                    .with_batch_norm(mode)
                    .with_num_classes(head_classes(weights, "fc.weight"))
                    .init(&dev);
                let model = load_torch(model, weights, "", &dev)?;
                for (suffix, input) in &inputs {
                    let pooled = model.forward(to_tensor(input, &dev)?);
                    out.push((format!("{name}{suffix}"), to_host(pooled.detach())));
                }
            }
        }
        Arch::VitS16 => {
            let model = load_torch(VitConfig::new().init(device), weights, "", device)?;
            for (suffix, input) in inputs {
                let cls = model.forward(to_tensor(input, device)?);
                out.push((format!("cls{suffix}"), to_host(cls)));
            }
        }
        Arch::EfficientNetLite0 => {
            let model = EfficientNetLiteConfig::new()
                .with_num_classes(head_classes(weights, "_fc.weight"))
                .init(device);
            let model = load_torch(model, weights, "", device)?;
            for (suffix, input) in inputs {
                let features = model.features(to_tensor(input, device)?);
                let pooled = crate::backbones::layers::global_avg_pool(features.clone());
                out.push((format!("features{suffix}"), to_host(features)));
                if let Some(logits) = model.logits(pooled.clone()) {
                    out.push((format!("logits{suffix}"), to_host(logits)));
                }
                out.push((format!("pooled{suffix}"), to_host(pooled)));
            }
        }
    }
    Ok(out)
}

/// The outputs the fixtures' README names for `arch`, given the expected file's input suffixes.
fn required_outputs(arch: Arch, expected: &StateDict) -> Vec<String> {
    let stems: &[&str] = match arch {
        Arch::ResNet50 => &["layer1", "features", "gap", "gmp", "gap_plus_gmp", "logits"],
        Arch::GoogLeNet => &["pooled_eval", "pooled_train"],
        Arch::VitS16 => &["cls"],
        Arch::EfficientNetLite0 => &["features", "pooled", "logits"],
    };
    inputs(expected)
        .iter()
        .flat_map(|(suffix, _)| stems.iter().map(move |s| format!("{s}{suffix}")))
        .collect()
}

/// Loads `weights` strictly into `arch`, runs it and compares with `expected`.
pub fn verify_backbone(
    arch: Arch,
    weights_path: &Path,
    expected_path: &Path,
    device: &Device,
) -> Result<BackboneReport> {
    let weights = read_weights(weights_path)?;
    let expected = StateDict::read_safetensors(expected_path)?;
    let computed = backbone_outputs(arch, &weights, &expected, device).with_context(|| {
        format!(
            "cannot run {arch} with {} on the inputs of {}",
            weights_path.display(),
            expected_path.display()
        )
    })?;
    let tolerance = arch.tolerance();
    let rows = required_outputs(arch, &expected)
        .into_iter()
        .map(|name| compare(&name, &computed, &expected, tolerance))
        .collect();
    Ok(BackboneReport {
        arch,
        tolerance,
        rows,
    })
}

fn compare(
    name: &str,
    computed: &[(String, HostTensor)],
    expected: &StateDict,
    tolerance: f64,
) -> OutputRow {
    let fail = |problem: String| OutputRow {
        name: name.to_string(),
        max_abs: f64::NAN,
        relative: f64::NAN,
        ok: false,
        problem: Some(problem),
    };
    let Some(want) = expected.get(name) else {
        return fail("missing from the expected file".into());
    };
    let Some((_, got)) = computed.iter().find(|(n, _)| n == name) else {
        return fail("the model does not produce it (no classifier head in the weights?)".into());
    };
    // Compared value by value: a file may keep pooled outputs as `[B, C, 1, 1]`.
    if got.numel() != want.numel() {
        return fail(format!("shape {:?}, expected {:?}", got.shape, want.shape));
    }
    let max_abs = got
        .data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = want.data.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let relative = if scale > 0.0 {
        max_abs / scale
    } else {
        max_abs
    };
    OutputRow {
        name: name.to_string(),
        max_abs,
        relative,
        ok: relative <= tolerance && got.data.iter().all(|v| v.is_finite()),
        problem: None,
    }
}
