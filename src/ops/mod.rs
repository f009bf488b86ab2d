//! Training ops with fast CPU kernels and real backward passes: `conv2d` and batch norm.
//!
//! candle's own CPU conv2d backward (a naive `conv_transpose2d` for the input gradient and a
//! batch-transposed conv for the weight gradient) and its BatchNorm (a chain of generic ops) make a
//! CIFAR ResNet-18 step several times slower than PyTorch. Every model in the crate calls these
//! functions instead of `Tensor::conv2d` / `candle_nn::BatchNorm`:
//!
//! - on the CPU with f32 tensors they run candle custom ops (im2col + GEMM for the convolution and
//!   both its gradients, a one-pass statistics kernel and a closed-form backward for batch norm);
//! - on CUDA with f32, bf16 or f16 tensors and the `cudnn` feature, `conv2d` runs cuDNN custom ops
//!   (forward, backward-data and backward-filter calls with cached algorithms: see `cudnn/`);
//! - on CUDA with the `cuda` feature, batch norm in training (with its fused epilogue) runs custom
//!   CUDA kernels: one-pass statistics and the same closed-form backward (`bn_cuda.rs`);
//! - on the CPU with bf16 tensors, `conv2d` emulates a GPU's bf16 convolution (f32 arithmetic);
//! - otherwise they fall back to candle's own ops with the same semantics.
//!
//! The decoder ops `rms_norm`, `rope` and `causal_softmax` (candle-nn's `rms_norm` and `rope*` have no
//! backward pass, so gradients would stop at them silently) are CPU f32 custom ops with closed-form
//! backward passes, and candle-op compositions on other devices and dtypes.
//!
//! The GPU paths were written and built without a GPU at hand; `tests/cuda_ops.rs` checks them
//! against the CPU ops on a device (`scripts/gpu_step.sh`).

mod activation;
mod batchnorm;
mod bmm;
#[cfg(feature = "cuda")]
mod bn_cuda;
mod causal_softmax;
mod conv;
mod cpu_op;
mod cross_entropy;
#[cfg(feature = "cudnn")]
mod cudnn;
mod gemm_abt;
mod layernorm;
pub mod peak;
pub mod profile;
mod rmsnorm;
mod rotary;
mod swiglu;

use candle_core::{bail, DType, Device, Result, Tensor};

/// The checks batch norm, layer norm and RMS norm share: a non-empty input `x`, affine parameters of
/// shape [n] (`axis` names what n counts in x), and a finite non-negative eps.
fn check_affine<const N: usize>(
    op: &str,
    x: &Tensor,
    params: [(&str, &Tensor); N],
    n: usize,
    axis: &str,
    eps: f64,
) -> Result<()> {
    if x.elem_count() == 0 {
        bail!("{op}: empty input of shape {:?}", x.dims());
    }
    for (name, t) in params {
        if t.dims() != [n] {
            bail!("{op}: {name} must have shape [{n}] ({axis} of x {:?}), got {:?}", x.dims(), t.dims());
        }
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("{op}: eps must be finite and non-negative, got {eps}");
    }
    Ok(())
}

/// 2-D convolution without bias, dilation 1 and groups 1.
///
/// `x` is (B, Cin, H, W), `w` is (Cout, Cin, kh, kw); the result is
/// (B, Cout, (H + 2p - kh)/s + 1, (W + 2p - kw)/s + 1). Gradients flow to both `x` and `w`.
/// Non-contiguous inputs are accepted (they are made contiguous first).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv::check_shapes(x.dims(), w.dims(), stride, padding)?;
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return conv::conv2d_cpu(x, w, stride, padding);
    }
    if x.device().is_cpu() && x.dtype() == DType::BF16 && w.dtype() == DType::BF16 {
        // candle has no CPU bf16 matmul. Emulate what a GPU's bf16 convolution does (bf16 operands,
        // f32 accumulation, bf16 result) so the mixed-precision path runs, and is tested, here.
        let y = conv::conv2d_cpu(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, stride, padding)?;
        return y.to_dtype(DType::BF16);
    }
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda() && x.dtype() == w.dtype() && cudnn::supports(x.dtype()) {
        return cudnn::conv2d(x, w, stride, padding);
    }
    x.conv2d(w, padding, stride, 1, 1)
}

pub use activation::{gelu_erf, softmax_last_dim};
pub use cross_entropy::cross_entropy;
pub use swiglu::swiglu;

/// Batched matrix product (…, M, K) · (…, K, N) → (…, M, N) with equal leading dims, differentiable
/// in both. On the CPU with f32 tensors the batch is spread over rayon threads (candle runs batches
/// of small products one by one on one thread); elsewhere candle's `matmul`.
pub fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    bmm::check_shapes(a.dims(), b.dims())?;
    if a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        bmm::bmm_cpu(a, b)
    } else {
        a.matmul(b)
    }
}
pub use batchnorm::Epilogue;

/// Layer norm over the last dim: `(x - mean) / sqrt(var + eps) * w + b` with the biased variance (as
/// PyTorch's). `x` is (…, D); `w` and `b` are (D). Differentiable w.r.t. all three. On the CPU with
/// f32 tensors a custom op (one pass forward, a closed-form backward); elsewhere candle ops, computed
/// in f32 for half-precision inputs.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    layernorm::check_shapes(x, w, b, eps)?;
    if x.device().is_cpu() && [x, w, b].iter().all(|t| t.dtype() == DType::F32) {
        layernorm::layer_norm_cpu(x, w, b, eps)
    } else {
        layernorm::layer_norm_generic(x, w, b, eps)
    }
}

