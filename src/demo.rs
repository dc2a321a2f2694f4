//! The one-command demo: GCA-HNG against the plain N-pair baseline on the embedded emoji
//! styles (train on one half of the classes, retrieve the unseen half), with the embedded
//! EfficientNet-Lite0, the same seeds, batches and budget for both (`../shared/docs/DEMO.md`
//! records the release's own numbers on this setting).
//!
//! It claims a win only when the margin exceeds the spread between seeds; with one seed it
//! makes no claim. Each run is an ordinary run folder, so an interrupted demo continues where
//! it stopped when started again with the same `--out`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::config::ExperimentConfig;
use crate::eval::embed::EmbedOutput;
use crate::eval::grid::{GridRow, result_grid, save_png};
use crate::eval::metrics::RetrievalMetrics;
use crate::eval::topk::nearest;
use crate::train::evaluator::Evaluator;
use crate::train::plots::{Series, line_chart, recall_curve};
use crate::train::run_dir::RunDir;
use crate::train::{self, Observer, RunOptions, RunOutcome, RunSummary, setup};

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// Smoke-sized: [`QUICK`].
    pub quick: bool,
    pub seeds: Vec<u64>,
    /// Epochs per run; default [`DEFAULT_EPOCHS`] (2 with `quick`).
    pub epochs: Option<usize>,
    pub device: String,
    pub stop: Arc<AtomicBool>,
}

/// The demo's default budget per run: one warm-up epoch and two full ones. On two cores the
/// default two seeds take about ten minutes; DEMO.md's full eight epochs (`--epochs 8`) about
/// sixteen minutes per seed (BENCHMARKS.md). GCA-HNG's lead is largest early in training; at
/// eight epochs the two methods end within seed noise on this small dataset.
pub const DEFAULT_EPOCHS: usize = 3;

/// The smoke-sized demo of `--quick`.
pub const QUICK: QuickSize = QuickSize {
    image_size: 32,
    steps_per_epoch: 2,
    epochs: 2,
    test_classes: 24,
};

/// How small the smoke-sized demo is.
#[derive(Clone, Copy, Debug)]
pub struct QuickSize {
    /// Training crop and test resize, pixels.
    pub image_size: usize,
    pub steps_per_epoch: usize,
    pub epochs: usize,
    /// Evaluation on the first this many test classes only.
    pub test_classes: usize,
}

/// The two methods, as named in the summary.
pub const METHODS: [(&str, bool); 2] = [("gca_hng", true), ("baseline", false)];

/// The demo's configuration of one method and seed.
pub fn demo_config(opts: &DemoOptions, generation: bool, seed: u64) -> Result<ExperimentConfig> {
    let mut c = ExperimentConfig::demo();
    c.loss.generation = generation;
    c.train.seed = seed;
    c.train.device = opts.device.clone();
    c.train.epochs = DEFAULT_EPOCHS;
    if opts.quick {
        c.data.image_size = QUICK.image_size;
        c.data.resize = QUICK.image_size;
        c.train.epochs = QUICK.epochs;
        c.train.eval_every = 1;
    }
    if let Some(e) = opts.epochs {
        c.train.epochs = e;
    }
    c.validate()?;
    Ok(c)
}

/// One method's results over the seeds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MethodResults {
    /// Test metrics after the last epoch, averaged over seeds (at the top level of the
    /// method's entry in `summary.json`).
    #[serde(flatten)]
    pub mean: RetrievalMetrics,
    /// Per seed: the test metrics after the last epoch.
    pub per_seed: BTreeMap<String, RetrievalMetrics>,
    /// Per seed: `(epoch, test R@1)` of every evaluation (epoch 0: untrained).
    pub curves: BTreeMap<String, Vec<(f64, f64)>>,
    /// Largest minus smallest final R@1 over the seeds (0 with one seed).
    pub spread_r_at_1: f64,
    /// Mean training time per run, seconds (evaluations excluded).
    pub train_seconds: f64,
}

