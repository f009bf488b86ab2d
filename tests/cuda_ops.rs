//! GPU parity of the fused batch norm that `sdp::ops::batch_norm_train_fused` runs on CUDA (see the batch
//! norm section below), and of the cuDNN conv2d that `sdp::ops::conv2d` runs on CUDA with the `cudnn` feature: its
//! output and both gradients against candle's own convolution (`Tensor::conv2d` and its autograd) on
//! the CPU in f32 for f32, bf16 and f16, and on cuda:0 for f32. Shapes cover stride 1 and 2, padding
//! 0 and 1, 1x1 and 3x3 kernels, odd sizes, batch 1, an input with a storage offset, a non-contiguous
//! input, an untracked input (weight gradient only), and seeded random shapes.
//!
//! Passes with a "skipping" message when no CUDA device can be opened (no driver, no GPU). Build
//! with `cargo test --release --features cudnn --test cuda_ops`.
#![cfg(feature = "cudnn")]

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn cuda() -> Option<Device> {
    match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(d)) => Some(d),
        Ok(Err(e)) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
        Err(_) => {
            eprintln!("skipping: the CUDA driver could not be loaded");
            None
        }
    }
}

/// One convolution: (B, Cin, H, W), Cout, k (square), stride, padding.
#[derive(Debug, Clone, Copy)]
struct Case {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

#[allow(clippy::too_many_arguments)]
const fn case(b: usize, cin: usize, h: usize, w: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Case {
    Case { b, cin, h, w, cout, k, stride, pad }
}

const FIXED: &[Case] = &[
    case(1, 3, 7, 9, 5, 3, 2, 1),      // batch 1, odd sizes, 3x3 stride 2 padding 1
    case(1, 5, 6, 5, 7, 3, 2, 0),      // 3x3 stride 2 padding 0
    case(2, 8, 9, 9, 16, 1, 2, 0),     // 1x1 stride-2 shortcut, odd size
    case(1, 4, 5, 5, 3, 1, 1, 0),      // pointwise
    case(3, 16, 11, 13, 8, 3, 1, 1),   // 3x3 stride 1 padding 1
    case(1, 7, 3, 3, 2, 3, 1, 0),      // kernel covering the whole input
    case(4, 64, 16, 16, 64, 3, 1, 1),  // ResNet-18 stage-1 conv at a small batch
    case(4, 64, 16, 16, 128, 3, 2, 1), // stage-2 downsampling conv
    case(4, 64, 16, 16, 128, 1, 2, 0), // and its shortcut
    case(8, 3, 32, 32, 64, 3, 1, 1),   // CIFAR stem
];

fn random_cases(n: usize) -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    (0..n)
        .map(|_| {
            let k = if rng.random_bool(0.5) { 3 } else { 1 };
            let pad = if k == 3 { rng.random_range(0..=1) } else { 0 };
            let (h, w) = (rng.random_range(k..=19), rng.random_range(k..=19));
            case(
                rng.random_range(1..=5),
                rng.random_range(1..=24),
                h,
                w,
                rng.random_range(1..=24),
                k,
                rng.random_range(1..=2),
                pad,
            )
        })
        .collect()
}

fn seeded(shape: &[usize], scale: f32, seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// y, dx (None when x is not tracked), dw of `f(x, w)` with upstream gradient `g` (all f32 on the way out).
fn run(
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    track_x: bool,
) -> Result<(Tensor, Option<Tensor>, Tensor)> {
    let wv = Var::from_tensor(w)?;
    let xv = Var::from_tensor(x)?;
    let xin = if track_x { xv.as_tensor().clone() } else { x.clone() };
    let y = f(&xin, wv.as_tensor())?;
    let loss = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?.sum_all()?;
    let grads = loss.backward()?;
    let dx = if track_x { Some(grads.get(xv.as_tensor()).expect("dx").to_dtype(DType::F32)?) } else { None };
    if !track_x {
        assert!(grads.get(xv.as_tensor()).is_none());
    }
    let dw = grads.get(wv.as_tensor()).expect("dw").to_dtype(DType::F32)?;
    Ok((y.to_dtype(DType::F32)?, dx, dw))
}

/// max |a - r| / max |r|.
fn rel_err(a: &Tensor, r: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), r.dims());
    let a = a.to_device(&Device::Cpu)?;
    let r = r.to_device(&Device::Cpu)?;
    let diff = (&a - &r)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = r.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12);
    Ok(diff / scale)
}

