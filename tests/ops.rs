//! Parity tests of `sdp::ops` against candle's reference ops (`Tensor::conv2d` and batch norm
//! composed from candle ops, both differentiated by candle's autograd), plus finite-difference
//! checks on tiny cases and the error messages of bad inputs.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sdp::ops;

/// Uniform [-1, 1) values from the seeded stream.
fn rand_tensor(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// max |a - b| / max |b|: relative to the scale of the reference, so that values near zero do
/// not dominate.
fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    anyhow::ensure!(
        ours.dims() == reference.dims(),
        "shape {:?} differs from the reference {:?}",
        ours.dims(),
        reference.dims()
    );
    let diff = (ours - reference)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1e-12))
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) -> Result<()> {
    let err = rel_err(ours, reference).with_context(|| what.to_string())?;
    anyhow::ensure!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
    Ok(())
}

const TOL: f32 = 1e-4;

#[derive(Debug, Clone, Copy)]
struct ConvCase {
    b: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
}

const fn case(
    b: usize,
    cin: usize,
    cout: usize,
    hw: (usize, usize),
    k: (usize, usize),
    stride: usize,
    pad: usize,
) -> ConvCase {
    ConvCase { b, cin, cout, h: hw.0, w: hw.1, kh: k.0, kw: k.1, stride, pad }
}

/// Which view of the input the conv sees.
#[derive(Debug, Clone, Copy, PartialEq)]
enum InputView {
    Contiguous,
    /// Stored as (B, Cin, W, H) and transposed.
    Transposed,
    /// A channel slice of a wider tensor.
    Narrowed,
}

/// Runs `conv` on a fresh seeded problem and returns (y, dx, dw) for the loss sum(y * r).
fn conv_run(
    c: ConvCase,
    view: InputView,
    seed: u64,
    conv: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let base_dims = match view {
        InputView::Contiguous => vec![c.b, c.cin, c.h, c.w],
        InputView::Transposed => vec![c.b, c.cin, c.w, c.h],
        InputView::Narrowed => vec![c.b, c.cin + 3, c.h, c.w],
    };
    let x_base = Var::from_tensor(&rand_tensor(&mut rng, &base_dims)?)?;
    let w = Var::from_tensor(&rand_tensor(&mut rng, &[c.cout, c.cin, c.kh, c.kw])?)?;
    let x = match view {
        InputView::Contiguous => x_base.as_tensor().clone(),
        InputView::Transposed => x_base.transpose(2, 3)?,
        InputView::Narrowed => x_base.narrow(1, 2, c.cin)?,
    };
    anyhow::ensure!(view == InputView::Contiguous || !x.is_contiguous(), "test input should be non-contiguous");
    let y = conv(&x, w.as_tensor())?;
    let r = rand_tensor(&mut rng, y.dims())?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let dx = grads.get(x_base.as_tensor()).context("no gradient for x")?.clone();
    let dw = grads.get(w.as_tensor()).context("no gradient for w")?.clone();
    Ok((y, dx, dw))
}

fn check_conv_case(c: ConvCase, view: InputView, seed: u64) -> Result<()> {
    let (y, dx, dw) = conv_run(c, view, seed, |x, w| ops::conv2d(x, w, c.stride, c.pad))?;
    let (ry, rdx, rdw) = conv_run(c, view, seed, |x, w| x.conv2d(w, c.pad, c.stride, 1, 1))?;
    assert_close(&format!("{c:?} {view:?} forward"), &y, &ry, TOL)?;
    assert_close(&format!("{c:?} {view:?} input grad"), &dx, &rdx, TOL)?;
    assert_close(&format!("{c:?} {view:?} weight grad"), &dw, &rdw, TOL)?;
    Ok(())
}

