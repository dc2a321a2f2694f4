//! The GNN decoder (METHOD.md section 5): L layers of node update then edge update, and two
//! heads — channel-wise interpolation coefficients per edge and class logits per node.

use burn::config::Config;
use burn::module::{Initializer, Module};
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};

use crate::backends::pairs::{pair_dots, pair_mix};
use crate::backends::{layer_norm, linear, linear_gelu, sigmoid};
use crate::io::state_dict::{TorchNamed, TorchParam, join};
use crate::method::graph::CorrelationGraph;
use crate::nn::batch_norm::{BatchNorm1d, BatchNorm1dConfig, gelu_norm};

/// Masked scores are pushed this far down; `exp` of it is exactly 0 in f32, without the
/// infinities that some GPU compilers mishandle.
const MASKED: f32 = -1.0e30;

/// Configuration of the [`Gnn`].
#[derive(Config, Debug)]
pub struct GnnConfig {
    /// Embedding width `d` (node and edge features).
    pub embedding_dim: usize,
    /// Number of training classes (width of the node classifier).
    pub num_classes: usize,
    /// Number of layers L. Default: 2.
    #[config(default = 2)]
    pub num_layers: usize,
    /// Attention heads H of the node update; must divide `embedding_dim`. Default: 4.
    #[config(default = 4)]
    pub num_heads: usize,
    /// Dropout on the edge update's attention weights while training. Default: 0.1.
    #[config(default = 0.1)]
    pub attention_dropout: f64,
    /// LayerNorm epsilon. Default: 1e-5 (PyTorch's).
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
}

/// What the GNN returns for a graph.
#[derive(Clone, Debug)]
pub struct GnnOutput {
    /// `[N, num_classes]`.
    pub node_logits: Tensor<2>,
    /// `[N*N, d]` in (0, 1): the channel-wise interpolation coefficients ω.
    pub edge_coeff: Tensor<2>,
}

/// A Linear with Xavier-uniform weight and zero bias, as the release initialises attention.
fn xavier_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    let mut linear = LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::XavierUniform { gain: 1.0 })
        .init(device);
    linear.bias = Some(Initializer::Zeros.init([d_out], device));
    linear
}

/// Attention weights over the last axis with masked entries removed and an extra zero logit:
/// `a_r = exp(s_r) / (1 + sum_{r' unmasked} exp(s_r'))`. The zero logit lets a node attend to
/// nothing when all its negatives score low. Computed with the shift `m = max(0, max_r s_r)`,
/// which cancels exactly and so needs no gradient.
pub fn softmax_with_zero_logit(scores: Tensor<3>, masked: Tensor<3, Bool>) -> Tensor<3> {
    let scores = scores.mask_fill(masked, MASKED);
    let m = scores.clone().max_dim(2).clamp_min(0.0).detach();
    let weights = (scores - m.clone()).exp();
    let denom = weights.clone().sum_dim(2) + m.neg().exp();
    weights / denom
}

/// Node update: multi-head attention over negatives only, edge-to-node messages, feed-forward.
#[derive(Module, Debug)]
pub struct NodeUpdate {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub out: Linear,
    pub edge_to_node: Linear,
    /// Created by the release and never used; kept so its checkpoints load strictly.
    pub update_node: Linear,
    pub ff_in: Linear,
    pub ff_out: Linear,
    pub norm: LayerNorm,
    pub num_heads: usize,
    /// The LayerNorms' epsilon (burn's `LayerNorm` does not expose it).
    pub layer_norm_eps: f64,
}

impl NodeUpdate {
    fn new(config: &GnnConfig, device: &Device) -> Self {
        let d = config.embedding_dim;
        Self {
            query: xavier_linear(d, d, device),
            key: xavier_linear(d, d, device),
            value: xavier_linear(d, d, device),
            out: xavier_linear(d, d, device),
            edge_to_node: LinearConfig::new(d, d).init(device),
            update_node: LinearConfig::new(d, d).init(device),
            ff_in: LinearConfig::new(d, 4 * d).init(device),
            ff_out: LinearConfig::new(4 * d, d).init(device),
            norm: LayerNormConfig::new(d)
                .with_epsilon(config.layer_norm_eps)
                .init(device),
            num_heads: config.num_heads,
            layer_norm_eps: config.layer_norm_eps,
        }
    }

