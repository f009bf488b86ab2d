//! Forward+backward timings of `sdp::ops` against candle's reference ops, on the conv and BN
//! shapes of a CIFAR ResNet-18 at batch 32.
//!
//! `cargo bench --bench ops` runs everything (about two minutes on 2 cores, most of it in candle's
//! reference backward); `cargo bench --bench ops -- conv/l1_64x32` runs one shape.

use candle_core::{Device, Result, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sdp::ops;
use std::time::Duration;

const BATCH: usize = 32;

fn rand_var(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Var> {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Var::from_tensor(&Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// One conv layer of ResNet-18: (name, Cin, Cout, input side, kernel, stride, padding).
type ConvShape = (&'static str, usize, usize, usize, usize, usize, usize);

const CONV_SHAPES: [ConvShape; 6] = [
    ("l1_64x32", 64, 64, 32, 3, 1, 1),
    ("l2_128x16", 128, 128, 16, 3, 1, 1),
    ("l3_256x8", 256, 256, 8, 3, 1, 1),
    ("l4_512x4", 512, 512, 4, 3, 1, 1),
    ("down_64to128_s2", 64, 128, 32, 3, 2, 1),
    ("shortcut_1x1_64to128_s2", 64, 128, 32, 1, 2, 0),
];

/// Forward, then backward of sum(y), returning the gradient map so that nothing is optimised away.
fn conv_step(x: &Var, w: &Var, s: &ConvShape, ours: bool) -> Result<candle_core::backprop::GradStore> {
    let (_, _, _, _, _, stride, pad) = *s;
    let y = if ours { ops::conv2d(x, w, stride, pad)? } else { x.conv2d(w, pad, stride, 1, 1)? };
    y.sum_all()?.backward()
}

fn bench_conv(c: &mut Criterion) {
    sdp::runtime::tune_for_training(); // as the `sdp` binary does
    let mut group = c.benchmark_group("conv");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for s in &CONV_SHAPES {
        let (name, cin, cout, side, k, _, _) = *s;
        let (Ok(x), Ok(w)) = (rand_var(&mut rng, &[BATCH, cin, side, side]), rand_var(&mut rng, &[cout, cin, k, k]))
        else {
            panic!("building the inputs of {name}");
        };
        for (label, ours) in [("ours", true), ("candle", false)] {
            group.bench_with_input(BenchmarkId::new(name, label), s, |b, s| {
                b.iter(|| conv_step(&x, &w, s, ours).map(drop).expect("conv step"))
            });
        }
    }
    group.finish();
}

/// Batch norm in training mode composed from candle ops (what candle-nn's BatchNorm does).
fn bn_candle(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let c = x.dim(1)?;
    let mean = x.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1, 1))?)
}

fn bench_bn(c: &mut Criterion) {
    sdp::runtime::tune_for_training(); // as the `sdp` binary does
    let mut group = c.benchmark_group("bn_train");
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (name, ch, side) in [("64x32", 64, 32), ("512x4", 512, 4)] {
        let (Ok(x), Ok(g), Ok(bt)) =
            (rand_var(&mut rng, &[BATCH, ch, side, side]), rand_var(&mut rng, &[ch]), rand_var(&mut rng, &[ch]))
        else {
            panic!("building the inputs of {name}");
        };
        group.bench_function(BenchmarkId::new(name, "ours"), |b| {
            b.iter(|| {
                let (y, _, _) = ops::batch_norm_train(&x, &g, &bt, 1e-5).expect("bn forward");
                y.sum_all().and_then(|l| l.backward()).map(drop).expect("bn backward")
            })
        });
        group.bench_function(BenchmarkId::new(name, "candle"), |b| {
            b.iter(|| {
                let y = bn_candle(&x, &g, &bt).expect("bn forward");
                y.sum_all().and_then(|l| l.backward()).map(drop).expect("bn backward")
            })
        });
    }
    group.finish();
}

/// The end of a ResNet basic block, relu(bn(x) + skip): the fused op against our batch norm
/// followed by candle's add and ReLU (what the models did before the fusion).
fn bench_bn_add_relu(c: &mut Criterion) {
    sdp::runtime::tune_for_training(); // as the `sdp` binary does
    let mut group = c.benchmark_group("bn_add_relu");
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (name, ch, side) in [("64x32", 64, 32), ("512x4", 512, 4)] {
        let dims = [BATCH, ch, side, side];
        let (Ok(x), Ok(g), Ok(bt), Ok(skip)) = (
            rand_var(&mut rng, &dims),
            rand_var(&mut rng, &[ch]),
            rand_var(&mut rng, &[ch]),
            rand_var(&mut rng, &dims),
        ) else {
            panic!("building the inputs of {name}");
        };
        let epi = ops::Epilogue { residual: Some(skip.as_tensor()), relu: true, ..Default::default() };
        group.bench_function(BenchmarkId::new(name, "fused"), |b| {
            b.iter(|| {
                let (y, _, _) = ops::batch_norm_train_fused(&x, &g, &bt, 1e-5, &epi).expect("fused forward");
                y.sum_all().and_then(|l| l.backward()).map(drop).expect("fused backward")
            })
        });
        group.bench_function(BenchmarkId::new(name, "composed"), |b| {
            b.iter(|| {
                let (y, _, _) = ops::batch_norm_train(&x, &g, &bt, 1e-5).expect("bn forward");
                let y = (y + skip.as_tensor()).and_then(|y| y.relu()).expect("add relu");
                y.sum_all().and_then(|l| l.backward()).map(drop).expect("composed backward")
            })
        });
    }
    group.finish();
}

/// swin_t's element-wise ops at their stage-1 shapes (batch 32): the attention softmax over windows
/// of 16 tokens, the MLP's GELU and the LayerNorm, ours against candle's composition.
fn bench_swin_ops(c: &mut Criterion) {
    sdp::runtime::tune_for_training(); // as the `sdp` binary does
    let mut group = c.benchmark_group("swin_ops");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (Ok(attn), Ok(hidden), Ok(tokens), Ok(w), Ok(b)) = (
        rand_var(&mut rng, &[BATCH * 64, 3, 16, 16]),
        rand_var(&mut rng, &[BATCH * 256, 384]),
        rand_var(&mut rng, &[BATCH * 256, 96]),
        rand_var(&mut rng, &[96]),
        rand_var(&mut rng, &[96]),
    ) else {
        panic!("building the swin op inputs");
    };
    let step = |y: Result<Tensor>| y.and_then(|y| y.sum_all()?.backward()).map(drop).expect("fwd+bwd");
    group.bench_function("softmax/ours", |bn| bn.iter(|| step(ops::softmax_last_dim(&attn))));
    group.bench_function("softmax/candle", |bn| {
        bn.iter(|| step(candle_nn::ops::softmax(&attn, candle_core::D::Minus1)))
    });
    group.bench_function("gelu/ours", |bn| bn.iter(|| step(ops::gelu_erf(&hidden))));
    group.bench_function("gelu/candle", |bn| bn.iter(|| step(hidden.gelu_erf())));
    group.bench_function("layer_norm/ours", |bn| bn.iter(|| step(ops::layer_norm(&tokens, &w, &b, 1e-5))));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_conv, bench_bn, bench_bn_add_relu, bench_swin_ops
}
criterion_main!(benches);
