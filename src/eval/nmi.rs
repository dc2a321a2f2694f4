//! NMI of seeded k-means clusters against the labels (METHOD.md section 8).

use std::collections::HashMap;

use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

/// Seeded k-means (k-means++ start, Lloyd iterations) on unit vectors, then NMI between
/// clusters and labels (arithmetic normalisation, as scikit-learn's default).
///
/// Written here rather than taken from a clustering crate because the assignment step is a
/// matrix product that should run on the same device as everything else.
pub fn nmi_of_kmeans(x: &[f32], labels: &[i64], dim: usize, seed: u64, device: &Device) -> f64 {
    let clusters = kmeans(x, dim, count_distinct(labels), seed, 100, device);
    normalized_mutual_information(&clusters, labels)
}

fn count_distinct(labels: &[i64]) -> usize {
    let mut l = labels.to_vec();
    l.sort_unstable();
    l.dedup();
    l.len()
}

/// Cluster index of every row.
pub fn kmeans(
    x: &[f32],
    dim: usize,
    k: usize,
    seed: u64,
    max_iter: usize,
    device: &Device,
) -> Vec<usize> {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let n = x.len() / dim;
    let k = k.clamp(1, n);
    let mut rng = StdRng::seed_from_u64(seed);
    let row = |i: usize| &x[i * dim..(i + 1) * dim];
    let dist2 = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum::<f32>();
    // k-means++ seeding.
    let mut centres: Vec<f32> = row(rng.random_range(0..n)).to_vec();
    let mut nearest: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| dist2(row(i), &centres[..dim]))
        .collect();
    for _ in 1..k {
        let total: f64 = nearest.iter().map(|&d| d as f64).sum();
        let pick = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            let mut chosen = n - 1;
            for (i, &d) in nearest.iter().enumerate() {
                target -= d as f64;
                if target <= 0.0 {
                    chosen = i;
                    break;
                }
            }
            chosen
        } else {
            rng.random_range(0..n)
        };
        let c = row(pick).to_vec();
        nearest
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = d.min(dist2(row(i), &c)));
        centres.extend(c);
    }
    let xt = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, dim]), device);
    let mut assign = vec![usize::MAX; n];
    for _ in 0..max_iter {
        // argmin |x - c|^2 = argmax (x.c - |c|^2 / 2).
        let c = Tensor::<2>::from_data(TensorData::new(centres.clone(), [k, dim]), device);
        let half_norm = c
            .clone()
            .square()
            .sum_dim(1)
            .mul_scalar(0.5)
            .reshape([1, k]);
        let next: Vec<usize> = (xt.clone().matmul(c.transpose()) - half_norm)
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("indices")
            .into_iter()
            .map(|v| v as usize)
            .collect();
        if next == assign {
            break;
        }
        assign = next;
        let mut sums = vec![0.0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &a) in assign.iter().enumerate() {
            counts[a] += 1;
            for (s, v) in sums[a * dim..(a + 1) * dim].iter_mut().zip(row(i)) {
                *s += *v as f64;
            }
        }
        for j in 0..k {
            if counts[j] > 0 {
                for d in 0..dim {
                    centres[j * dim + d] = (sums[j * dim + d] / counts[j] as f64) as f32;
                }
            }
        }
    }
    assign
}

/// NMI with arithmetic-mean normalisation: `I(U; V) / ((H(U) + H(V)) / 2)`.
pub fn normalized_mutual_information(clusters: &[usize], labels: &[i64]) -> f64 {
    let n = clusters.len() as f64;
    let mut joint: HashMap<(usize, i64), f64> = HashMap::new();
    let mut pc: HashMap<usize, f64> = HashMap::new();
    let mut pl: HashMap<i64, f64> = HashMap::new();
    for (&c, &l) in clusters.iter().zip(labels) {
        *joint.entry((c, l)).or_default() += 1.0;
        *pc.entry(c).or_default() += 1.0;
        *pl.entry(l).or_default() += 1.0;
    }
    let entropy =
        |counts: Vec<f64>| -> f64 { counts.iter().map(|&c| -(c / n) * (c / n).ln()).sum() };
    let (hc, hl) = (
        entropy(pc.values().copied().collect()),
        entropy(pl.values().copied().collect()),
    );
    let mi: f64 = joint
        .iter()
        .map(|(&(c, l), &nij)| (nij / n) * ((nij * n) / (pc[&c] * pl[&l])).ln())
        .sum();
    if hc + hl == 0.0 {
        1.0
    } else {
        (2.0 * mi / (hc + hl)).clamp(0.0, 1.0)
    }
}
