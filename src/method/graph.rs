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
