use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use gca_hng::backbone::{
    BackboneConfig, BatchNormMode, EfficientNetLiteConfig, GoogLeNetConfig, ResNet50Config,
    VitConfig,
};
use gca_hng::backbone_check::{Arch, verify_backbone};
use gca_hng::bench::{StepBench, bench_backbone, bench_step, median};
use gca_hng::checkpoint::{inspect_weights, read_weights};
use gca_hng::config::{ExperimentConfig, PRESETS};
use gca_hng::data::bench::{DataBench, bench_data};
use gca_hng::data::loader::LoaderConfig;
use gca_hng::data::{Dataset, DatasetKind, emoji, inspect};
use gca_hng::device::DeviceSpec;
use gca_hng::evaluation::{Embeddings, RetrievalMetrics, evaluate, evaluate_query_gallery};
use gca_hng::npy;
use gca_hng::reference::verify_reference;
use gca_hng::state_dict::StoredDtype;

/// GCA-HNG: globally correlation-aware hard negative generation for deep metric learning.
#[derive(Parser)]
#[command(name = "gca-hng", version, about)]
struct Cli {
    /// Compute device: cpu, vulkan:N or cuda:N.
    #[arg(long, global = true, default_value = "cpu")]
    device: DeviceSpec,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        arch: Arch,
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
        arch: Arch,
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
    let device = cli.device.open().map_err(anyhow::Error::msg)?;
    match cli.command {
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
            println!(
                "{:<24} {:>11} {:>11} {:>10} {:>4}",
                "output", "max abs err", "rel err", "tolerance", "ok"
            );
            for row in &report.rows {
                println!(
                    "{:<24} {:>11.3e} {:>11.3e} {:>10.0e} {:>4}{}",
                    row.name,
                    row.max_abs,
                    row.relative,
                    report.tolerance,
                    if row.ok { "ok" } else { "FAIL" },
                    row.problem
                        .as_ref()
                        .map(|p| format!("  ({p})"))
                        .unwrap_or_default()
                );
            }
            let failed = report.rows.iter().filter(|r| !r.ok).count();
            println!(
                "verify backbone {arch} {}: {} compared, {failed} failed on {} -> {}",
                weights.display(),
                report.rows.len(),
                cli.device,
                if report.passed() { "PASS" } else { "FAIL" }
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
            let train = BatchNormMode::Train;
            let cfg = match arch {
                Arch::ResNet50 => {
                    BackboneConfig::ResNet50(ResNet50Config::new().with_batch_norm(train))
                }
                Arch::GoogLeNet => {
                    BackboneConfig::GoogLeNet(GoogLeNetConfig::new().with_batch_norm(train))
                }
                Arch::VitS16 => BackboneConfig::Vit(VitConfig::new()),
                Arch::EfficientNetLite0 => BackboneConfig::EfficientNetLite0(
                    EfficientNetLiteConfig::new().with_batch_norm(train),
                ),
            };
            let times = bench_backbone(&cfg, batch, size, warmup, iters, &device);
            report_times(
                &format!("bench backbone {arch} batch {batch} {size}px forward+backward"),
                &cli.device,
                &times,
                json,
            );
            Ok(true)
        }
        Command::Verify {
            what: VerifyCommand::Reference { dump, quiet },
        } => {
            let report = verify_reference(&dump, &device)?;
            println!(
                "{:<72} {:>11} {:>11} {:>16} {:>4}",
                "tensor", "max abs err", "rel err", "tolerance", "ok"
            );
            for row in &report.rows {
                if quiet && row.ok {
                    continue;
                }
                println!(
                    "{:<72} {:>11.3e} {:>11.3e} {:>16} {:>4}{}",
                    row.name,
                    row.max_abs,
                    row.relative,
                    row.tolerance,
                    if row.ok { "ok" } else { "FAIL" },
                    row.note
                        .as_ref()
                        .map(|n| format!("  ({n})"))
                        .unwrap_or_default()
                );
            }
            for name in &report.unchecked {
                println!("{name:<72} not compared: FAIL");
            }
            println!(
                "verify reference {}: {} compared, {} failed, {} not compared on {} -> {}",
                dump.display(),
                report.rows.len(),
                report.failures(),
                report.unchecked.len(),
                cli.device,
                if report.passed() { "PASS" } else { "FAIL" }
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
                &cli.device,
                &times,
                json,
            );
            Ok(true)
        }
    }
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

fn main() -> ExitCode {
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
