//! Softmax over the last dim and the exact (erf) GELU as CPU custom ops with closed-form backward
//! passes, for swin_t's attention and MLP; candle ops elsewhere.
//!
//! candle-nn's fused `softmax_last_dim` has no backward, and the composed softmax (max, sub, exp,
//! sum, div) and `gelu_erf` (whose backward is ~10 element-wise ops) cost their backward a zero-filled
//! gradient buffer plus an add per node.
//!
//! Softmax: y = exp(x - max) / sum, dx = y * (dy - sum(dy * y)) per row.
//! GELU: y = x * Φ(x), dy/dx = Φ(x) + x * φ(x), with Φ(x) = (1 + erf(x / √2)) / 2.

use super::cpu_op::{map1, map2, map_rows, map_rows2, Arg, Cpu, CpuOp, Names};
use candle_core::{bail, Result, Shape, Tensor, D};

fn on_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// The length of the rows the ops work on (the last dim; the shape has one, checked up front).
fn last_dim(x: &Arg) -> usize {
    *x.dims().last().unwrap_or(&1)
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 || x.elem_count() == 0 {
        bail!("softmax: input must have at least one dim and one element, got shape {:?}", x.dims());
    }
    if on_cpu_f32(x) {
        x.contiguous()?.apply_op1(Cpu(Softmax))
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// `yr` = softmax(`xr`): exp(x − max) / sum.
pub(super) fn softmax_row(yr: &mut [f32], xr: &[f32]) {
    let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (o, &v) in yr.iter_mut().zip(xr) {
        *o = (v - max).exp();
        sum += *o;
    }
    let inv = 1.0 / sum;
    yr.iter_mut().for_each(|o| *o *= inv);
}

/// `o` = y (dy − sum(dy y)): the softmax's input gradient for its output `yr` and output gradient `gr`.
pub(super) fn softmax_grad_row(o: &mut [f32], yr: &[f32], gr: &[f32]) {
    let dot: f32 = yr.iter().zip(gr).map(|(&a, &b)| a * b).sum();
    for ((o, &yv), &g) in o.iter_mut().zip(yr).zip(gr) {
        *o = yv * (g - dot);
    }
}

struct Softmax;

impl CpuOp<1> for Softmax {
    const NAMES: Names<1> = Names { op: "sdp-softmax-last-dim", args: ["input"] };

    fn fwd(&self, [x]: [Arg; 1]) -> Result<(Vec<f32>, Shape)> {
        let y = map_rows(&x, last_dim(&x), softmax_row);
        Ok((y, x.shape.clone()))
    }

    fn bwd(&self, _x: [&Tensor; 1], y: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        Ok([Some(y.apply_op2_no_bwd(&grad.contiguous()?, &Cpu(SoftmaxGrad))?)])
    }
}

/// (y, dy) -> dx = y * (dy - sum(dy * y)) per row.
struct SoftmaxGrad;

impl CpuOp<2> for SoftmaxGrad {
    const NAMES: Names<2> = Names { op: "sdp-softmax-grad", args: ["output", "output gradient"] };
    const SAME_SHAPE: usize = 2;

    fn fwd(&self, [y, dy]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        let dx = map_rows2(&y, &dy, last_dim(&y), softmax_grad_row);
        Ok((dx, y.shape.clone()))
    }
}

/// The exact GELU, x * Φ(x) (PyTorch's default `nn.GELU`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if on_cpu_f32(x) {
        x.contiguous()?.apply_op1(Cpu(Gelu))
    } else {
        x.gelu_erf()
    }
}

/// Φ(x), the standard normal CDF.
fn phi_cdf(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

struct Gelu;

impl CpuOp<1> for Gelu {
    const NAMES: Names<1> = Names { op: "sdp-gelu-erf", args: ["input"] };

    fn fwd(&self, [x]: [Arg; 1]) -> Result<(Vec<f32>, Shape)> {
        Ok((map1(&x, |v| v * phi_cdf(v)), x.shape.clone()))
    }

    fn bwd(&self, [x]: [&Tensor; 1], _y: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        Ok([Some(x.apply_op2_no_bwd(&grad.contiguous()?, &Cpu(GeluGrad))?)])
    }
}

/// (x, dy) -> dy * (Φ(x) + x φ(x)).
struct GeluGrad;

impl CpuOp<2> for GeluGrad {
    const NAMES: Names<2> = Names { op: "sdp-gelu-erf-grad", args: ["input", "output gradient"] };
    const SAME_SHAPE: usize = 2;

    fn fwd(&self, [x, dy]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        // 1/√(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let dx = map2(&x, &dy, |v, g| {
            let pdf = INV_SQRT_2PI * (-0.5 * v * v).exp();
            g * (phi_cdf(v) + v * pdf)
        });
        Ok((dx, x.shape.clone()))
    }
}
