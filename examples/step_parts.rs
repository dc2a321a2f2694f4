//! Forward + backward time of the head step's parts on burn's CPU backend (Flex), beside
//! `scripts/torch_step_parts.py` for PyTorch on the same shapes: which part of the GCA-HNG
//! step is slower than the release's, and by how much.
//!
//! `cargo run --release --example step_parts`

use std::time::Instant;

use burn::nn::{LayerNormConfig, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use gca_hng::backends::gelu;
use gca_hng::method::gnn::GnnConfig;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const N: usize = 81;
const D: usize = 512;

fn median(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2]
}

fn report(name: &str, both: f64) {
    println!("{name:<34} forward+backward {both:.4} s");
}

fn main() {
    let device = Device::flex().autodiff();
    device.seed(0);
    let e = N * N;
    let x = |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);

    let lin = LinearConfig::new(D, 4 * D).init(&device);
    let xe = x([e, D]).require_grad();
    let up = x([e, 4 * D]);
    let b = median(|| drop((lin.forward(xe.clone()) * up.clone()).sum().backward()));
    report("linear E x d -> 4d", b);

    let lin2 = LinearConfig::new(4 * D, D).init(&device);
    let xe4 = x([e, 4 * D]).require_grad();
    let up1 = x([e, D]);
    let b = median(|| drop((lin2.forward(xe4.clone()) * up1.clone()).sum().backward()));
    report("linear E x 4d -> d", b);

    let w = x([D, 4 * D]).require_grad();
    let b = median(|| drop((xe.clone().matmul(w.clone()) * up.clone()).sum().backward()));
    report("matmul E x d x 4d", b);

    let ln = LayerNormConfig::new(4 * D).init(&device);
    let b = median(|| drop((ln.forward(xe4.clone()) * up.clone()).sum().backward()));
    report("layer norm E x 4d", b);

    let b = median(|| drop((gelu(xe4.clone()) * up.clone()).sum().backward()));
    report("gelu E x 4d", b);

    let b = median(|| drop((xe4.clone() * up.clone()).sum().backward()));
    report("mul+sum E x 4d", b);

    let e3 = Tensor::<3>::random([N, N, D], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let fo = Tensor::<3>::random([N, D, 1], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let upb = Tensor::<3>::random([N, N, 1], Distribution::Normal(0.0, 1.0), &device);
    let b = median(|| {
        drop(
            (e3.clone().matmul(fo.clone()) * upb.clone())
                .sum()
                .backward(),
        )
    });
    report("batched N x (N x d x 1)", b);
    let f2 = x([N, D]).require_grad();
    let b = median(|| {
        drop(
            (e3.clone() * f2.clone().unsqueeze_dim::<3>(0))
                .sum_dim(2)
                .sum()
                .backward(),
        )
    });
    report("broadcast mul + sum_dim", b);

    let gnn = GnnConfig::new(D, 100).init(&device);
    let layer = &gnn.layers[0];
    let h = x([N, D]).require_grad();
    let edges = x([e, D]).require_grad();
    let upe = x([e, D]);
    let b = median(|| {
        drop(
            (layer.edge.forward(h.clone(), edges.clone()) * upe.clone())
                .sum()
                .backward(),
        )
    });
    report("edge update", b);
    let same = gca_hng::method::graph::BatchLayout::new(27, 3).same_class_mask(&device);
    let upn = x([N, D]);
    let b = median(|| {
        drop(
            (layer.node.forward(h.clone(), edges.clone(), same.clone()) * upn.clone())
                .sum()
                .backward(),
        )
    });
    report("node update", b);
}
