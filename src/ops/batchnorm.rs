//! Batch norm: a CPU custom op for training (one pass for the per-channel statistics, a closed-form
//! backward) and candle-op versions for evaluation and for devices/dtypes without the fast path.
//!
//! The input is viewed as (B, C, S) with S = H*W (S = 1 for a (B, C) input); N = B*S values per
//! channel. Backward: with xhat = (x - mean) * invstd,
//! dx = gamma * invstd / N * (N*dy - sum(dy) - xhat * sum(dy * xhat)),
//! dgamma = sum(dy * xhat), dbeta = sum(dy).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Validates the shapes of a batch-norm call and returns the channel count C.
pub(crate) fn check_shapes(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<usize> {
    let c = match x.dims() {
        &[_, c] | &[_, c, _, _] => c,
        d => bail!("batch norm: input must be (B, C, H, W) or (B, C), got shape {d:?}"),
    };
    if x.elem_count() == 0 {
        bail!("batch norm: empty input of shape {:?}", x.dims());
    }
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if t.dims() != [c] {
            bail!("batch norm: {name} must have shape [{c}] (the channels of x {:?}), got {:?}", x.dims(), t.dims());
        }
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("batch norm: eps must be finite and non-negative, got {eps}");
    }
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

/// Sums of `dy` and `dy * (x - mean)` over one plane.
fn plane_grad_sums(x: &[f32], dy: &[f32], mean: f32) -> (f64, f64) {
    let mut s1 = [0f32; 8];
    let mut s2 = [0f32; 8];
    let (xc, dc) = (x.chunks_exact(8), dy.chunks_exact(8));
    let (xt, dt) = (xc.remainder(), dc.remainder());
    for (xs, ds) in xc.zip(dc) {
        for i in 0..8 {
            s1[i] += ds[i];
            s2[i] += ds[i] * (xs[i] - mean);
        }
    }
    let mut t1: f64 = s1.iter().map(|&v| v as f64).sum();
    let mut t2: f64 = s2.iter().map(|&v| v as f64).sum();
    for (&xv, &dv) in xt.iter().zip(dt) {
        t1 += dv as f64;
        t2 += (dv * (xv - mean)) as f64;
    }
    (t1, t2)
}

/// The contiguous f32 data of a custom-op argument.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("batch norm: {what} must be f32, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!("batch norm: {what} must be contiguous (layout {l:?})"),
    }
}

/// Entry point of the CPU path: all tensors f32 on the CPU, shapes already checked.
pub(crate) fn train_cpu(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&ChannelStats)?.to_vec2::<f32>()?;
    let [mean, var] = [&stats[0], &stats[1]];
    let invstd = var.iter().map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32).collect();
    let op = BnTrain { mean: mean.clone(), invstd };
    let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let mean = Tensor::new(mean.as_slice(), x.device())?;
    let var = Tensor::new(var.as_slice(), x.device())?;
    Ok((y, mean, var))
}

/// x (B, C, ...) -> (2, C): per-channel mean and biased variance, in one pass over x.
struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "sdp-bn-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, sp) = dims3(l.dims())?;
        let x = f32_slice(s, l, "input")?;
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
        let out = stats.iter().map(|s| s.0).chain(stats.iter().map(|s| s.1)).collect();
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// (x, gamma, beta) -> y = (x - mean) * invstd * gamma + beta, with the batch statistics fixed.
struct BnTrain {
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "sdp-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, sp) = dims3(l1.dims())?;
        let x = f32_slice(s1, l1, "input")?;
        let gamma = f32_slice(s2, l2, "gamma")?;
        let beta = f32_slice(s3, l3, "beta")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(sp).with_min_len(min_planes(sp)).zip(x.par_chunks(sp)).enumerate().for_each(
            |(idx, (yp, xp))| {
                let ch = idx % c;
                let scale = gamma[ch] * self.invstd[ch];
                let shift = beta[ch] - self.mean[ch] * scale;
                for (o, &v) in yp.iter_mut().zip(xp) {
                    *o = v * scale + shift;
                }
            },
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let reduce = BnGradSums { mean: self.mean.clone(), invstd: self.invstd.clone() };
        let sums = x.apply_op2_no_bwd(&dy, &reduce)?; // (2, C): sum(dy), sum(dy * xhat)
        let dbeta = sums.get(0)?;
        let dgamma = sums.get(1)?;
        let dx = if x.track_op() {
            let op = BnInputGrad {
                mean: self.mean.clone(),
                invstd: self.invstd.clone(),
                gamma: gamma.to_vec1::<f32>()?,
                sum_dy: dbeta.to_vec1::<f32>()?,
                sum_dy_xhat: dgamma.to_vec1::<f32>()?,
            };
            Some(x.apply_op2_no_bwd(&dy, &op)?)
        } else {
            None
        };
        Ok((dx, Some(dgamma), Some(dbeta)))
    }
}