#[test]
fn conv2d_matches_candle_on_varied_shapes() -> Result<()> {
    let cases = [
        case(2, 3, 4, (7, 5), (3, 3), 1, 1),
        case(2, 3, 4, (7, 5), (3, 3), 2, 1),
        case(2, 4, 5, (7, 5), (3, 3), 1, 0),
        case(2, 4, 5, (7, 5), (3, 3), 2, 0),
        case(1, 4, 6, (7, 5), (3, 3), 2, 1),
        case(3, 4, 6, (8, 8), (1, 1), 1, 0),
        case(2, 5, 3, (7, 5), (1, 1), 2, 0),
        case(2, 3, 2, (6, 6), (1, 1), 1, 1),
        case(1, 6, 4, (7, 5), (1, 1), 1, 0),
        case(2, 3, 4, (6, 9), (3, 2), 2, 1),
        case(2, 2, 3, (3, 3), (3, 3), 1, 0),
        case(2, 2, 3, (2, 2), (3, 3), 2, 1),
        // 3x3, stride 1, pad 1 on planes of at least 8x8: nine GEMMs over shifted padded planes (its
        // weight gradient by dot products up to 64 output channels, by the GEMM above).
        case(3, 5, 6, (9, 11), (3, 3), 1, 1),
        case(2, 3, 70, (8, 8), (3, 3), 1, 1),
        case(1, 70, 3, (8, 10), (3, 3), 1, 1),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        check_conv_case(c, InputView::Contiguous, 100 + i as u64)?;
    }
    Ok(())
}

#[test]
fn conv2d_handles_non_contiguous_inputs() -> Result<()> {
    check_conv_case(case(2, 3, 4, (7, 5), (3, 3), 1, 1), InputView::Transposed, 1)?;
    check_conv_case(case(2, 3, 4, (7, 5), (3, 3), 2, 0), InputView::Narrowed, 2)?;
    check_conv_case(case(2, 4, 3, (5, 5), (1, 1), 1, 0), InputView::Narrowed, 3)?;
    Ok(())
}

#[test]
fn conv2d_matches_candle_across_batch_chunks() -> Result<()> {
    // 32*3*3 * 32*32 floats per image: at most 7 images per chunk, so 15 images split into
    // several chunks (per thread group) whatever the thread count.
    check_conv_case(case(15, 32, 4, (32, 32), (3, 3), 1, 1), InputView::Contiguous, 7)?;
    check_conv_case(case(15, 32, 4, (32, 32), (3, 3), 2, 1), InputView::Contiguous, 8)?;
    Ok(())
}

#[test]
fn conv2d_skips_input_grad_for_constant_input_but_keeps_weight_grad() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let x = rand_tensor(&mut rng, &[2, 3, 5, 5])?;
    let w = Var::from_tensor(&rand_tensor(&mut rng, &[4, 3, 3, 3])?)?;
    let grads = ops::conv2d(&x, &w, 1, 1)?.sum_all()?.backward()?;
    anyhow::ensure!(grads.get(&x).is_none(), "a constant input got a gradient");
    let ours = grads.get(&w).context("no gradient for w")?;
    let reference = x.conv2d(&w, 1, 1, 1, 1)?.sum_all()?.backward()?;
    assert_close("weight grad", ours, reference.get(&w).context("no reference gradient")?, TOL)
}

/// Central differences of `loss` w.r.t. every element of `t` (computed in f64 from f32 values).
fn finite_diff(t: &Tensor, h: f32, loss: impl Fn(&Tensor) -> Result<f64>) -> Result<Tensor> {
    let base = t.flatten_all()?.to_vec1::<f32>()?;
    let mut g = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        let lp = loss(&Tensor::from_vec(plus, t.dims(), t.device())?)?;
        let lm = loss(&Tensor::from_vec(minus, t.dims(), t.device())?)?;
        g.push(((lp - lm) / (2.0 * h as f64)) as f32);
    }
    Ok(Tensor::from_vec(g, t.dims(), t.device())?)
}

