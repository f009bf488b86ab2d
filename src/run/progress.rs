//! What a run reports as it trains: [`Progress`] (an indicatif bar on a terminal, otherwise plain lines;
//! `metrics.csv` after every evaluation; the lock's heartbeat; checkpoints as the policy says; the final
//! model) for the process that records the run, [`RankPart`] for the other ranks of a run spread over
//! processes (their part of each checkpoint), and [`Quiet`] (nothing) for tools and tests.

use super::options::{Policy, RunOptions};
use crate::checkpoint::{self, TrainState};
use crate::lock::{self, RunLock};
use crate::results::{write_metrics, MetricsRow, RunDir};
use crate::spec::Run;
use crate::train::{Accounting, At, Observer};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The observer of a rank that writes nothing: it only passes on an interrupt.
pub struct Quiet {
    pub stop: Arc<AtomicBool>,
}

impl Observer for Quiet {
    fn step(&mut self, _epoch: usize, _step: usize, _total: usize, _loss: f64) {}
    fn eval(&mut self, _row: &MetricsRow) -> Result<()> {
        Ok(())
    }
    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// The observer of a rank other than 0 of a run spread over processes: it writes the part of every
/// checkpoint that holds its workers (rank 0 decides when, and commits it) and passes on an interrupt;
/// everything else is rank 0's.
pub struct RankPart {
    pub stop: Arc<AtomicBool>,
    pub run_dir: PathBuf,
    pub run_id: String,
    pub world: crate::comm::World,
}

impl Observer for RankPart {
    fn step(&mut self, _epoch: usize, _step: usize, _total: usize, _loss: f64) {}
    fn eval(&mut self, _row: &MetricsRow) -> Result<()> {
        Ok(())
    }
    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    fn checkpoint(&mut self, state: &TrainState) -> Result<()> {
        checkpoint::save_collective(&self.world, &self.run_dir, &self.run_id, state, true)
    }
}

/// `h:mm:ss`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Reports progress: an indicatif bar on a terminal, otherwise a plain line every `progress_every` and
/// one per evaluation; writes `metrics.csv` (atomically, whole) after every evaluation; publishes the
/// progress to the lock's heartbeat; writes checkpoints as the policy says. Stamps the run id on the rows
/// training reports (metrics, workers, alignment), which carry none.
pub struct Progress {
    title: String,
    bar: Option<ProgressBar>,
    rows: Vec<MetricsRow>,
    run_dir: PathBuf,
    run_id: String,
    metrics_path: PathBuf,
    /// The run's headline metric (`acc`): what `metrics.csv` and the lines name.
    metric: &'static str,
    last_acc: Option<f64>,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    heartbeat: Arc<lock::Progress>,
    policy: Policy,
    accounting: Option<Accounting>,
    step: usize,
    /// (when, step) of this process's first step: rates and ETA count only what this process trained.
    first: Option<(Instant, usize)>,
    last_line: Instant,
    last_checkpoint: Instant,
    images_per_step: usize,
    /// Write the final model to `<run>/model.safetensors`.
    save_model: bool,
    /// The processes the run is spread over: each writes its workers' part of a checkpoint.
    world: crate::comm::World,
}

impl Progress {
    /// The observer of `run` (recorded in `rd`, claimed with `lock`; its headline metric `metric`),
    /// continuing after `rows` (a resumed run's metrics so far).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        title: String,
        run: &Run,
        metric: &'static str,
        rd: &RunDir,
        opts: &RunOptions,
        lock: &RunLock,
        policy: &Policy,
        rows: Vec<MetricsRow>,
    ) -> Self {
        let images_per_step = run.spec.method.workers * run.spec.workload.batch_size;
        Self {
            title,
            bar: None,
            last_acc: rows.last().map(|r| r.test_metric),
            rows,
            run_dir: rd.dir.clone(),
            run_id: run.id.clone(),
            metrics_path: rd.metrics(),
            metric,
            stop: opts.stop.clone(),
            lost: lock.lost.clone(),
            heartbeat: lock.progress.clone(),
            policy: policy.clone(),
            accounting: None,
            step: 0,
            first: None,
            last_line: Instant::now(),
            last_checkpoint: Instant::now(),
            images_per_step,
            save_model: opts.save_model,
            world: opts.world.clone(),
        }
    }

