//! The training loop: K workers, each on its own shard of every epoch's permutation, simulated on one device.
//!
//! Data parallelism (`method.kind = "dp"`): at every step each worker computes the gradient of its batch
//! with its replica of the model; the gradients are averaged; one optimizer step updates the (shared)
//! replica. BatchNorm uses each worker's own batch statistics, and the running statistics become the mean
//! of the workers' updated estimates — what a real multi-process run with buffer averaging computes.
//!
//! Subnetwork data parallelism (`method.kind = "sdp"`, docs/design.md §1–§2), as it runs in the forward
//! regime; in the backward regime each worker keeps the full model and trains and averages only the
//! coordinates it holds:
//!
//! ```text
//! select masks (pure function of spec + seed) → build each worker's physical subnetwork (gather)
//! every step, for each worker k:  local grads of its batch → (sync=params) local optimizer step
//! sync=grads:   average grads among holders → identical optimizer step on every holder
//! sync=params:  every sync_every steps, average parameters among holders (scatter, mean, gather)
//! BN buffers:   averaged among holders at every sync
//! ```

use crate::checkpoint::{self, Tensors, TrainState};
use crate::comm::{Averager, LocalAverager};
use crate::data::augment::AugmentCfg;
use crate::data::loader::{eval_batches, steps_per_epoch, Batch, TrainLoader};
use crate::data::Dataset;
use crate::masking::{self, Selection};
use crate::metrics;
use crate::models::layers::{Builder, ParamStore};
use crate::models::resnet::{BlockDrop, ResNet, ResNetConfig};
use crate::models::{self, Net};
use crate::models::{Unit, UnitKind};
use crate::optim::{lr_at, Optimizer};
use crate::results::{AlignRow, Final, MetricsRow, WorkerRow};
use crate::seed::{rng, Stream};
use crate::spec::{BnStats, EvalMode, MethodKind, Regime, RunSpec, SyncMode};
use crate::subnet::{self, Arch, IndexMap};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use std::cell::RefCell;
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

/// Where a training loop asks whether to checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// After an optimizer step inside an epoch.
    Step,
    /// After an epoch's last step and its evaluation (if due); `last`: the run's final epoch.
    EpochEnd { epoch: usize, last: bool },
}

/// What a training loop reports as it goes. Training knows no run id: the rows it reports (metrics,
/// workers, alignment) carry an empty `run_id`, which the observer that writes them stamps.
pub trait Observer {
    /// After every optimizer step (`step` counts from 1 over the whole run).
    fn step(&mut self, epoch: usize, step: usize, total_steps: usize, loss: f64);
    /// After every evaluation; the row is final and may be written out.
    fn eval(&mut self, row: &MetricsRow) -> Result<()>;
    /// Whether the user asked to stop.
    fn interrupted(&self) -> bool;
    /// Training finished: what each worker held and sent (before the final figures are returned).
    fn accounting(&mut self, _acc: &Accounting) -> Result<()> {
        Ok(())
    }
    /// Whether to save a checkpoint now (never, unless the observer writes them).
    fn checkpoint_due(&mut self, _at: At) -> bool {
        false
    }
    /// Writes a checkpoint (asked for by [`Observer::checkpoint_due`], or on an interrupt).
    fn checkpoint(&mut self, _state: &TrainState) -> Result<()> {
        Ok(())
    }
}

/// Trains the run `spec` on `data` and returns its final figures.
pub fn train(spec: &RunSpec, data: &Dataset, device: &Device, obs: &mut dyn Observer) -> Result<Final> {
    train_from(spec, data, device, obs, None)
}

/// [`train`], continuing from a checkpoint's state where one is given.
pub fn train_from(
    spec: &RunSpec,
    data: &Dataset,
    device: &Device,
    obs: &mut dyn Observer,
    resume: Option<TrainState>,
) -> Result<Final> {
    // Before any model is built: a worker count the data cannot feed fails here, not after allocating
    // K subnetworks.
    steps_per_epoch(data.train.len(), spec.method.workers, spec.workload.batch_size)?;
    let run = Run { spec, data, device };
    match spec.method.kind {
        MethodKind::Dp => train_dp(&run, obs, resume),
        MethodKind::Sdp => train_sdp(&run, obs, resume),
        MethodKind::SmallDense | MethodKind::StochasticDepth | MethodKind::Dropout => train_baseline(&run, obs, resume),
    }
}

/// What every method's training takes: the run, its data and its device.
#[derive(Clone, Copy)]
struct Run<'a> {
    spec: &'a RunSpec,
    data: &'a Dataset,
    device: &'a Device,
}

/// How a method's state goes into a checkpoint and comes back out of one.
struct Snapshot<'a> {
    /// Adds the method's tensors; returns its other state.
    save: &'a dyn Fn(&mut Tensors) -> Result<serde_json::Value>,
    restore: &'a dyn Fn(&TrainState) -> Result<()>,
}

/// The snapshot of a single model and its optimizer (data parallelism and its baselines).
fn single_snapshot<'a>(
    net: &'a dyn Net,
    opt: &'a RefCell<Optimizer>,
    device: &'a Device,
) -> (impl Fn(&mut Tensors) -> Result<serde_json::Value> + 'a, impl Fn(&TrainState) -> Result<()> + 'a) {
    let save = move |out: &mut Tensors| {
        checkpoint::save_store("net", net.store(), out)?;
        checkpoint::save_optimizer("net", &opt.borrow(), out)?;
        Ok(serde_json::Value::Null)
    };
    let restore = move |st: &TrainState| {
        checkpoint::restore_store("net", net.store(), &st.tensors)?;
        checkpoint::restore_optimizer("net", &mut opt.borrow_mut(), &st.tensors, device)
    };
    (save, restore)
}