/// sum(y * r) in f64.
fn weighted_sum(y: &Tensor, r: &Tensor) -> Result<f64> {
    Ok((y.to_dtype(DType::F64)? * r.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()?)
}

#[test]
fn conv2d_gradients_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let x = Var::from_tensor(&rand_tensor(&mut rng, &[2, 2, 4, 3])?)?;
    let w = Var::from_tensor(&rand_tensor(&mut rng, &[3, 2, 3, 3])?)?;
    let (stride, pad) = (2, 1);
    let r = rand_tensor(&mut rng, ops::conv2d(&x, &w, stride, pad)?.dims())?;
    let grads = (ops::conv2d(&x, &w, stride, pad)? * &r)?.sum_all()?.backward()?;
    // The loss is linear in x and in w, so central differences are exact up to rounding.
    let fd_x = finite_diff(&x, 0.25, |xp| weighted_sum(&ops::conv2d(xp, &w, stride, pad)?, &r))?;
    let fd_w = finite_diff(&w, 0.25, |wp| weighted_sum(&ops::conv2d(&x, wp, stride, pad)?, &r))?;
    assert_close("dx vs finite differences", grads.get(&x).context("no dx")?, &fd_x, 1e-4)?;
    assert_close("dw vs finite differences", grads.get(&w).context("no dw")?, &fd_w, 1e-4)
}

fn err_msg<T>(r: candle_core::Result<T>) -> Result<String> {
    match r {
        Ok(_) => anyhow::bail!("expected an error"),
        Err(e) => Ok(e.to_string()),
    }
}

fn expect_err<T>(r: candle_core::Result<T>, needle: &str) -> Result<()> {
    let msg = err_msg(r)?;
    anyhow::ensure!(msg.contains(needle), "error {msg:?} does not mention {needle:?}");
    Ok(())
}

#[test]
fn conv2d_rejects_bad_shapes_with_clear_messages() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 5, 5), DType::F32, &dev)?;
    let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev)?;
    expect_err(ops::conv2d(&x.flatten_from(2)?, &w, 1, 0), "input must be (B, Cin, H, W), got shape [2, 3, 25]")?;
    expect_err(ops::conv2d(&x, &w.flatten_from(2)?, 1, 0), "weight must be (Cout, Cin, kh, kw)")?;
    let w2 = Tensor::zeros((4, 2, 3, 3), DType::F32, &dev)?;
    expect_err(ops::conv2d(&x, &w2, 1, 0), "input has 3 channels")?;
    expect_err(ops::conv2d(&x, &w, 0, 0), "stride must be at least 1")?;
    let big = Tensor::zeros((4, 3, 7, 7), DType::F32, &dev)?;
    expect_err(ops::conv2d(&x, &big, 1, 0), "kernel 7x7 does not fit the input 5x5 with padding 0")?;
    let empty = Tensor::zeros((0, 3, 5, 5), DType::F32, &dev)?;
    expect_err(ops::conv2d(&empty, &w, 1, 0), "empty tensors are not supported")
}

/// Batch norm in training mode composed from candle ops, per channel over a (C, N) view.
fn bn_reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(1)?;
    let bshape: Vec<usize> = x.dims().iter().enumerate().map(|(i, &d)| if i == 1 { d } else { 1 }).collect();
    let xc = x.transpose(0, 1)?.flatten_from(1)?; // (C, N)
    let mean = xc.mean_keepdim(D::Minus1)?; // (C, 1)
    let var = xc.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = x
        .broadcast_sub(&mean.reshape(bshape.as_slice())?)?
        .broadcast_div(&(var.reshape(bshape.as_slice())? + eps)?.sqrt()?)?;
    let y = xhat.broadcast_mul(&gamma.reshape(bshape.as_slice())?)?.broadcast_add(&beta.reshape(bshape.as_slice())?)?;
    Ok((y, mean.reshape(c)?, var.reshape(c)?))
}

type BnFn = fn(&Tensor, &Tensor, &Tensor, f64) -> Result<(Tensor, Tensor, Tensor)>;

