//! The DP baselines (`small_dense`, `stochastic_depth`, `dropout`) through the model-family abstraction: the
//! families' parameter formulas, per-step drops that compute what the matching subnetwork computes, the
//! baselines training a tiny Swin, and the spec error for a family that supports none of them.

mod common;

use common::family::small;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use common::{check_contains, err_text, run_options, tiny_with};
use sdp::models::{self, BlockDrop, BlockPlan, Builder, Family, MaskableBlock, ModelArgs, Net, ParamGroup};
use sdp::subnet;
use sdp::train::{baseline_family, small_dense_widths};
use std::collections::BTreeMap;
use std::sync::Once;

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// A family's parameter formula agrees with the model it builds, at its own and at narrowed widths, and
/// `with_widths` gives what the registry makes of `workload.widths`.
#[test]
fn param_counts_match_the_built_models() -> Result<()> {
    for name in ["resnet", "swin_t"] {
        for bn in [true, false] {
            let args = ModelArgs { batch_norm: bn, ..small(5) };
            let family = models::family(name, &args)?;
            for widths in [vec![8, 16], vec![3, 5], vec![1, 1]] {
                let narrow = family.with_widths(&widths)?;
                let by_name = models::family(name, &ModelArgs { widths: Some(widths.clone()), ..args.clone() })?;
                ensure!(narrow.stages() == by_name.stages() && narrow.maskable() == by_name.maskable(), "{name}");
                let built = narrow.build_full(1.0, Builder::from_seed(0, &Device::Cpu))?.store().num_params();
                ensure!(narrow.param_count()? == built, "{name} {widths:?} bn={bn}: formula vs {built}");
            }
        }
    }
    Ok(())
}

/// Per-step drops compute what the matching subnetwork computes: a skipped block is the plan without its
/// Block unit; a channel mask of 0 and 1/keep is the plan holding the kept Neuron units with `mid_scale`
/// 1/keep. No drops, and an all-ones mask, are the plain forward pass.
#[test]
fn drops_equal_the_matching_subnetworks() -> Result<()> {
    let dev = Device::Cpu;
    let xs = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
    for name in ["resnet", "swin_t"] {
        let family = models::family(name, &small(4))?;
        ensure!(family.drops(), "{name}");
        let full = family.build_full(1.0, Builder::from_seed(3, &dev))?;
        let values = full.store().values();
        let sub = |plan: &[BlockPlan]| -> Result<Box<dyn Net>> {
            let maps = subnet::maps(family.as_ref(), &subnet::shapes(full.store()), plan);
            let local: BTreeMap<String, Tensor> =
                maps.iter().map(|(n, m)| Ok((n.clone(), m.gather(&values[n])?))).collect::<Result<_>>()?;
            Ok(family.build(plan, Builder::from_tensors(&local, &dev))?)
        };
        let plain = full.forward_t(&xs, false)?;
        ensure!(max_diff(&full.forward_dropping(&xs, false, &[])?, &plain)? == 0.0, "{name}: no drops");
        let widths = family.block_widths();
        let ones: Vec<BlockDrop> = widths
            .iter()
            .map(|&w| Ok(BlockDrop { skip: false, channels: Some(Tensor::ones(w, candle_core::DType::F32, &dev)?) }))
            .collect::<Result<_>>()?;
        ensure!(max_diff(&full.forward_dropping(&xs, false, &ones)?, &plain)? == 0.0, "{name}: all-ones mask");

        // Skip block 1.
        let mut drops = vec![BlockDrop::default(); widths.len()];
        drops[1].skip = true;
        let mut plan = family.full_plan();
        plan[1].residual = false;
        let d = max_diff(&full.forward_dropping(&xs, false, &drops)?, &sub(&plan)?.forward_t(&xs, false)?)?;
        ensure!(d < 1e-5, "{name}: skip vs plan: {d}");
        ensure!(max_diff(&full.forward_dropping(&xs, false, &drops)?, &plain)? > 1e-4, "{name}: skip changed nothing");

        // Keep the odd channels of every block, scaled by 2.
        let drops: Vec<BlockDrop> = widths
            .iter()
            .map(|&w| {
                let m: Vec<f32> = (0..w).map(|c| if c % 2 == 1 { 2.0 } else { 0.0 }).collect();
                Ok(BlockDrop { skip: false, channels: Some(Tensor::new(m.as_slice(), &dev)?) })
            })
            .collect::<Result<_>>()?;
        let plan: Vec<BlockPlan> = family
            .full_plan()
            .into_iter()
            .map(|p| BlockPlan {
                channels: p.channels.into_iter().filter(|c| c % 2 == 1).collect(),
                mid_scale: 2.0,
                ..p
            })
            .collect();
        let d = max_diff(&full.forward_dropping(&xs, false, &drops)?, &sub(&plan)?.forward_t(&xs, false)?)?;
        ensure!(d < 1e-5, "{name}: channel mask vs plan: {d}");
    }
    Ok(())
}