/// `summary.json` of the demo.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoSummary {
    pub gca_hng: MethodResults,
    pub baseline: MethodResults,
    /// The pretrained backbone's pooled features, no training at all.
    pub pretrained_features: Option<RetrievalMetrics>,
    /// GCA-HNG's mean final R@1 minus the baseline's.
    pub margin_r_at_1: f64,
    /// The larger of the two methods' seed spreads (None with one seed).
    pub seed_spread_r_at_1: Option<f64>,
    pub verdict: String,
    pub seeds: Vec<u64>,
    pub epochs: usize,
    pub steps_per_epoch: Option<usize>,
    pub test_images: usize,
    pub seconds: f64,
}

/// The demo's results as text: final test metrics of the pretrained features and both
/// methods (means over the seeds), then each seed's learning curves side by side. Every
/// line ends in a newline.
pub struct ResultsTable<'a> {
    pub summary: &'a DemoSummary,
    /// Width of the pretrained backbone's features, named in their row.
    pub feature_width: usize,
}

impl std::fmt::Display for ResultsTable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.summary;
        let mut ks: Vec<String> = s.gca_hng.mean.recall.keys().cloned().collect();
        ks.sort_by_key(|k| k.parse::<usize>().unwrap_or(0));
        let header: Vec<String> = ks
            .iter()
            .map(|k| format!("{:>6}", format!("R@{k}")))
            .collect();
        writeln!(
            f,
            "{:<34}{} {:>7} {:>7}",
            format!(
                "test classes, final epoch ({} seed{})",
                s.seeds.len(),
                if s.seeds.len() > 1 { "s, mean" } else { "" }
            ),
            header.join(""),
            "MAP@R",
            "RP"
        )?;
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, m: &RetrievalMetrics| {
            let cells: Vec<String> = ks
                .iter()
                .map(|k| format!("{:>6.1}", m.recall.get(k).copied().unwrap_or(f64::NAN)))
                .collect();
            writeln!(
                f,
                "{name:<34}{} {:>7.1} {:>7.1}",
                cells.join(""),
                m.map_at_r,
                m.r_precision
            )
        };
        if let Some(features) = &s.pretrained_features {
            let name = format!("pretrained features ({}-d)", self.feature_width);
            row(f, &name, features)?;
        }
        row(f, "baseline (N-pair)", &s.baseline.mean)?;
        row(f, "GCA-HNG", &s.gca_hng.mean)?;
        writeln!(f, "\nlearning curves, test R@1 (epoch 0: untrained):")?;
        for (seed, curve) in &s.gca_hng.curves {
            let base = s.baseline.curves.get(seed).cloned().unwrap_or_default();
            writeln!(f, "  seed {seed}: epoch   GCA-HNG   baseline   margin")?;
            for (e, g) in curve {
                match base.iter().find(|(x, _)| x == e).map(|p| p.1) {
                    Some(b) => writeln!(
                        f,
                        "          {:>5}   {g:>7.1}   {b:>8.1}   {:>+6.1}",
                        e,
                        g - b
                    )?,
                    None => writeln!(f, "          {:>5}   {g:>7.1}", e)?,
                }
            }
        }
        Ok(())
    }
}

/// Mean of several metric sets (recall keys of the first).
fn mean_metrics(sets: &[&RetrievalMetrics]) -> RetrievalMetrics {
    let n = sets.len().max(1) as f64;
    let mut out = RetrievalMetrics::default();
    if let Some(first) = sets.first() {
        for k in first.recall.keys() {
            let v = sets.iter().filter_map(|m| m.recall.get(k)).sum::<f64>() / n;
            out.recall.insert(k.clone(), v);
        }
    }
    out.map_at_r = sets.iter().map(|m| m.map_at_r).sum::<f64>() / n;
    out.r_precision = sets.iter().map(|m| m.r_precision).sum::<f64>() / n;
    out
}

fn r1(m: &RetrievalMetrics) -> f64 {
    m.recall.get("1").copied().unwrap_or(0.0)
}

