//! Subnetwork data parallelism: equivalence with DP at full coverage, exact averaging among holders,
//! physical subnetworks that compute what the masked full model computes.

mod common;

use anyhow::Result;
use candle_core::{Device, Tensor};
use common::{run_options, tiny_with};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sdp::comm::{Averager, GroupedAverager, Layout, LocalAverager, Solo, SyncTensor};
use sdp::data::augment::{AugmentCfg, PadMode};
use sdp::data::examples::Examples;
use sdp::data::loader::TrainLoader;
use sdp::models::layers::Builder;
use sdp::models::resnet::{ResNet, ResNetConfig};
use sdp::models::{self, BlockPlan, Family, Net, UnitKind};
use sdp::optim::Optimizer;
use sdp::plan;
use sdp::spec::RunSpec;
use sdp::subnet::{self, IndexMap};
use sdp::train::{dp_step, sdp_step, SdpState};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};

/// The tiny experiment with two blocks in the first stage (something to drop), 96 images for one epoch,
/// Nesterov momentum, and SDP over three workers at full coverage.
static TINY: LazyLock<String> = LazyLock::new(|| {
    tiny_with(&[
        ("# tiny\nname = \"tiny\"\n", "# tiny\nname = \"tiny-sdp\"\n"),
        ("train_samples = 64", "train_samples = 96"),
        ("depths = [1, 1]\nepochs = 2", "depths = [2, 1]\nepochs = 1"),
        ("lr = 0.05\n", "lr = 0.05\nnesterov = true\n"),
        ("workers = 2\n", "kind = \"sdp\"\nworkers = 3\nmasking = \"block\"\ncoverage = 1.0\n"),
    ])
});

