//! A training method added from outside the crate as a user would add one: local SGD, data parallelism
//! whose K workers each keep their own copy of the model, take their own optimizer steps on their own
//! batches, and average parameters and BatchNorm statistics every H = `method.sync_every` steps (the spec
//! field SDP's `sync = "params"` already uses for the same period). It is one type implementing
//! `MethodRules` and `Method`, registered with `sdp::train::methods::register`; specs then name it in
//! `method.kind`, and training, the memory probe, the bench and the cost estimate take it like a built-in
//! method. Nothing in the crate changed for it.

mod common;

use anyhow::Result;
use candle_core::{Device, Tensor};
use sdp::checkpoint::{self, Tensors, TrainState};
use sdp::comm::World;
use sdp::data::examples::Batch;
use sdp::models::{self, Net};
use sdp::optim::Optimizer;
use sdp::progress::Quiet;
use sdp::spec::{MethodRules, RunSpec};
use sdp::task::Task;
use sdp::train::methods::{self, Method, Site, WholeStep, WorkerNet};
use sdp::train::{self, dp_accounting, loss_and_grads, single_mode, Accounting, Evaluation, Run, Trainer};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Once};

/// Local SGD (`method.kind = "local_sgd"`).
struct LocalSgd;

impl MethodRules for LocalSgd {
    fn name(&self) -> &'static str {
        "local_sgd"
    }

    fn field_matters(&self, _spec: &RunSpec, field: &str) -> bool {
        ["kind", "workers", "sync_every"].contains(&field)
    }
}

impl Method for LocalSgd {
    fn trainer<'a>(&self, run: Run<'a>) -> Result<Box<dyn Trainer + 'a>> {
        let workers = Workers::new(run.spec, run.data.num_classes(), run.device)?;
        Ok(Box::new(State { run, workers }))
    }

    /// Every worker trains the whole model.
    fn worker_net(&self, site: Site, _worker: Option<usize>) -> Result<WorkerNet> {
        let spec = site.spec;
        Ok(WorkerNet::plain(models::build(&spec.workload, site.classes, spec.seed, site.device)?, spec))
    }

    /// The training step itself, on the K workers' models.
    fn whole_step<'a>(&self, site: Site<'a>, _world: &'a World) -> Result<WholeStep<'a>> {
        let mut w = Workers::new(site.spec, site.classes, site.device)?;
        let params = w.nets[0].store().num_params();
        let (task, device) = (site.plan.task.task, site.device);
        let step =
            Box::new(move |batches: &[Batch], lr: f64, i: usize| w.step(task, batches, lr, i, device).map(|_| ()));
        Ok(WholeStep { params, step })
    }
}

/// The K workers' models and optimizers, and the averaging period H.
struct Workers {
    nets: Vec<Box<dyn Net>>,
    opts: Vec<Optimizer>,
    every: usize,
}

impl Workers {
    /// K copies of the model from the run seed, each with a fresh optimizer.
    fn new(spec: &RunSpec, classes: usize, device: &Device) -> Result<Self> {
        let k = spec.method.workers;
        let nets = (0..k).map(|_| models::build(&spec.workload, classes, spec.seed, device)).collect::<Result<_>>()?;
        let opts = (0..k).map(|_| Optimizer::new(&spec.optim)).collect();
        Ok(Self { nets, opts, every: spec.method.sync_every })
    }

    /// Worker k's forward, backward and optimizer step on `batches[k]`, then (every H steps) the average;
    /// the mean training loss.
    fn step(&mut self, task: &dyn Task, batches: &[Batch], lr: f64, step: usize, device: &Device) -> Result<f64> {
        let mut loss = 0.0;
        for ((net, opt), batch) in self.nets.iter().zip(&mut self.opts).zip(batches) {
            let (x, y) = batch.to_tensors(device)?;
            let (l, grads) = loss_and_grads(task, net.as_ref(), &x, &y)?;
            opt.step(&net.store().params, &grads, lr)?;
            loss += l;
        }
        if step.is_multiple_of(self.every) {
            self.average()?;
        }
        Ok(loss / batches.len() as f64)
    }

    /// Every parameter and BatchNorm statistic set to its mean over the workers.
    fn average(&self) -> Result<()> {
        let k = self.nets.len() as f64;
        let first = self.nets[0].store();
        for (name, var) in first.params.iter().chain(&first.buffers) {
            let mut sum = var.as_tensor().clone();
            for net in &self.nets[1..] {
                let s = net.store();
                sum = (sum + s.params.get(name).or_else(|| s.buffers.get(name)).expect("same model").as_tensor())?;
            }
            let mean = (sum / k)?;
            for net in &self.nets {
                let s = net.store();
                s.params.get(name).or_else(|| s.buffers.get(name)).expect("same model").set(&mean)?;
            }
        }
        Ok(())
    }
}

/// Local SGD's trained state.
struct State<'a> {
    run: Run<'a>,
    workers: Workers,
}

