//! J_div, the diversity of the GNN's coefficients across the edges of a node (METHOD.md
//! section 6).
//!
//! ```text
//! J_div = 1 - sqrt( sum_e |ω_e - ω̄_source(e)|^2 / E )
//! ```

use burn::tensor::Tensor;

/// J_div before its 0.01 factor: `1 - sqrt(sum_e |ω_e - ω̄_source(e)|^2 / E)`, low when
/// coefficients vary across the edges of a node.
pub fn diversity_loss(coeff: Tensor<2>, nodes: usize) -> Tensor<1> {
    let [e, d] = coeff.dims();
    let per_source = coeff.reshape([nodes, nodes, d]);
    let mean = per_source.clone().mean_dim(1);
    let spread = (per_source - mean)
        .square()
        .sum()
        .div_scalar(e as f64)
        .sqrt();
    spread.neg().add_scalar(1.0)
}