fn spec(sets: &[&str]) -> Result<RunSpec> {
    Ok(common::parse_with(&TINY, sets)?.runs.remove(0).spec)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// With C = 1, sync = params and SGD (momentum, Nesterov, weight decay), SDP takes exactly DP's steps,
/// BatchNorm statistics included.
#[test]
fn full_coverage_sdp_equals_dp() -> Result<()> {
    for masking in ["block", "neuron"] {
        let s = spec(&[&format!("method.masking={masking}")])?;
        let data = sdp::data::load(&s.workload, Path::new("datasets"))?;
        let aug = AugmentCfg { crop_pad: 2, pad_mode: PadMode::Zero, flip: true, mean: data.mean, std: data.std };
        let train = data.train.clone();
        let dev = Device::Cpu;

        let dp = models::build(&s.workload, 10, s.seed, &dev)?;
        let mut opt = Optimizer::new(&s.optim);
        for batches in TrainLoader::start(train.clone(), aug, s.seed, 1, 3, 8, 0)? {
            dp_step(dp.as_ref(), &mut opt, &batches, 0.05, &dev)?;
        }

        let mut st = SdpState::new(&s, 10, &dev)?;
        for (i, batches) in TrainLoader::start(train.clone(), aug, s.seed, 1, 3, 8, 0)?.enumerate() {
            sdp_step(&mut st, &batches, 0.05, i + 1)?;
        }
        let sdp_store = st.global.store();
        for (name, v) in dp.store().params.iter().chain(&dp.store().buffers) {
            let other = sdp_store.params.get(name).or_else(|| sdp_store.buffers.get(name));
            let other = other.ok_or_else(|| anyhow::anyhow!("{name} missing in SDP"))?;
            let d = max_diff(v.as_tensor(), other.as_tensor())?;
            assert!(d < 1e-5, "{masking}: {name} differs by {d}");
        }
    }
    Ok(())
}

/// Every averager of a one-process world (the in-process one, and the grouped one in both layouts)
/// equals a naive per-coordinate mean over the holders, on random masks.
#[test]
fn averaging_equals_naive_mean_over_holders() -> Result<()> {
    let make: [(&str, MakeAverager); 3] = [
        ("local", |_| Ok(Box::new(LocalAverager::new()))),
        ("grouped", |k| Ok(Box::new(GroupedAverager::new(std::rc::Rc::new(Solo), k, Layout::Grouped)?))),
        ("masked", |k| Ok(Box::new(GroupedAverager::new(std::rc::Rc::new(Solo), k, Layout::Masked)?))),
    ];
    for (what, make) in make {
        naive_mean_check(what, make)?;
    }
    Ok(())
}

/// An averager for K workers.
type MakeAverager = fn(usize) -> Result<Box<dyn Averager>>;

fn naive_mean_check(what: &str, make: MakeAverager) -> Result<()> {
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let dev = Device::Cpu;
    let shape = [6usize, 5, 3];
    let global: Vec<f32> = (0..90).map(|_| r.random()).collect();
    let global_t = Tensor::from_slice(&global, &shape[..], &dev)?;
    for trial in 0..20 {
        let workers = 1 + trial % 5;
        let mut maps = Vec::new();
        let mut locals = Vec::new();
        for _ in 0..workers {
            let axis = r.random_range(0..2usize);
            let idx: Vec<usize> = (0..shape[axis]).filter(|_| r.random_bool(0.6)).collect();
            if idx.is_empty() {
                continue;
            }
            let map = IndexMap::narrowed(&shape, axis, &idx);
            let n = map.local_len();
            let vals: Vec<f32> = (0..n).map(|_| r.random()).collect();
            locals.push(Tensor::from_slice(&vals, map.local_shape().as_slice(), &dev)?);
            maps.push(map);
        }
        let per_worker: Vec<BTreeMap<String, IndexMap>> =
            maps.iter().map(|m| BTreeMap::from([("p".to_string(), m.clone())])).collect();
        let mut av = make(per_worker.len())?;
        av.set_selection(&per_worker)?;
        let contributions = locals.iter().cloned().enumerate().collect();
        let sync = [SyncTensor { name: "p", global: global_t.clone(), contributions }];
        let got = av.average(&sync)?.remove(0).flatten_all()?.to_vec1::<f32>()?;
        // Naive: for each global coordinate, average the values of the locals that contain it.
        for i in 0..6 {
            for j in 0..5 {
                for k in 0..3 {
                    let (mut sum, mut cnt) = (0.0f32, 0);
                    for (m, t) in maps.iter().zip(&locals) {
                        let pos: Vec<Option<usize>> = [i, j, k]
                            .iter()
                            .zip(&m.axes)
                            .map(|(&g, a)| match a {
                                None => Some(g),
                                Some(ix) => ix.iter().position(|&x| x as usize == g),
                            })
                            .collect();
                        if let [Some(a), Some(b), Some(c)] = pos[..] {
                            sum += t.get(a)?.get(b)?.get(c)?.to_scalar::<f32>()?;
                            cnt += 1;
                        }
                    }
                    let want = if cnt == 0 { global[(i * 5 + j) * 3 + k] } else { sum / cnt as f32 };
                    let g = got[(i * 5 + j) * 3 + k];
                    assert!((g - want).abs() < 1e-6, "{what}, trial {trial} ({i},{j},{k}): {g} vs {want}");
                }
            }
        }
    }
    Ok(())
}

/// Each worker's parameter count is what its index maps say, and dropped blocks have no tensors.
#[test]
fn worker_parameters_match_their_index_maps() -> Result<()> {
    for (masking, coverage) in [("block", 0.5), ("neuron", 0.5), ("neuron", 0.75), ("random_block", 0.34)] {
        let s = spec(&[&format!("method.masking={masking}"), &format!("method.coverage={coverage}")])?;
        let st = SdpState::new(&s, 10, &Device::Cpu)?;
        let total = st.global.store().num_params();
        for w in &st.workers {
            let store = w.net.store();
            let from_maps: usize = store.params.keys().map(|n| w.maps[n].local_len()).sum();
            assert_eq!(store.num_params(), from_maps, "{masking}");
            if masking != "random_block" {
                // (random_block may by chance give one worker every block)
                assert!(store.num_params() < total, "{masking} C={coverage}: a worker holds everything");
            }
            for (n, v) in &store.params {
                assert_eq!(v.dims(), w.maps[n].local_shape().as_slice(), "{n}");
            }
        }
        // Every global coordinate is held by someone: the assembled model is fully trained.
        for name in st.global.store().params.keys() {
            assert!(st.workers.iter().any(|w| w.maps.contains_key(name)), "{name} held by nobody");
        }
    }
    Ok(())
}

fn tiny_cfg() -> ResNetConfig {
    ResNetConfig { widths: vec![4, 8], depths: vec![2, 1], num_classes: 10, batch_norm: true }
}

fn input(seed: u64) -> Result<Tensor> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..3 * 3 * 12 * 12).map(|_| r.random_range(-1.0..1.0)).collect();
    Ok(Tensor::from_vec(v, (3, 3, 12, 12), &Device::Cpu)?)
}

