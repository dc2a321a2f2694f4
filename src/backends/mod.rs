//! Our own CPU kernels for burn's Flex backend, reached through burn's backend-extension
//! mechanism: burn-flex runs element-wise operations on one thread with libm's scalar
//! special functions, which left a core idle for much of a training step. Other devices keep
//! burn's own operations.

// Declared before the kernel modules so that they can use it.
/// `fn $name(args) -> ret` that runs `$generic` compiled for AVX-512 (F/DQ/VL, with AVX2 and
/// FMA) or for AVX2 + FMA when the CPU has them, and as built otherwise (the binary targets
/// baseline x86-64, SSE2). The compiled copies are `$name::avx512` and `$name::avx2`, for
/// tests that compare them.
macro_rules! simd_dispatch {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $generic:path) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if $crate::backends::has_avx512() {
                // SAFETY: the CPU has AVX-512 F/DQ/VL, AVX2 and FMA (checked just above).
                return unsafe { $name::avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::backends::has_avx2() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { $name::avx2($($arg),*) };
            }
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
            pub(super) fn avx512($($arg: $ty),*) $(-> $ret)? {
                $generic($($arg),*)
            }

            #[target_feature(enable = "avx2,fma")]
            pub(super) fn avx2($($arg: $ty),*) $(-> $ret)? {
                $generic($($arg),*)
            }
        }
    };
}

pub mod adamw;
mod autodiff;
pub mod batch_norm;
pub mod conv2d;
pub mod depthwise;
pub mod gelu;
mod gemm;
pub mod layer_norm;
pub mod linear;
pub mod linear_gelu;
pub mod pairs;
pub mod sigmoid;
pub mod subnormals;

pub use gelu::gelu;
pub(crate) use gemm::product_nt;
pub use layer_norm::layer_norm;
pub use linear::{linear, matmul_weight};
pub use linear_gelu::linear_gelu;
pub use sigmoid::sigmoid;
pub use subnormals::flush_subnormals_on_cpu_threads;

use burn::backend::DispatchDevice;
use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::Device;
use burn::tensor::{Bytes, DType, Shape};

/// Whether tensors on `device` run on burn's Flex backend (with or without autodiff), where
/// the kernels of this module apply.
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    )
}

/// Whether the CPU has AVX-512 F/DQ/VL, AVX2 and FMA.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX2 and FMA.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Element count of one rayon task: large enough that scheduling costs little, small enough
/// that the tensors of a step (tens of thousands to millions of elements) split over every core.
pub(crate) const CHUNK: usize = 1 << 14;

/// Rows per rayon task: about `CHUNK` elements, at least one row.
pub(crate) fn rows_per_task(row: usize) -> usize {
    (CHUNK / row.max(1)).max(1)
}

/// Runs `work` on a thread of rayon's pool (the current one, else the global one) and returns
/// its result. Every parallel region that a thread outside the pool starts (burn-flex's, gemm's
/// and ours alike) is injected into the pool's queue: the calling thread wakes the workers with
/// a system call, sleeps until they finish, and is woken again. A training step starts
/// thousands of such regions, and that round trip was a large share of the calling thread's
/// time (BENCHMARKS.md, "CPU speed, seventh round"). On a worker, a region is pushed to the
/// worker's own deque, the worker takes part in it, and only an idle peer is woken.
pub fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    // `scope` runs its closure on a worker of the current pool (`in_worker`), which no public
    // entry point of the global pool offers otherwise (`ThreadPool::install` needs a pool of
    // our own, which burn-flex and gemm would not share).
    rayon::scope(|_| work())
}

/// `len` zeros, written on every core. A zero-filled buffer from the allocator is a memset on
/// the calling thread alone; for the activations of a training step those memsets were a large
/// share of the calling thread's time while the other cores waited (BENCHMARKS.md, "CPU speed,
/// fifth round").
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    use rayon::prelude::*;
    if len < 4 * CHUNK {
        return vec![0.0; len];
    }
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(4 * CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the first `len` elements were written just above.
    unsafe { v.set_len(len) };
    v
}

