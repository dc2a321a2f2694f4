use super::*;
use crate::backbones::{Backbone, BackboneConfig, LinearBackboneConfig};
use crate::io::state_dict::{StateDict, export_torch};
use crate::method::embedder::EmbedderConfig;
use crate::method::gnn::GnnConfig;
use crate::method::model::GcaHngConfig;
use crate::method::synthesis::SeededMix;
use burn::tensor::{Device, TensorData};

/// C = 3 class slots, P = 2 views, 3x4x4 images, 10 training classes.
const LAYOUT: BatchLayout = BatchLayout {
    classes: 3,
    per_class: 2,
};

fn model(device: &Device) -> GcaHng {
    GcaHngConfig::new(
        EmbedderConfig::new(
            BackboneConfig::Linear(LinearBackboneConfig::new(48, 32)),
            16,
        ),
        GnnConfig::new(16, 10).with_attention_dropout(0.0),
    )
    .init(device)
}

fn batch(device: &Device) -> Batch {
    let values: Vec<f32> = (0..6 * 48)
        .map(|k| ((k * 37 % 101) as f32 / 50.0 - 1.0) * (1.0 + (k / 48) as f32 / 3.0))
        .collect();
    Batch::new(
        Tensor::from_data(TensorData::new(values, [6, 3, 4, 4]), device),
        // View-major: slot c of every view is the same class.
        vec![2, 7, 5, 2, 7, 5],
    )
}

fn config(generation: bool) -> StepConfig {
    StepConfig {
        hardness_alpha: 5.0,
        synthetic_beta: 20.0,
        classification_weight: 20.0,
        diversity_weight: 20.0,
        hardness_weight: 20.0,
        grad_clip: Some(10.0),
        masking: HardnessMasking::Release,
        generation,
        precision: Default::default(),
    }
}

fn rates(backbone: f64, head: f64, gnn: f64, classifier: f64) -> LearningRates {
    LearningRates {
        backbone,
        head,
        gnn,
        classifier,
        proxies: 0.0,
    }
}

const GROUPS: [&str; 4] = [
    "feature_extractor.backbone.",
    "feature_extractor.fc.",
    "gnn.",
    "softmax_classifier.",
];

fn is_buffer(name: &str) -> bool {
    ["running_mean", "running_var", "num_batches_tracked"]
        .iter()
        .any(|b| name.ends_with(b))
}

/// Runs one step from a fresh model; returns the names of the parameters (not buffers)
/// that moved, and the step's losses.
fn moved_by_step(
    generation: bool,
    lr: LearningRates,
    train_backbone: bool,
) -> (Vec<String>, StepMetrics, Trainer, GcaHng) {
    let device = Device::flex().autodiff();
    device.seed(7);
    let model = model(&device);
    let before: StateDict = export_torch(&model, "");
    let mut trainer = Trainer::new(
        config(generation),
        WeightDecays {
            metric: 1e-4,
            gnn: 1e-4,
            classifier: 0.01,
        },
        LAYOUT,
    );
    let inputs = StepInputs {
        lr,
        history: LossHistory::default(),
        train_backbone,
    };
    let (model, metrics) = trainer.step(model, &batch(&device), inputs, &mut SeededMix::new(3));
    let after = export_torch(&model, "");
    assert_eq!(before.tensors.len(), after.tensors.len());
    let moved = before
        .tensors
        .iter()
        .filter(|(name, t)| !is_buffer(name) && after.tensors[*name].data != t.data)
        .map(|(name, _)| name.clone())
        .collect();
    (moved, metrics, trainer, model)
}

fn groups_of(moved: &[String]) -> Vec<&'static str> {
    GROUPS
        .iter()
        .copied()
        .filter(|g| moved.iter().any(|m| m.starts_with(g)))
        .collect()
}

#[test]
fn each_learning_rate_moves_only_its_own_parameters() {
    let cases = [
        (rates(1e-2, 0.0, 0.0, 0.0), GROUPS[0]),
        (rates(0.0, 1e-2, 0.0, 0.0), GROUPS[1]),
        (rates(0.0, 0.0, 1e-2, 0.0), GROUPS[2]),
        (rates(0.0, 0.0, 0.0, 1e-2), GROUPS[3]),
    ];
    for (lr, group) in cases {
        let (moved, metrics, _, _) = moved_by_step(true, lr, true);
        assert_eq!(groups_of(&moved), [group], "{lr:?}: {moved:?}");
        for (name, value) in metrics.named() {
            assert!(value.is_finite(), "{name} = {value}");
        }
    }
}

