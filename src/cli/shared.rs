//! What several commands share: how a command ends, which trained model to use, the device,
//! a dataset named by kind and root, and stopping on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use burn::tensor::Device;

use gca_hng::config::ExperimentConfig;
use gca_hng::data::{Dataset, DatasetKind, ImageSource};
use gca_hng::device::DeviceSpec;
use gca_hng::index::{ExactGallery, Gallery, IndexFile};
use gca_hng::io::embedding_files::{EmbeddingFiles, ModelRecord};
use gca_hng::io::npy::read_labels;
use gca_hng::nn::precision::Precision;
use gca_hng::train::run_dir::RunDir;
use gca_hng::train::setup;

/// How a command that did not fail with an error ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A check ran and did not pass.
    Failed,
    /// Stopped by Ctrl-C or SIGTERM, leaving something to continue from.
    Interrupted,
}

impl From<Outcome> for ExitCode {
    fn from(outcome: Outcome) -> ExitCode {
        match outcome {
            Outcome::Success => ExitCode::SUCCESS,
            Outcome::Failed => ExitCode::FAILURE,
            // The shell's status for a program ended by SIGINT.
            Outcome::Interrupted => ExitCode::from(130),
        }
    }
}

impl Outcome {
    pub fn passed(passed: bool) -> Outcome {
        if passed {
            Outcome::Success
        } else {
            Outcome::Failed
        }
    }
}

/// The device named by `--device` (default: the CPU), opened.
pub fn open_device(spec: Option<DeviceSpec>) -> Result<(DeviceSpec, Device)> {
    let spec = spec.unwrap_or(DeviceSpec::Cpu);
    let device = spec.open()?;
    Ok((spec, device))
}

/// Refuses a run whose `train.precision` the opened device cannot compute in: `command`
/// embeds in the run's precision, so the error names the run and the setting.
pub fn check_run_precision(
    spec: &DeviceSpec,
    device: &Device,
    run: &Path,
    config: &ExperimentConfig,
    command: &str,
) -> Result<()> {
    let precision = config.train.precision;
    spec.check_precision(device, precision).with_context(|| {
        format!(
            "{} was trained with `train.precision = \"{precision}\"`, which {command} embeds in",
            run.display()
        )
    })
}

/// Which trained model to use.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A run folder (uses its best.safetensors, or last with --which last).
    #[arg(
        long,
        required_unless_present = "checkpoint",
        conflicts_with = "checkpoint"
    )]
    run: Option<PathBuf>,
    /// A checkpoint file written by `train` (it carries its configuration).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// With --run: `best` or `last`.
    #[arg(long, default_value = "best", value_parser = ["best", "last"])]
    which: String,
}

impl ModelArgs {
    pub fn path(&self) -> PathBuf {
        match (&self.run, &self.checkpoint) {
            (_, Some(c)) => c.clone(),
            (Some(run), None) => run.join(format!("{}.safetensors", self.which)),
            (None, None) => unreachable!("clap requires one"),
        }
    }

    /// Refuses a gallery that another model embedded than the one the queries are embedded
    /// with (`fingerprint`, read from [`path`](Self::path)): their scores would not compare,
    /// and nothing in the results would show it. `allow_other` lets a user pair two models
    /// trained to share one embedding space. A gallery embedded in another precision than
    /// `precision` (the queries') passes with a note on stderr: its scores differ only by
    /// rounding.
    fn check_gallery(
        &self,
        gallery_args: &GalleryArgs,
        gallery: &dyn Gallery,
        fingerprint: &str,
        precision: Precision,
        allow_other: bool,
    ) -> Result<()> {
        let Some(record) = gallery.model() else {
            return self.check_run_gallery(gallery_args);
        };
        let gallery_name = gallery_args.name();
        if record.fingerprint != fingerprint {
            let which = if self.run.is_some() && self.which == "best" {
                " (with --run, --which last takes the run's final model)"
            } else {
                ""
            };
            if !allow_other {
                anyhow::bail!(
                    "{gallery_name} was embedded by another model ({}, {}) than {} ({fingerprint}): their scores would not compare. Search it with that model{which}, embed a gallery with this one (`gca-hng embed`), or add --allow-other-model if the two were trained to share one embedding space",
                    record.checkpoint,
                    record.fingerprint,
                    self.path().display()
                );
            }
            eprintln!(
                "note: {gallery_name} was embedded by another model ({}); searching it anyway (--allow-other-model)",
                record.checkpoint
            );
        } else if record.precision != precision {
            eprintln!(
                "note: {gallery_name} was embedded in {}, the queries are embedded in {precision}: scores differ from a same-precision search by rounding",
                record.precision
            );
        }
        Ok(())
    }

    /// For galleries without a model record (written by builds before records were kept):
    /// refuses `--run RUN --which best` (the default) against RUN's own `test-embeddings` when
    /// the run's best epoch is not its last, as those embeddings come from the final
    /// evaluation, i.e. from `last.safetensors`.
    fn check_run_gallery(&self, gallery: &GalleryArgs) -> Result<()> {
        let (Some(run), Some(prefix)) = (&self.run, &gallery.gallery) else {
            return Ok(());
        };
        if self.which != "best" {
            return Ok(());
        }
        let run_dir = RunDir::new(run);
        if !same_file(
            &EmbeddingFiles::new(prefix).embeddings(),
            &run_dir.test_embeddings().embeddings(),
        ) {
            return Ok(());
        }
        let summary_path = run_dir.summary();
        let Ok(text) = gca_hng::io::regular::read_to_string(&summary_path) else {
            return Ok(());
        };
        let summary: gca_hng::train::RunSummary = serde_json::from_str(&text)
            .with_context(|| format!("cannot read {}", summary_path.display()))?;
        anyhow::ensure!(
            summary.best_epoch == summary.epochs,
            "{} holds the run's final embeddings, made by last.safetensors (epoch {}), but --which best embeds the queries with best.safetensors (epoch {}): their scores would not compare. Add --which last, or embed a gallery with the best model (`gca-hng embed --run {}`)",
            prefix.display(),
            summary.epochs,
            summary.best_epoch,
            run.display()
        );
        Ok(())
    }
}

