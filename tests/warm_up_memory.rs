//! Warm-up steps (backbone frozen) must not keep memory from step to step. Freezing the
//! backbone by detaching its output once left each step's recorded forward graph behind
//! (about 300 MB per step at the demo's size). Alone in its own test binary, so that no other
//! test's allocations move the resident-set size.

use burn::tensor::{Device, Distribution, Tensor};

use gca_hng::config::ExperimentConfig;
use gca_hng::method::synthesis::SeededMix;
use gca_hng::train::setup;
use gca_hng::train::step::{Batch, LossHistory, StepInputs, Trainer};

/// Resident-set size of this process in MB (Linux).
fn resident_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1e6)
}

#[test]
fn warm_up_steps_do_not_accumulate_memory() {
    if resident_mb().is_none() {
        eprintln!("skipped: /proc/self/statm is not readable here");
        return;
    }
    let mut config = ExperimentConfig::demo();
    config.data.classes_per_batch = 8;
    config.data.per_class = 2;
    config.model.embedding_dim = 32;
    // The CPU, named: `Device::default()` prefers a GPU backend when the build has one (CI's
    // `--features wgpu` build found llvmpipe, and this test took minutes there).
    let device = Device::flex().autodiff();
    let (weights, _) = setup::pretrained_weights(&config).unwrap();
    let mut model = setup::build_model(&config, 50, &weights, &device).unwrap();
    let mut trainer = Trainer::new(
        setup::step_config(&config),
        setup::weight_decays(&config),
        setup::layout(&config),
    );
    let labels: Vec<usize> = (0..16).map(|i| i % 8).collect();
    let mut step = |model: gca_hng::method::model::GcaHng| {
        let batch = Batch::new(
            Tensor::<4>::random([16, 3, 64, 64], Distribution::Default, &device),
            labels.clone(),
        );
        let mut inputs = StepInputs::new(config.learning_rates(0), LossHistory::default());
        inputs.train_backbone = false;
        trainer
            .step(model, &batch, inputs, &mut SeededMix::new(0))
            .0
    };
    for _ in 0..5 {
        model = step(model);
    }
    let before = resident_mb().unwrap();
    for _ in 0..30 {
        model = step(model);
    }
    let grown = resident_mb().unwrap() - before;
    // A retained forward graph of this backbone at 16 x 64 px is well over 100 MB a step.
    assert!(
        grown < 300.0,
        "resident memory grew by {grown:.0} MB over 30 warm-up steps"
    );
}