#[test]
fn the_generator_update_moves_the_coefficient_head() {
    // In a fresh run's first step J_gce does not reach the coefficient head (`gnn.fc.0`),
    // so only the generator update (phase 6) can move it.
    let (moved, metrics, _, _) = moved_by_step(true, rates(0.0, 0.0, 1e-2, 0.0), true);
    assert!(moved.iter().any(|m| m == "gnn.fc.0.weight"), "{moved:?}");
    assert!(
        moved.iter().any(|m| m.starts_with("gnn.cls.0")),
        "{moved:?}"
    );
    assert!(metrics.j_gen > 0.0 && metrics.j_gence > 0.0, "{metrics:?}");
}

#[test]
fn all_three_phases_report_their_losses() {
    let (moved, m, _, _) = moved_by_step(true, rates(1e-3, 1e-3, 1e-3, 1e-3), true);
    assert_eq!(groups_of(&moved), GROUPS);
    assert!(m.j_m > 0.0 && m.j_gnnce > 0.0 && m.j_softce > 0.0, "{m:?}");
    // In the first epoch (J̄_gen = 1e6) J_syn enters with weight 1 - exp(-2e-5).
    assert!(m.j_syn > 0.0 && m.j_syn < 1e-3, "{m:?}");
    assert!(
        (m.j_metric - (m.j_m + m.j_syn + m.j_gnnce)).abs() < 1e-4,
        "{m:?}"
    );
    assert!(m.j_gen > 0.0 && m.j_gence > 0.0 && m.j_div != 0.0, "{m:?}");
    // The classifier loss is scaled by 10: ten times the cross-entropy of 10 classes.
    assert!(m.j_softce > 5.0 && m.j_softce < 100.0, "{m:?}");
}

#[test]
fn the_baseline_skips_graph_classifier_and_generator() {
    let (moved, m, trainer, model) = moved_by_step(false, rates(1e-3, 1e-3, 1e-3, 1e-3), true);
    assert_eq!(groups_of(&moved), &GROUPS[..2], "{moved:?}");
    assert!(m.j_m > 0.0);
    assert_eq!(m.j_metric, m.j_m);
    for v in [m.j_gnnce, m.j_syn, m.j_softce, m.j_div, m.j_gence, m.j_gen] {
        assert_eq!(v, 0.0, "{m:?}");
    }
    assert_eq!(
        trainer.optim.gnn.steps_of(model.gnn.classifier.weight.id),
        0
    );
    assert_eq!(
        trainer
            .optim
            .classifier
            .steps_of(model.classifier.weight.id),
        0
    );
}

#[test]
fn warm_up_freezes_the_backbone_only() {
    let (moved, _, trainer, model) = moved_by_step(true, rates(1e-3, 1e-3, 1e-3, 1e-3), false);
    assert_eq!(groups_of(&moved), &GROUPS[1..], "{moved:?}");
    let Backbone::Linear(lin) = &model.embedder.backbone else {
        unreachable!()
    };
    assert_eq!(trainer.optim.embedder.steps_of(lin.lin.weight.id), 0);
    assert_eq!(
        trainer
            .optim
            .embedder
            .steps_of(model.embedder.head.linear.weight.id),
        1
    );
}

/// A model of its own with the values of `start`. A `clone()` would share BatchNorm's
/// running statistics (burn keeps them behind an `Arc`), so one run's steps would move the
/// other's.
fn copy_of(start: &StateDict, device: &Device) -> GcaHng {
    crate::io::state_dict::load_torch(model(device), start, "", device).expect("the start loads")
}