    /// `h`: `[N, d]`; `edges`: `[N*N, d]`; `same_class`: `[N, N]`.
    pub fn forward(
        &self,
        h: Tensor<2>,
        edges: Tensor<2>,
        same_class: Tensor<2, Bool>,
    ) -> Tensor<2> {
        let [n, d] = h.dims();
        let heads = self.num_heads;
        let hd = d / heads;
        let split = |t: Tensor<2>| t.reshape([n, heads, hd]).swap_dims(0, 1);
        let q = split(linear(&self.query, h.clone()));
        let k = split(linear(&self.key, h.clone()));
        let v = split(linear(&self.value, h.clone()));

        // scores[h, c, r] = q_c · k_r: target c attends to source r.
        let scores = q.matmul(k.swap_dims(1, 2)).div_scalar((hd as f64).sqrt());
        let mask = same_class.unsqueeze_dim::<3>(0).expand([heads, n, n]);
        let att = softmax_with_zero_logit(scores, mask)
            .matmul(v)
            .swap_dims(0, 1)
            .reshape([n, d]);
        let h1 = gelu_norm(&self.norm, self.layer_norm_eps, h + linear(&self.out, att));

        // Messages summed over the edges whose source is the node.
        let msg = linear_gelu(&self.edge_to_node, edges)
            .reshape([n, n, d])
            .sum_dim(1)
            .reshape([n, d]);
        let h2 = gelu_norm(&self.norm, self.layer_norm_eps, h1 + msg);
        let ff = linear(&self.ff_out, linear_gelu(&self.ff_in, h2.clone()));
        gelu_norm(&self.norm, self.layer_norm_eps, h2 + ff)
    }
}

impl TorchNamed for NodeUpdate {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        let p = join(prefix, "layers.0");
        self.query.torch_names(&join(&p, "att.q_linear"), out);
        self.key.torch_names(&join(&p, "att.k_linear"), out);
        self.value.torch_names(&join(&p, "att.v_linear"), out);
        self.out.torch_names(&join(&p, "att.out"), out);
        self.edge_to_node
            .torch_names(&join(&p, "edge_to_node"), out);
        self.update_node.torch_names(&join(&p, "update_node"), out);
        self.ff_in.torch_names(&join(&p, "linear1"), out);
        self.ff_out.torch_names(&join(&p, "linear2"), out);
        self.norm.torch_names(&join(&p, "norm.1"), out);
    }
}

/// Edge update: each edge attends over its two endpoint tokens, then a feed-forward block.
#[derive(Module, Debug)]
pub struct EdgeUpdate {
    pub node_to_edge: Linear,
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub mlp_in: Linear,
    pub mlp_norm: LayerNorm,
    pub mlp_out: Linear,
    pub norm: LayerNorm,
    pub dropout: Dropout,
    /// The LayerNorms' epsilon (burn's `LayerNorm` does not expose it).
    pub layer_norm_eps: f64,
}

impl EdgeUpdate {
    fn new(config: &GnnConfig, device: &Device) -> Self {
        let d = config.embedding_dim;
        Self {
            node_to_edge: LinearConfig::new(d, d).init(device),
            query: xavier_linear(d, d, device),
            key: xavier_linear(d, d, device),
            value: xavier_linear(d, d, device),
            mlp_in: LinearConfig::new(d, 4 * d).init(device),
            mlp_norm: LayerNormConfig::new(4 * d)
                .with_epsilon(config.layer_norm_eps)
                .init(device),
            mlp_out: LinearConfig::new(4 * d, d).init(device),
            norm: LayerNormConfig::new(d)
                .with_epsilon(config.layer_norm_eps)
                .init(device),
            dropout: DropoutConfig::new(config.attention_dropout).init(),
            layer_norm_eps: config.layer_norm_eps,
        }
    }

