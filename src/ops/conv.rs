//! CPU conv2d (f32, no bias, dilation 1, groups 1) as candle custom ops: im2col + GEMM forward,
//! im2col + GEMM weight gradient, GEMM + col2im input gradient; 3×3 stride-1 convolutions on planes of at
//! least 8×8 instead as nine GEMMs over shifted views of a padded copy (`conv/shifted.rs`).
//!
//! The batch is split into one contiguous group of images per rayon thread; each group is
//! processed in chunks whose column buffer stays under [`COL_TARGET_FLOATS`] (never larger than
//! the layer's full im2col), with a single-threaded GEMM. On 2 cores this was 10-35% faster than
//! one chunk at a time with a rayon-parallel GEMM and parallel im2col (ResNet-18 layers at batch
//! 32, e.g. 62 vs 84 ms fwd+bwd for 256->256 at 8x8); batches smaller than the thread count
//! fall back to the parallel GEMM.

use super::cpu_op::{Arg, Cpu, CpuOp, Names};
use super::gemm_abt;
use super::profile::{self, Part};
use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

mod shifted;

/// Target size (in f32 elements) of the per-chunk column buffer: 512 KiB, so that the chunk im2col
/// writes is still in the core's L2 cache when the GEMM reads it (8 MiB before: a width-16 ResNet-18 step
/// at batch 64 took 320 ms with it and 238 ms with this, `sdp bench step --profile`, same run; full width
/// unchanged within noise).
const COL_TARGET_FLOATS: usize = 1 << 17;

/// Weight gradients of convolutions with at most this many output channels take the dot-product kernel
/// (`gemm_abt`): it does not pack the column matrix, which the GEMM re-reads only `cout` times. Thresholds
/// tried (`sdp bench step --profile`, whole weight gradient): full-width ResNet-18 batch 32 223 ms with the
/// GEMM everywhere, 172 ms with the kernel up to 64 channels, 191 ms up to 128, 235 ms up to 256; width 16
/// batch 64 (widest layer 128) about equal at 64 and 128, 67 → 33-45 ms against the GEMM.
const ABT_MAX_COUT: usize = 64;

