//! `gca-hng metrics`: retrieval metrics of embeddings saved as `.npy`.

use std::path::{Path, PathBuf};

use anyhow::Result;

use gca_hng::device::DeviceSpec;
use gca_hng::eval::metrics::{Embeddings, RetrievalMetrics, evaluate, evaluate_query_gallery};
use gca_hng::io::npy;

use crate::shared::{Outcome, open_device};

#[derive(clap::Args)]
pub struct MetricsArgs {
    /// `[n, d]` embeddings (float32 or float64); every item queries all the others.
    #[arg(long, requires = "labels", conflicts_with_all = ["query_embeddings", "gallery_embeddings"])]
    embeddings: Option<PathBuf>,
    /// `[n]` integer labels of `--embeddings`.
    #[arg(long, requires = "embeddings")]
    labels: Option<PathBuf>,
    /// Query embeddings of a query/gallery protocol (In-Shop).
    #[arg(long, requires_all = ["query_labels", "gallery_embeddings", "gallery_labels"])]
    query_embeddings: Option<PathBuf>,
    #[arg(long)]
    query_labels: Option<PathBuf>,
    #[arg(long)]
    gallery_embeddings: Option<PathBuf>,
    #[arg(long)]
    gallery_labels: Option<PathBuf>,
    /// The k of Recall@k.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    ks: Vec<usize>,
    /// Seed of the k-means behind NMI.
    #[arg(long, default_value_t = 0)]
    nmi_seed: u64,
    /// Skip NMI (k-means is the slow part on large sets).
    #[arg(long)]
    no_nmi: bool,
}

fn read_set(embeddings: &Path, labels: &Path) -> Result<(npy::Matrix, Vec<i64>)> {
    let matrix = npy::read_matrix(embeddings)?;
    let labels_v = npy::read_labels(labels)?;
    anyhow::ensure!(
        matrix.rows == labels_v.len(),
        "{} has {} rows but {} has {} labels",
        embeddings.display(),
        matrix.rows,
        labels.display(),
        labels_v.len()
    );
    Ok((matrix, labels_v))
}

fn metrics(args: &MetricsArgs, device: &burn::tensor::Device) -> Result<RetrievalMetrics> {
    if let (Some(e), Some(l)) = (&args.embeddings, &args.labels) {
        let (m, labels) = read_set(e, l)?;
        let set = Embeddings {
            values: &m.values,
            labels: &labels,
            dim: m.cols,
        };
        let seed = (!args.no_nmi).then_some(args.nmi_seed);
        return Ok(evaluate(&set, &args.ks, seed, device)?);
    }
    match (
        &args.query_embeddings,
        &args.query_labels,
        &args.gallery_embeddings,
        &args.gallery_labels,
    ) {
        (Some(qe), Some(ql), Some(ge), Some(gl)) => {
            let (q, q_labels) = read_set(qe, ql)?;
            let (g, g_labels) = read_set(ge, gl)?;
            anyhow::ensure!(
                q.cols == g.cols,
                "the query embeddings {} have width {} but the gallery embeddings {} have width {}; both must come from one model",
                qe.display(),
                q.cols,
                ge.display(),
                g.cols
            );
            let queries = Embeddings {
                values: &q.values,
                labels: &q_labels,
                dim: q.cols,
            };
            let gallery = Embeddings {
                values: &g.values,
                labels: &g_labels,
                dim: g.cols,
            };
            Ok(evaluate_query_gallery(
                &queries, &gallery, &args.ks, device,
            )?)
        }
        _ => anyhow::bail!(
            "give --embeddings and --labels, or all of --query-embeddings, --query-labels, --gallery-embeddings and --gallery-labels"
        ),
    }
}

pub fn run(args: MetricsArgs, device: Option<DeviceSpec>) -> Result<Outcome> {
    let (_, device) = open_device(device)?;
    let metrics = metrics(&args, &device)?;
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    Ok(Outcome::Success)
}