    /// `h`: the updated nodes `[N, d]`; `edges`: `[N*N, d]`.
    pub fn forward(&self, h: Tensor<2>, edges: Tensor<2>) -> Tensor<2> {
        let [n, d] = h.dims();
        let tokens = linear_gelu(&self.node_to_edge, h);
        let keys = linear(&self.key, tokens.clone());
        let values = linear(&self.value, tokens);

        // Q_rc · K_t = e_rc · (W_q K_t) + b_q · K_t: folding the query projection into the
        // per-node keys avoids an E x d x d product for Q (Linear commutes with the gather).
        let wq = self.query.weight.val(); // [in, out]
        let folded = keys.clone().matmul(wq.transpose()); // [N, d]: W_q K_t per node
        let shift = match &self.query.bias {
            Some(b) => (keys * b.val().unsqueeze_dim::<2>(0)).sum_dim(1), // [N, 1]
            None => Tensor::zeros([n, 1], &folded.device()),
        };
        // Both tokens' scores of every edge, `e_rc · (W_q K_r)` and `e_rc · (W_q K_c)`.
        let dots = pair_dots(edges.clone().reshape([n, n, d]), folded);
        let s_src = dots.clone().narrow(2, 0, 1).reshape([n, n]) + shift.clone();
        let s_dst = dots.narrow(2, 1, 1).reshape([n, n]) + shift.reshape([1, n]);
        // A softmax over two logits is a sigmoid of their difference.
        let scale = 1.0 / (d as f64).sqrt();
        let w_src = sigmoid((s_src - s_dst).mul_scalar(scale));
        let w_dst = w_src.clone().neg().add_scalar(1.0);
        let weights = Tensor::stack::<3>(vec![w_src, w_dst], 2);
        let weights = if self.dropout.prob > 0.0 {
            self.dropout.forward(weights)
        } else {
            weights
        };
        let u = pair_mix(weights, values);
        let e1 = gelu_norm(
            &self.norm,
            self.layer_norm_eps,
            u.reshape([n * n, d]) + edges,
        );
        let mlp = linear(
            &self.mlp_out,
            layer_norm(
                &self.mlp_norm,
                self.layer_norm_eps,
                linear_gelu(&self.mlp_in, e1.clone()),
            ),
        );
        gelu_norm(&self.norm, self.layer_norm_eps, mlp + e1)
    }
}

impl TorchNamed for EdgeUpdate {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.node_to_edge
            .torch_names(&join(prefix, "node_to_edge"), out);
        self.query.torch_names(&join(prefix, "att.q_linear"), out);
        self.key.torch_names(&join(prefix, "att.k_linear"), out);
        self.value.torch_names(&join(prefix, "att.v_linear"), out);
        self.mlp_in.torch_names(&join(prefix, "linear.0"), out);
        self.mlp_norm.torch_names(&join(prefix, "linear.2"), out);
        self.mlp_out.torch_names(&join(prefix, "linear.3"), out);
        self.norm.torch_names(&join(prefix, "norm.1"), out);
    }
}

/// One GNN layer: node update, then edge update with the new nodes.
#[derive(Module, Debug)]
pub struct GnnLayer {
    pub node: NodeUpdate,
    pub edge: EdgeUpdate,
}

impl TorchNamed for GnnLayer {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.node.torch_names(&join(prefix, "node_model"), out);
        self.edge.torch_names(&join(prefix, "edge_model"), out);
    }
}

/// The GNN decoder (`gnn` in the release).
#[derive(Module, Debug)]
pub struct Gnn {
    pub reduce: Linear,
    pub layers: Vec<GnnLayer>,
    pub edge_norm: BatchNorm1d,
    pub node_norm: BatchNorm1d,
    pub coeff: Linear,
    pub classifier: Linear,
}

