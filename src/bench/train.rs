//! Timing whole training steps of a configuration: the loader, the backbone's forward and
//! backward passes, the GCA-HNG step and its three optimisers, as `train` runs them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};

use crate::config::{ConfigError, DatasetKind, ExperimentConfig};
use crate::data::loader::{Loader, LoaderConfig, sample_seed};
use crate::data::sampler::{BalancedSampler, SamplerConfig, ShortClass, view_major};
use crate::data::tensor::images_tensor;
use crate::data::transform::{RandomResizedCropConfig, Transform};
use crate::data::{BatchError, DataError};
use crate::error::{Error, Result};
use crate::method::model::GcaHng;
use crate::method::synthesis::SeededMix;
use crate::train::image_store;
use crate::train::setup;
use crate::train::step::{Batch, StepInputs, Trainer};

/// What a training benchmark runs.
#[derive(Clone, Debug)]
pub struct TrainBench {
    /// Untimed steps first (allocator and cache warm-up).
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Random images and randomly initialised weights instead of the dataset and the
    /// pretrained backbone, so that any preset runs without downloads; the loader is then
    /// left out.
    pub synthetic: bool,
    /// The dataset's folder, overriding the configuration's.
    pub data_root: Option<PathBuf>,
}

/// Seconds of each timed step and the images each step trains on.
#[derive(Clone, Debug)]
pub struct TrainTimes {
    pub seconds: Vec<f64>,
    pub images_per_step: usize,
    /// CPU seconds of the whole process (every thread: the step, the pool, the loader) over
    /// the timed steps; `None` where the process clock is not available.
    pub cpu_seconds: Option<f64>,
}

impl TrainTimes {
    /// Cores kept busy on average over the timed steps: CPU seconds over wall seconds.
    pub fn cores(&self) -> Option<f64> {
        let wall: f64 = self.seconds.iter().sum();
        self.cpu_seconds
            .filter(|_| wall > 0.0)
            .map(|cpu| cpu / wall)
    }

    pub fn images_per_second(&self) -> f64 {
        self.images_per_step as f64 / super::median(&self.seconds)
    }
}

/// The wall clock and the process's CPU clock, read together so that both span the same steps.
#[derive(Clone, Copy)]
struct Clock {
    wall: Instant,
    cpu: Option<f64>,
}

impl Clock {
    fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: super::process_cpu_seconds(),
        }
    }
}

/// Training classes of the release's datasets, which size the classifier and the proxies
/// of a synthetic run as the real run would be sized.
fn train_classes(kind: DatasetKind) -> Option<usize> {
    match kind {
        DatasetKind::Cub => Some(100),
        DatasetKind::Cars => Some(98),
        DatasetKind::Sop => Some(11_318),
        DatasetKind::Inshop => Some(3_997),
        _ => None,
    }
}

