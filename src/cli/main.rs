mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use gca_hng::backbones::{BackboneKind, BatchNormMode, Pooling};
use gca_hng::bench::data::{DataBench, bench_data};
use gca_hng::bench::{StepBench, bench_backbone, bench_step, median};
use gca_hng::config::{ExperimentConfig, PRESETS, SelectOn};
use gca_hng::data::loader::LoaderConfig;
use gca_hng::data::sources::collect_images;
use gca_hng::data::{Dataset, DatasetKind, emoji, inspect};
use gca_hng::demo::{self, DemoOptions};
use gca_hng::device::DeviceSpec;
use gca_hng::eval::embed::{EmbedOutput, embed_samples};
use gca_hng::eval::grid::{GridRow, result_grid, save_png};
use gca_hng::eval::metrics::{Embeddings, RetrievalMetrics, evaluate, evaluate_query_gallery};
use gca_hng::eval::topk::nearest;
use gca_hng::io::embedding_files::{EmbeddingFiles, source_line};
use gca_hng::io::npy;
use gca_hng::io::state_dict::StoredDtype;
use gca_hng::io::weights::{inspect_weights, read_weights};
use gca_hng::train::evaluator::Evaluator;
use gca_hng::train::setup;
use gca_hng::train::{self, Observer, RunOptions, RunOutcome};
use gca_hng::verify::backbone::verify_backbone;
use gca_hng::verify::reference::verify_reference;
use progress::{TerminalProgress, metrics_line};

/// GCA-HNG: globally correlation-aware hard negative generation for deep metric learning.
#[derive(Parser)]
#[command(name = "gca-hng", version, about)]
struct Cli {
    /// Compute device: cpu, vulkan:N or cuda:N (default: cpu; for `train`, the config's
    /// `train.device`).
    #[arg(long, global = true)]
    device: Option<DeviceSpec>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train GCA-HNG and the baseline on the embedded emoji styles and compare them on unseen
    /// classes: the one-command demo (no downloads).
    Demo(DemoArgs),
    /// Train a model: a preset or a TOML config, with a progress bar, periodic evaluation and
    /// a run folder (config, metrics.jsonl, checkpoints, summary, plots). Ctrl-C or SIGTERM
    /// stops with a resumable checkpoint.
    Train(TrainArgs),
    /// Evaluate a trained model on its dataset's test (or validation) split: Recall@k, MAP@R,
    /// R-Precision, NMI, printed as JSON with values x100.
    Eval(EvalArgs),
    /// Embed images (files, folders) or a dataset split with a trained model: writes
    /// PREFIX.npy, PREFIX.paths.txt (and PREFIX.labels.npy for a split).
    Embed(EmbedArgs),
    /// Find the nearest gallery images of query images: ranked paths and cosine scores, and
    /// optionally a PNG grid of the results.
    Search(SearchArgs),
    /// Check this implementation against recorded outputs.
    Verify {
        #[command(subcommand)]
        what: VerifyCommand,
    },
    /// Experiment configurations: the release's presets and the demo.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
    /// Retrieval metrics of saved embeddings (`.npy`): Recall@k, MAP@R, R-Precision, NMI,
    /// printed as JSON with values x100.
    Metrics(MetricsArgs),
    /// Time parts of the method.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Read and convert weight files (PyTorch `.pth`/`.pt`, safetensors).
    Weights {
        #[command(subcommand)]
        what: WeightsCommand,
    },
    /// Look at datasets.
    Data {
        #[command(subcommand)]
        what: DataCommand,
    },
}

/// Which trained model to use.
#[derive(clap::Args)]
struct ModelArgs {
    /// A run folder (uses its best.safetensors, or last with --which last).
    #[arg(
        long,
        required_unless_present = "checkpoint",
        conflicts_with = "checkpoint"
    )]
    run: Option<PathBuf>,
    /// A checkpoint file written by `train` (it carries its configuration).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// With --run: `best` or `last`.
    #[arg(long, default_value = "best", value_parser = ["best", "last"])]
    which: String,
}

