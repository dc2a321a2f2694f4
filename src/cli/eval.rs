//! `gca-hng eval`: a trained model's retrieval metrics on its dataset.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

use gca_hng::device::DeviceSpec;
use gca_hng::train::evaluator::Evaluator;
use gca_hng::train::{self, setup};

use crate::progress::TerminalProgress;
use crate::shared::{ModelArgs, Outcome, check_run_precision, open_device};

#[derive(clap::Args)]
pub struct EvalArgs {
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
    /// Evaluate on the first N classes of the split only (smoke checks).
    #[arg(long, value_name = "N")]
    class_limit: Option<std::num::NonZeroUsize>,
}

pub fn run(args: EvalArgs, device: Option<DeviceSpec>) -> Result<Outcome> {
    let (spec, device) = open_device(device)?;
    let path = args.model.path();
    let setup::LoadedCheckpoint { model, config, .. } = setup::load_checkpoint(&path, &device)?;
    check_run_precision(&spec, &device, &path, &config, "eval")?;
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
    let set = match args.class_limit {
        Some(n) => set.limited(n.get()),
        None => set,
    };
    let store = Arc::new(train::image_store(&config, None)?);
    let mut evaluator = Evaluator::new(
        &config,
        store,
        data.ks.clone(),
        &device,
        args.skip_bad_images,
    );
    evaluator.nmi_seed = (!args.no_nmi).then_some(args.nmi_seed);
    let mut progress = TerminalProgress::new("");
    let metrics = evaluator.metrics(&model.embedder, &set, &args.split, None, &mut progress)?;
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    Ok(Outcome::Success)
}