/// Runs (or continues) one method for one seed; a finished run is read back, not repeated.
fn run_one(
    opts: &DemoOptions,
    generation: bool,
    seed: u64,
    dir: &Path,
    observer: &mut dyn Observer,
) -> Result<Option<RunSummary>> {
    let run = RunDir::new(dir);
    if run.summary().exists() {
        let path = run.summary();
        let text = crate::io::regular::read_to_string(&path)
            .map_err(|e| Error::io("read", path.clone(), e))?;
        observer.note(&format!("{} is finished; using its results", dir.display()));
        return Ok(Some(serde_json::from_str(&text).map_err(|source| {
            Error::NotJson {
                path,
                what: "a run summary",
                source,
            }
        })?));
    }
    let config = demo_config(opts, generation, seed)?;
    let mut ro = RunOptions::new(dir);
    ro.resume = run.last().exists();
    ro.stop = opts.stop.clone();
    ro.evaluate_untrained = true;
    ro.emoji_cache = Some(opts.out.join("emoji-cache"));
    if opts.quick {
        ro.max_steps_per_epoch = Some(QUICK.steps_per_epoch);
        ro.eval_class_limit = Some(QUICK.test_classes);
    }
    match train::train(&config, &ro, observer)? {
        RunOutcome::Finished(s) => Ok(Some(*s)),
        RunOutcome::Interrupted { .. } => Ok(None),
    }
}

/// The pretrained backbone's own features on the test classes.
fn pretrained_features(
    config: &ExperimentConfig,
    opts: &DemoOptions,
    observer: &mut dyn Observer,
) -> Result<RetrievalMetrics> {
    let (_, device) = crate::device::open_configured(&config.train.device)?;
    let (weights, _) = setup::pretrained_weights(config)?;
    let model = setup::build_model(config, 2, &weights, &device)?;
    let mut data = setup::run_data(config, None)?;
    if opts.quick {
        data.test = data.test.limited(QUICK.test_classes);
    }
    let store = Arc::new(train::image_store(
        config,
        Some(opts.out.join("emoji-cache")),
    )?);
    let mut evaluator = Evaluator::new(config, store, data.ks.clone(), &device, false);
    evaluator.output = EmbedOutput::BackboneFeatures;
    evaluator.metrics(
        &model.embedder,
        &data.test,
        "test (pretrained features)",
        None,
        observer,
    )
}

/// Runs the demo; `observer(label)` makes the progress display of each run.
pub fn run_demo(
    opts: &DemoOptions,
    observer: &mut dyn FnMut(&str) -> Box<dyn Observer>,
) -> Result<Option<DemoSummary>> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io("create", opts.out.clone(), e))?;
    let mut results: BTreeMap<&str, Vec<(u64, RunSummary)>> = BTreeMap::new();
    for &seed in &opts.seeds {
        for (name, generation) in METHODS {
            let label = format!("{name} seed {seed}");
            let dir = opts.out.join(format!("seed-{seed}")).join(name);
            let mut obs = observer(&label);
            match run_one(opts, generation, seed, &dir, obs.as_mut())? {
                Some(summary) => results.entry(name).or_default().push((seed, summary)),
                None => return Ok(None),
            }
        }
    }
    let config = demo_config(opts, true, opts.seeds[0])?;
    let features = {
        let mut obs = observer("pretrained features");
        pretrained_features(&config, opts, obs.as_mut())?
    };
    let method = |name: &str| -> MethodResults {
        let runs = &results[name];
        let finals: Vec<&RetrievalMetrics> = runs
            .iter()
            .filter_map(|(_, s)| s.final_test.as_ref())
            .collect();
        let r1s: Vec<f64> = finals.iter().map(|m| r1(m)).collect();
        let spread = r1s.iter().cloned().fold(f64::MIN, f64::max)
            - r1s.iter().cloned().fold(f64::MAX, f64::min);
        MethodResults {
            mean: mean_metrics(&finals),
            per_seed: runs
                .iter()
                .filter_map(|(seed, s)| Some((seed.to_string(), s.final_test.clone()?)))
                .collect(),
            curves: runs
                .iter()
                .map(|(seed, s)| (seed.to_string(), recall_curve(&s.records, "test")))
                .collect(),
            spread_r_at_1: if r1s.len() > 1 { spread } else { 0.0 },
            train_seconds: runs
                .iter()
                .map(|(_, s)| s.records.iter().map(|r| r.train_seconds).sum::<f64>())
                .sum::<f64>()
                / runs.len().max(1) as f64,
        }
    };
    let gca = method("gca_hng");
    let base = method("baseline");
    let margin = r1(&gca.mean) - r1(&base.mean);
    let spread = (opts.seeds.len() > 1).then(|| gca.spread_r_at_1.max(base.spread_r_at_1));
    let epochs = config.train.epochs;
    let verdict = match spread {
        None => format!(
            "after {epochs} epochs, one seed only: the seed spread is unknown, so no claim (margin {margin:+.1} R@1; run two or more seeds to measure the spread)"
        ),
        Some(s) if margin > s => format!(
            "after {epochs} epochs GCA-HNG is ahead: {margin:+.1} R@1, more than the seed spread of {s:.1}"
        ),
        Some(s) if -margin > s => format!(
            "after {epochs} epochs the baseline is ahead: {margin:+.1} R@1, more than the seed spread of {s:.1}"
        ),
        Some(s) => format!(
            "after {epochs} epochs the methods are within seed noise: a margin of {margin:+.1} R@1 against a seed spread of {s:.1}"
        ),
    };
    let summary = DemoSummary {
        gca_hng: gca,
        baseline: base,
        pretrained_features: Some(features),
        margin_r_at_1: margin,
        seed_spread_r_at_1: spread,
        verdict,
        seeds: opts.seeds.clone(),
        epochs: config.train.epochs,
        steps_per_epoch: opts.quick.then_some(QUICK.steps_per_epoch),
        test_images: 0,
        seconds: 0.0,
    };
    let mut summary = summary;
    write_curves(opts, &summary)?;
    let gca_run = RunDir::new(
        &opts
            .out
            .join(format!("seed-{}", opts.seeds[0]))
            .join("gca_hng"),
    );
    summary.test_images = write_gallery(&config, opts, &gca_run, &opts.out.join("gallery.png"))?;
    summary.seconds = started.elapsed().as_secs_f64();
    let path = opts.out.join("summary.json");
    let json = serde_json::to_string_pretty(&summary).map_err(|source| Error::NotJson {
        path: path.clone(),
        what: "encodable as JSON",
        source,
    })?;
    crate::io::atomic::write_atomic(&path, json.as_bytes())?;
    Ok(Some(summary))
}

