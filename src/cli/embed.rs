//! `gca-hng embed`: embeddings of images or of a dataset split, written as `.npy` files.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use gca_hng::data::sources::{collect_images, collect_images_following, unlabelled_samples};
use gca_hng::device::DeviceSpec;
use gca_hng::eval::embed::{EmbedOutput, embed_samples};
use gca_hng::io::embedding_files::{EmbeddingFiles, ModelRecord};
use gca_hng::nn::precision::Precision;
use gca_hng::train::{self, Observer, setup};

use crate::progress::TerminalProgress;
use crate::shared::{ModelArgs, Outcome, check_run_precision, open_device};

#[derive(clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images, folders of images (searched recursively) or `emoji:CLASS:ICON`.
    #[arg(required_unless_present = "split", conflicts_with = "split")]
    images: Vec<PathBuf>,
    /// A split of the model's dataset instead: train, test, query or gallery.
    #[arg(long)]
    split: Option<String>,
    /// The dataset's folder, if it moved since training.
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Output prefix: writes PREFIX.npy, PREFIX.paths.txt (and PREFIX.labels.npy).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    skip_bad_images: bool,
    /// The backbone's arithmetic: f32, or f16/bf16 on a GPU. Default: the run's
    /// `train.precision`, the one `eval`, `search` and `serve` embed in, so that these
    /// embeddings compare with theirs.
    #[arg(long)]
    precision: Option<Precision>,
    /// Follow links to folders outside the folders given (each folder is still walked once).
    #[arg(long)]
    follow_links: bool,
}

pub fn run(args: EmbedArgs, device: Option<DeviceSpec>) -> Result<Outcome> {
    let (spec, device) = open_device(device)?;
    if let Some(precision) = args.precision {
        spec.check_precision(&device, precision)?;
    }
    let path = args.model.path();
    let setup::LoadedCheckpoint {
        model,
        config,
        fingerprint,
    } = setup::load_checkpoint(&path, &device)?;
    let precision = match args.precision {
        Some(precision) => precision,
        None => {
            check_run_precision(&spec, &device, &path, &config, "embed")?;
            config.train.precision
        }
    };
    let (samples, labelled) = match &args.split {
        Some(name) => (
            setup::split_samples(&config, args.data_root.as_deref(), name)?,
            true,
        ),
        None => (
            unlabelled_samples(if args.follow_links {
                collect_images_following(&args.images)?
            } else {
                collect_images(&args.images)?
            }),
            false,
        ),
    };
    let store = train::image_store_for(&config, samples.iter().map(|s| &s.source))?;
    let mut settings = train::embed_settings(&config, args.skip_bad_images);
    settings.precision = precision;
    let mut progress = TerminalProgress::new("");
    let samples = Arc::new(samples);
    let e = embed_samples(
        &model.embedder,
        EmbedOutput::Embedding,
        samples.clone(),
        Arc::new(store),
        &settings,
        &device,
        &mut |d, t| progress.evaluating("images", d, t),
    )?;
    e.check_finite("the embeddings")?;
    let sources: Vec<_> = e
        .samples
        .iter()
        .map(|&i| samples[i].source.clone())
        .collect();
    let labels: Vec<i64> = e.labels.iter().map(|&l| l as i64).collect();
    let files = EmbeddingFiles::new(&args.out);
    files.write(
        &e.values,
        e.dim,
        &sources,
        labelled.then_some(labels.as_slice()),
        &ModelRecord {
            fingerprint,
            checkpoint: path.display().to_string(),
            precision,
        },
    )?;
    println!(
        "embedded {} images (d = {}) -> {}, {}{}",
        e.rows(),
        e.dim,
        files.embeddings().display(),
        files.paths().display(),
        if labelled {
            format!(", {}", files.labels().display())
        } else {
            String::new()
        }
    );
    if !e.skipped.is_empty() {
        println!("{} unreadable images were left out:", e.skipped.len());
        for (_, err) in &e.skipped {
            println!("  {}", gca_hng::error::chain(err));
        }
    }
    Ok(Outcome::Success)
}
