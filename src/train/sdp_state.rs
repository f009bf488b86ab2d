//! SDP's state (docs/design.md §1–§2): the assembled global model, and the K simulated workers, each with
//! its physical subnetwork (or, in the backward regime, the full model with the coordinates it holds), its
//! index maps into the global model and its own optimizer state. Builds and redraws the workers from a
//! selection, averages among holders ([`SdpState::sync`], [`SdpState::average_grads`]) and saves its
//! state in a checkpoint.

use super::grads::loss_and_grads;
use crate::checkpoint::{self, Tensors, TrainState};
use crate::comm::{Averager, GroupedAverager, Layout, LocalAverager, SyncTensor, World};
use crate::masking::{self, Selection};
use crate::models::layers::Builder;
use crate::models::{self, BlockPlan, Family, Net, Unit, UnitKind};
use crate::optim::Optimizer;
use crate::plan::Plan;
use crate::results::AlignRow;
use crate::seed::{rng, Stream};
use crate::spec::{Regime, RunSpec};
use crate::subnet::{self, IndexMap};
use crate::task::Task;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;

/// One simulated SDP worker: its physical subnetwork, where its tensors sit in the global model, its
/// optimizer state (local to its subnetwork).
pub struct Worker {
    /// Its index k among the K workers (it lives on rank k mod N).
    pub index: usize,
    /// Forward regime: the physical subnetwork. Backward regime: the full model.
    pub net: Box<dyn Net>,
    /// For every tensor the worker trains, the global coordinates it holds (its local coordinates).
    pub maps: BTreeMap<String, IndexMap>,
    /// The worker's optimizer, its state on the held coordinates only.
    pub opt: Optimizer,
    /// Maskable units the worker holds.
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
    pub(super) fn local_grads(&self, grads: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
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
    pub(super) fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
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
    /// The model family, which builds the global model and every subnetwork.
    pub family: Box<dyn Family>,
    /// The masking strategy `method.masking` names.
    pub strategy: masking::Registered,
    /// What the run learns (its loss and metric), from the dataset.
    pub task: &'static dyn Task,
    /// The assembled full model: every coordinate the mean of its holders' values at the last sync.
    pub global: Box<dyn Net>,
    /// The workers this process hosts: all K in the one-process simulation, k ≡ rank (mod N) of N processes.
    pub workers: Vec<Worker>,
    /// The model's maskable units, of the masking strategy's kind.
    pub units: Vec<Unit>,
    /// Which worker holds which unit (the current draw).
    pub selection: Selection,
    /// Gradient alignment records (`method.align_every`).
    pub alignment: Vec<AlignRow>,
    shapes: BTreeMap<String, Vec<usize>>,
    averager: Box<dyn Averager>,
    /// The processes the workers are spread over.
    world: World,
    /// Bytes this process put on the wire in the training steps' synchronisations, over `steps` steps.
    step_bytes: f64,
    steps: usize,
    /// Activation dtype of every model built (`workload.precision`).
    compute: DType,
    /// The run the state was built for: its seed, method, optimizer and precision are what the draws, the
    /// steps, a restore and the accounting read.
    pub spec: RunSpec,
    /// Where every model lives.
    pub device: Device,
}

impl SdpState {
    /// Builds the global model from the run seed and every worker's subnetwork from the first selection,
    /// all in this process, resolving the spec's plan (tests and one-process tools; training passes the
    /// plan it resolved to [`SdpState::hosted`]).
    pub fn new(spec: &RunSpec, num_classes: usize, device: &Device) -> Result<Self> {
        Self::build(spec, &Plan::of(spec)?, num_classes, device, None, &World::solo())
    }

    /// This process's share of a run spread over `world`: the workers k ≡ rank (mod N), and the averager
    /// among the processes (one process: [`SdpState::new`]).
    pub fn hosted(spec: &RunSpec, plan: &Plan, num_classes: usize, device: &Device, world: &World) -> Result<Self> {
        Self::build(spec, plan, num_classes, device, None, world)
    }

    /// Builds worker `k`'s physical subnetwork alone, as a process hosting only that worker would (used by
    /// the memory probe): the global model is built to gather from, then dropped.
    pub fn single_worker(spec: &RunSpec, plan: &Plan, num_classes: usize, k: usize, device: &Device) -> Result<Worker> {
        if k >= spec.method.workers {
            anyhow::bail!("worker {k} does not exist: the spec has {} workers", spec.method.workers);
        }
        let mut st = Self::build(spec, plan, num_classes, device, Some(k), &World::solo())?;
        st.workers.pop().ok_or_else(|| anyhow::anyhow!("worker {k} was not built"))
    }

