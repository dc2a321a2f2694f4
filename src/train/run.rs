//! A training run: epochs of class-balanced batches through the GCA-HNG step (METHOD.md
//! section 7), with the warm-up, the learning-rate schedules, the previous-epoch loss means,
//! periodic evaluation and model selection, and a run folder with resumable checkpoints.
//!
//! Everything random is drawn from the run's seed and the position in training (epoch, step,
//! image), never from state that a restart would lose: the sampler is replayed, crops come from
//! `(seed, epoch, position)`, and the dropout and ρ draws of step `s` of epoch `e` from
//! `(seed, e, s)`. So a run resumed from any checkpoint continues exactly as it would have.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::error::{Error, Result};

use crate::config::{DatasetKind, ExperimentConfig, SelectOn};
use crate::data::loader::{ImageStore, Loader, LoaderConfig, sample_seed};
use crate::data::sampler::{BalancedSampler, SamplerConfig, ShortClass, view_major};
use crate::data::tensor::images_tensor;
use crate::data::transform::{RandomResizedCropConfig, Transform};
use crate::data::{BatchError, ImageSource};
use crate::device::{DeviceSpec, configured};
use crate::distributed::{DistributedError, Exchange, Shard, check_identical};
use crate::eval::embed::EmbedSettings;
use crate::eval::metrics::RetrievalMetrics;
use crate::io::embedding_files::{EmbeddingFiles, ModelRecord};
use crate::method::model::GcaHng;
use crate::method::synthesis::SeededMix;
use crate::nn::batch_norm::RunningStatistics;
use crate::train::step::{Batch, StepInputs, StepMetrics, Trainer, frozen_features};
use crate::verify::compare::AdamWSlack;

use super::checkpoint::{Best, CheckpointMeta, Progress};
use super::evaluator::Evaluator;
use super::outcome::{EpochRecord, Observer, RunOptions, RunOutcome, RunSummary};
use super::run_dir::RunDir;
use super::setup::RunData;
use super::{checkpoint, plots, setup};

/// Stream tags mixed into the seed so that the run's random streams are unrelated.
const DROPOUT_STREAM: u64 = 0xD80F_0A7E;
const MIX_STREAM: u64 = 0x313C_5EED;

/// Validation (when carved) and test metrics of `model`.
fn evaluate_run(
    evaluator: &Evaluator,
    data: &RunData,
    model: &GcaHng,
    keep_test: Option<(&EmbeddingFiles, &ModelRecord)>,
    observer: &mut dyn Observer,
    skipped: &mut Vec<String>,
) -> Result<(Option<RetrievalMetrics>, RetrievalMetrics)> {
    let mut left_out = Vec::new();
    let validation = match &data.validation {
        Some(v) => {
            let (m, s) =
                evaluator.metrics_and_skipped(&model.embedder, v, "validation", None, observer)?;
            left_out.extend(s);
            Some(m)
        }
        None => None,
    };
    let (test, s) =
        evaluator.metrics_and_skipped(&model.embedder, &data.test, "test", keep_test, observer)?;
    left_out.extend(s);
    for line in &left_out {
        observer.note(line);
    }
    skipped.extend(left_out);
    Ok((validation, test))
}

/// Recall@1 of the split the run selects on.
fn selection_score(select_on: SelectOn, record: &EpochRecord) -> Option<f64> {
    let m = match select_on {
        SelectOn::Validation => record.validation.as_ref(),
        SelectOn::Test => record.test.as_ref(),
    }?;
    m.recall.get("1").copied()
}

/// The store that decodes the run's images.
pub fn image_store(config: &ExperimentConfig, emoji_cache: Option<PathBuf>) -> Result<ImageStore> {
    Ok(if config.data.kind == DatasetKind::Emoji {
        ImageStore::with_emoji(config.data.resize as u32, emoji_cache)?
    } else {
        ImageStore::files()
    })
}

