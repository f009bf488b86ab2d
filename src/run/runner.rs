//! Runs the runs of one or more experiments: skip finished ones and ones another live process holds,
//! claim each run folder with a lock, resume from the run's checkpoint, write the manifest before training
//! and the metrics after every evaluation, checkpoint as the policy says, mark interrupted and failed runs,
//! record a finished run before anything optional (the memory probe), rebuild each summary from its folder.

use crate::checkpoint;
use crate::data::{self, Dataset};
use crate::lock::{self, Claim, RunLock};
use crate::memprobe::probe_subprocess;
use crate::plan::Plan;
use crate::progress::{Progress, RankPart};
use crate::results::{write_csv, write_metrics, write_summary, Manifest, RunDir, Status, WorkerRow};
use crate::spec::{Experiment, Run, SpecError};
use crate::train::{self, Accounting, Interrupted};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

pub use super::options::{Policy, RunOptions, Shard};

/// How a batch of runs ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub done: usize,
    pub skipped: usize,
    /// Runs another live process holds (left to it).
    pub busy: usize,
    pub failed: usize,
    pub interrupted: bool,
}

/// Whether a run passes the `--only` filter (substring of its id or label).
fn selected(run: &Run, only: &Option<String>) -> bool {
    only.as_ref().is_none_or(|s| run.id.contains(s.as_str()) || run.label.contains(s.as_str()))
}

/// The runs of `experiments` this invocation is for: `--only`, then the shard. `--only` matching no run
/// at all is an error (a typo would otherwise do nothing, silently).
pub fn select<'a>(
    experiments: &'a [Experiment],
    only: &Option<String>,
    shard: Option<Shard>,
) -> Result<Vec<(&'a Experiment, &'a Run)>> {
    let all: usize = experiments.iter().map(|e| e.runs.len()).sum();
    let todo: Vec<(&Experiment, &Run)> = experiments
        .iter()
        .flat_map(|e| e.runs.iter().map(move |r| (e, r)))
        .filter(|(_, r)| selected(r, only))
        .collect();
    if let (Some(o), true) = (only, todo.is_empty()) {
        return Err(SpecError(format!("--only `{o}` matches none of the {all} run(s) (ids and labels)")).into());
    }
    Ok(match shard {
        Some(sh) => todo.into_iter().enumerate().filter(|(i, _)| i % sh.count == sh.index).map(|(_, r)| r).collect(),
        None => todo,
    })
}

pub fn run_all(experiments: &[Experiment], opts: &RunOptions) -> Result<Outcome> {
    run_all_with(experiments, opts, &Policy::default())
}

