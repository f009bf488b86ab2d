//! Subnetwork data parallelism (docs/design.md §1): every step, each worker's local forward and backward pass
//! on its own batch and its local optimizer step, then averaging among holders. The workers and the averaging
//! itself are in `sdp_state.rs`, the evaluation modes in `eval.rs`.

use super::dp::loss_and_grads;
use super::eval::evaluate_sdp;
use super::method::{Evaluation, Method, Run};
use super::sdp_state::SdpState;
use super::Accounting;
use crate::checkpoint::{Tensors, TrainState};
use crate::data::loader::Batch;
use crate::results::AlignRow;
use crate::spec::{RunSpec, SyncMode};
use anyhow::Result;
use candle_core::Device;

/// SDP (`method.kind = "sdp"`) in either regime, with its masks redrawn every `resample_every` steps.
pub(super) struct Sdp<'a> {
    run: Run<'a>,
    st: SdpState,
}

impl<'a> Sdp<'a> {
    /// The global model from the run seed and every worker's subnetwork from the first selection.
    pub fn new(run: Run<'a>) -> Result<Self> {
        Ok(Self { run, st: SdpState::new(run.spec, run.data.num_classes(), run.device)? })
    }
}

impl Method for Sdp<'_> {
    fn step(&mut self, batches: &[Batch], lr: f64, step: usize) -> Result<f64> {
        let Run { spec, device, .. } = self.run;
        let every = spec.method.resample_every;
        if every > 0 && step > 1 && (step - 1).is_multiple_of(every) {
            // A new selection: the global model takes the holders' mean, then the workers are rebuilt from it.
            self.st.sync_params(true)?;
            self.st.redraw(spec, ((step - 1) / every) as u64, device)?;
        }
        sdp_step(&mut self.st, spec, batches, lr, step, device)
    }

    fn evaluate(&mut self) -> Result<Evaluation> {
        self.st.sync_params(true)?;
        let modes = evaluate_sdp(&self.st, self.run.spec, self.run.data, &self.run.augment(), self.run.device)?;
        let (test_loss, test_acc) = modes[&self.run.spec.method.eval_mode];
        Ok(Evaluation { test_loss, test_acc, modes: modes.iter().map(|(k, v)| (k.name().to_string(), v.1)).collect() })
    }

    fn save(&self, out: &mut Tensors) -> Result<serde_json::Value> {
        self.st.save(out)
    }

    fn restore(&mut self, r: &TrainState) -> Result<()> {
        self.st.restore(self.run.spec, r, self.run.device)
    }

    fn accounting(&self) -> Accounting {
        self.st.accounting(self.run.spec, self.run.image_hw())
    }
}

/// One SDP step (docs/design.md §1 "Synchronisation"), in either regime: each worker's model is its physical
/// subnetwork in the forward regime, the full model with its held coordinates trained in the backward
/// regime. `step` counts from 1. Returns the mean loss over the workers.
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
    // Local: each worker's forward and backward pass on its own batch, its gradients on the coordinates it
    // holds, and (sync = params) its own optimizer step.
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
    // Averaging among holders.
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