fn augment_cfg(spec: &RunSpec, data: &Dataset) -> AugmentCfg {
    AugmentCfg {
        crop_pad: spec.workload.augment.crop_pad,
        pad_mode: spec.workload.augment.pad_mode,
        flip: spec.workload.augment.flip,
        mean: data.mean,
        std: data.std,
    }
}

fn train_dp(run: &Run, obs: &mut dyn Observer, resume: Option<TrainState>) -> Result<Final> {
    let Run { spec, data, device } = *run;
    let net = models::build(&spec.workload, data.num_classes(), spec.seed, device)?;
    let opt = RefCell::new(Optimizer::new(&spec.optim));
    let aug = augment_cfg(spec, data);
    let (save, restore) = single_snapshot(net.as_ref(), &opt, device);
    let last = epoch_loop(
        run,
        spec.workload.epochs,
        obs,
        &mut |batches, lr, _| dp_step(net.as_ref(), &mut opt.borrow_mut(), batches, lr, device),
        &mut || single_mode(net.as_ref(), data, &aug, spec.workload.eval_batch_size, device),
        &Snapshot { save: &save, restore: &restore },
        resume,
    )?;
    obs.accounting(&dp_accounting(net.as_ref(), spec, &opt.borrow(), (data.train.h, data.train.w)))?;
    Ok(last)
}

/// How a method evaluates: (test loss, test accuracy) of the headline mode, and every mode's accuracy.
struct Evaluation {
    test_loss: f64,
    test_acc: f64,
    modes: BTreeMap<String, f64>,
}

/// One training step of [`epoch_loop`]: (the workers' batches, learning rate, global step) → mean loss.
type StepFn<'a> = dyn FnMut(&[Batch], f64, usize) -> Result<f64> + 'a;

/// The epoch loop every method shares: batches from the loader, one `step` per optimizer step (given the
/// batches, the learning rate and the 1-based step number; returns the mean training loss), an
/// `evaluate` every `eval_every` epochs and at the end, progress and metrics through `obs`, checkpoints
/// where `obs` asks for them (and on an interrupt), and a start from `resume`'s position where given. The
/// metrics rows carry an empty `run_id`.
fn epoch_loop(
    run: &Run,
    epochs: usize,
    obs: &mut dyn Observer,
    step_fn: &mut StepFn,
    eval_fn: &mut dyn FnMut() -> Result<Evaluation>,
    snapshot: &Snapshot,
    resume: Option<TrainState>,
) -> Result<Final> {
    let Run { spec, data, .. } = *run;
    let w = &spec.workload;
    let k = spec.method.workers;
    let aug = augment_cfg(spec, data);
    let train_set = Arc::new(data.train.clone());
    let per_epoch = steps_per_epoch(train_set.len(), k, w.batch_size)?;
    let total = per_epoch * epochs;
    let mut pos = TrainState::default();
    if let Some(r) = resume {
        if r.step > total {
            anyhow::bail!("the checkpoint is at step {}, past this run's {total} steps", r.step);
        }
        (snapshot.restore)(&r).context("restoring the checkpoint")?;
        pos = TrainState { tensors: Tensors::new(), method: serde_json::Value::Null, ..r };
    }
    let mut last = pos.rows.last().map(Final::from).unwrap_or_default();
    let (start, wall_before) = (Instant::now(), pos.wall_s);
    let wall = |start: &Instant| wall_before + start.elapsed().as_secs_f64();
    // Steps done since the last checkpoint (an interrupt with none saves nothing).
    let mut unsaved = 0usize;
    let save = |pos: &TrainState, obs: &mut dyn Observer| -> Result<()> {
        let mut tensors = Tensors::new();
        let method = (snapshot.save)(&mut tensors)?;
        obs.checkpoint(&TrainState { tensors, method, ..pos.clone() })
    };
    let first = pos.step / per_epoch + 1;
    for epoch in first..=epochs {
        let done_in_epoch = if epoch == first { pos.step % per_epoch } else { 0 };
        if done_in_epoch == 0 {
            (pos.epoch_loss_sum, pos.epoch_images, pos.epoch_secs) = (0.0, 0, 0.0);
        }
        let loader = TrainLoader::start_at(train_set.clone(), aug, spec.seed, epoch, k, w.batch_size, done_in_epoch)?;
        let (t_epoch, secs_before, mut lr) = (Instant::now(), pos.epoch_secs, 0.0);
        for batches in loader {
            if obs.interrupted() {
                if unsaved > 0 {
                    (pos.epoch_secs, pos.wall_s) = (secs_before + t_epoch.elapsed().as_secs_f64(), wall(&start));
                    save(&pos, obs).context("saving a checkpoint on interrupt")?;
                }
                return Err(Interrupted.into());
            }
            lr = lr_at(&spec.optim, pos.step, total, per_epoch);
            let loss = step_fn(&batches, lr, pos.step + 1)
                .with_context(|| format!("training step {} (epoch {epoch})", pos.step + 1))?;
            pos.step += 1;
            unsaved += 1;
            pos.epoch_loss_sum += loss;
            pos.epoch_images += batches.iter().map(Batch::len).sum::<usize>();
            obs.step(epoch, pos.step, total, loss);
            if !pos.step.is_multiple_of(per_epoch) && obs.checkpoint_due(At::Step) {
                (pos.epoch_secs, pos.wall_s) = (secs_before + t_epoch.elapsed().as_secs_f64(), wall(&start));
                save(&pos, obs)?;
                unsaved = 0;
            }
        }
        pos.epoch_secs = secs_before + t_epoch.elapsed().as_secs_f64();
        let img_per_s = pos.epoch_images as f64 / pos.epoch_secs.max(1e-9);
        if epoch % w.eval_every == 0 || epoch == epochs {
            let e = eval_fn()?;
            let row = MetricsRow {
                run_id: String::new(),
                epoch,
                step: pos.step,
                train_loss: pos.epoch_loss_sum / per_epoch as f64,
                test_loss: e.test_loss,
                test_acc: e.test_acc,
                lr,
                img_per_s,
                wall_s: wall(&start),
                modes: e.modes,
            };
            obs.eval(&row)?;
            last = Final::from(&row);
            pos.rows.push(row);
        }
        (pos.epoch_loss_sum, pos.epoch_images, pos.epoch_secs) = (0.0, 0, 0.0);
        if obs.checkpoint_due(At::EpochEnd { epoch, last: epoch == epochs }) {
            pos.wall_s = wall(&start);
            save(&pos, obs)?;
            unsaved = 0;
        }
    }
    Ok(last)
}

