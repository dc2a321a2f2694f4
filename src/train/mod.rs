//! Training: the three-optimiser GCA-HNG step, the run loop around it (epochs, schedules,
//! evaluation, model selection), run checkpoints, the run folder and its plots.

pub mod checkpoint;
pub mod evaluator;
pub mod outcome;
pub mod plots;
pub mod run;
pub mod run_dir;
pub mod setup;
pub mod step;

pub use outcome::{EpochRecord, Observer, RunOptions, RunOutcome, RunSummary, Silent};
pub use run::{embed_settings, image_store, image_store_for, train};