    fn build(
        spec: &RunSpec,
        plan: &Plan,
        num_classes: usize,
        device: &Device,
        only: Option<usize>,
        world: &World,
    ) -> Result<Self> {
        let (strategy, task) = (plan.strategy, plan.task.task);
        let family = models::of(&spec.workload, num_classes)?;
        let compute = spec.workload.precision.dtype();
        let global = family.build_full(1.0, Builder::from_seed(spec.seed, device).with_compute_dtype(compute))?;
        let units = family.units(strategy.kind);
        let shapes = subnet::shapes(global.store());
        let mut st = Self {
            family,
            strategy,
            task,
            global,
            workers: Vec::new(),
            units,
            selection: Selection { holds: vec![], m: 0 },
            alignment: Vec::new(),
            shapes,
            averager: if world.size() == 1 {
                Box::new(LocalAverager::new())
            } else {
                // The backward regime refreshes every coordinate of every full model at each sync.
                let layout = if spec.method.regime == Regime::Backward { Layout::Masked } else { Layout::Grouped };
                Box::new(GroupedAverager::new(world.comm.clone(), spec.method.workers, layout)?)
            },
            world: world.clone(),
            step_bytes: 0.0,
            steps: 0,
            compute,
            spec: spec.clone(),
            device: device.clone(),
        };
        st.draw(0, only)?;
        Ok(st)
    }

    /// Draws selection number `draw` and rebuilds the workers from the global model's current values.
    /// Optimizer state starts afresh for the new subnetworks.
    pub fn redraw(&mut self, draw: u64) -> Result<()> {
        self.draw(draw, None)
    }

    fn draw(&mut self, draw: u64, only: Option<usize>) -> Result<()> {
        let (spec, device) = (&self.spec, &self.device);
        let m = &spec.method;
        let mut r = rng(spec.seed, Stream::Mask, draw, 0);
        self.selection = self.strategy.select(&self.units, m.workers, m.coverage, &mut r)?;
        let widths = self.family.block_widths();
        let plans = subnet::plans(&widths, &self.units, &self.selection.holds);
        let values = self.global.store().values();
        // Every worker's maps, hosted here or not: every process must know every coordinate's holders.
        let all_maps: Vec<BTreeMap<String, IndexMap>> =
            plans.iter().map(|plan| subnet::maps(self.family.as_ref(), &self.shapes, plan)).collect();
        let (n, rank) = (self.world.size(), self.world.rank());
        let hosted = |k: usize| only.map_or(k % n == rank, |o| o == k);
        self.workers.clear();
        for (k, plan) in plans.iter().enumerate().filter(|(k, _)| hosted(*k)) {
            let maps = all_maps[k].clone();
            let full_model = m.regime == Regime::Backward;
            // HeteroFL-style scaler: kept activations × 1/keep in training (block units: the branch, kept
            // by m of K workers; neuron units: the internal activations, kept_b of n_b per block).
            let plan: Vec<BlockPlan> = if m.rescale {
                plan.iter()
                    .zip(&widths)
                    .map(|(p, &n)| {
                        let (scale, mid_scale) = match self.units.first().map(|u| u.kind) {
                            Some(UnitKind::Block) => (m.workers as f64 / self.selection.m.max(1) as f64, 1.0),
                            _ => (1.0, n as f64 / p.channels.len().max(1) as f64),
                        };
                        BlockPlan { scale, mid_scale, ..p.clone() }
                    })
                    .collect()
            } else {
                plan.clone()
            };
            let net = if full_model {
                self.family.build_full(1.0, Builder::from_tensors(&values, device).with_compute_dtype(self.compute))?
            } else {
                let local: BTreeMap<String, Tensor> =
                    maps.iter().map(|(n, map)| Ok((n.clone(), map.gather(&values[n])?))).collect::<Result<_>>()?;
                let b = Builder::from_tensors(&local, device).with_compute_dtype(self.compute);
                self.family.build(&plan, b)?
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
            self.workers.push(Worker { index: k, net, maps, opt, units_held, full_model, held_masks });
        }
        self.averager.set_selection(&all_maps)
    }

    /// Averages every parameter (and, with `buffers`, every BN statistic) among its holders into the
    /// global model, and hands each worker the averaged values of its coordinates.
    pub fn sync_params(&mut self, buffers: bool) -> Result<()> {
        self.sync(true, buffers)
    }

    /// Averages the chosen tensors among holders into the global model and hands the result back: one
    /// call of the averager for the whole synchronisation.
    pub(super) fn sync(&mut self, params: bool, buffers: bool) -> Result<()> {
        let gstore = self.global.store().clone();
        let mut tensors: Vec<(&String, &Var)> = Vec::new();
        if params {
            tensors.extend(&gstore.params);
        }
        if buffers {
            tensors.extend(&gstore.buffers);
        }
        let mut items = Vec::with_capacity(tensors.len());
        for (name, gvar) in &tensors {
            let mut contributions = Vec::new();
            for w in &self.workers {
                if let Some(t) = w.local(name)? {
                    contributions.push((w.index, t));
                }
            }
            items.push(SyncTensor { name, global: gvar.as_tensor().clone(), contributions });
        }
        let means = self.averager.average(&items)?;
        for ((name, gvar), mean) in tensors.into_iter().zip(means) {
            gvar.set(&mean)?;
            for w in &self.workers {
                w.receive(name, &mean)?;
            }
        }
        Ok(())
    }

    /// Averages each hosted worker's gradients among holders; returns their averaged local gradients.
    pub(super) fn average_grads(
        &mut self,
        grads: &[BTreeMap<String, Tensor>],
    ) -> Result<Vec<BTreeMap<String, Tensor>>> {
        let mut out: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new(); self.workers.len()];
        let gstore = self.global.store();
        let mut items = Vec::new();
        for (name, gvar) in &gstore.params {
            let contributions: Vec<(usize, Tensor)> = grads
                .iter()
                .zip(&self.workers)
                .filter_map(|(g, w)| g.get(name).map(|t| (w.index, t.clone())))
                .collect();
            items.push(SyncTensor { name, global: gvar.as_tensor().zeros_like()?, contributions });
        }
        let means = self.averager.average(&items)?;
        for (item, mean) in items.iter().zip(means) {
            for (pos, w) in self.workers.iter().enumerate() {
                if grads[pos].contains_key(item.name) {
                    out[pos].insert(item.name.to_string(), w.maps[item.name].gather(&mean)?);
                }
            }
        }
        Ok(out)
    }

