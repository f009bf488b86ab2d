//! What each worker of a trained run holds and sends (`workers.csv`, docs/design.md §5): parameter, gradient,
//! optimizer and activation bytes, communication per step, and method-level facts for the manifest. The rows
//! carry an empty `run_id`: the runner stamps it.

use super::sdp_state::SdpState;
use crate::comm::World;
use crate::metrics;
use crate::models::Net;
use crate::optim::Optimizer;
use crate::results::{AlignRow, WorkerRow};
use crate::spec::{RunSpec, SyncMode};
use anyhow::Result;
use std::collections::BTreeMap;

/// Per-worker memory and communication accounting of a finished run, and method-level facts.
#[derive(Clone, Debug)]
pub struct Accounting {
    /// One row per worker.
    pub workers: Vec<WorkerRow>,
    /// Spectral gap of the worker–unit averaging graph (SDP; see `metrics::spectral_gap`).
    pub spectral_gap: Option<f64>,
    /// Workers holding each unit (m).
    pub holders: usize,
    /// Method-specific facts for the manifest (e.g. the small-dense baseline's widths).
    pub extra: BTreeMap<String, serde_json::Value>,
    /// Gradient alignment records (SDP with `method.align_every`).
    pub alignment: Vec<AlignRow>,
}

/// The accounting of data parallelism and its baselines: K replicas of `net`, each all-reducing every
/// gradient every step; `input` is the shape of one training input.
pub fn dp_accounting(net: &dyn Net, spec: &RunSpec, opt: &Optimizer, input: &[usize]) -> Accounting {
    let k = spec.method.workers;
    let params = net.store().num_params();
    let comm = metrics::ring_allreduce_bytes(params * 4, k);
    let workers = (0..k)
        .map(|worker| WorkerRow {
            run_id: String::new(),
            worker,
            units_held: 0,
            param_fraction: 1.0,
            param_bytes: params * 4,
            grad_bytes: params * 4,
            optim_bytes: opt.state_bytes(),
            activation_bytes_est: net.activation_elems(input) * spec.workload.batch_size * 4,
            peak_bytes_measured: None,
            comm_bytes_per_step: comm,
            comm_bytes_per_step_masked: comm,
        })
        .collect();
    Accounting { workers, spectral_gap: None, holders: k, extra: BTreeMap::new(), alignment: Vec::new() }
}

impl SdpState {
    /// Memory and communication of every worker, and the spectral gap of the averaging graph; `input` is the
    /// shape of one training input.
    pub fn accounting(&self, input: &[usize]) -> Result<Accounting> {
        let spec = &self.spec;
        let k = spec.method.workers;
        let total = self.global.store().num_params();
        let unit_bytes: Vec<usize> = self.units.iter().map(|u| u.params * 4).collect();
        let shared_bytes = (total * 4).saturating_sub(unit_bytes.iter().sum());
        let comm = metrics::comm_bytes_per_worker(&self.selection, &unit_bytes, shared_bytes, k);
        // sync = params communicates every sync_every steps; sync = grads every step.
        let per_step = match spec.method.sync {
            SyncMode::Params => 1.0 / spec.method.sync_every as f64,
            SyncMode::Grads => 1.0,
        };
        let workers: Vec<WorkerRow> = self
            .workers
            .iter()
            .map(|w| (w.index, (w, &comm[w.index])))
            .map(|(worker, (w, c))| {
                // Held (trained) scalars; the backward regime stores the whole model but trains these.
                let held: usize =
                    w.net.store().params.keys().filter_map(|n| w.maps.get(n)).map(|m| m.local_len()).sum();
                WorkerRow {
                    run_id: String::new(),
                    worker,
                    units_held: w.units_held,
                    param_fraction: held as f64 / total.max(1) as f64,
                    param_bytes: w.net.store().num_params() * 4,
                    grad_bytes: held * 4,
                    optim_bytes: w.opt.state_bytes(),
                    activation_bytes_est: w.net.activation_elems(input) * spec.workload.batch_size * 4,
                    peak_bytes_measured: None,
                    comm_bytes_per_step: c.grouped * per_step,
                    comm_bytes_per_step_masked: c.masked_allreduce * per_step,
                }
            })
            .collect();
        let world = self.world();
        let mut extra = BTreeMap::new();
        let workers = if world.size() == 1 {
            workers
        } else {
            // What each rank put on the wire per training step (measured buffers, ring all-reduce model).
            let mut sent = vec![0.0; world.size()];
            sent[world.rank()] = self.step_bytes_per_step();
            world.comm.all_reduce_sum_f64(&mut sent)?;
            extra.insert("comm_bytes_sent_per_step_by_rank".into(), serde_json::json!(sent));
            gather_worker_rows(world, workers, k)?
        };
        Ok(Accounting {
            workers,
            spectral_gap: Some(metrics::spectral_gap(&self.selection, &unit_bytes)),
            holders: self.selection.m,
            extra,
            alignment: self.alignment.clone(),
        })
    }
}

/// Every worker's row in every process: each process fills in the rows of the workers it hosts.
fn gather_worker_rows(world: &World, rows: Vec<WorkerRow>, k: usize) -> Result<Vec<WorkerRow>> {
    const F: usize = 8;
    let mut m = vec![0.0; k * F];
    for r in &rows {
        let v = [
            r.units_held as f64,
            r.param_fraction,
            r.param_bytes as f64,
            r.grad_bytes as f64,
            r.optim_bytes as f64,
            r.activation_bytes_est as f64,
            r.comm_bytes_per_step,
            r.comm_bytes_per_step_masked,
        ];
        m[r.worker * F..(r.worker + 1) * F].copy_from_slice(&v);
    }
    world.comm.all_reduce_sum_f64(&mut m)?;
    Ok((0..k)
        .map(|w| {
            let v = &m[w * F..(w + 1) * F];
            WorkerRow {
                run_id: String::new(),
                worker: w,
                units_held: v[0] as usize,
                param_fraction: v[1],
                param_bytes: v[2] as usize,
                grad_bytes: v[3] as usize,
                optim_bytes: v[4] as usize,
                activation_bytes_est: v[5] as usize,
                peak_bytes_measured: None,
                comm_bytes_per_step: v[6],
                comm_bytes_per_step_masked: v[7],
            }
        })
        .collect())
}