/// The model that embeds queries and the gallery they are compared with, as `search` and
/// `serve` take them.
#[derive(clap::Args)]
pub struct RetrievalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub gallery: GalleryArgs,
    /// Use a gallery whose record names another model than the queries' (for two models
    /// trained to share one embedding space); otherwise such a gallery is refused.
    #[arg(long)]
    allow_other_model: bool,
}

impl RetrievalArgs {
    /// Loads the model on `device`, opens the gallery and checks that the two belong together
    /// ([`ModelArgs::check_gallery`]); `command` names the caller in the precision error.
    pub fn open(
        &self,
        spec: &DeviceSpec,
        device: &Device,
        command: &str,
    ) -> Result<(setup::LoadedCheckpoint, Box<dyn Gallery>)> {
        let path = self.model.path();
        let loaded = setup::load_checkpoint(&path, device)?;
        check_run_precision(spec, device, &path, &loaded.config, command)?;
        let gallery = self.gallery.open()?;
        self.model.check_gallery(
            &self.gallery,
            gallery.as_ref(),
            &loaded.fingerprint,
            loaded.config.train.precision,
            self.allow_other_model,
        )?;
        Ok((loaded, gallery))
    }
}

/// Whether two paths name one existing file (through links and relative paths alike).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The gallery a query is compared with: embeddings held in memory and scored exactly, or an
/// index file built by `index build`.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct GalleryArgs {
    /// Gallery embeddings: the prefix `embed --out` wrote, or a run's `test-embeddings`
    /// (PREFIX.npy, PREFIX.paths.txt and, when present, PREFIX.labels.npy). Exact search.
    #[arg(long)]
    gallery: Option<PathBuf>,
    /// An index file written by `gca-hng index build`.
    #[arg(long)]
    index: Option<PathBuf>,
}

impl GalleryArgs {
    pub fn open(&self) -> Result<Box<dyn Gallery>> {
        match (&self.gallery, &self.index) {
            (_, Some(index)) => Ok(Box::new(IndexFile::open(index)?)),
            (Some(prefix), None) => {
                let g = read_gallery(prefix)?;
                Ok(Box::new(
                    ExactGallery::new(&g.values, g.dim, g.sources, g.labels)?.with_model(g.model),
                ))
            }
            (None, None) => unreachable!("clap requires one"),
        }
    }

    /// The gallery as the user named it, for messages.
    fn name(&self) -> String {
        match (&self.gallery, &self.index) {
            (_, Some(index)) => format!("the index {}", index.display()),
            (Some(prefix), None) => format!("the gallery {}", prefix.display()),
            (None, None) => unreachable!("clap requires one"),
        }
    }
}

/// What an embedding prefix holds.
pub struct GalleryFiles {
    /// `[rows, dim]` row-major.
    pub values: Vec<f32>,
    pub dim: usize,
    pub sources: Vec<ImageSource>,
    /// From `PREFIX.labels.npy`, when it exists.
    pub labels: Option<Vec<i64>>,
    /// From `PREFIX.model.json`, when it exists.
    pub model: Option<ModelRecord>,
}

/// Embeddings, image lines and (when the file exists) labels of an embedding prefix.
pub fn read_gallery(prefix: &Path) -> Result<GalleryFiles> {
    let files = EmbeddingFiles::new(prefix);
    let (matrix, sources) = files.read()?;
    let labels = if files.labels().exists() {
        let labels = read_labels(&files.labels())?;
        anyhow::ensure!(
            labels.len() == matrix.rows,
            "{} has {} labels but {} has {} rows",
            files.labels().display(),
            labels.len(),
            files.embeddings().display(),
            matrix.rows
        );
        Some(labels)
    } else {
        None
    };
    Ok(GalleryFiles {
        values: matrix.values,
        dim: matrix.cols,
        sources,
        labels,
        model: files.read_model()?,
    })
}

/// A dataset named by `--kind` and `--root` (the embedded emoji set needs no root).
pub fn open_dataset(kind: DatasetKind, root: Option<PathBuf>) -> Result<Dataset> {
    let root = match (kind, root) {
        (_, Some(r)) => r,
        (DatasetKind::Emoji, None) => PathBuf::new(),
        (_, None) => anyhow::bail!("--root is required for --kind {kind}"),
    };
    Ok(Dataset::open(kind, &root)?)
}

/// A flag that Ctrl-C or SIGTERM sets: training stops after the current step with a resumable
/// checkpoint. A second signal quits at once.
pub fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopping now");
            // Returning would wait for the step the first signal is already waiting for.
            std::process::exit(130);
        }
        eprintln!(
            "\nstopping after this step and writing a resumable checkpoint (again to quit at once)"
        );
    });
    if let Err(e) = installed {
        eprintln!(
            "warning: cannot handle Ctrl-C ({e}); an interrupted run keeps its last epoch's checkpoint"
        );
    }
    stop
}