impl ModelArgs {
    fn path(&self) -> PathBuf {
        match (&self.run, &self.checkpoint) {
            (_, Some(c)) => c.clone(),
            (Some(run), None) => run.join(format!("{}.safetensors", self.which)),
            (None, None) => unreachable!("clap requires one"),
        }
    }
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Output folder: one run folder per method and seed, summary.json, learning-curves.svg,
    /// gallery.png. Started again with the same folder, an interrupted demo continues.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Smoke-sized: 32 px images, 2 steps per epoch, 2 epochs, 24 test classes.
    #[arg(long)]
    quick: bool,
    /// Seeds to run both methods with (comma-separated); two or more measure the seed spread,
    /// without which no winner is claimed.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    seeds: Vec<u64>,
    /// Epochs per run (default 3: one warm-up and two full epochs; DEMO.md's setting is 8).
    #[arg(long)]
    epochs: Option<usize>,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// A preset (see `config list`).
    #[arg(long, required_unless_present_any = ["config", "resume"], conflicts_with_all = ["config", "resume"])]
    preset: Option<String>,
    /// A TOML experiment file (see `config show`).
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Override a setting, e.g. `--set optim.lr=3e-4` (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "resume")]
    overrides: Vec<String>,
    /// The dataset's folder (sets `data.root`).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Pretrained backbone weights, `.pth` or `.safetensors` (sets `model.weights`).
    #[arg(long, conflicts_with = "resume")]
    weights: Option<PathBuf>,
    /// Run folder (sets `train.out`).
    #[arg(long, conflicts_with = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint, with its own config.toml.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Choose the best epoch on `validation` classes held out of training, or on `test` (the
    /// release's protocol) (sets `train.select_on`).
    #[arg(long, conflicts_with = "resume")]
    select_on: Option<SelectOn>,
    /// Train the plain baseline: no graph, no synthetic negatives (sets `loss.generation`).
    #[arg(long, conflicts_with = "resume")]
    no_generation: bool,
    /// Also evaluate the model before training (recorded as epoch 0).
    #[arg(long)]
    evaluate_untrained: bool,
    /// At most this many steps per epoch (smoke runs).
    #[arg(long)]
    max_steps_per_epoch: Option<usize>,
    /// Evaluate on the first N classes of the evaluation splits only (smoke runs).
    #[arg(long)]
    eval_class_limit: Option<usize>,
    /// Leave out unreadable images (a batch that loses one is skipped) instead of stopping.
    #[arg(long)]
    skip_bad_images: bool,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The dataset's folder, if it moved since training.
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// `test` or `validation` (the classes the run held out of training).
    #[arg(long, default_value = "test", value_parser = ["test", "validation"])]
    split: String,
    /// Skip NMI (k-means is the slow part on large sets).
    #[arg(long)]
    no_nmi: bool,
    #[arg(long, default_value_t = 0)]
    nmi_seed: u64,
    #[arg(long)]
    skip_bad_images: bool,
}

#[derive(clap::Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images, folders of images (searched recursively) or `emoji:CLASS:ICON`.
    #[arg(required_unless_present = "split", conflicts_with = "split")]
    images: Vec<PathBuf>,
    /// A split of the model's dataset instead: train, test, query or gallery.
    #[arg(long)]
    split: Option<String>,
    /// The dataset's folder, if it moved since training.
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Output prefix: writes PREFIX.npy, PREFIX.paths.txt (and PREFIX.labels.npy).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    skip_bad_images: bool,
}

