//! The baselines (docs/design.md §1 "Baselines"): DP on a narrowed dense model (`small_dense`), or on the
//! full model with per-step random drops (`stochastic_depth`, `dropout`).

use super::accounting::dp_accounting;
use super::dp::{dp_step_with, restore_single, save_single};
use super::eval::single_mode;
use super::method::{Evaluation, Run, Trainer};
use super::methods::{Look, Marker, Method, Site, WorkerNet};
use super::Accounting;
use crate::checkpoint::{Tensors, TrainState};
use crate::data::examples::Batch;
use crate::models::{self, BlockDrop, Builder, Family, Net, UnitKind};
use crate::optim::Optimizer;
use crate::seed::{rng, Stream};
use crate::spec::{Baseline as Kind, MethodRules, Needs, RunSpec};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::Rng;

/// A DP baseline: one model of the workload's family (narrowed for `small_dense`), replicated on every
/// worker.
pub(super) struct Baseline<'a> {
    run: Run<'a>,
    kind: Kind,
    family: Box<dyn Family>,
    net: Box<dyn Net>,
    /// Internal width of each block: what the per-step drops are drawn over.
    widths: Vec<usize>,
    opt: Optimizer,
    /// Plan scale of the evaluated model: stochastic depth evaluates with branches scaled by their
    /// survival probability.
    eval_scale: f64,
}

impl<'a> Baseline<'a> {
    /// The (narrowed) model from the run seed, and a fresh optimizer.
    pub fn new(kind: Kind, run: Run<'a>) -> Result<Self> {
        let spec = run.spec;
        let family = baseline_family(spec, run.data.num_classes())?;
        let net = baseline_net(spec, family.as_ref(), run.device)?;
        let widths = family.block_widths();
        let eval_scale = if kind == Kind::StochasticDepth { spec.method.coverage } else { 1.0 };
        Ok(Self { run, kind, family, net, widths, opt: Optimizer::new(&spec.optim), eval_scale })
    }
}

impl MethodRules for Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::SmallDense => "small_dense",
            Kind::StochasticDepth => "stochastic_depth",
            Kind::Dropout => "dropout",
        }
    }

    fn field_matters(&self, _spec: &RunSpec, field: &str) -> bool {
        ["kind", "workers", "coverage"].contains(&field)
    }

    /// `small_dense` narrows the model; the others drop per step.
    fn needs(&self) -> Needs {
        let narrowing = *self == Kind::SmallDense;
        Needs { narrowing, drops: !narrowing }
    }
}

impl Method for Kind {
    fn trainer<'a>(&self, run: Run<'a>) -> Result<Box<dyn Trainer + 'a>> {
        Ok(Box::new(Baseline::new(*self, run)?))
    }

    /// The (narrowed) model every worker trains, with worker k's per-step drops.
    fn worker_net(&self, site: Site, _worker: Option<usize>) -> Result<WorkerNet> {
        let Site { spec, classes, device, .. } = site;
        let family = baseline_family(spec, classes)?;
        let net = baseline_net(spec, family.as_ref(), device)?;
        let (kind, widths, seed, keep, device) =
            (*self, family.block_widths(), spec.seed, spec.method.coverage, device.clone());
        let drops = Box::new(move |step, k| baseline_drops(kind, seed, keep, &widths, step, k, &device));
        Ok(WorkerNet { drops: Some(drops), ..WorkerNet::plain(net, spec) })
    }

    fn look(&self) -> Look {
        let marker = match self {
            Kind::SmallDense => Marker::Square,
            Kind::StochasticDepth => Marker::Triangle,
            Kind::Dropout => Marker::Cross,
        };
        Look { marker, ..Look::default() }
    }
}

/// A baseline's family: the workload's, narrowed to [`small_dense_widths`] for a method that narrows
/// (`small_dense`: its [`Needs::narrowing`]).
pub fn baseline_family(spec: &RunSpec, num_classes: usize) -> Result<Box<dyn Family>> {
    let family = models::of(&spec.workload, num_classes)?;
    if !spec.method.kind.rules().map_err(anyhow::Error::msg)?.needs().narrowing {
        return Ok(family);
    }
    family.with_widths(&small_dense_widths(family.as_ref(), spec.method.coverage))
}

