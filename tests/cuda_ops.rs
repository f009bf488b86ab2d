//! GPU parity of the cuDNN conv2d that `sdp::ops::conv2d` runs on CUDA with the `cudnn` feature: its
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