fn ours_bn(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    Ok(ops::batch_norm_train(x, gamma, beta, eps)?)
}

/// Runs batch norm on a seeded problem: returns (y, mean, var, dx, dgamma, dbeta) for the loss
/// sum(y * r). `offset` is added to x to test statistics with |mean| >> std.
fn bn_run(dims: &[usize], offset: f64, transposed: bool, seed: u64, bn: BnFn) -> Result<[Tensor; 6]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c = dims[1];
    let mut base_dims = dims.to_vec();
    if transposed {
        base_dims.swap(2, 3);
    }
    let x_base = Var::from_tensor(&(rand_tensor(&mut rng, &base_dims)? + offset)?)?;
    let gamma = Var::from_tensor(&rand_tensor(&mut rng, &[c])?)?;
    let beta = Var::from_tensor(&rand_tensor(&mut rng, &[c])?)?;
    let x = if transposed { x_base.transpose(2, 3)? } else { x_base.as_tensor().clone() };
    let (y, mean, var) = bn(&x, &gamma, &beta, 1e-5)?;
    let r = rand_tensor(&mut rng, y.dims())?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let g = |t: &Tensor, name: &str| grads.get(t).cloned().with_context(|| format!("no gradient for {name}"));
    Ok([y, mean, var, g(&x_base, "x")?, g(&gamma, "gamma")?, g(&beta, "beta")?])
}

fn check_bn_case(dims: &[usize], offset: f64, transposed: bool, seed: u64, tol: f32) -> Result<()> {
    let ours = bn_run(dims, offset, transposed, seed, ours_bn)?;
    let reference = bn_run(dims, offset, transposed, seed, bn_reference)?;
    let names = ["y", "mean", "var", "dx", "dgamma", "dbeta"];
    for ((name, a), b) in names.iter().zip(&ours).zip(&reference) {
        assert_close(&format!("{dims:?} offset {offset} {name}"), a, b, tol)?;
    }
    Ok(())
}

#[test]
fn batch_norm_train_matches_candle_ops() -> Result<()> {
    check_bn_case(&[4, 3, 7, 5], 0.0, false, 1, TOL)?;
    check_bn_case(&[1, 5, 3, 3], 0.0, false, 2, TOL)?;
    check_bn_case(&[6, 4, 5, 7], 0.0, true, 3, TOL)?;
    check_bn_case(&[8, 16, 1, 1], 0.0, false, 4, TOL)?;
    check_bn_case(&[7, 10], 0.0, false, 5, TOL)?;
    Ok(())
}

#[test]
fn batch_norm_train_statistics_stay_accurate_with_a_large_mean() -> Result<()> {
    // With |mean| = 100 * std an unshifted one-pass f32 variance would lose most digits; the
    // f32 reference itself is then only good to ~1e-3 on the normalised output.
    check_bn_case(&[4, 3, 7, 5], 100.0, false, 6, 2e-3)
}

#[test]
fn batch_norm_train_gradients_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let x = Var::from_tensor(&rand_tensor(&mut rng, &[3, 2, 2, 2])?)?;
    let gamma = Var::from_tensor(&rand_tensor(&mut rng, &[2])?)?;
    let beta = Var::from_tensor(&rand_tensor(&mut rng, &[2])?)?;
    let eps = 1e-3;
    let r = rand_tensor(&mut rng, x.dims())?;
    let (y, _, _) = ops::batch_norm_train(&x, &gamma, &beta, eps)?;
    let grads = (y * &r)?.sum_all()?.backward()?;
    let h = 1e-2;
    let fd_x = finite_diff(&x, h, |xp| weighted_sum(&ops::batch_norm_train(xp, &gamma, &beta, eps)?.0, &r))?;
    let fd_g = finite_diff(&gamma, h, |gp| weighted_sum(&ops::batch_norm_train(&x, gp, &beta, eps)?.0, &r))?;
    let fd_b = finite_diff(&beta, h, |bp| weighted_sum(&ops::batch_norm_train(&x, &gamma, bp, eps)?.0, &r))?;
    // Curvature (O(h^2)) and f32 rounding of y bound the finite differences to ~1e-3.
    assert_close("dx vs finite differences", grads.get(&x).context("no dx")?, &fd_x, 2e-3)?;
    assert_close("dgamma vs finite differences", grads.get(&gamma).context("no dgamma")?, &fd_g, 2e-3)?;
    assert_close("dbeta vs finite differences", grads.get(&beta).context("no dbeta")?, &fd_b, 2e-3)
}

