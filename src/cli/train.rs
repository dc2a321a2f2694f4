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
    /// Data-parallel training, one process per device, started by `mpirun -n K` (K must
    /// divide `data.classes_per_batch`): the correlation graph spans the global batch of all
    /// processes, as on one device. Needs a binary built with `--features distributed`.
    /// `--device vulkan:auto` gives each process the GPU of its local rank.
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: seconds a collective may wait for the other processes before this
    /// one stops with an error (a process that hangs or a network that fails).
    #[arg(long, default_value_t = 600, requires = "distributed")]
    collective_timeout: u64,
    /// With --distributed: compare parameter checksums across processes every N steps (and
    /// after every epoch); 0: after every epoch only.
    #[arg(long, default_value_t = 100, requires = "distributed")]
    checksum_every: usize,
    /// Append every step's losses to this JSON-lines file (rank 0 only).
    #[arg(long, hide = true)]
    step_log: Option<PathBuf>,
    /// Test only: write the noise-aware parameter rule's slack to this file at the end.
    #[arg(long, hide = true)]
    adamw_slack: Option<PathBuf>,
    /// Test only: the deliberately wrong data-parallel variant (each process builds its graph
    /// from its own share; gradients averaged).
    #[arg(long, hide = true, requires = "distributed")]
    local_graph_for_tests: bool,
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

/// `flush_subnormals`: whether `--distributed` flushes subnormals on its CPU threads once it
/// has sized them (`main` did it already for a run in one process).
pub fn run(args: TrainArgs, device: Option<DeviceSpec>, flush_subnormals: bool) -> Result<Outcome> {
    if !args.distributed {
        return run_here(args, device, None);
    }
    distributed(args, device, flush_subnormals)
}

#[cfg(not(feature = "distributed"))]
fn distributed(
    _args: TrainArgs,
    _device: Option<DeviceSpec>,
    _flush_subnormals: bool,
) -> Result<Outcome> {
    anyhow::bail!(
        "--distributed needs a binary built with the `distributed` feature (MPI): \
         `cargo build --release --features distributed`, then `mpirun -n K gca-hng train ... --distributed`"
    )
}

/// One process of a data-parallel run: MPI up, the run, and on an error every process of the
/// job stopped, so that none waits for ever on the one that failed.
#[cfg(feature = "distributed")]
fn distributed(
    args: TrainArgs,
    device: Option<DeviceSpec>,
    flush_subnormals: bool,
) -> Result<Outcome> {
    use gca_hng::distributed::mpi::MpiCollective;
    use gca_hng::distributed::{Collective, Distributed};
    use std::rc::Rc;

    let collective = Rc::new(MpiCollective::init(std::time::Duration::from_secs(
        args.collective_timeout,
    ))?);
    // CPU processes on one machine share its cores instead of each starting a thread per
    // core. (A pool built already, by an earlier command in this process, stays.)
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads((cores / collective.local_size()).max(1))
        .build_global();
    if flush_subnormals {
        gca_hng::backends::flush_subnormals_on_cpu_threads();
    }
    let rank = collective.rank();
    let settings = Distributed {
        collective: collective.clone() as Rc<dyn Collective>,
        checksum_every: args.checksum_every,
        local_graph: args.local_graph_for_tests,
    };
    match run_here(args, device, Some(settings)) {
        Ok(outcome) => Ok(outcome),
        Err(e) => {
            eprintln!("error: rank {rank} of {}: {e:#}", collective.size());
            collective.abort(2)
        }
    }
}

fn run_here(
    args: TrainArgs,
    device: Option<DeviceSpec>,
    distributed: Option<gca_hng::distributed::Distributed>,
) -> Result<Outcome> {
    let root = distributed
        .as_ref()
        .is_none_or(|d| d.collective.rank() == 0);
    let ranks = distributed.as_ref().map_or(1, |d| d.collective.size());
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
    opts.step_log = args.step_log.clone();
    opts.adamw_slack = args.adamw_slack.clone();
    opts.distributed = distributed;
    let out = opts.out.clone();
    if !root {
        // Only rank 0 reports; the others speak only of their own errors.
        let rank = opts.distributed.as_ref().map_or(0, |d| d.collective.rank());
        let mut observer = HangForTests {
            hang: std::env::var("GCA_HNG_TEST_HANG_RANK").is_ok_and(|r| r == rank.to_string()),
            steps: 0,
        };
        return Ok(match train::train(&config, &opts, &mut observer)? {
            RunOutcome::Finished(_) => Outcome::Success,
            RunOutcome::Interrupted { .. } => Outcome::Interrupted,
        });
    }
    if ranks > 1 {
        println!(
            "data-parallel: {ranks} processes, {} of the {} classes of each batch per process",
            config.data.classes_per_batch / ranks.max(1),
            config.data.classes_per_batch
        );
    }
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

/// The observer of a rank other than 0: silent. Test hook: with `GCA_HNG_TEST_HANG_RANK` set
/// to its rank it stops answering after two steps, as a process stuck in a driver would, so
/// that a test can show the other ranks' collective timeout.
struct HangForTests {
    hang: bool,
    steps: usize,
}

impl train::Observer for HangForTests {
    fn step_done(&mut self, _metrics: &gca_hng::train::step::StepMetrics, _images: usize) {
        self.steps += 1;
        if self.hang && self.steps >= 2 {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}