/// Trains every selected run that is not done. Under `mpirun`/`srun` (`opts.world` of N > 1 processes) every
/// process calls this with the same arguments and the processes train each run together: rank 0 decides
/// which runs to train (the same skip and lock rules) and tells the others, every rank loads the data and
/// the run fails on all of them, naming the rank, if one cannot, and only rank 0 writes result files
/// besides the checkpoint, of which each rank writes its workers' part (`checkpoint.rs`). A spread run
/// resumes from a checkpoint written by any number of processes.
pub fn run_all_with(experiments: &[Experiment], opts: &RunOptions, policy: &Policy) -> Result<Outcome> {
    let world = &opts.world;
    let spread = world.size() > 1;
    let todo = select(experiments, &opts.only, policy.shard)?;
    if let (Some(sh), true) = (policy.shard, todo.is_empty()) {
        crate::say!("shard {}/{}: no runs", sh.index, sh.count);
    }
    let mut outcome = Outcome::default();
    let mut datasets: HashMap<String, Dataset> = HashMap::new();
    let n = todo.len();
    for (i, (exp, run)) in todo.iter().enumerate() {
        let rd = RunDir::new(&opts.results_dir, &exp.name, &run.id);
        let title = format!("[{}/{n}] {} {} ({})", i + 1, exp.name, run.id, run.label);
        let title = if spread { format!("rank {}: {title}", world.rank()) } else { title };
        // Rank 0 claims the run (or skips it) and tells the other ranks.
        let lock = if world.is_root() { claim(&rd, opts, policy, &title, &mut outcome)? } else { None };
        let mut go = vec![u8::from(lock.is_some())];
        world.comm.broadcast(0, &mut go)?;
        if go[0] == 0 {
            continue;
        }
        if world.is_root() {
            crate::results::clean_temp_files(&rd.dir, true);
        }
        let key = serde_json::to_string(&(
            &run.spec.workload.dataset,
            run.spec.workload.data_seed,
            run.spec.workload.train_samples,
            run.spec.workload.test_samples,
        ))?;
        let mut failure = None;
        if !datasets.contains_key(&key) {
            let t = Instant::now();
            match data::load(&run.spec.workload, &opts.data_dir) {
                Ok(d) => {
                    crate::say!(
                        "dataset {}: {} train / {} test examples, {} classes ({:.1} s)",
                        d.name,
                        d.train.len(),
                        d.test.len(),
                        d.num_classes(),
                        t.elapsed().as_secs_f64()
                    );
                    datasets.insert(key.clone(), d);
                }
                Err(e) => failure = Some(format!("{e:#}")),
            }
        }
        // Every rank must have the data; the first that has not is named.
        if let Some(reason) = ranks_failed(world, failure)? {
            crate::say!("{title}: failed: {reason}");
            if world.is_root() {
                let mut m = Manifest::new(run, &exp.path, &opts.device_name);
                m.status = Status::Failed(reason);
                m.ended = Some(crate::results::now());
                m.write(&rd.manifest())?;
            }
            outcome.failed += 1;
            continue;
        }
        let data = &datasets[&key];
        let Some(lock) = lock else {
            // Another rank: train this process's workers; rank 0 records the run.
            match train_rank(&Job { exp, run, rd: &rd, title: &title }, data, opts) {
                Ok(Status::Interrupted) => {
                    outcome.interrupted = true;
                    break;
                }
                Ok(_) => outcome.done += 1,
                Err(e) if crate::comm::agreed(&e) => {
                    // Every rank met it at the same point, and rank 0 records it: on to the next run.
                    crate::say!("{title}: failed: {e:#}");
                    outcome.failed += 1;
                }
                Err(e) => {
                    // The other ranks wait in a collective for this one: end the job, naming this rank.
                    crate::say!("{title}: failed: {e:#}");
                    world.comm.abort(1);
                }
            }
            continue;
        };
        let (status, agreed) = run_one(&Job { exp, run, rd: &rd, title: &title }, data, opts, policy, &lock)?;
        drop(lock);
        if let (true, Status::Failed(_), false) = (spread, &status, agreed) {
            // Recorded as failed; the other ranks wait in a collective for this one: end the job.
            world.comm.abort(1);
        }
        if status != Status::Interrupted {
            write_summary(&opts.results_dir, &exp.name)?;
        }
        match status {
            Status::Done => outcome.done += 1,
            Status::Interrupted => {
                outcome.interrupted = true;
                break;
            }
            Status::Running => outcome.busy += 1, // taken over by another process
            Status::Failed(_) => outcome.failed += 1,
        }
        if opts.stop.load(Ordering::SeqCst) {
            outcome.interrupted = true; // the signal came after training (during the memory probe)
            break;
        }
    }
    let mut names: Vec<&str> = todo.iter().map(|(e, _)| e.name.as_str()).collect();
    names.dedup();
    if !world.is_root() {
        return Ok(outcome);
    }
    for name in names {
        let path = write_summary(&opts.results_dir, name)?;
        crate::say!("summary: {}", path.display());
    }
    Ok(outcome)
}