/// A new vector of `len` elements, each block of `block` elements written by
/// `fill(block index, block)` on every core, without first zeroing it. `fill` must write every
/// element of its block.
pub(crate) fn par_blocks<F>(len: usize, block: usize, fill: F) -> Vec<f32>
where
    F: Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
{
    use rayon::prelude::*;
    let mut out = Vec::<f32>::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(block.max(1))
        .enumerate()
        .for_each(|(i, dst)| fill(i, dst));
    // SAFETY: every block of the first `len` elements was written by `fill`.
    unsafe { out.set_len(len) };
    out
}

/// A new vector of `len` elements, each block of `block` elements zeroed and then handed to
/// `fill(block index, block)` by one task, on every core. The block is in cache when `fill`
/// writes it; [`zeroed`] followed by a parallel pass writes the whole buffer to memory twice.
pub(crate) fn par_blocks_zeroed<F>(len: usize, block: usize, fill: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    par_blocks(len, block, |i, dst| fill(i, zero_init(dst)))
}

/// `dst` zeroed, as the initialised slice it now is.
fn zero_init(dst: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    dst.fill(std::mem::MaybeUninit::new(0.0));
    // SAFETY: every element was initialised just above, and `MaybeUninit<f32>` has the layout
    // of `f32`.
    unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// An output buffer that tasks write in disjoint ranges that are not its blocks in order (a
/// block of channels through every image of a batch, say), which `par_chunks_mut` cannot hand
/// out. Made with a vector's capacity; the vector's length is set once every element has been
/// written.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);

// SAFETY: the tasks that share it write disjoint ranges (`range`'s contract).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn of(v: &mut Vec<f32>) -> Self {
        Self(v.as_mut_ptr())
    }

    /// The elements `r`, zeroed.
    ///
    /// # Safety
    /// `r` lies within the vector's capacity, and no other live slice from this buffer
    /// overlaps it.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range(&self, r: std::ops::Range<usize>) -> &mut [f32] {
        // SAFETY: in bounds and unaliased by the contract; zeroed before the slice is made.
        unsafe {
            let p = self.0.add(r.start);
            p.write_bytes(0, r.len());
            std::slice::from_raw_parts_mut(p, r.len())
        }
    }
}

