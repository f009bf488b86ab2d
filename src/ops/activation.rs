//! Softmax over the last dim and the exact (erf) GELU as CPU custom ops with closed-form backward
//! passes, for swin_t's attention and MLP; candle ops elsewhere.
//!
//! candle-nn's fused `softmax_last_dim` has no backward, and the composed softmax (max, sub, exp,
//! sum, div) and `gelu_erf` (whose backward is ~10 element-wise ops) cost their backward a zero-filled
//! gradient buffer plus an add per node.
//!
//! Softmax: y = exp(x - max) / sum, dx = y * (dy - sum(dy * y)) per row.
//! GELU: y = x * Φ(x), dy/dx = Φ(x) + x * φ(x), with Φ(x) = (1 + erf(x / √2)) / 2.

use super::f32_slice;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Elements per rayon task of the element-wise kernels.
const CHUNK: usize = 1 << 14;

fn on_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 || x.elem_count() == 0 {
        bail!("softmax: input must have at least one dim and one element, got shape {:?}", x.dims());
    }
    if on_cpu_f32(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "sdp-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice("softmax", s, l, "input")?;
        let d = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).with_min_len((4096 / d).max(1)).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
            let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            yr.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// (y, dy) -> dx = y * (dy - sum(dy * y)) per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "sdp-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice("softmax", s1, l1, "output")?;
        let dy = f32_slice("softmax", s2, l2, "output gradient")?;
        if l1.dims() != l2.dims() {
            bail!("softmax backward: gradient {:?} does not match output {:?}", l2.dims(), l1.dims());
        }
        let d = *l1.dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(d).with_min_len((4096 / d).max(1)).zip(y.par_chunks(d).zip(dy.par_chunks(d))).for_each(
            |(o, (yr, gr))| {
                let dot: f32 = yr.iter().zip(gr).map(|(&a, &b)| a * b).sum();
                for ((o, &yv), &g) in o.iter_mut().zip(yr).zip(gr) {
                    *o = yv * (g - dot);
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The exact GELU, x * Φ(x) (PyTorch's default `nn.GELU`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if on_cpu_f32(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

/// Φ(x), the standard normal CDF.
fn phi_cdf(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "sdp-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice("gelu", s, l, "input")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, xs)| {
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = v * phi_cdf(v);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// (x, dy) -> dy * (Φ(x) + x φ(x)).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "sdp-gelu-erf-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice("gelu", s1, l1, "input")?;
        let dy = f32_slice("gelu", s2, l2, "output gradient")?;
        if l1.dims() != l2.dims() {
            bail!("gelu backward: gradient {:?} does not match input {:?}", l2.dims(), l1.dims());
        }
        // 1/√(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(o, (xs, gs))| {
            for ((o, &v), &g) in o.iter_mut().zip(xs).zip(gs) {
                let pdf = INV_SQRT_2PI * (-0.5 * v * v).exp();
                *o = g * (phi_cdf(v) + v * pdf);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