/// Rank 0's claim of a run: `None` (and the outcome counted) when it is done or another process holds it.
fn claim(
    rd: &RunDir,
    opts: &RunOptions,
    policy: &Policy,
    title: &str,
    outcome: &mut Outcome,
) -> Result<Option<RunLock>> {
    if !opts.force && rd.status() == Some(Status::Done) {
        crate::say!("{title}: done, skipped (--force reruns it)");
        outcome.skipped += 1;
        return Ok(None);
    }
    let lock = match lock::claim(&rd.dir, policy.stale_after, policy.beat())? {
        Claim::Acquired(l) => l,
        Claim::Busy(owner) => {
            crate::say!("{title}: held by another process ({}), skipped", owner.describe());
            outcome.busy += 1;
            return Ok(None);
        }
    };
    // Another process may have finished it between the status check and the claim.
    if !opts.force && rd.status() == Some(Status::Done) {
        crate::say!("{title}: done, skipped (--force reruns it)");
        outcome.skipped += 1;
        return Ok(None);
    }
    Ok(Some(lock))
}

/// The first rank whose `failure` is set, with its reason (rank 0 knows only its own reason's text).
fn ranks_failed(world: &crate::comm::World, failure: Option<String>) -> Result<Option<String>> {
    let mut flags = vec![0.0; world.size()];
    if failure.is_some() {
        flags[world.rank()] = 1.0;
    }
    world.comm.all_reduce_sum_f64(&mut flags)?;
    let Some(bad) = flags.iter().position(|&f| f > 0.0) else { return Ok(None) };
    Ok(Some(match (world.size(), failure) {
        (1, Some(reason)) => reason,
        (_, Some(reason)) if bad == world.rank() => format!("rank {bad}: {reason}"),
        _ => format!("rank {bad} could not load the dataset (its log says why)"),
    }))
}

/// A rank other than 0 trains its workers of `run`; it writes only its part of the checkpoints.
fn train_rank(job: &Job, data: &Dataset, opts: &RunOptions) -> Result<Status> {
    let Job { run, rd, title, .. } = *job;
    let plan = Plan::of(&run.spec)?;
    let resume = resume_from(rd, run, opts, title)?;
    let mut obs = RankPart {
        stop: opts.stop.clone(),
        run_dir: rd.dir.clone(),
        run_id: run.id.clone(),
        world: opts.world.clone(),
    };
    let watching = crate::peers::watch(&opts.world, &rd.dir)?;
    let result = train::train_from(&run.spec, &plan, data, &opts.device, &mut obs, resume, &opts.world);
    watching.end(together(&result))?;
    match result {
        Ok(_) => Ok(Status::Done),
        Err(e) if e.is::<Interrupted>() => Ok(Status::Interrupted),
        Err(e) => Err(e),
    }
}

/// Whether every process of a run ended training at the same point: done, interrupted (the processes agree
/// on a stop) or failed with an [`crate::comm::Agreed`] error; otherwise one process failed on its own.
fn together(result: &Result<crate::results::Final>) -> bool {
    match result {
        Ok(_) => true,
        Err(e) => e.is::<Interrupted>() || crate::comm::agreed(e),
    }
}

/// The checkpoint run `run` resumes from: a collective call of every process of the run (rank 0's
/// `checkpoint.json` decides; each process reads its workers' share). `--force` removes it first. One that
/// cannot be read is reported (naming the file) and ignored: the run starts afresh, on every process.
fn resume_from(rd: &RunDir, run: &Run, opts: &RunOptions, title: &str) -> Result<Option<checkpoint::TrainState>> {
    if opts.force && opts.world.is_root() {
        checkpoint::remove(&rd.dir)?;
    }
    let workers = run.spec.method.workers;
    match checkpoint::load_collective(&opts.world, &rd.dir, &run.id, workers, &opts.device) {
        Ok(r) => Ok(r),
        Err(e) => {
            crate::say!("{title}: ignoring its checkpoint and starting afresh: {e:#}");
            Ok(None)
        }
    }
}

/// Whether an error comes from a full disk (ENOSPC, or a quota).
fn disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
            .is_some_and(|code| code == libc::ENOSPC || code == libc::EDQUOT)
    })
}

