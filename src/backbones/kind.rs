//! Which pretrained backbone a run, a check or a benchmark uses, and how its BatchNorm layers
//! behave. The spellings (`resnet50`, `vit-s16`, ...) are those of the config files and the
//! command line alike: serde and clap both derive them from the variant names in kebab-case,
//! and a test keeps the two in step.

use serde::{Deserialize, Serialize};

use super::{
    BackboneConfig, EfficientNetLiteConfig, GoogLeNetConfig, Pooling, ResNet50Config, VitConfig,
};

/// The architectures with pretrained PyTorch weights.
// The variant names are the serialised names of config files written before; renaming one
// would break loading those files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackboneKind {
    /// torchvision ResNet-50.
    Resnet50,
    /// torchvision GoogLeNet.
    Googlenet,
    /// DINO ViT-S/16.
    VitS16,
    /// EfficientNet-Lite0 (efficientnet-lite-pytorch).
    EfficientnetLite0,
}

/// How a backbone's BatchNorm layers normalise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BatchNormMode {
    /// Batch statistics while training (on an autodiff device), running ones otherwise;
    /// affine parameters trained.
    Train,
    /// Always running statistics; the affine parameters still train (the release's
    /// `bn_freeze` for GoogLeNet, and the demo).
    Eval,
    /// Running statistics and affine parameters fixed: the usual fine-tuning of an ImageNet
    /// trunk on small retrieval batches (the release's `bn_freeze` for ResNet-50).
    Frozen,
}

crate::string_forms_from_value_enum!(BackboneKind: "backbone", BatchNormMode: "BatchNorm mode");

impl BackboneKind {
    /// The backbone of this kind without classification head. `pooling` applies to
    /// ResNet-50 only, `batch_norm` to every kind but the ViT (which has LayerNorm).
    pub fn config(self, batch_norm: BatchNormMode, pooling: Pooling) -> BackboneConfig {
        match self {
            Self::Resnet50 => BackboneConfig::ResNet50(
                ResNet50Config::new()
                    .with_batch_norm(batch_norm)
                    .with_pooling(pooling),
            ),
            Self::Googlenet => {
                BackboneConfig::GoogLeNet(GoogLeNetConfig::new().with_batch_norm(batch_norm))
            }
            Self::VitS16 => BackboneConfig::Vit(VitConfig::new()),
            Self::EfficientnetLite0 => BackboneConfig::EfficientNetLite0(
                EfficientNetLiteConfig::new().with_batch_norm(batch_norm),
            ),
        }
    }

    /// Name prefixes of the classification heads a pretrained checkpoint of this kind may
    /// carry and an embedding backbone does not have (torchvision's `fc`, GoogLeNet's
    /// auxiliary heads, EfficientNet's `_fc`, a DINO checkpoint's `head`).
    pub fn classifier_heads(self) -> &'static [&'static str] {
        match self {
            Self::Resnet50 => &["fc."],
            Self::Googlenet => &["fc.", "aux1.", "aux2."],
            Self::VitS16 => &["head."],
            Self::EfficientnetLite0 => &["_fc."],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_and_the_command_line_spell_every_kind_alike() {
        for kind in <BackboneKind as clap::ValueEnum>::value_variants() {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json.as_str(), Some(kind.to_string().as_str()));
            assert_eq!(kind.to_string().parse::<BackboneKind>().unwrap(), *kind);
        }
        for mode in <BatchNormMode as clap::ValueEnum>::value_variants() {
            let json = serde_json::to_value(mode).unwrap();
            assert_eq!(json.as_str(), Some(mode.to_string().as_str()));
        }
        let names: Vec<String> = <BackboneKind as clap::ValueEnum>::value_variants()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            ["resnet50", "googlenet", "vit-s16", "efficientnet-lite0"]
        );
    }
}
