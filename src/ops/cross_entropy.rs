//! Mean cross-entropy of logits rows against target ids as one CPU custom op with a closed-form backward
//! pass (a language model's loss over batch × positions rows of a vocabulary); candle-nn's composition
//! elsewhere.
//!
//! Composed (log-softmax as max, sub, exp, sum, log, sub; then gather and mean) the loss of a decoder's
//! (batch·T, vocab) logits makes about ten full-size temporaries forward and as many backward.
//!
//! loss = mean_r (logsumexp(x_r) − x_r[t_r]); dx_r = g (softmax(x_r) − onehot(t_r)) / R.

use super::cpu_op::{Arg, Cpu, CpuOp, Names};
use candle_core::{bail, DType, Result, Shape, Tensor};
use rayon::prelude::*;

/// Mean over rows of −log softmax(logits)[target]: `logits` (R, V), `targets` (R) of u32 ids below V.
/// Differentiable in `logits`. Rows are summed in f64.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (r, v) = logits.dims2()?;
    if targets.dims() != [r] {
        bail!("cross entropy: targets {:?} do not match the {r} rows of logits {:?}", targets.dims(), logits.dims());
    }
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        // Ids below 2^24 are exact in f32; a vocabulary is far smaller.
        if v >= 1 << 24 {
            bail!("cross entropy: {v} classes do not fit the f32 target ids of the CPU op");
        }
        let t = targets.to_dtype(DType::F32)?;
        logits.contiguous()?.apply_op2(&t, Cpu(CrossEntropy))
    } else {
        candle_nn::loss::cross_entropy(logits, targets)
    }
}

/// The target of a row as an index, checked against the row length (a bad id is an error, not a panic).
fn target(t: f32, v: usize) -> Result<usize> {
    let i = t as usize;
    if t < 0.0 || i as f32 != t || i >= v {
        bail!("cross entropy: target {t} is not a class id below {v}");
    }
    Ok(i)
}

/// log Σ exp(row), shifted by the row's max.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    (max, max + sum.ln())
}

struct CrossEntropy;

impl CpuOp<2> for CrossEntropy {
    const NAMES: Names<2> = Names { op: "sdp-cross-entropy", args: ["logits", "targets"] };
    const SAME_SHAPE: usize = 0;

    fn fwd(&self, [x, t]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        let v = *x.dims().last().unwrap_or(&1);
        let rows = x.len() / v.max(1);
        let losses: Result<Vec<f64>> = x
            .par_chunks(v)
            .zip(t.par_iter())
            .map(|(row, &ti)| {
                let (_, lse) = log_sum_exp(row);
                Ok((lse - row[target(ti, v)?]) as f64)
            })
            .collect();
        let mean = losses?.iter().sum::<f64>() / rows.max(1) as f64;
        Ok((vec![mean as f32], Shape::from(())))
    }

    fn bwd(&self, [x, t]: [&Tensor; 2], _loss: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        // The loss's gradient is a scalar: it scales every row's (softmax − onehot) / R.
        let g = grad.to_dtype(DType::F32)?.reshape(1)?;
        Ok([Some(x.apply_op3_no_bwd(t, &g, &Cpu(CrossEntropyGrad))?), None])
    }
}

/// (logits, targets, g) → g (softmax − onehot) / R per row.
struct CrossEntropyGrad;

impl CpuOp<3> for CrossEntropyGrad {
    const NAMES: Names<3> = Names { op: "sdp-cross-entropy-grad", args: ["logits", "targets", "loss gradient"] };
    const SAME_SHAPE: usize = 0;

    fn fwd(&self, [x, t, g]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        let v = *x.dims().last().unwrap_or(&1);
        let rows = x.len() / v.max(1);
        let scale = g[0] / rows.max(1) as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v).zip(x.par_chunks(v)).zip(t.par_iter()).try_for_each(|((d, row), &ti)| {
            let (max, lse) = log_sum_exp(row);
            let shift = lse - max;
            for (o, &xv) in d.iter_mut().zip(row) {
                *o = scale * (xv - max - shift).exp();
            }
            d[target(ti, v)?] -= scale;
            Ok::<_, candle_core::Error>(())
        })?;
        Ok((dx, x.shape.clone()))
    }
}
