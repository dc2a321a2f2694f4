//! Matrix-product throughput of burn's CPU backend (Flex) on the head step's largest shapes,
//! contiguous and with a transposed operand (as autodiff's backward passes produce), beside
//! `scripts/torch_matmul_bench.py` for PyTorch on the same shapes. Issue 9 uses it to tell
//! whether the head step's time in matrix products is the kernel or the shapes it is given.
//!
//! `cargo run --release --example matmul_bench`

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};

// The binary's allocator, so that outputs are allocated as in training.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The edge MLP of a GNN layer: `E x d x 4d` and back, with E = 81 * 81 edges and d = 512,
/// in the three layouts the forward and backward passes multiply.
const SHAPES: [(usize, usize, usize); 4] = [
    (6561, 512, 2048),
    (6561, 2048, 512),
    (2048, 6561, 512),
    (1024, 1024, 1024),
];

fn gflops(m: usize, k: usize, n: usize, ta: bool, tb: bool, device: &Device) -> f64 {
    let a = if ta {
        Tensor::<2>::random([k, m], Distribution::Default, device).transpose()
    } else {
        Tensor::<2>::random([m, k], Distribution::Default, device)
    };
    let b = if tb {
        Tensor::<2>::random([n, k], Distribution::Default, device).transpose()
    } else {
        Tensor::<2>::random([k, n], Distribution::Default, device)
    };
    let mut times: Vec<f64> = (0..6)
        .map(|_| {
            let start = Instant::now();
            let c = a.clone().matmul(b.clone());
            let _ = device.sync();
            drop(c);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    2.0 * (m * n * k) as f64 / times[2] / 1e9
}

fn main() {
    let device = Device::flex();
    for (m, k, n) in SHAPES {
        for (ta, tb) in [(false, false), (true, false), (false, true)] {
            let g = gflops(m, k, n, ta, tb, &device);
            println!("m={m} k={k} n={n} a^T={ta} b^T={tb}: {g:.1} GFLOP/s (burn Flex)");
        }
    }
}
