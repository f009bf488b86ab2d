//! 3×3, stride-1, pad-1 convolutions (all but the first of every ResNet stage's) as nine GEMMs over shifted
//! views of a zero-padded copy of the input, instead of im2col + one GEMM.
//!
//! The images of a chunk are copied into planes padded by one pixel on every side, laid out channel by
//! channel: `xp[c][b][y][x]` of shape (C, nb, H + 2, W + 2). Output pixel (b, y, x) sits at position
//! `j = b·(H+2)(W+2) + y·(W+2) + x` of a grid of the same layout, and reads input (y + ky, x + kx) of the
//! padded plane at `j + ky·(W+2) + kx`: for each of the nine kernel offsets the input is a plain strided
//! matrix (C, N) at a shift of the padded planes, so `Y (Cout, N) += W[:, :, ky, kx] (Cout, C) · Xshift (C, N)`
//! is a GEMM with no copy. The grid's extra positions (two columns per row, two rows per image) are computed
//! and dropped. im2col writes nine copies of the input instead. Measured (`sdp bench step`, width-16
//! ResNet-18 at batch 64, the same binary with and without this path, alternated, nothing else running):
//! 0.151 → 0.129 s per step at 2 threads, 0.238 → 0.204 s at 1 thread; full-width ResNet-18 at batch 32
//! unchanged within the noise.
//!
//! The input gradient of such a convolution is the same convolution of the output gradient with the kernel
//! flipped and its channel axes swapped; the weight gradient, per offset, is `dY · Xshiftᵀ` summed over the
//! grid, with the output gradient placed on the grid and zero at the extra positions.

use super::{gemm_abt, put_scratch, sgemm, take_scratch, Geom, MatRef, Split, ABT_MAX_COUT, COL_TARGET_FLOATS};
use candle_core::Result;
use rayon::prelude::*;

/// Convolutions on planes smaller than this take im2col: the grid's extra positions cost more there (at 4×4
/// the grid is 2.25× the image; taking the 4×4 layers too made the width-16 step no faster).
const MIN_SIDE: usize = 8;

/// Whether `g` takes this path.
pub(super) fn applies(g: &Geom) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1 && g.h >= MIN_SIDE && g.w >= MIN_SIDE
}

/// The padded grid of a chunk of `nb` images of `h` × `w`.
#[derive(Clone, Copy)]
struct Grid {
    nb: usize,
    h: usize,
    w: usize,
}

impl Grid {
    /// Width of a padded row.
    fn wp(&self) -> usize {
        self.w + 2
    }
    /// Positions per padded image.
    fn plane(&self) -> usize {
        (self.h + 2) * self.wp()
    }
    /// One channel's stride in the padded planes: every image's padded plane.
    fn stride(&self) -> usize {
        self.nb * self.plane()
    }
    /// Grid positions computed: all but the last image's two bottom padding rows.
    fn n(&self) -> usize {
        self.stride() - 2 * self.wp()
    }
    /// Floats of `c` channels of padded planes: the last shifted view reads two past the last plane.
    fn padded_len(&self, c: usize) -> usize {
        c * self.stride() + 2
    }
    /// The shift of kernel offset `o = ky·3 + kx`.
    fn shift(&self, o: usize) -> usize {
        (o / 3) * self.wp() + o % 3
    }
}

/// Images per chunk: as many as keep a chunk's padded planes (input and output channels) near the
/// column buffer's target size.
fn chunk_images(g: &Geom, n: usize) -> usize {
    let per = (g.cin + g.cout) * (g.h + 2) * (g.w + 2);
    let cap = (COL_TARGET_FLOATS / per.max(1)).max(1);
    n.div_ceil(n.div_ceil(cap).max(1)).max(1)
}

