//! Parity tests of the decoder ops in `sdp::ops` (`rms_norm`, `rope` with `rope_tables`,
//! `causal_softmax`) against plain f64 compositions of candle ops written out here (the Hugging Face
//! Llama formulas), differentiated by candle's autograd: forward values, the gradient of every input for
//! the loss sum(out * r), the gradient of a parameter upstream of the op (so that a silent cut in the
//! graph fails), the f64 path (candle ops, as on GPUs), and the error messages of bad shapes.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sdp::ops;

/// Uniform [-1, 1) f32 values from the seeded stream.
fn rand_tensor(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// max |a - b| / max |b| in f64: relative to the scale of the reference, so that values near zero do
/// not dominate.
fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    anyhow::ensure!(
        ours.dims() == reference.dims(),
        "shape {:?} differs from the reference {:?}",
        ours.dims(),
        reference.dims()
    );
    let (a, b) = (ours.to_dtype(DType::F64)?, reference.to_dtype(DType::F64)?);
    let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-12))
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) -> Result<()> {
    let err = rel_err(ours, reference).with_context(|| what.to_string())?;
    anyhow::ensure!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
    Ok(())
}

/// Forward values agree to this relative error with the f64 reference, gradients to `GRAD_TOL`.
const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

fn expect_err<T>(r: candle_core::Result<T>, needle: &str) -> Result<()> {
    let msg = match r {
        Ok(_) => anyhow::bail!("expected an error mentioning {needle:?}"),
        Err(e) => e.to_string(),
    };
    anyhow::ensure!(msg.contains(needle), "error {msg:?} does not mention {needle:?}");
    Ok(())
}

/// An op under test: its differentiable inputs (x first) to its output.
type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// How the inputs reach the op.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Feed {
    /// Every input is a `Var`.
    Direct,
    /// x is `2 * a` with `a` a `Var` (the gradient must flow through the op to `a`).
    Upstream,
}

