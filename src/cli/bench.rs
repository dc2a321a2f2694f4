//! `gca-hng bench`: timings of the training step, a backbone, whole training steps and the
//! input pipeline.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use gca_hng::backbones::{BackboneKind, BatchNormMode, Pooling};
use gca_hng::bench::data::{DataBench, bench_data};
use gca_hng::bench::train::{TrainBench, bench_train};
use gca_hng::bench::{StepBench, bench_backbone, bench_step, median};
use gca_hng::config::{ConfigBase, ExperimentConfig, RunSettings, limits};
use gca_hng::data::DatasetKind;
use gca_hng::data::loader::LoaderConfig;
use gca_hng::device::DeviceSpec;
use gca_hng::nn::precision::Precision;

use crate::shared::{Outcome, open_dataset, open_device};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The HNSW index against exact search: build time, memory, queries per second and
    /// recall@1/@10 at several search widths; prints JSON. On real embeddings (`--gallery`,
    /// queries held out of the gallery) or synthetic clustered ones (`--synthetic`).
    Index(IndexBenchArgs),
    /// One full training step without the backbone (embedding head, graph, GNN twice,
    /// synthesis, all losses, three optimiser steps); prints the median.
    Step {
        #[arg(long, default_value_t = 27)]
        classes: usize,
        #[arg(long, default_value_t = 3)]
        per_class: usize,
        #[arg(long, default_value_t = 512)]
        dim: usize,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Width of the backbone features entering the embedding head.
        #[arg(long, default_value_t = 1024)]
        feature_width: usize,
        /// Number of training classes.
        #[arg(long, default_value_t = 100)]
        num_classes: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Print `{"median_s": ...}` only.
        #[arg(long)]
        json: bool,
    },
    /// Forward + backward pass of a backbone (BatchNorm on batch statistics) on random
    /// images; prints the median.
    Backbone {
        #[arg(long, default_value = "resnet50")]
        arch: BackboneKind,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 224)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// The backbone's arithmetic (f16/bf16: mixed precision, for GPUs).
        #[arg(long, default_value = "f32")]
        precision: Precision,
        /// Print `{"median_s": ...}` only.
        #[arg(long)]
        json: bool,
    },
    /// Whole training steps of a preset, as `train` runs them after the warm-up epochs:
    /// loader, backbone forward and backward, GCA-HNG step, three optimisers; prints seconds
    /// per step and images per second.
    Train {
        /// A preset (see `config list`); `demo` trains on the embedded emoji set.
        #[arg(long)]
        preset: String,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed steps before them.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// The dataset's folder (as for `train`).
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// Pretrained backbone weights (as for `train`).
        #[arg(long, conflicts_with = "synthetic")]
        weights: Option<PathBuf>,
        /// Random images and randomly initialised weights: no dataset or weights needed
        /// (the loader is left out).
        #[arg(long)]
        synthetic: bool,
        /// The backbone's arithmetic (default: the preset's, f32).
        #[arg(long)]
        precision: Option<Precision>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Training batches through the input pipeline (sampler, decode, RandomResizedCrop, flip,
    /// normalisation); prints images per second.
    Data {
        /// The dataset layout.
        #[arg(long)]
        kind: DatasetKind,
        #[arg(long)]
        root: Option<PathBuf>,
        #[arg(long, default_value_t = 27)]
        classes: usize,
        #[arg(long, default_value_t = 3)]
        per_class: usize,
        #[arg(long, default_value_t = 224)]
        size: u32,
        /// Decoding threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        batches: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        skip_bad_images: bool,
        /// Print `{"images_per_s": ...}` only.
        #[arg(long)]
        json: bool,
    },
}

/// A benchmark's sizes go through the limits of a config's (`config::limits`), so that a typo
/// is refused rather than ending in an allocation failure.
fn within(flag: &str, value: usize, min: usize, max: usize) -> Result<()> {
    anyhow::ensure!(
        (min..=max).contains(&value),
        "{flag} must be between {min} and {max} (it is {value})"
    );
    Ok(())
}

/// `images` x `per_image` images of `size` pixels, as one training batch (`data.*` limits).
fn batch_within_limits(images: usize, per_image: usize, size: Option<usize>) -> Result<()> {
    let total = images.saturating_mul(per_image);
    anyhow::ensure!(
        total <= limits::BATCH_IMAGES,
        "a batch of {total} images is more than {} (lower the batch size)",
        limits::BATCH_IMAGES
    );
    if let Some(size) = size {
        within("--size", size, 16, limits::IMAGE_SIZE)?;
        anyhow::ensure!(
            total as u64 * (size as u64).pow(2) * 3 * 4 <= limits::BATCH_BYTES,
            "a batch of {total} images of {size} px is larger than 16 GiB (lower --size or the batch size)"
        );
    }
    Ok(())
}

/// Prints the median of benchmark times, or `{"median_s": ...}` with `json`.
fn report_times(what: &str, device: &DeviceSpec, times: &[f64], json: bool) {
    let m = median(times);
    if json {
        println!("{{\"median_s\": {m}}}");
    } else {
        println!(
            "{what} on {device}: median {m:.3} s over {} runs (min {:.3}, max {:.3})",
            times.len(),
            times.iter().cloned().fold(f64::INFINITY, f64::min),
            times.iter().cloned().fold(0.0, f64::max),
        );
    }
}

#[derive(clap::Args)]
pub struct IndexBenchArgs {
    /// Embeddings to index (PREFIX.npy); `--queries` rows are held out as queries.
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    gallery: Option<PathBuf>,
    /// Rows of synthetic clustered embeddings instead (queries drawn apart).
    #[arg(long)]
    synthetic: Option<usize>,
    /// Width of the synthetic embeddings.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Clusters of the synthetic embeddings.
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Spread of a synthetic cluster relative to the centres' scale.
    #[arg(long, default_value_t = 0.35)]
    spread: f32,
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    #[arg(long, default_value_t = gca_hng::index::Quantisation::F32)]
    quantisation: gca_hng::index::Quantisation,
    #[arg(long, default_value_t = gca_hng::index::BuildOptions::default().connectivity)]
    connectivity: usize,
    #[arg(long, default_value_t = gca_hng::index::BuildOptions::default().expansion_add)]
    expansion_add: usize,
    /// Search widths (ef) to measure.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
    ef: Vec<usize>,
    /// Where the index file goes (deleted afterwards).
    #[arg(long, default_value = "bench.index")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// `bench index`: the index against exact search.
fn bench_index(a: IndexBenchArgs) -> Result<Outcome> {
    use gca_hng::bench::index::{bench_index, hold_out, synthetic_clustered};
    anyhow::ensure!(
        a.queries >= 1 && !a.ef.is_empty(),
        "--queries and --ef must not be empty"
    );
    // The file is deleted afterwards, so it must not be someone's.
    anyhow::ensure!(
        !a.out.exists(),
        "{} exists; bench index writes its index there and deletes it afterwards: choose another --out",
        a.out.display()
    );
    let (gallery, queries, dim) = match (&a.gallery, a.synthetic) {
        (Some(prefix), _) => {
            let files = crate::shared::read_gallery(prefix)?;
            let (g, q) = hold_out(&files.values, files.dim, a.queries, a.seed);
            (g, q, files.dim)
        }
        (None, Some(rows)) => {
            anyhow::ensure!(
                rows >= 1 && a.dim >= 1,
                "--synthetic and --dim must be at least 1"
            );
            within("--dim", a.dim, 1, limits::EMBEDDING_DIM)?;
            anyhow::ensure!(
                (rows as u64 + a.queries as u64) * a.dim as u64 * 4 <= limits::BATCH_BYTES,
                "--synthetic {rows} rows (and {} queries) of {} values are more than 16 GiB",
                a.queries,
                a.dim
            );
            anyhow::ensure!(
                a.clusters >= 1 && a.clusters as u64 * a.dim as u64 * 4 <= limits::BATCH_BYTES,
                "--clusters must be at least 1, and its centres ({} x {}) at most 16 GiB",
                a.clusters,
                a.dim
            );
            eprintln!("generating {rows} x {} clustered embeddings", a.dim);
            let g = synthetic_clustered(rows, a.dim, a.clusters, a.spread, a.seed, a.seed);
            let q = synthetic_clustered(a.queries, a.dim, a.clusters, a.spread, a.seed, a.seed + 1);
            (g, q, a.dim)
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let options = gca_hng::index::BuildOptions {
        quantisation: a.quantisation,
        connectivity: a.connectivity,
        expansion_add: a.expansion_add,
        ..Default::default()
    };
    let report = bench_index(
        &gallery,
        &queries,
        dim,
        &options,
        &a.ef,
        &a.out,
        &mut |stage| eprintln!("{stage}"),
    );
    let _ = std::fs::remove_file(&a.out);
    println!("{}", serde_json::to_string_pretty(&report?)?);
    Ok(Outcome::Success)
}

pub fn run(what: BenchCommand, device: Option<DeviceSpec>) -> Result<Outcome> {
    match what {
        BenchCommand::Index(args) => return bench_index(args),
        BenchCommand::Step {
            classes,
            per_class,
            dim,
            layers,
            heads,
            feature_width,
            num_classes,
            warmup,
            iters,
            json,
        } => {
            let (spec, device) = open_device(device)?;
            anyhow::ensure!(
                classes >= 2 && per_class >= 2,
                "--classes and --per-class must be at least 2"
            );
            batch_within_limits(classes, per_class, None)?;
            within("--dim", dim, 1, limits::EMBEDDING_DIM)?;
            within("--layers", layers, 1, limits::GNN_LAYERS)?;
            within("--feature-width", feature_width, 1, limits::EMBEDDING_DIM)?;
            anyhow::ensure!(
                num_classes >= 2
                    && num_classes as u64 * dim.max(feature_width) as u64 * 4
                        <= limits::BATCH_BYTES,
                "--num-classes must be at least 2, and its classifier ({num_classes} x {dim}) at most 16 GiB"
            );
            anyhow::ensure!(
                heads > 0 && dim % heads == 0,
                "--heads ({heads}) must divide --dim ({dim})"
            );
            anyhow::ensure!(iters > 0, "--iters must be at least 1");
            let cfg = StepBench {
                classes,
                per_class,
                embedding_dim: dim,
                layers,
                heads,
                feature_width,
                num_classes,
                warmup,
                iters,
            };
            let times = bench_step(&cfg, &device);
            report_times(
                &format!("bench step {classes}x{per_class} d={dim} L={layers} H={heads}"),
                &spec,
                &times,
                json,
            );
        }
        BenchCommand::Backbone {
            arch,
            batch,
            size,
            warmup,
            iters,
            precision,
            json,
        } => {
            let (spec, device) = open_device(device)?;
            spec.check_precision(&device, precision)?;
            anyhow::ensure!(
                iters > 0 && batch > 0,
                "--iters and --batch must be at least 1"
            );
            batch_within_limits(batch, 1, Some(size))?;
            let cfg = arch.config(BatchNormMode::Train, Pooling::AvgPlusMax);
            let times = bench_backbone(&cfg, batch, size, warmup, iters, precision, &device);
            report_times(
                &format!(
                    "bench backbone {arch} batch {batch} {size}px {precision} forward+backward"
                ),
                &spec,
                &times,
                json,
            );
        }
        BenchCommand::Train {
            preset,
            steps,
            warmup,
            data_root,
            weights,
            synthetic,
            precision,
            json,
        } => {
            let (spec, device) = open_device(device)?;
            anyhow::ensure!(steps > 0, "--steps must be at least 1");
            let settings = RunSettings {
                weights,
                data_root: data_root.clone(),
                out: None,
                select_on: None,
                generation: None,
                device: Some(spec),
                precision,
            };
            let config =
                ExperimentConfig::assemble(&ConfigBase::Preset(preset.clone()), &settings, &[])?;
            spec.check_precision(&device, config.train.precision)?;
            let bench = TrainBench {
                warmup,
                steps,
                synthetic,
                data_root,
            };
            let r = bench_train(&config, &bench, &device)?;
            let m = median(&r.seconds);
            let min = r.seconds.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = r.seconds.iter().cloned().fold(0.0, f64::max);
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "preset": preset,
                        "precision": config.train.precision.to_string(),
                        "device": spec.to_string(),
                        "synthetic": synthetic,
                        "steps": r.seconds.len(),
                        "images_per_step": r.images_per_step,
                        "median_s": m,
                        "min_s": min,
                        "max_s": max,
                        "images_per_s": r.images_per_second(),
                        "cores": r.cores(),
                    })
                );
            } else {
                println!(
                    "bench train {preset}{} {} on {spec}: median {m:.3} s per step of {} images over {} steps (min {min:.3}, max {max:.3}), {:.1} images/s{}",
                    if synthetic { " (synthetic)" } else { "" },
                    config.train.precision,
                    r.images_per_step,
                    r.seconds.len(),
                    r.images_per_second(),
                    r.cores()
                        .map(|c| format!(", {c:.2} cores busy"))
                        .unwrap_or_default()
                );
            }
        }
        // The input pipeline runs on the CPU whatever `--device` says.
        BenchCommand::Data {
            kind,
            root,
            classes,
            per_class,
            size,
            threads,
            warmup,
            batches,
            seed,
            skip_bad_images,
            json,
        } => {
            batch_within_limits(classes, per_class, Some(size as usize))?;
            if let Some(t) = threads {
                within("--threads", t, 1, limits::WORKERS)?;
            }
            let dataset = open_dataset(kind, root)?;
            let mut loader = LoaderConfig {
                seed,
                skip_bad_images,
                ..LoaderConfig::default()
            };
            if let Some(t) = threads {
                loader.threads = t;
            }
            let cfg = DataBench {
                classes_per_batch: classes,
                per_class,
                size,
                warmup,
                batches,
                loader,
            };
            anyhow::ensure!(batches > 0, "--batches must be at least 1");
            let r = bench_data(&dataset, &cfg)?;
            if json {
                println!("{{\"images_per_s\": {}}}", r.images_per_second());
            } else {
                println!(
                    "bench data {kind} {classes}x{per_class} at {size} px, {} threads: {:.1} images/s ({} images in {:.2} s{})",
                    loader.threads,
                    r.images_per_second(),
                    r.images,
                    r.seconds,
                    if r.skipped > 0 {
                        format!(", {} unreadable images skipped", r.skipped)
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    Ok(Outcome::Success)
}
