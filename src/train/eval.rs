//! Evaluation (docs/design.md §1 "Evaluation"): test loss and accuracy of a single model, SDP's evaluation
//! modes (full, recalibrated, scaled, ensemble, subnetwork mean), and BatchNorm recalibration.

use super::grads::{accumulate, scale};
use super::method::{Evaluation, Run};
use super::sdp_state::SdpState;
use crate::data::augment::AugmentCfg;
use crate::data::loader::eval_batches;
use crate::data::Dataset;
use crate::models::Net;
use crate::spec::{BnStats, EvalMode};
use crate::task::Task;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

/// A single-model evaluation (DP and the baselines): the `full` mode only.
pub fn single_mode(run: &Run, net: &dyn Net) -> Result<Evaluation> {
    let batch = run.spec.workload.eval_batch_size;
    let (test_loss, test_metric) = evaluate(run.plan.task.task, net, run.data, &run.augment(), batch, run.device)?;
    Ok(Evaluation { test_loss, test_metric, modes: BTreeMap::from([("full".to_string(), test_metric)]) })
}

/// Mean test loss and headline metric (classification: accuracy, a fraction) of `net` in eval mode over
/// the whole test split.
pub fn evaluate(
    task: &dyn Task,
    net: &dyn Net,
    data: &Dataset,
    aug: &AugmentCfg,
    batch: usize,
    device: &Device,
) -> Result<(f64, f64)> {
    let (mut loss_sum, mut score, mut n) = (0.0, 0.0, 0usize);
    for b in eval_batches(data.test.as_ref(), aug, batch) {
        let (x, y) = b.to_tensors(device)?;
        let out = net.forward_t(&x, false)?.detach();
        loss_sum += task.loss(&out, &y)?.to_scalar::<f32>()? as f64 * b.len() as f64;
        score += task.score(&out, &b.y)?;
        n += b.len();
    }
    let n = n.max(1) as f64;
    Ok((loss_sum / n, score / n))
}

/// Test loss and accuracy of every evaluation mode.
pub fn evaluate_sdp(st: &SdpState, data: &Dataset, aug: &AugmentCfg) -> Result<BTreeMap<EvalMode, (f64, f64)>> {
    let (spec, device) = (&st.spec, &st.device);
    let batch = spec.workload.eval_batch_size;
    let task = st.task;
    let mut out = BTreeMap::new();
    // The modes the task offers (a decoder's RMSNorms have no statistics to recalibrate: no `recal`).
    let offered = task.eval_modes();
    // Recalibrated copy: BN statistics recomputed on training batches in train mode, no gradient.
    let recal = if offered.contains(&EvalMode::Recal) || spec.method.bn_stats == BnStats::Recompute {
        let recal = st.scaled_global(1.0, device)?;
        recalibrate_bn(recal.as_ref(), data, aug, batch, spec.seed, device)?;
        Some(recal)
    } else {
        None
    };
    let full = match &recal {
        Some(r) if spec.method.bn_stats == BnStats::Recompute => r,
        _ => &st.global,
    };
    out.insert(EvalMode::Full, evaluate(task, full.as_ref(), data, aug, batch, device)?);
    if let Some(recal) = recal.as_ref().filter(|_| offered.contains(&EvalMode::Recal)) {
        out.insert(EvalMode::Recal, evaluate(task, recal.as_ref(), data, aug, batch, device)?);
    }
    let frac = st.holder_fraction();
    let scaled = if frac < 1.0 {
        evaluate(task, st.scaled_global(frac, device)?.as_ref(), data, aug, batch, device)?
    } else {
        out[&EvalMode::Full]
    };
    out.insert(EvalMode::Scaled, scaled);
    // Ensemble (the task's mean member, the softmax for classification) and individual subnetworks: each process runs the workers it hosts; the
    // probabilities and the per-worker sums are summed over the processes.
    let (world, k_all) = (st.world(), spec.method.workers);
    let (mut ens_loss, mut ens_score, mut n) = (0.0, 0.0, 0usize);
    let (mut sub_loss, mut sub_score) = (vec![0.0; k_all], vec![0.0; k_all]);
    for b in eval_batches(data.test.as_ref(), aug, batch) {
        let (x, y) = b.to_tensors(device)?;
        let mut prob_sum: Option<Tensor> = None;
        for w in &st.workers {
            let out = w.net.forward_t(&x, false)?.detach();
            sub_loss[w.index] += task.loss(&out, &y)?.to_scalar::<f32>()? as f64 * b.len() as f64;
            sub_score[w.index] += task.score(&out, &b.y)?;
            let p = task.ensemble_member(&out)?;
            prob_sum = Some(match prob_sum {
                Some(s) => (s + p)?,
                None => p,
            });
        }
        let prob_sum = match prob_sum {
            Some(p) if world.size() == 1 => p,
            local => {
                // A member has the targets' shape and one more axis of the classes (a rank hosting no
                // worker has none of its own to read the shape from).
                let shape: Vec<usize> = b.y_dims.iter().copied().chain([data.num_classes()]).collect();
                let mut v: Vec<f32> = match local {
                    Some(p) => p.flatten_all()?.to_vec1()?,
                    None => vec![0.0; shape.iter().product()],
                };
                let all = crate::comm::all_ranks(world.size());
                world.comm.prepare(&[all])?;
                world.comm.all_reduce_sum(all, &mut v)?;
                Tensor::from_vec(v, shape.as_slice(), device)?
            }
        };
        let probs = (prob_sum / k_all as f64)?;
        ens_loss += task.ensemble_loss(&probs, &y)?.to_scalar::<f32>()? as f64 * b.len() as f64;
        ens_score += task.ensemble_score(&probs, &b.y)?;
        n += b.len();
    }
    world.comm.all_reduce_sum_f64(&mut sub_loss)?;
    world.comm.all_reduce_sum_f64(&mut sub_score)?;
    let n = n.max(1) as f64;
    let kf = k_all as f64;
    out.insert(EvalMode::Ensemble, (ens_loss / n, ens_score / n));
    out.insert(EvalMode::SubnetMean, (sub_loss.iter().sum::<f64>() / n / kf, sub_score.iter().sum::<f64>() / n / kf));
    out.retain(|m, _| offered.contains(m) || *m == EvalMode::Full);
    Ok(out)
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
        let b = data.train.batch(chunk, aug, None);
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
