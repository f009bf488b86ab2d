//! Subnetwork data parallelism (docs/design.md §1): every step, each worker's local forward and backward pass
//! on its own batch and its local optimizer step, then averaging among holders. The workers and the averaging
//! itself are in `sdp_state.rs`, the evaluation modes in `eval.rs`.

use super::eval::evaluate_sdp;
use super::grads::loss_and_grads;
use super::method::{Evaluation, Run, Trainer};
use super::methods::{EvalTiming, Look, Method, Site, WholeStep, WorkerNet};
use super::sdp_state::SdpState;
use super::Accounting;
use crate::checkpoint::{Tensors, TrainState};
use crate::comm::World;
use crate::data::examples::Batch;
use crate::masking;
use crate::models::{self, Builder, Net};
use crate::results::AlignRow;
use crate::spec::{self, Budget, MethodRules, RunSpec, SyncMode};
use anyhow::{Context, Result};
use std::time::Instant;

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

impl MethodRules for spec::Sdp {
    fn name(&self) -> &'static str {
        "sdp"
    }

    fn field_matters(&self, spec: &RunSpec, field: &str) -> bool {
        // Every worker holds every unit: the strategy, the regime, rescaling (factors K/m = 1) and mask
        // resampling change nothing, so one run stands for all of them.
        !spec.full_coverage() || !["masking", "regime", "rescale", "resample_every"].contains(&field)
    }

    /// `flop_matched` trains epochs × 1/C (rounded).
    fn train_epochs(&self, spec: &RunSpec) -> usize {
        match spec.method.budget {
            Budget::FlopMatched => ((spec.workload.epochs as f64 / spec.method.coverage).round() as usize).max(1),
            Budget::SameSteps => spec.workload.epochs,
        }
    }

    fn many_models(&self) -> bool {
        true
    }
}

impl Method for spec::Sdp {
    fn trainer<'a>(&self, run: Run<'a>) -> Result<Box<dyn Trainer + 'a>> {
        Ok(Box::new(Sdp::new(run)?))
    }

    /// Worker `k`'s subnetwork (only it is built: the global model it is gathered from is dropped), or
    /// the full model.
    fn worker_net(&self, site: Site, worker: Option<usize>) -> Result<WorkerNet> {
        let Site { spec, plan, classes, device } = site;
        Ok(match worker {
            Some(k) => {
                let w =
                    SdpState::single_worker(spec, plan, classes, k, device).context("building the SDP subnetwork")?;
                WorkerNet { net: w.net, opt: w.opt, drops: None }
            }
            None => WorkerNet::plain(models::build(&spec.workload, classes, spec.seed, device)?, spec),
        })
    }

    fn probes_each_worker(&self) -> bool {
        true
    }

    /// Every worker's step one after another, then the averaging among holders ([`sdp_step`]).
    fn whole_step<'a>(&self, site: Site<'a>, world: &'a World) -> Result<WholeStep<'a>> {
        let Site { spec, plan, classes, device } = site;
        let mut st = SdpState::hosted(spec, plan, classes, device, world).context("building the SDP state")?;
        let params = st.global.store().num_params();
        let step = Box::new(move |batches: &[Batch], lr: f64, i: usize| -> Result<()> {
            sdp_step(&mut st, batches, lr, i)?;
            Ok(())
        });
        Ok(WholeStep { params, step })
    }

    /// The recalibrated copy, and the scaled one unless every worker holds every unit (m = K).
    fn eval_copies(&self, spec: &RunSpec) -> usize {
        if masking::holders(spec.method.coverage, spec.method.workers) < spec.method.workers {
            2
        } else {
            1
        }
    }

    /// As [`evaluate_sdp`] does: sync, build the copies, then the assembled model, its recalibration pass
    /// and every worker's subnetwork.
    fn eval_timing(&self, site: Site, time: &dyn Fn(&dyn Net, bool, bool) -> Result<f64>) -> Result<EvalTiming> {
        let Site { spec, plan, classes, device } = site;
        let mut st = SdpState::hosted(spec, plan, classes, device, &World::solo()).context("building the SDP state")?;
        let t = Instant::now();
        st.sync_params(true)?;
        for _ in 0..self.eval_copies(spec) {
            let values = st.global.store().values();
            let b = Builder::from_tensors(&values, device).with_compute_dtype(spec.workload.precision.dtype());
            st.family.build_full(1.0, b)?;
        }
        device.synchronize()?;
        let fixed_s = t.elapsed().as_secs_f64();
        let per_image = time(st.global.as_ref(), false, true)?;
        // The allocator and kernels are warm now: one timed pass each.
        let recal_per_image = time(st.global.as_ref(), true, false)?;
        let mut subnets_per_image = 0.0;
        for w in &st.workers {
            subnets_per_image += time(w.net.as_ref(), false, false)?;
        }
        Ok(EvalTiming { per_image, subnets_per_image, recal_per_image, fixed_s })
    }

    fn look(&self) -> Look {
        Look { reference: false, dashed: false, masked: true, ..Look::default() }
    }

    /// `SDP <masking> <regime>`.
    fn legend(&self, spec: &RunSpec) -> String {
        let regime = serde_json::to_value(spec.method.regime).ok().and_then(|v| v.as_str().map(String::from));
        format!("SDP {} {}", spec.method.masking, regime.unwrap_or_default())
    }
}

impl Trainer for Sdp<'_> {
    fn step(&mut self, batches: &[Batch], lr: f64, step: usize) -> Result<f64> {
        sdp_step(&mut self.st, batches, lr, step)
    }

    fn evaluate(&mut self) -> Result<Evaluation> {
        self.st.sync_params(true)?;
        self.st.assemble_global()?;
        let modes = evaluate_sdp(&self.st, self.run.data, &self.run.augment())?;
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
        self.st.restore(r)
    }

    fn accounting(&self) -> Result<Accounting> {
        self.st.accounting(&self.run.input_shape())
    }

    fn final_model(&mut self) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
        self.st.assemble_global()?;
        Ok(self.st.global.store().values())
    }
}

/// One SDP step (docs/design.md §1 "Synchronisation"), in either regime: each worker's model is its physical
/// subnetwork in the forward regime, the full model with its held coordinates trained in the backward
/// regime. `step` counts from 1. A step that starts a new selection (`method.resample_every`) redraws the
/// masks first, so the bench times what training runs. Returns the mean loss over the workers.
pub fn sdp_step(st: &mut SdpState, batches: &[Batch], lr: f64, step: usize) -> Result<f64> {
    let m = &st.spec.method;
    let (sync, sync_every, align_every, every) = (m.sync, m.sync_every, m.align_every, m.resample_every);
    if every > 0 && step > 1 && (step - 1).is_multiple_of(every) {
        // A new selection: the global model takes the holders' mean, then the workers are rebuilt from it.
        st.sync_params(true)?;
        st.assemble_global()?;
        st.redraw(((step - 1) / every) as u64)?;
    }
    let device = &st.device.clone();
    let mut loss_sum = 0.0;
    let mut all_grads = Vec::with_capacity(st.workers.len());
    let align = align_every > 0 && step.is_multiple_of(align_every);
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
        match sync {
            SyncMode::Params => worker.step(&grads, lr)?,
            SyncMode::Grads => all_grads.push(grads),
        }
    }
    // Averaging among holders.
    let _averaging = crate::ops::profile::scope(crate::ops::profile::Part::Averaging);
    match sync {
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
            if step.is_multiple_of(sync_every) {
                st.sync_params(true)?;
            }
        }
    }
    st.count_step(sent_before);
    Ok(st.world_sum(loss_sum)? / batches.len() as f64)
}