/// Times `bench.steps` training steps of `config` after `bench.warmup` untimed ones. Each
/// step is timed from the end of the previous one, so time spent waiting for the loader
/// counts. The backbone trains in every step (the steps after the warm-up epochs).
pub fn bench_train(
    config: &ExperimentConfig,
    bench: &TrainBench,
    device: &Device,
) -> Result<TrainTimes> {
    if bench.steps == 0 {
        return Err(ConfigError::Invalid {
            key: "--steps",
            rule: "must be at least 1",
        }
        .into());
    }
    let ad = device.clone().autodiff();
    let seed = config.train.seed;
    ad.seed(seed);
    let layout = setup::layout(config);
    let n = layout.nodes();
    let mut trainer = Trainer::new(
        setup::step_config(config),
        setup::weight_decays(config),
        layout,
    );
    let epoch = config.optim.warm_up_epochs;
    let inputs = StepInputs {
        lr: config.learning_rates(epoch),
        history: Default::default(),
        train_backbone: true,
    };
    let total = bench.warmup + bench.steps;
    let mut seconds = Vec::with_capacity(bench.steps);
    let mut cpu_seconds = Some(0.0);
    let mut record = |i: usize, since: &mut Clock| {
        let now = Clock::now();
        if i >= bench.warmup {
            seconds.push(now.wall.duration_since(since.wall).as_secs_f64());
            cpu_seconds = cpu_seconds
                .zip(now.cpu.zip(since.cpu))
                .map(|(total, (end, start))| total + end - start);
        }
        *since = now;
    };
    let mut step = |model: GcaHng, batch: &Batch, i: usize| {
        ad.seed(sample_seed(seed, 0, i as u64));
        let mut mix = SeededMix::new(sample_seed(seed ^ 1, 0, i as u64));
        trainer.step(model, batch, inputs, &mut mix).0
    };

    if bench.synthetic {
        let num_classes = match train_classes(config.data.kind) {
            Some(c) => c,
            None => setup::run_data(config, bench.data_root.as_deref())?
                .train
                .classes
                .len(),
        };
        let mut model = setup::init_model(config, num_classes, &ad)?;
        let size = config.data.image_size;
        let labels: Vec<usize> = (0..n).map(|i| i % layout.classes).collect();
        let mut since = Clock::now();
        for i in 0..total {
            let batch = Batch::new(
                Tensor::<4>::random([n, 3, size, size], Distribution::Normal(0.0, 1.0), &ad),
                labels.clone(),
            );
            model = step(model, &batch, i);
            record(i, &mut since);
        }
    } else {
        let (weights, _) = setup::pretrained_weights(config)?;
        let data = setup::run_data(config, bench.data_root.as_deref())?;
        let train = &data.train;
        let mut model = setup::build_model(config, train.classes.len(), &weights, &ad)?;
        drop(weights);
        let store = Arc::new(image_store(config, None)?);
        let mut sampler = BalancedSampler::new(
            &train.labels(),
            SamplerConfig {
                classes_per_batch: layout.classes,
                per_class: layout.per_class,
                seed,
                short_class: ShortClass::Resample,
            },
            |l| train.classes[l].original_id.clone(),
        )?;
        let mut plan = Vec::with_capacity(total);
        while plan.len() < total {
            let before = plan.len();
            plan.extend(
                sampler
                    .epoch()
                    .into_iter()
                    .map(|b| view_major(&b, layout.classes, layout.per_class)),
            );
            if plan.len() == before {
                return Err(DataError::Batch(BatchError::TooFewImages {
                    have: train.samples.len(),
                    classes: layout.classes,
                    per_class: layout.per_class,
                })
                .into());
            }
        }
        plan.truncate(total);
        let crop = RandomResizedCropConfig {
            scale: (config.data.crop_scale[0], config.data.crop_scale[1]),
            ratio: (config.data.crop_ratio[0], config.data.crop_ratio[1]),
            ..RandomResizedCropConfig::new(config.data.image_size as u32)
        };
        let loader = Loader::spawn(
            Arc::new(train.samples.clone()),
            store,
            plan,
            Transform::Train { crop, flip_p: 0.5 },
            0,
            LoaderConfig {
                threads: config.data.workers.max(1),
                prefetch: 2,
                seed,
                normalisation: setup::normalisation(config.model.backbone),
                skip_bad_images: false,
                skip_batches: 0,
            },
        )?;
        let mut since = Clock::now();
        for (i, host) in loader.enumerate() {
            let host = host.map_err(|e| Error::Context {
                what: format!("batch {i}"),
                source: Box::new(e.into()),
            })?;
            let batch = Batch::new(images_tensor(&host, &ad), host.labels.clone());
            model = step(model, &batch, i);
            record(i, &mut since);
        }
    }
    Ok(TrainTimes {
        seconds,
        images_per_step: n,
        cpu_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_cpu_seconds_over_the_timed_wall_seconds() {
        let times = |cpu| TrainTimes {
            seconds: vec![0.5, 1.5],
            images_per_step: 32,
            cpu_seconds: cpu,
        };
        assert_eq!(times(Some(3.0)).cores(), Some(1.5));
        assert_eq!(times(None).cores(), None);
        let none_timed = TrainTimes {
            seconds: vec![0.0],
            ..times(Some(1.0))
        };
        assert_eq!(none_timed.cores(), None);
    }
}