/// A single-model evaluation: the `full` mode only.
fn single_mode(net: &dyn Net, data: &Dataset, aug: &AugmentCfg, batch: usize, device: &Device) -> Result<Evaluation> {
    let (test_loss, test_acc) = evaluate(net, data, aug, batch, device)?;
    Ok(Evaluation { test_loss, test_acc, modes: BTreeMap::from([("full".to_string(), test_acc)]) })
}

// ---------------------------------------------------------------------------------------------------------
// Baselines: DP on a narrowed dense model, or on the full model with per-step random drops.

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
/// makes the same draws, so a timed baseline step does the trainer's work.
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
                    let m: Vec<f32> =
                        (0..plan.mid).map(|_| if r.random_bool(keep) { (1.0 / keep) as f32 } else { 0.0 }).collect();
                    BlockDrop { skip: false, channels: Some(Tensor::new(m.as_slice(), device)?) }
                }
                _ => BlockDrop::default(),
            })
        })
        .collect()
}

fn train_baseline(run: &Run, obs: &mut dyn Observer, resume: Option<TrainState>) -> Result<Final> {
    let Run { spec, data, device } = *run;
    let mut cfg = models::resnet_config(&spec.workload, data.num_classes())?;
    if spec.method.kind == MethodKind::SmallDense {
        cfg.widths = small_dense_widths(&cfg, spec.method.coverage);
    }
    let compute = spec.workload.precision.dtype();
    let net = ResNet::new(&cfg, &cfg.full_plan(), Builder::from_seed(spec.seed, device).with_compute_dtype(compute))?;
    let opt = RefCell::new(Optimizer::new(&spec.optim));
    let aug = augment_cfg(spec, data);
    let (save, restore) = single_snapshot(&net, &opt, device);
    // Stochastic depth evaluates with branches scaled by their survival probability.
    let scale = if spec.method.kind == MethodKind::StochasticDepth { spec.method.coverage } else { 1.0 };
    let last = epoch_loop(
        run,
        spec.workload.epochs,
        obs,
        &mut |batches, lr, step| {
            let forward =
                |i: usize, x: &Tensor| net.forward_dropping(x, true, &baseline_drops(spec, &net, step, i, device)?);
            dp_step_with(&net, &mut opt.borrow_mut(), batches, lr, device, &forward)
        },
        &mut || {
            let arch = Arch::ResNet(cfg.clone());
            let values = net.store().values();
            let eval_net =
                arch.build(None, scale, None, Builder::from_tensors(&values, device).with_compute_dtype(compute))?;
            single_mode(eval_net.as_ref(), data, &aug, spec.workload.eval_batch_size, device)
        },
        &Snapshot { save: &save, restore: &restore },
        resume,
    )?;
    let mut acc = dp_accounting(&net, spec, &opt.borrow(), (data.train.h, data.train.w));
    acc.extra.insert("widths".into(), serde_json::json!(cfg.widths));
    obs.accounting(&acc)?;
    Ok(last)
}

/// Per-worker memory and communication accounting of a finished run, and method-level facts.
#[derive(Clone, Debug)]
pub struct Accounting {
    pub workers: Vec<WorkerRow>,
    /// Spectral gap of the worker–unit averaging graph (SDP; see `metrics::spectral_gap`).
    pub spectral_gap: Option<f64>,
    /// Workers holding each unit (m).
    pub holders: usize,
    /// Method-specific facts for the manifest (e.g. the small-dense baseline's widths).
    pub extra: BTreeMap<String, serde_json::Value>,
    /// Gradient alignment records (SDP with `method.align_every`).
    pub alignment: Vec<AlignRow>,
}

