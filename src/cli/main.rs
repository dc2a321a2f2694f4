//! The `gca-hng` command line: one module per command, each with its arguments and a `run`
//! that returns how it ended; only `main` turns that into an exit status.

mod bench;
mod config;
mod data;
mod demo;
mod embed;
mod eval;
mod index;
mod metrics;
mod progress;
mod search;
mod serve;
mod shared;
mod train;
mod verify;
mod weights;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use gca_hng::device::DeviceSpec;

use shared::Outcome;

/// GCA-HNG: globally correlation-aware hard negative generation for deep metric learning.
#[derive(Parser)]
#[command(name = "gca-hng", version, about)]
struct Cli {
    /// Compute device (default: cpu; for `train`, the config's `train.device`): cpu (Flex),
    /// vulkan:N or wgpu:N (the N-th discrete GPU), vulkan:cpu or wgpu:cpu (a CPU adapter
    /// such as llvmpipe), cuda:N. GPU devices need the binary built with
    /// `--features vulkan`, `wgpu` or `cuda`.
    #[arg(long, global = true)]
    device: Option<DeviceSpec>,
    /// Keep IEEE subnormal floats on the CPU. By default the CPU threads flush them to zero
    /// (values below 1.2e-38), which keeps rare tiny gradients from slowing matrix products
    /// many times over and changes no result that matters.
    #[arg(long, global = true)]
    keep_subnormals: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train GCA-HNG and the baseline on the embedded emoji styles and compare them on unseen
    /// classes: the one-command demo (no downloads).
    Demo(demo::DemoArgs),
    /// Train a model: a preset or a TOML config, with a progress bar, periodic evaluation and
    /// a run folder (config, metrics.jsonl, checkpoints, summary, plots). Ctrl-C or SIGTERM
    /// stops with a resumable checkpoint.
    Train(train::TrainArgs),
    /// Evaluate a trained model on its dataset's test (or validation) split: Recall@k, MAP@R,
    /// R-Precision, NMI, printed as JSON with values x100.
    Eval(eval::EvalArgs),
    /// Embed images (files, folders) or a dataset split with a trained model: writes
    /// PREFIX.npy, PREFIX.paths.txt (and PREFIX.labels.npy for a split).
    Embed(embed::EmbedArgs),
    /// Find the nearest gallery images of query images: ranked paths and cosine scores, and
    /// optionally a PNG grid of the results.
    Search(search::SearchArgs),
    /// Approximate nearest-neighbour index files for large galleries.
    Index {
        #[command(subcommand)]
        what: index::IndexCommand,
    },
    /// Serve a trained model and a gallery over HTTP: a page to try it, /embed, /search,
    /// thumbnails, /health and /metrics. Binds to loopback unless told otherwise.
    Serve(serve::ServeArgs),
    /// Check this implementation against recorded outputs.
    Verify {
        #[command(subcommand)]
        what: verify::VerifyCommand,
    },
    /// Experiment configurations: the release's presets and the demo.
    Config {
        #[command(subcommand)]
        what: config::ConfigCommand,
    },
    /// Retrieval metrics of saved embeddings (`.npy`): Recall@k, MAP@R, R-Precision, NMI,
    /// printed as JSON with values x100.
    Metrics(metrics::MetricsArgs),
    /// Time parts of the method.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Read and convert weight files (PyTorch `.pth`/`.pt`, safetensors).
    Weights {
        #[command(subcommand)]
        what: weights::WeightsCommand,
    },
    /// Look at datasets.
    Data {
        #[command(subcommand)]
        what: data::DataCommand,
    },
}

fn run(cli: Cli) -> Result<Outcome> {
    let device = cli.device;
    let flush = !cli.keep_subnormals;
    // `train --distributed` sizes rayon's pool to its share of the cores first, and flushes
    // after that.
    if flush && !matches!(&cli.command, Command::Train(args) if args.distributed) {
        gca_hng::backends::flush_subnormals_on_cpu_threads();
    }
    match cli.command {
        Command::Demo(args) => demo::run(args, device),
        Command::Train(args) => train::run(args, device, flush),
        Command::Eval(args) => eval::run(args, device),
        Command::Embed(args) => embed::run(args, device),
        Command::Search(args) => search::run(args, device),
        Command::Index { what } => index::run(what),
        Command::Serve(args) => serve::run(args, device),
        Command::Verify { what } => verify::run(what, device),
        Command::Config { what } => config::run(what),
        Command::Metrics(args) => metrics::run(args, device),
        Command::Bench { what } => bench::run(what, device),
        Command::Weights { what } => weights::run(what),
        Command::Data { what } => data::run(what),
    }
}

/// `mi_option_purge_delay` in the pinned mimalloc (index 15 in both the v2 and v3 headers of
/// libmimalloc-sys 0.1.49); the crate does not export it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse instead of returning it to the OS after 10 ms: tensors of tens
/// of megabytes are freed and reallocated within every step, and purging them made each step
/// pay again for page faults and zeroing (BENCHMARKS.md). Only a value equal to the option's
/// default (10 ms in mimalloc v2, 1000 ms in v3) is changed, so a user's
/// `MIMALLOC_PURGE_DELAY` wins and a different mimalloc build leaves the setting alone rather
/// than changing another option.
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
    match run(Cli::parse()) {
        Ok(outcome) => outcome.into(),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

// Tensors of tens of megabytes are allocated and freed many times per training step. glibc
// hands such sizes back to the OS on every free, so each step paid for fresh zeroed pages
// (BENCHMARKS.md); mimalloc keeps them for reuse (see `keep_freed_memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