/// Values of a freshly initialised model, with random BN statistics so that eval mode is not trivial.
fn values(cfg: &ResNetConfig) -> Result<BTreeMap<String, Tensor>> {
    let full = ResNet::new(cfg, &cfg.full_plan(), Builder::from_seed(3, &Device::Cpu))?;
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let s = full.store();
    let mut out = BTreeMap::new();
    for (k, v) in s.params.iter().chain(&s.buffers) {
        let t = if k.ends_with("running_var") || k.ends_with("running_mean") || k.contains("bn") {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n).map(|_| r.random_range(0.5..1.5)).collect();
            Tensor::from_vec(vals, v.dims(), &Device::Cpu)?
        } else {
            v.as_tensor().copy()?
        };
        out.insert(k.clone(), t);
    }
    Ok(out)
}

fn subnet_of(cfg: &ResNetConfig, vals: &BTreeMap<String, Tensor>, keeps: &[BlockPlan]) -> Result<ResNet> {
    let shapes: BTreeMap<String, Vec<usize>> = vals.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    let maps = subnet::maps(cfg, &shapes, keeps);
    let local: BTreeMap<String, Tensor> =
        maps.iter().map(|(n, m)| Ok((n.clone(), m.gather(&vals[n])?))).collect::<Result<_>>()?;
    Ok(ResNet::new(cfg, keeps, Builder::from_tensors(&local, &Device::Cpu))?)
}

/// A worker without block b computes what the full model computes when b's residual branch outputs zero
/// (its last BN scale and shift set to 0), in eval and in train mode.
#[test]
fn dropped_block_equals_full_model_without_that_branch() -> Result<()> {
    let cfg = tiny_cfg();
    let vals = values(&cfg)?;
    let blocks = cfg.blocks();
    for drop in [1usize, 2] {
        // block 1 has an identity shortcut, block 2 (first of stage 2) a projection shortcut
        let keeps: Vec<BlockPlan> = blocks
            .iter()
            .enumerate()
            .map(|(b, s)| BlockPlan { residual: b != drop, ..BlockPlan::full(s.c_out) })
            .collect();
        let sub = subnet_of(&cfg, &vals, &keeps)?;
        let mut zeroed = vals.clone();
        for p in ["weight", "bias"] {
            let k = format!("{}.bn2.{p}", blocks[drop].name);
            zeroed.insert(k.clone(), vals[&k].zeros_like()?);
        }
        let full = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_tensors(&zeroed, &Device::Cpu))?;
        for train in [false, true] {
            let x = input(1)?;
            let d = max_diff(&sub.forward_t(&x, train)?, &full.forward_t(&x, train)?)?;
            assert!(d < 1e-5, "drop block {drop}, train={train}: {d}");
        }
        assert!(sub.store().num_params() < full.store().num_params());
    }
    Ok(())
}

/// Narrowing a block to some internal channels equals zeroing the other channels in the full model.
#[test]
fn neuron_narrowing_equals_zeroing_channels() -> Result<()> {
    let cfg = tiny_cfg();
    let vals = values(&cfg)?;
    let blocks = cfg.blocks();
    let kept: Vec<Vec<usize>> = vec![vec![0, 2], vec![1, 2, 3], vec![0, 3, 4, 7]];
    let keeps: Vec<BlockPlan> = kept.iter().map(|c| BlockPlan { channels: c.clone(), ..BlockPlan::full(0) }).collect();
    let sub = subnet_of(&cfg, &vals, &keeps)?;
    let mut zeroed = vals.clone();
    for (b, s) in blocks.iter().enumerate() {
        let mask: Vec<f32> = (0..s.c_out).map(|c| if kept[b].contains(&c) { 1.0 } else { 0.0 }).collect();
        let mask = Tensor::new(mask.as_slice(), &Device::Cpu)?;
        for p in ["bn1.weight", "bn1.bias"] {
            let k = format!("{}.{p}", s.name);
            zeroed.insert(k.clone(), (&vals[&k] * &mask)?);
        }
        let k = format!("{}.conv1.weight", s.name);
        zeroed.insert(k.clone(), vals[&k].broadcast_mul(&mask.reshape((s.c_out, 1, 1, 1))?)?);
    }
    let full = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_tensors(&zeroed, &Device::Cpu))?;
    for train in [false, true] {
        let x = input(2)?;
        let d = max_diff(&sub.forward_t(&x, train)?, &full.forward_t(&x, train)?)?;
        assert!(d < 1e-5, "train={train}: {d}");
    }
    Ok(())
}

