//! The LLaMA-style decoder family: logits, loss and every parameter's gradient equal to Hugging Face
//! `transformers`' `LlamaForCausalLM` with the same weights (tests/golden/make_golden_llama.py says how the
//! fixtures were made), the presets' parameter counts (`llama_134m` at a vocabulary of 32,000 is the
//! paper's 134,105,856), and what masking a decoder means: a dropped layer is the identity, a narrowed layer
//! equals the full layer with the other SwiGLU units' weights zeroed.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use sdp::models::checkpoint;
use sdp::models::llama::{Llama, LlamaConfig};
use sdp::models::{self, BlockPlan, Builder, Family, ModelArgs, Net, UnitKind};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden").join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(a.dims() == b.dims(), "shape {:?} vs {:?}", a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// The fixtures' configs (see the generator script).
fn golden_config(name: &str) -> LlamaConfig {
    let base = LlamaConfig { vocab: 32, dim: 16, layers: 2, context: 8, ..LlamaConfig::tiny(32) };
    match name {
        "gqa" => LlamaConfig { heads: 4, kv_heads: 2, ffn: 24, tied: false, ..base },
        _ => LlamaConfig { heads: 2, kv_heads: 2, ffn: 20, tied: true, ..base },
    }
}

fn ids(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::U32)?)
}

fn next_token() -> Result<&'static dyn sdp::task::Task> {
    Ok(sdp::task::task("next_token")?.task)
}

#[test]
fn golden_llama_matches_transformers_logits_loss_and_every_gradient() -> Result<()> {
    for name in ["gqa", "tied"] {
        let cfg = golden_config(name);
        let net = Llama::new(&cfg, &cfg.full_plan(), Builder::from_seed(0, &Device::Cpu))?;
        checkpoint::load(net.store(), &fixture(&format!("llama_{name}.safetensors")))?;
        let io = checkpoint::load_tensors(&fixture(&format!("llama_{name}_io.safetensors")), &Device::Cpu)?;
        let logits = net.forward_t(&ids(&io["input_ids"])?, true)?;
        let d = max_abs_diff(&logits, &io["logits"])?;
        eprintln!("llama {name} golden: logits max |diff| = {d:e}");
        ensure!(d <= 1e-4, "{name}: logits differ by {d}");
        let loss = next_token()?.loss(&logits, &ids(&io["targets"])?)?;
        let want = io["loss"].to_vec1::<f32>()?[0];
        let got = loss.to_scalar::<f32>()?;
        ensure!((got - want).abs() <= 1e-5, "{name}: loss {got} vs transformers' {want}");
        // Every parameter's gradient, none cut silently (a missing or zero gradient fails here).
        let grads = loss.backward()?;
        ensure!(net.store().params.len() == io.keys().filter(|k| k.starts_with("grad.")).count(), "{name}: count");
        for (pname, var) in &net.store().params {
            let g = grads.get(var.as_tensor()).ok_or_else(|| anyhow::anyhow!("{name}: `{pname}` has no gradient"))?;
            let want = &io[&format!("grad.{pname}")];
            let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1e-3);
            let d = max_abs_diff(g, want)?;
            ensure!(d <= 1e-4 * scale.max(1.0), "{name}: gradient of `{pname}` differs by {d} (max |g| {scale})");
        }
        // The fixture is sensitive: other weights are far off.
        let other = Llama::new(&cfg, &cfg.full_plan(), Builder::from_seed(1, &Device::Cpu))?;
        ensure!(max_abs_diff(&other.forward_t(&ids(&io["input_ids"])?, false)?, &io["logits"])? > 0.1);
    }
    Ok(())
}

