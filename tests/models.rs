//! Model tests: shapes and gradients, the docs/design.md §7 parameter counts, full-size forward + backward on the
//! CPU, the shifted-window mask and relative position index, checkpoints, unit listings, and golden logits
//! from PyTorch (tests/golden/make_golden.py, which says how the fixtures were made).

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use sdp::models::checkpoint;
use sdp::models::info::{info_report, model_info};
use sdp::models::resnet::{ResNet, ResNetConfig};
use sdp::models::swin::{relative_position_index, shifted_window_mask, Swin, SwinConfig, MASK_VALUE};
use sdp::models::{build, BlockPlan, Builder, Family, ModelArgs, Net, UnitKind};
use sdp::spec::Workload;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn cpu() -> Device {
    Device::Cpu
}

fn input(b: usize, seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..b * 3 * 32 * 32).map(|_| r.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(v, (b, 3, 32, 32), &cpu())?)
}

fn tiny_resnet() -> ResNetConfig {
    ResNetConfig { widths: vec![4, 8, 16, 16], depths: vec![2, 1, 1, 1], num_classes: 10, batch_norm: true }
}

/// The tiny Swin of the golden fixtures: embed dim 4 (stage dims 4, 8, 16, 32), heads 2, window 4.
fn tiny_swin() -> SwinConfig {
    SwinConfig { dims: vec![4, 8, 16, 32], depths: vec![2, 2, 2, 2], heads: vec![2, 2, 2, 2], ..SwinConfig::swin_t(10) }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden").join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(a.dims() == b.dims(), "shape {:?} vs {:?}", a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Forward at batch `b`, cross-entropy loss, backward: logits shape and a finite gradient for every
/// parameter.
fn forward_backward(net: &dyn Net, b: usize, classes: usize) -> Result<()> {
    forward_backward_unused(net, b, classes, &[])
}

/// As [`forward_backward`]; the parameters named in `unused` take no part in the forward pass.
fn forward_backward_unused(net: &dyn Net, b: usize, classes: usize, unused: &[&str]) -> Result<()> {
    let xs = input(b, 7)?;
    let logits = net.forward_t(&xs, true)?;
    ensure!(logits.dims() == [b, classes], "logits shape {:?}", logits.dims());
    let loss = candle_nn::loss::cross_entropy(&logits, &Tensor::zeros(b, candle_core::DType::U32, &cpu())?)?;
    let grads = loss.backward()?;
    for (name, var) in &net.store().params {
        if unused.contains(&name.as_str()) {
            ensure!(grads.get(var.as_tensor()).is_none(), "`{name}` got a gradient");
            continue;
        }
        let g = grads.get(var.as_tensor()).with_context(|| format!("no gradient for `{name}`"))?;
        ensure!(g.dims() == var.dims(), "gradient of `{name}` has shape {:?}", g.dims());
        let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        ensure!(norm.is_finite(), "gradient of `{name}` is not finite");
    }
    // Every parameter gets a gradient; at least the head's is non-zero.
    let head =
        net.store().params.iter().find(|(k, _)| k.starts_with("linear.weight") || k.starts_with("head.fc.weight"));
    let (_, hv) = head.context("no head parameter")?;
    ensure!(grads.get(hv.as_tensor()).unwrap().abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn tiny_models_forward_backward_shapes() -> Result<()> {
    let r = tiny_resnet();
    forward_backward(&ResNet::new(&r, &r.full_plan(), Builder::from_seed(1, &cpu()))?, 3, 10)?;
    let s = tiny_swin();
    let net = Swin::new(&s, &s.full_plan(), Builder::from_seed(1, &cpu()))?;
    forward_backward(&net, 3, 10)?;
    ensure!(net.store().num_params() == s.num_params(), "swin formula disagrees with the built model");
    Ok(())
}

#[test]
fn parameter_counts_match_design() -> Result<()> {
    for (model, classes, expected) in [
        ("resnet18", 10, "11,173,962"),
        ("resnet18", 100, "11,220,132"),
        ("wrn18", 10, "44,662,922"),
        ("swin_t", 100, "27,574,318"),
    ] {
        let report = info_report(model, classes)?;
        let total = report.lines().find(|l| l.contains("total parameters")).context("no total line")?;
        ensure!(total.trim_end().ends_with(expected), "{model}/{classes}: `{total}`, expected {expected}\n{report}");
    }
    ensure!(SwinConfig::swin_t(100).num_params() == 27_574_318);
    Ok(())
}

#[test]
fn info_report_lists_groups_and_units() -> Result<()> {
    let r = info_report("swin_t", 100)?;
    for needle in [
        "patch_embed",
        "layers.1.downsample",
        "layers.3.blocks.1",
        "head (head.fc)",
        "block units: 12",
        "neuron units: 17,664",
    ] {
        ensure!(r.contains(needle), "report lacks `{needle}`:\n{r}");
    }
    let r = info_report("resnet18", 10)?;
    for needle in ["stem", "layer2.0 (branch)", "layer2.0.shortcut", "block units: 8", "neuron units: 1,920"] {
        ensure!(r.contains(needle), "report lacks `{needle}`:\n{r}");
    }
    let err = info_report("vgg16", 10).unwrap_err().to_string();
    ensure!(err.contains("unknown model `vgg16`") && err.contains("swin_t"), "{err}");
    Ok(())
}

#[test]
fn full_size_forward_backward_on_cpu() -> Result<()> {
    for model in ["resnet18", "wrn18", "swin_t"] {
        let classes = if model == "swin_t" { 100 } else { 10 };
        let w: Workload =
            toml::from_str(&format!("dataset = \"shapes\"\nmodel = \"{model}\"\nepochs = 1\nbatch_size = 2\n"))?;
        let net = build(&w, classes, 3, &cpu())?;
        forward_backward(net.as_ref(), 2, classes).with_context(|| model.to_string())?;
    }
    Ok(())
}

#[test]
fn swin_workload_overrides_and_head_rule() -> Result<()> {
    let w: Workload = toml::from_str(
        "dataset = \"shapes\"\nmodel = \"swin_t\"\nepochs = 1\nbatch_size = 2\nwidths = [32, 64]\ndepths = [1, 2]\n",
    )?;
    let cfg = SwinConfig::of(&ModelArgs::of(&w, 10))?;
    ensure!(cfg.dims == [32, 64] && cfg.depths == [1, 2] && cfg.heads == [1, 2], "{cfg:?}");
    ensure!(
        SwinConfig::of(&ModelArgs::of(
            &toml::from_str("dataset = \"shapes\"\nmodel = \"swin_t\"\nepochs = 1\nbatch_size = 2\n")?,
            100
        ))? == SwinConfig::swin_t(100)
    );
    let bad: Workload = toml::from_str(
        "dataset = \"shapes\"\nmodel = \"swin_t\"\nepochs = 1\nbatch_size = 2\nwidths = [8, 16]\ndepths = [1]\n",
    )?;
    let err = SwinConfig::of(&ModelArgs::of(&bad, 10)).unwrap_err().to_string();
    ensure!(err.contains("depths (1)") && err.contains("dims (2)"), "{err}");
    let odd = SwinConfig { heads: vec![5, 6, 12, 24], ..SwinConfig::swin_t(10) };
    let err = odd.validate().unwrap_err();
    ensure!(err.contains("stage 0 dim 96 is not divisible by its 5 heads"), "{err}");
    Ok(())
}

#[test]
fn swin_t_stage_geometry() -> Result<()> {
    let blocks = SwinConfig::swin_t(100).blocks();
    ensure!(blocks.len() == 12);
    let geo: Vec<(usize, usize, usize)> = blocks.iter().map(|b| (b.resolution, b.window, b.shift)).collect();
    let expect = [
        (16, 4, 0),
        (16, 4, 2),
        (8, 4, 0),
        (8, 4, 2),
        (4, 4, 0),
        (4, 4, 0),
        (4, 4, 0),
        (4, 4, 0),
        (4, 4, 0),
        (4, 4, 0),
        (2, 2, 0),
        (2, 2, 0),
    ];
    ensure!(geo == expect, "{geo:?}");
    Ok(())
}

/// 4×4 tokens, window 2, shift 1. After the cyclic shift by −1 the map's rows (and columns) come from bands
/// A = {0, 1} (original 1, 2), B = {2} (original 3), C = {3} (original 0): the last window row/column
/// straddles B and C. Windows (row-major, tokens row-major inside): window (0,0) is all band (A,A); window
/// (0,1) has columns B, C; window (1,0) rows B, C; window (1,1) rows and columns B, C.
#[test]
fn shifted_window_mask_4x4_window2_shift1() -> Result<()> {
    let m = shifted_window_mask(4, 2, 1);
    ensure!(m.len() == 4 * 4 * 4);
    let x = MASK_VALUE;
    // label of each token within each window (hand-derived as above), same label ⇔ may attend.
    let labels: [[u8; 4]; 4] = [
        [0, 0, 0, 0], // (A,A) (A,A) / (A,A) (A,A)
        [1, 2, 1, 2], // (A,B) (A,C) / (A,B) (A,C)
        [1, 1, 2, 2], // (B,A) (B,A) / (C,A) (C,A)
        [1, 2, 3, 4], // (B,B) (B,C) / (C,B) (C,C)
    ];
    for (w, lab) in labels.iter().enumerate() {
        for i in 0..4 {
            for j in 0..4 {
                let want = if lab[i] == lab[j] { 0.0 } else { x };
                let got = m[w * 16 + i * 4 + j];
                ensure!(got == want, "window {w} ({i},{j}): {got} vs {want}");
            }
        }
    }
    // Spelled out for the last window: only the diagonal is unmasked.
    let last: Vec<f32> = m[48..64].to_vec();
    let diag: Vec<f32> = (0..16).map(|k| if k % 5 == 0 { 0.0 } else { x }).collect();
    ensure!(last == diag, "{last:?}");
    Ok(())
}

#[test]
fn relative_position_index_window2() -> Result<()> {
    // Tokens (0,0) (0,1) (1,0) (1,1); index = (dr + 1) * 3 + (dc + 1) with (dr, dc) = pos_i − pos_j.
    let want: Vec<u32> = vec![4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4];
    ensure!(relative_position_index(2) == want, "{:?}", relative_position_index(2));
    Ok(())
}

#[test]
fn golden_resnet_matches_pytorch() -> Result<()> {
    let cfg = tiny_resnet();
    let net = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_seed(0, &cpu()))?;
    checkpoint::load(net.store(), &fixture("resnet_tiny.safetensors"))?;
    let io = checkpoint::load_tensors(&fixture("resnet_tiny_io.safetensors"), &cpu())?;
    let xs = &io["input"];
    let d = max_abs_diff(&net.forward_t(xs, false)?, &io["logits_eval"])?;
    eprintln!("resnet golden: eval max |diff| = {d:e}");
    ensure!(d <= 1e-4, "eval logits differ by {d}");
    let d = max_abs_diff(&net.forward_t(xs, true)?, &io["logits_train"])?;
    eprintln!("resnet golden: train max |diff| = {d:e}");
    ensure!(d <= 1e-4, "train logits differ by {d}");
    for (name, v) in &net.store().buffers {
        let d = max_abs_diff(v.as_tensor(), &io[&format!("after_train.{name}")])?;
        ensure!(d <= 1e-5, "running statistic `{name}` differs by {d}");
    }
    Ok(())
}

#[test]
fn golden_swin_matches_timm() -> Result<()> {
    let cfg = tiny_swin();
    let net = Swin::new(&cfg, &cfg.full_plan(), Builder::from_seed(0, &cpu()))?;
    checkpoint::load(net.store(), &fixture("swin_tiny.safetensors"))?;
    let io = checkpoint::load_tensors(&fixture("swin_tiny_io.safetensors"), &cpu())?;
    let logits = net.forward_t(&io["input"], false)?;
    let d = max_abs_diff(&logits, &io["logits"])?;
    eprintln!("swin golden: max |diff| = {d:e}");
    ensure!(d <= 1e-4, "logits differ by {d}");
    // The fixture is sensitive: a model with other weights is far off.
    let other = Swin::new(&cfg, &cfg.full_plan(), Builder::from_seed(0, &cpu()))?;
    ensure!(max_abs_diff(&other.forward_t(&io["input"], false)?, &io["logits"])? > 0.1);
    Ok(())
}

#[test]
fn checkpoint_round_trip_and_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ck.safetensors");
    let cfg = tiny_resnet();
    let a = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_seed(1, &cpu()))?;
    a.forward_t(&input(2, 1)?, true)?; // move the BN running statistics off their init
    checkpoint::save(a.store(), &path)?;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())?.map(|e| e.unwrap().file_name()).collect();
    ensure!(leftovers.len() == 1, "temporary files left: {leftovers:?}");
    let b = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_seed(2, &cpu()))?;
    checkpoint::load(b.store(), &path)?;
    for (name, va) in a.store().params.iter().chain(&a.store().buffers) {
        let vb = b.store().params.get(name).or_else(|| b.store().buffers.get(name)).context("missing")?;
        ensure!(max_abs_diff(va.as_tensor(), vb.as_tensor())? == 0.0, "`{name}` differs after loading");
    }
    let xs = input(2, 9)?;
    ensure!(max_abs_diff(&a.forward_t(&xs, false)?, &b.forward_t(&xs, false)?)? == 0.0);

    // Swin round trip through Builder::from_tensors (how subnetworks get built from global values).
    let s = tiny_swin();
    let sa = Swin::new(&s, &s.full_plan(), Builder::from_seed(4, &cpu()))?;
    let spath = dir.path().join("swin.safetensors");
    checkpoint::save(sa.store(), &spath)?;
    let values = checkpoint::load_tensors(&spath, &cpu())?;
    let sb = Swin::new(&s, &s.full_plan(), Builder::from_tensors(&values, &cpu()))?;
    ensure!(max_abs_diff(&sa.forward_t(&xs, false)?, &sb.forward_t(&xs, false)?)? == 0.0);

    // A missing tensor: the error names the file and the tensor.
    let mut partial: BTreeMap<String, Tensor> = checkpoint::load_tensors(&path, &cpu())?;
    partial.remove("layer1.0.conv2.weight");
    let broken = dir.path().join("broken.safetensors");
    let hm: std::collections::HashMap<_, _> = partial.clone().into_iter().collect();
    candle_core::safetensors::save(&hm, &broken)?;
    let err = format!("{:#}", checkpoint::load(b.store(), &broken).unwrap_err());
    ensure!(err.contains("broken.safetensors") && err.contains("missing tensor `layer1.0.conv2.weight`"), "{err}");
    // A mis-shaped tensor.
    partial.insert("layer1.0.conv2.weight".into(), Tensor::zeros((4, 4, 1, 1), candle_core::DType::F32, &cpu())?);
    let hm: std::collections::HashMap<_, _> = partial.clone().into_iter().collect();
    candle_core::safetensors::save(&hm, &broken)?;
    let err = format!("{:#}", checkpoint::load(b.store(), &broken).unwrap_err());
    ensure!(
        err.contains("tensor `layer1.0.conv2.weight` has shape [4, 4, 1, 1], the model expects [4, 4, 3, 3]"),
        "{err}"
    );
    // An unexpected tensor, and a file that does not exist.
    let mut extra: BTreeMap<String, Tensor> = checkpoint::load_tensors(&path, &cpu())?;
    extra.insert("fc.weight".into(), Tensor::zeros(2, candle_core::DType::F32, &cpu())?);
    let hm: std::collections::HashMap<_, _> = extra.into_iter().collect();
    candle_core::safetensors::save(&hm, &broken)?;
    let err = format!("{:#}", checkpoint::load(b.store(), &broken).unwrap_err());
    ensure!(err.contains("unexpected tensors [\"fc.weight\"]"), "{err}");
    let err = format!("{:#}", checkpoint::load(b.store(), &dir.path().join("nope.safetensors")).unwrap_err());
    ensure!(err.contains("reading checkpoint") && err.contains("nope.safetensors"), "{err}");
    Ok(())
}

