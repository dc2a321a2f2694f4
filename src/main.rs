use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use gca_hng::bench::{StepBench, bench_step, median};
use gca_hng::data::bench::{DataBench, bench_data};
use gca_hng::data::loader::LoaderConfig;
use gca_hng::data::{Dataset, DatasetKind, emoji, inspect};
use gca_hng::device::DeviceSpec;
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
    /// Time parts of the method.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
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
    let device = cli.device.device().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Data { .. }
        | Command::Bench {
            what: BenchCommand::Data { .. },
        } => unreachable!("handled above"),
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