/// The tiny experiment on a Swin of two stages (widths 8, 16; two blocks each).
fn tiny_swin(kinds: &str) -> String {
    tiny_with(&[
        ("# tiny\nname = \"tiny\"\n", "# tiny\nname = \"tiny-swin\"\n"),
        (
            "model = \"resnet\"\nwidths = [4, 8]\ndepths = [1, 1]",
            "model = \"swin_t\"\nwidths = [8, 16]\ndepths = [2, 2]",
        ),
        ("workers = 2\n", &format!("kind = {kinds}\nworkers = 2\n")),
    ])
}

/// Every baseline trains a tiny Swin: at C = 1 stochastic depth and dropout drop nothing and equal DP, at
/// C = 0.5 they train differently; small_dense trains the same family narrowed to about an SDP worker's
/// parameter count and records its widths.
#[test]
fn baselines_train_a_tiny_swin() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = run_options(dir.path());
    let text = tiny_swin("[\"dp\", \"stochastic_depth\", \"dropout\", \"small_dense\"]");
    let run = |coverage: &str| -> Result<BTreeMap<String, (String, serde_json::Value)>> {
        let exp = common::parse_with(&text, &[&format!("method.coverage={coverage}")])?;
        // DP ignores the coverage: its run from C = 1 is reused at C = 0.5.
        sdp::runner::run_all(std::slice::from_ref(&exp), &opts)?;
        let mut out = BTreeMap::new();
        for r in &exp.runs {
            let run_dir = dir.path().join("tiny-swin").join(&r.id);
            let mut csv = csv::Reader::from_path(run_dir.join("metrics.csv"))?;
            let rows: Vec<BTreeMap<String, String>> = csv.deserialize().collect::<std::result::Result<_, _>>()?;
            let loss = rows.last().map(|r| r["test_loss"].clone()).unwrap_or_default();
            ensure!(loss.parse::<f64>()?.is_finite(), "{}: test loss {loss}", r.spec.method.kind);
            let manifest: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json"))?)?;
            out.insert(r.spec.method.kind.to_string(), (loss, manifest));
        }
        Ok(out)
    };
    let full = run("1.0")?;
    let dp = &full["dp"].0;
    ensure!(&full["stochastic_depth"].0 == dp && &full["dropout"].0 == dp, "C = 1: {full:?}");
    let half = run("0.5")?;
    for kind in ["stochastic_depth", "dropout", "small_dense"] {
        ensure!(&half[kind].0 != dp, "{kind} at C = 0.5 should train differently from DP");
    }
    let widths = half["small_dense"].1.to_string();
    ensure!(widths.contains("\"widths\":["), "small_dense manifest records no widths: {widths}");

    // The narrowed Swin: every stage narrower, at most (and close to) an SDP worker's parameter count.
    let exp = common::parse_with(&text, &["method.coverage=0.5", "method.kind=small_dense"])?;
    let spec = &exp.runs[0].spec;
    let family = models::of(&spec.workload, 4)?;
    let narrow = baseline_family(spec, 4)?;
    ensure!(narrow.stages().0 == small_dense_widths(family.as_ref(), 0.5), "{:?}", narrow.stages());
    ensure!(narrow.stages().0.iter().zip(&family.stages().0).all(|(n, w)| n < w), "{:?}", narrow.stages());
    let blocks: usize = family.maskable().iter().map(|b| b.params).sum();
    let target = (family.param_count()? - blocks / 2) as f64;
    let p = narrow.param_count()? as f64;
    ensure!(p <= target && p > 0.8 * target, "{p} vs target {target}");
    Ok(())
}

