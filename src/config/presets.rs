//! The presets: METHOD.md section 9's table of the release's settings, one per dataset and
//! backbone, and the demo of DEMO.md.

use super::*;
use crate::nn::precision::Precision;

/// Names of the presets, in the order `config list` shows them.
pub const PRESETS: [&str; 13] = [
    "cub-googlenet",
    "cars-googlenet",
    "sop-googlenet",
    "inshop-googlenet",
    "cub-resnet50",
    "cars-resnet50",
    "sop-resnet50",
    "inshop-resnet50",
    "cub-dino",
    "cars-dino",
    "sop-dino",
    "inshop-dino",
    "demo",
];

/// One row of METHOD.md section 9.
struct Row {
    kind: DatasetKind,
    backbone: BackboneKind,
    d: usize,
    layers: usize,
    heads: usize,
    c: usize,
    p: usize,
    epochs: usize,
    lr: f64,
    gnn_lr: f64,
    decay: usize,
    warm_up: usize,
    div: f64,
    dot: f64,
    beta: f64,
    alpha: f64,
    bn: BatchNormMode,
    eval_every: usize,
}

fn release_row(name: &str) -> Option<Row> {
    use BackboneKind::*;
    use BatchNormMode::*;
    use DatasetKind::*;
    let (k, b) = name.split_once('-')?;
    let kind = match k {
        "cub" => Cub,
        "cars" => Cars,
        "sop" => Sop,
        "inshop" => Inshop,
        _ => return None,
    };
    let backbone = match b {
        "googlenet" => Googlenet,
        "resnet50" => Resnet50,
        "dino" => VitS16,
        _ => return None,
    };
    let small = matches!(kind, Cub | Cars);
    let (c, p, layers, heads) = if small { (27, 3, 2, 4) } else { (40, 2, 1, 2) };
    let d = if backbone == VitS16 { 384 } else { 512 };
    #[rustfmt::skip]
    let (epochs, lr, gnn_lr, decay, warm_up, div, dot, beta, alpha, bn, eval_every) =
        match (kind, backbone) {
            (Cub, Googlenet) => (150, 1e-4, 3e-4, 30, 1, 10.0, 10.0, 30.0, 4.0, Eval, 2),
            (Cars, Googlenet) => (200, 1e-4, 3e-4, 30, 1, 10.0, 10.0, 30.0, 4.0, Eval, 2),
            (Sop, Googlenet) => (150, 3e-4, 1.5e-4, 15, 1, 20.0, 20.0, 20.0, 5.0, Train, 2),
            (Inshop, Googlenet) => (200, 3e-4, 1.5e-4, 15, 1, 20.0, 20.0, 20.0, 2.0, Train, 5),
            (Cub, Resnet50) => (100, 1.5e-4, 1.5e-4, 10, 2, 60.0, 20.0, 20.0, 5.0, Frozen, 5),
            (Cars, Resnet50) => (200, 1.5e-4, 1.5e-4, 10, 2, 60.0, 20.0, 20.0, 5.0, Frozen, 10),
            (Sop, Resnet50) => (200, 2e-4, 1.5e-4, 20, 1, 60.0, 20.0, 20.0, 5.0, Train, 5),
            (Inshop, Resnet50) => (200, 2e-4, 1.5e-4, 20, 1, 60.0, 20.0, 20.0, 5.0, Train, 5),
            (Cub, VitS16) => (50, 1e-5, 3e-4, 20, 2, 20.0, 20.0, 5.0, 2.0, Train, 5),
            (Cars, VitS16) => (100, 3e-5, 3e-4, 10, 2, 20.0, 20.0, 5.0, 2.0, Train, 5),
            (Sop, VitS16) => (200, 1.5e-5, 3e-4, 20, 1, 60.0, 20.0, 20.0, 5.0, Train, 5),
            (Inshop, VitS16) => (150, 1.5e-5, 3e-4, 20, 1, 60.0, 20.0, 20.0, 5.0, Train, 5),
            _ => return None,
        };
    Some(Row {
        kind,
        backbone,
        d,
        layers,
        heads,
        c,
        p,
        epochs,
        lr,
        gnn_lr,
        decay,
        warm_up,
        div,
        dot,
        beta,
        alpha,
        bn,
        eval_every,
    })
}

