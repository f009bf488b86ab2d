//! Data parallelism: K per-worker gradients of one shared model, averaged, then one optimizer step; BatchNorm
//! running statistics averaged over the workers.

use super::accounting::dp_accounting;
use super::eval::single_mode;
use super::grads::{accumulate, loss_and_grads_of, scale};
use super::method::{Evaluation, Run, Trainer};
use super::methods::{Look, Method, Site, WorkerNet};
use super::Accounting;
use crate::checkpoint::{self, Tensors, TrainState};
use crate::comm::World;
use crate::data::examples::Batch;
use crate::models::{self, Net};
use crate::ops::profile::{self, Part};
use crate::optim::Optimizer;
use crate::spec::{self, MethodRules, RunSpec};
use crate::task::{Task, CLASSIFY};
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

/// Data parallelism (`method.kind = "dp"`): one model, replicated on every worker.
pub(super) struct Dp<'a> {
    run: Run<'a>,
    net: Box<dyn Net>,
    opt: Optimizer,
}

impl<'a> Dp<'a> {
    /// The model from the run seed, and a fresh optimizer.
    pub fn new(run: Run<'a>) -> Result<Self> {
        let spec = run.spec;
        let net = models::build(&spec.workload, run.data.num_classes(), spec.seed, run.device)?;
        Ok(Self { run, net, opt: Optimizer::new(&spec.optim) })
    }
}

impl MethodRules for spec::Dp {
    fn name(&self) -> &'static str {
        "dp"
    }

    fn field_matters(&self, _spec: &RunSpec, field: &str) -> bool {
        ["kind", "workers"].contains(&field)
    }
}

impl Method for spec::Dp {
    fn trainer<'a>(&self, run: Run<'a>) -> Result<Box<dyn Trainer + 'a>> {
        Ok(Box::new(Dp::new(run)?))
    }

    fn worker_net(&self, site: Site, _worker: Option<usize>) -> Result<WorkerNet> {
        let spec = site.spec;
        Ok(WorkerNet::plain(models::build(&spec.workload, site.classes, spec.seed, site.device)?, spec))
    }

    fn look(&self) -> Look {
        Look { reference: true, dashed: false, ..Look::default() }
    }

    fn legend(&self, _spec: &RunSpec) -> String {
        "DP".into()
    }
}

impl Trainer for Dp<'_> {
    fn step(&mut self, batches: &[Batch], lr: f64, _step: usize) -> Result<f64> {
        let net = self.net.as_ref();
        let forward = |_: usize, x: &Tensor| net.forward_t(x, true);
        dp_step_with(net, &mut self.opt, batches, lr, &forward, &self.run.step_ctx())
    }

    fn evaluate(&mut self) -> Result<Evaluation> {
        single_mode(&self.run, self.net.as_ref())
    }

    fn save(&mut self, out: &mut Tensors) -> Result<serde_json::Value> {
        save_single(self.net.as_ref(), &self.opt, out)
    }

    fn restore(&mut self, r: &TrainState) -> Result<()> {
        restore_single(self.net.as_ref(), &mut self.opt, r, self.run.device)
    }

    fn accounting(&self) -> Result<Accounting> {
        Ok(dp_accounting(self.net.as_ref(), self.run.spec, &self.opt, &self.run.input_shape()))
    }

    fn final_model(&mut self) -> Result<BTreeMap<String, Tensor>> {
        Ok(self.net.store().values())
    }
}

/// Adds a single model and its optimizer state to a checkpoint (DP and its baselines).
pub fn save_single(net: &dyn Net, opt: &Optimizer, out: &mut Tensors) -> Result<serde_json::Value> {
    checkpoint::save_store("net", net.store(), out)?;
    checkpoint::save_optimizer("net", opt, out)?;
    Ok(serde_json::Value::Null)
}

/// Restores what [`save_single`] saved.
pub fn restore_single(net: &dyn Net, opt: &mut Optimizer, r: &TrainState, device: &Device) -> Result<()> {
    checkpoint::restore_store("net", net.store(), &r.tensors)?;
    checkpoint::restore_optimizer("net", opt, &r.tensors, device)
}

/// One data-parallel step of image classification in this process: per-worker gradients, averaged; BN
/// running statistics averaged; one update. Returns the mean training loss over the workers.
pub fn dp_step(net: &dyn Net, opt: &mut Optimizer, batches: &[Batch], lr: f64, device: &Device) -> Result<f64> {
    let ctx = Step { task: CLASSIFY.task, device, world: &World::solo() };
    dp_step_with(net, opt, batches, lr, &|_, x| net.forward_t(x, true), &ctx)
}

/// What a training step needs besides the model and its batches: the task (its loss), the device, and
/// the processes the workers are spread over.
#[derive(Clone, Copy)]
pub struct Step<'a> {
    pub task: &'a dyn Task,
    pub device: &'a Device,
    pub world: &'a World,
}

/// Training-mode logits of worker k for a batch (the DP baselines drop blocks or channels per worker).
pub type Forward<'a> = dyn Fn(usize, &Tensor) -> candle_core::Result<Tensor> + 'a;

/// [`dp_step`] with a per-worker forward pass, over the workers this process hosts in `world` (worker i on
/// rank i mod N): the gradient and BatchNorm-statistic sums are summed over the ranks before the update.
pub fn dp_step_with(
    net: &dyn Net,
    opt: &mut Optimizer,
    batches: &[Batch],
    lr: f64,
    forward: &Forward,
    ctx: &Step,
) -> Result<f64> {
    let (device, world) = (ctx.device, ctx.world);
    let store = net.store();
    let k = batches.len();
    // Each simulated worker starts from the same running statistics.
    let snapshot = if k > 1 && !store.buffers.is_empty() { Some(store.buffer_tensors()?) } else { None };
    let mut grad_sum: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut buf_sum: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut loss_sum = 0.0;
    let hosted = batches.iter().enumerate().filter(|(i, _)| i % world.size() == world.rank());
    for (j, (i, batch)) in hosted.enumerate() {
        if let (Some(s), true) = (&snapshot, j > 0) {
            store.set_buffers(s)?;
        }
        let (x, y) = batch.to_tensors(device)?;
        let out = {
            let _forward = profile::scope(Part::Forward);
            forward(i, &x)?
        };
        let (loss, grads) = loss_and_grads_of(ctx.task, store, &out, &y)?;
        loss_sum += loss;
        accumulate(&mut grad_sum, grads)?;
        if snapshot.is_some() {
            accumulate(&mut buf_sum, store.buffer_tensors()?)?;
        }
    }
    let averaging = profile::scope(Part::Averaging);
    if world.size() > 1 {
        grad_sum = crate::comm::sum_over_ranks(world.comm.as_ref(), grad_sum)?;
        if snapshot.is_some() {
            buf_sum = crate::comm::sum_over_ranks(world.comm.as_ref(), buf_sum)?;
        }
        let mut l = [loss_sum];
        world.comm.all_reduce_sum_f64(&mut l)?;
        loss_sum = l[0];
    }
    let inv = 1.0 / k as f64;
    let grads = scale(grad_sum, inv)?;
    if snapshot.is_some() {
        store.set_buffers(&scale(buf_sum, inv)?)?;
    }
    drop(averaging);
    opt.step(&store.params, &grads, lr)?;
    Ok(loss_sum * inv)
}
