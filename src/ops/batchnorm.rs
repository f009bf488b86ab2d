//! Batch norm: a CPU custom op for training (one pass for the per-channel statistics, a closed-form
//! backward) and candle-op versions for evaluation and for devices/dtypes without the fast path.
//!
//! The input is viewed as (B, C, S) with S = H*W (S = 1 for a (B, C) input); N = B*S values per
//! channel. Backward: with xhat = (x - mean) * invstd,
//! dx = gamma * invstd / N * (N*dy - sum(dy) - xhat * sum(dy * xhat)),
//! dgamma = sum(dy * xhat), dbeta = sum(dy).

use super::cpu_op::{map2, Arg, Cpu, CpuOp, Names};
use super::profile::Part;
use candle_core::{bail, CustomOp3, DType, Result, Shape, Tensor};
use rayon::prelude::*;

/// Validates the shapes of a batch-norm call and returns the channel count C.
pub(crate) fn check_shapes(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<usize> {
    let c = match x.dims() {
        &[_, c] | &[_, c, _, _] => c,
        d => bail!("batch norm: input must be (B, C, H, W) or (B, C), got shape {d:?}"),
    };
    super::check_affine("batch norm", x, [("gamma", gamma), ("beta", beta)], c, "the channels", eps)?;
    Ok(c)
}

/// (B, C, S) for a (B, C, H, W) or (B, C) shape (checked by [`check_shapes`]).
fn dims3(dims: &[usize]) -> Result<(usize, usize, usize)> {
    match *dims {
        [b, c] => Ok((b, c, 1)),
        [b, c, h, w] => Ok((b, c, h * w)),
        _ => bail!("batch norm: input must be (B, C, H, W) or (B, C), got shape {dims:?}"),
    }
}

/// Rayon work items of at least this many elements, so that (B, C) inputs (S = 1) do not
/// spawn one task per value.
fn min_planes(s: usize) -> usize {
    (4096 / s).max(1)
}

/// Sums of `v - shift` and `(v - shift)^2` over one plane: f32 lanes (vectorisable), f64 result.
fn plane_moments(plane: &[f32], shift: f32) -> (f64, f64) {
    let mut s1 = [0f32; 8];
    let mut s2 = [0f32; 8];
    let chunks = plane.chunks_exact(8);
    let tail = chunks.remainder();
    for ch in chunks {
        for i in 0..8 {
            let d = ch[i] - shift;
            s1[i] += d;
            s2[i] += d * d;
        }
    }
    let mut t1: f64 = s1.iter().map(|&v| v as f64).sum();
    let mut t2: f64 = s2.iter().map(|&v| v as f64).sum();
    for &v in tail {
        let d = (v - shift) as f64;
        t1 += d;
        t2 += d * d;
    }
    (t1, t2)
}

/// Sums of `d` and `d * (x - mean)` over one plane, `d = eff(dy, y)` the effective output gradient.
#[inline(always)]
fn plane_grad_sums(x: &[f32], dy: &[f32], y: &[f32], mean: f32, eff: impl Fn(f32, f32) -> f32 + Copy) -> (f64, f64) {
    let mut s1 = [0f32; 8];
    let mut s2 = [0f32; 8];
    let (xc, dc, yc) = (x.chunks_exact(8), dy.chunks_exact(8), y.chunks_exact(8));
    let (xt, dt, yt) = (xc.remainder(), dc.remainder(), yc.remainder());
    for ((xs, ds), ys) in xc.zip(dc).zip(yc) {
        for i in 0..8 {
            let d = eff(ds[i], ys[i]);
            s1[i] += d;
            s2[i] += d * (xs[i] - mean);
        }
    }
    let mut t1: f64 = s1.iter().map(|&v| v as f64).sum();
    let mut t2: f64 = s2.iter().map(|&v| v as f64).sum();
    for ((&xv, &dv), &yv) in xt.iter().zip(dt).zip(yt) {
        let d = eff(dv, yv);
        t1 += d as f64;
        t2 += (d * (xv - mean)) as f64;
    }
    (t1, t2)
}

/// What a training-mode batch norm returns: y, and the detached batch mean and biased variance (C).
pub(crate) type TrainOutput = (Tensor, Tensor, Tensor);

/// Entry point of the CPU path: all tensors f32 on the CPU, shapes already checked.
pub(crate) fn train_cpu(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64, epi: &Epilogue) -> Result<TrainOutput> {
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&Cpu(ChannelStats))?.to_vec2::<f32>()?;
    let [mean, var] = [&stats[0], &stats[1]];
    let invstd = var.iter().map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32).collect();
    let op = BnTrain { mean: mean.clone(), invstd, scale: epi.scale as f32, relu: epi.relu };
    let y = epi.apply_train_op(&x, gamma, beta, Cpu(op), |Cpu(op)| Cpu(BnTrainResidual(op)))?;
    let mean = Tensor::new(mean.as_slice(), x.device())?;
    let var = Tensor::new(var.as_slice(), x.device())?;
    Ok((y, mean, var))
}

