//! RMS norm over the last dim (Hugging Face `LlamaRMSNorm`): a CPU custom op with a closed-form
//! backward, and the candle-op version for other devices and dtypes.
//!
//! candle-nn's `rms_norm` is a fused op without a backward pass: gradients stop at it silently.
//!
//! The input is viewed as (R, D) rows. Per row, with rstd = 1 / sqrt(mean(x²) + eps) and xhat = x * rstd:
//! y = xhat * w; dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w; dw = sum over rows of dy * xhat.

use super::cpu_op::{map_rows, map_rows2, rows_per_task, Arg, Cpu, CpuOp, Names};
use candle_core::{bail, DType, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Validates shapes: x is (…, D) with D ≥ 1, w is (D).
pub(crate) fn check_shapes(x: &Tensor, w: &Tensor, eps: f64) -> Result<usize> {
    let Some(&d) = x.dims().last() else { bail!("rms norm: input must have at least one dim, got a scalar") };
    super::check_affine("rms norm", x, [("weight", w)], d, "the last dim", eps)?;
    Ok(d)
}

/// The reciprocal root mean square of one row, offset by eps.
fn row_rstd(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|&v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// Entry point of the CPU path (f32 tensors, shapes checked).
pub(crate) fn rms_norm_cpu(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Cpu(RmsNormOp { eps: eps as f32 }))
}

struct RmsNormOp {
    eps: f32,
}

impl CpuOp<2> for RmsNormOp {
    const NAMES: Names<2> = Names { op: "sdp-rms-norm", args: ["input", "weight"] };

    fn fwd(&self, [x, w]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        let y = map_rows(&x, w.len(), |yr, xr| {
            let rstd = row_rstd(xr, self.eps);
            // (x * rstd) * w in this order, as LlamaRMSNorm rounds it.
            for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w.data) {
                *o = v * rstd * wv;
            }
        });
        Ok((y, x.shape.clone()))
    }

    fn bwd(&self, [x, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let dy = grad.contiguous()?;
        let x = x.contiguous()?;
        let dx = if x.track_op() {
            Some(x.apply_op3_no_bwd(&dy, &w.contiguous()?, &Cpu(RmsNormInputGrad { eps: self.eps }))?)
        } else {
            None
        };
        let dw =
            if w.track_op() { Some(x.apply_op2_no_bwd(&dy, &Cpu(RmsNormWeightGrad { eps: self.eps }))?) } else { None };
        Ok([dx, dw])
    }
}

/// (x, dy, w) -> dx, row by row.
struct RmsNormInputGrad {
    eps: f32,
}

impl CpuOp<3> for RmsNormInputGrad {
    const NAMES: Names<3> = Names { op: "sdp-rms-norm-input-grad", args: ["input", "output gradient", "weight"] };
    const SAME_SHAPE: usize = 2;

    fn fwd(&self, [x, dy, w]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        let n = w.len() as f32;
        let dx = map_rows2(&x, &dy, w.len(), |dxr, xr, dyr| {
            let rstd = row_rstd(xr, self.eps);
            let sgx: f32 = xr.iter().zip(dyr).zip(w.data).map(|((&v, &g), &wv)| g * wv * v * rstd).sum();
            let mean_gx = sgx / n;
            for (((o, &v), &g), &wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(w.data) {
                *o = rstd * (g * wv - v * rstd * mean_gx);
            }
        });
        Ok((dx, x.shape.clone()))
    }
}

/// (x, dy) -> dw = sum over rows of dy * xhat, (D).
struct RmsNormWeightGrad {
    eps: f32,
}

impl CpuOp<2> for RmsNormWeightGrad {
    const NAMES: Names<2> = Names { op: "sdp-rms-norm-weight-grad", args: ["input", "output gradient"] };
    const SAME_SHAPE: usize = 2;

    fn fwd(&self, [x, dy]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        let d = *x.dims().last().unwrap_or(&1);
        if d == 0 {
            bail!("rms norm backward: empty rows in input {:?}", x.dims());
        }
        // Partial sums over fixed blocks of rows, then an in-order reduction: no atomics, and the
        // same result whatever the thread count.
        let rows_per_task = rows_per_task(d).max(64);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(rows_per_task * d)
            .zip(dy.par_chunks(rows_per_task * d))
            .map(|(xs, dys)| {
                let mut dw = vec![0f32; d];
                for (xr, dyr) in xs.chunks_exact(d).zip(dys.chunks_exact(d)) {
                    let rstd = row_rstd(xr, self.eps);
                    for ((a, &v), &g) in dw.iter_mut().zip(xr).zip(dyr) {
                        *a += g * v * rstd;
                    }
                }
                dw
            })
            .collect();
        let mut out = vec![0f32; d];
        for p in &partials {
            for (o, &v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok((out, Shape::from(d)))
    }
}

/// RMS norm from candle ops (other devices and dtypes), computed in f32 for half precision (as
/// `LlamaRMSNorm` does).
pub(crate) fn rms_norm_generic(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = match x.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let xs = x.to_dtype(dt)?;
    let ms = xs.sqr()?.mean_keepdim(D::Minus1)?;
    xs.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(&w.to_dtype(dt)?)?.to_dtype(x.dtype())
}
