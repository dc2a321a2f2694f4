//! Retrieval metrics (METHOD.md section 8): Recall@k, MAP@R, R-Precision and NMI.
//!
//! Embeddings are L2-normalised and compared by cosine similarity. Similarities are computed
//! one block of queries at a time on the chosen device (never an N x N matrix), and each block's
//! rows are ranked on the host in parallel. All values are reported x100, like the release.

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::eval::nmi::nmi_of_kmeans;
use crate::eval::topk::{normalise_rows, top_k};

/// Queries per block are chosen so that one block of similarities stays under this many floats
/// (256 MB).
const BLOCK_FLOATS: usize = 64 << 20;

/// The metrics of one evaluation, x100.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RetrievalMetrics {
    /// Recall@k for each requested k (keys are k).
    pub recall: BTreeMap<String, f64>,
    pub map_at_r: f64,
    pub r_precision: f64,
    /// Normalised mutual information of a seeded k-means clustering (k = number of classes);
    /// `None` when not computed.
    pub nmi: Option<f64>,
    /// Queries that have no other item of their label: they count in Recall@k as misses, and are
    /// left out of MAP@R and R-Precision (their R is 0).
    pub queries_without_positives: usize,
}

/// Embeddings that cannot be evaluated; `what` names the set (`query embeddings`, ...).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EmbeddingsError {
    #[error("{what}: {values} values do not form rows of width {dim}")]
    Ragged {
        what: &'static str,
        values: usize,
        dim: usize,
    },
    #[error("{what}: {rows} embeddings but {labels} labels")]
    Labels {
        what: &'static str,
        rows: usize,
        labels: usize,
    },
    #[error("{what}: no embeddings")]
    Empty { what: &'static str },
    #[error("{what}: value {index} (row {row}) is not finite")]
    NotFinite {
        what: &'static str,
        index: usize,
        row: usize,
    },
    #[error("query embeddings have width {query}, gallery {gallery}")]
    Widths { query: usize, gallery: usize },
    #[error("recall needs k values of at least 1")]
    NoK,
}

/// A set of L2-normalisable embeddings with labels.
pub struct Embeddings<'a> {
    /// Row-major `[n, dim]`.
    pub values: &'a [f32],
    pub labels: &'a [i64],
    pub dim: usize,
}

impl Embeddings<'_> {
    fn check(&self, what: &'static str) -> Result<usize, EmbeddingsError> {
        if self.dim == 0 || !self.values.len().is_multiple_of(self.dim) {
            return Err(EmbeddingsError::Ragged {
                what,
                values: self.values.len(),
                dim: self.dim,
            });
        }
        let n = self.values.len() / self.dim;
        if n != self.labels.len() {
            return Err(EmbeddingsError::Labels {
                what,
                rows: n,
                labels: self.labels.len(),
            });
        }
        if n == 0 {
            return Err(EmbeddingsError::Empty { what });
        }
        if let Some(i) = self.values.iter().position(|v| !v.is_finite()) {
            return Err(EmbeddingsError::NotFinite {
                what,
                index: i,
                row: i / self.dim,
            });
        }
        Ok(n)
    }

    fn normalized(&self) -> Vec<f32> {
        normalise_rows(self.values, self.dim)
    }
}

/// What one query's ranking yields.
#[derive(Clone, Copy, Debug, Default)]
struct QueryOutcome {
    /// Rank (0-based) of the first same-label item in the tie-broken ranking, if any.
    first_hit: Option<usize>,
    /// Other-label items scoring strictly above the best same-label item (In-Shop's rule).
    above_best: usize,
    /// Average precision at R and R-Precision; `None` when R = 0.
    ap_at_r: Option<f64>,
    r_precision: Option<f64>,
}

/// Ranks one row of similarities. `exclude` is the query's own index in the gallery, if any.
fn rank_row(
    scores: &[f32],
    gallery_labels: &[i64],
    label: i64,
    exclude: Option<usize>,
    r: usize,
    top: usize,
) -> QueryOutcome {
    let mut best_same = f32::NEG_INFINITY;
    for (j, (&s, &l)) in scores.iter().zip(gallery_labels).enumerate() {
        if l == label && Some(j) != exclude && s > best_same {
            best_same = s;
        }
    }
    let above_best = if best_same == f32::NEG_INFINITY {
        usize::MAX
    } else {
        scores
            .iter()
            .zip(gallery_labels)
            .enumerate()
            .filter(|(j, (s, l))| **l != label && Some(*j) != exclude && **s > best_same)
            .count()
    };
    let candidates = (0..scores.len()).filter(|&j| Some(j) != exclude).collect();
    let idx = top_k(scores, candidates, top);
    let hits: Vec<bool> = idx.iter().map(|&j| gallery_labels[j] == label).collect();
    let first_hit = hits.iter().position(|&h| h);
    let (ap_at_r, r_precision) = if r == 0 {
        (None, None)
    } else {
        let mut found = 0usize;
        let mut ap = 0.0;
        for (i, &h) in hits.iter().take(r).enumerate() {
            if h {
                found += 1;
                ap += found as f64 / (i + 1) as f64;
            }
        }
        (Some(ap / r as f64), Some(found as f64 / r as f64))
    };
    QueryOutcome {
        first_hit,
        above_best,
        ap_at_r,
        r_precision,
    }
}

/// Normalised rows and their labels.
struct Side<'a> {
    values: &'a [f32],
    labels: &'a [i64],
}