/// Units listed by the model: block units own whole branches; neuron units own everything of a branch
/// but its last BatchNorm (which is per output channel, not per internal channel).
#[test]
fn resnet_units_account_for_branch_parameters() -> Result<()> {
    let cfg = tiny_cfg();
    let blocks: usize = cfg.units(UnitKind::Block).iter().map(|u| u.params).sum();
    let neurons: usize = cfg.units(UnitKind::Neuron).iter().map(|u| u.params).sum();
    let full = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_seed(0, &Device::Cpu))?;
    let branch: usize = full
        .store()
        .params
        .iter()
        .filter(|(k, _)| k.starts_with("layer") && !k.contains("shortcut"))
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(blocks, branch);
    let bn2: usize = cfg.blocks().iter().map(|b| 2 * b.c_out).sum();
    assert_eq!(neurons, branch - bn2);
    Ok(())
}

/// A CPU run records workers.csv with every worker's measured peak memory (from `sdp memprobe` in a fresh
/// process), its achieved parameter fraction and its communication, and the spectral gap in the manifest.
#[test]
fn sdp_run_records_measured_memory_and_communication() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sets: Vec<String> = ["method.coverage=0.5", "method.masking=neuron", "workload.train_samples=48"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let exp = plan::parse(&TINY, Path::new("tiny.toml"), &sets)?;
    let opts = sdp::runner::RunOptions { memprobe: Some(env!("CARGO_BIN_EXE_sdp").into()), ..run_options(dir.path()) };
    assert_eq!(sdp::runner::run_all(std::slice::from_ref(&exp), &opts)?.done, 1);
    let run_dir = dir.path().join("tiny-sdp").join(&exp.runs[0].id);
    let mut r = csv::Reader::from_path(run_dir.join("workers.csv"))?;
    let rows: Vec<BTreeMap<String, String>> = r.deserialize().collect::<std::result::Result<_, _>>()?;
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let frac: f64 = row["param_fraction"].parse()?;
        assert!(frac > 0.3 && frac < 0.9, "{frac}");
        let peak: u64 = row["peak_bytes_measured"].parse()?;
        assert!(peak > 100_000, "peak {peak}");
        let grouped: f64 = row["comm_bytes_per_step"].parse()?;
        let masked: f64 = row["comm_bytes_per_step_masked"].parse()?;
        assert!(grouped > 0.0 && grouped < masked, "{grouped} vs {masked}");
    }
    let m = sdp::results::Manifest::read(&run_dir.join("manifest.json"))?;
    assert!(m.extra.contains_key("spectral_gap"));
    assert_eq!(m.extra["holders_m"], 2);
    Ok(())
}

#[test]
fn memprobe_rejects_a_bad_worker() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("s.toml");
    std::fs::write(&path, TINY.replace("coverage = 1.0", "coverage = 0.5"))?;
    let run = |w: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdp"))
            .args(["memprobe"])
            .arg(&path)
            .args(["--worker", w])
            .output()
    };
    let out = run("x")?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--worker `x`: expected an index or `full`"));
    let out = run("7")?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("worker 7 does not exist: the spec has 3 workers"));
    let out = run("1")?;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("peak_bytes="));
    Ok(())
}

/// Trains DP and SDP (spec `s`, three workers of batch 8) side by side over the first `steps` steps of
/// epoch 1 (`None`: the whole epoch) and checks that they end with the same parameters.
fn same_as_dp(s: &RunSpec, train: &Arc<dyn Examples>, aug: AugmentCfg, steps: Option<usize>) -> Result<()> {
    let dev = Device::Cpu;
    let dp = models::build(&s.workload, 10, s.seed, &dev)?;
    let mut opt = Optimizer::new(&s.optim);
    let mut st = SdpState::new(s, 10, &dev)?;
    let loader = TrainLoader::start(train.clone(), aug, s.seed, 1, 3, 8, 0)?;
    for (i, batches) in loader.take(steps.unwrap_or(usize::MAX)).enumerate() {
        dp_step(dp.as_ref(), &mut opt, &batches, 0.05, &dev)?;
        sdp_step(&mut st, &batches, 0.05, i + 1)?;
    }
    for (name, v) in &dp.store().params {
        let d = max_diff(v.as_tensor(), st.global.store().params[name].as_tensor())?;
        assert!(d < 1e-5, "{name} differs by {d}");
    }
    Ok(())
}

