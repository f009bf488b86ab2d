//! What a training method's trained state is to the epoch loop (a [`Trainer`]): one optimizer step of the K
//! workers, an evaluation, its state in a checkpoint, and its accounting once trained. A method
//! (`train::methods::Method`) builds one for each run.

use super::Accounting;
use crate::checkpoint::{Tensors, TrainState};
use crate::comm::World;
use crate::data::augment::AugmentCfg;
use crate::data::examples::Batch;
use crate::data::Dataset;
use crate::plan::Plan;
use crate::spec::RunSpec;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

/// What every method's training takes: the run, its data and its device.
#[derive(Clone, Copy)]
pub struct Run<'a> {
    pub spec: &'a RunSpec,
    pub data: &'a Dataset,
    pub device: &'a Device,
    /// The processes the run is spread over (worker k on rank k mod N).
    pub world: &'a World,
    /// The spec's names resolved (masking strategy, dataset, task).
    pub plan: &'a Plan,
}

impl Run<'_> {
    /// What a training step needs besides the model and its batches.
    pub fn step_ctx(&self) -> super::Step<'_> {
        super::Step { task: self.plan.task.task, device: self.device, world: self.world }
    }

    /// The augmentation (and normalisation) of the run's training and test batches.
    pub fn augment(&self) -> AugmentCfg {
        let a = &self.spec.workload.augment;
        AugmentCfg {
            crop_pad: a.crop_pad,
            pad_mode: a.pad_mode,
            flip: a.flip,
            mean: self.data.mean,
            std: self.data.std,
        }
    }

    /// The shape of one training input (for the activation estimates of the accounting).
    pub fn input_shape(&self) -> Vec<usize> {
        self.data.train.input_shape()
    }
}

/// How a method evaluates: test loss and the task's metric in the headline mode, and every mode's metric.
pub struct Evaluation {
    pub test_loss: f64,
    pub test_metric: f64,
    pub modes: BTreeMap<String, f64>,
}

/// A training method's state (DP's model, SDP's workers, …) as the epoch loop drives it.
pub trait Trainer {
    /// One optimizer step: worker k trains on `batches[k]` at learning rate `lr`; `step` counts from 1 over
    /// the whole run. Returns the mean training loss over the workers.
    fn step(&mut self, batches: &[Batch], lr: f64, step: usize) -> Result<f64>;
    /// Test loss and accuracy of the headline mode, and every mode's accuracy.
    fn evaluate(&mut self) -> Result<Evaluation>;
    /// Adds the method's tensors to a checkpoint (a worker's as `worker<k>/…`, the others shared by every
    /// process); returns its other state. A collective call in a run spread over processes.
    fn save(&mut self, out: &mut Tensors) -> Result<serde_json::Value>;
    /// Restores what [`Trainer::save`] saved (at step `r.step`).
    fn restore(&mut self, r: &TrainState) -> Result<()>;
    /// Memory and communication of every worker, and method-level facts, once trained.
    fn accounting(&self) -> Result<Accounting>;
    /// The final global model (parameters and buffers), identical on every rank.
    fn final_model(&mut self) -> Result<BTreeMap<String, Tensor>>;
}
