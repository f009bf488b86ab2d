//! Layer norm over the last dim: a CPU custom op with a closed-form backward, and the candle-op
//! version for other devices and dtypes.
//!
//! The input is viewed as (R, D) rows. Per row, with xhat = (x - mean) * rstd:
//! y = xhat * w + b; dx = rstd / D * (D * g - sum(g) - xhat * sum(g * xhat)) with g = dy * w;
//! dw = sum over rows of dy * xhat, db = sum over rows of dy.
//!
//! candle's composed layer norm is 9 graph nodes forward (each costing its backward a zero-filled
//! gradient buffer plus an add) and ~20 ops backward; swin_t has 29 of them per step.

use super::f32_slice;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows per rayon task: enough work per task for short rows.
fn min_rows(d: usize) -> usize {
    (4096 / d.max(1)).max(1)
}

/// Validates shapes: x is (…, D) with D ≥ 1, w and b are (D).
pub(crate) fn check_shapes(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<usize> {
    let Some(&d) = x.dims().last() else { bail!("layer norm: input must have at least one dim, got a scalar") };
    super::check_affine("layer norm", x, [("weight", w), ("bias", b)], d, "the last dim", eps)?;
    Ok(d)
}

/// Mean and reciprocal standard deviation of one row (two passes over a row in cache).
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Entry point of the CPU path (f32 tensors, shapes checked).
pub(crate) fn layer_norm_cpu(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps: eps as f32 })
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "sdp-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice("layer norm", s1, l1, "input")?;
        let w = f32_slice("layer norm", s2, l2, "weight")?;
        let b = f32_slice("layer norm", s3, l3, "bias")?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).with_min_len(min_rows(d)).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
            let (mean, rstd) = row_stats(xr, self.eps);
            for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mean) * rstd * wv + bv;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let x = x.contiguous()?;
        let dx = if x.track_op() {
            Some(x.apply_op3_no_bwd(&dy, &w.contiguous()?, &LayerNormInputGrad { eps: self.eps })?)
        } else {
            None
        };
        let sums = x.apply_op2_no_bwd(&dy, &LayerNormParamGrad { eps: self.eps })?; // (2, D): dw, db
        Ok((dx, Some(sums.get(0)?), Some(sums.get(1)?)))
    }
}

/// (x, dy, w) -> dx, row by row.
struct LayerNormInputGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormInputGrad {
    fn name(&self) -> &'static str {
        "sdp-layer-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice("layer norm", s1, l1, "input")?;
        let dy = f32_slice("layer norm", s2, l2, "output gradient")?;
        let w = f32_slice("layer norm", s3, l3, "weight")?;
        if dy.len() != x.len() {
            bail!("layer norm backward: gradient {:?} does not match input {:?}", l2.dims(), l1.dims());
        }
        let d = w.len();
        let n = d as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d).with_min_len(min_rows(d)).zip(x.par_chunks(d).zip(dy.par_chunks(d))).for_each(
            |(dxr, (xr, dyr))| {
                let (mean, rstd) = row_stats(xr, self.eps);
                let (mut sg, mut sgx) = (0f32, 0f32);
                for ((&v, &g), &wv) in xr.iter().zip(dyr).zip(w) {
                    let g = g * wv;
                    sg += g;
                    sgx += g * (v - mean) * rstd;
                }
                for (((o, &v), &g), &wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                    let xhat = (v - mean) * rstd;
                    *o = rstd / n * (n * g * wv - sg - xhat * sgx);
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// (x, dy) -> (2, D): dw = sum over rows of dy * xhat, db = sum over rows of dy.
struct LayerNormParamGrad {
    eps: f32,
}

impl CustomOp2 for LayerNormParamGrad {
    fn name(&self) -> &'static str {
        "sdp-layer-norm-param-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice("layer norm", s1, l1, "input")?;
        let dy = f32_slice("layer norm", s2, l2, "output gradient")?;
        let d = *l1.dims().last().unwrap_or(&1);
        if dy.len() != x.len() || d == 0 {
            bail!("layer norm backward: gradient {:?} does not match input {:?}", l2.dims(), l1.dims());
        }
        // Partial sums over fixed blocks of rows, then an in-order reduction: no atomics, and the
        // same result whatever the thread count.
        let rows_per_task = min_rows(d).max(64);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(rows_per_task * d)
            .zip(dy.par_chunks(rows_per_task * d))
            .map(|(xs, dys)| {
                let mut acc = vec![0f32; 2 * d];
                let (dw, db) = acc.split_at_mut(d);
                for (xr, dyr) in xs.chunks_exact(d).zip(dys.chunks_exact(d)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    for (((a, bsum), &v), &g) in dw.iter_mut().zip(db.iter_mut()).zip(xr).zip(dyr) {
                        *a += g * (v - mean) * rstd;
                        *bsum += g;
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; 2 * d];
        for p in &partials {
            for (o, &v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((2, d))))
    }
}

/// Layer norm from candle ops (other devices and dtypes), computed in f32 for half precision.
pub(crate) fn layer_norm_generic(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = match x.dtype() {
        candle_core::DType::F64 => candle_core::DType::F64,
        _ => candle_core::DType::F32,
    };
    let xs = x.to_dtype(dt)?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let xc = xs.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&w.to_dtype(dt)?)?
        .broadcast_add(&b.to_dtype(dt)?)?
        .to_dtype(x.dtype())
}