impl Trainer for State<'_> {
    fn step(&mut self, batches: &[Batch], lr: f64, step: usize) -> Result<f64> {
        self.workers.step(self.run.step_ctx().task, batches, lr, step, self.run.device)
    }

    /// The workers' mean model (evaluating is a synchronisation).
    fn evaluate(&mut self) -> Result<Evaluation> {
        self.workers.average()?;
        single_mode(&self.run, self.workers.nets[0].as_ref())
    }

    fn save(&mut self, out: &mut Tensors) -> Result<serde_json::Value> {
        for (k, (net, opt)) in self.workers.nets.iter().zip(&self.workers.opts).enumerate() {
            checkpoint::save_store(&format!("worker{k}/net"), net.store(), out)?;
            checkpoint::save_optimizer(&format!("worker{k}/net"), opt, out)?;
        }
        Ok(serde_json::Value::Null)
    }

    fn restore(&mut self, r: &TrainState) -> Result<()> {
        for (k, (net, opt)) in self.workers.nets.iter().zip(&mut self.workers.opts).enumerate() {
            checkpoint::restore_store(&format!("worker{k}/net"), net.store(), &r.tensors)?;
            checkpoint::restore_optimizer(&format!("worker{k}/net"), opt, &r.tensors, self.run.device)?;
        }
        Ok(())
    }

    fn accounting(&self) -> Result<Accounting> {
        let input = self.run.input_shape();
        Ok(dp_accounting(self.workers.nets[0].as_ref(), self.run.spec, &self.workers.opts[0], &input))
    }

    fn final_model(&mut self) -> Result<BTreeMap<String, Tensor>> {
        self.workers.average()?;
        Ok(self.workers.nets[0].store().values())
    }
}

fn register_once() {
    static ONCE: Once = Once::new();
    static LOCAL_SGD: LocalSgd = LocalSgd;
    ONCE.call_once(|| methods::register(&LOCAL_SGD).expect("registering local_sgd"));
}

/// The tiny experiment under `kind`, with plain SGD (no momentum) and averaging every `every` steps.
fn tiny(kind: &str, every: usize) -> Result<sdp::spec::Experiment> {
    let (kind, every) = (format!("method.kind={kind}"), format!("method.sync_every={every}"));
    common::parse_with(common::TINY, &[&kind, &every, "optim.momentum=0"])
}

fn train(exp: &sdp::spec::Experiment) -> Result<sdp::results::Final> {
    let spec = &exp.runs[0].spec;
    let data = sdp::data::load(&spec.workload, std::path::Path::new("datasets"))?;
    let mut quiet = Quiet { stop: Arc::new(AtomicBool::new(false)) };
    train::train(spec, &data, &Device::Cpu, &mut quiet)
}

#[test]
fn local_sgd_averaging_every_step_is_dp_and_less_often_is_not() -> Result<()> {
    register_once();
    let dp = train(&tiny("dp", 1)?)?;
    let every_step = train(&tiny("local_sgd", 1)?)?;
    // Without momentum, the mean of K updated models is the model updated by the mean gradient: the same
    // training as DP's up to the order of the floating-point sums.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(1.0);
    assert!(close(dp.train_loss, every_step.train_loss), "DP {dp:?}, local SGD H = 1 {every_step:?}");
    assert!(close(dp.test_loss, every_step.test_loss), "DP {dp:?}, local SGD H = 1 {every_step:?}");
    let every_third = train(&tiny("local_sgd", 3)?)?;
    assert!((dp.train_loss - every_third.train_loss).abs() > 1e-6, "DP {dp:?}, local SGD H = 3 {every_third:?}");
    Ok(())
}

#[test]
fn the_period_is_part_of_the_run_id_for_local_sgd_only() -> Result<()> {
    register_once();
    assert_ne!(tiny("local_sgd", 1)?.runs[0].id, tiny("local_sgd", 3)?.runs[0].id);
    assert_eq!(tiny("dp", 1)?.runs[0].id, tiny("dp", 3)?.runs[0].id);
    // A name nobody registered is an error naming the key and every registered method.
    let e = common::err_text(tiny("local_adam", 1));
    common::check_contains(&e, &["method.kind", "unknown method `local_adam`", "dp, sdp", "local_sgd"])
}

#[test]
fn the_memory_probe_bench_and_cost_estimate_take_it() -> Result<()> {
    register_once();
    let exp = tiny("local_sgd", 2)?;
    let spec = &exp.runs[0].spec;
    let probe = sdp::memprobe::probe(spec, None, 2, &Device::Cpu, "datasets".as_ref())?;
    let dp = sdp::memprobe::probe(&tiny("dp", 1)?.runs[0].spec, None, 2, &Device::Cpu, "datasets".as_ref())?;
    assert_eq!(probe.params, dp.params, "every worker trains the whole model");
    let b = sdp::bench::StepBench {
        spec: spec.clone(),
        plan: sdp::plan::Plan::of(spec)?,
        worker: 0,
        all_workers: true,
        device: Device::Cpu,
        steps: 2,
        warmup: 1,
        classes: 10,
        hw: (32, 32),
        profile: false,
    };
    let r = sdp::bench::whole_step(&b)?;
    assert_eq!((r.times.len(), r.params), (2, dp.params));
    assert!(r.step_s > 0.0 && r.img_s > 0.0, "{r:?}");
    let cache = tempfile::tempdir()?;
    let opts = sdp::cost::CostOptions::new("cpu", Some(cache.path().join("times.json")), "datasets".as_ref())?;
    let report = sdp::cost::estimate(std::slice::from_ref(&exp), &opts)?;
    assert_eq!((report.runs.len(), report.measured), (1, 1));
    assert!(report.runs[0].total_s() > 0.0 && report.runs[0].probe_s > 0.0, "{:?}", report.runs);
    Ok(())
}
