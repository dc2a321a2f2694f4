//! The approximate index against exact search: build time, memory, queries per second and
//! recall, on held-out rows of real embeddings or on synthetic clustered ones.

use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::data::ImageSource;
use crate::index::{
    BuildOptions, ExactGallery, Gallery, Hit, IndexError, IndexFile, RowRecords, SearchMode, build,
    recall_at,
};

/// `rows` points around `clusters` centres in `dim` dimensions: centres uniform on the unit
/// sphere's neighbourhood, points at `spread` of a centre's scale, so that neighbours are
/// mostly, but not only, within a cluster (as in trained embeddings). The centres depend on
/// `centre_seed` only, so queries drawn with another `point_seed` share the gallery's
/// clusters without repeating its points.
pub fn synthetic_clustered(
    rows: usize,
    dim: usize,
    clusters: usize,
    spread: f32,
    centre_seed: u64,
    point_seed: u64,
) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(centre_seed);
    let centres: Vec<f32> = (0..clusters.max(1) * dim)
        .map(|_| gaussian(&mut rng))
        .collect();
    let mut out = vec![0f32; rows * dim];
    out.par_chunks_mut(dim * 1024)
        .enumerate()
        .for_each(|(chunk, block)| {
            let mut rng = ChaCha8Rng::seed_from_u64(
                point_seed ^ (chunk as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            for row in block.chunks_mut(dim) {
                let c = rng.random_range(0..clusters.max(1)) * dim;
                for (j, v) in row.iter_mut().enumerate() {
                    *v = centres[c + j] + spread * gaussian(&mut rng);
                }
            }
        });
    out
}

/// A standard normal draw (Box-Muller).
fn gaussian(rng: &mut impl Rng) -> f32 {
    let u: f32 = rng.random_range(f32::EPSILON..1.0);
    let v: f32 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// One search setting's results.
#[derive(Clone, Debug, Serialize)]
pub struct SearchPoint {
    /// Candidate list (ef).
    pub expansion_search: usize,
    pub queries_per_s: f64,
    pub recall_at_1: f64,
    pub recall_at_10: f64,
    pub speedup_over_exact: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct IndexBenchReport {
    pub rows: usize,
    pub dim: usize,
    pub queries: usize,
    pub quantisation: String,
    pub connectivity: usize,
    pub expansion_add: usize,
    pub threads: usize,
    pub build_s: f64,
    pub file_bytes: u64,
    /// Resident memory of the process right after opening the index (MiB), and its growth
    /// over the build (peak resident memory, MiB).
    pub rss_after_open_mib: f64,
    pub peak_rss_mib: f64,
    pub exact_queries_per_s: f64,
    pub points: Vec<SearchPoint>,
}

/// `VmRSS` and `VmHWM` of this process in MiB (0 where /proc is missing).
pub fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Builds an index of `gallery` at `path`, then times exact search and the index at each of
/// `efs` on `queries` (answered in parallel, as a loaded server would).
pub fn bench_index(
    gallery: &[f32],
    queries: &[f32],
    dim: usize,
    options: &BuildOptions,
    efs: &[usize],
    path: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<IndexBenchReport, IndexError> {
    let rows = gallery.len() / dim;
    let sources: Vec<ImageSource> = (0..rows)
        .map(|i| ImageSource::File(format!("row/{i}").into()))
        .collect();
    progress("building");
    let started = Instant::now();
    build(
        gallery,
        dim,
        &RowRecords::new(&sources, None),
        options,
        path,
        &mut |_, _| {},
    )?;
    let build_s = started.elapsed().as_secs_f64();
    let index = IndexFile::open(path)?;
    let (rss_after_open_mib, _) = memory_mib();
    let exact = ExactGallery::new(gallery, dim, sources, None)?;
    progress("exact search");
    let started = Instant::now();
    let truth: Vec<Vec<Hit>> = queries
        .chunks(dim)
        .map(|q| exact.search(q, 10, SearchMode::Exact))
        .collect::<Result<_, _>>()?;
    let exact_qps = truth.len() as f64 / started.elapsed().as_secs_f64();
    drop(exact);
    let mut points = Vec::new();
    for &ef in efs {
        progress(&format!("index search, ef {ef}"));
        index.set_expansion_search(ef);
        let started = Instant::now();
        let found: Vec<Vec<Hit>> = queries
            .par_chunks(dim)
            .map(|q| index.search(q, 10, SearchMode::Approximate))
            .collect::<Result<_, _>>()?;
        let qps = found.len() as f64 / started.elapsed().as_secs_f64();
        points.push(SearchPoint {
            expansion_search: ef,
            queries_per_s: qps,
            recall_at_1: recall_at(&truth, &found, 1),
            recall_at_10: recall_at(&truth, &found, 10),
            speedup_over_exact: qps / exact_qps,
        });
    }
    let (_, peak) = memory_mib();
    Ok(IndexBenchReport {
        rows,
        dim,
        queries: truth.len(),
        quantisation: options.quantisation.to_string(),
        connectivity: options.connectivity,
        expansion_add: options.expansion_add,
        threads: rayon::current_num_threads(),
        build_s,
        file_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
        rss_after_open_mib,
        peak_rss_mib: peak,
        exact_queries_per_s: exact_qps,
        points,
    })
}

/// Splits `values` into `held_out` query rows (chosen with `seed`) and the rest.
pub fn hold_out(values: &[f32], dim: usize, held_out: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let rows = values.len() / dim;
    let mut order: Vec<usize> = (0..rows).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let held = held_out.min(rows.saturating_sub(1));
    let mut queries = Vec::with_capacity(held * dim);
    let mut gallery = Vec::with_capacity((rows - held) * dim);
    let mut is_query = vec![false; rows];
    for &r in &order[..held] {
        is_query[r] = true;
    }
    for (r, row) in values.chunks(dim).enumerate() {
        if is_query[r] {
            queries.extend_from_slice(row);
        } else {
            gallery.extend_from_slice(row);
        }
    }
    (gallery, queries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_rows_leave_the_gallery_and_synthetic_data_repeats() {
        let values: Vec<f32> = (0..20).map(|v| v as f32).collect();
        let (g, q) = hold_out(&values, 2, 3, 7);
        assert_eq!((g.len(), q.len()), (14, 6));
        let mut all: Vec<f32> = g.iter().chain(&q).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, values);
        let a = synthetic_clustered(5000, 8, 10, 0.1, 1, 1);
        assert_eq!(a, synthetic_clustered(5000, 8, 10, 0.1, 1, 1));
        assert_ne!(a, synthetic_clustered(5000, 8, 10, 0.1, 1, 2));
    }
}
