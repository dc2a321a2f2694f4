//! Loads planned batches on worker threads ahead of the model.
//!
//! A producer thread walks the batch plan in order; each batch's images are decoded and
//! transformed in parallel on a dedicated rayon pool (not the global one, which the CPU
//! backend's kernels use), and finished batches wait in a bounded channel of `prefetch`
//! slots. Every sample's random transform comes from its own RNG seeded by
//! `(seed, epoch, position in the epoch)`, so the output does not depend on the thread count
//! or on scheduling.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::emoji::{EmojiAsset, EmojiRasteriser};
use super::image_io::load_rgb;
use super::transform::{Normalisation, Transform};
use super::{DataError, ImageSource, Sample};

/// Decodes any [`ImageSource`] to RGB.
pub struct ImageStore {
    emoji: Option<EmojiRasteriser>,
}

impl ImageStore {
    /// A store for image files only.
    pub fn files() -> Self {
        Self { emoji: None }
    }

    /// A store that also rasterises embedded emoji at `size` px (cached in memory, and under
    /// `disk_cache` when given).
    pub fn with_emoji(size: u32, disk_cache: Option<PathBuf>) -> Result<Self, DataError> {
        Ok(Self {
            emoji: Some(EmojiRasteriser::new(
                EmojiAsset::embedded()?,
                size,
                disk_cache,
            )),
        })
    }

    pub fn load(&self, source: &ImageSource) -> Result<Arc<RgbImage>, DataError> {
        match source {
            ImageSource::File(p) => load_rgb(p).map(Arc::new),
            ImageSource::Emoji { class, icon } => self
                .emoji
                .as_ref()
                .ok_or(DataError::NoEmojiStore)?
                .get(*class, *icon),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Decoding threads.
    pub threads: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch: usize,
    pub seed: u64,
    pub normalisation: Normalisation,
    /// Leave out unreadable images (reported in [`HostBatch::skipped`] and
    /// [`Loader::skipped`]) instead of stopping with an error.
    pub skip_bad_images: bool,
    /// Batches at the start of the plan to pass over without loading them (resuming inside an
    /// epoch); later batches get the same random transforms as in a full pass.
    pub skip_batches: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch: 2,
            seed: 0,
            normalisation: Normalisation::ImageNet,
            skip_bad_images: false,
            skip_batches: 0,
        }
    }
}

/// A batch in host memory: `images` is `[rows, 3, size, size]` row-major.
#[derive(Clone, Debug)]
pub struct HostBatch {
    /// Position of the batch in the plan.
    pub index: usize,
    pub images: Vec<f32>,
    pub size: u32,
    pub labels: Vec<usize>,
    /// Sample index of every row.
    pub samples: Vec<usize>,
    /// Planned samples left out because they could not be read (only with
    /// `skip_bad_images`); the batch then has fewer rows than planned.
    pub skipped: Vec<(usize, DataError)>,
}

impl HostBatch {
    pub fn rows(&self) -> usize {
        self.labels.len()
    }
}

/// Batches in plan order; ends after the last batch or after the first error.
pub struct Loader {
    rx: Option<Receiver<Result<HostBatch, DataError>>>,
    /// The next batch, taken from the channel by [`Loader::peek_ready`].
    ahead: Option<Result<HostBatch, DataError>>,
    worker: Option<JoinHandle<()>>,
    skipped: Arc<Mutex<Vec<(usize, DataError)>>>,
}

/// Mixes seed, epoch and position into one RNG seed (splitmix64 finaliser on each step), so
/// that neighbouring positions get unrelated streams.
pub fn sample_seed(seed: u64, epoch: u64, position: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(mix(mix(seed) ^ epoch) ^ position)
}

impl Loader {
    /// Starts loading `plan` (each entry a batch of indices into `samples`) for `epoch`.
    pub fn spawn(
        samples: Arc<Vec<Sample>>,
        store: Arc<ImageStore>,
        plan: Vec<Vec<usize>>,
        transform: Transform,
        epoch: u64,
        cfg: LoaderConfig,
    ) -> Result<Loader, DataError> {
        Self::spawn_at(samples, store, plan, None, transform, epoch, cfg)
    }