#[test]
fn units_sum_to_owned_parameters() -> Result<()> {
    for model in ["resnet18", "wrn18", "swin_t"] {
        let info = model_info(model, 100)?;
        // Block units: each one's params equal its group's count in the built model, and
        // block units + shared groups = total.
        let owned: Vec<&(String, usize, bool)> = info.groups.iter().filter(|g| g.2).collect();
        ensure!(
            owned.len() == info.block_units.len(),
            "{model}: {} groups vs {} units",
            owned.len(),
            info.block_units.len()
        );
        for (g, u) in owned.iter().zip(&info.block_units) {
            ensure!(g.0.starts_with(&u.name) && g.1 == u.params, "{model}: group {g:?} vs unit {u:?}");
        }
        let shared: usize = info.groups.iter().filter(|g| !g.2).map(|g| g.1).sum();
        let blocks: usize = info.block_units.iter().map(|u| u.params).sum();
        ensure!(blocks + shared == info.total, "{model}: {blocks} + {shared} != {}", info.total);
        // Neuron units: per block they own less than the block (its norms/attention/bn2 stay shared).
        for (i, b) in info.block_units.iter().enumerate() {
            let n: Vec<_> = info.neuron_units.iter().filter(|u| u.block == i).collect();
            let sum: usize = n.iter().map(|u| u.params).sum();
            ensure!(sum < b.params && !n.is_empty(), "{model} block {i}: neurons own {sum} of {}", b.params);
            ensure!(n.iter().enumerate().all(|(k, u)| u.index == k && u.kind == UnitKind::Neuron));
        }
    }
    // ResNet neuron units own exactly c_in·9 + 2 + c_out·9.
    let r = ResNetConfig::resnet18(10);
    let n = r.units(UnitKind::Neuron);
    ensure!(n.len() == 2 * (64 + 128 + 256 + 512));
    ensure!(n[0].params == 64 * 9 + 2 + 64 * 9 && n[0].name == "layer1.0#0");
    let l2 = n.iter().find(|u| u.name == "layer2.0#0").context("layer2.0#0")?;
    ensure!(l2.params == 64 * 9 + 2 + 128 * 9);
    // Swin: 12 block units; MLP hidden units own fc1 row + bias + fc2 column.
    let s = SwinConfig::swin_t(100);
    ensure!(s.units(UnitKind::Block).len() == 12);
    let n = s.units(UnitKind::Neuron);
    ensure!(n.len() == 2 * 384 + 2 * 768 + 6 * 1536 + 2 * 3072);
    ensure!(n[0].params == 2 * 96 + 1 && n[0].name == "layers.0.blocks.0#0");
    ensure!(n.last().unwrap().params == 2 * 768 + 1);
    Ok(())
}