    /// Makes every coordinate of the global model current and identical in every process (a no-op in one
    /// process): before an evaluation, a new selection, or the end of the run.
    pub fn assemble_global(&mut self) -> Result<()> {
        if self.averager.complete() {
            return Ok(());
        }
        let store = self.global.store().clone();
        let vars: Vec<(&String, &Var)> = store.params.iter().chain(&store.buffers).collect();
        let items: Vec<(&str, Tensor)> = vars.iter().map(|(n, v)| (n.as_str(), v.as_tensor().clone())).collect();
        for ((_, var), value) in vars.iter().zip(self.averager.assemble(&items)?) {
            var.set(&value)?;
        }
        Ok(())
    }

    /// The processes the workers are spread over.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Bytes this process has put on the wire so far.
    pub(super) fn bytes_sent(&self) -> f64 {
        self.averager.bytes_sent()
    }

    /// Counts a training step and what its synchronisations sent (from `sent_before`).
    pub(super) fn count_step(&mut self, sent_before: f64) {
        self.step_bytes += self.averager.bytes_sent() - sent_before;
        self.steps += 1;
    }

    /// Bytes this process put on the wire per training step, on average.
    pub(super) fn step_bytes_per_step(&self) -> f64 {
        self.step_bytes / self.steps.max(1) as f64
    }

    /// `x` summed over the processes (itself in one process).
    pub(super) fn world_sum(&self, x: f64) -> Result<f64> {
        let mut v = [x];
        self.world.comm.all_reduce_sum_f64(&mut v)?;
        Ok(v[0])
    }