/// Copies `nb` images (nb, c, h, w) into zeroed padded planes `dst` (c, nb, h + 2, w + 2), each pixel at
/// (y + `at`, x + `at`) of its plane (`at` = 1: the padded input; 0: the output gradient on the grid).
fn to_grid(src: &[f32], c: usize, gr: Grid, at: usize, dst: &mut [f32]) {
    let (h, w, wp) = (gr.h, gr.w, gr.wp());
    dst.fill(0.0);
    for b in 0..gr.nb {
        for ch in 0..c {
            let s = &src[(b * c + ch) * h * w..][..h * w];
            let d = &mut dst[ch * gr.stride() + b * gr.plane()..][..gr.plane()];
            for y in 0..h {
                d[(y + at) * wp + at..][..w].copy_from_slice(&s[y * w..][..w]);
            }
        }
    }
}

/// Copies the grid's image positions of `src` (c rows of `gr.n()`) into `dst` (nb, c, h, w).
fn from_grid(src: &[f32], c: usize, gr: Grid, dst: &mut [f32]) {
    let (h, w, wp, n) = (gr.h, gr.w, gr.wp(), gr.n());
    for b in 0..gr.nb {
        for ch in 0..c {
            let s = &src[ch * n + b * gr.plane()..];
            let d = &mut dst[(b * c + ch) * h * w..][..h * w];
            for y in 0..h {
                d[y * w..][..w].copy_from_slice(&s[y * wp..][..w]);
            }
        }
    }
}

/// One chunk of a convolution of `src` (nb, c_in, h, w) into `dst` (nb, c_out, h, w); `weight(o)` is the
/// (c_out, c_in) matrix of kernel offset o.
fn conv_chunk<'w>(
    src: &[f32],
    (c_in, c_out): (usize, usize),
    gr: Grid,
    weight: &dyn Fn(usize) -> MatRef<'w>,
    dst: &mut [f32],
    par: gemm::Parallelism,
) -> Result<()> {
    let n = gr.n();
    let [mut xp, mut yp] = take_scratch(gr.padded_len(c_in), c_out * n);
    let xp_s = &mut xp[..gr.padded_len(c_in)];
    to_grid(src, c_in, gr, 1, xp_s);
    let out = &mut yp[..c_out * n];
    for o in 0..9 {
        let shifted = MatRef { data: &xp_s[gr.shift(o)..], rs: gr.stride(), cs: 1 };
        sgemm((c_out, n, c_in), out, o > 0, weight(o), shifted, par)?;
    }
    from_grid(out, c_out, gr, dst);
    put_scratch([xp, yp]);
    Ok(())
}

/// A whole batch `src` (b, c_in, h, w) convolved into (b, c_out, h, w), groups of images in parallel.
fn conv<'w>(
    src: &[f32],
    (c_in, c_out): (usize, usize),
    g: &Geom,
    weight: &(dyn Fn(usize) -> MatRef<'w> + Sync),
) -> Result<Vec<f32>> {
    let (h, w) = (g.h, g.w);
    let split = Split::new(g.b);
    let mut dst = vec![0f32; g.b * c_out * h * w];
    dst.par_chunks_mut(split.per * c_out * h * w).zip(src.par_chunks(split.per * c_in * h * w)).try_for_each(
        |(dg, sg)| {
            let bc = chunk_images(g, sg.len() / (c_in * h * w));
            for (sc, dc) in sg.chunks(bc * c_in * h * w).zip(dg.chunks_mut(bc * c_out * h * w)) {
                let gr = Grid { nb: sc.len() / (c_in * h * w), h, w };
                conv_chunk(sc, (c_in, c_out), gr, weight, dc, split.par)?;
            }
            Ok::<(), candle_core::Error>(())
        },
    )?;
    Ok(dst)
}

/// Forward: y = conv(x, w).
pub(super) fn forward(x: &[f32], wt: &[f32], g: &Geom) -> Result<Vec<f32>> {
    let k = g.cin * 9;
    // W[:, :, ky, kx] as a (Cout, Cin) matrix: element (co, ci) at (co·Cin + ci)·9 + o.
    conv(x, (g.cin, g.cout), g, &|o| MatRef { data: &wt[o..], rs: k, cs: 9 })
}