#[test]
fn swin_plan_drops_blocks_and_hidden_units() -> Result<()> {
    let cfg = tiny_swin();
    let shapes = cfg.blocks();
    // Every block dropped: only the shared parameters exist, and the blocks are the identity.
    let none: Vec<BlockPlan> =
        shapes.iter().map(|_| BlockPlan { residual: false, channels: vec![], scale: 1.0, mid_scale: 1.0 }).collect();
    let net = Swin::new(&cfg, &none, Builder::from_seed(1, &cpu()))?;
    ensure!(net.store().num_params() == cfg.shared_params());
    ensure!(!net.store().params.keys().any(|k| k.contains(".blocks.")));
    forward_backward(&net, 2, 10)?;
    // Half the MLP hidden units of block 0 and none of block 1: 1.5 × hidden × neuron params fewer.
    let mut plan = cfg.full_plan();
    plan[0].channels.truncate(shapes[0].mlp_hidden / 2);
    plan[1].channels.clear();
    let net = Swin::new(&cfg, &plan, Builder::from_seed(1, &cpu()))?;
    let removed = (shapes[0].mlp_hidden / 2 + shapes[1].mlp_hidden) * shapes[0].neuron_params();
    ensure!(net.store().num_params() == cfg.num_params() - removed);
    ensure!(net.store().params["layers.0.blocks.0.mlp.fc1.weight"].dims() == [8, 4]);
    ensure!(!net.store().params.contains_key("layers.0.blocks.1.mlp.fc1.weight"));
    // Without hidden units the MLP branch is fc2's bias: norm2 feeds nothing.
    forward_backward_unused(&net, 2, 10, &["layers.0.blocks.1.norm2.weight", "layers.0.blocks.1.norm2.bias"])?;
    // A dropped block is the identity: the model without block 1 equals the full model with block 1's
    // branches scaled by 0.
    let full = Swin::new(&cfg, &cfg.full_plan(), Builder::from_seed(1, &cpu()))?;
    let mut p0 = cfg.full_plan();
    p0[1].scale = 0.0;
    let zeroed = Swin::new(&cfg, &p0, Builder::from_seed(1, &cpu()))?;
    let mut pd = cfg.full_plan();
    pd[1].residual = false;
    let dropped = Swin::new(&cfg, &pd, Builder::from_seed(1, &cpu()))?;
    let xs = input(2, 3)?;
    ensure!(max_abs_diff(&zeroed.forward_t(&xs, false)?, &dropped.forward_t(&xs, false)?)? < 1e-6);
    ensure!(max_abs_diff(&full.forward_t(&xs, false)?, &dropped.forward_t(&xs, false)?)? > 1e-4);
    Ok(())
}

