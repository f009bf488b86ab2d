//! Rotary position embeddings in the Hugging Face Llama ("rotate half") convention.
//!
//! For a head of even size D and h = D/2, position t and i < h, with angle[t, i] = t * inv_freq[i] and
//! inv_freq[i] = 1 / theta^(2i/D):
//! out[i] = x[i] cos - x[i+h] sin, out[i+h] = x[i+h] cos + x[i] sin.
//!
//! candle-nn's `rope*` ops have no backward pass (gradients stop at them silently). On the CPU with
//! f32 tensors this is a custom op whose backward is the rotation by -angle applied to dy:
//! dx[i] = dy[i] cos + dy[i+h] sin, dx[i+h] = dy[i+h] cos - dy[i] sin. Elsewhere it is composed from
//! candle ops that all have a backward pass. The tables are constants: they get no gradient.

use super::cpu_op::{map_rows_indexed, Arg, Cpu, CpuOp, Names};
use candle_core::{bail, Device, Result, Shape, Tensor, D};

/// Validates shapes: x is (B, H, T, D) with D even, cos and sin are (T, D/2).
pub(crate) fn check_shapes(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let &[_, _, t, d] = x.dims() else { bail!("rope: x must be (B, H, T, D), got shape {:?}", x.dims()) };
    if d == 0 || !d.is_multiple_of(2) {
        bail!("rope: the head dim D of x {:?} must be even and non-zero, got {d}", x.dims());
    }
    for (name, table) in [("cos", cos), ("sin", sin)] {
        if table.dims() != [t, d / 2] {
            bail!(
                "rope: {name} must have shape [T, D/2] = [{t}, {}] (x is {:?}), got {:?}",
                d / 2,
                x.dims(),
                table.dims()
            );
        }
    }
    Ok(())
}

/// The (positions, head_dim/2) cos and sin tables, f32 on `device`, computed as transformers'
/// `LlamaRotaryEmbedding` does: inv_freq in f32, then the angles t * inv_freq[i] in f32.
pub(crate) fn tables(positions: usize, head_dim: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!("rope_tables: head_dim must be even and non-zero, got {head_dim}");
    }
    if positions == 0 {
        bail!("rope_tables: positions must be at least 1");
    }
    if !(theta.is_finite() && theta > 0.0) {
        bail!("rope_tables: theta must be finite and positive, got {theta}");
    }
    let half = head_dim / 2;
    // transformers: 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), all in f32.
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for t in 0..positions {
        for &f in &inv_freq {
            // The angle rounded to f32 as in transformers; its cos and sin correctly rounded.
            let angle = f64::from(t as f32 * f);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (positions, half), device)?;
    let sin = Tensor::from_vec(sin, (positions, half), device)?;
    Ok((cos, sin))
}

/// Entry point of the CPU path (f32 tensors, shapes checked; x may be a non-contiguous view).
pub(crate) fn rope_cpu(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Cpu(Rope))
}

/// Rotates every head-dim row of the contiguous (B, H, T, D) `x` by the angles of its position t
/// (`inverse`: by their opposites).
fn rotate(op: &str, x: Arg, cos: &[f32], sin: &[f32], inverse: bool) -> Result<Vec<f32>> {
    let &[_, _, t, d] = x.dims() else { bail!("{op}: input must be (B, H, T, D), got shape {:?}", x.dims()) };
    let h = d / 2;
    if cos.len() != t * h || sin.len() != t * h {
        bail!("{op}: tables of {} and {} values for T = {t}, D = {d}", cos.len(), sin.len());
    }
    let sign = if inverse { -1.0 } else { 1.0 };
    Ok(map_rows_indexed(&x, d, |row, o, xr| {
        let pos = row % t;
        let (c, s) = (&cos[pos * h..][..h], &sin[pos * h..][..h]);
        let (x1, x2) = xr.split_at(h);
        let (o1, o2) = o.split_at_mut(h);
        for ((((o1, o2), (&a, &b)), &c), &s) in o1.iter_mut().zip(o2).zip(x1.iter().zip(x2)).zip(c).zip(s) {
            let s = sign * s;
            *o1 = a * c - b * s;
            *o2 = b * c + a * s;
        }
    }))
}

/// (x, cos, sin) -> the rotated x.
struct Rope;

impl CpuOp<3> for Rope {
    const NAMES: Names<3> = Names { op: "sdp-rope", args: ["input", "cos", "sin"] };

    fn fwd(&self, [x, cos, sin]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        Ok((rotate(Self::NAMES.op, x, &cos, &sin, false)?, x.shape.clone()))
    }

    fn bwd(&self, [x, cos, sin]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let dx = if x.track_op() {
            Some(grad.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &Cpu(RopeGrad))?)
        } else {
            None
        };
        Ok([dx, None, None])
    }
}

/// (dy, cos, sin) -> dx, dy rotated by -angle.
struct RopeGrad;

impl CpuOp<3> for RopeGrad {
    const NAMES: Names<3> = Names { op: "sdp-rope-grad", args: ["output gradient", "cos", "sin"] };

    fn fwd(&self, [dy, cos, sin]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        Ok((rotate(Self::NAMES.op, dy, &cos, &sin, true)?, dy.shape.clone()))
    }
}

/// Rotary embedding from candle ops (other devices and dtypes), in x's dtype (the tables are
/// converted to it, as transformers does).
pub(crate) fn rope_generic(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let h = x.dim(D::Minus1)? / 2;
    let cos = cos.detach().to_dtype(x.dtype())?;
    let sin = sin.detach().to_dtype(x.dtype())?;
    // (B, H, T, D) -> two (B, H, T, D/2) halves
    let (x1, x2) = (x.narrow(D::Minus1, 0, h)?, x.narrow(D::Minus1, h, h)?);
    let lo = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let hi = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[lo, hi], D::Minus1)
}
