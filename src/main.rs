use std::path::PathBuf;
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
use gca_hng::device::DeviceSpec;
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
}

fn run(cli: Cli) -> Result<bool> {
    let device = cli.device.device().map_err(anyhow::Error::msg)?;
    match cli.command {
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
            let m = median(&times);
            if json {
                println!("{{\"median_s\": {m}}}");
            } else {
                println!(
                    "bench backbone {arch} batch {batch} {size}px forward+backward on {}: median {m:.3} s over {iters} (min {:.3}, max {:.3})",
                    cli.device,
                    times.iter().cloned().fold(f64::INFINITY, f64::min),
                    times.iter().cloned().fold(0.0, f64::max),
                );
            }
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