#[derive(clap::Args)]
struct SearchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Gallery embeddings: the prefix `embed --out` wrote, or a run's `test-embeddings`.
    #[arg(long)]
    gallery: PathBuf,
    /// Query images, folders or `emoji:CLASS:ICON`.
    #[arg(required = true)]
    queries: Vec<PathBuf>,
    /// Results per query.
    #[arg(long, default_value_t = 8)]
    top: usize,
    /// Also draw the queries and their results into this PNG.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Read a dataset's annotations, check that every listed image exists, and print the
    /// number of classes and images of each split.
    Inspect {
        /// cub, cars, sop, inshop, folder or emoji.
        #[arg(long)]
        kind: DatasetKind,
        /// The dataset's folder (not needed for `emoji`).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Also decode every image (in parallel) to find unreadable ones.
        #[arg(long)]
        decode: bool,
        /// With --decode: report unreadable images instead of stopping at the first.
        #[arg(long)]
        skip_bad_images: bool,
        /// Print `{"splits": {"train": {"classes": N, "images": M}, ...}}` only.
        #[arg(long)]
        json: bool,
    },
    /// The embedded emoji dataset: draw classes in all their styles, or check that every
    /// icon renders.
    Emoji {
        /// Write a montage (one row per class, one column per icon set) to this PNG.
        #[arg(long)]
        montage: Option<PathBuf>,
        /// Classes to draw (names); default: 12 classes spread over the list, plus the
        /// fluent-emoji filter cases `umbrella` and `umbrella-with-rain-drops`.
        #[arg(long, num_args = 1..)]
        classes: Vec<String>,
        /// Pixels per icon in the montage.
        #[arg(long, default_value_t = 96)]
        cell: u32,
        /// Rasterise every icon and report failures and blank results.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// List the presets.
    List,
    /// Print the full resolved TOML of a preset or a config file, with overrides applied.
    Show {
        /// A preset name (see `config list`).
        #[arg(required_unless_present = "config", conflicts_with = "config")]
        preset: Option<String>,
        /// A TOML config file instead of a preset.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a setting, e.g. `--set optim.lr=3e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

#[derive(clap::Args)]
struct MetricsArgs {
    /// `[n, d]` embeddings (float32 or float64); every item queries all the others.
    #[arg(long, requires = "labels", conflicts_with_all = ["query_embeddings", "gallery_embeddings"])]
    embeddings: Option<PathBuf>,
    /// `[n]` integer labels of `--embeddings`.
    #[arg(long, requires = "embeddings")]
    labels: Option<PathBuf>,
    /// Query embeddings of a query/gallery protocol (In-Shop).
    #[arg(long, requires_all = ["query_labels", "gallery_embeddings", "gallery_labels"])]
    query_embeddings: Option<PathBuf>,
    #[arg(long)]
    query_labels: Option<PathBuf>,
    #[arg(long)]
    gallery_embeddings: Option<PathBuf>,
    #[arg(long)]
    gallery_labels: Option<PathBuf>,
    /// The k of Recall@k.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    ks: Vec<usize>,
    /// Seed of the k-means behind NMI.
    #[arg(long, default_value_t = 0)]
    nmi_seed: u64,
    /// Skip NMI (k-means is the slow part on large sets).
    #[arg(long)]
    no_nmi: bool,
}

#[derive(Subcommand)]
enum WeightsCommand {
    /// List every tensor: name, shape, stored dtype.
    Inspect { file: PathBuf },
    /// Convert a checkpoint (or safetensors file) to safetensors.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// f32 or f16.
        #[arg(long, default_value = "f32")]
        dtype: StoredDtype,
    },
}

#[derive(Subcommand)]
enum VerifyCommand {
    /// Replay a dump of the authors' release and compare every stage, gradient, loss and
    /// parameter it records.
    Reference {
        /// The dump (`.safetensors`).
        dump: PathBuf,
        /// Print only failures and the summary.
        #[arg(long)]
        quiet: bool,
    },
    /// Run a pretrained backbone on the inputs stored in an expected-outputs file and compare
    /// every output recorded for the architecture.
    Backbone {
        /// resnet50, googlenet, vit-s16 or efficientnet-lite0.
        #[arg(long)]
        arch: BackboneKind,
        /// Weights: PyTorch `.pth` or safetensors.
        #[arg(long)]
        weights: PathBuf,
        /// Expected outputs (`.safetensors` with `input*` tensors).
        #[arg(long)]
        expected: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
        /// Print `{"median_s": ...}` only.
        #[arg(long)]
        json: bool,
    },
    /// Training batches through the input pipeline (sampler, decode, RandomResizedCrop, flip,
    /// normalisation); prints images per second.
    Data {
        /// cub, cars, sop, inshop, folder or emoji.
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

fn read_set(embeddings: &Path, labels: &Path) -> Result<(npy::Matrix, Vec<i64>)> {
    let matrix = npy::read_matrix(embeddings)?;
    let labels_v = npy::read_labels(labels)?;
    anyhow::ensure!(
        matrix.rows == labels_v.len(),
        "{} has {} rows but {} has {} labels",
        embeddings.display(),
        matrix.rows,
        labels.display(),
        labels_v.len()
    );
    Ok((matrix, labels_v))
}

fn run_metrics(args: &MetricsArgs, device: &burn::tensor::Device) -> Result<RetrievalMetrics> {
    if let (Some(e), Some(l)) = (&args.embeddings, &args.labels) {
        let (m, labels) = read_set(e, l)?;
        let set = Embeddings {
            values: &m.values,
            labels: &labels,
            dim: m.cols,
        };
        let seed = (!args.no_nmi).then_some(args.nmi_seed);
        return evaluate(&set, &args.ks, seed, device);
    }
    match (
        &args.query_embeddings,
        &args.query_labels,
        &args.gallery_embeddings,
        &args.gallery_labels,
    ) {
        (Some(qe), Some(ql), Some(ge), Some(gl)) => {
            let (q, q_labels) = read_set(qe, ql)?;
            let (g, g_labels) = read_set(ge, gl)?;
            let queries = Embeddings {
                values: &q.values,
                labels: &q_labels,
                dim: q.cols,
            };
            let gallery = Embeddings {
                values: &g.values,
                labels: &g_labels,
                dim: g.cols,
            };
            evaluate_query_gallery(&queries, &gallery, &args.ks, device)
        }
        _ => anyhow::bail!(
            "give --embeddings and --labels, or all of --query-embeddings, --query-labels, --gallery-embeddings and --gallery-labels"
        ),
    }
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

fn run_config(what: ConfigCommand) -> Result<bool> {
    match what {
        ConfigCommand::List => {
            for name in PRESETS {
                println!("{name}");
            }
        }
        ConfigCommand::Show {
            preset,
            config,
            overrides,
        } => {
            let base = match (&preset, &config) {
                (Some(p), _) => ExperimentConfig::preset(p)?,
                (None, Some(file)) => ExperimentConfig::from_file(file)?,
                (None, None) => anyhow::bail!("give a preset name or --config FILE"),
            };
            print!("{}", base.with_overrides(&overrides)?.to_toml());
        }
    }
    Ok(true)
}

fn run(cli: Cli) -> Result<bool> {
    if let Command::Data { what } = cli.command {
        return run_data(what);
    }
    if let Command::Bench {
        what:
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
            },
    } = cli.command
    {
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
        return Ok(true);
    }
    if let Command::Config { what } = cli.command {
        return run_config(what);
    }
    let command = match cli.command {
        Command::Train(args) => return run_train(args, cli.device.as_ref()),
        Command::Demo(args) => return run_demo(args, cli.device.as_ref()),
        other => other,
    };
    let spec = cli.device.unwrap_or(DeviceSpec::Cpu);
    let device = spec.open().map_err(anyhow::Error::msg)?;
    match command {
        Command::Train(_) | Command::Demo(_) => unreachable!("handled above"),
        Command::Eval(args) => run_eval(args, &device),
        Command::Embed(args) => run_embed(args, &device),
        Command::Search(args) => run_search(args, &device),
        Command::Data { .. }
        | Command::Config { .. }
        | Command::Bench {
            what: BenchCommand::Data { .. },
        } => unreachable!("handled above"),
        Command::Verify {
            what:
                VerifyCommand::Backbone {
                    arch,
                    weights,
                    expected,
                },
        } => {
            let report = verify_backbone(arch, &weights, &expected, &device)?;
            print!("{report}");
            println!(
                "{}",
                report.summary(
                    &format!("backbone {arch} {}", weights.display()),
                    &spec.to_string()
                )
            );
            Ok(report.passed())
        }
        Command::Weights {
            what: WeightsCommand::Inspect { file },
        } => {
            let infos = inspect_weights(&file)?;
            for t in &infos {
                println!("{:<60} {:<6} {:?}", t.name, t.dtype, t.shape);
            }
            let values: usize = infos
                .iter()
                .map(|t| t.shape.iter().product::<usize>())
                .sum();
            println!(
                "{}: {} tensors, {values} values",
                file.display(),
                infos.len()
            );
            Ok(true)
        }
        Command::Weights {
            what:
                WeightsCommand::Convert {
                    input,
                    output,
                    dtype,
                },
        } => {
            let dict = read_weights(&input)?;
            dict.write_safetensors_as(&output, dtype)?;
            println!(
                "{} -> {} ({} tensors, {dtype:?})",
                input.display(),
                output.display(),
                dict.tensors.len()
            );
            Ok(true)
        }
        Command::Bench {
            what:
                BenchCommand::Backbone {
                    arch,
                    batch,
                    size,
                    warmup,
                    iters,
                    json,
                },
        } => {
            anyhow::ensure!(
                iters > 0 && batch > 0,
                "--iters and --batch must be at least 1"
            );
            let cfg = arch.config(BatchNormMode::Train, Pooling::AvgPlusMax);
            let times = bench_backbone(&cfg, batch, size, warmup, iters, &device);
            report_times(
                &format!("bench backbone {arch} batch {batch} {size}px forward+backward"),
                &spec,
                &times,
                json,
            );
            Ok(true)
        }
        Command::Verify {
            what: VerifyCommand::Reference { dump, quiet },
        } => {
            let report = verify_reference(&dump, &device)?;
            print!("{}", report.table(quiet));
            println!(
                "{}",
                report.summary(&format!("reference {}", dump.display()), &spec.to_string())
            );
            Ok(report.passed())
        }
        Command::Metrics(args) => {
            let metrics = run_metrics(&args, &device)?;
            println!("{}", serde_json::to_string_pretty(&metrics)?);
            Ok(true)
        }
        Command::Bench {
            what:
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
                },
        } => {
            anyhow::ensure!(
                classes >= 2 && per_class >= 2,
                "--classes and --per-class must be at least 2"
            );
            anyhow::ensure!(
                heads > 0 && dim % heads == 0,
                "--heads ({heads}) must divide --dim ({dim})"
            );
            anyhow::ensure!(iters > 0, "--iters must be at least 1");
            let cfg = StepBench {
                classes,
                per_class,
                dim,
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
            Ok(true)
        }
    }
}

/// A flag that Ctrl-C or SIGTERM sets: training stops after the current step with a resumable
/// checkpoint. A second signal quits at once.
fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopping now");
            std::process::exit(130);
        }
        eprintln!(
            "\nstopping after this step and writing a resumable checkpoint (again to quit at once)"
        );
    });
    if let Err(e) = installed {
        eprintln!(
            "warning: cannot handle Ctrl-C ({e}); an interrupted run keeps its last epoch's checkpoint"
        );
    }
    stop
}