thread_local! {
    /// Per-thread scratch buffers (column matrix, channel-major copies), kept between calls: a fresh
    /// 8 MiB allocation per call costs a zero fill and a page fault per page (together ~10% of a
    /// ResNet-18 step on 2 cores). Each is at most one chunk's size, so at most a few chunk-sized
    /// buffers per thread stay allocated.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Two scratch buffers of at least `n0` and `n1` elements, with unspecified contents (every user
/// overwrites the part it reads). Give them back with [`put_scratch`].
fn take_scratch(n0: usize, n1: usize) -> [Vec<f32>; 2] {
    // A task that runs while another one on this thread holds the buffers (rayon work stealing
    // inside a nested parallel loop) finds them empty and allocates its own.
    let mut bufs = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for (b, n) in bufs.iter_mut().zip([n0, n1]) {
        if b.len() < n {
            b.resize(n, 0.0);
        }
    }
    bufs
}

fn put_scratch(bufs: [Vec<f32>; 2]) {
    SCRATCH.with(|s| {
        let mut cur = s.borrow_mut();
        for (c, b) in cur.iter_mut().zip(bufs) {
            if b.len() > c.len() {
                *c = b;
            }
        }
    });
}

/// Validates the shapes of a conv2d call; shared by the CPU path and the fallback.
pub(crate) fn check_shapes(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<()> {
    Geom::new(x, w, stride, padding).map(|_| ())
}

/// Everything the kernels need to know about one convolution; validated by [`Geom::new`] (also the
/// base of the cuDNN path's geometry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Geom {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    pub(super) fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let &[b, cin, h, wd] = x else {
            bail!("conv2d: input must be (B, Cin, H, W), got shape {x:?}");
        };
        let &[cout, wcin, kh, kw] = w else {
            bail!("conv2d: weight must be (Cout, Cin, kh, kw), got shape {w:?}");
        };
        if x.contains(&0) || w.contains(&0) {
            bail!("conv2d: empty tensors are not supported (input {x:?}, weight {w:?})");
        }
        if wcin != cin {
            bail!("conv2d: input has {cin} channels (shape {x:?}) but weight expects {wcin} (shape {w:?})");
        }
        if stride == 0 {
            bail!("conv2d: stride must be at least 1");
        }
        if h + 2 * pad < kh || wd + 2 * pad < kw {
            bail!("conv2d: kernel {kh}x{kw} does not fit the input {h}x{wd} with padding {pad}");
        }
        Ok(Self {
            b,
            cin,
            h,
            w: wd,
            cout,
            kh,
            kw,
            stride,
            pad,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (wd + 2 * pad - kw) / stride + 1,
        })
    }

    /// The input's dims (B, Cin, H, W).
    pub(super) fn x_dims(&self) -> [usize; 4] {
        [self.b, self.cin, self.h, self.w]
    }

    /// The weight's dims (Cout, Cin, kh, kw).
    pub(super) fn w_dims(&self) -> [usize; 4] {
        [self.cout, self.cin, self.kh, self.kw]
    }

    /// The output's dims (B, Cout, Ho, Wo).
    pub(super) fn y_dims(&self) -> [usize; 4] {
        [self.b, self.cout, self.ho, self.wo]
    }

    /// Checks an op's arguments against the dims this geometry expects of them.
    fn check_args(&self, args: &[Arg; 2], expected: [[usize; 4]; 2]) -> Result<()> {
        if args[0].dims() != expected[0] || args[1].dims() != expected[1] {
            bail!("conv2d: arguments {:?} / {:?} do not match {self:?}", args[0].dims(), args[1].dims());
        }
        Ok(())
    }

    /// Rows of the column matrix: Cin * kh * kw.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// 2 · the multiply-adds of one pass (forward, or either gradient): 2·B·Cout·Ho·Wo·Cin·kh·kw.
    fn flops(&self) -> u64 {
        2 * (self.b * self.cout * self.p() * self.k()) as u64
    }

    /// Output pixels per image.
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1, stride-1, unpadded convolution: the column matrix of one image is the image itself.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Images per chunk for a group of `n` images: as many as keep the column buffer under the
    /// target size, evened out so that the last chunk is not a sliver.
    fn chunk_images(&self, n: usize) -> usize {
        let cap = (COL_TARGET_FLOATS / (self.k() * self.p()).max(1)).max(1);
        n.div_ceil(n.div_ceil(cap).max(1)).max(1)
    }

    /// The output columns `ox` whose input column `ox*s + kx - pad` lies inside `[0, w)`.
    fn valid_ox(&self, kx: usize) -> (usize, usize) {
        let lo = if self.pad > kx { (self.pad - kx).div_ceil(self.stride) } else { 0 };
        let hi = if self.w + self.pad > kx { (self.w + self.pad - kx).div_ceil(self.stride).min(self.wo) } else { 0 };
        (lo.min(hi), hi)
    }

    /// The input row read by output row `oy` at kernel row `ky`, if inside the image.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky).checked_sub(self.pad).filter(|&iy| iy < self.h)
    }
}

/// A read-only strided matrix view for [`sgemm`].
#[derive(Clone, Copy)]
pub(super) struct MatRef<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: usize,
    pub(super) cs: usize,
}

