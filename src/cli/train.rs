//! `gca-hng train`: one training run, with a progress bar and a run folder.

use std::path::PathBuf;

use anyhow::Result;

use gca_hng::config::{ConfigBase, ExperimentConfig, RunSettings, SelectOn};
use gca_hng::device::DeviceSpec;
use gca_hng::nn::precision::Precision;
use gca_hng::train::{self, RunOptions, RunOutcome};

use crate::progress::{TerminalProgress, metrics_line};
use crate::shared::{Outcome, stop_on_signal};

#[derive(clap::Args)]
pub struct TrainArgs {
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
    /// The backbone's arithmetic: f32, or f16/bf16 mixed precision for GPUs (f32 master
    /// weights, optimiser state, head and losses; f16 with dynamic loss scaling) (sets
    /// `train.precision`).
    #[arg(long, conflicts_with = "resume")]
    precision: Option<Precision>,
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

/// The configuration of a new run: the preset or file, the typed flags, then `--set`.
fn new_config(args: &TrainArgs, device: Option<DeviceSpec>) -> Result<ExperimentConfig> {
    let base = match (&args.preset, &args.config) {
        (Some(p), _) => ConfigBase::Preset(p.clone()),
        (None, Some(file)) => ConfigBase::File(file.clone()),
        (None, None) => anyhow::bail!("give --preset NAME, --config FILE or --resume RUN_DIR"),
    };
    let settings = RunSettings {
        weights: args.weights.clone(),
        data_root: args.data_root.clone(),
        out: args.out.clone(),
        select_on: args.select_on,
        generation: args.no_generation.then_some(false),
        device,
        precision: args.precision,
    };
    Ok(ExperimentConfig::assemble(
        &base,
        &settings,
        &args.overrides,
    )?)
}

pub fn run(args: TrainArgs, device: Option<DeviceSpec>) -> Result<Outcome> {
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
            let config = new_config(&args, device)?;
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
            Ok(Outcome::Success)
        }
        RunOutcome::Interrupted { epoch, step } => {
            println!(
                "stopped in epoch {} after step {step}; continue with: gca-hng train --resume {}",
                epoch + 1,
                out.display()
            );
            Ok(Outcome::Interrupted)
        }
    }
}