/// Input gradient: dx = conv(dy, w flipped, channel axes swapped).
pub(super) fn input_grad(dy: &[f32], wt: &[f32], g: &Geom) -> Result<Vec<f32>> {
    let k = g.cin * 9;
    // Offset o of the flipped kernel is offset 8 − o of W, as a (Cin, Cout) matrix: (ci, co) at
    // (co·Cin + ci)·9 + 8 − o.
    conv(dy, (g.cout, g.cin), g, &|o| MatRef { data: &wt[8 - o..], rs: 9, cs: k })
}

/// Weight gradient: dW[:, :, ky, kx] = Σ over the grid of dY · Xshiftᵀ; one partial sum per group of
/// images, added at the end.
pub(super) fn weight_grad(x: &[f32], dy: &[f32], g: &Geom) -> Result<Vec<f32>> {
    let (h, w, cin, cout) = (g.h, g.w, g.cin, g.cout);
    let split = Split::new(g.b);
    let partials = x
        .par_chunks(split.per * cin * h * w)
        .zip(dy.par_chunks(split.per * cout * h * w))
        .map(|(xg, dyg)| weight_grad_group(xg, dyg, g, split.par))
        .collect::<Result<Vec<_>>>()?;
    let mut parts = partials.into_iter();
    let mut per_offset = parts.next().unwrap_or_else(|| vec![0f32; 9 * cout * cin]);
    for part in parts {
        per_offset.iter_mut().zip(&part).for_each(|(a, b)| *a += *b);
    }
    // (9, Cout, Cin) → (Cout, Cin, 3, 3).
    let mut dw = vec![0f32; cout * cin * 9];
    for (o, block) in per_offset.chunks(cout * cin).enumerate() {
        for (i, &v) in block.iter().enumerate() {
            dw[i * 9 + o] = v;
        }
    }
    Ok(dw)
}

/// One group's weight gradient per offset, (9, Cout, Cin).
fn weight_grad_group(x: &[f32], dy: &[f32], g: &Geom, par: gemm::Parallelism) -> Result<Vec<f32>> {
    let (h, w, cin, cout) = (g.h, g.w, g.cin, g.cout);
    let mut out = vec![0f32; 9 * cout * cin];
    let bc = chunk_images(g, dy.len() / (cout * h * w));
    let gr_of = |nb| Grid { nb, h, w };
    let [mut xp, mut dyp] = take_scratch(gr_of(bc).padded_len(cin), gr_of(bc).padded_len(cout));
    let abt = cout <= ABT_MAX_COUT && gemm_abt::available();
    for (i, (xc, dyc)) in x.chunks(bc * cin * h * w).zip(dy.chunks(bc * cout * h * w)).enumerate() {
        let gr = gr_of(dyc.len() / (cout * h * w));
        let (s, n) = (gr.stride(), gr.n());
        let xp = &mut xp[..gr.padded_len(cin)];
        let dyp = &mut dyp[..gr.padded_len(cout)];
        to_grid(xc, cin, gr, 1, xp);
        to_grid(dyc, cout, gr, 0, dyp);
        for o in 0..9 {
            let dst = &mut out[o * cout * cin..][..cout * cin];
            let shifted = &xp[gr.shift(o)..];
            // Few output channels: dot products along the grid, as for the im2col path.
            if abt && gemm_abt::sgemm_abt((cout, cin, n), dyp, s, shifted, s, dst, cin, i > 0) {
                continue;
            }
            let lhs = MatRef { data: dyp, rs: s, cs: 1 };
            let rhs = MatRef { data: shifted, rs: 1, cs: s };
            sgemm((cout, cin, n), dst, i > 0, lhs, rhs, par)?;
        }
    }
    put_scratch([xp, dyp]);
    Ok(out)
}