/// A baseline's model: the full model of `family` ([`baseline_family`]) from the run seed's init stream.
pub fn baseline_net(spec: &RunSpec, family: &dyn Family, device: &Device) -> Result<Box<dyn Net>> {
    let b = Builder::from_seed(spec.seed, device).with_compute_dtype(spec.workload.precision.dtype());
    Ok(family.build_full(1.0, b)?)
}

impl Trainer for Baseline<'_> {
    fn step(&mut self, batches: &[Batch], lr: f64, step: usize) -> Result<f64> {
        let Run { spec, device, .. } = self.run;
        let (net, widths) = (self.net.as_ref(), &self.widths);
        let (kind, keep) = (self.kind, spec.method.coverage);
        let forward = |i: usize, x: &Tensor| {
            net.forward_dropping(x, true, &baseline_drops(kind, spec.seed, keep, widths, step, i, device)?)
        };
        dp_step_with(net, &mut self.opt, batches, lr, &forward, &self.run.step_ctx())
    }

    fn evaluate(&mut self) -> Result<Evaluation> {
        let values = self.net.store().values();
        let b = Builder::from_tensors(&values, self.run.device)
            .with_compute_dtype(self.run.spec.workload.precision.dtype());
        let eval_net = self.family.build_full(self.eval_scale, b)?;
        single_mode(&self.run, eval_net.as_ref())
    }

    fn save(&mut self, out: &mut Tensors) -> Result<serde_json::Value> {
        save_single(self.net.as_ref(), &self.opt, out)
    }

    fn restore(&mut self, r: &TrainState) -> Result<()> {
        restore_single(self.net.as_ref(), &mut self.opt, r, self.run.device)
    }

    fn final_model(&mut self) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
        Ok(self.net.store().values())
    }

    fn accounting(&self) -> Result<Accounting> {
        let mut acc = dp_accounting(self.net.as_ref(), self.run.spec, &self.opt, &self.run.input_shape());
        acc.extra.insert("widths".into(), serde_json::json!(self.family.stages().0));
        Ok(acc)
    }
}

/// Widths of the dense model of `family` (configured by [`Family::with_widths`]) whose parameter count is
/// closest to (without exceeding, where possible) an SDP worker's at coverage C: shared + C × maskable
/// parameters of the full model. Every stage's width is scaled by one factor, found by bisection.
pub fn small_dense_widths(family: &dyn Family, coverage: f64) -> Vec<usize> {
    // A width the family rejects counts as too large.
    let params = |widths: &[usize]| -> f64 {
        match family.with_widths(widths).map(|f| f.param_count()) {
            Ok(Ok(n)) => n as f64,
            _ => f64::INFINITY,
        }
    };
    let full_widths = family.stages().0;
    let full = params(&full_widths);
    let units: usize = family.units(UnitKind::Block).iter().map(|u| u.params).sum();
    let target = full - units as f64 * (1.0 - coverage);
    let at = |alpha: f64| -> Vec<usize> {
        full_widths.iter().map(|&w| ((w as f64 * alpha).round() as usize).max(1)).collect()
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if params(&at(mid)) <= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    at(lo.max(1e-3))
}

/// The per-step random drops of `kind` for worker `k` at `step` of a run of seed `seed`, over blocks of
/// internal `widths` (the family's [`Family::block_widths`]; stochastic depth: skip each branch with
/// probability 1 − `keep`; dropout: drop each internal channel with probability 1 − `keep`, survivors
/// scaled by 1/`keep`; small dense: none). The bench and the memory probe make the same draws
/// ([`Method::worker_net`]), so a timed baseline step does the training's work.
pub fn baseline_drops(
    kind: Kind,
    seed: u64,
    keep: f64,
    widths: &[usize],
    step: usize,
    k: usize,
    device: &Device,
) -> candle_core::Result<Vec<BlockDrop>> {
    let mut r = rng(seed, Stream::Drop, step as u64, k as u64);
    widths
        .iter()
        .map(|&width| {
            Ok(match kind {
                Kind::StochasticDepth => BlockDrop { skip: !r.random_bool(keep), channels: None },
                Kind::Dropout => {
                    let m: Vec<f32> =
                        (0..width).map(|_| if r.random_bool(keep) { (1.0 / keep) as f32 } else { 0.0 }).collect();
                    BlockDrop { skip: false, channels: Some(Tensor::new(m.as_slice(), device)?) }
                }
                Kind::SmallDense => BlockDrop::default(),
            })
        })
        .collect()
}