/// Exit status of a run stopped by a signal.
const INTERRUPTED: u8 = 130;

fn train_config(args: &TrainArgs, device: Option<&DeviceSpec>) -> Result<ExperimentConfig> {
    let base = match (&args.preset, &args.config) {
        (Some(p), _) => ExperimentConfig::preset(p)?,
        (None, Some(file)) => ExperimentConfig::from_file(file)?,
        (None, None) => anyhow::bail!("give --preset NAME, --config FILE or --resume RUN_DIR"),
    };
    let mut sets = Vec::new();
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    if let Some(w) = &args.weights {
        sets.push(format!("model.weights={}", quoted(w)));
    }
    if let Some(r) = &args.data_root {
        sets.push(format!("data.root={}", quoted(r)));
    }
    if let Some(o) = &args.out {
        sets.push(format!("train.out={}", quoted(o)));
    }
    if let Some(s) = args.select_on {
        sets.push(format!("train.select_on=\"{s}\""));
    }
    if args.no_generation {
        sets.push("loss.generation=false".into());
    }
    if let Some(d) = device {
        sets.push(format!("train.device=\"{d}\""));
    }
    sets.extend(args.overrides.iter().cloned());
    base.with_overrides(&sets)
}

fn run_train(args: TrainArgs, device: Option<&DeviceSpec>) -> Result<bool> {
    let (config, mut opts) = match &args.resume {
        Some(dir) => {
            let config = ExperimentConfig::from_file(&dir.join("config.toml"))?;
            if let Some(d) = device
                && d.to_string() != config.train.device
            {
                anyhow::bail!(
                    "{} was trained on {}; a run resumes on the device it started on",
                    dir.display(),
                    config.train.device
                );
            }
            let mut opts = RunOptions::new(dir);
            opts.resume = true;
            (config, opts)
        }
        None => {
            let config = train_config(&args, device)?;
            let opts = RunOptions::new(&config.train.out);
            (config, opts)
        }
    };
    opts.data_root = args.data_root.clone();
    opts.evaluate_untrained = args.evaluate_untrained;
    opts.max_steps_per_epoch = args.max_steps_per_epoch;
    opts.eval_class_limit = args.eval_class_limit;
    opts.skip_bad_images = args.skip_bad_images;
    opts.stop = stop_on_signal();
    let out = opts.out.clone();
    println!(
        "training {} on {} ({} backbone, {} base loss{}), {} epochs on {} -> {}",
        config.data.kind,
        config
            .data
            .root
            .as_deref()
            .unwrap_or("the embedded emoji set"),
        config.model.backbone,
        config.loss.base,
        if config.loss.generation {
            " + GCA-HNG"
        } else {
            ", no generation"
        },
        config.train.epochs,
        config.train.device,
        out.display()
    );
    let mut progress = TerminalProgress::new("");
    match train::train(&config, &opts, &mut progress)? {
        RunOutcome::Finished(summary) => {
            println!(
                "finished {} epochs in {:.0} s; best epoch {} (R@1 {:.2} on {})",
                summary.epochs,
                summary.seconds,
                summary.best_epoch,
                summary.best_selection_recall_at_1,
                if summary.selected_on == SelectOn::Test {
                    "the test set, the release's protocol"
                } else {
                    "validation classes held out of training"
                }
            );
            if let Some(t) = &summary.test_at_best {
                println!("test at the best epoch: {}", metrics_line(t));
            }
            if let Some(t) = &summary.final_test {
                println!("test after the last epoch: {}", metrics_line(t));
            }
            println!(
                "wrote {0}/summary.json, metrics.jsonl, best.safetensors, last.safetensors, losses.svg, recall.svg, test-embeddings.*",
                out.display()
            );
            Ok(true)
        }
        RunOutcome::Interrupted { epoch, step } => {
            println!(
                "stopped in epoch {} after step {step}; continue with: gca-hng train --resume {}",
                epoch + 1,
                out.display()
            );
            std::process::exit(INTERRUPTED.into());
        }
    }
}

