//! Embedding images with a trained embedder: the test-time transform, batched forward passes
//! in evaluation mode (running BatchNorm statistics, no autodiff), one row per image.

use crate::nn::precision::Precision;
use std::sync::Arc;

use burn::module::Module;
use burn::tensor::Device;

use crate::data::Sample;
use crate::data::loader::{ImageStore, Loader, LoaderConfig, sequential_plan};
use crate::data::tensor::images_tensor;
use crate::data::transform::{Normalisation, Transform};
use crate::eval::metrics::Embeddings;
use crate::method::embedder::Embedder;

/// How images are prepared for embedding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmbedSettings {
    /// Resize the shorter side to this...
    pub resize: u32,
    /// ...then take the centred square of this side.
    pub crop: u32,
    pub normalisation: Normalisation,
    /// Images per forward pass.
    pub batch: usize,
    /// Decoding threads.
    pub threads: usize,
    /// Leave out unreadable images instead of stopping.
    pub skip_bad_images: bool,
    /// The backbone's arithmetic.
    pub precision: Precision,
}

/// Embeddings of a list of samples.
#[derive(Clone, Debug, Default)]
pub struct EmbeddingSet {
    /// Row-major `[rows, dim]`, not normalised.
    pub values: Vec<f32>,
    pub dim: usize,
    /// Index into the input samples of every row (all of them unless images were skipped).
    pub samples: Vec<usize>,
    /// Label of every row.
    pub labels: Vec<usize>,
    /// Images left out because they could not be read (with `skip_bad_images`): index into
    /// the input samples and why.
    pub skipped: Vec<(usize, crate::data::DataError)>,
}

impl EmbeddingSet {
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Refuses rows that are not finite (a model gone NaN): written out or searched, they
    /// would rank without saying so. `what` names the set in the error.
    pub fn check_finite(
        &self,
        what: &'static str,
    ) -> Result<(), crate::eval::metrics::EmbeddingsError> {
        match self.values.iter().position(|v| !v.is_finite()) {
            Some(index) => Err(crate::eval::metrics::EmbeddingsError::NotFinite {
                what,
                index,
                row: index / self.dim.max(1),
            }),
            None => Ok(()),
        }
    }

    /// The labels as the metrics take them.
    pub fn labels_i64(&self) -> Vec<i64> {
        self.labels.iter().map(|&l| l as i64).collect()
    }

    /// A view for [`crate::eval::metrics`], with `labels` from [`labels_i64`](Self::labels_i64).
    pub fn as_embeddings<'a>(&'a self, labels: &'a [i64]) -> Embeddings<'a> {
        Embeddings {
            values: &self.values,
            labels,
            dim: self.dim,
        }
    }
}

/// What [`embed_samples`] returns for each image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbedOutput {
    /// The embedding `z` (what retrieval uses).
    Embedding,
    /// The backbone's pooled features, before the embedding head.
    BackboneFeatures,
}

/// Embeds `samples` with `embedder`, calling `progress(done, total)` after every batch.
pub fn embed_samples(
    embedder: &Embedder,
    output: EmbedOutput,
    samples: Arc<Vec<Sample>>,
    store: Arc<ImageStore>,
    settings: &EmbedSettings,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EmbeddingSet, crate::data::DataError> {
    // Evaluation mode: BatchNorm on running statistics, dropout off, no autodiff graph.
    let embedder = embedder.valid();
    let device = device.clone().inner();
    let total = samples.len();
    let plan = sequential_plan(total, settings.batch);
    let loader = Loader::spawn(
        samples,
        store,
        plan,
        Transform::Eval {
            resize: settings.resize,
            crop: settings.crop,
        },
        0,
        LoaderConfig {
            threads: settings.threads.max(1),
            prefetch: 2,
            seed: 0,
            normalisation: settings.normalisation,
            skip_bad_images: settings.skip_bad_images,
            skip_batches: 0,
        },
    )?;
    let mut out = EmbeddingSet::default();
    let mut done = 0;
    for batch in loader {
        let batch = batch?;
        done += batch.rows() + batch.skipped.len();
        out.skipped.extend(batch.skipped.iter().cloned());
        if batch.rows() > 0 {
            let images = images_tensor(&batch, &device);
            let z = crate::backends::on_pool(|| match output {
                EmbedOutput::Embedding => embedder.forward_in(images, settings.precision),
                EmbedOutput::BackboneFeatures => {
                    embedder.backbone.forward_in(images, settings.precision)
                }
            });
            let [_, dim] = z.dims();
            out.dim = dim;
            out.values.extend(crate::io::host::host_values(z));
            out.samples.extend_from_slice(&batch.samples);
            out.labels.extend_from_slice(&batch.labels);
        }
        progress(done, total);
    }
    Ok(out)
}