/// The fused op against batch norm from candle ops followed by candle's scale, add and ReLU:
/// output and the gradients of x, gamma, beta and the residual, for every epilogue shape.
#[test]
fn batch_norm_fused_epilogues_match_composed_candle_ops() -> Result<()> {
    let cases: [(&[usize], f64, bool, bool); 6] = [
        (&[4, 3, 7, 5], 1.0, false, true),
        (&[4, 3, 7, 5], 0.5, true, true),
        (&[2, 6, 4, 4], 2.0, true, false),
        (&[3, 4, 5, 3], 1.0, true, true),
        (&[1, 5, 3, 3], -0.7, false, false),
        (&[7, 10], 1.3, true, true),
    ];
    for (i, &(dims, scale, residual, relu)) in cases.iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(60 + i as u64);
        let c = dims[1];
        let x = Var::from_tensor(&rand_tensor(&mut rng, dims)?)?;
        let gamma = Var::from_tensor(&rand_tensor(&mut rng, &[c])?)?;
        let beta = Var::from_tensor(&rand_tensor(&mut rng, &[c])?)?;
        let res = Var::from_tensor(&rand_tensor(&mut rng, dims)?)?;
        let r = rand_tensor(&mut rng, dims)?;
        let epi = ops::Epilogue { scale, residual: residual.then_some(res.as_tensor()), relu };
        let run = |y: Tensor| -> Result<[Tensor; 5]> {
            let grads = (&y * &r)?.sum_all()?.backward()?;
            let g = |t: &Tensor| grads.get(t).cloned().unwrap_or(t.zeros_like().expect("zeros"));
            Ok([y.clone(), g(&x), g(&gamma), g(&beta), g(&res)])
        };
        let ours = run(ops::batch_norm_train_fused(&x, &gamma, &beta, 1e-5, &epi)?.0)?;
        let reference = run(epi.apply(bn_reference(&x, &gamma, &beta, 1e-5)?.0)?)?;
        for ((name, a), b) in ["y", "dx", "dgamma", "dbeta", "dresidual"].iter().zip(&ours).zip(&reference) {
            assert_close(&format!("{dims:?} scale {scale} residual {residual} relu {relu}: {name}"), a, b, TOL)?;
        }
        if !residual {
            anyhow::ensure!(ours[4].abs()?.sum_all()?.to_scalar::<f32>()? == 0.0, "gradient to an unused residual");
        }
    }
    Ok(())
}

#[test]
fn batch_norm_fused_fallback_and_eval_match_the_fast_path() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(71);
    let x = rand_tensor(&mut rng, &[4, 3, 5, 5])?;
    let gamma = rand_tensor(&mut rng, &[3])?;
    let beta = rand_tensor(&mut rng, &[3])?;
    let res = rand_tensor(&mut rng, &[4, 3, 5, 5])?;
    let epi = ops::Epilogue { scale: 0.8, residual: Some(&res), relu: true };
    let (y, mean, var) = ops::batch_norm_train_fused(&x, &gamma, &beta, 1e-5, &epi)?;
    // f64 takes the candle-op path (the one used on GPUs).
    let to64 = |t: &Tensor| t.to_dtype(DType::F64);
    let res64 = to64(&res)?;
    let epi64 = ops::Epilogue { residual: Some(&res64), ..epi };
    let (y64, _, _) = ops::batch_norm_train_fused(&to64(&x)?, &to64(&gamma)?, &to64(&beta)?, 1e-5, &epi64)?;
    assert_close("fallback y", &y, &y64.to_dtype(DType::F32)?, TOL)?;
    // Evaluation with the batch's own statistics as running statistics gives the training output.
    let y_eval = ops::batch_norm_eval(&x, &gamma, &beta, &mean, &var, 1e-5, &epi)?;
    assert_close("eval y", &y_eval, &y, TOL)
}