/// What follows the normalisation in a fused batch-norm call: `y = act(scale * bn(x) + residual)`,
/// `act` being ReLU or the identity. The default is plain batch norm.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// Multiplier of the normalised output (a residual branch's scale); any finite value.
    pub scale: f64,
    /// Added after scaling, before the activation: (B, C, H, W) like x.
    pub residual: Option<&'a Tensor>,
    /// Apply ReLU last.
    pub relu: bool,
}

impl Default for Epilogue<'_> {
    fn default() -> Self {
        Self { scale: 1.0, residual: None, relu: false }
    }
}

impl Epilogue<'_> {
    /// The epilogue from candle ops (the fallback paths, and layers without normalisation).
    pub fn apply(&self, y: Tensor) -> Result<Tensor> {
        let y = if self.scale == 1.0 { y } else { (y * self.scale)? };
        let y = match self.residual {
            Some(r) => (y + r)?,
            None => y,
        };
        if self.relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// Validates the residual's shape and the scale against the input's.
    pub(crate) fn check(&self, x: &Tensor) -> Result<()> {
        if !self.scale.is_finite() {
            bail!("batch norm: epilogue scale must be finite, got {}", self.scale);
        }
        if let Some(r) = self.residual {
            if r.dims() != x.dims() {
                bail!("batch norm: residual {:?} does not match input {:?}", r.dims(), x.dims());
            }
            if r.dtype() != x.dtype() {
                bail!("batch norm: residual is {:?} but input is {:?}", r.dtype(), x.dtype());
            }
        }
        Ok(())
    }

    /// Runs a fused training-mode forward op of a backend (CPU here, CUDA in `bn_cuda.rs`): `plain` on
    /// (x, gamma, beta) without a residual, `with_residual(plain)` on (x, [gamma; beta], residual) with
    /// one. Four inputs do not fit candle's custom ops: gamma and beta travel as one (2C) tensor, whose
    /// gradient `cat`'s backward splits again.
    pub(crate) fn apply_train_op<P: CustomOp3 + Send + Sync + 'static, R: CustomOp3 + Send + Sync + 'static>(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        plain: P,
        with_residual: impl FnOnce(P) -> R,
    ) -> Result<Tensor> {
        match self.residual {
            None => x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, plain),
            Some(r) => {
                let gb = Tensor::cat(&[gamma, beta], 0)?;
                x.apply_op3(&gb, &r.contiguous()?, with_residual(plain))
            }
        }
    }
}

/// x (B, C, ...) -> (2, C): per-channel mean and biased variance, in one pass over x.
struct ChannelStats;

impl CpuOp<1> for ChannelStats {
    const NAMES: Names<1> = Names { op: "sdp-bn-stats", args: ["input"] };
    const PART: Part = Part::BnForward;

    fn fwd(&self, [x]: [Arg; 1]) -> Result<(Vec<f32>, Shape)> {
        let (b, c, sp) = dims3(x.dims())?;
        let n = (b * sp) as f64;
        let stats: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                // Shifting by one value of the channel keeps the one-pass variance accurate
                // when |mean| >> std.
                let shift = x[ch * sp];
                let (s1, s2) = (0..b)
                    .map(|bi| plane_moments(&x[(bi * c + ch) * sp..][..sp], shift))
                    .fold((0.0, 0.0), |a, m| (a.0 + m.0, a.1 + m.1));
                let m = s1 / n;
                ((m + shift as f64) as f32, (s2 / n - m * m).max(0.0) as f32)
            })
            .collect();
        Ok(rows2(&stats))
    }
}