/// The configuration's image store, able to draw embedded emoji whenever `sources` name some:
/// a model trained on image files can still embed icons.
pub fn image_store_for<'a>(
    config: &ExperimentConfig,
    sources: impl IntoIterator<Item = &'a ImageSource>,
) -> Result<ImageStore> {
    if sources
        .into_iter()
        .any(|s| matches!(s, ImageSource::Emoji { .. }))
    {
        Ok(ImageStore::with_emoji(config.data.resize as u32, None)?)
    } else {
        image_store(config, None)
    }
}

/// The test-time transform and batching of a configuration.
pub fn embed_settings(config: &ExperimentConfig, skip_bad_images: bool) -> EmbedSettings {
    EmbedSettings {
        resize: config.data.resize as u32,
        crop: config.data.image_size as u32,
        normalisation: setup::normalisation(config.model.backbone),
        batch: 64,
        threads: config.data.workers.max(1),
        skip_bad_images,
        precision: config.train.precision,
    }
}

/// The configuration with the run options that change what a run does folded in, so that
/// they are saved with the run and a resumed run needs none of them repeated.
fn with_run_options(config: &ExperimentConfig, opts: &RunOptions) -> ExperimentConfig {
    let mut config = config.clone();
    let t = &mut config.train;
    t.max_steps_per_epoch = opts.max_steps_per_epoch.or(t.max_steps_per_epoch);
    t.eval_class_limit = opts.eval_class_limit.or(t.eval_class_limit);
    t.skip_bad_images |= opts.skip_bad_images;
    config
}