fn check_bounds(what: &str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Result<()> {
    if rows > 0 && cols > 0 && (rows - 1) * rs + (cols - 1) * cs >= len {
        bail!("gemm internal error: {what} view {rows}x{cols} (strides {rs}, {cs}) exceeds its buffer of {len}");
    }
    Ok(())
}

/// `dst (m x n) [+]= lhs (m x k) * rhs (k x n)` for `mnk = (m, n, k)`; `dst` is row-major with row
/// stride `n`.
pub(super) fn sgemm(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
    par: gemm::Parallelism,
) -> Result<()> {
    let (m, n, k) = mnk;
    check_bounds("dst", dst.len(), m, n, n, 1)?;
    check_bounds("lhs", lhs.data.len(), m, k, lhs.rs, lhs.cs)?;
    check_bounds("rhs", rhs.data.len(), k, n, rhs.rs, rhs.cs)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    #[cfg(feature = "mkl")]
    if matches!(par, gemm::Parallelism::None) && mkl::sgemm(mnk, dst, accumulate, lhs, rhs) {
        return Ok(());
    }
    // SAFETY: the three views were bounds-checked above for the extents gemm reads and writes,
    // and `dst` is borrowed mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// The optional MKL backend (feature `mkl`): sequential `cblas_sgemm`, as each rayon task runs its
/// own GEMM.
#[cfg(feature = "mkl")]
mod mkl {
    use super::MatRef;

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    extern "C" {
        #[allow(clippy::too_many_arguments)]
        fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }

    /// A (rows x cols) view as a BLAS operand: (transpose flag, leading dimension), when one of
    /// its strides is 1.
    fn operand(v: &MatRef, rows: usize, cols: usize) -> Option<(i32, i32)> {
        if v.cs == 1 && (v.rs >= cols.max(1) || rows == 1) {
            Some((NO_TRANS, v.rs.max(cols).max(1) as i32))
        } else if v.rs == 1 && (v.cs >= rows.max(1) || cols == 1) {
            Some((TRANS, v.cs.max(rows).max(1) as i32))
        } else {
            None
        }
    }

    /// `dst (m x n) [+]= lhs * rhs` through MKL; false (nothing done) for views BLAS cannot
    /// express, which then take the `gemm` crate. Bounds were checked by the caller.
    pub(super) fn sgemm(
        mnk: (usize, usize, usize),
        dst: &mut [f32],
        accumulate: bool,
        lhs: MatRef,
        rhs: MatRef,
    ) -> bool {
        let (m, n, k) = mnk;
        let (Some((ta, lda)), Some((tb, ldb))) = (operand(&lhs, m, k), operand(&rhs, k, n)) else {
            return false;
        };
        if [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
            return false;
        }
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the views were bounds-checked for these extents and strides; with beta = 0 BLAS
        // does not read dst.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                ta,
                tb,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                lhs.data.as_ptr(),
                lda,
                rhs.data.as_ptr(),
                ldb,
                beta,
                dst.as_mut_ptr(),
                n.max(1) as i32,
            );
        }
        true
    }
}

