//! The training loop: K workers, each on its own shard of every epoch's permutation, simulated on one device.
//!
//! Data parallelism (`method.kind = "dp"`): at every step each worker computes the gradient of its batch
//! with its replica of the model; the gradients are averaged; one optimizer step updates the (shared)
//! replica. BatchNorm uses each worker's own batch statistics, and the running statistics become the mean
//! of the workers' updated estimates — what a real multi-process run with buffer averaging computes.

use crate::data::augment::AugmentCfg;
use crate::data::loader::{eval_batches, steps_per_epoch, Batch, TrainLoader};
use crate::data::Dataset;
use crate::models::{self, Net};
use crate::optim::{lr_at, Optimizer};
use crate::results::{Final, MetricsRow};
use crate::spec::{MethodKind, RunSpec};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// The run was stopped by the user (Ctrl-C); its results are marked `interrupted`.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// What a training loop reports as it goes.
pub trait Observer {
    /// After every optimizer step (`step` counts from 1 over the whole run).
    fn step(&mut self, epoch: usize, step: usize, total_steps: usize, loss: f64);
    /// After every evaluation; the row is final and may be written out.
    fn eval(&mut self, row: &MetricsRow) -> Result<()>;
    /// Whether the user asked to stop.
    fn interrupted(&self) -> bool;
}

/// Trains the run `spec` on `data` and returns its final figures.
pub fn train(spec: &RunSpec, run_id: &str, data: &Dataset, device: &Device, obs: &mut dyn Observer) -> Result<Final> {
    match spec.method.kind {
        MethodKind::Dp => train_dp(spec, run_id, data, device, obs),
    }
}

fn augment_cfg(spec: &RunSpec, data: &Dataset) -> AugmentCfg {
    AugmentCfg { crop_pad: spec.workload.augment.crop_pad, flip: spec.workload.augment.flip, mean: data.mean, std: data.std }
}

fn train_dp(spec: &RunSpec, run_id: &str, data: &Dataset, device: &Device, obs: &mut dyn Observer) -> Result<Final> {
    let w = &spec.workload;
    let k = spec.method.workers;
    let net = models::build(w, data.num_classes(), spec.seed, device)?;
    let mut opt = Optimizer::new(&spec.optim);
    let aug = augment_cfg(spec, data);
    let train_set = Arc::new(data.train.clone());
    let per_epoch = steps_per_epoch(train_set.len(), k, w.batch_size)?;
    let total = per_epoch * w.epochs;
    let start = Instant::now();
    let mut step = 0;
    let mut last = Final::default();
    for epoch in 1..=w.epochs {
        let loader = TrainLoader::start(train_set.clone(), aug, spec.seed, epoch, k, w.batch_size)?;
        let (mut loss_sum, mut images) = (0.0, 0usize);
        let t_epoch = Instant::now();
        let mut lr = 0.0;
        for batches in loader {
            if obs.interrupted() {
                return Err(Interrupted.into());
            }
            lr = lr_at(&spec.optim, step, total, per_epoch);
            let loss = dp_step(net.as_ref(), &mut opt, &batches, lr, device)
                .with_context(|| format!("training step {} (epoch {epoch})", step + 1))?;
            step += 1;
            loss_sum += loss;
            images += batches.iter().map(Batch::len).sum::<usize>();
            obs.step(epoch, step, total, loss);
        }
        let img_per_s = images as f64 / t_epoch.elapsed().as_secs_f64().max(1e-9);
        if epoch % w.eval_every == 0 || epoch == w.epochs {
            let (test_loss, test_acc) = evaluate(net.as_ref(), data, &aug, w.eval_batch_size, device)?;
            let row = MetricsRow {
                run_id: run_id.to_string(),
                epoch,
                step,
                train_loss: loss_sum / per_epoch as f64,
                test_loss,
                test_acc,
                lr,
                img_per_s,
                wall_s: start.elapsed().as_secs_f64(),
            };
            obs.eval(&row)?;
            last = Final {
                epoch,
                step,
                train_loss: row.train_loss,
                test_loss,
                test_acc,
                wall_s: row.wall_s,
                img_per_s,
            };
        }
    }
    Ok(last)
}

/// One data-parallel step: per-worker gradients, averaged; BN running statistics averaged; one update.
/// Returns the mean training loss over the workers.
pub fn dp_step(net: &dyn Net, opt: &mut Optimizer, batches: &[Batch], lr: f64, device: &Device) -> Result<f64> {
    let store = net.store();
    let k = batches.len();
    // Each simulated worker starts from the same running statistics.
    let snapshot = if k > 1 && !store.buffers.is_empty() { Some(store.buffer_tensors()?) } else { None };
    let mut grad_sum: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut buf_sum: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut loss_sum = 0.0;
    for (i, batch) in batches.iter().enumerate() {
        if let (Some(s), true) = (&snapshot, i > 0) {
            store.set_buffers(s)?;
        }
        let (x, y) = batch.to_tensors(device)?;
        let (loss, grads) = loss_and_grads(net, &x, &y)?;
        loss_sum += loss;
        accumulate(&mut grad_sum, grads)?;
        if snapshot.is_some() {
            accumulate(&mut buf_sum, store.buffer_tensors()?)?;
        }
    }
    let inv = 1.0 / k as f64;
    let grads = scale(grad_sum, inv)?;
    if snapshot.is_some() {
        store.set_buffers(&scale(buf_sum, inv)?)?;
    }
    opt.step(&store.params, &grads, lr)?;
    Ok(loss_sum * inv)
}

/// Mean cross-entropy of a training-mode forward pass on (x, y), and the gradient of every parameter.
pub fn loss_and_grads(net: &dyn Net, x: &Tensor, y: &Tensor) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let logits = net.forward_t(x, true)?;
    let loss = candle_nn::loss::cross_entropy(&logits, y)?;
    let value = loss.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        anyhow::bail!("training loss is {value}: the run diverged (try a smaller optim.lr)");
    }
    let mut gs = loss.backward()?;
    let mut grads = BTreeMap::new();
    for (name, var) in &net.store().params {
        if let Some(g) = gs.remove(var.as_tensor()) {
            grads.insert(name.clone(), g.detach());
        }
    }
    Ok((value, grads))
}

fn accumulate(sum: &mut BTreeMap<String, Tensor>, add: BTreeMap<String, Tensor>) -> Result<()> {
    for (k, v) in add {
        let next = match sum.remove(&k) {
            Some(s) => (s + v)?,
            None => v,
        };
        sum.insert(k, next);
    }
    Ok(())
}

fn scale(map: BTreeMap<String, Tensor>, s: f64) -> Result<BTreeMap<String, Tensor>> {
    map.into_iter().map(|(k, v)| Ok((k, (v * s)?))).collect()
}

/// Mean test loss and accuracy (a fraction) of `net` in eval mode over the whole test split.
pub fn evaluate(net: &dyn Net, data: &Dataset, aug: &AugmentCfg, batch: usize, device: &Device) -> Result<(f64, f64)> {
    let (mut loss_sum, mut correct, mut n) = (0.0, 0usize, 0usize);
    for b in eval_batches(&data.test, aug, batch) {
        let (x, y) = b.to_tensors(device)?;
        let logits = net.forward_t(&x, false)?.detach();
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * b.len() as f64;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        correct += pred.iter().zip(&b.y).filter(|(p, t)| p == t).count();
        n += b.len();
    }
    let n = n.max(1) as f64;
    Ok((loss_sum / n, correct as f64 / n))
}
