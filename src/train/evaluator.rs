//! Evaluating a model on a split: embed its images in eval mode, then the retrieval metrics
//! (one set against itself, or In-Shop's queries against a gallery). Used by training, `eval`
//! and the demo.

use std::sync::Arc;

use burn::tensor::Device;

use crate::config::ExperimentConfig;
use crate::data::Split;
use crate::data::loader::ImageStore;
use crate::error::Result;
use crate::eval::embed::{EmbedOutput, EmbedSettings, EmbeddingSet, embed_samples};
use crate::eval::metrics::{RetrievalMetrics, evaluate, evaluate_query_gallery};
use crate::io::embedding_files::{EmbeddingFiles, ModelRecord};
use crate::method::embedder::Embedder;

use super::Observer;
use super::setup::EvalSet;

/// Everything evaluation needs besides the model.
pub struct Evaluator {
    pub store: Arc<ImageStore>,
    pub settings: EmbedSettings,
    /// The k of Recall@k.
    pub ks: Vec<usize>,
    pub device: Device,
    /// Embeddings, or the backbone's features alone.
    pub output: EmbedOutput,
    /// Seed of the k-means behind NMI; `None` skips NMI.
    pub nmi_seed: Option<u64>,
}

impl Evaluator {
    /// Embeddings with the configuration's test-time transform, no NMI.
    pub fn new(
        config: &ExperimentConfig,
        store: Arc<ImageStore>,
        ks: Vec<usize>,
        device: &Device,
        skip_bad_images: bool,
    ) -> Self {
        Self {
            store,
            settings: super::embed_settings(config, skip_bad_images),
            ks,
            device: device.clone(),
            output: EmbedOutput::Embedding,
            nmi_seed: None,
        }
    }

    /// Metrics of `set` under `embedder`; with `keep`, the embeddings (In-Shop: the gallery's)
    /// are also written there, recording the model as given. Images left out as unreadable are
    /// told to `observer`.
    pub fn metrics(
        &self,
        embedder: &Embedder,
        set: &EvalSet,
        name: &str,
        keep: Option<(&EmbeddingFiles, &ModelRecord)>,
        observer: &mut dyn Observer,
    ) -> Result<RetrievalMetrics> {
        let (metrics, skipped) = self.metrics_and_skipped(embedder, set, name, keep, observer)?;
        for s in &skipped {
            observer.note(s);
        }
        Ok(metrics)
    }

    /// [`metrics`](Self::metrics), giving back the images left out as unreadable (one line
    /// each, naming the split, the file and why) instead of telling the observer.
    pub fn metrics_and_skipped(
        &self,
        embedder: &Embedder,
        set: &EvalSet,
        name: &str,
        keep: Option<(&EmbeddingFiles, &ModelRecord)>,
        observer: &mut dyn Observer,
    ) -> Result<(RetrievalMetrics, Vec<String>)> {
        let device = self.device.clone().inner();
        let mut skipped = Vec::new();
        let mut embed = |split: &Split, what: &str| -> Result<EmbeddingSet> {
            let e = embed_samples(
                embedder,
                self.output,
                Arc::new(split.samples.clone()),
                self.store.clone(),
                &self.settings,
                &device,
                &mut |done, total| observer.evaluating(what, done, total),
            )?;
            skipped.extend(
                e.skipped
                    .iter()
                    .map(|(_, err)| format!("{what}: {} (left out)", crate::error::chain(err))),
            );
            Ok(e)
        };
        let write = |e: &EmbeddingSet, split: &Split| -> Result<()> {
            match keep {
                Some((files, model)) => {
                    // A diverged model's embeddings are refused before they reach the run
                    // folder, not after.
                    e.check_finite("the embeddings")?;
                    let sources: Vec<_> = e
                        .samples
                        .iter()
                        .map(|&i| split.samples[i].source.clone())
                        .collect();
                    Ok(files.write(&e.values, e.dim, &sources, Some(&e.labels_i64()), model)?)
                }
                None => Ok(()),
            }
        };
        match set {
            EvalSet::Single(split) => {
                let e = embed(split, name)?;
                write(&e, split)?;
                let labels = e.labels_i64();
                let m = evaluate(&e.as_embeddings(&labels), &self.ks, self.nmi_seed, &device)?;
                Ok((m, skipped))
            }
            EvalSet::QueryGallery { query, gallery } => {
                let q = embed(query, &format!("{name} query"))?;
                let g = embed(gallery, &format!("{name} gallery"))?;
                write(&g, gallery)?;
                let (ql, gl) = (q.labels_i64(), g.labels_i64());
                let m = evaluate_query_gallery(
                    &q.as_embeddings(&ql),
                    &g.as_embeddings(&gl),
                    &self.ks,
                    &device,
                )?;
                Ok((m, skipped))
            }
        }
    }
}
