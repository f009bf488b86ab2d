//! Layer norm over the last dim: a CPU custom op with a closed-form backward, and the candle-op
//! version for other devices and dtypes.
//!
//! The input is viewed as (R, D) rows. Per row, with xhat = (x - mean) * rstd:
//! y = xhat * w + b; dx = rstd / D * (D * g - sum(g) - xhat * sum(g * xhat)) with g = dy * w;
//! dw = sum over rows of dy * xhat, db = sum over rows of dy.
//!
//! candle's composed layer norm is 9 graph nodes forward (each costing its backward a zero-filled
//! gradient buffer plus an add) and ~20 ops backward; swin_t has 29 of them per step.

use super::cpu_op::{map_rows, map_rows2, rows_per_task, Arg, Cpu, CpuOp, Names};
use candle_core::{bail, Result, Shape, Tensor, D};
use rayon::prelude::*;

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
    x.apply_op3(&w.contiguous()?, &b.contiguous()?, Cpu(LayerNormOp { eps: eps as f32 }))
}

struct LayerNormOp {
    eps: f32,
}

impl CpuOp<3> for LayerNormOp {
    const NAMES: Names<3> = Names { op: "sdp-layer-norm", args: ["input", "weight", "bias"] };

    fn fwd(&self, [x, w, b]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        let y = map_rows(&x, w.len(), |yr, xr| {
            let (mean, rstd) = row_stats(xr, self.eps);
            for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w.data).zip(b.data) {
                *o = (v - mean) * rstd * wv + bv;
            }
        });
        Ok((y, x.shape.clone()))
    }

    fn bwd(&self, [x, w, _b]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let dy = grad.contiguous()?;
        let x = x.contiguous()?;
        let dx = if x.track_op() {
            Some(x.apply_op3_no_bwd(&dy, &w.contiguous()?, &Cpu(LayerNormInputGrad { eps: self.eps }))?)
        } else {
            None
        };
        let sums = x.apply_op2_no_bwd(&dy, &Cpu(LayerNormParamGrad { eps: self.eps }))?; // (2, D): dw, db
        Ok([dx, Some(sums.get(0)?), Some(sums.get(1)?)])
    }
}

/// (x, dy, w) -> dx, row by row.
struct LayerNormInputGrad {
    eps: f32,
}

impl CpuOp<3> for LayerNormInputGrad {
    const NAMES: Names<3> = Names { op: "sdp-layer-norm-input-grad", args: ["input", "output gradient", "weight"] };
    const SAME_SHAPE: usize = 2;

    fn fwd(&self, [x, dy, w]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        let n = w.len() as f32;
        let dx = map_rows2(&x, &dy, w.len(), |dxr, xr, dyr| {
            let (mean, rstd) = row_stats(xr, self.eps);
            let (mut sg, mut sgx) = (0f32, 0f32);
            for ((&v, &g), &wv) in xr.iter().zip(dyr).zip(w.data) {
                let g = g * wv;
                sg += g;
                sgx += g * (v - mean) * rstd;
            }
            for (((o, &v), &g), &wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(w.data) {
                let xhat = (v - mean) * rstd;
                *o = rstd / n * (n * g * wv - sg - xhat * sgx);
            }
        });
        Ok((dx, x.shape.clone()))
    }
}

/// (x, dy) -> (2, D): dw = sum over rows of dy * xhat, db = sum over rows of dy.
struct LayerNormParamGrad {
    eps: f32,
}

impl CpuOp<2> for LayerNormParamGrad {
    const NAMES: Names<2> = Names { op: "sdp-layer-norm-param-grad", args: ["input", "output gradient"] };
    const SAME_SHAPE: usize = 2;

    fn fwd(&self, [x, dy]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        let d = *x.dims().last().unwrap_or(&1);
        if d == 0 {
            bail!("layer norm backward: empty rows in input {:?}", x.dims());
        }
        // Partial sums over fixed blocks of rows, then an in-order reduction: no atomics, and the
        // same result whatever the thread count.
        let rows_per_task = rows_per_task(d).max(64);
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
        Ok((out, Shape::from((2, d))))
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
