//! `bench data`: training batches per second through the whole input pipeline (sampler,
//! decode, RandomResizedCrop, flip, normalisation) on real files.

use std::sync::Arc;
use std::time::Instant;

use crate::data::loader::{ImageStore, Loader, LoaderConfig};
use crate::data::sampler::{BalancedSampler, SamplerConfig, view_major};
use crate::data::transform::Transform;
use crate::data::{DataError, Dataset, DatasetKind};

#[derive(Clone, Debug)]
pub struct DataBench {
    pub classes_per_batch: usize,
    pub per_class: usize,
    pub size: u32,
    pub warmup: usize,
    pub batches: usize,
    pub loader: LoaderConfig,
}

#[derive(Clone, Debug)]
pub struct DataBenchResult {
    pub images: usize,
    pub seconds: f64,
    pub skipped: usize,
}

impl DataBenchResult {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.seconds
    }
}

/// Loads `warmup + batches` training batches of `dataset`'s train split; times the last
/// `batches`.
pub fn bench_data(dataset: &Dataset, cfg: &DataBench) -> Result<DataBenchResult, DataError> {
    let train = dataset.require_split("train")?;
    let (c, p) = (cfg.classes_per_batch, cfg.per_class);
    let mut sampler = BalancedSampler::new(
        &train.labels(),
        SamplerConfig {
            classes_per_batch: c,
            per_class: p,
            seed: cfg.loader.seed,
            short_class: Default::default(),
        },
        |l| train.classes[l].original_id.clone(),
    )?;
    let plan: Vec<Vec<usize>> = (0..cfg.warmup + cfg.batches)
        .map(|_| view_major(&sampler.next_batch(), c, p))
        .collect();
    let store = if dataset.kind == DatasetKind::Emoji {
        ImageStore::with_emoji(cfg.size * 8 / 7, None)?
    } else {
        ImageStore::files()
    };
    let loader = Loader::spawn(
        Arc::new(train.samples.clone()),
        Arc::new(store),
        plan,
        Transform::train(cfg.size),
        0,
        cfg.loader,
    )?;
    let mut start = Instant::now();
    let (mut images, mut skipped) = (0, 0);
    for (i, batch) in loader.enumerate() {
        let batch = batch?;
        skipped += batch.skipped.len();
        if i + 1 == cfg.warmup {
            start = Instant::now();
        } else if i >= cfg.warmup {
            images += batch.rows();
        }
    }
    Ok(DataBenchResult {
        images,
        seconds: start.elapsed().as_secs_f64(),
        skipped,
    })
}
