//! Batched matrix product with the batch spread over rayon: swin_t's window attention multiplies
//! thousands of tiny matrices (e.g. 6,144 products of 16×32 by 32×16 per stage-1 block at batch 32).
//! candle's CPU matmul runs such batches one after another on one thread (each product is too small
//! for its parallel GEMM); here each rayon task takes a contiguous run of batch items, each a
//! single-threaded GEMM.
//!
//! C = A·B; backward: dA = dC·Bᵀ, dB = Aᵀ·dC, as the same op with transposed operands (strides, no
//! copies).

use super::conv::{sgemm, MatRef};
use super::cpu_op::{Arg, Cpu, CpuOp, Names};
use super::profile::{self, Part};
use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

/// (…, M, K) · (…, K, N) → (…, M, N) with equal leading (batch) dims; differentiable in both.
pub(crate) fn bmm_cpu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, Cpu(Bmm { ta: false, tb: false }))
}

/// Checks `a` (…, M, K) and `b` (…, K, N) and returns (batch, M, K, N).
pub(crate) fn check_shapes(a: &[usize], b: &[usize]) -> Result<(usize, usize, usize, usize)> {
    if a.len() < 2 || a.len() != b.len() || a[..a.len() - 2] != b[..b.len() - 2] {
        bail!("bmm: expected (…, M, K) and (…, K, N) with the same leading dims, got {a:?} and {b:?}");
    }
    let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
    let (k2, n) = (b[b.len() - 2], b[b.len() - 1]);
    if k != k2 {
        bail!("bmm: inner dims differ: {a:?} · {b:?}");
    }
    Ok((a[..a.len() - 2].iter().product(), m, k, n))
}

/// op(A)·op(B) per batch item; with `ta`, A is stored as (…, K, M) (and B as (…, N, K) with `tb`).
struct Bmm {
    ta: bool,
    tb: bool,
}

impl CpuOp<2> for Bmm {
    const NAMES: Names<2> = Names { op: "sdp-bmm", args: ["lhs", "rhs"] };
    const PART: Part = Part::Matmul;

    fn fwd(&self, [a, b]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        // The logical (…, M, K) and (…, K, N) dims, whatever the storage order.
        let swap = |d: &[usize], t: bool| {
            let mut d = d.to_vec();
            let r = d.len();
            if t && r >= 2 {
                d.swap(r - 1, r - 2);
            }
            d
        };
        let (da, db) = (swap(a.dims(), self.ta), swap(b.dims(), self.tb));
        let (a, b) = (a.data, b.data);
        let (batch, m, k, n) = check_shapes(&da, &db)?;
        profile::add_flops(Self::PART, 2 * (batch * m * k * n) as u64);
        let mut out_dims = da[..da.len() - 2].to_vec();
        out_dims.extend([m, n]);
        let mut c = vec![0f32; batch * m * n];
        if m * n == 0 {
            return Ok((c, Shape::from(out_dims)));
        }
        // Row/column strides of op(A) (M×K) and op(B) (K×N) inside one batch item.
        let (a_rs, a_cs) = if self.ta { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if self.tb { (1, k) } else { (n, 1) };
        // Enough products per task to amortise the task, at least one.
        let per = (4096 / (m * n * k.max(1))).max(1);
        c.par_chunks_mut(per * m * n)
            .zip(a.par_chunks((per * m * k).max(1)))
            .zip(b.par_chunks((per * k * n).max(1)))
            .try_for_each(|((cs, as_), bs)| {
            for ((ci, ai), bi) in cs.chunks_mut(m * n).zip(as_.chunks((m * k).max(1))).zip(bs.chunks((k * n).max(1))) {
                let lhs = MatRef { data: ai, rs: a_rs, cs: a_cs };
                let rhs = MatRef { data: bi, rs: b_rs, cs: b_cs };
                sgemm((m, n, k), ci, false, lhs, rhs, gemm::Parallelism::None)?;
            }
            Ok::<(), candle_core::Error>(())
        })?;
        Ok((c, Shape::from(out_dims)))
    }

    fn bwd(&self, [a, b]: [&Tensor; 2], _c: &Tensor, dc: &Tensor) -> Result<[Option<Tensor>; 2]> {
        if self.ta || self.tb {
            bail!("bmm: the transposed forms are backward-only and have no backward themselves");
        }
        let dc = dc.contiguous()?;
        let da = if a.track_op() { Some(dc.apply_op2_no_bwd(b, &Cpu(Bmm { ta: false, tb: true }))?) } else { None };
        let db = if b.track_op() { Some(a.apply_op2_no_bwd(&dc, &Cpu(Bmm { ta: true, tb: false }))?) } else { None };
        Ok([da, db])
    }
}