fn run_demo(args: DemoArgs, device: Option<&DeviceSpec>) -> Result<bool> {
    anyhow::ensure!(!args.seeds.is_empty(), "--seeds needs at least one seed");
    let opts = DemoOptions {
        out: args.out.clone(),
        quick: args.quick,
        seeds: args.seeds.clone(),
        epochs: args.epochs,
        device: device.copied().unwrap_or(DeviceSpec::Cpu).to_string(),
        stop: stop_on_signal(),
    };
    let c = demo::demo_config(&opts, true, opts.seeds[0])?;
    println!(
        "demo: GCA-HNG vs the N-pair baseline on emoji styles (519 training classes, 519 unseen test classes), EfficientNet-Lite0 at {} px, {} epochs, seeds {:?}, on {}",
        c.data.image_size, c.train.epochs, opts.seeds, opts.device
    );
    let summary = demo::run_demo(&opts, &mut |label| Box::new(TerminalProgress::new(label)))?;
    let Some(s) = summary else {
        println!(
            "stopped; run the same command again to continue from {}",
            args.out.display()
        );
        std::process::exit(INTERRUPTED.into());
    };
    let ks: Vec<String> = s.gca_hng.mean.recall.keys().cloned().collect();
    let mut ks = ks;
    ks.sort_by_key(|k| k.parse::<usize>().unwrap_or(0));
    let header: Vec<String> = ks
        .iter()
        .map(|k| format!("{:>6}", format!("R@{k}")))
        .collect();
    println!(
        "\n{:<34}{} {:>7} {:>7}",
        format!(
            "test classes, final epoch ({} seed{})",
            s.seeds.len(),
            if s.seeds.len() > 1 { "s, mean" } else { "" }
        ),
        header.join(""),
        "MAP@R",
        "RP"
    );
    let row = |name: &str, m: &gca_hng::eval::metrics::RetrievalMetrics| {
        let cells: Vec<String> = ks
            .iter()
            .map(|k| format!("{:>6.1}", m.recall.get(k).copied().unwrap_or(f64::NAN)))
            .collect();
        println!(
            "{name:<34}{} {:>7.1} {:>7.1}",
            cells.join(""),
            m.map_at_r,
            m.r_precision
        );
    };
    if let Some(f) = &s.pretrained_features {
        row("pretrained features (1280-d)", f);
    }
    row("baseline (N-pair)", &s.baseline.mean);
    row("GCA-HNG", &s.gca_hng.mean);
    println!("\nlearning curves, test R@1 (epoch 0: untrained):");
    for (seed, curve) in &s.gca_hng.curves {
        let base = s.baseline.curves.get(seed).cloned().unwrap_or_default();
        println!("  seed {seed}: epoch   GCA-HNG   baseline   margin");
        for (e, g) in curve {
            let b = base.iter().find(|(x, _)| x == e).map(|p| p.1);
            match b {
                Some(b) => println!("          {:>5}   {g:>7.1}   {b:>8.1}   {:>+6.1}", e, g - b),
                None => println!("          {:>5}   {g:>7.1}", e),
            }
        }
    }
    println!("\n{}", s.verdict);
    println!(
        "took {:.0} s; wrote {1}/summary.json, learning-curves.svg, gallery.png and one run folder per method and seed",
        s.seconds,
        args.out.display()
    );
    Ok(true)
}

