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
//!
//! Every method is a [`methods::Method`] in the registry of `methods.rs`; it builds its trained state, a
//! [`Trainer`] (`method.rs`), which the one epoch loop (`epochs.rs`) drives. One file per concern: `dp.rs` (data
//! parallelism and the loss), `baselines.rs` (small dense, stochastic depth, dropout), `sdp.rs` (the SDP
//! step), `sdp_state.rs` (SDP's workers and averaging among holders), `eval.rs` (evaluation modes) and
//! `accounting.rs` (memory and communication per worker).

mod accounting;
mod baselines;
mod dp;
mod epochs;
mod eval;
mod grads;
pub mod method;
pub mod methods;
mod sdp;
mod sdp_state;

pub use accounting::{dp_accounting, Accounting};
pub use baselines::{baseline_drops, baseline_family, baseline_net, small_dense_widths};
pub use dp::{dp_step, dp_step_with, restore_single, save_single, Forward, Step};
pub use eval::{evaluate, evaluate_sdp, recalibrate_bn, single_mode, RECAL_BATCHES};
pub use grads::{loss_and_grads, loss_and_grads_of};
pub use sdp::sdp_step;
pub use sdp_state::{SdpState, Worker};

use crate::checkpoint::TrainState;
use crate::comm::World;
use crate::data::loader::steps_per_epoch;
use crate::data::Dataset;
use crate::plan::Plan;
use crate::results::{Final, MetricsRow};
use crate::spec::RunSpec;
use anyhow::Result;
use candle_core::{Device, Tensor};
pub use method::{Evaluation, Run, Trainer};
use std::collections::BTreeMap;

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
    /// Whether to save a checkpoint now (never, unless the observer writes them). In a run spread over
    /// processes rank 0's observer decides for every process.
    fn checkpoint_due(&mut self, _at: At) -> bool {
        false
    }
    /// Writes a checkpoint (asked for by [`Observer::checkpoint_due`], or on an interrupt). In a run spread
    /// over processes every process's observer is called at the same step, with that process's share of
    /// the state, and writes its part (a collective call).
    fn checkpoint(&mut self, _state: &TrainState) -> Result<()> {
        Ok(())
    }
    /// Training finished: the final global model's parameters and buffers (identical on every rank).
    fn model(&mut self, _values: &BTreeMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
}

/// Trains the run `spec` on `data` and returns its final figures.
pub fn train(spec: &RunSpec, data: &Dataset, device: &Device, obs: &mut dyn Observer) -> Result<Final> {
    train_from(spec, &Plan::of(spec)?, data, device, obs, None, &World::solo())
}

/// [`train`] of `spec` resolved as `plan`, continuing from a checkpoint's state where one is given, as this
/// process's share of a run spread over `world` (worker k on rank k mod N; one process: all of them).
pub fn train_from(
    spec: &RunSpec,
    plan: &Plan,
    data: &Dataset,
    device: &Device,
    obs: &mut dyn Observer,
    resume: Option<TrainState>,
    world: &World,
) -> Result<Final> {
    // Before any model is built: a worker count the data cannot feed fails here, not after allocating
    // K subnetworks.
    steps_per_epoch(data.train.len(), spec.method.workers, spec.workload.batch_size)?;
    let (n, k) = (world.size(), spec.method.workers);
    if !k.is_multiple_of(n) {
        return Err(crate::spec::SpecError(format!(
            "method.workers = {k} over {n} processes: the process count must divide the worker count"
        ))
        .into());
    }
    let run = Run { spec, plan, data, device, world };
    let mut method = methods::of(&spec.method.kind)?.trainer(run)?;
    let last = epochs::run(&run, method.as_mut(), obs, resume)?;
    obs.accounting(&method.accounting()?)?;
    obs.model(&method.final_model()?)?;
    Ok(last)
}
