//! The attainable fp32 GEMM rate of this machine (`sdp bench peak`): square products through the same
//! GEMM the CPU convolutions call, on a rayon pool of the given size, best of several sizes and
//! repetitions. It is the ceiling `sdp bench step --profile` compares a step's rate with: dense arithmetic
//! cannot run faster on these kernels, so the fraction says how far a step is from the hardware.

use super::conv::{sgemm, MatRef};
use anyhow::{Context, Result};
use std::time::Instant;

/// The measured peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// Best GFLOP/s over every size and repetition (2·n³ FLOPs per product).
    pub gflops: f64,
    /// The size n of the product that reached it.
    pub size: usize,
    pub threads: usize,
}

/// Times `reps` products of n×n matrices for each n of `sizes` on `threads` threads (0: the global
/// pool's count) and returns the best rate.
pub fn measure(threads: usize, sizes: &[usize], reps: usize) -> Result<Peak> {
    let threads = if threads == 0 { rayon::current_num_threads() } else { threads };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("building the thread pool")?;
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let mut best = Peak { gflops: 0.0, size: 0, threads };
    for &n in sizes {
        // Deterministic operands with no zeros or denormals.
        let a: Vec<f32> = (0..n * n).map(|i| 1.0 + (i % 7) as f32 * 0.125).collect();
        let b: Vec<f32> = (0..n * n).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
        let mut c = vec![0f32; n * n];
        let (lhs, rhs) = (MatRef { data: &a, rs: n, cs: 1 }, MatRef { data: &b, rs: n, cs: 1 });
        for _ in 0..reps.max(1) + 1 {
            let t = Instant::now();
            pool.install(|| sgemm((n, n, n), &mut c, false, lhs, rhs, par))?;
            let gflops = 2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() * 1e-9;
            if gflops > best.gflops {
                best = Peak { gflops, size: n, threads };
            }
        }
        std::hint::black_box(&c);
    }
    Ok(best)
}
