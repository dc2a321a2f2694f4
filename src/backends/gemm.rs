//! Our one call into `gemm` (the crate burn-flex itself calls), on buffers the kernels own:
//! burn-flex's matmul returns a fresh tensor that it zero-fills and then copies, two passes on
//! the calling thread over every product (BENCHMARKS.md, "CPU speed, sixth round").
//!
//! `gemm` splits its work over the output, never over the sum, and its blocking depends only
//! on the shapes, so a product has the same bits on any number of threads and the same bits
//! as burn-flex's matmul of the same operands.

use burn::backend::flex::FlexTensor;

/// Below this many multiply-adds a GEMM runs on the calling thread: splitting it costs more
/// than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// A matrix operand: element `(r, c)` at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// `data` as a contiguous `rows x cols` matrix.
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of `data` viewed as a contiguous `cols x rows` matrix.
    pub(crate) fn transposed(data: &'a [f32], rows: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: rows,
        }
    }

    /// A rank-2 f32 tensor as it lies in memory, transposed views included; `None` for other
    /// ranks and for negative strides.
    pub(crate) fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let (_, _, row_stride, col_stride) = layout.as_2d_strides()?;
        Some(Self {
            data: t.storage::<f32>().get(layout.start_offset()..)?,
            row_stride: usize::try_from(row_stride).ok()?,
            col_stride: usize::try_from(col_stride).ok()?,
        })
    }

    /// The transpose of this operand (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            data: self.data,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `dst [m, n] (+)= a [m, k] x b [k, n]`, `dst` contiguous; added to `dst` when `accumulate`;
/// on every core when `parallel` and the product is large enough.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallel: bool,
) {
    assert!(dst.len() >= m * n);
    // SAFETY: `dst` holds `m * n` initialised elements (asserted just above) and is borrowed
    // mutably, so it aliases neither operand.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            a,
            b,
            accumulate,
            Threads::of(parallel),
        )
    }
}

/// A `Vec` of `m * n` products `a x b`, written once, with no zero-fill first.
pub(crate) fn product(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f32> {
    product_on(Product { m, n, k, a, b }, Threads::All)
}

/// One product's shape and operands, for [`product_pair`].
pub(crate) struct Product<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Mat<'a>,
    pub b: Mat<'a>,
}

/// Two independent products at once, each split over half of the pool's threads (on the
/// calling thread alone where that half is one). `gemm` splitting one product over two cores
/// shares one packed right-hand side per depth block and deals jobs over both, and runs well
/// below twice its single-thread speed; two products side by side, one a core, each run at
/// that full speed (BENCHMARKS.md, "fourteenth round"). The bits are those of [`product`]:
/// `gemm`'s blocking does not depend on the threads.
pub(crate) fn product_pair(first: Product, second: Product) -> (Vec<f32>, Vec<f32>) {
    let half = Threads::AtMost((rayon::current_num_threads() / 2).max(1));
    rayon::join(|| product_on(first, half), || product_on(second, half))
}

fn product_on(p: Product, threads: Threads) -> Vec<f32> {
    let mut out = Vec::with_capacity(p.m * p.n);
    let dst = &mut out.spare_capacity_mut()[..p.m * p.n];
    // SAFETY: `dst` is `m * n` elements of a buffer of our own; without `accumulate`, `gemm`
    // writes it and never reads it.
    unsafe {
        gemm_raw(
            p.m,
            p.n,
            p.k,
            dst.as_mut_ptr().cast(),
            p.a,
            p.b,
            false,
            threads,
        )
    };
    // SAFETY: `gemm_raw` wrote all `m * n` elements.
    unsafe { out.set_len(p.m * p.n) };
    out
}

/// How many of the pool's threads one `gemm` call may use.
#[derive(Clone, Copy)]
enum Threads {
    /// Every thread of the pool.
    All,
    /// Up to this many (one: the calling thread only).
    AtMost(usize),
}

impl Threads {
    fn of(parallel: bool) -> Self {
        if parallel { Self::All } else { Self::AtMost(1) }
    }
}

/// `a [m, k] x b [n, k]^T` of two row-major host matrices, on every core, written once: the
/// similarities of a block of queries against a gallery. burn-flex's matmul of the same
/// operands zero-fills its output and copies it again on the calling thread, two passes over
/// a block that evaluation makes as large as 256 MB.
pub(crate) fn product_nt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    product(m, n, k, Mat::rows(a, k), Mat::rows(b, k).t())
}

/// # Safety
/// `dst` must be valid for writes of `m * n` contiguous elements (and for reads when
/// `accumulate`), and must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    a: Mat,
    b: Mat,
    accumulate: bool,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: `dst` is valid for `m * n` writes (the caller's contract).
            unsafe { std::ptr::write_bytes(dst, 0, m * n) };
        }
        return;
    }
    // Every index the GEMM reads lies inside the operands' slices.
    assert!(a.data.len() > (m - 1) * a.row_stride + (k - 1) * a.col_stride);
    assert!(b.data.len() > (k - 1) * b.row_stride + (n - 1) * b.col_stride);
    let large = m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_FLOPS;
    let parallelism = match threads {
        Threads::All if large => ::gemm::Parallelism::Rayon(0),
        Threads::AtMost(t) if large && t > 1 => ::gemm::Parallelism::Rayon(t),
        _ => ::gemm::Parallelism::None,
    };
    // SAFETY: the asserts above keep every read of the operands inside their slices; the
    // caller vouches for `dst`.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}