fn run_eval(args: EvalArgs, device: &burn::tensor::Device) -> Result<bool> {
    let path = args.model.path();
    let (model, config) = setup::load_checkpoint(&path, device)?;
    let data = setup::run_data(&config, args.data_root.as_deref())?;
    let set = match args.split.as_str() {
        "validation" => data.validation.clone().with_context(|| {
            format!(
                "{} was not trained with validation classes held out",
                path.display()
            )
        })?,
        _ => data.test.clone(),
    };
    let store = Arc::new(train::image_store(&config, None)?);
    let mut evaluator = Evaluator::new(
        &config,
        store,
        data.ks.clone(),
        device,
        args.skip_bad_images,
    );
    evaluator.nmi_seed = (!args.no_nmi).then_some(args.nmi_seed);
    let mut progress = TerminalProgress::new("");
    let metrics = evaluator.metrics(&model.embedder, &set, &args.split, None, &mut progress)?;
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    Ok(true)
}

/// The model's image store, able to draw embedded emoji whenever `sources` name some (a
/// model trained on files can still embed icons).
fn store_for<'a>(
    config: &ExperimentConfig,
    mut sources: impl Iterator<Item = &'a gca_hng::data::ImageSource>,
) -> Result<gca_hng::data::loader::ImageStore> {
    if sources.any(|s| matches!(s, gca_hng::data::ImageSource::Emoji { .. })) {
        Ok(gca_hng::data::loader::ImageStore::with_emoji(
            config.data.resize as u32,
            None,
        )?)
    } else {
        train::image_store(config, None)
    }
}