/// A run this process is about to train: its experiment, folder and the title its log lines start with.
struct Job<'a> {
    exp: &'a Experiment,
    run: &'a Run,
    rd: &'a RunDir,
    title: &'a str,
}

/// Trains one claimed run. Returns its status, and whether a failure is one every process of the run met
/// together (then no process waits for this one); `Status::Running` when another process took the run
/// over (its lock went stale), in which case nothing of this process's is recorded.
fn run_one(job: &Job, data: &Dataset, opts: &RunOptions, policy: &Policy, lock: &RunLock) -> Result<(Status, bool)> {
    let Job { exp, run, rd, title } = *job;
    // The run's names resolved once: its method, task (whose metric names the headline columns), masking.
    let plan = Plan::of(&run.spec)?;
    let metric = plan.metric();
    let resume = resume_from(rd, run, opts, title)?;
    let mut manifest = Manifest::new(run, &exp.path, &opts.device_name);
    if opts.device.is_cpu() {
        // The thread count sets the order of floating-point sums: a bit-for-bit rerun needs the same.
        manifest.extra.insert("cpu_threads".into(), rayon::current_num_threads().into());
    }
    if opts.world.size() > 1 {
        manifest.extra.insert("processes".into(), opts.world.size().into());
        manifest.extra.insert("collectives".into(), opts.world.comm.describe().into());
    }
    if let Some(r) = &resume {
        // Keep the first start time and the list of resumptions.
        let old = Manifest::read(&rd.manifest()).ok();
        if let Some(o) = &old {
            manifest.started = o.started.clone();
        }
        let mut steps: Vec<serde_json::Value> =
            old.and_then(|o| o.extra.get("resumed_at_steps").and_then(|v| v.as_array().cloned())).unwrap_or_default();
        steps.push(r.step.into());
        manifest.extra.insert("resumed_at_steps".into(), steps.into());
        crate::say!("{title}: resuming from its checkpoint at step {} ({} evaluation(s) done)", r.step, r.rows.len());
    }
    manifest.write(&rd.manifest())?;
    // metrics.csv restarts from the checkpoint's rows: a row written after the checkpoint is redone.
    let rows = resume.as_ref().map(|r| r.rows.clone()).unwrap_or_default();
    if rows.is_empty() {
        match std::fs::remove_file(rd.metrics()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", rd.metrics().display()))
            }
            _ => {}
        }
    } else {
        write_metrics(&rd.metrics(), metric, &rows)?;
    }
    let mut obs = Progress::new(title.to_string(), run, metric, rd, opts, lock, policy, rows);
    // Spread over processes: rank 0 watches the others, to record a rank that dies.
    let watching = if opts.world.size() > 1 { Some(crate::peers::watch(&opts.world, &rd.dir)?) } else { None };
    let result = train::train_from(&run.spec, &plan, data, &opts.device, &mut obs, resume, &opts.world);
    if let Some(w) = watching {
        w.end(together(&result))?;
    }
    obs.finish();
    let agreed = result.as_ref().err().is_some_and(crate::comm::agreed);
    if lock.lost.load(Ordering::SeqCst) {
        crate::say!("{title}: another process took this run over (its lock looked stale); left to it");
        return Ok((Status::Running, agreed));
    }
    manifest.ended = Some(crate::results::now());
    let status = match result {
        Ok(f) => {
            let acc = obs.take_accounting();
            if let Some(acc) = &acc {
                record_accounting(rd, &mut manifest, acc)?;
            }
            manifest.final_metrics = Some(f.clone());
            manifest.status = Status::Done;
            manifest.write(&rd.manifest()).with_context(|| {
                format!("recording the finished run (its trained state is in {}: rerun to record it)", rd.dir.display())
            })?;
            crate::say!(
                "{title}: done: test_{} {:.4}, test_loss {:.4}, {:.0} img/s, {:.1} s",
                f.metric,
                f.test_metric,
                f.test_loss,
                f.img_per_s,
                f.wall_s
            );
            if !policy.keep_checkpoints {
                checkpoint::remove(&rd.dir)?;
            }
            // Optional from here on: a probe that fails or is interrupted leaves the run done, with a note.
            if let (Some(exe), Some(mut acc)) = (&opts.memprobe, acc) {
                let note = if opts.stop.load(Ordering::SeqCst) {
                    Some("memory probe skipped: interrupted".to_string())
                } else {
                    match probe_memory(run, rd, &mut acc, exe, opts) {
                        Ok(()) => record_accounting(rd, &mut manifest, &acc).err().map(|e| format!("{e:#}")),
                        Err(e) => Some(format!("memory probe not recorded: {e:#}")),
                    }
                };
                if let Some(n) = note {
                    crate::say!("{title}: note: {n}");
                    manifest.extra.insert("note".into(), n.into());
                }
                if let Err(e) = manifest.write(&rd.manifest()) {
                    crate::say!("{title}: the memory figures were not recorded: {e:#}");
                }
            }
            return Ok((Status::Done, false));
        }
        Err(e) if e.is::<Interrupted>() => {
            crate::say!(
                "{title}: interrupted{}",
                if policy.checkpoints() { " (resumes from its checkpoint)" } else { "" }
            );
            Status::Interrupted
        }
        Err(e) if disk_full(&e) => {
            let reason = format!("the disk is full ({e:#}); free space and rerun: it resumes from its last checkpoint");
            crate::say!("{title}: failed: {reason}");
            Status::Failed(reason)
        }
        Err(e) => {
            crate::say!("{title}: failed: {e:#}");
            Status::Failed(format!("{e:#}"))
        }
    };
    manifest.status = status.clone();
    manifest.write(&rd.manifest())?;
    Ok((status, agreed))
}