    /// The accounting training reported, stamped with the run id (once).
    pub fn take_accounting(&mut self) -> Option<Accounting> {
        self.accounting.take()
    }

    /// Clears the progress bar.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Observer for Progress {
    fn step(&mut self, epoch: usize, step: usize, total: usize, loss: f64) {
        self.step = step;
        self.heartbeat.epoch.store(epoch, Ordering::Relaxed);
        self.heartbeat.step.store(step, Ordering::Relaxed);
        self.heartbeat.total_steps.store(total, Ordering::Relaxed);
        let (t0, s0) = *self.first.get_or_insert((Instant::now(), step - 1));
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let its = (step - s0) as f64 / secs;
        if !std::io::stderr().is_terminal() {
            if self.last_line.elapsed() >= self.policy.progress_every {
                self.last_line = Instant::now();
                crate::say!(
                    "{}: epoch {epoch} step {step}/{total} loss {loss:.4} {:.0} img/s ETA {}",
                    self.title,
                    its * self.images_per_step as f64,
                    clock((total - step) as f64 / its.max(1e-9))
                );
            }
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix} {wide_bar} {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(self.title.clone());
            b
        });
        bar.set_position(step as u64);
        let acc = self.last_acc.map(|a| format!(" {} {a:.3}", self.metric)).unwrap_or_default();
        bar.set_message(format!("epoch {epoch} loss {loss:.3}{acc} ({its:.1} it/s)"));
    }

    fn eval(&mut self, row: &MetricsRow) -> Result<()> {
        self.rows.push(MetricsRow { run_id: self.run_id.clone(), ..row.clone() });
        self.last_acc = Some(row.test_metric);
        write_metrics(&self.metrics_path, self.metric, &self.rows)?;
        let line = format!(
            "{}: epoch {} step {} train_loss {:.4} test_loss {:.4} test_{} {:.4} {:.0} img/s {:.1} s",
            self.title,
            row.epoch,
            row.step,
            row.train_loss,
            row.test_loss,
            self.metric,
            row.test_metric,
            row.img_per_s,
            row.wall_s
        );
        match &self.bar {
            Some(b) => b.println(line),
            None => crate::say!("{line}"),
        }
        Ok(())
    }

    fn accounting(&mut self, acc: &Accounting) -> Result<()> {
        let mut acc = acc.clone();
        acc.workers.iter_mut().for_each(|w| w.run_id.clone_from(&self.run_id));
        acc.alignment.iter_mut().for_each(|a| a.run_id.clone_from(&self.run_id));
        self.accounting = Some(acc);
        Ok(())
    }

    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.lost.load(Ordering::Relaxed)
    }

    fn checkpoint_due(&mut self, at: At) -> bool {
        let p = &self.policy;
        let timed = p.checkpoint_interval.is_some_and(|d| self.last_checkpoint.elapsed() >= d);
        match at {
            At::Step => timed || (p.checkpoint_steps > 0 && self.step.is_multiple_of(p.checkpoint_steps)),
            // The final epoch always: the trained state then survives a failure to record it.
            At::EpochEnd { epoch, last } => {
                p.checkpoints()
                    && (last
                        || timed
                        || (p.checkpoint_every > 0 && epoch.is_multiple_of(p.checkpoint_every))
                        || p.checkpoint_steps > 0)
            }
        }
    }

    fn checkpoint(&mut self, state: &TrainState) -> Result<()> {
        // Not when the run is no longer ours to write (the other ranks are told so).
        let ours = !self.lost.load(Ordering::SeqCst);
        checkpoint::save_collective(&self.world, &self.run_dir, &self.run_id, state, ours)?;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    fn model(&mut self, values: &std::collections::BTreeMap<String, candle_core::Tensor>) -> Result<()> {
        if self.save_model {
            checkpoint::write_tensors(&self.run_dir.join("model.safetensors"), values)?;
        }
        Ok(())
    }
}