    /// [`spawn`](Self::spawn) with each row's position in the epoch given (`positions[b][r]`
    /// for row r of batch b) rather than counted: a data-parallel process loads its rows of
    /// each global batch with the random transforms they get in the whole batch.
    pub fn spawn_at(
        samples: Arc<Vec<Sample>>,
        store: Arc<ImageStore>,
        plan: Vec<Vec<usize>>,
        positions: Option<Vec<Vec<u64>>>,
        transform: Transform,
        epoch: u64,
        cfg: LoaderConfig,
    ) -> Result<Loader, DataError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("gca-hng-loader-{i}"))
            .build()
            .map_err(|e| DataError::Threads {
                source: Arc::new(e),
            })?;
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let skipped = Arc::new(Mutex::new(Vec::new()));
        let skipped_w = skipped.clone();
        let worker = std::thread::Builder::new()
            .name("gca-hng-loader".into())
            .spawn(move || {
                produce(
                    &samples,
                    &store,
                    &plan,
                    positions.as_deref(),
                    transform,
                    epoch,
                    cfg,
                    &pool,
                    &tx,
                    &skipped_w,
                )
            })
            .map_err(|e| DataError::Threads {
                source: Arc::new(e),
            })?;
        Ok(Loader {
            rx: Some(rx),
            ahead: None,
            worker: Some(worker),
            skipped,
        })
    }

    /// Every image left out so far, with why.
    pub fn skipped(&self) -> Vec<(usize, DataError)> {
        self.skipped.lock().expect("skipped lock").clone()
    }
}

#[allow(clippy::too_many_arguments)]
fn produce(
    samples: &[Sample],
    store: &ImageStore,
    plan: &[Vec<usize>],
    positions: Option<&[Vec<u64>]>,
    transform: Transform,
    epoch: u64,
    cfg: LoaderConfig,
    pool: &rayon::ThreadPool,
    tx: &SyncSender<Result<HostBatch, DataError>>,
    skipped_all: &Mutex<Vec<(usize, DataError)>>,
) {
    let size = transform.output_size();
    let per_image = 3 * (size as usize) * (size as usize);
    let mut position = 0u64;
    for (index, rows) in plan.iter().enumerate() {
        let first = position;
        position += rows.len() as u64;
        if index < cfg.skip_batches {
            continue;
        }
        let mut images = vec![0f32; rows.len() * per_image];
        let results: Vec<Result<(), DataError>> = pool.install(|| {
            images
                .par_chunks_mut(per_image)
                .zip(rows.par_iter())
                .enumerate()
                .map(|(r, (out, &s))| {
                    let sample = samples.get(s).ok_or(DataError::NoSample { index: s })?;
                    let img = store.load(&sample.source)?;
                    let position = positions.map_or(first + r as u64, |p| p[index][r]);
                    let mut rng = ChaCha8Rng::seed_from_u64(sample_seed(cfg.seed, epoch, position));
                    transform
                        .apply(&img, &mut rng, cfg.normalisation, out)
                        .map_err(|e| DataError::Transform {
                            sample: sample.source.to_string(),
                            source: e,
                        })
                })
                .collect()
        });
        let mut batch = HostBatch {
            index,
            images: Vec::new(),
            size,
            labels: Vec::with_capacity(rows.len()),
            samples: Vec::with_capacity(rows.len()),
            skipped: Vec::new(),
        };
        let all_ok = results.iter().all(Result::is_ok);
        let mut kept = Vec::new();
        for ((r, &s), result) in rows.iter().enumerate().zip(results) {
            match result {
                Ok(()) => {
                    if !all_ok {
                        kept.extend_from_slice(&images[r * per_image..(r + 1) * per_image]);
                    }
                    batch.labels.push(samples[s].label);
                    batch.samples.push(s);
                }
                Err(e) if cfg.skip_bad_images => batch.skipped.push((s, e)),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        batch.images = if all_ok { images } else { kept };
        skipped_all
            .lock()
            .expect("skipped lock")
            .extend(batch.skipped.iter().cloned());
        if tx.send(Ok(batch)).is_err() {
            // The consumer is gone.
            return;
        }
    }
}

impl Loader {
    /// The next batch if it is loaded already, without waiting for it; it stays the next one
    /// [`next`](Iterator::next) returns.
    pub fn peek_ready(&mut self) -> Option<&Result<HostBatch, DataError>> {
        if self.ahead.is_none() {
            self.ahead = self.rx.as_ref()?.try_recv().ok();
        }
        self.ahead.as_ref()
    }
}

impl Iterator for Loader {
    type Item = Result<HostBatch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(ahead) = self.ahead.take() {
            return Some(ahead);
        }
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel stops the producer at its next send.
        self.rx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Sequential batches of at most `batch` samples covering `0..n` (for evaluation).
pub fn sequential_plan(n: usize, batch: usize) -> Vec<Vec<usize>> {
    (0..n)
        .collect::<Vec<_>>()
        .chunks(batch.max(1))
        .map(|c| c.to_vec())
        .collect()
}