fn dp_accounting(net: &dyn Net, spec: &RunSpec, opt: &Optimizer, hw: (usize, usize)) -> Accounting {
    let k = spec.method.workers;
    let params = net.store().num_params();
    let comm = metrics::ring_allreduce_bytes(params * 4, k);
    let workers = (0..k)
        .map(|worker| WorkerRow {
            run_id: String::new(),
            worker,
            units_held: 0,
            param_fraction: 1.0,
            param_bytes: params * 4,
            grad_bytes: params * 4,
            optim_bytes: opt.state_bytes(),
            activation_bytes_est: net.activation_elems(hw.0, hw.1) * spec.workload.batch_size * 4,
            peak_bytes_measured: None,
            comm_bytes_per_step: comm,
            comm_bytes_per_step_masked: comm,
        })
        .collect();
    Accounting { workers, spectral_gap: None, holders: k, extra: BTreeMap::new(), alignment: Vec::new() }
}

/// One data-parallel step: per-worker gradients, averaged; BN running statistics averaged; one update.
/// Returns the mean training loss over the workers.
pub fn dp_step(net: &dyn Net, opt: &mut Optimizer, batches: &[Batch], lr: f64, device: &Device) -> Result<f64> {
    dp_step_with(net, opt, batches, lr, device, &|_, x| net.forward_t(x, true))
}

/// Training-mode logits of worker k for a batch (the DP baselines drop blocks or channels per worker).
pub type Forward<'a> = dyn Fn(usize, &Tensor) -> candle_core::Result<Tensor> + 'a;

/// [`dp_step`] with a per-worker forward pass.
pub fn dp_step_with(
    net: &dyn Net,
    opt: &mut Optimizer,
    batches: &[Batch],
    lr: f64,
    device: &Device,
    forward: &Forward,
) -> Result<f64> {
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
        let (loss, grads) = grads_of(store, &forward(i, &x)?, &y)?;
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
    grads_of(net.store(), &net.forward_t(x, true)?, y)
}

/// Mean cross-entropy of `logits` against `y`, and the gradient of every parameter of `store`.
fn grads_of(store: &ParamStore, logits: &Tensor, y: &Tensor) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let loss = candle_nn::loss::cross_entropy(logits, y)?;
    let value = loss.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        anyhow::bail!("training loss is {value}: the run diverged (try a smaller optim.lr)");
    }
    let mut gs = loss.backward()?;
    let mut grads = BTreeMap::new();
    for (name, var) in &store.params {
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

// ---------------------------------------------------------------------------------------------------------
// Subnetwork data parallelism.

/// One simulated SDP worker: its physical subnetwork, where its tensors sit in the global model, its
/// optimizer state (local to its subnetwork).
pub struct Worker {
    /// Forward regime: the physical subnetwork. Backward regime: the full model.
    pub net: Box<dyn Net>,
    /// For every tensor the worker trains, the global coordinates it holds (its local coordinates).
    pub maps: BTreeMap<String, IndexMap>,
    pub opt: Optimizer,
    pub units_held: usize,
    /// Backward regime: `net` is the full model; only the coordinates in `maps` are trained and averaged,
    /// the rest are refreshed from the holders at every synchronisation.
    pub full_model: bool,
    /// Backward regime: for each partly held tensor, a global-shaped 0/1 mask of the held coordinates
    /// (fixed while the selection is; computed once, not at every step).
    held_masks: BTreeMap<String, Tensor>,
}

impl Worker {
    fn var(&self, name: &str) -> Option<&Var> {
        let s = self.net.store();
        s.params.get(name).or_else(|| s.buffers.get(name))
    }

    /// The worker's value of the coordinates it holds of `name` (local shape), if it holds any.
    pub fn local(&self, name: &str) -> Result<Option<Tensor>> {
        let (Some(map), Some(var)) = (self.maps.get(name), self.var(name)) else { return Ok(None) };
        let t = var.as_tensor().detach();
        Ok(Some(if self.full_model { map.gather(&t)? } else { t }))
    }

    /// Takes the averaged global value of `name`: its held coordinates, and in the backward regime
    /// every other coordinate too (non-held parameters are refreshed from their holders).
    fn receive(&self, name: &str, global: &Tensor) -> Result<()> {
        let Some(var) = self.var(name) else { return Ok(()) };
        match self.maps.get(name) {
            // `set` copies, so a whole tensor needs no gathered copy first.
            Some(map) if !self.full_model && !map.is_full() => var.set(&map.gather(global)?)?,
            Some(_) => var.set(global)?,
            None if self.full_model => var.set(global)?,
            None => {}
        }
        Ok(())
    }

    /// Local gradients (held coordinates) from the gradients of a forward/backward pass of `net`.
    fn local_grads(&self, grads: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        if !self.full_model {
            return Ok(grads);
        }
        let mut out = BTreeMap::new();
        for (name, g) in grads {
            if let Some(map) = self.maps.get(&name) {
                out.insert(name, map.gather(&g)?);
            }
        }
        Ok(out)
    }

    /// One optimizer step on the held coordinates with local gradients.
    fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        if !self.full_model {
            return Ok(self.opt.step(&self.net.store().params, grads, lr)?);
        }
        // Optimizer state lives on the held coordinates only: step local copies, then write them back.
        let store = self.net.store().clone();
        let mut local = BTreeMap::new();
        for name in grads.keys() {
            let (Some(map), Some(var)) = (self.maps.get(name), store.params.get(name)) else { continue };
            local.insert(name.clone(), Var::from_tensor(&map.gather(var.as_tensor())?)?);
        }
        self.opt.step(&local, grads, lr)?;
        for (name, v) in local {
            let (map, var) = (&self.maps[&name], &store.params[&name]);
            let new = if map.is_full() {
                v.as_tensor().clone()
            } else {
                let held = self.held_masks.get(&name).ok_or_else(|| anyhow::anyhow!("no held mask for {name}"))?;
                held.where_cond(&map.scatter(v.as_tensor())?, var.as_tensor())?
            };
            var.set(&new)?;
        }
        Ok(())
    }
}