/// Backward regime: at C = 1 it is DP too; below, a worker's step changes exactly its held coordinates.
#[test]
fn backward_regime_trains_only_held_coordinates() -> Result<()> {
    let s = spec(&["method.regime=backward"])?;
    let data = sdp::data::load(&s.workload, Path::new("datasets"))?;
    let aug = AugmentCfg { crop_pad: 2, pad_mode: PadMode::Zero, flip: true, mean: data.mean, std: data.std };
    let train = data.train.clone();
    let dev = Device::Cpu;
    same_as_dp(&s, &train, aug, None)?;

    for masking in ["block", "neuron"] {
        let s = spec(&["method.regime=backward", "method.coverage=0.34", &format!("method.masking={masking}")])?;
        // sync_every = 2: after one step the workers have stepped locally but not averaged yet.
        let s2 = RunSpec { method: sdp::spec::Method { sync_every: 2, ..s.method.clone() }, ..s.clone() };
        let mut st = SdpState::new(&s2, 10, &dev)?;
        let before = st.global.store().param_tensors();
        let batches = TrainLoader::start(train.clone(), aug, s.seed, 1, 3, 8, 0)?.next().unwrap_or_default();
        sdp_step(&mut st, &batches, 0.05, 1)?;
        for w in &st.workers {
            let mut moved = 0.0;
            assert_eq!(w.net.store().num_params(), st.global.store().num_params(), "a full model per worker");
            for (name, var) in &w.net.store().params {
                let old = &before[name];
                let changed = (var.as_tensor() - old)?.abs()?.gt(0f64)?.to_dtype(candle_core::DType::F32)?;
                let held = match w.maps.get(name) {
                    Some(map) => map.scatter(&map.gather(old)?.ones_like()?)?,
                    None => old.zeros_like()?,
                };
                // Changed ⇒ held (held coordinates may stay put only by accident: not checked).
                let bad =
                    (&changed - &held)?.gt(0f64)?.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()?;
                assert_eq!(bad, 0.0, "{masking}: {name}: non-held coordinates changed");
                moved += changed.sum_all()?.to_scalar::<f32>()?;
            }
            assert!(moved > 100.0, "{masking}: the worker's step changed only {moved} coordinates");
        }
    }
    Ok(())
}

/// The baselines: at coverage 1 stochastic depth and dropout drop nothing and equal DP; the small dense
/// model is narrowed to about an SDP worker's parameter count; every baseline trains end to end.
#[test]
fn baselines_reduce_to_dp_at_full_coverage_and_run() -> Result<()> {
    use sdp::train::small_dense_widths;
    let cfg = ResNetConfig::resnet18(10);
    let full = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_seed(0, &Device::Cpu))?.store().num_params();
    let narrow = small_dense_widths(&cfg, 0.5);
    assert!(narrow.iter().zip(&cfg.widths).all(|(n, w)| n < w), "{narrow:?}");
    let small = ResNetConfig { widths: narrow, ..cfg.clone() };
    let p = ResNet::new(&small, &small.full_plan(), Builder::from_seed(0, &Device::Cpu))?.store().num_params();
    let units: usize = cfg.units(UnitKind::Block).iter().map(|u| u.params).sum();
    let target = full - units / 2;
    assert!(p <= target && p as f64 > 0.97 * target as f64, "{p} vs target {target}");

    let dir = tempfile::tempdir()?;
    let opts = run_options(dir.path());
    let losses = |kind: &str, coverage: &str| -> Result<String> {
        let sets = [format!("method.kind={kind}"), format!("method.coverage={coverage}")];
        let exp = plan::parse(&TINY, Path::new("tiny.toml"), &sets)?;
        assert_eq!(sdp::runner::run_all(std::slice::from_ref(&exp), &opts)?.done, 1, "{kind}");
        let run_dir = dir.path().join("tiny-sdp").join(&exp.runs[0].id);
        assert!(run_dir.join("workers.csv").is_file());
        let mut r = csv::Reader::from_path(run_dir.join("metrics.csv"))?;
        let rows: Vec<BTreeMap<String, String>> = r.deserialize().collect::<std::result::Result<_, _>>()?;
        Ok(rows[0]["test_loss"].clone())
    };
    let dp = losses("dp", "1.0")?;
    assert_eq!(losses("stochastic_depth", "1.0")?, dp);
    assert_eq!(losses("dropout", "1.0")?, dp);
    for kind in ["stochastic_depth", "dropout", "small_dense"] {
        assert_ne!(losses(kind, "0.5")?, dp, "{kind} at C = 0.5 should train differently from DP");
    }
    Ok(())
}