fn run_embed(args: EmbedArgs, device: &burn::tensor::Device) -> Result<bool> {
    let path = args.model.path();
    let (model, config) = setup::load_checkpoint(&path, device)?;
    let (samples, labelled) = match &args.split {
        Some(name) => {
            let mut c = config.clone();
            if let Some(r) = &args.data_root {
                c.data.root = Some(r.display().to_string());
            }
            let root = c.data.root.clone().map(PathBuf::from).unwrap_or_default();
            let dataset = Dataset::open(c.data.kind, &root)?;
            let split = dataset.split(name).with_context(|| {
                let names: Vec<&str> = dataset.splits.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "the {} dataset has no split `{name}` (it has {})",
                    c.data.kind,
                    names.join(", ")
                )
            })?;
            (split.samples.clone(), true)
        }
        None => {
            let sources = collect_images(&args.images)?;
            let samples = sources
                .into_iter()
                .map(|source| gca_hng::data::Sample { source, label: 0 })
                .collect();
            (samples, false)
        }
    };
    let store = store_for(&config, samples.iter().map(|s| &s.source))?;
    let settings = train::embed_settings(&config, args.skip_bad_images);
    let mut progress = TerminalProgress::new("");
    let samples = Arc::new(samples);
    let e = embed_samples(
        &model.embedder,
        EmbedOutput::Embedding,
        samples.clone(),
        Arc::new(store),
        &settings,
        device,
        &mut |d, t| progress.evaluating("images", d, t),
    )?;
    let sources: Vec<_> = e
        .samples
        .iter()
        .map(|&i| samples[i].source.clone())
        .collect();
    let labels: Vec<i64> = e.labels.iter().map(|&l| l as i64).collect();
    let files = EmbeddingFiles::new(&args.out);
    files.write(
        &e.values,
        e.dim,
        &sources,
        labelled.then_some(labels.as_slice()),
    )?;
    println!(
        "embedded {} images (d = {}) -> {}, {}{}",
        e.rows(),
        e.dim,
        files.embeddings().display(),
        files.paths().display(),
        if labelled {
            format!(", {}", files.labels().display())
        } else {
            String::new()
        }
    );
    if e.rows() < samples.len() {
        println!(
            "{} unreadable images were left out",
            samples.len() - e.rows()
        );
    }
    Ok(true)
}