/// The state of an SDP run: the assembled global model and the K workers.
pub struct SdpState {
    pub arch: Arch,
    pub global: Box<dyn Net>,
    pub workers: Vec<Worker>,
    pub units: Vec<Unit>,
    pub selection: Selection,
    /// Gradient alignment records (`method.align_every`).
    pub alignment: Vec<AlignRow>,
    shapes: BTreeMap<String, Vec<usize>>,
    averager: LocalAverager,
    /// Activation dtype of every model built (`workload.precision`).
    compute: DType,
}

impl SdpState {
    /// Builds the global model from the run seed and every worker's subnetwork from the first selection.
    pub fn new(spec: &RunSpec, num_classes: usize, device: &Device) -> Result<Self> {
        Self::build(spec, num_classes, device, None)
    }

    /// Builds worker `k`'s physical subnetwork alone, as a process hosting only that worker would (used by
    /// the memory probe): the global model is built to gather from, then dropped.
    pub fn single_worker(spec: &RunSpec, num_classes: usize, k: usize, device: &Device) -> Result<Worker> {
        if k >= spec.method.workers {
            anyhow::bail!("worker {k} does not exist: the spec has {} workers", spec.method.workers);
        }
        let mut st = Self::build(spec, num_classes, device, Some(k))?;
        st.workers.pop().ok_or_else(|| anyhow::anyhow!("worker {k} was not built"))
    }

    fn build(spec: &RunSpec, num_classes: usize, device: &Device, only: Option<usize>) -> Result<Self> {
        let arch = Arch::of(&spec.workload, num_classes)?;
        let compute = spec.workload.precision.dtype();
        let global = arch.build(None, 1.0, None, Builder::from_seed(spec.seed, device).with_compute_dtype(compute))?;
        let strategy = masking::strategy(&spec.method.masking)?;
        let units = arch.units(strategy.kind());
        let shapes = subnet::shapes(global.store());
        let mut st = Self {
            arch,
            global,
            workers: Vec::new(),
            units,
            selection: Selection { holds: vec![], m: 0 },
            alignment: Vec::new(),
            shapes,
            averager: LocalAverager::new(),
            compute,
        };
        st.draw(spec, 0, device, only)?;
        Ok(st)
    }

    /// Draws selection number `draw` and rebuilds the workers from the global model's current values.
    /// Optimizer state starts afresh for the new subnetworks.
    pub fn redraw(&mut self, spec: &RunSpec, draw: u64, device: &Device) -> Result<()> {
        self.draw(spec, draw, device, None)
    }

    fn draw(&mut self, spec: &RunSpec, draw: u64, device: &Device, only: Option<usize>) -> Result<()> {
        let m = &spec.method;
        let strategy = masking::strategy(&m.masking)?;
        let mut r = rng(spec.seed, Stream::Mask, draw, 0);
        self.selection = strategy.select(&self.units, m.workers, m.coverage, &mut r)?;
        let widths = self.arch.block_widths();
        let keeps = subnet::keeps(&widths, &self.units, &self.selection.holds);
        let values = self.global.store().values();
        self.workers.clear();
        for (k, keep) in keeps.iter().enumerate().filter(|(k, _)| only.is_none_or(|o| o == *k)) {
            let maps = self.arch.maps(&self.shapes, keep);
            let full_model = m.regime == Regime::Backward;
            // HeteroFL-style scaler: kept activations × 1/keep in training (block units: the branch, kept
            // by m of K workers; neuron units: the internal activations, kept_b of n_b per block).
            let rescale: Option<Vec<(f64, f64)>> = m.rescale.then(|| {
                keep.iter()
                    .zip(&widths)
                    .map(|(kp, &n)| match self.units.first().map(|u| u.kind) {
                        Some(UnitKind::Block) => (m.workers as f64 / self.selection.m.max(1) as f64, 1.0),
                        _ => (1.0, n as f64 / kp.channels.len().max(1) as f64),
                    })
                    .collect()
            });
            let net = if full_model {
                self.arch.build(
                    None,
                    1.0,
                    None,
                    Builder::from_tensors(&values, device).with_compute_dtype(self.compute),
                )?
            } else {
                let local: BTreeMap<String, Tensor> =
                    maps.iter().map(|(n, map)| Ok((n.clone(), map.gather(&values[n])?))).collect::<Result<_>>()?;
                let b = Builder::from_tensors(&local, device).with_compute_dtype(self.compute);
                self.arch.build(Some(keep), 1.0, rescale.as_deref(), b)?
            };
            let units_held = self.selection.holds[k].iter().filter(|&&h| h).count();
            let mut held_masks = BTreeMap::new();
            if full_model {
                for (name, map) in maps.iter().filter(|(_, m)| !m.is_full()) {
                    let ones = Tensor::ones(map.local_shape().as_slice(), candle_core::DType::F32, device)?;
                    held_masks.insert(name.clone(), map.scatter(&ones)?.gt(0f64)?);
                }
            }
            let opt = Optimizer::new(&spec.optim);
            self.workers.push(Worker { net, maps, opt, units_held, full_model, held_masks });
        }
        self.averager = LocalAverager::new();
        Ok(())
    }