/// Writes the column matrix (K, nb*P) of the `nb` images in `x` into `col`; column `b*P + q` is
/// output pixel `q` of image `b`.
fn im2col(x: &[f32], g: &Geom, nb: usize, col: &mut [f32]) {
    let (p, nc, hw) = (g.p(), nb * g.p(), g.h * g.w);
    col.par_chunks_mut(g.kh * g.kw * nc).enumerate().for_each(|(ci, rows)| {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &mut rows[(ky * g.kw + kx) * nc..][..nc];
                let (lo, hi) = g.valid_ox(kx);
                for (b, dst) in row.chunks_exact_mut(p).enumerate() {
                    let plane = &x[(b * g.cin + ci) * hw..][..hw];
                    for (oy, drow) in dst.chunks_exact_mut(g.wo).enumerate() {
                        let Some(iy) = g.input_row(oy, ky) else {
                            drow.fill(0.0);
                            continue;
                        };
                        let src = &plane[iy * g.w..][..g.w];
                        drow[..lo].fill(0.0);
                        drow[hi..].fill(0.0);
                        if lo == hi {
                            continue;
                        }
                        // ox in [lo, hi) reads input column ox*s + kx - pad, inside the row.
                        let first = lo * g.stride + kx - g.pad;
                        if g.stride == 1 {
                            drow[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            for (d, s) in drow[lo..hi].iter_mut().zip(src[first..].iter().step_by(g.stride)) {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Sums the column-matrix gradient `dcol` (K, nb*P) back into the image gradient `dx` (nb images).
fn col2im(dcol: &[f32], g: &Geom, nb: usize, dx: &mut [f32]) {
    let (p, nc, hw) = (g.p(), nb * g.p(), g.h * g.w);
    dx[..nb * g.cin * hw].par_chunks_mut(hw).enumerate().for_each(|(idx, plane)| {
        let (b, ci) = (idx / g.cin, idx % g.cin);
        plane.fill(0.0);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &dcol[((ci * g.kh + ky) * g.kw + kx) * nc + b * p..][..p];
                let (lo, hi) = g.valid_ox(kx);
                if lo == hi {
                    continue;
                }
                let first = lo * g.stride + kx - g.pad;
                for (oy, srow) in row.chunks_exact(g.wo).enumerate() {
                    let Some(iy) = g.input_row(oy, ky) else { continue };
                    let drow = &mut plane[iy * g.w..][..g.w];
                    if g.stride == 1 {
                        for (d, s) in drow[first..first + hi - lo].iter_mut().zip(&srow[lo..hi]) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in drow[first..].iter_mut().step_by(g.stride).zip(&srow[lo..hi]) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    });
}

/// Copies a chunk of a (nb, C, P) tensor into a (C, nb*P) matrix.
fn gather_channels(src: &[f32], c: usize, p: usize, nb: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(nb * p).enumerate().for_each(|(ch, drow)| {
        for (b, d) in drow.chunks_exact_mut(p).enumerate() {
            d.copy_from_slice(&src[(b * c + ch) * p..][..p]);
        }
    });
}

/// Copies a (C, nb*P) matrix into a chunk of a (nb, C, P) tensor.
fn scatter_channels(src: &[f32], c: usize, p: usize, nb: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(p).enumerate().for_each(|(idx, d)| {
        let (b, ch) = (idx / c, idx % c);
        d.copy_from_slice(&src[ch * nb * p + b * p..][..p]);
    });
}

/// The column matrix of a chunk: the images themselves for a pointwise conv on one image,
/// otherwise im2col into `buf`.
fn columns<'a>(xc: &'a [f32], g: &Geom, nb: usize, buf: &'a mut [f32]) -> &'a [f32] {
    if g.pointwise() && nb == 1 {
        xc
    } else {
        let col = &mut buf[..g.k() * nb * g.p()];
        im2col(xc, g, nb, col);
        col
    }
}

/// A chunk of `nb` images' output gradient (nb, Cout, P) as a (Cout, nb*P) matrix: the chunk
/// itself for one image, otherwise gathered into `buf`.
fn output_channels<'a>(dyc: &'a [f32], g: &Geom, nb: usize, buf: &'a mut [f32]) -> &'a [f32] {
    if nb == 1 {
        dyc
    } else {
        let dst = &mut buf[..g.cout * nb * g.p()];
        gather_channels(dyc, g.cout, g.p(), nb, dst);
        dst
    }
}

/// How the batch is spread over the rayon threads: `groups` contiguous ranges of `per` images,
/// each processed chunk by chunk by one task with its own buffers and a single-threaded GEMM.
/// When the batch is smaller than the thread count there is one group and the GEMM itself is
/// parallel.
#[derive(Debug, Clone, Copy)]
struct Split {
    per: usize,
    par: gemm::Parallelism,
}

impl Split {
    fn new(b: usize) -> Self {
        let threads = rayon::current_num_threads().max(1);
        let groups = threads.min(b).max(1);
        let par = if groups == 1 && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        Self { per: b.div_ceil(groups).max(1), par }
    }
}

/// Forward: y_chunk (Cout, nb*P) = W (Cout, K) * col (K, nb*P).
fn forward(x: &[f32], wt: &[f32], g: &Geom) -> Result<Vec<f32>> {
    let split = Split::new(g.b);
    let (chw, p) = (g.cin * g.h * g.w, g.p());
    let mut y = vec![0f32; g.b * g.cout * p];
    y.par_chunks_mut(split.per * g.cout * p)
        .zip(x.par_chunks(split.per * chw))
        .try_for_each(|(yg, xg)| forward_group(xg, wt, g, yg, split.par))?;
    Ok(y)
}

fn forward_group(x: &[f32], wt: &[f32], g: &Geom, y: &mut [f32], par: gemm::Parallelism) -> Result<()> {
    let (k, p) = (g.k(), g.p());
    let bc = g.chunk_images(y.len() / (g.cout * p));
    let [mut col, mut out] = take_scratch(k * bc * p, if bc > 1 { g.cout * bc * p } else { 0 });
    let w_mat = MatRef { data: wt, rs: k, cs: 1 };
    for (xc, yc) in x.chunks(bc * g.cin * g.h * g.w).zip(y.chunks_mut(bc * g.cout * p)) {
        let nb = yc.len() / (g.cout * p);
        let nc = nb * p;
        let col = columns(xc, g, nb, &mut col);
        let col_mat = MatRef { data: col, rs: nc, cs: 1 };
        if nb == 1 {
            sgemm((g.cout, nc, k), yc, false, w_mat, col_mat, par)?;
        } else {
            let out = &mut out[..g.cout * nc];
            sgemm((g.cout, nc, k), out, false, w_mat, col_mat, par)?;
            scatter_channels(out, g.cout, p, nb, yc);
        }
    }
    put_scratch([col, out]);
    Ok(())
}

/// Weight gradient: dW (Cout, K) = sum over chunks of dY_chunk (Cout, nb*P) * col^T (nb*P, K);
/// one partial sum per group, added at the end.
fn weight_grad(x: &[f32], dy: &[f32], g: &Geom) -> Result<Vec<f32>> {
    let split = Split::new(g.b);
    let (chw, p) = (g.cin * g.h * g.w, g.p());
    let partials = x
        .par_chunks(split.per * chw)
        .zip(dy.par_chunks(split.per * g.cout * p))
        .map(|(xg, dyg)| weight_grad_group(xg, dyg, g, split.par))
        .collect::<Result<Vec<_>>>()?;
    let mut parts = partials.into_iter();
    let mut dw = parts.next().unwrap_or_else(|| vec![0f32; g.cout * g.k()]);
    for part in parts {
        dw.iter_mut().zip(&part).for_each(|(a, b)| *a += *b);
    }
    Ok(dw)
}

fn weight_grad_group(x: &[f32], dy: &[f32], g: &Geom, par: gemm::Parallelism) -> Result<Vec<f32>> {
    let (k, p) = (g.k(), g.p());
    let bc = g.chunk_images(dy.len() / (g.cout * p));
    let mut dw = vec![0f32; g.cout * k];
    let [mut col, mut dyc_buf] = take_scratch(k * bc * p, if bc > 1 { g.cout * bc * p } else { 0 });
    let chunks = x.chunks(bc * g.cin * g.h * g.w).zip(dy.chunks(bc * g.cout * p));
    for (i, (xc, dyc)) in chunks.enumerate() {
        let nb = dyc.len() / (g.cout * p);
        let nc = nb * p;
        let col = columns(xc, g, nb, &mut col);
        let dyc = output_channels(dyc, g, nb, &mut dyc_buf);
        // Few output channels: dot products along the pixels instead of a GEMM that packs the column matrix.
        if g.cout <= ABT_MAX_COUT && gemm_abt::sgemm_abt((g.cout, k, nc), dyc, nc, col, nc, &mut dw, k, i > 0) {
            continue;
        }
        let lhs = MatRef { data: dyc, rs: nc, cs: 1 };
        let rhs = MatRef { data: col, rs: 1, cs: nc };
        sgemm((g.cout, k, nc), &mut dw, i > 0, lhs, rhs, par)?;
    }
    put_scratch([col, dyc_buf]);
    Ok(dw)
}

/// Input gradient: dcol (K, nb*P) = W^T (K, Cout) * dY_chunk (Cout, nb*P), then col2im.
fn input_grad(dy: &[f32], wt: &[f32], g: &Geom) -> Result<Vec<f32>> {
    let split = Split::new(g.b);
    let (chw, p) = (g.cin * g.h * g.w, g.p());
    let mut dx = vec![0f32; g.b * chw];
    dx.par_chunks_mut(split.per * chw)
        .zip(dy.par_chunks(split.per * g.cout * p))
        .try_for_each(|(dxg, dyg)| input_grad_group(dyg, wt, g, dxg, split.par))?;
    Ok(dx)
}

fn input_grad_group(dy: &[f32], wt: &[f32], g: &Geom, dx: &mut [f32], par: gemm::Parallelism) -> Result<()> {
    let (k, p) = (g.k(), g.p());
    let bc = g.chunk_images(dy.len() / (g.cout * p));
    let chw = g.cin * g.h * g.w;
    let direct = g.pointwise() && bc == 1;
    let [mut dcol, mut dyc_buf] =
        take_scratch(if direct { 0 } else { k * bc * p }, if bc > 1 { g.cout * bc * p } else { 0 });
    let w_t = MatRef { data: wt, rs: 1, cs: k };
    for (dyc, dxc) in dy.chunks(bc * g.cout * p).zip(dx.chunks_mut(bc * chw)) {
        let nb = dyc.len() / (g.cout * p);
        let nc = nb * p;
        let dyc = output_channels(dyc, g, nb, &mut dyc_buf);
        let rhs = MatRef { data: dyc, rs: nc, cs: 1 };
        if g.pointwise() && nb == 1 {
            // The column matrix of one image is the image: write the gradient in place.
            sgemm((k, nc, g.cout), dxc, false, w_t, rhs, par)?;
        } else {
            let dcol = &mut dcol[..k * nc];
            sgemm((k, nc, g.cout), dcol, false, w_t, rhs, par)?;
            col2im(dcol, g, nb, dxc);
        }
    }
    put_scratch([dcol, dyc_buf]);
    Ok(())
}

/// Entry point of the CPU path: `x` and `w` are f32 on the CPU, shapes already checked.
pub(crate) fn conv2d_cpu(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let geom = Geom::new(x.dims(), w.dims(), stride, padding)?;
    x.contiguous()?.apply_op2(&w.contiguous()?, Cpu(Conv2d { geom }))
}

/// y = conv2d(x, w); backward through the two [`Conv2dGrad`] ops.
struct Conv2d {
    geom: Geom,
}

impl CpuOp<2> for Conv2d {
    const NAMES: Names<2> = Names { op: "sdp-conv2d", args: ["input", "weight"] };
    const PART: Part = Part::ConvForward;

    fn fwd(&self, args: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        let g = &self.geom;
        g.check_args(&args, [g.x_dims(), g.w_dims()])?;
        profile::add_flops(Self::PART, g.flops());
        let y = if shifted::applies(g) {
            shifted::forward(&args[0], &args[1], g)?
        } else {
            forward(&args[0], &args[1], g)?
        };
        Ok((y, Shape::from(&g.y_dims())))
    }

    fn bwd(&self, [x, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let geom = self.geom;
        let grad = grad.contiguous()?;
        // An input that does not track gradients (the image batch) needs no input gradient.
        let dx = if x.track_op() { Some(grad.apply_op2_no_bwd(w, &Cpu(Conv2dGrad::<true> { geom }))?) } else { None };
        let dw = if w.track_op() { Some(x.apply_op2_no_bwd(&grad, &Cpu(Conv2dGrad::<false> { geom }))?) } else { None };
        Ok([dx, dw])
    }
}

/// The gradients of [`Conv2d`], forward-only: with `INPUT`, (dy, w) -> dx; without, (x, dy) -> dw.
struct Conv2dGrad<const INPUT: bool> {
    geom: Geom,
}

impl<const INPUT: bool> CpuOp<2> for Conv2dGrad<INPUT> {
    const NAMES: Names<2> = if INPUT {
        Names { op: "sdp-conv2d-input-grad", args: ["output gradient", "weight"] }
    } else {
        Names { op: "sdp-conv2d-weight-grad", args: ["input", "output gradient"] }
    };
    const PART: Part = if INPUT { Part::ConvBackwardData } else { Part::ConvBackwardWeight };

    fn fwd(&self, args: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        let g = &self.geom;
        profile::add_flops(Self::PART, g.flops());
        if INPUT {
            g.check_args(&args, [g.y_dims(), g.w_dims()])?;
            let dx = if shifted::applies(g) {
                shifted::input_grad(&args[0], &args[1], g)?
            } else {
                input_grad(&args[0], &args[1], g)?
            };
            Ok((dx, Shape::from(&g.x_dims())))
        } else {
            g.check_args(&args, [g.x_dims(), g.y_dims()])?;
            let dw = if shifted::applies(g) {
                shifted::weight_grad(&args[0], &args[1], g)?
            } else {
                weight_grad(&args[0], &args[1], g)?
            };
            Ok((dw, Shape::from(&g.w_dims())))
        }
    }
}