impl ExperimentConfig {
    /// A preset by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self, super::ConfigError> {
        if name == "demo" {
            return Ok(Self::demo());
        }
        let Some(r) = release_row(name) else {
            return Err(super::ConfigError::UnknownPreset {
                name: name.to_string(),
                presets: PRESETS.to_vec(),
            });
        };
        let root = match r.kind {
            DatasetKind::Cub => "data/CUB_200_2011",
            DatasetKind::Cars => "data/cars196",
            DatasetKind::Sop => "data/Stanford_Online_Products",
            DatasetKind::Inshop => "data/inshop",
            _ => "data",
        };
        Ok(Self {
            data: DataConfig {
                kind: r.kind,
                root: Some(root.into()),
                image_size: 224,
                resize: 256,
                crop_scale: [0.08, 1.0],
                crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
                classes_per_batch: r.c,
                per_class: r.p,
                validation_fraction: 0.15,
                workers: 2,
            },
            model: ModelConfig {
                backbone: r.backbone,
                weights: None,
                pooling: "avg+max".into(),
                batch_norm: r.bn,
                embedding_dim: r.d,
                gnn_layers: r.layers,
                heads: r.heads,
                attention_dropout: 0.1,
            },
            loss: LossConfig {
                base: BaseLoss::Npair,
                generation: true,
                masking: HardnessMasking::SameClass,
                hardness_alpha: r.alpha,
                synthetic_beta: r.beta,
                classification_weight: 20.0,
                diversity_weight: r.div,
                hardness_weight: r.dot,
                proxy_margin: 0.1,
                proxy_scale: 32.0,
                proxy_lr_ratio: 100.0,
            },
            optim: OptimConfig {
                lr: r.lr,
                embedding_ratio: 1.0,
                gnn_lr: r.gnn_lr,
                classifier_lr: 1e-3,
                weight_decay: 1e-4,
                classifier_weight_decay: 0.01,
                grad_clip: 10.0,
                metric_decay_steps: r.decay,
                metric_gamma: 0.5,
                warm_up_epochs: r.warm_up,
            },
            train: TrainConfig {
                epochs: r.epochs,
                eval_every: r.eval_every,
                seed: 0,
                device: "cpu".into(),
                precision: Precision::F32,
                out: format!("runs/{name}"),
                select_on: SelectOn::Validation,
                max_steps_per_epoch: None,
                eval_class_limit: None,
                skip_bad_images: false,
            },
        })
    }

    /// The demo of `../shared/docs/DEMO.md`: emoji styles, EfficientNet-Lite0 with BatchNorm
    /// in eval mode, 16x2 batches, d = 128, one GNN layer.
    pub fn demo() -> Self {
        Self {
            data: DataConfig {
                kind: DatasetKind::Emoji,
                root: None,
                image_size: 64,
                resize: 64,
                crop_scale: [0.5, 1.0],
                crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
                classes_per_batch: 16,
                per_class: 2,
                validation_fraction: 0.0,
                workers: 2,
            },
            model: ModelConfig {
                backbone: BackboneKind::EfficientnetLite0,
                weights: None,
                pooling: "avg".into(),
                batch_norm: BatchNormMode::Eval,
                embedding_dim: 128,
                gnn_layers: 1,
                heads: 2,
                attention_dropout: 0.1,
            },
            loss: LossConfig {
                base: BaseLoss::Npair,
                generation: true,
                masking: HardnessMasking::SameClass,
                hardness_alpha: 5.0,
                synthetic_beta: 20.0,
                classification_weight: 20.0,
                diversity_weight: 20.0,
                hardness_weight: 20.0,
                proxy_margin: 0.1,
                proxy_scale: 32.0,
                proxy_lr_ratio: 100.0,
            },
            optim: OptimConfig {
                lr: 1e-4,
                embedding_ratio: 1.0,
                gnn_lr: 3e-4,
                classifier_lr: 1e-3,
                weight_decay: 1e-4,
                classifier_weight_decay: 0.01,
                grad_clip: 10.0,
                metric_decay_steps: 1000,
                metric_gamma: 0.5,
                warm_up_epochs: 1,
            },
            train: TrainConfig {
                epochs: 8,
                eval_every: 2,
                seed: 0,
                device: "cpu".into(),
                precision: Precision::F32,
                out: "runs/demo".into(),
                select_on: SelectOn::Test,
                max_steps_per_epoch: None,
                eval_class_limit: None,
                skip_bad_images: false,
            },
        }
    }
}
