//! Subnetwork data parallelism (docs/design.md §1): every step, each worker's local forward and backward pass
//! on its own batch and its local optimizer step, then averaging among holders. The workers and the averaging
//! itself are in `sdp_state.rs`, the evaluation modes in `eval.rs`.

use super::eval::evaluate_sdp;
use super::grads::loss_and_grads;
use super::method::{Evaluation, Method, Run};
use super::sdp_state::SdpState;
use super::Accounting;
use crate::checkpoint::{Tensors, TrainState};
use crate::data::examples::Batch;
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
    /// The global model from the run seed and the subnetworks of the workers this process hosts from the
    /// first selection.
    pub fn new(run: Run<'a>) -> Result<Self> {
        Ok(Self { run, st: SdpState::hosted(run.spec, run.plan, run.data.num_classes(), run.device, run.world)? })
    }
}

impl Method for Sdp<'_> {
    fn step(&mut self, batches: &[Batch], lr: f64, step: usize) -> Result<f64> {
        let Run { spec, device, .. } = self.run;
        let every = spec.method.resample_every;
        if every > 0 && step > 1 && (step - 1).is_multiple_of(every) {
            // A new selection: the global model takes the holders' mean, then the workers are rebuilt from it.
            self.st.sync_params(true)?;
            self.st.assemble_global()?;
            self.st.redraw(spec, ((step - 1) / every) as u64, device)?;
        }
        sdp_step(&mut self.st, spec, batches, lr, step, device)
    }

    fn evaluate(&mut self) -> Result<Evaluation> {
        self.st.sync_params(true)?;
        self.st.assemble_global()?;
        let modes = evaluate_sdp(&self.st, self.run.spec, self.run.data, &self.run.augment(), self.run.device)?;
        let (test_loss, test_metric) = modes[&self.run.spec.method.eval_mode];
        Ok(Evaluation {
            test_loss,
            test_metric,
            modes: modes.iter().map(|(k, v)| (k.name().to_string(), v.1)).collect(),
        })
    }

    fn save(&mut self, out: &mut Tensors) -> Result<serde_json::Value> {
        self.st.save(out)
    }

    fn restore(&mut self, r: &TrainState) -> Result<()> {
        self.st.restore(self.run.spec, r, self.run.device)
    }

    fn accounting(&self) -> Result<Accounting> {
        self.st.accounting(self.run.spec, &self.run.input_shape())
    }

    fn final_model(&mut self) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
        self.st.assemble_global()?;
        Ok(self.st.global.store().values())
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
    let mut all_grads = Vec::with_capacity(st.workers.len());
    let align = m.align_every > 0 && step.is_multiple_of(m.align_every);
    let sent_before = st.bytes_sent();
    // Local: each worker this process hosts (all K in the one-process simulation) runs its forward and
    // backward pass on its own batch, keeps its gradients on the coordinates it holds, and (sync = params)
    // takes its own optimizer step.
    for pos in 0..st.workers.len() {
        let k = st.workers[pos].index;
        let (x, y) = batches[k].to_tensors(device)?;
        let worker = &st.workers[pos];
        let (loss, grads) = loss_and_grads(st.task, worker.net.as_ref(), &x, &y)?;
        let grads = worker.local_grads(grads)?;
        if align {
            let cosine = st.alignment_of(pos, &grads, &x, &y)?;
            st.alignment.push(AlignRow { run_id: String::new(), step, worker: k, cosine_to_full_grad: cosine });
        }
        let worker = &mut st.workers[pos];
        loss_sum += loss;
        match m.sync {
            SyncMode::Params => worker.step(&grads, lr)?,
            SyncMode::Grads => all_grads.push(grads),
        }
    }
    // Averaging among holders.
    let _averaging = crate::ops::profile::scope(crate::ops::profile::Part::Averaging);
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
    st.count_step(sent_before);
    Ok(st.world_sum(loss_sum)? / batches.len() as f64)
}