/// `learning-curves.svg`: test R@1 per epoch of both methods and every seed.
fn write_curves(opts: &DemoOptions, s: &DemoSummary) -> Result<()> {
    let mut series = Vec::new();
    for (name, m) in [("GCA-HNG", &s.gca_hng), ("baseline", &s.baseline)] {
        for (seed, points) in &m.curves {
            series.push(Series {
                name: format!("{name} seed {seed}"),
                points: points.clone(),
            });
        }
    }
    Ok(line_chart(
        &opts.out.join("learning-curves.svg"),
        "Test Recall@1 on unseen emoji classes",
        "epoch",
        "R@1 (%)",
        &series,
    )?)
}

/// `gallery.png`: a few test queries and their eight nearest test images under the trained
/// GCA-HNG model (green: same class, red: another class). Returns the number of test images.
pub fn write_gallery(
    config: &ExperimentConfig,
    opts: &DemoOptions,
    run: &RunDir,
    path: &Path,
) -> Result<usize> {
    let files = run.test_embeddings();
    let (matrix, sources) = files.read()?;
    let labels = crate::io::npy::read_labels(&files.labels())?;
    let n = matrix.rows;
    let queries: Vec<usize> = (0..8)
        .map(|i| (i * n) / 8 + (n / 16))
        .filter(|&q| q < n)
        .collect();
    let dim = matrix.cols;
    let query_values: Vec<f32> = queries
        .iter()
        .flat_map(|&q| matrix.values[q * dim..(q + 1) * dim].to_vec())
        .collect();
    let found = nearest(&query_values, &matrix.values, dim, 9);
    let rows: Vec<GridRow> = queries
        .iter()
        .zip(found)
        .map(|(&q, hits)| GridRow {
            query: sources[q].clone(),
            results: hits
                .into_iter()
                .filter(|&(i, _)| i != q)
                .take(8)
                .map(|(i, _)| (sources[i].clone(), Some(labels[i] == labels[q])))
                .collect(),
        })
        .collect();
    let store = train::image_store(config, Some(opts.out.join("emoji-cache")))?;
    save_png(&result_grid(&store, &rows, 64)?, path)?;
    Ok(n)
}

#[cfg(test)]
mod tests;
