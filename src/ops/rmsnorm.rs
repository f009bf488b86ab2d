//! RMS norm over the last dim (Hugging Face `LlamaRMSNorm`): y = w * x / sqrt(mean(x²) + eps).
//!
//! candle-nn's `rms_norm` is a fused op without a backward pass: gradients stop at it silently. This
//! version is composed from candle ops that all have one.

use candle_core::{bail, DType, Result, Tensor, D};

/// Validates shapes: x is (…, D) with D ≥ 1, w is (D).
pub(crate) fn check_shapes(x: &Tensor, w: &Tensor, eps: f64) -> Result<usize> {
    let Some(&d) = x.dims().last() else { bail!("rms norm: input must have at least one dim, got a scalar") };
    super::check_affine("rms norm", x, [("weight", w)], d, "the last dim", eps)?;
    Ok(d)
}

/// RMS norm from candle ops, computed in f32 for half precision (as `LlamaRMSNorm` does).
pub(crate) fn rms_norm_generic(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = match x.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let xs = x.to_dtype(dt)?;
    let ms = xs.sqr()?.mean_keepdim(D::Minus1)?;
    xs.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(&w.to_dtype(dt)?)?.to_dtype(x.dtype())
}