/// Per-channel pairs as a (2, C) tensor's data: the first values, then the second ones.
fn rows2(pairs: &[(f32, f32)]) -> (Vec<f32>, Shape) {
    let out = pairs.iter().map(|s| s.0).chain(pairs.iter().map(|s| s.1)).collect();
    (out, Shape::from((2, pairs.len())))
}

/// (x, gamma, beta) -> y = act(scale * ((x - mean) * invstd * gamma + beta)), with the batch
/// statistics fixed.
struct BnTrain {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    scale: f32,
    relu: bool,
}

impl BnTrain {
    /// y = act(a * x + b + r) per channel, with the scale folded into a and b.
    fn forward(&self, x: Arg, gamma: &[f32], beta: &[f32], r: Option<&[f32]>) -> Result<(Vec<f32>, Shape)> {
        let (_, c, sp) = dims3(x.dims())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(sp).with_min_len(min_planes(sp)).zip(x.par_chunks(sp)).enumerate().for_each(
            |(idx, (yp, xp))| {
                let ch = idx % c;
                let a = self.scale * gamma[ch] * self.invstd[ch];
                let b = self.scale * beta[ch] - self.mean[ch] * a;
                match (r, self.relu) {
                    (None, false) => yp.iter_mut().zip(xp).for_each(|(o, &v)| *o = v * a + b),
                    (None, true) => yp.iter_mut().zip(xp).for_each(|(o, &v)| *o = (v * a + b).max(0.0)),
                    (Some(r), relu) => {
                        let rp = &r[idx * sp..][..sp];
                        let lo = if relu { 0.0 } else { f32::NEG_INFINITY };
                        yp.iter_mut().zip(xp).zip(rp).for_each(|((o, &v), &rv)| *o = (v * a + b + rv).max(lo));
                    }
                }
            },
        );
        Ok((y, x.shape.clone()))
    }

    /// (dx, dgamma, dbeta) for the output gradient `dy`; `mask` is the output when the ReLU's
    /// gradient mask (y > 0) still has to be applied to `dy`, `None` when it has been.
    fn backward(&self, x: &Tensor, gamma: &Tensor, dy: &Tensor, mask: Option<&Tensor>) -> Result<[Option<Tensor>; 3]> {
        let dy = dy.contiguous()?;
        let mask = match mask {
            Some(y) => Some(y.contiguous()?),
            None => None,
        };
        let kernel = BnBackward {
            mean: self.mean.clone(),
            invstd: self.invstd.clone(),
            scale: self.scale,
            relu: mask.is_some(),
            sums: None,
        };
        // The mask argument is ignored when `relu` is false; dy stands in for it.
        let m = mask.as_ref().unwrap_or(&dy);
        let sums = x.apply_op3_no_bwd(&dy, m, &Cpu(kernel.clone()))?; // (2, C): sum(dy'), sum(dy' * xhat)
        let dbeta = sums.get(0)?;
        let dgamma = sums.get(1)?;
        let dx = if x.track_op() {
            let kernel = BnBackward {
                sums: Some(BnSums {
                    gamma: gamma.to_vec1::<f32>()?,
                    sum_dy: dbeta.to_vec1::<f32>()?,
                    sum_dy_xhat: dgamma.to_vec1::<f32>()?,
                }),
                ..kernel
            };
            Some(x.apply_op3_no_bwd(&dy, m, &Cpu(kernel))?)
        } else {
            None
        };
        Ok([dx, Some(dgamma), Some(dbeta)])
    }
}

impl CpuOp<3> for BnTrain {
    const NAMES: Names<3> = Names { op: "sdp-batch-norm-train", args: ["input", "gamma", "beta"] };
    const PART: Part = Part::BnForward;

    fn fwd(&self, [x, gamma, beta]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        self.forward(x, gamma.data, beta.data, None)
    }

    fn bwd(&self, [x, gamma, _beta]: [&Tensor; 3], res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        self.backward(x, gamma, grad, self.relu.then_some(res))
    }
}

/// (x, [gamma; beta], residual) -> y = act(scale * bn(x) + residual).
struct BnTrainResidual(BnTrain);

impl CpuOp<3> for BnTrainResidual {
    const NAMES: Names<3> = Names { op: "sdp-batch-norm-train-residual", args: ["input", "gamma/beta", "residual"] };
    const PART: Part = Part::BnForward;

