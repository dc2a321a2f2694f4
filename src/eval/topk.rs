//! Cosine ranking shared by retrieval (`search`) and the metrics: one normalisation, one
//! order.

use std::cmp::Ordering;

use rayon::prelude::*;

/// Rows scaled to unit length. A zero row has no direction and stays zero: it scores 0
/// against every row, so as a query it ranks the gallery in index order, and as a gallery row
/// it sits between the positively and the negatively similar ones.
///
/// Cosine does not depend on a row's length, so neither does this: a row whose squares
/// overflow f32 (entries above about 1e19) or fall below its normal range (below about 1e-19,
/// where the CPU threads flush them to zero) is first divided by its largest magnitude.
pub fn normalise_rows(values: &[f32], dim: usize) -> Vec<f32> {
    // Norms in this range are computed exactly as before, so ordinary rows keep their bits.
    const PLAIN: std::ops::RangeInclusive<f32> = 1e-15..=1e15;
    let mut out = values.to_vec();
    out.par_chunks_mut(dim.max(1)).for_each(|row| {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if PLAIN.contains(&n) {
            row.iter_mut().for_each(|v| *v /= n);
            return;
        }
        let scale = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if scale > 0.0 && scale.is_finite() {
            row.iter_mut().for_each(|v| *v /= scale);
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.iter_mut().for_each(|v| *v /= n);
        }
    });
    out
}

/// The order of every ranking here: higher score first, ties to the lower index, so that
/// results do not depend on the sort algorithm or on threads.
fn order(scores: &[f32], a: usize, b: usize) -> Ordering {
    scores[b].total_cmp(&scores[a]).then(a.cmp(&b))
}

/// The `k` best of `candidates` (indices into `scores`), best first.
pub fn top_k(scores: &[f32], mut candidates: Vec<usize>, k: usize) -> Vec<usize> {
    let k = k.min(candidates.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &usize, b: &usize| order(scores, *a, *b);
    candidates.select_nth_unstable_by(k - 1, cmp);
    candidates.truncate(k);
    candidates.sort_unstable_by(cmp);
    candidates
}

/// The `k` gallery rows most cosine-similar to each query row, best first: `(row, score)`.
/// Exact, one pass over the gallery per query, queries in parallel.
pub fn nearest(queries: &[f32], gallery: &[f32], dim: usize, k: usize) -> Vec<Vec<(usize, f32)>> {
    let q = normalise_rows(queries, dim);
    let g = normalise_rows(gallery, dim);
    q.par_chunks(dim)
        .map(|query| {
            let scores: Vec<f32> = g
                .chunks(dim)
                .map(|row| row.iter().zip(query).map(|(a, b)| a * b).sum())
                .collect();
            top_k(&scores, (0..scores.len()).collect(), k)
                .into_iter()
                .map(|i| (i, scores[i]))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_ranks_by_cosine_and_breaks_ties_by_index() {
        let gallery = [1.0, 0.0, 0.0, 1.0, 2.0, 0.1, 1.0, 0.0];
        let queries = [3.0, 0.0, 0.0, -1.0];
        let r = nearest(&queries, &gallery, 2, 3);
        assert_eq!(r[0].iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 3, 2]);
        assert!((r[0][0].1 - 1.0).abs() < 1e-6);
        // (0, -1) is orthogonal to rows 0 and 3 (a tie, broken by index) and opposed to row 1.
        assert_eq!(r[1].iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 3, 2]);
        assert_eq!(nearest(&queries, &gallery, 2, 10)[0].len(), 4);
    }

    #[test]
    fn a_zero_row_stays_zero_and_ranks_by_index() {
        let gallery = [0.0, 0.0, 1.0, 0.0, -1.0, 0.0];
        assert_eq!(normalise_rows(&gallery, 2), gallery.to_vec());
        let r = nearest(&[0.0, 0.0], &gallery, 2, 3);
        assert_eq!(r[0], vec![(0, 0.0), (1, 0.0), (2, 0.0)]);
        // As a gallery row, between the similar and the opposed one.
        let r = nearest(&[2.0, 0.0], &gallery, 2, 3);
        assert_eq!(r[0].iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 0, 2]);
    }

    #[test]
    fn the_ranking_does_not_depend_on_the_rows_lengths() {
        let gallery = [1.0, 0.0, 0.6, 0.8, -1.0, 0.2, 0.3, 0.3];
        let query = [0.9, 0.3];
        let plain = nearest(&query, &gallery, 2, 4);
        for scale in [1e-30f32, 1e-20, 1e20, 1e30] {
            let g: Vec<f32> = gallery.iter().map(|v| v * scale).collect();
            let q: Vec<f32> = query.iter().map(|v| v * scale).collect();
            let scaled = nearest(&q, &g, 2, 4);
            for (a, b) in plain[0].iter().zip(&scaled[0]) {
                assert_eq!(a.0, b.0, "scale {scale}: {plain:?} against {scaled:?}");
                assert!(
                    (a.1 - b.1).abs() < 1e-6,
                    "scale {scale}: {plain:?} against {scaled:?}"
                );
            }
        }
    }
}
