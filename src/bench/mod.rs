//! Benchmarks: one full training step without a backbone, a backbone alone, whole training
//! steps ([`train`]), the input pipeline ([`data`]) and the approximate index ([`index`]).

pub mod data;
pub mod index;
pub mod train;

use crate::nn::precision::Precision;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};

use crate::backbones::BackboneConfig;
use crate::method::embedder::EmbedderConfig;
use crate::method::gnn::GnnConfig;
use crate::method::graph::BatchLayout;
use crate::method::losses::HardnessMasking;
use crate::method::model::GcaHngConfig;
use crate::method::synthesis::SeededMix;
use crate::train::step::{
    Batch, LearningRates, LossHistory, StepConfig, StepInputs, Trainer, WeightDecays,
};

/// The problem a step benchmark times.
#[derive(Clone, Debug)]
pub struct StepBench {
    pub classes: usize,
    pub per_class: usize,
    /// Embedding width d.
    pub embedding_dim: usize,
    pub layers: usize,
    pub heads: usize,
    /// Backbone feature width fed to the embedding head.
    pub feature_width: usize,
    /// Training classes (classifier width).
    pub num_classes: usize,
    pub warmup: usize,
    pub iters: usize,
}

/// Seconds of each timed step.
pub fn bench_step(cfg: &StepBench, device: &Device) -> Vec<f64> {
    let device = device.clone().autodiff();
    device.seed(0);
    let layout = BatchLayout::new(cfg.classes, cfg.per_class);
    let model_cfg = GcaHngConfig::new(
        EmbedderConfig::new(
            BackboneConfig::Identity {
                width: cfg.feature_width,
            },
            cfg.embedding_dim,
        ),
        GnnConfig::new(cfg.embedding_dim, cfg.num_classes)
            .with_num_layers(cfg.layers)
            .with_num_heads(cfg.heads),
    );
    let mut model = model_cfg.init(&device);
    let step_cfg = StepConfig {
        hardness_alpha: 5.0,
        synthetic_beta: 20.0,
        classification_weight: 20.0,
        diversity_weight: 20.0,
        hardness_weight: 20.0,
        grad_clip: Some(10.0),
        masking: HardnessMasking::SameClass,
        generation: true,
        precision: Precision::F32,
    };
    let mut trainer = Trainer::new(
        step_cfg,
        WeightDecays {
            metric: 1e-4,
            gnn: 1e-4,
            classifier: 0.01,
        },
        layout,
    );
    let lr = LearningRates {
        backbone: 1e-4,
        head: 1e-4,
        gnn: 3e-4,
        classifier: 1e-3,
        proxies: 1e-2,
    };
    let history = LossHistory {
        metric: 3.0,
        generator: 30.0,
    };
    let n = layout.nodes();
    let labels: Vec<usize> = (0..n)
        .map(|i| (i % cfg.classes) % cfg.num_classes)
        .collect();
    let mut mix = SeededMix::new(0);
    let mut times = Vec::with_capacity(cfg.iters);
    for i in 0..cfg.warmup + cfg.iters {
        let images = Tensor::<4>::random(
            [n, cfg.feature_width, 1, 1],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let batch = Batch::new(images, labels.clone());
        // The step reads its losses back, which waits for the device to finish.
        let start = Instant::now();
        let (next, _) = trainer.step(model, &batch, StepInputs::new(lr, history), &mut mix);
        model = next;
        let elapsed = start.elapsed().as_secs_f64();
        if i >= cfg.warmup {
            times.push(elapsed);
        }
    }
    times
}

/// CPU seconds this process has used so far, on all its threads (user and system), or `None`
/// where the clock is not available. Divided by wall seconds it gives the cores a run kept
/// busy, which a wall time alone cannot show.
pub fn process_cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `t` is a valid, writable timespec for the call's duration.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
        (rc == 0).then_some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The median of a non-empty list.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// Seconds of each timed forward + backward pass of a backbone (BatchNorm on batch
/// statistics), on `[batch, 3, size, size]` random images; the backward pass starts from the
/// sum of the features; the clock stops when the device has finished.
pub fn bench_backbone(
    backbone: &crate::backbones::BackboneConfig,
    batch: usize,
    size: usize,
    warmup: usize,
    iters: usize,
    precision: Precision,
    device: &Device,
) -> Vec<f64> {
    let device = device.clone().autodiff();
    device.seed(0);
    let model = backbone.init(&device);
    let mut times = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let images = Tensor::<4>::random(
            [batch, 3, size, size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let start = Instant::now();
        // On a worker of the pool, as a training step runs (`Trainer::step`).
        crate::backends::on_pool(|| {
            let features = model.forward_in(images, precision);
            let grads = features.sum().backward();
            // GPU backends queue the work; wait for it before stopping the clock.
            let _ = device.sync();
            drop(grads);
        });
        let elapsed = start.elapsed().as_secs_f64();
        if i >= warmup {
            times.push(elapsed);
        }
    }
    times
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_process_clock_counts_work_on_any_thread() {
        let Some(before) = process_cpu_seconds() else {
            return;
        };
        // Busy on another thread until its own work shows in the process clock (capped in
        // wall time, so that a clock that never moves fails instead of hanging).
        let worker = std::thread::spawn(move || {
            let start = Instant::now();
            let mut x = 0u64;
            while start.elapsed() < Duration::from_secs(20) {
                for i in 0..100_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
                }
                if process_cpu_seconds().is_some_and(|now| now - before >= 0.05) {
                    return true;
                }
            }
            false
        });
        assert!(worker.join().unwrap(), "the process clock did not advance");
        assert!(process_cpu_seconds().unwrap() >= before + 0.05);
    }
}