/// Tolerance of the normalised max error: f32 may run on TF32 tensor cores (10-bit mantissa);
/// bf16 and f16 results are rounded to 8 and 11 bits.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 5e-3,
        DType::F16 => 1e-2,
        _ => 3e-2,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Input {
    Plain,
    /// x is a narrow of a larger batch: contiguous, with a storage offset.
    Offset,
    /// x is a transposed view: not contiguous.
    Transposed,
    /// x is not a variable: only the weight gradient is computed.
    Untracked,
}

fn check(dev: &Device, c: Case, dtype: DType, input: Input, seed: u64) -> Result<()> {
    let xs = [c.b, c.cin, c.h, c.w];
    let ws = [c.cout, c.cin, c.k, c.k];
    let (ho, wo) = ((c.h + 2 * c.pad - c.k) / c.stride + 1, (c.w + 2 * c.pad - c.k) / c.stride + 1);
    let ys = [c.b, c.cout, ho, wo];
    // Inputs rounded to `dtype` once, so the f32 reference sees exactly what the GPU sees.
    let round = |t: Tensor| -> Result<Tensor> { t.to_dtype(dtype)?.to_dtype(DType::F32) };
    let x = round(seeded(&xs, 1.0, seed)?)?;
    let w = round(seeded(&ws, 1.0 / ((c.cin * c.k * c.k) as f32).sqrt(), seed + 1)?)?;
    let g = round(seeded(&ys, 1.0, seed + 2)?)?;

    let x_dev = match input {
        Input::Plain | Input::Untracked => x.to_device(dev)?.to_dtype(dtype)?,
        Input::Offset => {
            let pad = Tensor::zeros(&xs[..], DType::F32, &Device::Cpu)?;
            Tensor::cat(&[&pad, &x, &pad], 0)?.to_device(dev)?.to_dtype(dtype)?.narrow(0, c.b, c.b)?
        }
        Input::Transposed => x.transpose(2, 3)?.contiguous()?.to_device(dev)?.to_dtype(dtype)?.transpose(2, 3)?,
    };
    assert_eq!(x_dev.dims(), xs);
    let (w_dev, g_dev) = (w.to_device(dev)?.to_dtype(dtype)?, g.to_device(dev)?.to_dtype(dtype)?);
    let (stride, pad) = (c.stride, c.pad);
    let track_x = input != Input::Untracked;

    let ours = run(|x, w| sdp::ops::conv2d(x, w, stride, pad), &x_dev, &w_dev, &g_dev, track_x)?;
    let candle_conv = |x: &Tensor, w: &Tensor| x.conv2d(w, pad, stride, 1, 1);
    let mut refs = vec![("candle cpu f32", run(candle_conv, &x, &w, &g, track_x)?)];
    if dtype == DType::F32 {
        refs.push(("candle cuda f32", run(candle_conv, &x_dev, &w_dev, &g_dev, track_x)?));
    }
    assert_eq!(ours.0.dims(), ys);
    let tol = tolerance(dtype);
    for (name, (y, dx, dw)) in &refs {
        let mut errs = vec![("y", rel_err(&ours.0, y)?), ("dw", rel_err(&ours.2, dw)?)];
        if let (Some(a), Some(r)) = (&ours.1, dx) {
            errs.push(("dx", rel_err(a, r)?));
        }
        for (what, e) in errs {
            assert!(e <= tol, "{c:?} {dtype:?} {input:?}: {what} differs from {name} by {e:.2e} (tolerance {tol:.0e})");
        }
    }
    Ok(())
}

