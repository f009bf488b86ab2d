//! A residual MLP model family written outside the crate, as a user would write one: one type implementing
//! `models::Family`. `tests/custom_family.rs` registers it on flattened images and `tests/custom_workload.rs`
//! on token sequences (an embedding stem, a head at every position).

use anyhow::Result;
use candle_core::{Tensor, Var};
use sdp::models::layers::{Init, Linear};
use sdp::models::{BlockPlan, Builder, Family, MaskableBlock, ModelArgs, Net, ParamGroup, ParamStore};

/// What the first layer reads.
#[derive(Clone, Copy)]
pub enum Stem {
    /// Inputs of this many features, flattened (images: 3·32·32); one output per example.
    Flat(usize),
    /// Token ids (batch, positions) embedded in d dimensions, the vocabulary being the class count; one
    /// output per position.
    Embed { positions: usize },
}

/// Stem (→ d), `blocks` × (x + fc2(relu(fc1(x)))) with `hidden` internal units (the Neuron units), head
/// (d → classes).
pub struct Mlp {
    pub stem: Stem,
    pub d: usize,
    pub hidden: usize,
    pub blocks: usize,
    pub classes: usize,
}

impl Mlp {
    /// Width `workload.widths[0]` (16), `workload.depths[0]` blocks (`blocks`), hidden width 2·d.
    pub fn new(a: &ModelArgs, stem: Stem, blocks: usize) -> Self {
        let d = a.widths.as_ref().and_then(|w| w.first().copied()).unwrap_or(16);
        let blocks = a.depths.as_ref().and_then(|w| w.first().copied()).unwrap_or(blocks);
        Self { stem, d, hidden: 2 * d, blocks, classes: a.num_classes }
    }

    /// Outputs per example.
    fn positions(&self) -> usize {
        match self.stem {
            Stem::Flat(_) => 1,
            Stem::Embed { positions } => positions,
        }
    }
}

enum StemLayer {
    Flat(Linear),
    Embed(Var),
}

struct MlpNet {
    stem: StemLayer,
    /// Per block: fc1, fc2 and the plan's scales, or `None` where the plan drops the branch.
    blocks: Vec<Option<(Linear, Linear, f64, f64)>>,
    head: Linear,
    /// Activation elements per output position (the estimate of [`Net::activation_elems`]).
    per_position: usize,
    store: ParamStore,
}

impl Net for MlpNet {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let mut x = match &self.stem {
            StemLayer::Flat(l) => l.forward(&xs.flatten_from(1)?)?.relu()?,
            StemLayer::Embed(e) => e.as_tensor().embedding(&xs.flatten_all()?)?,
        };
        for (fc1, fc2, mid, scale) in self.blocks.iter().flatten() {
            let h = (fc1.forward(&x)?.relu()? * *mid)?;
            x = (x + (fc2.forward(&h)? * *scale)?)?;
        }
        let out = self.head.forward(&x)?;
        match self.stem {
            StemLayer::Flat(_) => Ok(out),
            StemLayer::Embed(_) => out.reshape(xs.dims().iter().copied().chain([out.dim(1)?]).collect::<Vec<_>>()),
        }
    }

    fn store(&self) -> &ParamStore {
        &self.store
    }

    /// The stem's and every held block's outputs and the head's, per position: token inputs have
    /// `input[0]` positions, flat ones one.
    fn activation_elems(&self, input: &[usize]) -> usize {
        let positions = match self.stem {
            StemLayer::Flat(_) => 1,
            StemLayer::Embed(_) => input.iter().product(),
        };
        positions * self.per_position
    }
}

impl Family for Mlp {
    fn maskable(&self) -> Vec<MaskableBlock> {
        let (d, h, p) = (self.d, self.hidden, self.positions());
        (0..self.blocks)
            .map(|i| MaskableBlock {
                name: format!("blocks.{i}"),
                width: h,
                params: h * (2 * d + 1),
                act_elems: p * 2 * h,
                neuron_params: 2 * d + 1,
                neuron_act_elems: p * 2,
            })
            .collect()
    }

    fn build(&self, plan: &[BlockPlan], mut b: Builder) -> candle_core::Result<Box<dyn Net>> {
        let stem = match self.stem {
            Stem::Flat(n) => StemLayer::Flat(Linear::new(&mut b, "stem", n, self.d, true)?),
            Stem::Embed { .. } => {
                StemLayer::Embed(b.param("stem.weight", &[self.classes, self.d], Init::Normal { std: 1.0 })?)
            }
        };
        let (mut blocks, mut per_position) = (Vec::new(), self.d + self.classes);
        for (i, p) in plan.iter().enumerate() {
            blocks.push(if p.residual {
                let k = p.channels.len();
                per_position += 2 * k + self.d;
                let fc1 = Linear::new(&mut b, &format!("blocks.{i}.fc1"), self.d, k, true)?;
                let w =
                    b.param(&format!("blocks.{i}.fc2.weight"), &[self.d, k], Init::Uniform { fan_in: self.hidden })?;
                Some((fc1, Linear { weight: w, bias: None }, p.mid_scale, p.scale))
            } else {
                None
            });
        }
        let head = Linear::new(&mut b, "head", self.d, self.classes, true)?;
        Ok(Box::new(MlpNet { stem, blocks, head, per_position, store: b.store }))
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

/// Registers nothing itself: each test binary registers the stem it needs under its own name.
pub fn family(a: &ModelArgs, stem: Stem, blocks: usize) -> Result<Box<dyn Family>> {
    Ok(Box::new(Mlp::new(a, stem, blocks)))
}
