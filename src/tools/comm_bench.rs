//! `sdp bench comm`: what one parameter synchronisation costs across processes, measured.
//!
//! Run under `mpirun -np N` (or alone: N = 1, nothing is sent). Every rank builds the same model and
//! selection from the spec parser (so a bad flag is the same error a run's spec gives), hosts workers
//! k ≡ rank (mod N), and times `--syncs` synchronisations of every parameter with three exchanges:
//! - `dp`: every worker holds everything: one all-reduce of the whole model among all ranks;
//! - `sdp-grouped`: the selection's coordinates grouped by the ranks holding them, one all-reduce per group;
//! - `sdp-masked`: every held coordinate in one all-reduce among all ranks (zeros where a rank holds none).
//!
//! Per rank it prints the median time of a sync and the bytes put on the wire per sync (from the buffers
//! actually all-reduced, under the ring all-reduce model 2(g-1)/g × payload among g ranks), next to the
//! model that workers.csv reports (`comm_bytes_per_step`, one worker per rank when N = K).

use crate::comm::{Averager, GroupedAverager, IndexMap, Layout, SyncTensor, World};
use crate::metrics;
use crate::plan;
use crate::train::SdpState;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Arguments of `sdp bench comm`.
#[derive(clap::Args, Debug, Clone)]
pub struct CommArgs {
    /// Model (as `workload.model`: resnet18, wrn18, swin_t, …).
    #[arg(long, default_value = "resnet18")]
    pub model: String,
    /// Masking strategy (as `method.masking`).
    #[arg(long, default_value = "block")]
    pub masking: String,
    /// Coverage C (as `method.coverage`).
    #[arg(long, default_value_t = 0.5)]
    pub coverage: f64,
    /// Workers K (as `method.workers`; default: the number of processes).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Spec overrides, as `sdp run --set` (e.g. `workload.widths=[16,32,64,128]`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Timed synchronisations per exchange (after 2 untimed ones).
    #[arg(long, default_value_t = 20)]
    pub syncs: usize,
    /// Where the parameters live: `cpu`, or `cuda` (under mpirun, cuda:<local rank>; with the `nccl`
    /// feature the sums then run on the GPUs through NCCL, even at one rank).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The spec every rank parses (model, masking, coverage and workers come from the flags).
const TEMPLATE: &str = r#"name = "bench-comm"
seeds = [0]
[workload]
dataset = "cifar10"
model = "resnet18"
epochs = 1
batch_size = 64
[optim]
lr = 0.1
[method]
kind = "sdp"
"#;

/// One worker's index maps.
type Maps = BTreeMap<String, IndexMap>;

/// One exchange's figures on one rank.
struct Measured {
    median_s: f64,
    wire_bytes: f64,
}

/// Runs the benchmark in this process (one rank of `world`); rank 0 prints the table.
pub fn run(args: &CommArgs, world: World) -> Result<()> {
    anyhow::ensure!(args.syncs > 0, "--syncs must be at least 1");
    let device = crate::plan::device(&world.device_name(&args.device))?;
    let world = world.on_device(&device, true)?;
    let (n, rank) = (world.size(), world.rank());
    let k = args.workers.unwrap_or(n);
    let mut sets = vec![
        format!("workload.model={}", args.model),
        format!("method.masking={}", args.masking),
        format!("method.coverage={}", args.coverage),
        format!("method.workers={k}"),
    ];
    sets.extend(args.sets.iter().cloned());
    let exp = plan::parse(TEMPLATE, Path::new("sdp bench comm"), &sets)?;
    let run = exp.runs.first().context("the bench spec expands to no run")?;
    let st = SdpState::new(&run.spec, 10, &device)?;
    let params: Vec<(String, candle_core::Tensor)> =
        st.global.store().params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let selection: Vec<Maps> = st.workers.iter().map(|w| w.maps.clone()).collect();
    let everything: Maps = params.iter().map(|(n, t)| (n.clone(), IndexMap::full(t.dims()))).collect();
    let hosted: Vec<usize> = (0..k).filter(|w| w % n == rank).collect();
    let model_bytes: usize = params.iter().map(|(_, t)| t.elem_count() * 4).sum();
    if world.is_root() {
        crate::say!(
            "bench comm: {} ({:.1} MB of parameters), K = {k} workers over {n} process(es) ({}), masking {}, \
             coverage {}, {} timed syncs",
            args.model,
            model_bytes as f64 / 1e6,
            world.comm.describe(),
            args.masking,
            args.coverage,
            args.syncs
        );
    }
    let exchanges: [(&str, Vec<Maps>, Layout); 3] = [
        ("dp", vec![everything; k], Layout::Grouped),
        ("sdp-grouped", selection.clone(), Layout::Grouped),
        ("sdp-masked", selection, Layout::Masked),
    ];
    // Model per worker (workers.csv), for N = K.
    let unit_bytes: Vec<usize> = st.units.iter().map(|u| u.params * 4).collect();
    let shared = model_bytes.saturating_sub(unit_bytes.iter().sum());
    let modelled = metrics::comm_bytes_per_worker(&st.selection, &unit_bytes, shared, k);
    let mut table = Vec::new();
    let mut checks = Vec::new();
    for (name, maps, layout) in exchanges {
        let mut av = GroupedAverager::new(world.comm.clone(), k, layout)?;
        av.set_selection(&maps)?;
        let items = || -> Result<Vec<SyncTensor>> {
            params
                .iter()
                .map(|(pname, global)| {
                    let mut contributions = Vec::new();
                    for &w in &hosted {
                        if let Some(map) = maps[w].get(pname) {
                            // Each worker a different local value, so that averaging has something to do.
                            contributions.push((w, (map.gather(global)? * (1.0 + w as f64))?));
                        }
                    }
                    Ok(SyncTensor { name: pname, global: global.clone(), contributions })
                })
                .collect()
        };
        let sync = items()?;
        let first = av.average(&sync)?;
        av.average(&sync)?;
        if n == 1 && name == "sdp-grouped" {
            // One process hosts every worker: the grouped averager must give what the simulation's gives.
            let mut local = crate::comm::LocalAverager::new();
            local.set_selection(&maps)?;
            let want = local.average(&sync)?;
            let largest = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> Result<f32> {
                Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
            };
            let (mut diff, mut moved) = (0f32, 0f32);
            for ((a, b), t) in first.iter().zip(&want).zip(&sync) {
                diff = diff.max(largest(a, b)?);
                moved = moved.max(largest(a, &t.global)?);
            }
            anyhow::ensure!(diff <= 1e-6, "the grouped averager differs from the local one by {diff:e}");
            checks.push(format!(
                "check: grouped averager vs the one-process (local) averager: largest difference {diff:.1e} (the \
                 averages moved parameters by up to {moved:.2})"
            ));
        }
        let before = av.bytes_sent();
        let mut times = Vec::with_capacity(args.syncs);
        for _ in 0..args.syncs {
            world.comm.all_reduce_sum_f64(&mut [0.0])?; // start together
            let t = Instant::now();
            av.average(&sync)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let wire = (av.bytes_sent() - before) / args.syncs as f64;
        let m = Measured { median_s: times[times.len() / 2], wire_bytes: wire };
        // Every rank's figures to every rank (slot r).
        let mut all = vec![0.0; 2 * n];
        all[2 * rank] = m.median_s;
        all[2 * rank + 1] = m.wire_bytes;
        world.comm.all_reduce_sum_f64(&mut all)?;
        for r in 0..n {
            let model = match (n == k, name) {
                (true, "dp") => Some(metrics::ring_allreduce_bytes(model_bytes, k)),
                (true, "sdp-grouped") => Some(modelled[r].grouped),
                (true, _) => Some(modelled[r].masked_allreduce),
                (false, _) => None,
            };
            table.push((name, r, all[2 * r], all[2 * r + 1], model));
        }
    }
    checks.push(check_collective(&world, &params)?);
    checks.push(time_agreement(&world)?);
    if world.is_root() {
        println!("exchange\trank\tms_per_sync\twire_MB_per_sync\tmodel_MB_per_sync\tmeasured/model");
        for (name, r, s, wire, model) in table {
            let (m, ratio) = match model {
                Some(m) if m > 0.0 => (format!("{:.3}", m / 1e6), format!("{:.4}", wire / m)),
                Some(m) => (format!("{:.3}", m / 1e6), "-".into()),
                None => ("-".into(), "-".into()),
            };
            println!("{name}\t{r}\t{:.3}\t{:.3}\t{m}\t{ratio}", s * 1e3, wire / 1e6);
        }
        for c in checks {
            crate::say!("{c}");
        }
    }
    Ok(())
}

/// What the training loop's agreement at every step costs (a stop asked on any rank, a checkpoint rank 0's
/// clock makes due: one all-reduce of two numbers over every rank): the median of 1000, after 50 untimed.
fn time_agreement(world: &World) -> Result<String> {
    let mut times = Vec::with_capacity(1000);
    for i in 0..1050 {
        let mut flags = [0.0, f64::from(u8::from(world.is_root()))];
        let t = Instant::now();
        world.comm.all_reduce_sum_f64(&mut flags)?;
        if i >= 50 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let (median, p90) = (times[times.len() / 2], times[times.len() * 9 / 10]);
    // Every rank's median; rank 0 reports the largest.
    let mut all = vec![0.0; world.size()];
    all[world.rank()] = median;
    world.comm.all_reduce_sum_f64(&mut all)?;
    let worst = all.iter().copied().fold(0.0, f64::max);
    Ok(format!(
        "agreement per training step (stop / checkpoint flags, all-reduce of 2 numbers over {} rank(s)): median \
         {:.1} us (rank 0; largest rank median {:.1} us), 90th percentile {:.1} us",
        world.size(),
        median * 1e6,
        worst * 1e6,
        p90 * 1e6
    ))
}

/// The collective itself, checked: every rank sums the same buffer (the model's parameters) among all
/// ranks, so every coordinate must come back N times itself. At one rank this still runs the backend's
/// all-reduce (NCCL's, on a GPU). An error beyond float rounding fails the benchmark.
fn check_collective(world: &World, params: &[(String, candle_core::Tensor)]) -> Result<String> {
    let n = world.size();
    let mut buf = Vec::new();
    for (_, t) in params {
        buf.extend(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let want: Vec<f32> = buf.iter().map(|x| x * n as f32).collect();
    let all = crate::comm::all_ranks(n);
    world.comm.prepare(&[all])?;
    let t = Instant::now();
    world.comm.all_reduce_sum(all, &mut buf)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let err = buf.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1e-30)).fold(0f32, f32::max);
    anyhow::ensure!(
        err <= 1e-5,
        "the all-reduce of {} over {n} rank(s) is wrong: largest relative error {err:.2e}",
        world.comm.describe()
    );
    Ok(format!(
        "check: all-reduce of the whole model ({:.1} MB) over {n} rank(s) by {}: largest relative error {err:.1e}, \
         {ms:.1} ms",
        4.0 * buf.len() as f64 / 1e6,
        world.comm.describe()
    ))
}