/// Mixed precision (`workload.precision = "bf16"`): the same weights computing in bf16 give logits and
/// gradients close to f32's, the gradients land on the f32 masters, and swin_t refuses clearly.
#[test]
fn bf16_resnet_tracks_f32_and_keeps_f32_masters() -> Result<()> {
    use candle_core::DType;
    let cfg = tiny_resnet();
    let f32_net = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_seed(3, &cpu()))?;
    let bf16_net = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_seed(3, &cpu()).with_compute_dtype(DType::BF16))?;
    let xs = input(6, 11)?;
    let labels = Tensor::new(&[1u32, 2, 3, 4, 5, 6], &cpu())?;
    let run = |net: &ResNet| -> Result<(Tensor, candle_core::backprop::GradStore)> {
        let logits = net.forward_t(&xs, true)?;
        let grads = candle_nn::loss::cross_entropy(&logits, &labels)?.backward()?;
        Ok((logits, grads))
    };
    let (l32, g32) = run(&f32_net)?;
    let (l16, g16) = run(&bf16_net)?;
    ensure!(l16.dtype() == DType::F32, "logits come back as {:?}", l16.dtype());
    let scale = l32.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let diff = max_abs_diff(&l16, &l32)?;
    // bf16 keeps 8 mantissa bits: ~0.4% per rounding, a few percent through the network.
    ensure!(diff <= 0.05 * scale, "bf16 logits differ from f32 by {diff} (scale {scale})");
    ensure!(diff > 0.0, "bf16 logits equal f32's bit for bit: the bf16 path did not run");
    let (mut dot, mut n16, mut n32) = (0f64, 0f64, 0f64);
    for (name, var) in &bf16_net.store().params {
        let g = g16.get(var.as_tensor()).with_context(|| format!("no bf16 gradient for `{name}`"))?;
        ensure!(g.dtype() == DType::F32, "`{name}` gradient is {:?}", g.dtype());
        let r = g32.get(f32_net.store().params[name].as_tensor()).context("no f32 gradient")?;
        let (a, b) = (g.flatten_all()?, r.flatten_all()?);
        let sum = |t: Tensor| -> Result<f64> { Ok(t.sum_all()?.to_scalar::<f32>()? as f64) };
        let (d, na, nb) = (sum((&a * &b)?)?, sum(a.sqr()?)?, sum(b.sqr()?)?);
        // Width-4 layers at batch 6: BN-bias gradients (sums of cancelling terms) are the noisiest.
        let cos = d / (na * nb).sqrt().max(1e-30);
        ensure!(cos > 0.8, "`{name}`: bf16 gradient has cosine {cos} to the f32 one");
        (dot, n16, n32) = (dot + d, n16 + na, n32 + nb);
    }
    let cos = dot / (n16 * n32).sqrt();
    ensure!(cos > 0.97, "the whole bf16 gradient has cosine {cos} to the f32 one");
    // BatchNorm statistics stay f32.
    for (name, buf) in &bf16_net.store().buffers {
        ensure!(buf.dtype() == DType::F32, "buffer `{name}` is {:?}", buf.dtype());
    }
    let s = tiny_swin();
    let err = Swin::new(&s, &s.full_plan(), Builder::from_seed(1, &cpu()).with_compute_dtype(DType::BF16))
        .err()
        .context("swin_t accepted bf16")?;
    ensure!(err.to_string().contains("swin_t computes in f32 only"), "unexpected error: {err}");
    Ok(())
}
