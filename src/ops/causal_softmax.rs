//! Causal softmax: softmax over the last dim of (…, T, T) attention scores in which row i only sees
//! columns j ≤ i (the others get probability exactly 0), as in a decoder's self-attention.
//!
//! On the CPU with f32 tensors a custom op that only touches j ≤ i: per row i,
//! y[j] = exp(x[j] - max) / sum over j ≤ i, and the softmax backward restricted to those columns,
//! dx[j] = y[j] * (dy[j] - sum over j ≤ i of dy * y), dx[j] = 0 for j > i.
//! Elsewhere composed from candle ops: a (T, T) mask of -inf above the diagonal added to the scores,
//! then [`super::softmax_last_dim`] (which has a backward pass on every device).

use super::activation::{softmax_grad_row, softmax_row};
use super::cpu_op::{map_rows2_indexed, map_rows_indexed, Arg, Cpu, CpuOp, Names};
use candle_core::{bail, Result, Shape, Tensor};

/// Validates the shape: x is (…, T, T) with T ≥ 1. Returns T.
pub(crate) fn check_shape(x: &Tensor) -> Result<usize> {
    match x.dims() {
        [.., a, b] if a == b && *a > 0 && x.elem_count() > 0 => Ok(*a),
        dims => bail!("causal softmax: x must be non-empty (…, T, T) scores, got shape {dims:?}"),
    }
}

/// Entry point of the CPU path (f32 tensor, shape checked).
pub(crate) fn causal_softmax_cpu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Cpu(CausalSoftmax))
}

/// T, the length of the rows (the shape has a last dim, checked up front).
fn row_len(x: &Arg) -> usize {
    *x.dims().last().unwrap_or(&1)
}

struct CausalSoftmax;

impl CpuOp<1> for CausalSoftmax {
    const NAMES: Names<1> = Names { op: "sdp-causal-softmax", args: ["input"] };

    fn fwd(&self, [x]: [Arg; 1]) -> Result<(Vec<f32>, Shape)> {
        let t = row_len(&x);
        // The masked columns keep the zeros the output starts with.
        let y = map_rows_indexed(&x, t, |row, yr, xr| {
            let seen = row % t + 1;
            softmax_row(&mut yr[..seen], &xr[..seen]);
        });
        Ok((y, x.shape.clone()))
    }

    fn bwd(&self, _x: [&Tensor; 1], y: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        Ok([Some(y.apply_op2_no_bwd(&grad.contiguous()?, &Cpu(CausalSoftmaxGrad))?)])
    }
}

/// (y, dy) -> dx = y * (dy - sum(dy * y)) over the columns j ≤ i of row i, 0 elsewhere (whatever dy
/// holds there).
struct CausalSoftmaxGrad;

impl CpuOp<2> for CausalSoftmaxGrad {
    const NAMES: Names<2> = Names { op: "sdp-causal-softmax-grad", args: ["output", "output gradient"] };
    const SAME_SHAPE: usize = 2;

    fn fwd(&self, [y, dy]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        let t = row_len(&y);
        let dx = map_rows2_indexed(&y, &dy, t, |row, o, yr, gr| {
            let seen = row % t + 1;
            softmax_grad_row(&mut o[..seen], &yr[..seen], &gr[..seen]);
        });
        Ok((dx, y.shape.clone()))
    }
}

/// Causal softmax from candle ops (other devices and dtypes).
pub(crate) fn causal_softmax_generic(x: &Tensor, t: usize) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (t, t), x.device())?.to_dtype(x.dtype())?;
    super::softmax_last_dim(&x.broadcast_add(&mask)?)
}
