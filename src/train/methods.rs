//! The registry of training methods (`method.kind`): what each method is to every part of the program that
//! trains, measures or draws it. A method is a [`Method`]: its spec-level rules ([`MethodRules`]: fields that
//! matter, epochs, evaluation modes, what it needs of the model family), the trained state it builds for a run
//! (a [`Trainer`]), the network one worker trains (memory probe, single-worker bench), a whole step of all
//! K workers (bench, cost), the cost of its evaluation, and how figures draw it. Nothing outside this module
//! and the methods' own files asks which method a run uses.
//!
//! # Adding a method: one file plus one registry line
//!
//! 1. Write a unit struct implementing [`MethodRules`] and [`Method`] (see `dp.rs`, the smallest; a method
//!    with one model shares [`single_model_step`] and the DP helpers `dp_step_with`, `save_single`, …).
//! 2. Register it: a built-in method gets a unit struct in `src/spec/method.rs` (`BUILT_IN` there) and one
//!    line in [`BUILT_IN`] here; a method defined outside the crate calls [`register`] once
//!    (`tests/custom_method.rs` adds local SGD that way).

use super::method::{Run, Trainer};
use super::{dp_step_with, Step};
use crate::comm::World;
use crate::data::examples::Batch;
use crate::models::{BlockDrop, Net};
use crate::optim::Optimizer;
use crate::plan::Plan;
use crate::registry::{Named, Registry};
use crate::spec::{self, MethodName, MethodRules, RunSpec};
use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};

/// A training method, as training, the memory probe, the bench, the cost model and the figures use it.
pub trait Method: MethodRules {
    /// The trained state of `run` (the models, optimizers and whatever else the method keeps), from the
    /// run seed.
    fn trainer<'a>(&self, run: Run<'a>) -> Result<Box<dyn Trainer + 'a>>;

    /// The network worker `worker` trains, as a process hosting only that worker would build it (`None`:
    /// the method's full model), with its optimizer and its training forward pass.
    fn worker_net(&self, site: Site, worker: Option<usize>) -> Result<WorkerNet>;

    /// Whether the workers train different networks, so that the memory probe measures each of them (else
    /// one probe stands for every worker).
    fn probes_each_worker(&self) -> bool {
        false
    }

    /// A whole step of all K workers, computed by the code training runs (timed by `sdp bench step
    /// --all-workers` and `sdp check --cost`). The default: DP over [`Method::worker_net`]'s model.
    fn whole_step<'a>(&self, site: Site<'a>, world: &'a World) -> Result<WholeStep<'a>> {
        single_model_step(self.worker_net(site, None)?, site, world)
    }

    /// Extra copies of the global model one evaluation builds (SDP: the recalibrated and scaled ones).
    fn eval_copies(&self, _spec: &RunSpec) -> usize {
        0
    }

    /// Times one evaluation's parts on the test input that `time(net, train, warm_up)` times a forward
    /// pass of (seconds per image). The default: one forward pass of [`Method::worker_net`]'s full model.
    fn eval_timing(&self, site: Site, time: &dyn Fn(&dyn Net, bool, bool) -> Result<f64>) -> Result<EvalTiming> {
        let w = self.worker_net(site, None)?;
        Ok(EvalTiming { per_image: time(w.net.as_ref(), false, true)?, ..EvalTiming::default() })
    }

    /// How figures and tables draw the method's series.
    fn look(&self) -> Look {
        Look::default()
    }

    /// The legend name of a run of the method (`DP`, `SDP block forward`, `small dense`).
    fn legend(&self, _spec: &RunSpec) -> String {
        self.name().replace('_', " ")
    }
}

/// A registered method, as the registry holds it.
#[derive(Clone, Copy)]
pub struct Entry(pub &'static dyn Method);

impl Named for Entry {
    fn name(&self) -> &'static str {
        self.0.name()
    }
}

/// The built-in methods: the unit structs `src/spec/method.rs` names, in the same order.
const BUILT_IN: &[Entry] = &[
    Entry(&spec::Dp),
    Entry(&spec::Sdp),
    Entry(&spec::Baseline::SmallDense),
    Entry(&spec::Baseline::StochasticDepth),
    Entry(&spec::Baseline::Dropout),
];

/// Every method: the built-in ones, then those added with [`register`].
pub static REGISTRY: Registry<Entry> = Registry::new("method", BUILT_IN);

/// Adds a method defined outside the crate (its rules too, so that specs can name it); a name already
/// taken is an error.
pub fn register(method: &'static dyn Method) -> Result<()> {
    spec::RULES.register(spec::Rules(method))?;
    REGISTRY.register(Entry(method))
}

