//! What a training run is given besides its configuration, what it reports while it runs, and
//! what it gives back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use crate::config::SelectOn;
use crate::eval::metrics::RetrievalMetrics;
use crate::train::step::{LearningRates, StepMetrics};

/// How a run is carried out (as opposed to what it trains, which is the configuration).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run folder.
    pub out: PathBuf,
    /// Continue the run in `out` from its `last` checkpoint.
    pub resume: bool,
    /// Overrides `data.root`.
    pub data_root: Option<PathBuf>,
    /// Set (by a signal handler) to stop after the current step with a resumable checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Cap on steps per epoch (smoke runs).
    pub max_steps_per_epoch: Option<usize>,
    /// Also evaluate the model before training (recorded as epoch 0).
    pub evaluate_untrained: bool,
    /// Leave out unreadable images (a batch that loses rows is skipped).
    pub skip_bad_images: bool,
    /// Where rasterised emoji are cached between runs.
    pub emoji_cache: Option<PathBuf>,
    /// Evaluate on the first N classes of each evaluation split only (smoke runs).
    pub eval_class_limit: Option<usize>,
    /// Train as one of several data-parallel processes (`None`: alone).
    pub distributed: Option<crate::distributed::Distributed>,
    /// Called with every step's losses (rank 0 of a data-parallel run: the global batch's).
    pub step_log: Option<std::path::PathBuf>,
    /// Test only: writes, at the end of the run, how far the noise-aware parameter rule
    /// ([`crate::verify::compare::AdamWSlack`]) lets each parameter element of this run
    /// differ from another device's or process count's, as a safetensors file keyed like the
    /// checkpoint's model tensors. Keeps a copy of every applied gradient while it trains.
    pub adamw_slack: Option<std::path::PathBuf>,
}

impl RunOptions {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            resume: false,
            data_root: None,
            stop: Arc::new(AtomicBool::new(false)),
            max_steps_per_epoch: None,
            evaluate_untrained: false,
            skip_bad_images: false,
            emoji_cache: None,
            eval_class_limit: None,
            distributed: None,
            step_log: None,
            adamw_slack: None,
        }
    }
}

/// What happened in one epoch (epoch 0: the untrained model).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epochs trained when this was recorded.
    pub epoch: usize,
    /// Mean of every step loss over the epoch.
    pub losses: BTreeMap<String, f64>,
    pub lr: Option<LearningRates>,
    /// Whether the backbone trained (false during warm-up).
    pub backbone_trained: bool,
    pub steps: usize,
    pub train_seconds: f64,
    pub images_per_second: f64,
    /// Batches left out because unreadable images were skipped.
    pub skipped_batches: usize,
    /// Every image left out this epoch (training and evaluation), one line each: the phase,
    /// the file and why.
    #[serde(default)]
    pub skipped_images: Vec<String>,
    pub validation: Option<RetrievalMetrics>,
    pub test: Option<RetrievalMetrics>,
    pub eval_seconds: f64,
}

/// Callbacks for a progress display.
pub trait Observer {
    fn epoch_started(&mut self, _epoch: usize, _epochs: usize, _steps: usize, _done: usize) {}
    fn step_done(&mut self, _metrics: &StepMetrics, _images: usize) {}
    fn epoch_done(&mut self, _record: &EpochRecord) {}
    fn evaluating(&mut self, _split: &str, _done: usize, _total: usize) {}
    fn note(&mut self, _message: &str) {}
}

/// An observer that shows nothing.
pub struct Silent;
impl Observer for Silent {}

/// The result of a finished run, as `summary.json` records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// Where the best epoch was chosen: `validation` (classes held out of training) or `test`
    /// (the release's protocol, optimistic).
    pub selected_on: SelectOn,
    pub best_epoch: usize,
    /// Recall@1 on the selection split at the best epoch.
    pub best_selection_recall_at_1: f64,
    /// Test metrics of the selected model.
    pub test_at_best: Option<RetrievalMetrics>,
    /// Test metrics after the last epoch.
    pub final_test: Option<RetrievalMetrics>,
    pub epochs: usize,
    pub seconds: f64,
    pub backbone_weights: String,
    pub device: String,
    /// Every image the run left out as unreadable (`train.skip_bad_images`), each once.
    #[serde(default)]
    pub skipped_images: Vec<String>,
    pub records: Vec<EpochRecord>,
}

pub enum RunOutcome {
    Finished(Box<RunSummary>),
    /// Stopped on request; `last` holds the state to resume from.
    Interrupted {
        epoch: usize,
        step: usize,
    },
}