/// Ranks every query against the gallery; `same_set` excludes each query from its own ranking.
fn outcomes(
    queries: Side,
    gallery: Side,
    dim: usize,
    same_set: bool,
    top: usize,
    device: &Device,
) -> Vec<QueryOutcome> {
    let (query_labels, gallery_labels) = (queries.labels, gallery.labels);
    let (queries, gallery) = (queries.values, gallery.values);
    let nq = query_labels.len();
    let ng = gallery_labels.len();
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for &l in gallery_labels {
        *counts.entry(l).or_default() += 1;
    }
    // On the CPU the products are taken straight from the host slices, each written once on
    // every core (the same GEMM, so the same bits, as burn-flex's matmul, which fills and
    // copies its output on one thread); other devices get tensors.
    let on_cpu = crate::backends::is_flex(device);
    let g = (!on_cpu).then(|| {
        Tensor::<2>::from_data(TensorData::new(gallery.to_vec(), [ng, dim]), device).transpose()
    });
    let block = (BLOCK_FLOATS / ng.max(1)).clamp(1, nq);
    let mut out = Vec::with_capacity(nq);
    for start in (0..nq).step_by(block) {
        let rows = block.min(nq - start);
        let block_queries = &queries[start * dim..(start + rows) * dim];
        let sims = match &g {
            None => crate::backends::product_nt(rows, ng, dim, block_queries, gallery),
            Some(g) => {
                let q = Tensor::<2>::from_data(
                    TensorData::new(block_queries.to_vec(), [rows, dim]),
                    device,
                );
                crate::io::host::host_values(q.matmul(g.clone()))
            }
        };
        let block_out: Vec<QueryOutcome> = sims
            .par_chunks(ng)
            .enumerate()
            .map(|(i, row)| {
                let qi = start + i;
                let label = query_labels[qi];
                let exclude = same_set.then_some(qi);
                let r = counts.get(&label).copied().unwrap_or(0) - usize::from(same_set);
                rank_row(row, gallery_labels, label, exclude, r, top.max(r))
            })
            .collect();
        out.extend(block_out);
    }
    out
}

fn summarize(outcomes: &[QueryOutcome], ks: &[usize], in_shop: bool) -> RetrievalMetrics {
    let n = outcomes.len() as f64;
    let mut recall = BTreeMap::new();
    for &k in ks {
        let hits = outcomes
            .iter()
            .filter(|o| {
                if in_shop {
                    o.above_best < k
                } else {
                    o.first_hit.is_some_and(|r| r < k)
                }
            })
            .count();
        recall.insert(k.to_string(), 100.0 * hits as f64 / n);
    }
    let with_r: Vec<&QueryOutcome> = outcomes.iter().filter(|o| o.ap_at_r.is_some()).collect();
    let mean = |f: &dyn Fn(&QueryOutcome) -> f64| {
        if with_r.is_empty() {
            0.0
        } else {
            100.0 * with_r.iter().map(|o| f(o)).sum::<f64>() / with_r.len() as f64
        }
    };
    RetrievalMetrics {
        recall,
        map_at_r: mean(&|o| o.ap_at_r.unwrap_or(0.0)),
        r_precision: mean(&|o| o.r_precision.unwrap_or(0.0)),
        nmi: None,
        queries_without_positives: outcomes.len() - with_r.len(),
    }
}

/// Every item queries all others (CUB-200-2011, Cars196, SOP). `nmi_seed` adds NMI.
pub fn evaluate(
    set: &Embeddings,
    ks: &[usize],
    nmi_seed: Option<u64>,
    device: &Device,
) -> Result<RetrievalMetrics, EmbeddingsError> {
    let n = set.check("embeddings")?;
    if ks.is_empty() || ks.contains(&0) {
        return Err(EmbeddingsError::NoK);
    }
    let x = set.normalized();
    let top = *ks.iter().max().expect("non-empty");
    let side = || Side {
        values: &x,
        labels: set.labels,
    };
    let outcomes = outcomes(side(), side(), set.dim, true, top.min(n - 1), device);
    let mut metrics = summarize(&outcomes, ks, false);
    if let Some(seed) = nmi_seed {
        metrics.nmi = Some(100.0 * nmi_of_kmeans(&x, set.labels, set.dim, seed, device));
    }
    Ok(metrics)
}

/// Queries against a separate gallery (In-Shop): a query counts at k when fewer than k gallery
/// items of other labels score above its best same-label gallery item.
pub fn evaluate_query_gallery(
    queries: &Embeddings,
    gallery: &Embeddings,
    ks: &[usize],
    device: &Device,
) -> Result<RetrievalMetrics, EmbeddingsError> {
    queries.check("query embeddings")?;
    gallery.check("gallery embeddings")?;
    if queries.dim != gallery.dim {
        return Err(EmbeddingsError::Widths {
            query: queries.dim,
            gallery: gallery.dim,
        });
    }
    if ks.is_empty() || ks.contains(&0) {
        return Err(EmbeddingsError::NoK);
    }
    let q = queries.normalized();
    let g = gallery.normalized();
    let top = *ks.iter().max().expect("non-empty");
    let outcomes = outcomes(
        Side {
            values: &q,
            labels: queries.labels,
        },
        Side {
            values: &g,
            labels: gallery.labels,
        },
        queries.dim,
        false,
        top,
        device,
    );
    Ok(summarize(&outcomes, ks, true))
}

#[cfg(test)]
mod tests;