#[test]
fn batch_norm_fused_rejects_a_mismatched_residual() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev)?;
    let g = Tensor::ones(3, DType::F32, &dev)?;
    let r = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev)?;
    let epi = ops::Epilogue { residual: Some(&r), ..Default::default() };
    expect_err(ops::batch_norm_train_fused(&x, &g, &g, 1e-5, &epi), "residual [2, 3, 4, 5] does not match input")?;
    let epi = ops::Epilogue { scale: f64::NAN, ..Default::default() };
    expect_err(ops::batch_norm_train_fused(&x, &g, &g, 1e-5, &epi), "scale must be finite")
}

#[test]
fn batch_norm_train_fallback_matches_fast_path() -> Result<()> {
    // f64 input takes the candle-op path (the one used on GPUs); it must agree with the f32 kernel.
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let x = rand_tensor(&mut rng, &[4, 3, 5, 5])?;
    let gamma = rand_tensor(&mut rng, &[3])?;
    let beta = rand_tensor(&mut rng, &[3])?;
    let (y, mean, var) = ops::batch_norm_train(&x, &gamma, &beta, 1e-5)?;
    let to64 = |t: &Tensor| t.to_dtype(DType::F64);
    let (y64, mean64, var64) = ops::batch_norm_train(&to64(&x)?, &to64(&gamma)?, &to64(&beta)?, 1e-5)?;
    let to32 = |t: &Tensor| t.to_dtype(DType::F32);
    assert_close("y", &y, &to32(&y64)?, TOL)?;
    assert_close("mean", &mean, &to32(&mean64)?, TOL)?;
    assert_close("var", &var, &to32(&var64)?, TOL)
}

#[test]
fn batch_norm_eval_uses_running_statistics_and_is_differentiable() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(51);
    let x = Var::from_tensor(&rand_tensor(&mut rng, &[3, 4, 3, 5])?)?;
    let gamma = Var::from_tensor(&rand_tensor(&mut rng, &[4])?)?;
    let beta = Var::from_tensor(&rand_tensor(&mut rng, &[4])?)?;
    let rm = rand_tensor(&mut rng, &[4])?;
    let rv = (rand_tensor(&mut rng, &[4])?.abs()? + 0.5)?;
    let eps = 1e-5;
    let y = ops::batch_norm_eval(&x, &gamma, &beta, &rm, &rv, eps, &ops::Epilogue::default())?;
    let b = |t: &Tensor| t.reshape((1, 4, 1, 1));
    let scale = (gamma.as_tensor() / (&rv + eps)?.sqrt()?)?;
    let expected = x.broadcast_sub(&b(&rm)?)?.broadcast_mul(&b(&scale)?)?.broadcast_add(&b(&beta)?)?;
    assert_close("y", &y, &expected, TOL)?;
    let r = rand_tensor(&mut rng, y.dims())?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let ref_grads = (&expected * &r)?.sum_all()?.backward()?;
    for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
        let ours = grads.get(v).with_context(|| format!("no gradient for {name}"))?;
        let reference = ref_grads.get(v).with_context(|| format!("no reference gradient for {name}"))?;
        assert_close(name, ours, reference, TOL)?;
    }
    Ok(())
}

