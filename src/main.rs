use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use gca_hng::bench::{StepBench, bench_step, median};
use gca_hng::config::{ExperimentConfig, PRESETS};
use gca_hng::device::DeviceSpec;
use gca_hng::evaluation::{Embeddings, RetrievalMetrics, evaluate, evaluate_query_gallery};
use gca_hng::npy;
use gca_hng::reference::verify_reference;

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

fn run(cli: Cli) -> Result<bool> {
    let device = cli.device.open().map_err(anyhow::Error::msg)?;
    match cli.command {
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
        Command::Config {
            what: ConfigCommand::List,
        } => {
            for name in PRESETS {
                println!("{name}");
            }
            Ok(true)
        }
        Command::Config {
            what:
                ConfigCommand::Show {
                    preset,
                    config,
                    overrides,
                },
        } => {
            let base = match (&preset, &config) {
                (Some(p), _) => ExperimentConfig::preset(p)?,
                (None, Some(file)) => ExperimentConfig::from_file(file)?,
                (None, None) => anyhow::bail!("give a preset name or --config FILE"),
            };
            print!("{}", base.with_overrides(&overrides)?.to_toml());
            Ok(true)
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
            let m = median(&times);
            if json {
                println!("{{\"median_s\": {m}}}");
            } else {
                println!(
                    "bench step {classes}x{per_class} d={dim} L={layers} H={heads} on {}: median {m:.3} s over {iters} steps (min {:.3}, max {:.3})",
                    cli.device,
                    times.iter().cloned().fold(f64::INFINITY, f64::min),
                    times.iter().cloned().fold(0.0, f64::max),
                );
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