    fn fwd(&self, [x, gb, r]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        let (gamma, beta) = gb.data.split_at(gb.data.len() / 2);
        self.0.forward(x, gamma, beta, Some(r.data))
    }

    fn bwd(&self, [x, gb, _r]: [&Tensor; 3], res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        // The residual's gradient is the masked output gradient itself: compute it once and feed
        // the batch-norm backward with it.
        let dz = if self.0.relu { grad.apply_op2_no_bwd(res, &Cpu(ReluMask))? } else { grad.clone() };
        let c = gb.dim(0)? / 2;
        let [dx, dgamma, dbeta] = self.0.backward(x, &gb.narrow(0, 0, c)?, &dz, None)?;
        let dgb = match (dgamma, dbeta) {
            (Some(g), Some(b)) => Some(Tensor::cat(&[g, b], 0)?),
            _ => None,
        };
        Ok([dx, dgb, Some(dz)])
    }
}

/// (dy, y) -> dy where y > 0, else 0: the ReLU backward from its output (as PyTorch's).
struct ReluMask;

impl CpuOp<2> for ReluMask {
    const NAMES: Names<2> = Names { op: "sdp-relu-mask", args: ["output gradient", "output"] };
    const PART: Part = Part::BnBackward;
    const SAME_SHAPE: usize = 2;

    fn fwd(&self, [dy, y]: [Arg; 2]) -> Result<(Vec<f32>, Shape)> {
        Ok((map2(&dy, &y, |d, y| if y > 0.0 { d } else { 0.0 }), dy.shape.clone()))
    }
}

/// The per-channel sums the input gradient needs (the result of the first backward pass).
#[derive(Clone)]
struct BnSums {
    gamma: Vec<f32>,
    sum_dy: Vec<f32>,
    sum_dy_xhat: Vec<f32>,
}

/// The two backward passes over (x, dy, y), with the effective output gradient
/// dy' = scale * dy * [y > 0 if relu]: without `sums`, (x, dy, y) -> (2, C) per-channel sum(dy')
/// and sum(dy' * xhat); with them, (x, dy, y) -> dx.
#[derive(Clone)]
struct BnBackward {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    scale: f32,
    relu: bool,
    sums: Option<BnSums>,
}

impl BnBackward {
    /// `f` monomorphised for this op's effective output gradient d(dy, y) = scale · dy · [y > 0 if relu]:
    /// one branch-free inner loop per case (mask and scale, scale only, neither).
    #[inline(always)]
    fn effective<R>(&self, f: impl EffectiveFn<R>) -> R {
        let s = self.scale;
        match (self.relu, s) {
            (true, _) => f.call(move |d: f32, y: f32| if y > 0.0 { s * d } else { 0.0 }),
            (false, 1.0) => f.call(|d: f32, _: f32| d),
            (false, _) => f.call(move |d: f32, _: f32| s * d),
        }
    }
}

/// A computation generic over the effective-gradient function (a closure cannot be generic).
trait EffectiveFn<R> {
    fn call(self, eff: impl Fn(f32, f32) -> f32 + Copy) -> R;
}

/// Pass 1 over one channel's planes: (sum d, sum d · (x - mean)).
struct ChannelSums<'a> {
    planes: &'a mut dyn Iterator<Item = (&'a [f32], &'a [f32], &'a [f32])>,
    mean: f32,
}

impl EffectiveFn<(f64, f64)> for ChannelSums<'_> {
    fn call(self, eff: impl Fn(f32, f32) -> f32 + Copy) -> (f64, f64) {
        self.planes
            .map(|(x, dy, y)| plane_grad_sums(x, dy, y, self.mean, eff))
            .fold((0.0, 0.0), |a, m| (a.0 + m.0, a.1 + m.1))
    }
}

/// Pass 2 over one plane: dx = a · d + c1 · x + c0.
struct PlaneDx<'a> {
    dx: &'a mut [f32],
    x: &'a [f32],
    dy: &'a [f32],
    y: &'a [f32],
    coef: [f32; 3],
}