#[test]
fn batch_norm_rejects_bad_shapes_with_clear_messages() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev)?;
    let g = Tensor::ones(3, DType::F32, &dev)?;
    let g4 = Tensor::ones(4, DType::F32, &dev)?;
    expect_err(
        ops::batch_norm_train(&x.flatten_from(2)?, &g, &g, 1e-5),
        "input must be (B, C, H, W) or (B, C), got shape [2, 3, 16]",
    )?;
    expect_err(ops::batch_norm_train(&x, &g4, &g, 1e-5), "gamma must have shape [3]")?;
    expect_err(ops::batch_norm_train(&x, &g, &g4, 1e-5), "beta must have shape [3]")?;
    expect_err(ops::batch_norm_train(&x, &g, &g, -1.0), "eps must be finite and non-negative")?;
    expect_err(
        ops::batch_norm_eval(&x, &g, &g, &g4, &g, 1e-5, &ops::Epilogue::default()),
        "running_mean must have shape [3]",
    )?;
    expect_err(
        ops::batch_norm_eval(&x, &g, &g, &g, &g4, 1e-5, &ops::Epilogue::default()),
        "running_var must have shape [3]",
    )
}

/// Layer norm from candle ops (the composition swin_t used before the custom op).
fn ln_reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?.broadcast_add(b)?)
}

#[test]
fn layer_norm_matches_candle_ops_and_finite_differences() -> Result<()> {
    for (i, dims) in [&[4, 7, 96][..], &[2, 3, 5, 8], &[1, 1], &[300, 3], &[3, 129]].iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(80 + i as u64);
        let d = *dims.last().context("dims")?;
        // An offset on x: the row statistics must stay accurate when |mean| > std.
        let x = Var::from_tensor(&(rand_tensor(&mut rng, dims)? + 3.0)?)?;
        let w = Var::from_tensor(&rand_tensor(&mut rng, &[d])?)?;
        let b = Var::from_tensor(&rand_tensor(&mut rng, &[d])?)?;
        let r = rand_tensor(&mut rng, dims)?;
        let run = |y: Tensor| -> Result<[Tensor; 4]> {
            let grads = (&y * &r)?.sum_all()?.backward()?;
            let g = |t: &Tensor| grads.get(t).cloned().context("no gradient");
            Ok([y.clone(), g(&x)?, g(&w)?, g(&b)?])
        };
        let ours = run(ops::layer_norm(&x, &w, &b, 1e-5)?)?;
        let reference = run(ln_reference(&x, &w, &b, 1e-5)?)?;
        for ((name, a), b) in ["y", "dx", "dw", "db"].iter().zip(&ours).zip(&reference) {
            assert_close(&format!("{dims:?} {name}"), a, b, 2e-4)?;
        }
    }
    // Finite differences on a tiny case (the loss is smooth; eps large enough for f32).
    let mut rng = ChaCha8Rng::seed_from_u64(90);
    let x = Var::from_tensor(&rand_tensor(&mut rng, &[3, 4])?)?;
    let w = Var::from_tensor(&rand_tensor(&mut rng, &[4])?)?;
    let b = Var::from_tensor(&rand_tensor(&mut rng, &[4])?)?;
    let r = rand_tensor(&mut rng, &[3, 4])?;
    let eps = 1e-3;
    let grads = (ops::layer_norm(&x, &w, &b, eps)? * &r)?.sum_all()?.backward()?;
    let fd_x = finite_diff(&x, 1e-2, |xp| weighted_sum(&ops::layer_norm(xp, &w, &b, eps)?, &r))?;
    let fd_w = finite_diff(&w, 1e-2, |wp| weighted_sum(&ops::layer_norm(&x, wp, &b, eps)?, &r))?;
    assert_close("dx vs finite differences", grads.get(&x).context("no dx")?, &fd_x, 2e-3)?;
    assert_close("dw vs finite differences", grads.get(&w).context("no dw")?, &fd_w, 2e-3)?;
    // The f64 path (candle ops, as on GPUs) agrees with the f32 kernel.
    let to64 = |t: &Tensor| t.to_dtype(DType::F64);
    let y64 = ops::layer_norm(&to64(&x)?, &to64(&w)?, &to64(&b)?, eps)?;
    assert_close("fallback", &ops::layer_norm(&x, &w, &b, eps)?, &y64.to_dtype(DType::F32)?, TOL)?;
    // Bad shapes are errors that say what is wrong.
    expect_err(ops::layer_norm(&x, &b.narrow(0, 0, 3)?, &b, eps), "weight must have shape [4]")?;
    expect_err(ops::layer_norm(&x, &w, &b, f64::NAN), "eps must be finite")
}