/// A new vector of `n` elements, filled in parallel chunks by `fill(range, chunk)`, without
/// first zeroing it.
pub(crate) fn par_map<F>(n: usize, fill: F) -> Vec<f32>
where
    F: Fn(std::ops::Range<usize>, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
{
    par_blocks(n, CHUNK, |i, dst| {
        let start = i * CHUNK;
        fill(start..start + dst.len(), dst)
    })
}

/// The per-task partial sums `parts` (each of length `n`) added in task order, so that a
/// gradient does not depend on how rayon split the work (or on the number of threads:
/// data-parallel ranks run fewer).
pub(crate) fn sum_in_order(parts: Vec<Vec<f64>>, n: usize) -> Vec<f64> {
    parts.into_iter().fold(vec![0.0; n], |mut total, part| {
        total.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
        total
    })
}

/// Lanes of the f64 sums: independent running sums that the compiler keeps in vector
/// registers (one running sum is a chain of dependent additions, several times slower).
pub(crate) const LANES: usize = 8;

/// `sum(x)` in f64.
#[inline(always)]
pub(crate) fn sum_f64(x: &[f32]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    for c in chunks {
        for k in 0..LANES {
            lanes[k] += f64::from(c[k]);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// `sum((x - mean)^2)` in f64.
#[inline(always)]
pub(crate) fn sum_sq_dev_f64(x: &[f32], mean: f64) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum();
    for c in chunks {
        for k in 0..LANES {
            let d = f64::from(c[k]) - mean;
            lanes[k] += d * d;
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// `(sum(a), sum(b))` in f64 over the pairs `f(x[i], y[i], z[i])` of three equally long
/// slices: element `i` goes into lane `i % LANES` while whole chunks of `LANES` last, the tail
/// after, in order.
///
/// The pairs are computed a block at a time into two f32 buffers, and each buffer then added
/// to its lanes on its own. In one loop the compiler vectorised neither: it packed each pair
/// `(a, b)` into one register, and `f` ran a lane at a time. The sums are the same, bit for
/// bit: the same values in the same lanes in the same order.
#[inline(always)]
pub(crate) fn sum_pairs_f64(
    (x, y, z): (&[f32], &[f32], &[f32]),
    f: impl Fn(f32, f32, f32) -> (f32, f32),
) -> (f64, f64) {
    use std::mem::MaybeUninit;
    /// Pairs per block: a multiple of `LANES`, the two buffers 2 KB each on the stack.
    const BLOCK: usize = 64 * LANES;
    let n = x.len().min(y.len()).min(z.len());
    let (x, y, z) = (&x[..n], &y[..n], &z[..n]);
    if n < LANES {
        // The tail alone: the lanes would add `+0.0`, which changes no sum here (a sum that
        // starts at `+0.0` is never `-0.0`). Small planes (2 x 2 late in a network) come by
        // the ten thousand, and setting up and adding the lanes cost more than their pairs.
        let (mut ra, mut rb) = (0.0f64, 0.0f64);
        for ((&x, &y), &z) in x.iter().zip(y).zip(z) {
            let (a, b) = f(x, y, z);
            ra += f64::from(a);
            rb += f64::from(b);
        }
        return (ra, rb);
    }
    let (mut la, mut lb) = ([0.0f64; LANES], [0.0f64; LANES]);
    // Uninitialised: small planes come by the thousand, and zeroing 4 KB each time would cost
    // more than their pairs. Only the part just written is read.
    let mut a = [const { MaybeUninit::<f32>::uninit() }; BLOCK];
    let mut b = [const { MaybeUninit::<f32>::uninit() }; BLOCK];
    let whole = n - n % LANES;
    let mut start = 0;
    while start < whole {
        let len = BLOCK.min(whole - start);
        let block = start..start + len;
        for (((a, b), &x), (&y, &z)) in a[..len]
            .iter_mut()
            .zip(&mut b[..len])
            .zip(&x[block.clone()])
            .zip(y[block.clone()].iter().zip(&z[block]))
        {
            let (va, vb) = f(x, y, z);
            a.write(va);
            b.write(vb);
        }
        // SAFETY: the first `len` elements of both buffers were written just above, and
        // `MaybeUninit<f32>` has the layout of `f32`.
        let (a, b) = unsafe {
            (
                &*(&a[..len] as *const [MaybeUninit<f32>] as *const [f32]),
                &*(&b[..len] as *const [MaybeUninit<f32>] as *const [f32]),
            )
        };
        add_to_lanes(&mut la, a);
        add_to_lanes(&mut lb, b);
        start += len;
    }
    let (mut ra, mut rb) = (0.0f64, 0.0f64);
    for ((&x, &y), &z) in x[whole..].iter().zip(&y[whole..]).zip(&z[whole..]) {
        let (a, b) = f(x, y, z);
        ra += f64::from(a);
        rb += f64::from(b);
    }
    (la.iter().sum::<f64>() + ra, lb.iter().sum::<f64>() + rb)
}

/// `values[i]` added to `lanes[i % LANES]`, in order; `values.len()` is a multiple of `LANES`.
#[inline(always)]
fn add_to_lanes(lanes: &mut [f64; LANES], values: &[f32]) {
    let (chunks, rest) = values.as_chunks::<LANES>();
    debug_assert!(rest.is_empty());
    for c in chunks {
        for k in 0..LANES {
            lanes[k] += f64::from(c[k]);
        }
    }
}

/// `t` with a contiguous layout, copied only when it is a strided view.
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// A contiguous f32 tensor of `values` in the shape of `like`.
pub(crate) fn from_vec(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    from_vec_shaped(values, like.layout().shape().clone())
}

/// A contiguous f32 tensor of `values` in `shape`.
pub(crate) fn from_vec_shaped(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// Where a convolution kernel runs over its input: `[stride_h, stride_w, pad_top, pad_left,
/// out_h, out_w]`. Padding is implicit zeros; the bottom and right padding follow from the
/// output size.
pub type Geometry = [usize; 6];

/// `o` in `0..out` with `0 <= o * stride + k - pad < size`.
pub(crate) fn valid(
    size: usize,
    stride: usize,
    pad: usize,
    k: usize,
    out: usize,
) -> std::ops::Range<usize> {
    // o * stride >= pad - k
    let lo = pad.saturating_sub(k).div_ceil(stride);
    // o * stride + k - pad <= size - 1  <=>  o * stride <= size - 1 + pad - k
    let hi = if size + pad > k {
        ((size - 1 + pad - k) / stride + 1).min(out)
    } else {
        0
    };
    lo.min(hi)..hi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_pool_runs_on_a_worker_and_returns_its_result() {
        use rayon::prelude::*;
        // From a thread outside any pool: the work moves onto a worker of the global pool.
        let outside = std::thread::spawn(|| {
            let before = rayon::current_thread_index();
            let (inside, sum) = on_pool(|| {
                let sum: u64 = (0..1000u64).into_par_iter().sum();
                (rayon::current_thread_index(), sum)
            });
            (before, inside, sum)
        })
        .join()
        .unwrap();
        assert_eq!(outside, (None, outside.1, 499_500));
        assert!(outside.1.is_some(), "ran outside the pool");
        // From a worker: it stays on that worker.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (here, there) = pool.install(|| {
            let here = rayon::current_thread_index();
            (here, on_pool(rayon::current_thread_index))
        });
        assert_eq!(here, there);
    }

    #[test]
    fn pair_sums_use_fixed_lanes_then_the_tail() {
        // Across the blocks of 512 pairs too.
        for n in [0, 1, 4, 7, 8, 9, 37, 511, 512, 513, 1037] {
            let x: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 1e-3).collect();
            let y: Vec<f32> = (0..n).map(|i| 1e8 - i as f32).collect();
            let z: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
            // The order written out by index: lane i % LANES over whole chunks, then the tail.
            let (mut la, mut lb) = ([0.0f64; LANES], [0.0f64; LANES]);
            let full = n / LANES * LANES;
            for i in 0..full {
                la[i % LANES] += f64::from(x[i] * z[i]);
                lb[i % LANES] += f64::from(y[i]);
            }
            let (mut ra, mut rb) = (0.0f64, 0.0f64);
            for i in full..n {
                ra += f64::from(x[i] * z[i]);
                rb += f64::from(y[i]);
            }
            let want = (la.iter().sum::<f64>() + ra, lb.iter().sum::<f64>() + rb);
            let got = sum_pairs_f64((&x, &y, &z), |x, y, z| (x * z, y));
            assert_eq!(
                (got.0.to_bits(), got.1.to_bits()),
                (want.0.to_bits(), want.1.to_bits()),
                "n = {n}"
            );
        }
        // Negative zeros: the sums are `+0.0` on both paths, short and long.
        for n in [3, 11] {
            let zeros = vec![-0.0f32; n];
            let got = sum_pairs_f64((&zeros, &zeros, &zeros), |x, y, _| (x, y));
            assert_eq!((got.0.to_bits(), got.1.to_bits()), (0, 0), "n = {n}");
        }
    }

    #[test]
    fn zeroed_buffers_are_zero_at_every_length() {
        for len in [0, 1, 4 * CHUNK - 1, 4 * CHUNK, 9 * CHUNK + 3] {
            let v = zeroed(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn valid_output_ranges_keep_inputs_inside() {
        // size 5, stride 2, pad 1, kernel 3 -> out 3; tap 0 reads o*2 - 1: o in 1..3.
        assert_eq!(valid(5, 2, 1, 0, 3), 1..3);
        assert_eq!(valid(5, 2, 1, 1, 3), 0..3);
        assert_eq!(valid(5, 2, 1, 2, 3), 0..2);
        // A tap that never lands inside.
        assert!(valid(1, 1, 3, 0, 1).is_empty());
        for (size, stride, pad, k, out) in [(7, 1, 2, 4, 7), (8, 2, 2, 4, 4), (3, 3, 0, 2, 1)] {
            let r = valid(size, stride, pad, k, out);
            for o in 0..out {
                let pos = (o * stride + k) as isize - pad as isize;
                assert_eq!(r.contains(&o), pos >= 0 && pos < size as isize, "{o}");
            }
        }
    }
}
