//! Flushing subnormal floats to zero on the threads that run CPU kernels.
//!
//! Gradients in the GCA-HNG step pick up subnormal values (magnitudes below 1.2e-38): GELU's
//! derivative is about `x * exp(-x^2 / 2)`, so large negative pre-activations times a small
//! upstream gradient land there. Intel and AMD cores take a microcode assist of about a
//! hundred cycles for each subnormal operand or result, and one matrix product with 0.6-8%
//! subnormal inputs ran 5-70 times slower than the same product on normal numbers, doubling
//! the whole step (BENCHMARKS.md, "Subnormal gradients").
//!
//! Setting the CPU's flush-to-zero and denormals-are-zero modes makes such values behave as
//! zero. No value that matters moves: every flushed number is below 1.2e-38 in magnitude,
//! some 30 orders under the tolerances of `verify reference`. TensorFlow sets the same modes
//! on its CPU compute threads for the same reason. PyTorch leaves them off by default
//! (`torch.set_flush_denormal`).
//!
//! The modes live in a per-thread control register (MXCSR on x86-64, FPCR on AArch64), so they
//! are set on the calling thread and on each thread of rayon's global pool, which runs burn
//! Flex's parallel kernels, gemm's matrix products and ours. That per-thread, for-ever setting
//! is why this is written here: the crates that wrap these registers (`no_denormals`) only
//! scope the mode to a closure on the current thread.

/// Whether this CPU architecture has flush-to-zero modes that [`flush_subnormals_on_cpu_threads`]
/// sets (x86-64 and AArch64).
pub const SUPPORTED: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// Sets flush-to-zero (and, on x86-64, denormals-are-zero) on the calling thread and on every
/// thread of rayon's global pool, building that pool with its defaults if nothing built it
/// yet; so a program that sizes the pool itself calls this afterwards. Returns
/// [`SUPPORTED`]; elsewhere it does nothing.
pub fn flush_subnormals_on_cpu_threads() -> bool {
    flush_subnormals_on_this_thread();
    rayon::broadcast(|_| flush_subnormals_on_this_thread());
    SUPPORTED
}

/// Sets flush-to-zero (and denormals-are-zero on x86-64) on the calling thread only: for
/// threads a program starts itself to run model code.
pub fn flush_subnormals_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        // MXCSR bit 15 is FTZ (results), bit 6 DAZ (inputs).
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr/ldmxcsr read and write this thread's SSE control register only;
        // x86-64 always has SSE, and the value written keeps every other bit.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
            csr |= (1 << 15) | (1 << 6);
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack));
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // FPCR bit 24 is FZ (inputs and results); FZ16 (bit 19) leaves half precision alone.
        // SAFETY: reads and writes this thread's floating-point control register only,
        // keeping every other bit.
        unsafe {
            let mut fpcr: u64;
            std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
            fpcr |= 1 << 24;
            std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
        }
    }
}

/// Whether flush-to-zero is on for the calling thread.
pub fn flushing_on_this_thread() -> bool {
    // `MIN_POSITIVE / 4` is subnormal; with FTZ the product rounds to zero. `black_box` keeps
    // the compiler from folding it at build time, where no mode applies.
    let tiny = std::hint::black_box(f32::MIN_POSITIVE);
    tiny * std::hint::black_box(0.25f32) == 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_on_the_calling_thread_and_on_the_pool() {
        // A thread of its own, so that the mode does not leak into other tests.
        std::thread::spawn(|| {
            assert!(
                !flushing_on_this_thread(),
                "IEEE subnormals are the default"
            );
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            pool.install(|| {
                flush_subnormals_on_cpu_threads();
                if SUPPORTED {
                    assert!(flushing_on_this_thread());
                    let all = rayon::broadcast(|_| flushing_on_this_thread());
                    assert_eq!(all, vec![true; 2]);
                }
            });
        })
        .join()
        .unwrap();
    }
}
