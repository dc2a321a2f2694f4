//! Two independent matrix products (a Linear's input and weight gradients), one after the
//! other on both cores against side by side on one core each, with `gemm` as the kernels
//! call it. Issue 9 uses it to decide how a backward pass spends two cores.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release --example pair_bench`

use std::time::Instant;

use gemm::{Parallelism, gemm};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `c [m, n] = a [m, k] x b [k, n]`, `a` and `b` by (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn product(
    m: usize,
    n: usize,
    k: usize,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    par: Parallelism,
) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    // SAFETY: the operands are dense matrices of the stated shapes and strides.
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    };
    c
}

fn main() {
    // (rows of the input, d_in, d_out): the edge MLP's two Linears and a node-level one.
    for (m, k, n) in [(6561, 512, 2048), (6561, 2048, 512), (81, 1024, 512)] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let g: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32 * 0.1).collect();
        // dx = g W^T [m, k]; dW = x^T g [k, n].
        let dx = |p| product(m, k, n, (&g, n, 1), (&w, 1, n), p);
        let dw = |p| product(k, n, m, (&x, 1, k), (&g, n, 1), p);
        let time = |f: &dyn Fn()| {
            let mut t: Vec<f64> = (0..7)
                .map(|_| {
                    let s = Instant::now();
                    f();
                    s.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[3]
        };
        let seq = time(&|| {
            std::hint::black_box((dx(Parallelism::Rayon(0)), dw(Parallelism::Rayon(0))));
        });
        let side = time(&|| {
            std::hint::black_box(rayon::join(
                || dx(Parallelism::None),
                || dw(Parallelism::None),
            ));
        });
        let flops = 4.0 * (m * n * k) as f64 / 1e9;
        println!(
            "m={m} k={k} n={n}: one after the other {:.1} GFLOP/s, side by side {:.1} GFLOP/s",
            flops / seq,
            flops / side
        );
    }
}