/// alignment.csv: at C = 1 a worker's gradient is the full model's (cosine 1); below 1 it is not.
#[test]
fn gradient_alignment_is_one_at_full_coverage_only() -> Result<()> {
    let dev = Device::Cpu;
    for (coverage, masking) in [("1.0", "block"), ("0.34", "block"), ("0.5", "neuron")] {
        let s = spec(&[
            &format!("method.coverage={coverage}"),
            &format!("method.masking={masking}"),
            "method.align_every=2",
        ])?;
        let data = sdp::data::load(&s.workload, Path::new("datasets"))?;
        let aug = AugmentCfg { crop_pad: 2, pad_mode: PadMode::Zero, flip: true, mean: data.mean, std: data.std };
        let mut st = SdpState::new(&s, 10, &dev)?;
        for (i, batches) in TrainLoader::start(data.train.clone(), aug, s.seed, 1, 3, 8, 0)?.enumerate() {
            sdp_step(&mut st, &batches, 0.05, i + 1)?;
        }
        assert_eq!(st.alignment.len(), 3 * 2, "4 steps, aligned at steps 2 and 4, 3 workers");
        for a in &st.alignment {
            let c = a.cosine_to_full_grad;
            if coverage == "1.0" {
                assert!((c - 1.0).abs() < 1e-4, "C=1: cosine {c}");
            } else {
                assert!(c < 0.9999 && c > -1.0, "{masking} C={coverage}: cosine {c}");
            }
        }
    }
    Ok(())
}

/// SDP works on swin_t too: C = 1 equals DP; at C = 0.5 workers hold physically smaller subnetworks
/// (block masking drops whole Swin blocks, neuron masking narrows their MLPs).
#[test]
fn sdp_on_a_tiny_swin() -> Result<()> {
    let dev = Device::Cpu;
    let base = ["workload.model=swin_t", "workload.widths=[8, 16]", "workload.depths=[2, 2]", "optim.nesterov=false"];
    let with = |extra: &[&str]| -> Result<RunSpec> {
        let all: Vec<&str> = base.iter().chain(extra).copied().collect();
        spec(&all)
    };
    let s = with(&[])?;
    let data = sdp::data::load(&s.workload, Path::new("datasets"))?;
    let aug = AugmentCfg { crop_pad: 2, pad_mode: PadMode::Zero, flip: true, mean: data.mean, std: data.std };
    let train = data.train.clone();
    same_as_dp(&s, &train, aug, Some(2))?;
    for masking in ["block", "neuron"] {
        let s = with(&["method.coverage=0.5", &format!("method.masking={masking}")])?;
        let mut st = SdpState::new(&s, 10, &dev)?;
        let total = st.global.store().num_params();
        for w in &st.workers {
            let n = w.net.store().num_params();
            assert!(n < total, "{masking}: {n} of {total}");
            let from_maps: usize = w.net.store().params.keys().map(|k| w.maps[k].local_len()).sum();
            assert_eq!(n, from_maps);
        }
        let batches = TrainLoader::start(train.clone(), aug, s.seed, 1, 3, 8, 0)?.next().unwrap_or_default();
        let loss = sdp_step(&mut st, &batches, 0.05, 1)?;
        assert!(loss.is_finite());
    }
    Ok(())
}