#[test]
fn cudnn_conv2d_matches_candle() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let cases: Vec<Case> = FIXED.iter().copied().chain(random_cases(12)).collect();
    for (i, &c) in cases.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            check(&dev, c, dtype, Input::Plain, 100 * i as u64)?;
        }
    }
    Ok(())
}

#[test]
fn cudnn_conv2d_handles_offsets_views_and_untracked_inputs() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    for (i, &c) in FIXED.iter().enumerate() {
        for input in [Input::Offset, Input::Transposed, Input::Untracked] {
            for dtype in [DType::F32, DType::BF16] {
                check(&dev, c, dtype, input, 1000 + 100 * i as u64)?;
            }
        }
    }
    Ok(())
}

#[test]
fn cudnn_conv2d_repeated_calls_reuse_plans() -> Result<()> {
    // The second call of a shape hits the cached plan and the grown workspace; it must give the same
    // result as the first (the chosen forward algorithms are deterministic), also after a larger
    // layer has grown the workspace in between.
    let Some(dev) = cuda() else { return Ok(()) };
    let small = Tensor::randn(0f32, 1., (2, 16, 9, 9), &dev)?;
    let ws = Tensor::randn(0f32, 0.1, (32, 16, 3, 3), &dev)?;
    let big = Tensor::randn(0f32, 1., (32, 64, 32, 32), &dev)?;
    let wb = Tensor::randn(0f32, 0.1, (64, 64, 3, 3), &dev)?;
    let first = sdp::ops::conv2d(&small, &ws, 2, 1)?;
    let _ = sdp::ops::conv2d(&big, &wb, 1, 1)?;
    let second = sdp::ops::conv2d(&small, &ws, 2, 1)?;
    assert_eq!(rel_err(&first, &second)?, 0.0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Fused batch norm (`sdp::ops::batch_norm_train_fused` on CUDA: src/ops/bn_cuda.rs and
// src/ops/kernels/batchnorm.cu) against the CPU f32 implementation on the same data (inputs rounded to
// the GPU dtype first): y, mean, var and the gradients to x, gamma, beta and the residual, for every
// epilogue (scale 1 / 0.5 / -0.7, residual on/off, ReLU on/off), (B, C, H, W) and (B, C) shapes with
// odd sizes, batch 1, channels split over several reduction blocks, and a large mean.

const BN_EPS: f64 = 1e-5;

/// The data of one batch-norm problem, as f32 CPU tensors already rounded to the GPU dtypes.
struct BnData {
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    r: Tensor,
    g: Tensor,
}

impl BnData {
    fn new(dims: &[usize], offset: f32, dtype: DType, param_dtype: DType, seed: u64) -> Result<Self> {
        let c = dims[1];
        let round = |t: Tensor, dt: DType| -> Result<Tensor> { t.to_dtype(dt)?.to_dtype(DType::F32) };
        Ok(Self {
            x: round((seeded(dims, 1.0, seed)? + offset as f64)?, dtype)?,
            gamma: round(seeded(&[c], 1.0, seed + 1)?, param_dtype)?,
            beta: round(seeded(&[c], 1.0, seed + 2)?, param_dtype)?,
            r: round(seeded(dims, 1.0, seed + 3)?, dtype)?,
            g: round(seeded(dims, 1.0, seed + 4)?, dtype)?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct BnEpi {
    scale: f64,
    residual: bool,
    relu: bool,
}

/// Outputs and gradients of one fused batch-norm call (f32, on the CPU); dx is None when x is not
/// tracked, dres when there is no residual.
struct BnOut {
    y: Tensor,
    mean: Tensor,
    var: Tensor,
    dx: Option<Tensor>,
    dgamma: Tensor,
    dbeta: Tensor,
    dres: Option<Tensor>,
}

/// Runs the fused op on `dev` with activations in `dtype` and gamma/beta in `param_dtype`, for the
/// loss sum(y * g), and checks the dtypes and shapes of what comes back.
fn bn_run(dev: &Device, dtype: DType, param_dtype: DType, d: &BnData, epi: BnEpi, track_x: bool) -> Result<BnOut> {
    let put = |t: &Tensor, dt: DType| -> Result<Tensor> { t.to_device(dev)?.to_dtype(dt) };
    let xv = Var::from_tensor(&put(&d.x, dtype)?)?;
    let gv = Var::from_tensor(&put(&d.gamma, param_dtype)?)?;
    let bv = Var::from_tensor(&put(&d.beta, param_dtype)?)?;
    let rv = Var::from_tensor(&put(&d.r, dtype)?)?;
    let x = if track_x { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
    let e = sdp::ops::Epilogue { scale: epi.scale, residual: epi.residual.then_some(rv.as_tensor()), relu: epi.relu };
    let (y, mean, var) = sdp::ops::batch_norm_train_fused(&x, gv.as_tensor(), bv.as_tensor(), BN_EPS, &e)?;
    let c = d.x.dim(1)?;
    assert_eq!(y.dims(), d.x.dims());
    assert_eq!(y.dtype(), dtype);
    for (name, t) in [("mean", &mean), ("var", &var)] {
        assert_eq!((t.dims(), t.dtype()), (&[c][..], DType::F32), "{name}");
        assert!(!t.track_op(), "{name} must be detached");
    }
    let loss = (y.to_dtype(DType::F32)? * put(&d.g, DType::F32)?)?.sum_all()?;
    let grads = loss.backward()?;
    let grad = |v: &Var, dt: DType, name: &str| -> Result<Option<Tensor>> {
        match grads.get(v.as_tensor()) {
            Some(t) => {
                assert_eq!((t.dims(), t.dtype()), (v.dims(), dt), "gradient of {name}");
                Ok(Some(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?))
            }
            None => Ok(None),
        }
    };
    let cpu = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.to_device(&Device::Cpu) };
    let dx = grad(&xv, dtype, "x")?;
    assert_eq!(dx.is_some(), track_x, "gradient of x when tracked, none otherwise");
    let dres = grad(&rv, dtype, "residual")?;
    assert_eq!(dres.is_some(), epi.residual, "gradient of the residual exactly when there is one");
    Ok(BnOut {
        y: cpu(&y)?,
        mean: cpu(&mean)?,
        var: cpu(&var)?,
        dx,
        dgamma: grad(&gv, param_dtype, "gamma")?.expect("dgamma"),
        dbeta: grad(&bv, param_dtype, "beta")?.expect("dbeta"),
        dres,
    })
}

/// Tolerances (normalised max error) of (activations y/dx/dresidual, statistics and gamma/beta
/// gradients): the latter are f32 sums over the same rounded data on both sides, the former are
/// rounded to the activation dtype on the GPU.
fn bn_tolerance(dtype: DType, offset: f32) -> (f32, f32) {
    let f32_tol = if offset.abs() > 10.0 { 1e-3 } else { 1e-4 };
    match dtype {
        DType::F32 => (f32_tol, f32_tol),
        DType::F16 => (1e-2, 1e-3),
        _ => (3e-2, 1e-3),
    }
}

#[allow(clippy::too_many_arguments)]
fn bn_check(
    dev: &Device,
    dims: &[usize],
    offset: f32,
    dtype: DType,
    param_dtype: DType,
    epi: BnEpi,
    track_x: bool,
    seed: u64,
) -> Result<()> {
    let d = BnData::new(dims, offset, dtype, param_dtype, seed)?;
    let ours = bn_run(dev, dtype, param_dtype, &d, epi, track_x)?;
    let reference = bn_run(&Device::Cpu, DType::F32, DType::F32, &d, epi, track_x)?;
    // Where the pre-activation is within rounding of 0 the two sides may pick different ReLU
    // branches; such elements (if any) are left out of the dx and dresidual comparison.
    let keep = if epi.relu {
        let r = epi.residual.then_some(&d.r);
        let e = sdp::ops::Epilogue { scale: epi.scale, residual: r, relu: false };
        let z = sdp::ops::batch_norm_train_fused(&d.x, &d.gamma, &d.beta, BN_EPS, &e)?.0.abs()?;
        let thr = 1e-4 * z.max_all()?.to_scalar::<f32>()?;
        Some(z.gt(thr)?.to_dtype(DType::F32)?)
    } else {
        None
    };
    let masked = |t: &Tensor| -> Result<Tensor> {
        match &keep {
            Some(k) => t * k,
            None => Ok(t.clone()),
        }
    };
    let (tol_act, tol_stat) = bn_tolerance(dtype, offset);
    // Gradients of half-precision gamma/beta are rounded to their dtype.
    let tol_param = if param_dtype == DType::F32 { tol_stat } else { bn_tolerance(param_dtype, offset).0 };
    let mut errs = vec![
        ("y", rel_err(&ours.y, &reference.y)?, tol_act),
        ("mean", rel_err(&ours.mean, &reference.mean)?, tol_stat),
        ("var", rel_err(&ours.var, &reference.var)?, tol_stat),
        ("dgamma", rel_err(&ours.dgamma, &reference.dgamma)?, tol_param),
        ("dbeta", rel_err(&ours.dbeta, &reference.dbeta)?, tol_param),
    ];
    if let (Some(a), Some(r)) = (&ours.dx, &reference.dx) {
        errs.push(("dx", rel_err(&masked(a)?, &masked(r)?)?, tol_act));
    }
    if let (Some(a), Some(r)) = (&ours.dres, &reference.dres) {
        errs.push(("dresidual", rel_err(&masked(a)?, &masked(r)?)?, tol_act));
    }
    for (what, e, tol) in errs {
        assert!(
            e <= tol,
            "batch norm {dims:?} offset {offset} {dtype:?} (params {param_dtype:?}) {epi:?} track_x {track_x}: \
             {what} differs from the CPU f32 op by {e:.2e} (tolerance {tol:.0e})"
        );
    }
    Ok(())
}

fn bn_epilogues() -> Vec<BnEpi> {
    let mut v = Vec::new();
    for scale in [1.0, 0.5, -0.7] {
        for residual in [false, true] {
            for relu in [false, true] {
                v.push(BnEpi { scale, residual, relu });
            }
        }
    }
    v
}

const BN_SHAPES: &[&[usize]] = &[
    &[4, 3, 7, 5],     // odd sizes
    &[1, 5, 3, 3],     // batch 1
    &[3, 16, 11, 13],  // odd plane
    &[8, 16, 1, 1],    // 1x1 planes
    &[7, 10],          // (B, C)
    &[2, 6],           // (B, C), two values per channel
    &[3, 5, 45, 47],   // 6345 values per channel: several reduction blocks, a short last one
    &[32, 64, 16, 16], // ResNet-like: 8192 values per channel over 4 blocks
];

#[test]
fn cuda_batch_norm_matches_cpu_for_every_epilogue_and_shape() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    for (i, dims) in BN_SHAPES.iter().enumerate() {
        for (j, epi) in bn_epilogues().into_iter().enumerate() {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                bn_check(&dev, dims, 0.0, dtype, DType::F32, epi, true, (100 * i + 10 * j) as u64)?;
            }
        }
    }
    Ok(())
}

#[test]
fn cuda_batch_norm_statistics_stay_accurate_with_a_large_mean() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let epis = [BnEpi { scale: 1.0, residual: false, relu: false }, BnEpi { scale: 0.5, residual: true, relu: true }];
    for dims in [&[4usize, 3, 7, 5][..], &[16, 8, 32, 32]] {
        for epi in epis {
            for dtype in [DType::F32, DType::BF16] {
                bn_check(&dev, dims, 100.0, dtype, DType::F32, epi, true, 7)?;
            }
        }
    }
    Ok(())
}

#[test]
fn cuda_batch_norm_half_precision_parameters_get_gradients_in_their_dtype() -> Result<()> {
    // gamma and beta in x's dtype (not the models' f32 master weights): same results, gradients in bf16/f16.
    let Some(dev) = cuda() else { return Ok(()) };
    for dtype in [DType::BF16, DType::F16] {
        for epi in
            [BnEpi { scale: 1.0, residual: false, relu: true }, BnEpi { scale: -0.7, residual: true, relu: true }]
        {
            bn_check(&dev, &[4, 6, 9, 7], 0.0, dtype, dtype, epi, true, 11)?;
        }
    }
    Ok(())
}

#[test]
fn cuda_batch_norm_untracked_input_still_gives_parameter_and_residual_gradients() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    for epi in [
        BnEpi { scale: 1.0, residual: false, relu: false },
        BnEpi { scale: 0.5, residual: true, relu: true },
        BnEpi { scale: -0.7, residual: true, relu: false },
    ] {
        for dtype in [DType::F32, DType::BF16] {
            bn_check(&dev, &[3, 4, 6, 5], 0.0, dtype, DType::F32, epi, false, 13)?;
        }
    }
    Ok(())
}

#[test]
fn cuda_batch_norm_accepts_offset_and_strided_inputs() -> Result<()> {
    // x as a narrow of a larger batch (contiguous with a storage offset) and as a transposed view: the
    // same outputs and statistics as the plain tensor.
    let Some(dev) = cuda() else { return Ok(()) };
    let d = BnData::new(&[3, 4, 6, 5], 0.0, DType::F32, DType::F32, 17)?;
    let gamma = d.gamma.to_device(&dev)?;
    let beta = d.beta.to_device(&dev)?;
    let r = d.r.to_device(&dev)?;
    let epi = sdp::ops::Epilogue { scale: 0.5, residual: Some(&r), relu: true };
    let plain = sdp::ops::batch_norm_train_fused(&d.x.to_device(&dev)?, &gamma, &beta, BN_EPS, &epi)?;
    let pad = Tensor::zeros((2, 4, 6, 5), DType::F32, &Device::Cpu)?;
    let offset = Tensor::cat(&[&pad, &d.x, &pad], 0)?.to_device(&dev)?.narrow(0, 2, 3)?;
    let strided = d.x.transpose(2, 3)?.contiguous()?.to_device(&dev)?.transpose(2, 3)?;
    for (name, x) in [("offset", offset), ("transposed", strided)] {
        let out = sdp::ops::batch_norm_train_fused(&x, &gamma, &beta, BN_EPS, &epi)?;
        for (what, a, b) in [("y", &out.0, &plain.0), ("mean", &out.1, &plain.1), ("var", &out.2, &plain.2)] {
            let e = rel_err(a, b)?;
            assert!(e <= 1e-6, "{name} input: {what} differs from the plain input's by {e:.2e}");
        }
    }
    Ok(())
}

#[test]
fn cuda_batch_norm_rejects_mismatched_inputs_with_errors() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev)?;
    let g = Tensor::ones(3, DType::F32, &dev)?;
    let g4 = Tensor::ones(4, DType::F32, &dev)?;
    let err = sdp::ops::batch_norm_train(&x, &g4, &g, BN_EPS).unwrap_err().to_string();
    assert!(err.contains("gamma must have shape [3]"), "{err}");
    let r = Tensor::zeros((2, 3, 4, 4), DType::BF16, &dev)?;
    let epi = sdp::ops::Epilogue { residual: Some(&r), ..Default::default() };
    let err = sdp::ops::batch_norm_train_fused(&x, &g, &g, BN_EPS, &epi).unwrap_err().to_string();
    assert!(err.contains("residual is BF16 but input is F32"), "{err}");
    Ok(())
}
