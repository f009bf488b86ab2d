//! The baselines (docs/design.md §1 "Baselines"): DP on a narrowed dense model (`small_dense`), or on the
//! full model with per-step random drops (`stochastic_depth`, `dropout`).

use super::accounting::dp_accounting;
use super::dp::{dp_step_with, restore_single, save_single};
use super::eval::single_mode;
use super::method::{Evaluation, Method, Run};
use super::Accounting;
use crate::checkpoint::{Tensors, TrainState};
use crate::data::loader::Batch;
use crate::models::layers::Builder;
use crate::models::resnet::{BlockDrop, ResNet, ResNetConfig};
use crate::models::{Family, Net, UnitKind};
use crate::optim::Optimizer;
use crate::seed::{rng, Stream};
use crate::spec::{MethodKind, RunSpec};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::Rng;

/// A DP baseline: one ResNet (narrowed for `small_dense`), replicated on every worker.
pub(super) struct Baseline<'a> {
    run: Run<'a>,
    net: ResNet,
    opt: Optimizer,
    /// Plan scale of the evaluated model: stochastic depth evaluates with branches scaled by their
    /// survival probability.
    eval_scale: f64,
}

impl<'a> Baseline<'a> {
    /// The (narrowed) model from the run seed, and a fresh optimizer.
    pub fn new(run: Run<'a>) -> Result<Self> {
        let spec = run.spec;
        let net = baseline_net(spec, run.data.num_classes(), run.device)?;
        let eval_scale = if spec.method.kind == MethodKind::StochasticDepth { spec.method.coverage } else { 1.0 };
        Ok(Self { run, net, opt: Optimizer::new(&spec.optim), eval_scale })
    }
}

/// A baseline's model: the workload's ResNet (narrowed for `small_dense`) from the run seed's init stream.
pub fn baseline_net(spec: &RunSpec, num_classes: usize, device: &Device) -> Result<ResNet> {
    let mut cfg = ResNetConfig::of(&spec.workload, num_classes)?;
    if spec.method.kind == MethodKind::SmallDense {
        cfg.widths = small_dense_widths(&cfg, spec.method.coverage);
    }
    let b = Builder::from_seed(spec.seed, device).with_compute_dtype(spec.workload.precision.dtype());
    Ok(ResNet::new(&cfg, &cfg.full_plan(), b)?)
}

impl Method for Baseline<'_> {
    fn step(&mut self, batches: &[Batch], lr: f64, step: usize) -> Result<f64> {
        let Run { spec, device, .. } = self.run;
        let net = &self.net;
        let forward =
            |i: usize, x: &Tensor| net.forward_dropping(x, true, &baseline_drops(spec, net, step, i, device)?);
        dp_step_with(net, &mut self.opt, batches, lr, &forward, &self.run.step_ctx())
    }

    fn evaluate(&mut self) -> Result<Evaluation> {
        let values = self.net.store().values();
        let b = Builder::from_tensors(&values, self.run.device)
            .with_compute_dtype(self.run.spec.workload.precision.dtype());
        let eval_net = self.net.cfg.build_full(self.eval_scale, b)?;
        single_mode(&self.run, eval_net.as_ref())
    }

    fn save(&self, out: &mut Tensors) -> Result<serde_json::Value> {
        save_single(&self.net, &self.opt, out)
    }

    fn restore(&mut self, r: &TrainState) -> Result<()> {
        restore_single(&self.net, &mut self.opt, r, self.run.device)
    }

    fn final_model(&mut self) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
        Ok(self.net.store().values())
    }

    fn accounting(&self) -> Result<Accounting> {
        let mut acc = dp_accounting(&self.net, self.run.spec, &self.opt, self.run.image_hw());
        acc.extra.insert("widths".into(), serde_json::json!(self.net.cfg.widths));
        Ok(acc)
    }
}

/// Widths of the dense model whose parameter count is closest to (without exceeding, where possible) an
/// SDP worker's at coverage C: shared + C × maskable parameters of the full model.
pub fn small_dense_widths(cfg: &ResNetConfig, coverage: f64) -> Vec<usize> {
    let params = |c: &ResNetConfig| -> usize {
        let blocks: usize = c.units(UnitKind::Block).iter().map(|u| u.params).sum();
        let bn = if c.batch_norm { 2 } else { 0 };
        let stem = 3 * 9 * c.widths[0] + bn * c.widths[0];
        let shortcuts: usize =
            c.blocks().iter().filter(|b| b.has_projection()).map(|b| b.c_in * b.c_out + bn * b.c_out).sum();
        let head = c.widths.last().copied().unwrap_or(0) * c.num_classes + c.num_classes;
        stem + blocks + shortcuts + head
    };
    let full = params(cfg) as f64;
    let units: usize = cfg.units(UnitKind::Block).iter().map(|u| u.params).sum();
    let target = full - units as f64 * (1.0 - coverage);
    let at = |alpha: f64| -> ResNetConfig {
        let widths = cfg.widths.iter().map(|&w| ((w as f64 * alpha).round() as usize).max(1)).collect();
        ResNetConfig { widths, ..cfg.clone() }
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if (params(&at(mid)) as f64) <= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    at(lo.max(1e-3)).widths
}

/// The per-step random drops of worker `k` at `step` (stochastic depth: skip each branch with probability
/// 1 − C; dropout: drop each internal channel with probability 1 − C, survivors scaled by 1/C). The bench
/// makes the same draws, so a timed baseline step does the training's work.
pub fn baseline_drops(
    spec: &RunSpec,
    net: &ResNet,
    step: usize,
    k: usize,
    device: &Device,
) -> candle_core::Result<Vec<BlockDrop>> {
    let keep = spec.method.coverage;
    let mut r = rng(spec.seed, Stream::Drop, step as u64, k as u64);
    net.cfg
        .blocks()
        .iter()
        .zip(&net.plan)
        .map(|(_, plan)| {
            Ok(match spec.method.kind {
                MethodKind::StochasticDepth => BlockDrop { skip: !r.random_bool(keep), channels: None },
                MethodKind::Dropout => {
                    let m: Vec<f32> = (0..plan.channels.len())
                        .map(|_| if r.random_bool(keep) { (1.0 / keep) as f32 } else { 0.0 })
                        .collect();
                    BlockDrop { skip: false, channels: Some(Tensor::new(m.as_slice(), device)?) }
                }
                _ => BlockDrop::default(),
            })
        })
        .collect()
}