fn run_search(args: SearchArgs, device: &burn::tensor::Device) -> Result<bool> {
    anyhow::ensure!(args.top > 0, "--top must be at least 1");
    let path = args.model.path();
    let (model, config) = setup::load_checkpoint(&path, device)?;
    let gallery = EmbeddingFiles::new(&args.gallery);
    let (matrix, sources) = gallery.read()?;
    let queries = collect_images(&args.queries)?;
    let store = Arc::new(store_for(&config, queries.iter().chain(&sources))?);
    let samples: Vec<_> = queries
        .iter()
        .map(|source| gca_hng::data::Sample {
            source: source.clone(),
            label: 0,
        })
        .collect();
    let e = embed_samples(
        &model.embedder,
        EmbedOutput::Embedding,
        Arc::new(samples),
        store.clone(),
        &train::embed_settings(&config, false),
        device,
        &mut |_, _| {},
    )?;
    anyhow::ensure!(
        e.dim == matrix.cols,
        "the model embeds into {} dimensions but {} has {}",
        e.dim,
        gallery.embeddings().display(),
        matrix.cols
    );
    let hits = nearest(&e.values, &matrix.values, e.dim, args.top);
    if args.json {
        let out: Vec<serde_json::Value> = queries
            .iter()
            .zip(&hits)
            .map(|(q, h)| {
                serde_json::json!({
                    "query": source_line(q),
                    "results": h.iter().map(|&(i, score)| serde_json::json!({"path": source_line(&sources[i]), "score": score})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (q, h) in queries.iter().zip(&hits) {
            println!("{}", source_line(q));
            for (rank, &(i, score)) in h.iter().enumerate() {
                println!(
                    "  {:>3}. {score:.4}  {}",
                    rank + 1,
                    source_line(&sources[i])
                );
            }
        }
    }
    if let Some(grid) = &args.grid {
        let rows: Vec<GridRow> = queries
            .iter()
            .zip(&hits)
            .map(|(q, h)| GridRow {
                query: q.clone(),
                results: h.iter().map(|&(i, _)| (sources[i].clone(), None)).collect(),
            })
            .collect();
        save_png(&result_grid(&store, &rows, 96)?, grid)?;
        if !args.json {
            println!("wrote {}", grid.display());
        }
    }
    Ok(true)
}

fn open_dataset(kind: DatasetKind, root: Option<PathBuf>) -> Result<Dataset> {
    let root = match (kind, root) {
        (_, Some(r)) => r,
        (DatasetKind::Emoji, None) => PathBuf::new(),
        (_, None) => anyhow::bail!("--root is required for --kind {kind}"),
    };
    Ok(Dataset::open(kind, &root)?)
}

fn run_data(what: DataCommand) -> Result<bool> {
    match what {
        DataCommand::Inspect {
            kind,
            root,
            decode,
            skip_bad_images,
            json,
        } => {
            let dataset = open_dataset(kind, root)?;
            let counts = inspect::inspect(&dataset)?;
            let mut bad = Vec::new();
            if decode {
                bad = inspect::decode_all(&dataset, skip_bad_images)?;
            }
            if json {
                println!("{}", inspect::counts_json(&counts));
            } else {
                for c in &counts {
                    println!(
                        "{:<8} {:>7} classes {:>9} images",
                        c.name, c.classes, c.images
                    );
                }
            }
            if !bad.is_empty() {
                eprintln!("{} unreadable images skipped:", bad.len());
                for e in &bad {
                    eprintln!("  {e}");
                }
            }
            Ok(true)
        }
        DataCommand::Emoji {
            montage,
            classes,
            cell,
            check,
        } => {
            let asset = emoji::EmojiAsset::embedded()?;
            let splits = emoji::splits(asset);
            for s in &splits {
                println!(
                    "{:<6} {:>5} classes {:>6} images",
                    s.name,
                    s.classes.len(),
                    s.samples.len()
                );
            }
            if check {
                let r = emoji::check_all(asset, 64);
                println!(
                    "rendered {} of {} icons at 64 px; {} failed, {} blank",
                    r.rendered,
                    asset.image_count(),
                    r.failed.len(),
                    r.blank.len()
                );
                for (c, s, e) in &r.failed {
                    println!("  failed: {c} ({s}): {e}");
                }
                for (c, s) in &r.blank {
                    println!("  blank: {c} ({s})");
                }
            }
            if let Some(path) = montage {
                let chosen: Vec<usize> = if classes.is_empty() {
                    let k = asset.classes.len();
                    let mut v: Vec<usize> = (0..12).map(|i| i * k / 12).collect();
                    v.extend(
                        ["umbrella", "umbrella-with-rain-drops"]
                            .iter()
                            .filter_map(|n| asset.class_index(n)),
                    );
                    v
                } else {
                    classes
                        .iter()
                        .map(|n| {
                            asset
                                .class_index(n)
                                .ok_or_else(|| anyhow::anyhow!("no emoji class `{n}`"))
                        })
                        .collect::<Result<_>>()?
                };
                let img = emoji::montage(asset, &chosen, cell)?;
                img.save(&path)
                    .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
                let sets: Vec<&str> = asset.sets.iter().map(|s| s.id.as_str()).collect();
                println!("wrote {} (columns: {})", path.display(), sets.join(", "));
                for (r, c) in chosen.iter().enumerate() {
                    println!("  row {r}: {}", asset.classes[*c].name);
                }
            }
            Ok(true)
        }
    }
}

/// `mi_option_purge_delay` in the pinned mimalloc (index 15 in both the v2 and v3 headers of
/// libmimalloc-sys 0.1.49); the crate does not export it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse instead of returning it to the OS after 10 ms: with tensors
/// of tens of megabytes freed and reallocated within a step, purging cost a tenth of a CPU
/// step in page faults and zeroing. Only a value equal to the option's default (10 ms in
/// mimalloc v2, 1000 ms in v3) is changed, so a user's `MIMALLOC_PURGE_DELAY` wins and a
/// different mimalloc build leaves the setting alone rather than changing another option.
fn keep_freed_memory() {
    // SAFETY: plain option get/set on mimalloc's global option table.
    unsafe {
        let current = libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY);
        if current == 10 || current == 1000 {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

/// Lets a closed pipe end the program quietly, as it ends other command-line tools
/// (`gca-hng config show demo | head`); Rust's default turns it into a panic in `println!`.
fn quit_on_closed_pipe() {
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    quit_on_closed_pipe();
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

// Tensors of tens of megabytes are allocated and freed many times per training step. glibc
// hands such sizes back to the OS on every free, so each step paid for fresh zeroed pages
// (about a tenth of a CPU step); mimalloc keeps them for reuse (see `keep_freed_memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