/// Trains the model `config` describes, writing the run folder `opts.out`.
pub fn train(
    config: &ExperimentConfig,
    opts: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<RunOutcome> {
    let config = &with_run_options(config, opts);
    config.validate()?;
    let dist = opts.distributed.as_ref();
    // Rank 0 of a data-parallel run owns the run folder, the logs, evaluation and
    // checkpoints; the other ranks write nothing.
    let root = dist.is_none_or(|d| d.collective.rank() == 0);
    let shard = match dist {
        Some(d) => {
            if config.model.batch_norm == crate::backbones::BatchNormMode::Train
                && config.model.backbone != crate::backbones::BackboneKind::VitS16
            {
                return Err(DistributedError::BatchStatistics.into());
            }
            Some(Shard::new(
                d.collective.rank(),
                d.collective.size(),
                config.data.classes_per_batch,
                config.data.per_class,
            )?)
        }
        None => None,
    };
    let run = RunDir::new(&opts.out);
    let config_toml = config.to_toml();
    // A resumed run is locked before anything is read, so that a live run is never resumed
    // beside itself; a new one once its folder exists, below.
    let mut lock = None;
    if opts.resume {
        if root {
            lock = Some(run.lock()?);
        }
        run.check_resumable(&config_toml)?;
    } else if root {
        run.check_fresh()?;
    }
    // Weights and data are checked before the run folder is made, so that a run that cannot
    // start leaves nothing behind.
    let (weights, weights_source) = setup::pretrained_weights(config)?;
    let mut data = setup::run_data(config, opts.data_root.as_deref())?;
    if let Some(n) = config.train.eval_class_limit {
        data.test = data.test.limited(n);
        data.validation = data.validation.map(|v| v.limited(n));
    }
    let store = Arc::new(image_store(config, opts.emoji_cache.clone())?);
    let mut spec = configured(&config.train.device)?;
    if let Some(d) = dist {
        spec = spec.for_local_rank(d.collective.local_rank());
    }
    let device = spec.open()?;
    spec.check_precision(&device, config.train.precision)?;
    let ad = device.clone().autodiff();
    let seed = config.train.seed;
    ad.seed(seed);

    let num_classes = data.train.classes.len();
    let mut model = setup::build_model(config, num_classes, &weights, &ad)?;
    drop(weights);
    if !opts.resume && root {
        run.create()?;
        lock = Some(run.lock()?);
        // Again under the lock: another process may have started here since the first check.
        run.check_fresh()?;
        run.write_config(&config_toml)?;
    }
    let _lock = lock;
    let layout = setup::layout(config);
    // The layout the step sees: the global batch, or (test-only wrong variant) the share.
    let step_layout = match (dist, shard) {
        (Some(d), Some(sh)) if d.local_graph => {
            crate::method::graph::BatchLayout::new(sh.local_classes(), layout.per_class)
        }
        _ => layout,
    };
    let mut trainer = Trainer::new(
        setup::step_config(config),
        setup::weight_decays(config),
        step_layout,
    );
    let mut progress = Progress::default();
    if opts.resume {
        // The newest checkpoint that reads and loads: `last`, or the one it replaced.
        let restore = |path: &std::path::Path, trainer: &mut Trainer| {
            let (dict, meta) = checkpoint::read(path)?;
            let m =
                checkpoint::load_model(model.clone(), &dict, &ad).map_err(|e| e.in_file(path))?;
            checkpoint::load_optimisers(trainer, &m, &dict, &ad).map_err(|e| e.in_file(path))?;
            let p = meta
                .progress
                .ok_or_else(|| checkpoint::CheckpointError::NoProgress { path: path.into() })?;
            Ok::<_, checkpoint::CheckpointError>((m, p))
        };
        let last = run.last();
        let previous = checkpoint::previous_path(&last);
        let (m, p, from) = match restore(&last, &mut trainer) {
            Ok((m, p)) => (m, p, last),
            Err(e) if previous.exists() => {
                observer.note(&format!(
                    "{} cannot be resumed from ({}); using {}",
                    last.display(),
                    crate::error::chain(&e),
                    previous.display()
                ));
                let (m, p) = restore(&previous, &mut trainer)?;
                (m, p, previous)
            }
            Err(e) => return Err(e.into()),
        };
        model = m;
        progress = p;
        observer.note(&format!(
            "resuming {} at epoch {} step {} from {}",
            run.root().display(),
            progress.epoch + 1,
            progress.step,
            from.file_name().unwrap_or_default().to_string_lossy()
        ));
    }

    let mut slack = opts
        .adamw_slack
        .as_ref()
        .map(|_| SlackTrace::new(&model, &mut trainer));
    if let Some(d) = dist {
        // Same seed, same weights, same checkpoint: the ranks start identical, or stop here.
        check_identical(d.collective.as_ref(), &model, progress.epoch, progress.step)?;
    }

    let train_split = &data.train;
    let mut sampler = BalancedSampler::new(
        &train_split.labels(),
        SamplerConfig {
            classes_per_batch: layout.classes,
            per_class: layout.per_class,
            seed,
            short_class: ShortClass::Resample,
        },
        |l| {
            train_split.classes[l]
                .name
                .clone()
                .unwrap_or_else(|| train_split.classes[l].original_id.clone())
        },
    )?;
    // The sampler's state carries over between epochs: replay the finished ones.
    for _ in 0..progress.epoch {
        sampler.epoch();
    }
    let samples = Arc::new(train_split.samples.clone());
    let evaluator = Evaluator::new(
        config,
        store.clone(),
        data.ks.clone(),
        &device,
        config.train.skip_bad_images,
    );
    let meta = |progress: Option<Progress>| CheckpointMeta {
        config_toml: config_toml.clone(),
        num_classes,
        progress,
    };
    let epochs = config.train.epochs;
    let (c, p) = (layout.classes, layout.per_class);
    let started = Instant::now() - std::time::Duration::from_secs_f64(progress.elapsed_s);

    if root && opts.evaluate_untrained && progress.records.is_empty() && progress.epoch == 0 {
        let t = Instant::now();
        let mut skipped_images = Vec::new();
        let (validation, test) = evaluate_run(
            &evaluator,
            &data,
            &model,
            None,
            observer,
            &mut skipped_images,
        )?;
        let record = EpochRecord {
            epoch: 0,
            losses: BTreeMap::new(),
            lr: None,
            backbone_trained: false,
            steps: 0,
            train_seconds: 0.0,
            images_per_second: 0.0,
            skipped_batches: 0,
            skipped_images,
            validation,
            test: Some(test),
            eval_seconds: t.elapsed().as_secs_f64(),
        };
        observer.epoch_done(&record);
        progress.records.push(record);
        run.write_records(&progress.records)?;
    }

    while progress.epoch < epochs {
        let epoch = progress.epoch;
        let mut plan: Vec<Vec<usize>> = sampler
            .epoch()
            .into_iter()
            .map(|b| view_major(&b, c, p))
            .collect();
        if let Some(cap) = config.train.max_steps_per_epoch {
            plan.truncate(cap);
        }
        // A data-parallel rank loads only its rows of every global batch, each with the
        // random crop it gets in the whole batch; the losses need every row's label.
        let global_labels: Vec<Vec<usize>> = plan
            .iter()
            .map(|b| b.iter().map(|&i| samples[i].label).collect())
            .collect();
        let mut positions = None;
        if let Some(sh) = shard {
            let rows = sh.rows();
            positions = Some(
                (0..plan.len())
                    .map(|b| rows.iter().map(|&r| (b * c * p + r) as u64).collect())
                    .collect(),
            );
            for batch in &mut plan {
                *batch = rows.iter().map(|&r| batch[r]).collect();
            }
        }
        let rows_here = plan.first().map_or(c * p, Vec::len);
        let steps = plan.len();
        if steps == 0 {
            return Err(crate::data::DataError::from(BatchError::TooFewImages {
                have: samples.len(),
                classes: c,
                per_class: p,
            })
            .into());
        }
        let lr = config.learning_rates(epoch);
        progress.lr = Some(lr);
        let train_backbone = epoch >= config.optim.warm_up_epochs;
        let history = progress.history.unwrap_or_default();
        observer.epoch_started(epoch + 1, epochs, steps, progress.step);
        let crop = RandomResizedCropConfig {
            scale: (config.data.crop_scale[0], config.data.crop_scale[1]),
            ratio: (config.data.crop_ratio[0], config.data.crop_ratio[1]),
            ..RandomResizedCropConfig::new(config.data.image_size as u32)
        };
        let mut loader = Loader::spawn_at(
            samples.clone(),
            store.clone(),
            plan,
            positions,
            Transform::Train { crop, flip_p: 0.5 },
            epoch as u64,
            LoaderConfig {
                threads: config.data.workers.max(1),
                prefetch: 2,
                seed,
                normalisation: setup::normalisation(config.model.backbone),
                skip_bad_images: config.train.skip_bad_images,
                skip_batches: progress.step,
            },
        )?;
        let epoch_start = Instant::now();
        let mut trained_steps = 0usize;
        let mut skipped_batches = 0usize;
        let mut skipped_images = Vec::new();
        let precision = trainer.config.precision;
        let mut ahead: Option<Ahead> = None;
        while let Some(host) = loader.next() {
            let host = host?;
            let step = progress.step;
            progress.step += 1;
            // The ranks agree on whether the batch is whole (an unreadable image anywhere
            // drops it everywhere, as it drops the whole batch on one device) and on
            // stopping; one small all-reduce.
            let mut missing = rows_here - host.rows();
            if let Some(d) = dist {
                let mut flags = [missing as u64, u64::from(opts.stop.load(Ordering::SeqCst))];
                d.collective.all_reduce_max("step agreement", &mut flags)?;
                missing = flags[0] as usize;
                if flags[1] != 0 {
                    opts.stop.store(true, Ordering::SeqCst);
                }
            }
            // Features computed ahead belong to this batch, unless it is left out: then their
            // forward must leave no trace in BatchNorm's running statistics.
            let mut features = None;
            if let Some(a) = ahead.take() {
                if missing == 0 && a.index == host.index {
                    features = Some(a.features);
                } else {
                    model.embedder.backbone = a.before.restore(model.embedder.backbone);
                }
            }
            if missing > 0 {
                skipped_batches += 1;
                observer.note(&format!(
                    "epoch {} step {}: batch left out ({} unreadable images{})",
                    epoch + 1,
                    step + 1,
                    host.skipped.len(),
                    if dist.is_some() { " on this rank" } else { "" }
                ));
                for (_, e) in &host.skipped {
                    let line = format!("train: {} (left out)", crate::error::chain(e));
                    observer.note(&line);
                    skipped_images.push(line);
                }
            } else {
                ad.seed(sample_seed(
                    seed ^ DROPOUT_STREAM,
                    epoch as u64,
                    step as u64,
                ));
                let mut mix =
                    SeededMix::new(sample_seed(seed ^ MIX_STREAM, epoch as u64, step as u64));
                let local_graph = dist.is_some_and(|d| d.local_graph);
                let mut batch = Batch {
                    images: images_tensor(&host, &ad),
                    labels: if dist.is_some() && !local_graph {
                        global_labels[step].clone()
                    } else {
                        host.labels.clone()
                    },
                    features,
                };
                // Warm-up: the next batch's frozen backbone forward runs beside this step, on
                // the cores the head step's serial parts leave idle. Only a batch already
                // loaded and whole is started; the step's numbers do not change.
                let next = match (train_backbone, opts.stop.load(Ordering::SeqCst)) {
                    (false, false) => match loader.peek_ready() {
                        Some(Ok(next)) if next.skipped.is_empty() && next.rows() == rows_here => {
                            Some((next.index, images_tensor(next, &ad)))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                if next.is_some() && batch.features.is_none() {
                    // This batch's own forward first: the running statistics advance in batch
                    // order.
                    let backbone = model.embedder.backbone.clone();
                    let images = batch.images.clone();
                    batch.features = Some(crate::backends::on_pool(|| {
                        frozen_features(backbone, images, precision)
                    }));
                }
                let inputs = StepInputs {
                    lr,
                    history,
                    train_backbone,
                };
                let traffic_before = dist.map(|d| d.collective.traffic());
                let mut computed_ahead = None;
                let stepped = rayon::in_place_scope(|scope| {
                    if let Some((index, images)) = next {
                        let backbone = model.embedder.backbone.clone();
                        let before = RunningStatistics::of(&backbone);
                        let slot = &mut computed_ahead;
                        scope.spawn(move |_| {
                            *slot = Some(Ahead {
                                index,
                                features: frozen_features(backbone, images, precision),
                                before,
                            });
                        });
                    }
                    // The step stays on this thread (MPI's collectives are called from it).
                    match (dist, shard) {
                        (Some(d), Some(sh)) => {
                            let mut exchange =
                                Exchange::new(d.collective.as_ref(), sh, local_graph);
                            trainer.step_exchanged(model, &batch, inputs, &mut mix, &mut exchange)
                        }
                        _ => Ok(trainer.step(model, &batch, inputs, &mut mix)),
                    }
                });
                ahead = computed_ahead;
                let (next, metrics) = stepped?;
                model = next;
                if let Some(slack) = &mut slack {
                    slack.record(&mut trainer);
                }
                if root && let Some(path) = &opts.step_log {
                    let traffic = dist.zip(traffic_before).map(|(d, before)| {
                        let after = d.collective.traffic();
                        [
                            after.gather_bytes - before.gather_bytes,
                            after.reduce_bytes - before.reduce_bytes,
                        ]
                    });
                    log_step(path, epoch, step, &metrics, traffic)?;
                }
                // Every loss, not only the embedder's: a non-finite J_gen moves the generator to
                // NaN on this step and everything else on the next, and its sum could not be
                // written to a checkpoint that resumes.
                if let Some((loss, value)) =
                    metrics.named().into_iter().find(|(_, v)| !v.is_finite())
                {
                    return Err(Error::Diverged {
                        loss,
                        value,
                        epoch: epoch + 1,
                        step: step + 1,
                    });
                }
                progress.sums.add(&metrics);
                trained_steps += 1;
                observer.step_done(&metrics, c * p);
                if let Some(d) = dist
                    && d.checksum_every > 0
                    && progress.step.is_multiple_of(d.checksum_every)
                {
                    check_identical(d.collective.as_ref(), &model, epoch + 1, progress.step)?;
                }
            }
            if opts.stop.load(Ordering::SeqCst) {
                if let Some(a) = ahead.take() {
                    model.embedder.backbone = a.before.restore(model.embedder.backbone);
                }
                progress.elapsed_s = started.elapsed().as_secs_f64();
                if root {
                    checkpoint::save(
                        &run.last(),
                        &model,
                        Some(&trainer),
                        &meta(Some(progress.clone())),
                    )?;
                }
                if let Some(d) = dist {
                    d.collective.wait_for_all("rank 0's checkpoint")?;
                }
                return Ok(RunOutcome::Interrupted {
                    epoch: progress.epoch,
                    step: progress.step,
                });
            }
        }
        let train_seconds = epoch_start.elapsed().as_secs_f64();

        let mut record = EpochRecord {
            epoch: epoch + 1,
            losses: progress
                .sums
                .means()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            lr: Some(lr),
            backbone_trained: train_backbone,
            steps: progress.sums.steps,
            train_seconds,
            images_per_second: (trained_steps * c * p) as f64 / train_seconds.max(1e-9),
            skipped_batches,
            skipped_images,
            validation: None,
            test: None,
            eval_seconds: 0.0,
        };
        let due = (epoch + 1) % config.train.eval_every == 0 || epoch + 1 == epochs;
        if due && root {
            let t = Instant::now();
            // The final test embeddings are kept as a gallery for the model `last` will hold.
            let keep = (epoch + 1 == epochs).then(|| {
                let model = ModelRecord {
                    fingerprint: checkpoint::fingerprint_of(&model),
                    checkpoint: run.last().display().to_string(),
                    precision: config.train.precision,
                };
                (run.test_embeddings(), model)
            });
            let (validation, test) = evaluate_run(
                &evaluator,
                &data,
                &model,
                keep.as_ref().map(|(files, model)| (files, model)),
                observer,
                &mut record.skipped_images,
            )?;
            record.validation = validation;
            record.test = Some(test);
            record.eval_seconds = t.elapsed().as_secs_f64();
        }
        progress.history = Some(progress.sums.history());
        progress.sums = Default::default();
        progress.epoch += 1;
        progress.step = 0;
        if root
            && let Some(score) = selection_score(config.train.select_on, &record)
            && progress.best.as_ref().is_none_or(|b| score > b.score)
        {
            progress.best = Some(Best {
                epoch: epoch + 1,
                score,
            });
            checkpoint::save(&run.best(), &model, None, &meta(None))?;
        }
        observer.epoch_done(&record);
        progress.records.push(record);
        progress.elapsed_s = started.elapsed().as_secs_f64();
        if root {
            run.write_records(&progress.records)?;
            checkpoint::save(
                &run.last(),
                &model,
                Some(&trainer),
                &meta(Some(progress.clone())),
            )?;
            if let Err(e) = plots::run_plots(&run, &progress.records) {
                observer.note(&format!(
                    "could not draw the plots: {}",
                    crate::error::chain(&e)
                ));
            }
        }
        if let Some(d) = dist {
            // The other ranks wait (without a timeout) while rank 0 evaluates and writes.
            d.collective
                .wait_for_all("rank 0's evaluation and checkpoint")?;
            check_identical(d.collective.as_ref(), &model, epoch + 1, 0)?;
        }
        if let Some(d) = dist {
            let mut stop = [u64::from(opts.stop.load(Ordering::SeqCst))];
            d.collective.all_reduce_max("stop agreement", &mut stop)?;
            if stop[0] != 0 {
                opts.stop.store(true, Ordering::SeqCst);
            }
        }
        if opts.stop.load(Ordering::SeqCst) && progress.epoch < epochs {
            return Ok(RunOutcome::Interrupted {
                epoch: progress.epoch,
                step: 0,
            });
        }
    }

    let summary = summarise(config, &progress, started, weights_source, &spec);
    if root {
        run.write_summary(&summary)?;
        if let (Some(path), Some(slack)) = (&opts.adamw_slack, &slack) {
            slack.write(path)?;
        }
    }
    Ok(RunOutcome::Finished(Box::new(summary)))
}

fn summarise(
    config: &ExperimentConfig,
    progress: &Progress,
    started: Instant,
    weights_source: String,
    spec: &DeviceSpec,
) -> RunSummary {
    let best = progress.best.clone();
    let at = |epoch: usize| {
        progress
            .records
            .iter()
            .find(|r| r.epoch == epoch)
            .and_then(|r| r.test.clone())
    };
    RunSummary {
        selected_on: config.train.select_on,
        best_epoch: best.as_ref().map_or(0, |b| b.epoch),
        best_selection_recall_at_1: best.as_ref().map_or(0.0, |b| b.score),
        test_at_best: best.as_ref().and_then(|b| at(b.epoch)),
        final_test: progress.records.last().and_then(|r| r.test.clone()),
        epochs: progress.epoch,
        seconds: started.elapsed().as_secs_f64(),
        backbone_weights: weights_source,
        device: spec.to_string(),
        skipped_images: progress
            .records
            .iter()
            .flat_map(|r| r.skipped_images.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        records: progress.records.clone(),
    }
}

/// Appends one step's losses to the JSON-lines file `path`.
/// With `traffic` (data-parallel), also the step's all-gather and all-reduce payload bytes.
fn log_step(
    path: &std::path::Path,
    epoch: usize,
    step: usize,
    metrics: &StepMetrics,
    traffic: Option<[u64; 2]>,
) -> Result<()> {
    use std::io::Write;
    let mut line = serde_json::json!({ "epoch": epoch + 1, "step": step + 1, "losses": metrics });
    if let Some([gather, reduce]) = traffic {
        line["all_gather_bytes"] = gather.into();
        line["all_reduce_bytes"] = reduce.into();
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"))
        .map_err(|source| crate::io::IoError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(())
}

/// The noise-aware parameter rule's slack ([`AdamWSlack`]) of every parameter, fed with
/// every gradient the three optimisers apply.
struct SlackTrace {
    names: std::collections::HashMap<burn::module::ParamId, crate::io::state_dict::TorchParam>,
    slack: BTreeMap<String, AdamWSlack>,
}

impl SlackTrace {
    fn new(model: &GcaHng, trainer: &mut Trainer) -> Self {
        use crate::io::state_dict::TorchNamed;
        for optim in [
            &mut trainer.optim.embedder,
            &mut trainer.optim.gnn,
            &mut trainer.optim.classifier,
        ] {
            optim.trace = Some(Vec::new());
        }
        Self {
            names: model
                .torch_param_list("")
                .into_iter()
                .map(|p| (p.id, p))
                .collect(),
            slack: BTreeMap::new(),
        }
    }

    fn record(&mut self, trainer: &mut Trainer) {
        for optim in [
            &mut trainer.optim.embedder,
            &mut trainer.optim.gnn,
            &mut trainer.optim.classifier,
        ] {
            for applied in optim.trace.iter_mut().flat_map(|t| t.drain(..)) {
                let Some(p) = self.names.get(&applied.id) else {
                    continue;
                };
                let grad = match p.layout {
                    crate::io::state_dict::Layout::LinearWeight => applied.grad.transposed(),
                    _ => applied.grad,
                };
                self.slack
                    .entry(p.name.clone())
                    .or_insert_with(|| {
                        AdamWSlack::new(grad.numel(), crate::verify::reference::GRADIENT_NOISE)
                    })
                    .step(&grad.data, applied.lr);
            }
        }
    }

    /// Writes the slack under the checkpoint's names (`model.` + PyTorch name).
    fn write(&self, path: &std::path::Path) -> Result<()> {
        let mut dict = crate::io::state_dict::StateDict::default();
        for (name, slack) in &self.slack {
            let values = slack.slack().to_vec();
            dict.insert(
                format!("model.{name}"),
                crate::io::state_dict::HostTensor::new(vec![values.len()], values),
            );
        }
        dict.write_safetensors(path)?;
        Ok(())
    }
}

/// A warm-up batch's backbone features, computed while the previous batch's step ran.
struct Ahead {
    /// The batch's position in the epoch's plan.
    index: usize,
    features: burn::tensor::Tensor<2>,
    /// BatchNorm's running statistics before that forward, put back if the batch's step never
    /// comes.
    before: RunningStatistics,
}