/// `rescale`: a no-op at C = 1; at C = 0.5 a block-masked worker's held branches are scaled by K/m = 2 and
/// a neuron-masked worker's internal activations by n_b / kept_b in training.
#[test]
fn rescale_scales_kept_activations_by_the_inverse_keep() -> Result<()> {
    let dev = Device::Cpu;
    let x = input(4)?;
    let worker_out = |sets: &[&str]| -> Result<Vec<Tensor>> {
        let st = SdpState::new(&spec(sets)?, 10, &dev)?;
        st.workers.iter().map(|w| Ok(w.net.forward_t(&x, false)?)).collect()
    };
    // C = 1: nothing kept is dropped, so nothing is rescaled.
    let (a, b) = (worker_out(&["method.rescale=true"])?, worker_out(&[])?);
    assert!(max_diff(&a[0], &b[0])? == 0.0);
    for masking in ["block", "neuron"] {
        let sets = ["method.coverage=0.67", &format!("method.masking={masking}")];
        let plain = worker_out(&sets)?;
        let scaled = worker_out(&[sets[0], sets[1], "method.rescale=true"])?;
        assert!(max_diff(&plain[0], &scaled[0])? > 1e-4, "{masking}: rescale changed nothing");
        // Rebuild worker 0 by hand with the expected factors and compare.
        let s = spec(&sets)?;
        let st = SdpState::new(&s, 10, &dev)?;
        let family = models::of(&s.workload, 10)?;
        let widths = family.block_widths();
        let keeps = subnet::plans(&widths, &st.units, &st.selection.holds);
        let factors: Vec<(f64, f64)> = keeps[0]
            .iter()
            .zip(&widths)
            .map(
                |(k, &n)| if masking == "block" { (3.0 / 2.0, 1.0) } else { (1.0, n as f64 / k.channels.len() as f64) },
            )
            .collect();
        let plan: Vec<BlockPlan> = keeps[0]
            .iter()
            .zip(&factors)
            .map(|(k, &(scale, mid_scale))| BlockPlan { scale, mid_scale, ..k.clone() })
            .collect();
        let by_hand = family.build(&plan, Builder::from_tensors(&st.workers[0].net.store().values(), &dev))?;
        let d = max_diff(&by_hand.forward_t(&x, false)?, &scaled[0])?;
        assert!(d < 1e-5, "{masking}: {d}");
    }
    Ok(())
}

/// A process that hosts some of the K workers (rank r of N hosts k ≡ r mod N) scales the `scaled`
/// evaluation mode's model by m/K, as the one-process simulation does: not by m over the workers it hosts
/// (which made `scaled` silently equal `full` once N·C ≥ 1).
#[test]
fn the_holder_fraction_counts_every_worker_not_the_hosted_ones() -> Result<()> {
    use sdp::comm::{Collective, World};
    /// Rank `0` of 4: enough of a world to host workers (no collective is called while building).
    struct RankOfFour(usize);
    impl Collective for RankOfFour {
        fn rank(&self) -> usize {
            self.0
        }
        fn size(&self) -> usize {
            4
        }
        fn prepare(&self, _: &[u64]) -> Result<()> {
            Ok(())
        }
        fn all_reduce_sum(&self, _: u64, _: &mut [f32]) -> Result<()> {
            anyhow::bail!("not in this test")
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
            anyhow::bail!("not in this test")
        }
        fn broadcast(&self, _: usize, _: &mut Vec<u8>) -> Result<()> {
            anyhow::bail!("not in this test")
        }
        fn describe(&self) -> String {
            "rank of four".into()
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort {code}")
        }
    }
    let text = tiny_with(&[("[method]\nworkers = 2\n", "[method]\nkind = \"sdp\"\nworkers = 4\ncoverage = 0.5\n")]);
    let spec = common::parse_with(&text, &[])?.runs.remove(0).spec;
    let plan = plan::Plan::of(&spec)?;
    let solo = SdpState::hosted(&spec, &plan, 4, &Device::Cpu, &World::solo())?;
    assert_eq!((solo.workers.len(), solo.holder_fraction()), (4, 0.5));
    for rank in 0..4 {
        let world = World { comm: std::rc::Rc::new(RankOfFour(rank)), local_rank: 0 };
        let st = SdpState::hosted(&spec, &plan, 4, &Device::Cpu, &world)?;
        assert_eq!(st.workers.iter().map(|w| w.index).collect::<Vec<_>>(), [rank]);
        assert_eq!(st.holder_fraction(), 0.5, "rank {rank} of 4");
    }
    Ok(())
}
