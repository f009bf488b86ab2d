//! `C (m × n) [+]= A (m × k) · Bᵀ` where A and B are both stored row by row along the reduction dim
//! k: every output is the dot product of a row of A and a row of B. A convolution's weight gradient is
//! this product (dW = dY · colᵀ: the output gradient and the column matrix are both contiguous along
//! the pixels summed over). A GEMM library vectorises along m and so first copies (packs) one operand
//! into a transposed layout; at small channel counts that copy costs as much as the arithmetic (the GEMM-based
//! weight gradient was 40 % of a width-16 ResNet-18 step). This kernel vectorises along k instead: a tile of R rows of A
//! and C rows of B keeps R·C accumulators of 16 lanes in registers, streams both operands once per
//! tile and sums each accumulator's lanes at the end. AVX-512 only; [`available`] says whether the CPU
//! has it (callers fall back to the GEMM otherwise).
//!
//! Summation order, for a given k: lane l of an accumulator sums the products at l, l + 16, l + 32, …
//! in that order (the tail masked), then the 16 lanes are added as `_mm512_reduce_add_ps` adds them.

/// Whether this CPU runs the kernel (AVX-512F).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of A per tile.
const TR: usize = 4;
/// Rows of B per tile.
const TC: usize = 4;

/// `c[i * ldc + j] (+)= Σ_p a[i * lda + p] · b[j * ldb + p]` for i < m, j < n, p < k. Panics where a
/// view exceeds its slice; callers check [`available`] first (it is a no-op returning false otherwise).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_abt(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> bool {
    if !available() {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    assert!(lda >= k && ldb >= k && ldc >= n, "gemm_abt: leading dims ({lda}, {ldb}, {ldc}) below (k {k}, n {n})");
    assert!((m - 1) * lda + k <= a.len(), "gemm_abt: A view {m}x{k} (ld {lda}) exceeds {}", a.len());
    assert!((n - 1) * ldb + k <= b.len(), "gemm_abt: B view {n}x{k} (ld {ldb}) exceeds {}", b.len());
    assert!((m - 1) * ldc + n <= c.len(), "gemm_abt: C view {m}x{n} (ld {ldc}) exceeds {}", c.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (checked above) and every view was bounds-checked for the extents the
    // tiles read and write.
    unsafe {
        let v = avx512::Views { a: a.as_ptr(), lda, b: b.as_ptr(), ldb, c: c.as_mut_ptr(), ldc };
        avx512::run((m, n, k), v, accumulate);
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{TC, TR};
    use std::arch::x86_64::*;

    /// The three operands: row-major A (row stride lda), B (ldb) and C (ldc).
    #[derive(Clone, Copy)]
    pub(super) struct Views {
        pub(super) a: *const f32,
        pub(super) lda: usize,
        pub(super) b: *const f32,
        pub(super) ldb: usize,
        pub(super) c: *mut f32,
        pub(super) ldc: usize,
    }

    impl Views {
        /// The views of the tile whose first row of A is `i` and first row of B is `j`.
        ///
        /// # Safety
        /// `i` and `j` are rows of A and B inside the bounds checked by the caller.
        unsafe fn at(self, i: usize, j: usize) -> Self {
            Self { a: self.a.add(i * self.lda), b: self.b.add(j * self.ldb), c: self.c.add(i * self.ldc + j), ..self }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run((m, n, k): (usize, usize, usize), v: Views, acc: bool) {
        let mut i = 0;
        while i < m {
            let r = TR.min(m - i);
            let mut j = 0;
            while j < n {
                let cols = TC.min(n - j);
                let t = v.at(i, j);
                match (r, cols) {
                    (4, 4) => tile::<4, 4>(k, t, acc),
                    (4, 3) => tile::<4, 3>(k, t, acc),
                    (4, 2) => tile::<4, 2>(k, t, acc),
                    (4, 1) => tile::<4, 1>(k, t, acc),
                    (3, 4) => tile::<3, 4>(k, t, acc),
                    (3, 3) => tile::<3, 3>(k, t, acc),
                    (3, 2) => tile::<3, 2>(k, t, acc),
                    (3, 1) => tile::<3, 1>(k, t, acc),
                    (2, 4) => tile::<2, 4>(k, t, acc),
                    (2, 3) => tile::<2, 3>(k, t, acc),
                    (2, 2) => tile::<2, 2>(k, t, acc),
                    (2, 1) => tile::<2, 1>(k, t, acc),
                    (1, 4) => tile::<1, 4>(k, t, acc),
                    (1, 3) => tile::<1, 3>(k, t, acc),
                    (1, 2) => tile::<1, 2>(k, t, acc),
                    _ => tile::<1, 1>(k, t, acc),
                }
                j += cols;
            }
            i += r;
        }
    }

    /// s[r][c] += a[r] · b[c], lane by lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fma_tile<const R: usize, const C: usize>(s: &mut [[__m512; C]; R], av: &[__m512; R], bv: &[__m512; C]) {
        for (row, a) in s.iter_mut().zip(av) {
            for (acc, b) in row.iter_mut().zip(bv) {
                *acc = _mm512_fmadd_ps(*a, *b, *acc);
            }
        }
    }

    /// One R × C tile of outputs over the whole of k.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const C: usize>(k: usize, v: Views, accumulate: bool) {
        let Views { a, lda, b, ldb, c, ldc } = v;
        let mut s = [[_mm512_setzero_ps(); C]; R];
        let mut p = 0;
        while p + 16 <= k {
            let av: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(a.add(r * lda + p)));
            let bv: [__m512; C] = std::array::from_fn(|col| _mm512_loadu_ps(b.add(col * ldb + p)));
            fma_tile(&mut s, &av, &bv);
            p += 16;
        }
        if p < k {
            let mask: __mmask16 = ((1u32 << (k - p)) - 1) as __mmask16;
            let av: [__m512; R] = std::array::from_fn(|r| _mm512_maskz_loadu_ps(mask, a.add(r * lda + p)));
            let bv: [__m512; C] = std::array::from_fn(|col| _mm512_maskz_loadu_ps(mask, b.add(col * ldb + p)));
            fma_tile(&mut s, &av, &bv);
        }
        for (r, row) in s.iter().enumerate() {
            for (col, v) in row.iter().enumerate() {
                let out = c.add(r * ldc + col);
                let sum = _mm512_reduce_add_ps(*v);
                *out = if accumulate { *out + sum } else { sum };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_naive_product_at_every_tile_edge() {
        if !available() {
            return; // the caller falls back to the GEMM on such a CPU; nothing to compare
        }
        // m and n past a multiple of the tile (4) by 0..3, k around the 16-lane width and its tail.
        for (m, n, k) in [(1, 1, 1), (4, 4, 16), (5, 7, 17), (6, 9, 33), (3, 2, 15), (8, 13, 100), (16, 144, 1024)] {
            let (lda, ldb, ldc) = (k + 3, k + 1, n + 2);
            let a: Vec<f32> = (0..m * lda).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.25).collect();
            let b: Vec<f32> = (0..n * ldb).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.5).collect();
            for accumulate in [false, true] {
                let mut c = vec![1.5f32; m * ldc];
                assert!(sgemm_abt((m, n, k), &a, lda, &b, ldb, &mut c, ldc, accumulate));
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k).map(|p| a[i * lda + p] as f64 * b[j * ldb + p] as f64).sum();
                        let want = dot + if accumulate { 1.5 } else { 0.0 };
                        let got = c[i * ldc + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "({m},{n},{k}) [{i},{j}]: {got} vs {want}"
                        );
                    }
                    // Padding columns untouched.
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 1.5));
                }
            }
        }
    }
}
