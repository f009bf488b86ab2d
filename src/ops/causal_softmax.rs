//! Causal softmax: softmax over the last dim of (…, T, T) attention scores in which row i only sees
//! columns j ≤ i (the others get probability exactly 0), as in a decoder's self-attention.
//!
//! Composed from candle ops: a (T, T) mask of -inf above the diagonal added to the scores, then
//! [`super::softmax_last_dim`] (which has a backward pass on every device).

use candle_core::{bail, Result, Tensor};

/// Validates the shape: x is (…, T, T) with T ≥ 1. Returns T.
pub(crate) fn check_shape(x: &Tensor) -> Result<usize> {
    match x.dims() {
        [.., a, b] if a == b && *a > 0 && x.elem_count() > 0 => Ok(*a),
        dims => bail!("causal softmax: x must be non-empty (…, T, T) scores, got shape {dims:?}"),
    }
}

/// Causal softmax from candle ops (other devices and dtypes).
pub(crate) fn causal_softmax_generic(x: &Tensor, t: usize) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (t, t), x.device())?.to_dtype(x.dtype())?;
    super::softmax_last_dim(&x.broadcast_add(&mask)?)
}
