//! What a run learns, as training and evaluation see it: the loss the optimiser minimises, how a batch's
//! outputs are scored, how the workers' outputs combine in the ensemble mode, which evaluation modes
//! apply, and the name of the headline metric. Training (`train::dp`, `train::sdp`) and evaluation
//! (`train::eval`) call a [`Task`] and nothing class-specific; image classification is one task
//! (`classify.rs`). A dataset names its task ([`crate::data::source::DataSource::task`]); the run's
//! [`crate::plan::Plan`] resolves it.
//!
//! A new task is one file implementing [`Task`] plus a line in [`BUILT_IN`] (or a [`register`] call
//! from outside the crate), and a dataset source that names it; `tests/custom_task.rs` registers one. The
//! examples a task is scored on come from `data::examples::Examples` (images, or any other kind:
//! `tests/custom_workload.rs` registers a next-token task on token sequences).

mod classify;
mod next_token;

use crate::registry::{Named, Registry};
use crate::spec::EvalMode;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// The headline metric a task reports: its short name (`acc`: it names the results columns `test_acc`,
/// `test_acc_<mode>`, `final_test_acc`; lowercase letters and digits, not `loss`) and the noun figures
/// and tables use (`accuracy`: "final test accuracy vs coverage").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub noun: &'static str,
    /// Larger is better (accuracy); false: smaller is better (a loss). Tables sign Δ vs DP by it.
    pub higher_is_better: bool,
    /// A fraction shown × 100 as a percentage (accuracy); false: shown as it is (nats).
    pub percent: bool,
}

impl Metric {
    /// A fraction in [0, 1] where larger is better, shown in percent (accuracy).
    pub const fn fraction(name: &'static str, noun: &'static str) -> Self {
        Self { name, noun, higher_is_better: true, percent: true }
    }

    /// A loss, smaller is better, shown as it is (nats per token).
    pub const fn loss(name: &'static str, noun: &'static str) -> Self {
        Self { name, noun, higher_is_better: false, percent: false }
    }
}

/// A learning task.
pub trait Task: Send + Sync {
    /// The headline metric (classification: accuracy).
    fn metric(&self) -> Metric;
    /// Mean loss of a batch's model outputs against its targets: the training objective and the test loss.
    fn loss(&self, out: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor>;
    /// The headline metric summed over a batch (classification: how many predictions are right); the
    /// test metric is its sum over the test split divided by the number of examples.
    fn score(&self, out: &Tensor, targets: &[u32]) -> Result<f64>;
    /// What the ensemble mode averages over the workers for one output (classification: the softmax). Its
    /// shape is the targets' shape and one more axis of the classes (processes exchange it by that shape).
    fn ensemble_member(&self, out: &Tensor) -> candle_core::Result<Tensor>;
    /// Mean loss of the ensemble's averaged members against the targets.
    fn ensemble_loss(&self, mean: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor>;
    /// The headline metric of the ensemble's averaged members, summed over a batch (the default: [`Task::score`]
    /// of the mean, right for a score such as the arg-max that members and outputs share).
    fn ensemble_score(&self, mean: &Tensor, targets: &[u32]) -> Result<f64> {
        self.score(mean, targets)
    }
    /// The evaluation modes that apply to SDP runs of this task (single-model methods: `full` only).
    fn eval_modes(&self) -> &'static [EvalMode] {
        &EvalMode::ALL
    }
}

/// A registered task: its name and the task.
#[derive(Clone, Copy)]
pub struct Registered {
    pub name: &'static str,
    pub task: &'static dyn Task,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Task({})", self.name)
    }
}

impl Named for Registered {
    fn name(&self) -> &'static str {
        self.name
    }
}

/// Every built-in task. One line per task.
pub const BUILT_IN: &[Registered] = &[
    Registered { name: "classify", task: &classify::Classify },
    Registered { name: "next_token", task: &next_token::NextToken },
];

/// Image classification, the task of every built-in dataset.
pub const CLASSIFY: Registered = BUILT_IN[0];

/// The built-in tasks, then those registered while the program runs ([`register`]).
pub static REGISTRY: Registry<Registered> = Registry::new("task", BUILT_IN);

/// Registers a task defined outside this crate under `name`, after which a dataset source may name it.
/// A name already taken is an error.
/// A metric whose name cannot name a results column (see [`Metric`]) is an error too.
pub fn register(name: &'static str, task: &'static dyn Task) -> Result<()> {
    let metric = task.metric().name;
    let fits = !metric.is_empty() && metric.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !fits || metric == "loss" {
        bail!("task `{name}`: metric name `{metric}` cannot name a results column (lowercase letters and digits, not `loss`)");
    }
    REGISTRY.register(Registered { name, task })
}

/// The metric called `name` that a registered task reports (`None`: no task of this process reports it).
pub fn metric_named(name: &str) -> Option<Metric> {
    REGISTRY.all().into_iter().map(|r| r.task.metric()).find(|m| m.name == name)
}

/// The task registered as `name`.
pub fn task(name: &str) -> Result<Registered> {
    match REGISTRY.find(name) {
        Some(r) => Ok(r),
        None => bail!("unknown task `{name}`; registered tasks: {}", REGISTRY.names().join(", ")),
    }
}