/// RMS norm over the last dim, as Hugging Face's `LlamaRMSNorm`: `w * x / sqrt(mean(x²) + eps)`. `x` is
/// (…, D), `w` is (D). Differentiable w.r.t. both (candle-nn's `rms_norm` has no backward pass). On
/// the CPU with f32 tensors a custom op (one pass forward, a closed-form backward); elsewhere candle
/// ops, computed in f32 for half-precision inputs and returned in x's dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    rmsnorm::check_shapes(x, w, eps)?;
    if x.device().is_cpu() && [x, w].iter().all(|t| t.dtype() == DType::F32) {
        rmsnorm::rms_norm_cpu(x, w, eps)
    } else {
        rmsnorm::rms_norm_generic(x, w, eps)
    }
}

/// Rotary position embedding in the Hugging Face Llama convention ("rotate half"): `x` is (B, H, T, D)
/// with D even, `cos` and `sin` are (T, D/2) (from [`rope_tables`]); with h = D/2,
/// `out[..., i] = x[i] cos[t, i] - x[i+h] sin[t, i]` and `out[..., i+h] = x[i+h] cos[t, i] + x[i] sin[t, i]`.
/// Differentiable w.r.t. `x` (candle-nn's `rope*` have no backward pass); the tables are constants.
/// Non-contiguous `x` (a transposed view) is accepted. On the CPU with f32 tensors a custom op (its
/// backward rotates dy by the opposite angles); elsewhere candle ops in x's dtype.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotary::check_shapes(x, cos, sin)?;
    if x.device().is_cpu() && [x, cos, sin].iter().all(|t| t.dtype() == DType::F32) {
        rotary::rope_cpu(x, cos, sin)
    } else {
        rotary::rope_generic(x, cos, sin)
    }
}

/// The (positions, head_dim/2) f32 cos and sin tables of [`rope`] for positions 0..positions:
/// angle[t, i] = t / theta^(2i/head_dim), computed in f32 as transformers' `LlamaRotaryEmbedding` does
/// (its tables are these with each row repeated twice).
pub fn rope_tables(positions: usize, head_dim: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    rotary::tables(positions, head_dim, theta, device)
}

/// Softmax over the last dim of (…, T, T) attention scores with a causal mask: in row i the columns
/// j > i get probability exactly 0. Differentiable w.r.t. `x`. On the CPU with f32 tensors a custom
/// op that skips the masked columns; elsewhere a -inf mask and [`softmax_last_dim`].
pub fn causal_softmax(x: &Tensor) -> Result<Tensor> {
    let t = causal_softmax::check_shape(x)?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        causal_softmax::causal_softmax_cpu(x)
    } else {
        causal_softmax::causal_softmax_generic(x, t)
    }
}

/// Batch norm in training mode.
///
/// `x` is (B, C, H, W) or (B, C); `gamma` and `beta` are (C). Returns
/// `(y, mean, var)`: `y` is differentiable w.r.t. `x`, `gamma` and `beta`; `mean` and the biased
/// variance `var` are detached (C) tensors of the batch statistics, for the caller to update its
/// running statistics (PyTorch's rule uses the unbiased variance `var * N / (N - 1)`, N = B*H*W).
pub fn batch_norm_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_fused(x, gamma, beta, eps, &Epilogue::default())
}

/// [`batch_norm_train`] followed by an [`Epilogue`] in the same op: `y = act(scale * bn(x) + residual)`.
///
/// One graph node instead of up to four, and no intermediate activations: candle's backward gives
/// every node a zero-filled gradient buffer plus an add, and its ReLU backward takes five passes, so
/// a ResNet basic block's BN→ReLU and BN→add→ReLU chains cost more than the convolutions' own
/// bookkeeping. Gradients flow to `x`, `gamma`, `beta` and the residual; the ReLU's backward uses
/// its output (`y > 0`), as PyTorch's does.
pub fn batch_norm_train_fused(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    epi: &Epilogue,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = batchnorm::check_shapes(x, gamma, beta, eps)?;
    epi.check(x)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && bn_cuda::supports(x.dtype(), gamma.dtype(), beta.dtype()) {
        return bn_cuda::train_cuda(x, gamma, beta, eps, epi);
    }
    let on_fast_path = x.device().is_cpu() && [x, gamma, beta].iter().all(|t| t.dtype() == DType::F32);
    if on_fast_path {
        batchnorm::train_cpu(x, gamma, beta, eps, epi)
    } else {
        let (y, mean, var) = batchnorm::train_generic(x, gamma, beta, eps, c)?;
        Ok((epi.apply(y)?, mean, var))
    }
}

/// Batch norm in evaluation mode, normalising with the running statistics, followed by an [`Epilogue`]
/// (`Epilogue::default()`: none; composed from candle ops, as evaluation has no backward pass to save).
///
/// Shapes as in [`batch_norm_train`]; `running_mean` and `running_var` are (C) and are treated as
/// constants (detached, converted to `x`'s dtype). Differentiable w.r.t. `x`, `gamma` and `beta`.
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    epi: &Epilogue,
) -> Result<Tensor> {
    let c = batchnorm::check_shapes(x, gamma, beta, eps)?;
    epi.check(x)?;
    for (name, t) in [("running_mean", running_mean), ("running_var", running_var)] {
        if t.dims() != [c] {
            bail!(
                "batch_norm_eval: {name} must have shape [{c}] (the channels of x {:?}), got {:?}",
                x.dims(),
                t.dims()
            );
        }
    }
    epi.apply(batchnorm::eval_generic(x, gamma, beta, [running_mean, running_var], eps, c)?)
}