#[test]
fn presets_count_their_parameters() -> Result<()> {
    let m134 = models::family("llama_134m", &ModelArgs::named(32_000))?;
    assert_eq!(m134.param_count()?, 134_105_856);
    // Shared: the embedding, the final norm and the untied head, 37 % of the model.
    let layers: usize = m134.units(UnitKind::Block).iter().map(|u| u.params).sum();
    let shared = 134_105_856 - layers;
    assert_eq!(shared, 2 * 32_000 * 768 + 768);
    let tiny = models::family("llama_tiny", &ModelArgs::named(2048))?;
    let built = tiny.build_full(1.0, Builder::from_seed(0, &Device::Cpu))?.store().num_params();
    assert_eq!((tiny.param_count()?, built), (1_869_952, 1_869_952));
    // Overrides: [d] and [layers]; the head dim stays 32 where d allows.
    let a = ModelArgs { widths: Some(vec![64]), depths: Some(vec![3]), ..ModelArgs::named(100) };
    assert_eq!(models::family("llama_tiny", &a)?.stages(), (vec![64], vec![3]));
    for (widths, says) in [(vec![64, 64], "is [d]"), (vec![3], "head dim 3 must be even")] {
        let a = ModelArgs { widths: Some(widths), ..ModelArgs::named(10) };
        let e = models::family("llama_tiny", &a).err().map(|e| format!("{e:#}")).unwrap_or_default();
        ensure!(e.contains(says), "{e}");
    }
    Ok(())
}

/// A tiny decoder with random weights, its plan, and a batch of ids.
fn tiny() -> Result<(LlamaConfig, Box<dyn Net>, Tensor)> {
    let cfg = LlamaConfig { dim: 16, layers: 3, heads: 2, kv_heads: 1, ffn: 12, context: 6, ..LlamaConfig::tiny(20) };
    let net = cfg.build_full(1.0, Builder::from_seed(3, &Device::Cpu))?;
    let ids = Tensor::new(&[[1u32, 5, 7, 2, 19, 0], [3, 3, 8, 11, 4, 6]], &Device::Cpu)?;
    Ok((cfg, net, ids))
}