impl EffectiveFn<()> for PlaneDx<'_> {
    fn call(self, eff: impl Fn(f32, f32) -> f32 + Copy) {
        let [a, c1, c0] = self.coef;
        for (((o, &xv), &dv), &yv) in self.dx.iter_mut().zip(self.x).zip(self.dy).zip(self.y) {
            *o = a * eff(dv, yv) + c1 * xv + c0;
        }
    }
}

impl CpuOp<3> for BnBackward {
    const NAMES: Names<3> = Names { op: "sdp-batch-norm-backward", args: ["input", "output gradient", "output"] };
    const PART: Part = Part::BnBackward;
    const SAME_SHAPE: usize = 3;

    fn fwd(&self, [x, dy, y]: [Arg; 3]) -> Result<(Vec<f32>, Shape)> {
        let (b, c, sp) = dims3(x.dims())?;
        let Some(sums) = &self.sums else {
            let sums: Vec<(f32, f32)> = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let mut planes = (0..b).map(|bi| {
                        let off = (bi * c + ch) * sp;
                        (&x[off..][..sp], &dy[off..][..sp], &y[off..][..sp])
                    });
                    let (s1, s2) = self.effective(ChannelSums { planes: &mut planes, mean: self.mean[ch] });
                    (s1 as f32, (s2 * self.invstd[ch] as f64) as f32)
                })
                .collect();
            return Ok(rows2(&sums));
        };
        let n = (b * sp) as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(sp)
            .with_min_len(min_planes(sp))
            .zip(x.par_chunks(sp).zip(dy.par_chunks(sp).zip(y.par_chunks(sp))))
            .enumerate()
            .for_each(|(idx, (dxp, (xp, (dyp, yp))))| {
                let ch = idx % c;
                // dx = a*dy' + c1*x + c0, the closed form rearranged to one multiply-add chain.
                let a = sums.gamma[ch] * self.invstd[ch];
                let c1 = -a * sums.sum_dy_xhat[ch] * self.invstd[ch] / n;
                let c0 = -a * sums.sum_dy[ch] / n - c1 * self.mean[ch];
                self.effective(PlaneDx { dx: dxp, x: xp, dy: dyp, y: yp, coef: [a, c1, c0] });
            });
        Ok((dx, x.shape.clone()))
    }
}

/// The dtype the candle-op versions compute in: f32 for half precision (whose statistics lose
/// too much), the input's own dtype otherwise.
fn compute_dtype(x: &Tensor) -> DType {
    match x.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Batch norm in training mode from candle ops (non-CPU devices, non-f32 dtypes).
pub(crate) fn train_generic(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64, c: usize) -> Result<TrainOutput> {
    let (b, _, sp) = dims3(x.dims())?;
    let dt = compute_dtype(x);
    let x3 = x.to_dtype(dt)?.reshape((b, c, sp))?;
    // Equal-sized groups: the mean of the per-plane means is the channel mean.
    let mean = x3.mean_keepdim(2)?.mean_keepdim(0)?; // (1, C, 1)
    let centered = x3.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
    let scale = (var.affine(1.0, eps)?.sqrt()?.recip()? * gamma.to_dtype(dt)?.reshape((1, c, 1))?)?;
    let y = centered
        .broadcast_mul(&scale)?
        .broadcast_add(&beta.to_dtype(dt)?.reshape((1, c, 1))?)?
        .reshape(x.shape())?
        .to_dtype(x.dtype())?;
    Ok((y, mean.flatten_all()?.detach(), var.flatten_all()?.detach()))
}

/// Batch norm in evaluation mode from candle ops (all devices), with the `running` mean and variance.
pub(crate) fn eval_generic(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running: [&Tensor; 2],
    eps: f64,
    c: usize,
) -> Result<Tensor> {
    let (b, _, sp) = dims3(x.dims())?;
    let dt = compute_dtype(x);
    let [rm, rv] = running.map(|t| t.detach().to_dtype(dt));
    let (rm, rv) = (rm?, rv?);
    let scale = (rv.affine(1.0, eps)?.sqrt()?.recip()? * gamma.to_dtype(dt)?)?;
    let shift = (beta.to_dtype(dt)? - (rm * &scale)?)?;
    x.to_dtype(dt)?
        .reshape((b, c, sp))?
        .broadcast_mul(&scale.reshape((1, c, 1))?)?
        .broadcast_add(&shift.reshape((1, c, 1))?)?
        .reshape(x.shape())?
        .to_dtype(x.dtype())
}