    /// Averages every parameter (and, with `buffers`, every BN statistic) among its holders into the
    /// global model, and hands each worker the averaged values of its coordinates.
    pub fn sync_params(&mut self, buffers: bool) -> Result<()> {
        self.sync(true, buffers)
    }

    /// Averages the chosen tensors among holders into the global model and hands the result back.
    fn sync(&mut self, params: bool, buffers: bool) -> Result<()> {
        let gstore = self.global.store().clone();
        let mut tensors: Vec<(&String, &Var)> = Vec::new();
        if params {
            tensors.extend(&gstore.params);
        }
        if buffers {
            tensors.extend(&gstore.buffers);
        }
        for (name, gvar) in tensors {
            let mut contribs: Vec<(&IndexMap, Tensor)> = Vec::new();
            for w in &self.workers {
                if let Some(t) = w.local(name)? {
                    contribs.push((&w.maps[name], t));
                }
            }
            let mean = self.averager.average(name, gvar.as_tensor(), &contribs)?;
            gvar.set(&mean)?;
            for w in &self.workers {
                w.receive(name, &mean)?;
            }
        }
        Ok(())
    }

    /// Averages each worker's gradients among holders; returns every worker's averaged local gradients.
    fn average_grads(&mut self, grads: &[BTreeMap<String, Tensor>]) -> Result<Vec<BTreeMap<String, Tensor>>> {
        let mut out: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new(); self.workers.len()];
        for (name, gvar) in &self.global.store().params {
            let contribs: Vec<(usize, (&IndexMap, Tensor))> = grads
                .iter()
                .enumerate()
                .filter_map(|(k, g)| g.get(name).map(|t| (k, (&self.workers[k].maps[name], t.clone()))))
                .collect();
            if contribs.is_empty() {
                continue;
            }
            let zeros = gvar.as_tensor().zeros_like()?;
            let pairs: Vec<(&IndexMap, Tensor)> = contribs.iter().map(|(_, p)| (p.0, p.1.clone())).collect();
            let mean = self.averager.average(&format!("grad:{name}"), &zeros, &pairs)?;
            for (k, (map, _)) in &contribs {
                out[*k].insert(name.clone(), map.gather(&mean)?);
            }
        }
        Ok(out)
    }
}

fn train_sdp(run: &Run, obs: &mut dyn Observer, resume: Option<TrainState>) -> Result<Final> {
    let Run { spec, data, device } = *run;
    let m = &spec.method;
    let st = RefCell::new(SdpState::new(spec, data.num_classes(), device)?);
    let aug = augment_cfg(spec, data);
    let save = |out: &mut Tensors| st.borrow().save(out);
    let restore = |r: &TrainState| st.borrow_mut().restore(spec, r, device);
    let last = epoch_loop(
        run,
        spec.train_epochs(),
        obs,
        &mut |batches, lr, step| {
            let mut st = st.borrow_mut();
            if m.resample_every > 0 && step > 1 && (step - 1) % m.resample_every == 0 {
                st.sync_params(true)?;
                st.redraw(spec, ((step - 1) / m.resample_every) as u64, device)?;
            }
            sdp_step(&mut st, spec, batches, lr, step, device)
        },
        &mut || {
            let mut st = st.borrow_mut();
            st.sync_params(true)?;
            let modes = evaluate_sdp(&st, spec, data, &aug, device)?;
            let (test_loss, test_acc) = modes[&m.eval_mode];
            Ok(Evaluation {
                test_loss,
                test_acc,
                modes: modes.iter().map(|(k, v)| (k.name().to_string(), v.1)).collect(),
            })
        },
        &Snapshot { save: &save, restore: &restore },
        resume,
    )?;
    let st = st.into_inner();
    obs.accounting(&st.accounting(spec, (data.train.h, data.train.w)))?;
    Ok(last)
}

/// One SDP step, in either regime (each worker's model is its physical subnetwork in the forward regime,
/// the full model with its held coordinates trained in the backward regime). `step` counts from 1. Returns
/// the mean loss over the workers.
pub fn sdp_step(
    st: &mut SdpState,
    spec: &RunSpec,
    batches: &[Batch],
    lr: f64,
    step: usize,
    device: &Device,
) -> Result<f64> {
    let m = &spec.method;
    let mut loss_sum = 0.0;
    let mut all_grads = Vec::with_capacity(batches.len());
    let align = m.align_every > 0 && step.is_multiple_of(m.align_every);
    for (k, batch) in batches.iter().enumerate() {
        let (x, y) = batch.to_tensors(device)?;
        let worker = &st.workers[k];
        let (loss, grads) = loss_and_grads(worker.net.as_ref(), &x, &y)?;
        let grads = worker.local_grads(grads)?;
        if align {
            let cosine = st.alignment_of(k, &grads, &x, &y)?;
            st.alignment.push(AlignRow { run_id: String::new(), step, worker: k, cosine_to_full_grad: cosine });
        }
        let worker = &mut st.workers[k];
        loss_sum += loss;
        match m.sync {
            SyncMode::Params => worker.step(&grads, lr)?,
            SyncMode::Grads => all_grads.push(grads),
        }
    }
    match m.sync {
        SyncMode::Grads => {
            let avg = st.average_grads(&all_grads)?;
            for (worker, g) in st.workers.iter_mut().zip(&avg) {
                worker.step(g, lr)?;
            }
            // Parameters stay identical on holders; BN statistics are averaged every step. The backward
            // regime also refreshes the non-held parameters of every full model.
            let params = st.workers.iter().any(|w| w.full_model);
            st.sync(params, true)?;
        }
        SyncMode::Params => {
            if step.is_multiple_of(m.sync_every) {
                st.sync_params(true)?;
            }
        }
    }
    Ok(loss_sum / batches.len() as f64)
}