#[test]
fn a_dropped_layer_is_the_identity_and_narrowed_units_are_zeroed_units() -> Result<()> {
    let (cfg, full, ids) = tiny()?;
    let values = full.store().values();
    // Layer 1 dropped: the same network as the full one whose layer 1 branches output zero, i.e. whose
    // o_proj and down_proj are zero.
    let mut plan = cfg.full_plan();
    plan[1].residual = false;
    let sub = cfg.build(&plan, Builder::from_tensors(&values, &Device::Cpu))?;
    let mut zeroed = values.clone();
    for p in ["self_attn.o_proj.weight", "mlp.down_proj.weight"] {
        let n = format!("model.layers.1.{p}");
        zeroed.insert(n.clone(), values[&n].zeros_like()?);
    }
    let reference = cfg.build_full(1.0, Builder::from_tensors(&zeroed, &Device::Cpu))?;
    let d = max_abs_diff(&sub.forward_t(&ids, false)?, &reference.forward_t(&ids, false)?)?;
    ensure!(d <= 1e-5, "dropped layer: {d}");
    // Every layer at its SwiGLU units 1, 4, 5: gathered rows and columns equal zeroing the others.
    let keep = [1usize, 4, 5];
    let plan: Vec<BlockPlan> =
        cfg.full_plan().into_iter().map(|p| BlockPlan { channels: keep.to_vec(), ..p }).collect();
    let mut local = values.clone();
    let mut zeroed = values.clone();
    let idx = Tensor::new(&[1u32, 4, 5], &Device::Cpu)?;
    let mask: Vec<f32> = (0..cfg.ffn).map(|u| if keep.contains(&u) { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::new(mask.as_slice(), &Device::Cpu)?;
    for i in 0..cfg.layers {
        for (p, axis) in [("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)] {
            let n = format!("model.layers.{i}.mlp.{p}.weight");
            local.insert(n.clone(), values[&n].index_select(&idx, axis)?);
            let m = if axis == 0 { mask.unsqueeze(1)? } else { mask.unsqueeze(0)? };
            zeroed.insert(n.clone(), values[&n].broadcast_mul(&m)?);
        }
    }
    let sub = cfg.build(&plan, Builder::from_tensors(&local, &Device::Cpu))?;
    let reference = cfg.build_full(1.0, Builder::from_tensors(&zeroed, &Device::Cpu))?;
    let d = max_abs_diff(&sub.forward_t(&ids, false)?, &reference.forward_t(&ids, false)?)?;
    ensure!(d <= 1e-5, "narrowed layers: {d}");
    Ok(())
}

#[test]
fn the_decoder_is_causal() -> Result<()> {
    let (_, net, ids) = tiny()?;
    let a = net.forward_t(&ids, false)?;
    // Changing the last token changes no earlier position's logits.
    let mut v = ids.to_vec2::<u32>()?;
    v[0][5] = 9;
    v[1][5] = 1;
    let b = net.forward_t(&Tensor::new(v, &Device::Cpu)?, false)?;
    ensure!(max_abs_diff(&a.narrow(1, 0, 5)?, &b.narrow(1, 0, 5)?)? == 0.0, "earlier positions moved");
    ensure!(max_abs_diff(&a.narrow(1, 5, 1)?, &b.narrow(1, 5, 1)?)? > 1e-4, "the last position did not move");
    Ok(())
}

#[test]
fn the_next_token_task_scores_mean_nll_per_token_and_its_ensemble() -> Result<()> {
    let task = next_token()?;
    assert_eq!((task.metric().name, task.metric().higher_is_better), ("nll", false));
    // Two sequences of two positions over a vocabulary of 2: uniform logits, NLL ln 2 everywhere.
    let logits = Tensor::zeros((2, 2, 2), DType::F32, &Device::Cpu)?;
    let score = task.score(&logits, &[0, 1, 1, 0])?;
    ensure!((score - 2.0 * 2f64.ln()).abs() < 1e-6, "{score}");
    // The ensemble's mean distribution: p(target) = 0.25 at every position.
    let probs = Tensor::new(&[[[0.25f32, 0.75], [0.75, 0.25]], [[0.25, 0.75], [0.75, 0.25]]], &Device::Cpu)?;
    let score = task.ensemble_score(&probs, &[0, 1, 0, 1])?;
    ensure!((score - 2.0 * 4f64.ln()).abs() < 1e-6, "{score}");
    let modes: Vec<&str> = task.eval_modes().iter().map(|m| m.name()).collect();
    assert_eq!(modes, ["full", "scaled", "ensemble", "subnet_mean"]);
    Ok(())
}

/// A token directory of a toy language whose next token is a function of the current one,
/// `x[i+1] = (5·x[i] + 3) mod 16`, restarted at a random token every 9 tokens: a decoder that attends to
/// the previous token predicts all but the restarts.
fn toy_tokens(dir: &std::path::Path) -> Result<()> {
    use rand::{Rng, SeedableRng};
    use sdp::data::tokens::{write_shard, Sidecar};
    std::fs::create_dir_all(dir)?;
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut text = |n: usize| -> Vec<u16> {
        let mut out = Vec::with_capacity(n);
        let mut t = 0u16;
        for i in 0..n {
            t = if i % 9 == 0 { r.random_range(0..16) } else { (5 * t + 3) % 16 };
            out.push(t);
        }
        out
    };
    write_shard(&dir.join("toy_train_000000.bin"), &text(6000))?;
    write_shard(&dir.join("toy_val_000000.bin"), &text(900))?;
    let sidecar = Sidecar {
        tokenizer: "toy".into(),
        vocab_size: 16,
        eot: None,
        source: "tests/llama.rs".into(),
        train_tokens: 6000,
        val_tokens: 900,
        train_bytes: 0,
        val_bytes: 0,
        shards: vec![],
    };
    sidecar.write(dir)
}

const LM_SPEC: &str = r#"
name = "llm"
seeds = [0]

[workload]
dataset = "tokens:toy"
context = 8
model = "llama_tiny"
widths = [16]
depths = [2]
epochs = 2
batch_size = 8

[optim]
name = "adamw"
lr = 0.02
weight_decay = 0.0
clip_grad_norm = 1.0
schedule = "cosine"
warmup_epochs = 0.2

[method]
kind = ["dp", "sdp"]
workers = 2
masking = ["block", "neuron"]
coverage = 0.5
"#;

#[test]
fn a_decoder_trains_on_token_shards_under_dp_and_sdp_through_the_runner() -> Result<()> {
    let data = tempfile::tempdir()?;
    toy_tokens(&data.path().join("toy"))?;
    let exp = common::parse_with(LM_SPEC, &[])?;
    assert_eq!(exp.runs.len(), 3, "DP, SDP block, SDP neuron");
    let results = tempfile::tempdir()?;
    let opts = sdp::runner::RunOptions { data_dir: data.path().to_path_buf(), ..common::run_options(results.path()) };
    let done = sdp::runner::run_all(std::slice::from_ref(&exp), &opts)?;
    assert_eq!(done.done, 3);
    for run in &exp.runs {
        let dir = results.path().join("llm").join(&run.id);
        let metrics = sdp::results::read_metrics(&dir.join("metrics.csv"))?;
        assert_eq!(metrics.metric, "nll", "{}", run.label);
        let last = metrics.rows.last().expect("an evaluation");
        // Uniform guessing is ln 16 = 2.77 nats; the map is learnt except at restarts (ln 16 / 9 = 0.31).
        ensure!(last.test_metric < 1.5, "{}: validation NLL {}", run.label, last.test_metric);
        if run.spec.method.kind.as_str() == "sdp" {
            let modes: Vec<&str> = last.modes.keys().map(String::as_str).collect();
            assert_eq!(modes, ["ensemble", "full", "scaled", "subnet_mean"], "{}", run.label);
        }
    }
    Ok(())
}

/// max |a − b| / max(1, max |b|).
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
    Ok(max_abs_diff(a, b)? / scale)
}

#[test]
fn the_fused_swiglu_and_cross_entropy_equal_their_compositions_forward_and_backward() -> Result<()> {
    use candle_core::Var;
    let dev = Device::Cpu;
    // SwiGLU on a (3, 5, 7) gate and up, through a weighted sum.
    let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 5, 7), &dev)?)?;
    let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 7), &dev)?)?;
    let r = Tensor::randn(0f32, 1.0, (3, 5, 7), &dev)?;
    let fused = sdp::ops::swiglu(g.as_tensor(), u.as_tensor())?;
    let composed = (g.as_tensor().silu()? * u.as_tensor())?;
    ensure!(rel_diff(&fused, &composed)? < 1e-6, "swiglu forward");
    let gf = (fused * &r)?.sum_all()?.backward()?;
    let gc = (composed * &r)?.sum_all()?.backward()?;
    for (name, v) in [("gate", &g), ("up", &u)] {
        let d = rel_diff(gf.get(v.as_tensor()).expect("fused grad"), gc.get(v.as_tensor()).expect("grad"))?;
        ensure!(d < 1e-5, "swiglu d{name}: {d}");
    }
    // Cross-entropy of (6, 11) logits.
    let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (6, 11), &dev)? + 50.0)?)?;
    let t = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &dev)?;
    let fused = sdp::ops::cross_entropy(x.as_tensor(), &t)?;
    let composed = candle_nn::loss::cross_entropy(x.as_tensor(), &t)?;
    ensure!(rel_diff(&fused, &composed)? < 1e-6, "cross entropy forward");
    let gf = (fused * 3.0)?.backward()?;
    let gc = (composed * 3.0)?.backward()?;
    let d = rel_diff(gf.get(x.as_tensor()).expect("fused grad"), gc.get(x.as_tensor()).expect("grad"))?;
    ensure!(d < 1e-5, "cross entropy dlogits: {d}");
    // A target outside the classes is an error naming it.
    let bad = sdp::ops::cross_entropy(x.as_tensor(), &Tensor::new(&[0u32, 11, 3, 3, 7, 1], &dev)?);
    let e = bad.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("target 11 is not a class id below 11"), "{e}");
    Ok(())
}
