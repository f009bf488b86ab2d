//! A model family defined outside the crate, as a user would add one: one type implementing
//! `models::Family` (here a residual MLP, ~80 lines) and one `models::register` call. Specs then name it,
//! and DP and SDP (block and neuron masking) train it with no other change.

mod common;

use anyhow::Result;
use candle_core::{Device, Tensor};
use sdp::models::layers::{Init, Linear};
use sdp::models::{self, BlockPlan, Builder, Family, MaskableBlock, ModelArgs, Net, ParamGroup, ParamStore};
use sdp::progress::Quiet;
use sdp::train;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Once};

/// Residual MLP on flattened images: stem (3·32·32 → d), `blocks` × (x + fc2(relu(fc1(x)))) with `hidden`
/// internal units (the Neuron units), head (d → classes).
struct Mlp {
    d: usize,
    hidden: usize,
    blocks: usize,
    classes: usize,
}

fn mlp(a: &ModelArgs) -> Result<Box<dyn Family>> {
    let d = a.widths.as_ref().and_then(|w| w.first().copied()).unwrap_or(16);
    let blocks = a.depths.as_ref().and_then(|w| w.first().copied()).unwrap_or(4);
    Ok(Box::new(Mlp { d, hidden: 2 * d, blocks, classes: a.num_classes }))
}

struct MlpNet {
    stem: Linear,
    /// Per block: fc1, fc2 and the plan's scales, or `None` where the plan drops the branch.
    blocks: Vec<Option<(Linear, Linear, f64, f64)>>,
    head: Linear,
    store: ParamStore,
}

impl Net for MlpNet {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let mut x = self.stem.forward(&xs.flatten_from(1)?)?.relu()?;
        for (fc1, fc2, mid, scale) in self.blocks.iter().flatten() {
            let h = (fc1.forward(&x)?.relu()? * *mid)?;
            x = (x + (fc2.forward(&h)? * *scale)?)?;
        }
        self.head.forward(&x)
    }
    fn store(&self) -> &ParamStore {
        &self.store
    }
}

impl Family for Mlp {
    fn maskable(&self) -> Vec<MaskableBlock> {
        let (d, h) = (self.d, self.hidden);
        (0..self.blocks)
            .map(|i| MaskableBlock {
                name: format!("blocks.{i}"),
                width: h,
                params: h * (2 * d + 1),
                act_elems: 2 * h,
                neuron_params: 2 * d + 1,
                neuron_act_elems: 2,
            })
            .collect()
    }

    fn build(&self, plan: &[BlockPlan], mut b: Builder) -> candle_core::Result<Box<dyn Net>> {
        let stem = Linear::new(&mut b, "stem", 3 * 32 * 32, self.d, true)?;
        let mut blocks = Vec::new();
        for (i, p) in plan.iter().enumerate() {
            blocks.push(if p.residual {
                let k = p.channels.len();
                let fc1 = Linear::new(&mut b, &format!("blocks.{i}.fc1"), self.d, k, true)?;
                let w =
                    b.param(&format!("blocks.{i}.fc2.weight"), &[self.d, k], Init::Uniform { fan_in: self.hidden })?;
                Some((fc1, Linear { weight: w, bias: None }, p.mid_scale, p.scale))
            } else {
                None
            });
        }
        let head = Linear::new(&mut b, "head", self.d, self.classes, true)?;
        Ok(Box::new(MlpNet { stem, blocks, head, store: b.store }))
    }

    fn narrowed(&self) -> &'static [(&'static str, usize)] {
        &[("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]
    }

    fn shared(&self) -> &'static [&'static str] {
        &[]
    }

    fn param_groups(&self) -> Vec<ParamGroup> {
        let mut groups = vec![("stem".to_string(), vec!["stem.".to_string()], false)];
        groups.extend((0..self.blocks).map(|i| (format!("blocks.{i}"), vec![format!("blocks.{i}.")], true)));
        groups.push(("head".into(), vec!["head.".into()], false));
        groups
    }

    fn stages(&self) -> (Vec<usize>, Vec<usize>) {
        (vec![self.d], vec![self.blocks])
    }
}

fn register_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| models::register("test_mlp", mlp).expect("registering test_mlp"));
}

#[test]
fn a_registered_family_trains_under_dp_and_sdp() -> Result<()> {
    register_once();
    assert!(models::names().contains(&"test_mlp"));
    // The invariants every built-in family is held to (tests/families.rs).
    common::family::check_family("test_mlp")?;
    let text = common::tiny_with(&[
        ("model = \"resnet\"\nwidths = [4, 8]\ndepths = [1, 1]", "model = \"test_mlp\"\nwidths = [16]\ndepths = [4]"),
        (
            "[method]\nworkers = 2\n",
            "[method]\nkind = [\"dp\", \"sdp\"]\nworkers = 2\nmasking = [\"block\", \"neuron\"]\ncoverage = 0.5\n",
        ),
    ]);
    let exp = common::parse_with(&text, &[])?;
    assert_eq!(exp.runs.len(), 3, "DP, SDP block, SDP neuron");
    let data = sdp::data::load(&exp.runs[0].spec.workload, std::path::Path::new("datasets"))?;
    for run in &exp.runs {
        let mut quiet = Quiet { stop: Arc::new(AtomicBool::new(false)) };
        let fin = train::train(&run.spec, &data, &Device::Cpu, &mut quiet)?;
        assert!(fin.train_loss.is_finite() && fin.test_metric >= 0.0, "{}: {fin:?}", run.label);
    }
    Ok(())
}

#[test]
fn a_taken_name_cannot_be_registered_again() {
    register_once();
    for name in ["resnet18", "test_mlp"] {
        let e = models::register(name, mlp).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&format!("`{name}` is registered already")), "{e}");
    }
}