/// The small ResNet family without the baselines' capabilities (no narrowing, no per-step drops), as a
/// family defined outside the crate may be.
struct Plain(Box<dyn Family>);

impl Family for Plain {
    fn maskable(&self) -> Vec<MaskableBlock> {
        self.0.maskable()
    }
    fn build(&self, plan: &[BlockPlan], b: Builder) -> candle_core::Result<Box<dyn Net>> {
        self.0.build(plan, b)
    }
    fn narrowed(&self) -> &'static [(&'static str, usize)] {
        self.0.narrowed()
    }
    fn shared(&self) -> &'static [&'static str] {
        self.0.shared()
    }
    fn param_groups(&self) -> Vec<ParamGroup> {
        self.0.param_groups()
    }
    fn stages(&self) -> (Vec<usize>, Vec<usize>) {
        self.0.stages()
    }
}

fn plain(a: &ModelArgs) -> Result<Box<dyn Family>> {
    Ok(Box::new(Plain(models::family("resnet", a)?)))
}

/// A family without narrowing or per-step drops: the baselines are spec errors naming `method.kind` and
/// the model; DP still runs; the default parameter count counts a built model.
#[test]
fn baselines_a_family_lacks_are_spec_errors() -> Result<()> {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| models::register("test_plain", plain).expect("registering test_plain"));
    let text = tiny_with(&[("model = \"resnet\"", "model = \"test_plain\"")]);
    common::parse_with(&text, &[])?;
    for kind in ["small_dense", "stochastic_depth", "dropout"] {
        let e = err_text(common::parse_with(&text, &[&format!("method.kind={kind}"), "method.coverage=0.5"]));
        check_contains(&e, &["method.kind", kind, "workload.model = \"test_plain\""])?;
    }
    let family = models::family("test_plain", &small(3))?;
    let built = family.build_full(1.0, Builder::from_seed(0, &Device::Cpu))?.store().num_params();
    ensure!(family.param_count()? == built && built == models::family("resnet", &small(3))?.param_count()?);
    Ok(())
}

/// The memory probe trains each baseline's own network: `small_dense` its narrowed model (the probe holds
/// exactly the parameters training holds, fewer than the full model's), the dropping baselines the full
/// model with their drops, DP the full model.
#[test]
fn the_memory_probe_trains_each_baselines_own_network() -> Result<()> {
    let spec_of = |kind: &str| -> Result<sdp::spec::RunSpec> {
        let text = format!(
            "name = \"probe\"\nseed = 1\n[workload]\ndataset = \"shapes\"\nmodel = \"resnet\"\nwidths = [8, 16]\n\
             depths = [1, 2]\nepochs = 1\nbatch_size = 4\n[method]\nkind = \"{kind}\"\ncoverage = 0.5\n"
        );
        Ok(sdp::plan::parse(&text, std::path::Path::new("probe.toml"), &[])?.runs.remove(0).spec)
    };
    let dir = tempfile::tempdir()?;
    let probe = |kind: &str| sdp::memprobe::probe(&spec_of(kind)?, None, 1, &Device::Cpu, dir.path());
    let full = probe("dp")?.params;
    let spec = spec_of("small_dense")?;
    let classes = sdp::plan::Plan::of(&spec)?.data.shape(&spec.workload, dir.path())?.classes;
    let trained = sdp::train::baseline_net(&spec, baseline_family(&spec, classes)?.as_ref(), &Device::Cpu)?;
    let small = probe("small_dense")?.params;
    ensure!(small == trained.store().num_params(), "probe {small} params, training {}", trained.store().num_params());
    ensure!(small < full, "small_dense probed {small} params, the full model has {full}");
    for kind in ["stochastic_depth", "dropout"] {
        ensure!(probe(kind)?.params == full, "{kind} trains the full model");
    }
    Ok(())
}
