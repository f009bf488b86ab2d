//! The epoch loop every method shares: batches from the loader, the learning rate of every step, the
//! evaluation cadence, checkpoints and interrupts, and a start from a checkpoint's position.

use super::method::{Run, Trainer};
use super::{At, Interrupted, Observer};
use crate::checkpoint::{Tensors, TrainState};
use crate::comm::World;
use crate::data::loader::{steps_per_epoch, Shards, TrainLoader};
use crate::optim::lr_at;
use crate::results::{Final, MetricsRow};
use anyhow::{Context, Result};
use std::time::Instant;

/// Trains `method` for the run's epochs: one [`Trainer::step`] per optimizer step (given the workers'
/// batches, the learning rate and the 1-based step number), a [`Trainer::evaluate`] every `eval_every`
/// epochs and at the end, progress and metrics through `obs` (rows with an empty `run_id`), checkpoints
/// where `obs` asks for them (and on an interrupt), and a start from `resume`'s position where given.
/// Returns the last evaluation's figures.
pub(super) fn run(
    run: &Run,
    method: &mut dyn Trainer,
    obs: &mut dyn Observer,
    resume: Option<TrainState>,
) -> Result<Final> {
    let Run { spec, data, .. } = *run;
    let w = &spec.workload;
    let k = spec.method.workers;
    let epochs = spec.train_epochs();
    let aug = run.augment();
    let train_set = data.train.clone();
    let per_epoch = steps_per_epoch(train_set.len(), k, w.batch_size)?;
    let total = per_epoch * epochs;
    let mut pos = TrainState { workers: k, ..TrainState::default() };
    if let Some(r) = resume {
        if r.step > total {
            anyhow::bail!("the checkpoint is at step {}, past this run's {total} steps", r.step);
        }
        method.restore(&r).context("restoring the checkpoint")?;
        pos = TrainState { tensors: Tensors::new(), method: serde_json::Value::Null, workers: k, ..r };
    }
    let metric = run.plan.task.task.metric().name;
    let mut last = Final::of(pos.rows.last().unwrap_or(&MetricsRow::default()), metric);
    let (start, wall_before) = (Instant::now(), pos.wall_s);
    let wall = |start: &Instant| wall_before + start.elapsed().as_secs_f64();
    // Steps done since the last checkpoint (an interrupt with none saves nothing).
    let mut unsaved = 0usize;
    let save = |method: &mut dyn Trainer, pos: &TrainState, obs: &mut dyn Observer| -> Result<()> {
        let mut tensors = Tensors::new();
        let state = method.save(&mut tensors)?;
        obs.checkpoint(&TrainState { tensors, method: state, ..pos.clone() })
    };
    let first = pos.step / per_epoch + 1;
    for epoch in first..=epochs {
        let done_in_epoch = if epoch == first { pos.step % per_epoch } else { 0 };
        if done_in_epoch == 0 {
            (pos.epoch_loss_sum, pos.epoch_images, pos.epoch_secs) = (0.0, 0, 0.0);
        }
        let shards = Shards { workers: k, batch: w.batch_size, rank: run.world.rank(), ranks: run.world.size() };
        let loader = TrainLoader::start_for(train_set.clone(), aug, spec.seed, epoch, shards, done_in_epoch)?;
        let (t_epoch, secs_before, mut lr) = (Instant::now(), pos.epoch_secs, 0.0);
        for batches in loader {
            // Before each step: stop (a signal, on any process), or checkpoint after the step just done
            // (mid-epoch; epoch ends are below), as every process of the run agrees.
            let mid = unsaved > 0 && !pos.step.is_multiple_of(per_epoch);
            let due = mid && obs.checkpoint_due(At::Step);
            let (stop, due) = agree(run.world, obs.interrupted(), due)?;
            if stop || due {
                (pos.epoch_secs, pos.wall_s) = (secs_before + t_epoch.elapsed().as_secs_f64(), wall(&start));
            }
            if stop {
                if unsaved > 0 {
                    save(method, &pos, obs).context("saving a checkpoint on interrupt")?;
                }
                return Err(Interrupted.into());
            }
            if due {
                save(method, &pos, obs)?;
                unsaved = 0;
            }
            lr = lr_at(&spec.optim, pos.step, total, per_epoch);
            let loss = method
                .step(&batches, lr, pos.step + 1)
                .with_context(|| format!("training step {} (epoch {epoch})", pos.step + 1))?;
            pos.step += 1;
            unsaved += 1;
            pos.epoch_loss_sum += loss;
            // Every worker's batch, hosted here or not: the run's throughput, whichever process reports it.
            pos.epoch_images += k * w.batch_size;
            obs.step(epoch, pos.step, total, loss);
        }
        pos.epoch_secs = secs_before + t_epoch.elapsed().as_secs_f64();
        let img_per_s = pos.epoch_images as f64 / pos.epoch_secs.max(1e-9);
        if epoch % w.eval_every == 0 || epoch == epochs {
            let e = method.evaluate()?;
            let row = MetricsRow {
                run_id: String::new(),
                epoch,
                step: pos.step,
                train_loss: pos.epoch_loss_sum / per_epoch as f64,
                test_loss: e.test_loss,
                test_metric: e.test_metric,
                lr,
                img_per_s,
                wall_s: wall(&start),
                modes: e.modes,
            };
            obs.eval(&row)?;
            last = Final::of(&row, metric);
            pos.rows.push(row);
        }
        (pos.epoch_loss_sum, pos.epoch_images, pos.epoch_secs) = (0.0, 0, 0.0);
        let due = obs.checkpoint_due(At::EpochEnd { epoch, last: epoch == epochs });
        if agree(run.world, false, due)?.1 {
            pos.wall_s = wall(&start);
            save(method, &pos, obs)?;
            unsaved = 0;
        }
    }
    Ok(last)
}

/// What every process of a run decides at a step boundary: whether to stop (`stop`: asked on any process,
/// e.g. a signal that reached one rank) and whether to checkpoint (`due`: rank 0's observer says, whose
/// clock times the checkpoints). One all-reduce of two numbers over the processes; nothing in one process.
fn agree(world: &World, stop: bool, due: bool) -> Result<(bool, bool)> {
    if world.size() == 1 {
        return Ok((stop, due));
    }
    let mut flags = [f64::from(u8::from(stop)), f64::from(u8::from(due && world.is_root()))];
    world.comm.all_reduce_sum_f64(&mut flags)?;
    Ok((flags[0] > 0.0, flags[1] > 0.0))
}
