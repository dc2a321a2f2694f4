//! Exact cosine nearest neighbours of query embeddings in a gallery.

use rayon::prelude::*;

/// Rows scaled to unit length (zero rows stay zero).
pub fn normalise_rows(values: &[f32], dim: usize) -> Vec<f32> {
    let mut out = values.to_vec();
    for row in out.chunks_mut(dim.max(1)) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|v| *v /= n);
        }
    }
    out
}

/// The `k` gallery rows most cosine-similar to each query row, best first: `(row, score)`.
/// Exact, one pass over the gallery per query, queries in parallel.
pub fn nearest(queries: &[f32], gallery: &[f32], dim: usize, k: usize) -> Vec<Vec<(usize, f32)>> {
    let q = normalise_rows(queries, dim);
    let g = normalise_rows(gallery, dim);
    q.par_chunks(dim)
        .map(|query| {
            let mut scored: Vec<(usize, f32)> = g
                .chunks(dim)
                .enumerate()
                .map(|(i, row)| (i, row.iter().zip(query).map(|(a, b)| a * b).sum()))
                .collect();
            let k = k.min(scored.len());
            if k == 0 {
                return Vec::new();
            }
            scored.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            scored.truncate(k);
            scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            scored
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
}
