//! SwiGLU's gate, SiLU(g) ⊙ u, as one CPU custom op with a closed-form backward pass (a decoder's MLP:
//! `down(silu(gate(x)) * up(x))`); candle ops elsewhere.
//!
//! Composed from candle ops (silu, mul) the gate costs three element-wise passes forward and, backward,
//! silu's derivative as several more ops, each with a zero-filled gradient buffer and an add.
//!
//! y = g σ(g) u; dg = dy u σ(g) (1 + g (1 − σ(g))), du = dy g σ(g).

use super::cpu_op::{Arg, Cpu, CpuOp, Names};
use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

/// SiLU(g) ⊙ u for `g` and `u` of one shape, differentiable in both.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        bail!("swiglu: up {:?} does not match gate {:?}", u.dims(), g.dims());
    }
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if cpu_f32(g) && cpu_f32(u) {
        g.contiguous()?.apply_op2(&u.contiguous()?, Cpu(SwiGlu))
    } else {
        g.silu()? * u
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

struct SwiGlu;

impl CpuOp<2> for SwiGlu {
    const NAMES: Names<2> = Names { op: "sdp-swiglu", args: ["gate", "up"] };
    const SAME_SHAPE: usize = 2;

    fn fwd(&self, [g, u]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        Ok((super::cpu_op::map2(&g, &u, |gv, uv| gv * sigmoid(gv) * uv), g.shape.clone()))
    }

    fn bwd(&self, [g, u]: [&Tensor; 2], _y: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        // One pass writes both gradients, side by side in a (2, …) tensor.
        let both = g.apply_op3_no_bwd(u, &grad.contiguous()?, &Cpu(SwiGluGrad))?;
        Ok([Some(both.get(0)?), Some(both.get(1)?)])
    }
}

/// (g, u, dy) → [dg; du], stacked on a new first axis.
struct SwiGluGrad;

impl CpuOp<3> for SwiGluGrad {
    const NAMES: Names<3> = Names { op: "sdp-swiglu-grad", args: ["gate", "up", "output gradient"] };
    const SAME_SHAPE: usize = 3;

    fn fwd(&self, [g, u, dy]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
            .for_each(|((dg, du), ((g, u), dy))| {
                for i in 0..g.len() {
                    let s = sigmoid(g[i]);
                    let silu = g[i] * s;
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                    du[i] = dy[i] * silu;
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(g.dims());
        Ok((out, Shape::from(dims)))
    }
}