#[test]
fn mixed_precision_steps_train_every_group_and_stay_near_f32() {
    let lr = rates(1e-2, 1e-2, 1e-2, 1e-2);
    let device = Device::flex().autodiff();
    // One initial model for every precision: tests share the device's generator, so models
    // drawn separately could differ.
    let before: StateDict = export_torch(&model(&device), "");
    let inputs = StepInputs {
        lr,
        history: LossHistory::default(),
        train_backbone: true,
    };
    let mut reference: Option<StepMetrics> = None;
    for precision in [Precision::F32, Precision::F16, Precision::Bf16] {
        let mut trainer = Trainer::new(
            StepConfig {
                precision,
                ..config(true)
            },
            WeightDecays {
                metric: 1e-4,
                gnn: 1e-4,
                classifier: 0.01,
            },
            LAYOUT,
        );
        assert_eq!(trainer.scaler.is_some(), precision == Precision::F16);
        // Under f16 a step whose scaled backbone gradient overflows leaves the backbone as it
        // was and halves the scale, as PyTorch's GradScaler does; a few steps find a scale
        // that fits. Otherwise the first step moves everything.
        let mut model = copy_of(&before, &device);
        let mut first = None;
        let mut moved = Vec::new();
        for _ in 0..17 {
            let (next, metrics) =
                trainer.step(model, &batch(&device), inputs, &mut SeededMix::new(3));
            model = next;
            first.get_or_insert(metrics);
            let after = export_torch(&model, "");
            moved = before
                .tensors
                .iter()
                .filter(|(name, t)| !is_buffer(name) && after.tensors[*name].data != t.data)
                .map(|(name, _)| name.clone())
                .collect();
            if groups_of(&moved).contains(&GROUPS[0]) {
                break;
            }
        }
        assert_eq!(groups_of(&moved), GROUPS, "{precision}: {moved:?}");
        let after = export_torch(&model, "");
        for (name, t) in &after.tensors {
            assert!(t.data.iter().all(|v| v.is_finite()), "{precision}: {name}");
        }
        let metrics = first.expect("at least one step");
        let want = *reference.get_or_insert(metrics);
        for ((name, got), (_, want)) in metrics.named().iter().zip(want.named()) {
            let gap = (got - want).abs() / want.abs().max(1e-3);
            assert!(gap < 5e-2, "{precision}: {name} {got} vs f32 {want}");
        }
        match &trainer.scaler {
            Some(s) => assert_eq!(
                s.scale,
                65536.0 / 2f64.powi(s.skipped as i32),
                "{precision}: every skip halves the scale"
            ),
            None => assert_ne!(precision, Precision::F16),
        }
    }
}

#[test]
fn the_backbone_backward_beside_the_step_gives_the_same_numbers() {
    // Split at the backbone's features, the backbone's part of the backward pass runs on
    // another worker while the rest of the step goes on; whole and in order, it runs first.
    // Both runs load one exported start: the backend's random numbers are shared by every
    // test running at the same time, so a second seeded initialisation could differ (it did,
    // once).
    let device = Device::flex().autodiff();
    device.seed(7);
    let fresh: StateDict = export_torch(&model(&device), "");
    let run = |mut exchange: SingleProcess| {
        let mut model = copy_of(&fresh, &device);
        let mut trainer = Trainer::new(
            config(true),
            WeightDecays {
                metric: 1e-4,
                gnn: 1e-4,
                classifier: 0.01,
            },
            LAYOUT,
        );
        let mut mix = SeededMix::new(3);
        let mut losses = Vec::new();
        for _ in 0..3 {
            let inputs = StepInputs::new(rates(1e-2, 1e-2, 1e-2, 1e-2), LossHistory::default());
            let stepped = crate::backends::on_pool(|| {
                trainer.step_exchanged(model, &batch(&device), inputs, &mut mix, &mut exchange)
            });
            let (next, metrics) = match stepped {
                Ok(done) => done,
                Err(never) => match never {},
            };
            model = next;
            losses.push(metrics.named());
        }
        (export_torch(&model, ""), losses)
    };
    let (beside, beside_losses) = run(SingleProcess::beside());
    let (in_order, in_order_losses) = run(SingleProcess::in_order());
    assert_eq!(beside_losses, in_order_losses);
    for (name, t) in &in_order.tensors {
        assert_eq!(beside.tensors[name].data, t.data, "{name}");
        // The backbone trained (its gradients arrived on both paths).
        if name.starts_with(GROUPS[0]) && !is_buffer(name) {
            assert_ne!(fresh.tensors[name].data, t.data, "{name} did not move");
        }
    }
}