impl GnnConfig {
    pub fn init(&self, device: &Device) -> Gnn {
        assert!(
            self.num_heads > 0 && self.embedding_dim.is_multiple_of(self.num_heads),
            "num_heads ({}) must divide embedding_dim ({})",
            self.num_heads,
            self.embedding_dim
        );
        let d = self.embedding_dim;
        // Both head BatchNorms start at weight 1, bias 0, and never train their bias.
        let head_norm = || {
            BatchNorm1dConfig::new(d)
                .with_trainable_bias(false)
                .init(device)
        };
        Gnn {
            reduce: LinearConfig::new(d, d).init(device),
            layers: (0..self.num_layers)
                .map(|_| GnnLayer {
                    node: NodeUpdate::new(self, device),
                    edge: EdgeUpdate::new(self, device),
                })
                .collect(),
            edge_norm: head_norm(),
            node_norm: head_norm(),
            coeff: LinearConfig::new(d, d).init(device),
            classifier: LinearConfig::new(d, self.num_classes).init(device),
        }
    }
}

impl Gnn {
    pub fn forward(&self, graph: &CorrelationGraph) -> GnnOutput {
        let mut h = linear(&self.reduce, graph.nodes.clone());
        let mut edges = graph.edges.clone();
        for layer in &self.layers {
            h = layer
                .node
                .forward(h, edges.clone(), graph.same_class.clone());
            edges = layer.edge.forward(h.clone(), edges);
        }
        GnnOutput {
            node_logits: linear(&self.classifier, self.node_norm.forward(h)),
            edge_coeff: sigmoid(linear(&self.coeff, self.edge_norm.forward(edges))),
        }
    }
}

impl TorchNamed for Gnn {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.reduce.torch_names(&join(prefix, "dim_red"), out);
        self.layers.torch_names(&join(prefix, "gnn"), out);
        self.edge_norm
            .torch_names(&join(prefix, "bottleneck1.0"), out);
        self.node_norm
            .torch_names(&join(prefix, "bottleneck2.0"), out);
        self.coeff.torch_names(&join(prefix, "fc.0"), out);
        self.classifier.torch_names(&join(prefix, "cls.0"), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn zero_logit_softmax_skips_masked_entries() {
        let device = Device::flex();
        let scores =
            Tensor::<3>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0], [1, 1, 3]), &device);
        let mask = Tensor::<3, Bool>::from_data(
            TensorData::new(vec![false, true, false], [1, 1, 3]),
            &device,
        );
        let w: Vec<f32> = softmax_with_zero_logit(scores, mask)
            .into_data()
            .try_to_vec()
            .unwrap();
        let e1 = 1f64.exp();
        let e3 = 3f64.exp();
        let denom = 1.0 + e1 + e3;
        let expected = [e1 / denom, 0.0, e3 / denom];
        for (a, b) in w.iter().zip(expected) {
            assert!((*a as f64 - b).abs() < 1e-6, "{w:?} vs {expected:?}");
        }
        // The extra zero logit keeps the weights below one in total.
        assert!((w.iter().sum::<f32>() as f64 - (e1 + e3) / denom).abs() < 1e-6);
    }

    #[test]
    fn zero_logit_softmax_is_stable_for_large_scores() {
        let device = Device::flex();
        let scores =
            Tensor::<3>::from_data(TensorData::new(vec![1000.0f32, 999.0], [1, 1, 2]), &device);
        let mask =
            Tensor::<3, Bool>::from_data(TensorData::new(vec![false, false], [1, 1, 2]), &device);
        let w: Vec<f32> = softmax_with_zero_logit(scores, mask)
            .into_data()
            .try_to_vec()
            .unwrap();
        let e = (-1f64).exp();
        assert!((w[0] as f64 - 1.0 / (1.0 + e)).abs() < 1e-6, "{w:?}");
        assert!((w[1] as f64 - e / (1.0 + e)).abs() < 1e-6, "{w:?}");
    }
}