#[test]
fn softmax_and_gelu_match_candle_ops() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(95);
    for dims in [&[2, 3, 16, 16][..], &[5, 7], &[4, 1], &[1, 300]] {
        // Scaled so that softmax rows are far from uniform and GELU sees its curved region and tails.
        let x = Var::from_tensor(&(rand_tensor(&mut rng, dims)? * 4.0)?)?;
        let r = rand_tensor(&mut rng, dims)?;
        let grad = |y: Tensor| -> Result<[Tensor; 2]> {
            let g = (&y * &r)?.sum_all()?.backward()?;
            Ok([y, g.get(&x).cloned().context("no dx")?])
        };
        let pairs = [
            ("softmax", grad(ops::softmax_last_dim(&x)?)?, grad(candle_nn::ops::softmax(&x, D::Minus1)?)?),
            ("gelu", grad(ops::gelu_erf(&x)?)?, grad(x.gelu_erf()?)?),
        ];
        for (name, ours, reference) in &pairs {
            assert_close(&format!("{name} {dims:?} y"), &ours[0], &reference[0], TOL)?;
            assert_close(&format!("{name} {dims:?} dx"), &ours[1], &reference[1], TOL)?;
        }
    }
    expect_err(ops::softmax_last_dim(&Tensor::zeros((2, 0), DType::F32, &Device::Cpu)?), "at least one dim")
}

#[test]
fn bmm_matches_candle_matmul_with_gradients() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let cases: [(&[usize], &[usize]); 5] = [
        (&[2, 3, 16, 32], &[2, 3, 32, 16]),
        (&[5, 4, 7], &[5, 7, 3]),
        (&[1, 1, 1], &[1, 1, 1]),
        (&[300, 2, 3], &[300, 3, 5]),
        (&[4, 6], &[6, 2]),
    ];
    for (da, db) in cases {
        let a = Var::from_tensor(&rand_tensor(&mut rng, da)?)?;
        let b = Var::from_tensor(&rand_tensor(&mut rng, db)?)?;
        let run = |c: Tensor| -> Result<[Tensor; 3]> {
            let r = rand_tensor(&mut ChaCha8Rng::seed_from_u64(7), c.dims())?;
            let g = (&c * &r)?.sum_all()?.backward()?;
            Ok([c, g.get(&a).cloned().context("no da")?, g.get(&b).cloned().context("no db")?])
        };
        let ours = run(ops::bmm(&a, &b)?)?;
        let reference = run(a.matmul(&b)?)?;
        for ((name, x), y) in ["c", "da", "db"].iter().zip(&ours).zip(&reference) {
            assert_close(&format!("{da:?}·{db:?} {name}"), x, y, TOL)?;
        }
    }
    // A transposed (non-contiguous) operand, as attention's k.t() is.
    let a = rand_tensor(&mut rng, &[3, 4, 5])?;
    let k = rand_tensor(&mut rng, &[3, 6, 5])?;
    assert_close("a·kᵀ", &ops::bmm(&a, &k.t()?)?, &a.matmul(&k.t()?.contiguous()?)?, TOL)?;
    expect_err(ops::bmm(&a, &a), "inner dims differ")?;
    expect_err(ops::bmm(&a, &rand_tensor(&mut rng, &[2, 5, 4])?), "same leading dims")
}