/// The (B, C, spatial) dims and the slices of a backward op's inputs (x, dy), which must match.
fn backward_inputs<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<(usize, usize, usize, &'a [f32], &'a [f32])> {
    let (b, c, sp) = dims3(l1.dims())?;
    if l2.dims() != l1.dims() {
        bail!("batch norm backward: gradient {:?} does not match input {:?}", l2.dims(), l1.dims());
    }
    Ok((b, c, sp, f32_slice(s1, l1, "input")?, f32_slice(s2, l2, "output gradient")?))
}

/// (x, dy) -> (2, C): per-channel sum(dy) and sum(dy * xhat).
struct BnGradSums {
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

impl CustomOp2 for BnGradSums {
    fn name(&self) -> &'static str {
        "sdp-bn-grad-sums"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, sp, x, dy) = backward_inputs(s1, l1, s2, l2)?;
        let sums: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (s1, s2) = (0..b)
                    .map(|bi| {
                        let off = (bi * c + ch) * sp;
                        plane_grad_sums(&x[off..][..sp], &dy[off..][..sp], self.mean[ch])
                    })
                    .fold((0.0, 0.0), |a, m| (a.0 + m.0, a.1 + m.1));
                (s1 as f32, (s2 * self.invstd[ch] as f64) as f32)
            })
            .collect();
        let out = sums.iter().map(|s| s.0).chain(sums.iter().map(|s| s.1)).collect();
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// (x, dy) -> dx, with the per-channel sums from [`BnGradSums`].
struct BnInputGrad {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    gamma: Vec<f32>,
    sum_dy: Vec<f32>,
    sum_dy_xhat: Vec<f32>,
}

impl CustomOp2 for BnInputGrad {
    fn name(&self) -> &'static str {
        "sdp-bn-input-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, sp, x, dy) = backward_inputs(s1, l1, s2, l2)?;
        let n = (b * sp) as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(sp)
            .with_min_len(min_planes(sp))
            .zip(x.par_chunks(sp).zip(dy.par_chunks(sp)))
            .enumerate()
            .for_each(|(idx, (dxp, (xp, dyp)))| {
                let ch = idx % c;
                // dx = a*dy + c1*x + c0, the closed form rearranged to one multiply-add chain.
                let a = self.gamma[ch] * self.invstd[ch];
                let c1 = -a * self.sum_dy_xhat[ch] * self.invstd[ch] / n;
                let c0 = -a * self.sum_dy[ch] / n - c1 * self.mean[ch];
                for ((o, &xv), &dv) in dxp.iter_mut().zip(xp).zip(dyp) {
                    *o = a * dv + c1 * xv + c0;
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
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
pub(crate) fn train_generic(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    c: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
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

/// Batch norm in evaluation mode from candle ops (all devices).
pub(crate) fn eval_generic(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    c: usize,
) -> Result<Tensor> {
    let (b, _, sp) = dims3(x.dims())?;
    let dt = compute_dtype(x);
    let rm = running_mean.detach().to_dtype(dt)?;
    let rv = running_var.detach().to_dtype(dt)?;
    let scale = (rv.affine(1.0, eps)?.sqrt()?.recip()? * gamma.to_dtype(dt)?)?;
    let shift = (beta.to_dtype(dt)? - (rm * &scale)?)?;
    x.to_dtype(dt)?
        .reshape((b, c, sp))?
        .broadcast_mul(&scale.reshape((1, c, 1))?)?
        .broadcast_add(&shift.reshape((1, c, 1))?)?
        .reshape(x.shape())?
        .to_dtype(x.dtype())
}