impl SdpState {
    /// Adds the global model and every worker's subnetwork and optimizer state to a checkpoint; returns
    /// the alignment records so far.
    fn save(&self, out: &mut Tensors) -> Result<serde_json::Value> {
        checkpoint::save_store("global", self.global.store(), out)?;
        for (k, w) in self.workers.iter().enumerate() {
            checkpoint::save_store(&format!("worker{k}"), w.net.store(), out)?;
            checkpoint::save_optimizer(&format!("worker{k}"), &w.opt, out)?;
        }
        let align: Vec<(usize, usize, String)> =
            self.alignment.iter().map(|a| (a.step, a.worker, checkpoint::exact(a.cosine_to_full_grad))).collect();
        Ok(serde_json::json!({ "alignment": align }))
    }

    /// Restores the state saved by [`Self::save`] at step `r.step`: the selection in force then (a pure
    /// function of the seed and the draw number), then every tensor.
    fn restore(&mut self, spec: &RunSpec, r: &TrainState, device: &Device) -> Result<()> {
        let every = spec.method.resample_every;
        let draw = if every > 0 && r.step > 0 { (r.step - 1) / every } else { 0 };
        if draw > 0 {
            self.redraw(spec, draw as u64, device)?;
        }
        checkpoint::restore_store("global", self.global.store(), &r.tensors)?;
        for (k, w) in self.workers.iter_mut().enumerate() {
            checkpoint::restore_store(&format!("worker{k}"), w.net.store(), &r.tensors)?;
            checkpoint::restore_optimizer(&format!("worker{k}"), &mut w.opt, &r.tensors, device)?;
        }
        let align: Vec<(usize, usize, String)> = match r.method.get("alignment") {
            Some(v) => serde_json::from_value(v.clone()).context("checkpoint: alignment records")?,
            None => Vec::new(),
        };
        self.alignment = align
            .into_iter()
            .map(|(step, worker, c)| {
                Ok(AlignRow { run_id: String::new(), step, worker, cosine_to_full_grad: checkpoint::parse_exact(&c)? })
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// The global model rebuilt with a per-block plan scale (stochastic-depth-style evaluation).
    fn scaled_global(&self, scale: f64, device: &Device) -> Result<Box<dyn Net>> {
        let values = self.global_values();
        Ok(self.arch.build(
            None,
            scale,
            None,
            Builder::from_tensors(&values, device).with_compute_dtype(self.compute),
        )?)
    }

    fn global_values(&self) -> BTreeMap<String, Tensor> {
        self.global.store().values()
    }

    /// Cosine between worker k's local gradient and the full (global) model's gradient on the same batch,
    /// over worker k's coordinates. The global model's BN statistics are left untouched.
    fn alignment_of(&self, k: usize, local: &BTreeMap<String, Tensor>, x: &Tensor, y: &Tensor) -> Result<f64> {
        let store = self.global.store();
        let saved = store.buffer_tensors()?;
        let (_, full) = loss_and_grads(self.global.as_ref(), x, y)?;
        store.set_buffers(&saved)?;
        let (mut dot, mut n_local, mut n_full) = (0.0f64, 0.0f64, 0.0f64);
        for (name, g) in local {
            let f = self.workers[k].maps[name].gather(&full[name])?;
            dot += (g * &f)?.sum_all()?.to_scalar::<f32>()? as f64;
            n_local += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            n_full += f.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(dot / (n_local.sqrt() * n_full.sqrt()).max(1e-30))
    }

    /// Memory and communication of every worker, and the spectral gap of the averaging graph.
    pub fn accounting(&self, spec: &RunSpec, hw: (usize, usize)) -> Accounting {
        let k = self.workers.len();
        let total = self.global.store().num_params();
        let unit_bytes: Vec<usize> = self.units.iter().map(|u| u.params * 4).collect();
        let shared_bytes = (total * 4).saturating_sub(unit_bytes.iter().sum());
        let comm = metrics::comm_bytes_per_worker(&self.selection, &unit_bytes, shared_bytes, k);
        // sync = params communicates every sync_every steps; sync = grads every step.
        let per_step = match spec.method.sync {
            SyncMode::Params => 1.0 / spec.method.sync_every as f64,
            SyncMode::Grads => 1.0,
        };
        let workers = self
            .workers
            .iter()
            .zip(&comm)
            .enumerate()
            .map(|(worker, (w, c))| {
                // Held (trained) scalars; the backward regime stores the whole model but trains these.
                let held: usize =
                    w.net.store().params.keys().filter_map(|n| w.maps.get(n)).map(|m| m.local_len()).sum();
                WorkerRow {
                    run_id: String::new(),
                    worker,
                    units_held: w.units_held,
                    param_fraction: held as f64 / total.max(1) as f64,
                    param_bytes: w.net.store().num_params() * 4,
                    grad_bytes: held * 4,
                    optim_bytes: w.opt.state_bytes(),
                    activation_bytes_est: w.net.activation_elems(hw.0, hw.1) * spec.workload.batch_size * 4,
                    peak_bytes_measured: None,
                    comm_bytes_per_step: c.grouped * per_step,
                    comm_bytes_per_step_masked: c.masked_allreduce * per_step,
                }
            })
            .collect();
        Accounting {
            workers,
            spectral_gap: Some(metrics::spectral_gap(&self.selection, &unit_bytes)),
            holders: self.selection.m,
            extra: BTreeMap::new(),
            alignment: self.alignment.clone(),
        }
    }

    /// Fraction of the workers holding each unit (m/K for uniform-representation strategies).
    pub fn holder_fraction(&self) -> f64 {
        self.selection.m as f64 / self.workers.len().max(1) as f64
    }
}

/// Test loss and accuracy of every evaluation mode.
pub fn evaluate_sdp(
    st: &SdpState,
    spec: &RunSpec,
    data: &Dataset,
    aug: &AugmentCfg,
    device: &Device,
) -> Result<BTreeMap<EvalMode, (f64, f64)>> {
    let batch = spec.workload.eval_batch_size;
    let mut out = BTreeMap::new();
    // Recalibrated copy: BN statistics recomputed on training batches in train mode, no gradient.
    let recal = st.scaled_global(1.0, device)?;
    recalibrate_bn(recal.as_ref(), data, aug, batch, spec.seed, device)?;
    let full = if spec.method.bn_stats == BnStats::Recompute { &recal } else { &st.global };
    out.insert(EvalMode::Full, evaluate(full.as_ref(), data, aug, batch, device)?);
    out.insert(EvalMode::Recal, evaluate(recal.as_ref(), data, aug, batch, device)?);
    let frac = st.holder_fraction();
    let scaled = if frac < 1.0 {
        evaluate(st.scaled_global(frac, device)?.as_ref(), data, aug, batch, device)?
    } else {
        out[&EvalMode::Full]
    };
    out.insert(EvalMode::Scaled, scaled);
    // Ensemble (mean softmax) and individual subnetworks.
    let (mut ens_loss, mut ens_correct, mut sub_correct, mut n) = (0.0, 0usize, vec![0usize; st.workers.len()], 0usize);
    let mut sub_loss = vec![0.0; st.workers.len()];
    for b in eval_batches(&data.test, aug, batch) {
        let (x, y) = b.to_tensors(device)?;
        let mut prob_sum: Option<Tensor> = None;
        for (k, w) in st.workers.iter().enumerate() {
            let logits = w.net.forward_t(&x, false)?.detach();
            sub_loss[k] += candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64 * b.len() as f64;
            sub_correct[k] += count_correct(&logits, &b.y)?;
            let p = candle_nn::ops::softmax_last_dim(&logits)?;
            prob_sum = Some(match prob_sum {
                Some(s) => (s + p)?,
                None => p,
            });
        }
        let probs = match prob_sum {
            Some(p) => (p / st.workers.len() as f64)?,
            None => anyhow::bail!("no workers"),
        };
        ens_loss +=
            candle_nn::loss::nll(&probs.clamp(1e-12f32, 1f32)?.log()?, &y)?.to_scalar::<f32>()? as f64 * b.len() as f64;
        ens_correct += count_correct(&probs, &b.y)?;
        n += b.len();
    }
    let n = n.max(1) as f64;
    let kf = st.workers.len() as f64;
    out.insert(EvalMode::Ensemble, (ens_loss / n, ens_correct as f64 / n));
    out.insert(
        EvalMode::SubnetMean,
        (sub_loss.iter().sum::<f64>() / n / kf, sub_correct.iter().sum::<usize>() as f64 / n / kf),
    );
    Ok(out)
}

fn count_correct(scores: &Tensor, labels: &[u32]) -> Result<usize> {
    let pred = scores.argmax(1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, t)| p == t).count())
}

/// Batches of training data used to recalibrate BatchNorm statistics.
pub const RECAL_BATCHES: usize = 10;

/// Recomputes BN running statistics of `net` as the mean batch statistics of [`RECAL_BATCHES`] training
/// batches in train mode (no gradient), like PyTorch's `momentum=None` cumulative average.
pub fn recalibrate_bn(
    net: &dyn Net,
    data: &Dataset,
    aug: &AugmentCfg,
    batch: usize,
    seed: u64,
    device: &Device,
) -> Result<()> {
    let store = net.store();
    if store.buffers.is_empty() {
        return Ok(());
    }
    let perm = crate::data::loader::permutation(seed, usize::MAX, data.train.len());
    let batch = batch.min(data.train.len()).max(1);
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut count = 0;
    let zeros: BTreeMap<String, Tensor> =
        store.buffers.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().zeros_like()?))).collect::<Result<_>>()?;
    for chunk in perm.chunks(batch).take(RECAL_BATCHES) {
        if chunk.len() < 2 {
            break;
        }
        store.set_buffers(&zeros)?;
        let b = crate::data::loader::make_batch(&data.train, chunk, aug, None);
        let (x, _) = b.to_tensors(device)?;
        net.forward_t(&x, true)?;
        // From zero, one update leaves momentum × (batch statistic): divide it back out.
        let stats = scale(store.buffer_tensors()?, 1.0 / crate::models::layers::BN_MOMENTUM)?;
        accumulate(&mut sums, stats)?;
        count += 1;
    }
    if count > 0 {
        store.set_buffers(&scale(sums, 1.0 / count as f64)?)?;
    }
    Ok(())
}