/// The method `name` names; an unknown name is an error naming `method.kind` and the registered methods.
pub fn of(name: &MethodName) -> Result<&'static dyn Method> {
    REGISTRY
        .find(name.as_str())
        .map(|e| e.0)
        .ok_or_else(|| anyhow!("method.kind: unknown method `{name}` (registered: {})", REGISTRY.names().join(", ")))
}

/// Where a method's networks are built outside training: the run, its resolved names, the number of
/// classes and the device.
#[derive(Clone, Copy)]
pub struct Site<'a> {
    pub spec: &'a RunSpec,
    pub plan: &'a Plan,
    pub classes: usize,
    pub device: &'a Device,
}

/// The per-step random drops of a worker's forward pass: `(step, worker)` → one drop per block.
pub type Drops = Box<dyn Fn(usize, usize) -> candle_core::Result<Vec<BlockDrop>>>;

/// One worker's network as its method trains it.
pub struct WorkerNet {
    pub net: Box<dyn Net>,
    pub opt: Optimizer,
    /// The per-step drops of the dropping baselines (`None`: a plain training forward pass).
    pub drops: Option<Drops>,
}

impl WorkerNet {
    /// A network trained with a plain forward pass and a fresh optimizer.
    pub fn plain(net: Box<dyn Net>, spec: &RunSpec) -> Self {
        Self { net, opt: Optimizer::new(&spec.optim), drops: None }
    }

    /// The training forward pass of worker `k` at `step` (counting from 1).
    pub fn forward(&self, x: &Tensor, step: usize, k: usize) -> candle_core::Result<Tensor> {
        forward(self.net.as_ref(), self.drops.as_ref(), x, step, k)
    }
}

/// `net`'s training forward pass for worker `k` at `step`, with `drops` where the method drops.
fn forward(net: &dyn Net, drops: Option<&Drops>, x: &Tensor, step: usize, k: usize) -> candle_core::Result<Tensor> {
    match drops {
        Some(drops) => net.forward_dropping(x, true, &drops(step, k)?),
        None => net.forward_t(x, true),
    }
}

/// One whole step of every worker: `(batches, lr, step)`, `step` counting from 1.
pub type StepFn<'a> = Box<dyn FnMut(&[Batch], f64, usize) -> Result<()> + 'a>;

/// A whole training step ready to be timed, and the parameters of the model it trains.
pub struct WholeStep<'a> {
    pub params: usize,
    pub step: StepFn<'a>,
}

/// A whole step of a single-model method: DP's step (`train::dp_step_with`: K forward/backward passes,
/// gradients and BatchNorm statistics averaged, one update) over `w`'s network and forward pass.
pub fn single_model_step<'a>(w: WorkerNet, site: Site<'a>, world: &'a World) -> Result<WholeStep<'a>> {
    let params = w.net.store().num_params();
    let ctx = Step { task: site.plan.task.task, device: site.device, world };
    let WorkerNet { net, mut opt, drops } = w;
    let step = Box::new(move |batches: &[Batch], lr: f64, i: usize| -> Result<()> {
        let fwd = |k: usize, x: &Tensor| forward(net.as_ref(), drops.as_ref(), x, i, k);
        dp_step_with(net.as_ref(), &mut opt, batches, lr, &fwd, &ctx)?;
        Ok(())
    });
    Ok(WholeStep { params, step })
}

/// What one evaluation costs, in seconds per test image (`fixed_s`: once per evaluation).
#[derive(Clone, Copy, Debug, Default)]
pub struct EvalTiming {
    /// A forward pass of the evaluated model.
    pub per_image: f64,
    /// Forward passes of every worker's subnetwork.
    pub subnets_per_image: f64,
    /// A training-mode pass over recalibration images.
    pub recal_per_image: f64,
    /// Building the evaluated copies.
    pub fixed_s: f64,
}

/// A series' marker in figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Marker {
    #[default]
    Circle,
    Square,
    Triangle,
    Cross,
}

/// How figures draw a method's series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Look {
    /// The reference the other series are compared with (DP): black, solid, and the denominator of the
    /// tables' ratios.
    pub reference: bool,
    /// Drawn dashed (a baseline).
    pub dashed: bool,
    pub marker: Marker,
    /// The method trains masked subnetworks (SDP): its series are named by their varying method fields,
    /// and its runs at full coverage (m = K), which stand for every masking, are shared among its series.
    pub masked: bool,
}

impl Default for Look {
    fn default() -> Self {
        Self { reference: false, dashed: true, marker: Marker::Circle, masked: false }
    }
}