    /// Adds the global model (assembled: current on every coordinate, a collective call in a run spread
    /// over processes), and each hosted worker's subnetwork, optimizer state and gradient alignment
    /// records, as `worker<k>/…` (k its index among all K workers, so that a checkpoint resumes with the
    /// workers hosted by any number of processes). The live state is left as it is.
    pub(super) fn save(&mut self, out: &mut Tensors) -> Result<serde_json::Value> {
        let store = self.global.store().clone();
        let vars: Vec<(&String, &Var)> = store.params.iter().chain(&store.buffers).collect();
        let items: Vec<(&str, Tensor)> = vars.iter().map(|(n, v)| (n.as_str(), v.as_tensor().detach())).collect();
        let values = if self.averager.complete() {
            items.iter().map(|(_, t)| t.clone()).collect()
        } else {
            self.averager.assemble(&items)?
        };
        for ((name, _), value) in items.iter().zip(values) {
            out.insert(format!("global/model/{name}"), value);
        }
        for w in &self.workers {
            let prefix = format!("worker{}", w.index);
            checkpoint::save_store(&prefix, w.net.store(), out)?;
            checkpoint::save_optimizer(&prefix, &w.opt, out)?;
            // (step, cosine) rows, exact in f64.
            let rows: Vec<f64> = self
                .alignment
                .iter()
                .filter(|a| a.worker == w.index)
                .flat_map(|a| [a.step as f64, a.cosine_to_full_grad])
                .collect();
            if !rows.is_empty() {
                let n = rows.len() / 2;
                out.insert(format!("{prefix}/align"), Tensor::from_vec(rows, (n, 2), &Device::Cpu)?);
            }
        }
        Ok(serde_json::Value::Null)
    }

    /// Restores the state saved by [`Self::save`] at step `r.step`: the selection in force then (a pure
    /// function of the seed and the draw number), then every tensor of the workers hosted here.
    pub(super) fn restore(&mut self, r: &TrainState) -> Result<()> {
        let every = self.spec.method.resample_every;
        let draw = if every > 0 && r.step > 0 { (r.step - 1) / every } else { 0 };
        if draw > 0 {
            self.redraw(draw as u64)?;
        }
        let device = &self.device.clone();
        checkpoint::restore_store("global", self.global.store(), &r.tensors)?;
        let mut alignment = Vec::new();
        for w in self.workers.iter_mut() {
            let prefix = format!("worker{}", w.index);
            checkpoint::restore_store(&prefix, w.net.store(), &r.tensors)?;
            checkpoint::restore_optimizer(&prefix, &mut w.opt, &r.tensors, device)?;
            if let Some(t) = r.tensors.get(&format!("{prefix}/align")) {
                for row in t.to_dtype(DType::F64)?.to_vec2::<f64>()? {
                    alignment.push(AlignRow {
                        run_id: String::new(),
                        step: row[0] as usize,
                        worker: w.index,
                        cosine_to_full_grad: row[1],
                    });
                }
            }
        }
        // Format 1 kept the (one-process) records in the JSON.
        if let Some(v) = r.method.get("alignment") {
            let rows: Vec<(usize, usize, String)> =
                serde_json::from_value(v.clone()).context("checkpoint: alignment records")?;
            for (step, worker, c) in rows {
                let cosine_to_full_grad = checkpoint::parse_exact(&c)?;
                alignment.push(AlignRow { run_id: String::new(), step, worker, cosine_to_full_grad });
            }
        }
        // The order they were recorded in: by step, then by worker.
        alignment.sort_by_key(|a| (a.step, a.worker));
        self.alignment = alignment;
        Ok(())
    }

    /// The global model rebuilt with a per-block plan scale (stochastic-depth-style evaluation).
    pub(super) fn scaled_global(&self, scale: f64, device: &Device) -> Result<Box<dyn Net>> {
        let values = self.global_values();
        Ok(self.family.build_full(scale, Builder::from_tensors(&values, device).with_compute_dtype(self.compute))?)
    }

    fn global_values(&self) -> BTreeMap<String, Tensor> {
        self.global.store().values()
    }

    /// Cosine between worker k's local gradient and the full (global) model's gradient on the same batch,
    /// over worker k's coordinates. The global model's BN statistics are left untouched.
    pub(super) fn alignment_of(
        &self,
        k: usize,
        local: &BTreeMap<String, Tensor>,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<f64> {
        let store = self.global.store();
        let saved = store.buffer_tensors()?;
        let (_, full) = loss_and_grads(self.task, self.global.as_ref(), x, y)?;
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

    /// Fraction of the workers holding each unit (m/K for uniform-representation strategies).
    pub fn holder_fraction(&self) -> f64 {
        // K is every worker of the run, not the ones this process hosts.
        self.selection.m as f64 / self.selection.workers().max(1) as f64
    }
}