/// The output and the gradients of sum(out * r) w.r.t. every input (w.r.t. `a` for x when
/// `feed` is `Upstream`), all in f64; the inputs are `data` converted to `dtype`.
fn run(op: OpFn, data: &[Tensor], r: &Tensor, dtype: DType, feed: Feed) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = data
        .iter()
        .enumerate()
        .map(|(i, t)| {
            // a = x / 2 is exact, so the op sees exactly x in both feeds.
            let t = if i == 0 && feed == Feed::Upstream { (t / 2.0)? } else { t.clone() };
            Ok(Var::from_tensor(&t.to_dtype(dtype)?)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    if feed == Feed::Upstream {
        inputs[0] = (&inputs[0] * 2.0)?;
    }
    let y = op(&inputs)?;
    let grads = (&y * r.to_dtype(dtype)?)?.sum_all()?.backward()?;
    let grads = vars
        .iter()
        .enumerate()
        .map(|(i, v)| Ok(grads.get(v.as_tensor()).with_context(|| format!("no gradient for input {i}"))?.clone()))
        .collect::<Result<Vec<_>>>()?;
    let to64 = |t: &Tensor| t.to_dtype(DType::F64);
    Ok((to64(&y)?, grads.iter().map(to64).collect::<candle_core::Result<_>>()?))
}

/// `ours` against `reference` on the inputs `data` (x first, f32 values): forward and every gradient,
/// with ours on f32 inputs (the CPU kernel) and on f64 inputs (the candle-op path, compared to the
/// reference and to the kernel), and through a parameter upstream of x.
fn check_op(what: &str, ours: OpFn, reference: OpFn, data: &[Tensor], seed: u64) -> Result<()> {
    let probe = ours(data)?;
    let r = rand_tensor(&mut ChaCha8Rng::seed_from_u64(seed), probe.dims())?;
    let names = ["x", "w"];
    for feed in [Feed::Direct, Feed::Upstream] {
        let (ry, rgrads) = run(reference, data, &r, DType::F64, feed)?;
        let (y32, g32) = run(ours, data, &r, DType::F32, feed)?;
        let (y64, g64) = run(ours, data, &r, DType::F64, feed)?;
        for (path, y, grads) in [("f32", &y32, &g32), ("f64", &y64, &g64)] {
            assert_close(&format!("{what} {path} {feed:?} forward"), y, &ry, FWD_TOL)?;
            for ((name, g), rg) in names.iter().zip(grads).zip(&rgrads) {
                assert_close(&format!("{what} {path} {feed:?} d{name}"), g, rg, GRAD_TOL)?;
            }
        }
        assert_close(&format!("{what} f32 kernel vs f64 candle ops {feed:?}"), &y32, &y64, FWD_TOL)?;
        if feed == Feed::Upstream {
            let largest = g32[0].abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            anyhow::ensure!(largest > 0.0, "{what}: the gradient upstream of x is zero");
        }
    }
    Ok(())
}

/// LlamaRMSNorm in f64 candle ops: w * x / sqrt(mean(x²) + eps).
fn rms_reference(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

#[test]
fn rms_norm_matches_the_composition_with_gradients() -> Result<()> {
    for (i, dims) in [&[2, 3, 8][..], &[5, 16], &[1, 2], &[3, 129], &[70, 4]].iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(10 + i as u64);
        let d = *dims.last().context("dims")?;
        // An offset: rows whose mean is not zero (RMS norm does not centre them).
        let x = (rand_tensor(&mut rng, dims)? + 0.5)?;
        let w = rand_tensor(&mut rng, &[d])?.affine(0.5, 1.0)?;
        let eps = 1e-6;
        let ours = |v: &[Tensor]| ops::rms_norm(&v[0], &v[1], eps);
        let reference = |v: &[Tensor]| rms_reference(&v[0], &v[1], eps);
        check_op(&format!("rms_norm {dims:?}"), &ours, &reference, &[x, w], 20 + i as u64)?;
    }
    // A constant input and a trainable weight (the backward skips dx): dw as the reference's.
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let x = rand_tensor(&mut rng, &[6, 5])?;
    let w = Var::from_tensor(&rand_tensor(&mut rng, &[5])?)?;
    let r = rand_tensor(&mut rng, &[6, 5])?;
    let dw = (ops::rms_norm(&x, &w, 1e-6)? * &r)?.sum_all()?.backward()?.get(&w).context("no dw")?.clone();
    let (x64, w64) = (x.to_dtype(DType::F64)?, Var::from_tensor(&w.to_dtype(DType::F64)?)?);
    let grads = (rms_reference(&x64, &w64, 1e-6)? * r.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
    assert_close("rms_norm dw with a constant x", &dw, grads.get(&w64).context("no reference dw")?, GRAD_TOL)
}

/// HF Llama's rotary embedding in f64 candle ops: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin),
/// with rotate_half(x) = cat(-x2, x1).
fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let h = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (x.narrow(D::Minus1, 0, h)?, x.narrow(D::Minus1, h, h)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.to_dtype(x.dtype())?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.to_dtype(x.dtype())?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

#[test]
fn rope_matches_the_composition_with_gradients() -> Result<()> {
    // (B, H, T, D)
    for (i, &(b, h, t, d)) in [(2, 3, 5, 8), (1, 1, 1, 2), (2, 2, 7, 6), (1, 2, 33, 16)].iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(30 + i as u64);
        let (cos, sin) = ops::rope_tables(t, d, 10_000.0, &Device::Cpu)?;
        let ours = |v: &[Tensor]| ops::rope(&v[0], &cos, &sin);
        let reference = |v: &[Tensor]| rope_reference(&v[0], &cos, &sin);
        let x = rand_tensor(&mut rng, &[b, h, t, d])?;
        check_op(&format!("rope {:?}", [b, h, t, d]), &ours, &reference, &[x], 40 + i as u64)?;
        // A non-contiguous view, as after (B, T, H, D) -> (B, H, T, D) in attention.
        let ours_t = |v: &[Tensor]| ops::rope(&v[0].transpose(1, 2)?, &cos, &sin);
        let reference_t = |v: &[Tensor]| rope_reference(&v[0].transpose(1, 2)?, &cos, &sin);
        let x = rand_tensor(&mut rng, &[b, t, h, d])?;
        check_op(&format!("rope transposed {:?}", [b, t, h, d]), &ours_t, &reference_t, &[x], 50 + i as u64)?;
    }
    let x = rand_tensor(&mut ChaCha8Rng::seed_from_u64(1), &[2, 3, 4, 6])?;
    anyhow::ensure!(!x.transpose(1, 2)?.is_contiguous(), "the transposed test input should be non-contiguous");
    Ok(())
}

#[test]
fn rope_tables_follow_the_llama_convention() -> Result<()> {
    let (t, d, theta) = (16, 8, 10_000.0);
    let (cos, sin) = ops::rope_tables(t, d, theta, &Device::Cpu)?;
    anyhow::ensure!(cos.dims() == [t, d / 2] && sin.dims() == [t, d / 2], "tables {:?} {:?}", cos.dims(), sin.dims());
    anyhow::ensure!(cos.dtype() == DType::F32, "tables should be f32, got {:?}", cos.dtype());
    let (cos, sin) = (cos.to_vec2::<f32>()?, sin.to_vec2::<f32>()?);
    for pos in 0..t {
        for i in 0..d / 2 {
            // angle = t / theta^(2i/D) exactly; the tables round the angle to f32 first (as transformers
            // does), which moves it by at most t * 2^-24 here.
            let angle = pos as f64 / theta.powf(2.0 * i as f64 / d as f64);
            let tol = 1e-7 + pos as f64 * 1.2e-7;
            let (c, s) = (f64::from(cos[pos][i]), f64::from(sin[pos][i]));
            anyhow::ensure!((c - angle.cos()).abs() <= tol, "cos[{pos}][{i}] = {c}, expected {}", angle.cos());
            anyhow::ensure!((s - angle.sin()).abs() <= tol, "sin[{pos}][{i}] = {s}, expected {}", angle.sin());
        }
        // inv_freq[0] = 1: the first column is cos(t), sin(t) with t exact, correctly rounded.
        anyhow::ensure!(cos[pos][0] == (pos as f64).cos() as f32, "cos[{pos}][0] = {}", cos[pos][0]);
        anyhow::ensure!(sin[pos][0] == (pos as f64).sin() as f32, "sin[{pos}][0] = {}", sin[pos][0]);
    }
    Ok(())
}

/// Causal softmax in f64 candle ops: exp(x - max) times a 0/1 lower-triangular mask, normalised.
fn causal_reference(x: &Tensor) -> candle_core::Result<Tensor> {
    let t = x.dim(D::Minus1)?;
    let keep = Tensor::tril2(t, x.dtype(), x.device())?;
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?.broadcast_mul(&keep)?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

#[test]
fn causal_softmax_matches_the_composition_with_gradients() -> Result<()> {
    for (i, dims) in [&[2, 3, 5, 5][..], &[3, 2, 2], &[4, 4], &[2, 17, 17]].iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(60 + i as u64);
        // Scaled so that rows are far from uniform.
        let x = (rand_tensor(&mut rng, dims)? * 4.0)?;
        let ours = |v: &[Tensor]| ops::causal_softmax(&v[0]);
        let reference = |v: &[Tensor]| causal_reference(&v[0]);
        check_op(&format!("causal_softmax {dims:?}"), &ours, &reference, std::slice::from_ref(&x), 70 + i as u64)?;
        // Masked probabilities are exactly 0 and every row sums to 1.
        let t = *dims.last().context("dims")?;
        let y = ops::causal_softmax(&x)?.reshape(((), t, t))?.to_vec3::<f32>()?;
        for (m, rows) in y.iter().enumerate() {
            for (row, probs) in rows.iter().enumerate() {
                let masked = &probs[row + 1..];
                anyhow::ensure!(masked.iter().all(|&p| p == 0.0), "matrix {m} row {row}: masked {masked:?}");
                let sum: f32 = probs.iter().sum();
                anyhow::ensure!((sum - 1.0).abs() < 1e-5, "matrix {m} row {row} sums to {sum}");
            }
        }
    }
    Ok(())
}

#[test]
fn causal_softmax_backward_ignores_the_masked_output_gradient() -> Result<()> {
    // The CPU kernel's backward only reads dy at j ≤ i: NaN above the diagonal (where y is exactly 0)
    // must not reach dx, which is 0 there and the usual softmax gradient elsewhere.
    let t = 5;
    let mut rng = ChaCha8Rng::seed_from_u64(75);
    let x = Var::from_tensor(&(rand_tensor(&mut rng, &[2, t, t])? * 4.0)?)?;
    let r = rand_tensor(&mut rng, &[2, t, t])?;
    let keep = Tensor::tril2(t, DType::F32, &Device::Cpu)?.broadcast_as((2, t, t))?;
    let r_nan = keep.to_dtype(DType::U8)?.where_cond(&r, &Tensor::full(f32::NAN, (2, t, t), &Device::Cpu)?)?;
    let dx = |r: &Tensor| -> Result<Tensor> {
        let g = (ops::causal_softmax(&x)? * r)?.sum_all()?.backward()?;
        Ok(g.get(&x).context("no dx")?.clone())
    };
    let (dx_nan, dx_clean) = (dx(&r_nan)?, dx(&(&r * &keep)?)?);
    anyhow::ensure!(dx_nan.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()), "NaN in dx: {dx_nan}");
    assert_close("dx with NaN above the diagonal of dy", &dx_nan, &dx_clean, 0.0)?;
    let masked = (dx_nan * (1.0 - &keep)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    anyhow::ensure!(masked == 0.0, "dx above the diagonal is {masked}, not 0");
    Ok(())
}

#[test]
fn half_precision_inputs_take_the_candle_op_path() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(80);
    let bf = |t: &Tensor| t.to_dtype(DType::BF16);
    let x = rand_tensor(&mut rng, &[2, 2, 4, 6])?;
    let w = (rand_tensor(&mut rng, &[6])? + 1.0)?;
    let (cos, sin) = ops::rope_tables(4, 6, 10_000.0, &Device::Cpu)?;
    let pairs = [
        ("rms_norm", ops::rms_norm(&bf(&x)?, &bf(&w)?, 1e-6)?, ops::rms_norm(&x, &w, 1e-6)?),
        ("rope", ops::rope(&bf(&x)?, &cos, &sin)?, ops::rope(&x, &cos, &sin)?),
        (
            "causal_softmax",
            ops::causal_softmax(&bf(&(&x * 4.0)?.narrow(3, 0, 4)?)?)?,
            ops::causal_softmax(&(&x * 4.0)?.narrow(3, 0, 4)?)?,
        ),
    ];
    for (name, half, full) in &pairs {
        anyhow::ensure!(half.dtype() == DType::BF16, "{name}: bf16 in, {:?} out", half.dtype());
        // bf16 keeps 8 significant bits.
        assert_close(&format!("{name} bf16"), half, full, 2e-2)?;
    }
    Ok(())
}

#[test]
fn bad_shapes_are_errors_that_name_the_argument() -> Result<()> {
    let dev = Device::Cpu;
    let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &dev);
    // rms_norm
    let x = zeros(&[3, 4])?;
    expect_err(
        ops::rms_norm(&x, &zeros(&[3])?, 1e-6),
        "rms norm: weight must have shape [4] (the last dim of x [3, 4]), got [3]",
    )?;
    expect_err(ops::rms_norm(&x, &zeros(&[1, 4])?, 1e-6), "weight must have shape [4]")?;
    expect_err(ops::rms_norm(&x, &zeros(&[4])?, f64::NAN), "rms norm: eps must be finite and non-negative")?;
    expect_err(ops::rms_norm(&zeros(&[0, 4])?, &zeros(&[4])?, 1e-6), "rms norm: empty input")?;
    // rope
    let (cos, sin) = ops::rope_tables(3, 4, 10_000.0, &dev)?;
    expect_err(ops::rope(&zeros(&[2, 3, 4])?, &cos, &sin), "rope: x must be (B, H, T, D), got shape [2, 3, 4]")?;
    expect_err(ops::rope(&zeros(&[1, 2, 3, 5])?, &cos, &sin), "rope: the head dim D of x [1, 2, 3, 5] must be even")?;
    expect_err(ops::rope(&zeros(&[1, 2, 5, 4])?, &cos, &sin), "rope: cos must have shape [T, D/2] = [5, 2]")?;
    expect_err(
        ops::rope(&zeros(&[1, 2, 3, 4])?, &cos, &sin.narrow(1, 0, 1)?),
        "rope: sin must have shape [T, D/2] = [3, 2]",
    )?;
    expect_err(ops::rope_tables(3, 5, 10_000.0, &dev), "rope_tables: head_dim must be even and non-zero, got 5")?;
    expect_err(ops::rope_tables(0, 4, 10_000.0, &dev), "rope_tables: positions must be at least 1")?;
    expect_err(ops::rope_tables(3, 4, 0.0, &dev), "rope_tables: theta must be finite and positive, got 0")?;
    // causal_softmax
    let msg = "causal softmax: x must be non-empty (…, T, T) scores, got shape";
    expect_err(ops::causal_softmax(&zeros(&[2, 3, 4])?), &format!("{msg} [2, 3, 4]"))?;
    expect_err(ops::causal_softmax(&zeros(&[4])?), &format!("{msg} [4]"))?;
    expect_err(ops::causal_softmax(&zeros(&[0, 2, 2])?), &format!("{msg} [0, 2, 2]"))
}
