//! The correlation graph of a batch (METHOD.md section 4).
//!
//! The graph is complete, self-loops included, so edges are stored densely: edge `e = i*N + j`
//! (source `i`, target `j`) is row `e` of an `[N*N, d]` tensor, and every gather or scatter over
//! edges is a reshape to `[N, N, d]`.

use burn::tensor::{Bool, Device, Tensor, TensorData};

/// How a batch is laid out: `classes` slots times `per_class` views, stored view-major
/// (row `v*C + c` is the v-th image of class slot c).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLayout {
    /// C: class slots per batch.
    pub classes: usize,
    /// P: images per class.
    pub per_class: usize,
}

impl BatchLayout {
    pub fn new(classes: usize, per_class: usize) -> Self {
        Self { classes, per_class }
    }

    /// N = C * P.
    pub fn nodes(&self) -> usize {
        self.classes * self.per_class
    }

    /// `[N, N]`, true where rows i and j show the same class (`i % C == j % C`).
    pub fn same_class_mask(&self, device: &Device) -> Tensor<2, Bool> {
        let n = self.nodes();
        let c = self.classes;
        let values: Vec<bool> = (0..n * n).map(|e| (e / n) % c == (e % n) % c).collect();
        Tensor::from_data(TensorData::new(values, [n, n]), device)
    }

    /// Source and target of every edge, `[E, 2]`, in edge order.
    pub fn edge_index(&self) -> Vec<[usize; 2]> {
        let n = self.nodes();
        (0..n * n).map(|e| [e / n, e % n]).collect()
    }
}

/// Nodes (the un-centred embeddings) and edge attributes of a batch.
#[derive(Clone, Debug)]
pub struct CorrelationGraph {
    pub layout: BatchLayout,
    /// `[N, d]`.
    pub nodes: Tensor<2>,
    /// `[N*N, d]`: `e_ij = x_i ⊙ x_j / (|x_i| |x_j|)` with `x` the channel-centred embeddings,
    /// so that each edge's channels sum to the Pearson correlation of its two nodes.
    pub edges: Tensor<2>,
    /// `[N, N]`, true for pairs of the same class.
    pub same_class: Tensor<2, Bool>,
}

impl CorrelationGraph {
    pub fn build(z: Tensor<2>, layout: BatchLayout) -> Self {
        let [n, d] = z.dims();
        assert_eq!(n, layout.nodes(), "batch size does not match the layout");
        let centred = z.clone() - z.clone().mean_dim(1);
        let norm = centred.clone().square().sum_dim(1).sqrt();
        let unit = centred / norm;
        let edges =
            (unit.clone().unsqueeze_dim::<3>(1) * unit.unsqueeze_dim::<3>(0)).reshape([n * n, d]);
        let same_class = layout.same_class_mask(&z.device());
        Self {
            layout,
            nodes: z,
            edges,
            same_class,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn edges_of_two_nodes_by_hand() {
        let device = Device::flex();
        // Centred: x0 = [-1, 0, 1], x1 = [1, -1, 0], both of norm sqrt(2).
        let z = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 3.0, 1.0, 2.0], [2, 3]),
            &device,
        );
        let g = CorrelationGraph::build(z.clone(), BatchLayout::new(2, 1));
        let expected = [
            [0.5, 0.0, 0.5],  // (0, 0)
            [-0.5, 0.0, 0.0], // (0, 1): sums to the Pearson correlation -0.5
            [-0.5, 0.0, 0.0], // (1, 0)
            [0.5, 0.5, 0.0],  // (1, 1)
        ];
        let edges = host(g.edges);
        assert_eq!(edges.len(), 12);
        for (e, row) in expected.iter().enumerate() {
            for (c, want) in row.iter().enumerate() {
                let got = edges[e * 3 + c];
                assert!(
                    (got - want).abs() < 1e-6,
                    "edge {e} channel {c}: {got} vs {want}"
                );
            }
        }
        // The nodes are the embeddings as given, not centred.
        assert_eq!(host(g.nodes), host(z));
    }

    #[test]
    fn edge_rows_follow_source_times_n_plus_target_and_sum_to_correlations() {
        let device = Device::flex();
        let (c, p, d) = (2, 3, 5);
        let n = c * p;
        // Rows of distinct shapes, so that every pair has its own correlation.
        let values: Vec<f32> = (0..n * d)
            .map(|k| ((k * k + 3 * k) % 11) as f32 - 0.3 * (k / d) as f32)
            .collect();
        let z = Tensor::<2>::from_data(TensorData::new(values.clone(), [n, d]), &device);
        let layout = BatchLayout::new(c, p);
        let g = CorrelationGraph::build(z, layout);
        assert_eq!(g.edges.dims(), [n * n, d]);
        let edges = host(g.edges);
        let row = |i: usize| -> Vec<f64> {
            let r: Vec<f64> = values[i * d..(i + 1) * d]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let mean = r.iter().sum::<f64>() / d as f64;
            let centred: Vec<f64> = r.iter().map(|v| v - mean).collect();
            let norm = centred.iter().map(|v| v * v).sum::<f64>().sqrt();
            centred.iter().map(|v| v / norm).collect()
        };
        for i in 0..n {
            for j in 0..n {
                let (a, b) = (row(i), row(j));
                let e = i * n + j;
                let pearson: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                let got: f64 = edges[e * d..(e + 1) * d].iter().map(|&v| v as f64).sum();
                assert!(
                    (got - pearson).abs() < 1e-5,
                    "edge ({i},{j}): {got} vs {pearson}"
                );
                for k in 0..d {
                    let want = a[k] * b[k];
                    let got = edges[e * d + k] as f64;
                    assert!((got - want).abs() < 1e-5, "edge ({i},{j}) channel {k}");
                }
            }
            // A node correlates perfectly with itself.
            let e = i * n + i;
            let own: f32 = edges[e * d..(e + 1) * d].iter().sum();
            assert!((own - 1.0).abs() < 1e-5, "self-loop of {i}: {own}");
        }
        let index = layout.edge_index();
        assert_eq!(index.len(), n * n);
        assert_eq!(index[1], [0, 1]);
        assert_eq!(index[n], [1, 0]);
        assert_eq!(index[2 * n + 5], [2, 5]);
        assert_eq!(index[n * n - 1], [n - 1, n - 1]);
    }

    #[test]
    fn same_class_pairs_are_view_major() {
        let device = Device::flex();
        // C = 3 slots, P = 2 views: rows 0..3 are view 0 of slots 0, 1, 2; rows 3..6 view 1.
        let layout = BatchLayout::new(3, 2);
        assert_eq!(layout.nodes(), 6);
        let mask: Vec<bool> = layout
            .same_class_mask(&device)
            .into_data()
            .try_to_vec::<bool>()
            .unwrap();
        let same = |i: usize, j: usize| mask[i * 6 + j];
        assert!(same(0, 3) && same(3, 0) && same(1, 4) && same(2, 5));
        assert!(same(4, 4));
        assert!(!same(0, 1) && !same(0, 4) && !same(3, 5) && !same(2, 3));
        assert_eq!(mask.iter().filter(|&&m| m).count(), 6 * 2);
    }
}