/// Measures each worker's memory in a fresh process (`sdp memprobe`) into `acc`.
fn probe_memory(run: &Run, rd: &RunDir, acc: &mut Accounting, exe: &std::path::Path, opts: &RunOptions) -> Result<()> {
    let steps = 3;
    if train::methods::of(&run.spec.method.kind)?.probes_each_worker() {
        for w in acc.workers.iter_mut() {
            let probe =
                probe_subprocess(exe, &rd.manifest(), Some(w.worker), steps, &opts.device_name, &opts.data_dir)?;
            w.peak_bytes_measured = Some(probe);
        }
    } else {
        let peak = probe_subprocess(exe, &rd.manifest(), None, steps, &opts.device_name, &opts.data_dir)?;
        acc.workers.iter_mut().for_each(|w| w.peak_bytes_measured = Some(peak));
    }
    Ok(())
}

/// Writes `workers.csv` (and `alignment.csv`) and records the method-level facts in the manifest.
fn record_accounting(rd: &RunDir, manifest: &mut Manifest, acc: &Accounting) -> Result<()> {
    write_csv(&rd.file("workers.csv"), &acc.workers)?;
    if !acc.alignment.is_empty() {
        write_csv(&rd.file("alignment.csv"), &acc.alignment)?;
    }
    let n = acc.workers.len().max(1) as f64;
    let mean = |f: &dyn Fn(&WorkerRow) -> f64| acc.workers.iter().map(f).sum::<f64>() / n;
    let e = &mut manifest.extra;
    e.extend(acc.extra.clone());
    e.insert("holders_m".into(), acc.holders.into());
    e.insert("mean_param_fraction".into(), mean(&|w| w.param_fraction).into());
    e.insert("mean_comm_bytes_per_step".into(), mean(&|w| w.comm_bytes_per_step).into());
    if acc.workers.iter().all(|w| w.peak_bytes_measured.is_some()) {
        e.insert("mean_peak_bytes_measured".into(), mean(&|w| w.peak_bytes_measured.unwrap_or(0) as f64).into());
    }
    if let Some(g) = acc.spectral_gap {
        e.insert("spectral_gap".into(), g.into());
    }
    Ok(())
}
