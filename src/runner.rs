//! Runs the runs of one or more experiments: skip finished ones, write the manifest before training and
//! the metrics after every evaluation, mark interrupted and failed runs, rewrite each summary at the end.

use crate::data::{self, Dataset};
use crate::memprobe::probe_subprocess;
use crate::results::{write_csv, write_metrics, write_summary, Manifest, MetricsRow, RunDir, Status, WorkerRow};
use crate::spec::MethodKind;
use crate::spec::{Experiment, Run};
use crate::trainer::{self, Accounting, Interrupted, Observer};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct RunOptions {
    pub results_dir: PathBuf,
    pub data_dir: PathBuf,
    pub device: Device,
    pub device_name: String,
    pub force: bool,
    pub only: Option<String>,
    /// Set (by the Ctrl-C handler) to stop after the current step; checked at every step.
    pub stop: Arc<AtomicBool>,
    /// The `sdp` binary to run `sdp memprobe` with after each run (CPU runs); `None` disables probing.
    pub memprobe: Option<PathBuf>,
}

/// How a batch of runs ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub interrupted: bool,
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .with_context(|| format!("invalid --device `{s}`: expected cpu, cuda or cuda:N"))?,
                None => bail!("invalid --device `{s}`: expected cpu, cuda or cuda:N"),
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this binary was built without CUDA support (rebuild with --features cuda)");
            }
            Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
        }
    }
}

/// Whether a run passes the `--only` filter (substring of its id or label).
fn selected(run: &Run, only: &Option<String>) -> bool {
    only.as_ref().is_none_or(|s| run.id.contains(s.as_str()) || run.label.contains(s.as_str()))
}

pub fn run_all(experiments: &[Experiment], opts: &RunOptions) -> Result<Outcome> {
    let todo: Vec<(&Experiment, &Run)> = experiments
        .iter()
        .flat_map(|e| e.runs.iter().map(move |r| (e, r)))
        .filter(|(_, r)| selected(r, &opts.only))
        .collect();
    let mut outcome = Outcome::default();
    let mut datasets: HashMap<String, Dataset> = HashMap::new();
    let n = todo.len();
    for (i, (exp, run)) in todo.iter().enumerate() {
        let rd = RunDir::new(&opts.results_dir, &exp.name, &run.id);
        if !opts.force && rd.status() == Some(Status::Done) {
            eprintln!("[{}/{n}] {} {} ({}): done, skipped (--force reruns it)", i + 1, exp.name, run.id, run.label);
            outcome.skipped += 1;
            continue;
        }
        let key = serde_json::to_string(&(
            &run.spec.workload.dataset,
            run.spec.workload.data_seed,
            run.spec.workload.train_samples,
            run.spec.workload.test_samples,
        ))?;
        if !datasets.contains_key(&key) {
            let t = Instant::now();
            match data::load(&run.spec.workload, &opts.data_dir) {
                Ok(d) => {
                    eprintln!(
                        "dataset {}: {} train / {} test images, {} classes ({:.1} s)",
                        d.name,
                        d.train.len(),
                        d.test.len(),
                        d.num_classes(),
                        t.elapsed().as_secs_f64()
                    );
                    datasets.insert(key.clone(), d);
                }
                Err(e) => {
                    eprintln!("[{}/{n}] {} {}: failed: {e:#}", i + 1, exp.name, run.id);
                    let mut m = Manifest::new(run, &exp.path, &opts.device_name);
                    m.status = Status::Failed(format!("{e:#}"));
                    m.ended = Some(crate::results::now());
                    m.write(&rd.manifest())?;
                    outcome.failed += 1;
                    continue;
                }
            }
        }
        let data = &datasets[&key];
        match run_one(exp, run, data, opts, &rd, (i + 1, n))? {
            Status::Done => outcome.done += 1,
            Status::Interrupted => {
                outcome.interrupted = true;
                break;
            }
            _ => outcome.failed += 1,
        }
    }
    for exp in experiments {
        if todo.iter().any(|(e, _)| e.name == exp.name) {
            let path = write_summary(&opts.results_dir, &exp.name, &exp.runs)?;
            eprintln!("summary: {}", path.display());
        }
    }
    Ok(outcome)
}

fn run_one(
    exp: &Experiment,
    run: &Run,
    data: &Dataset,
    opts: &RunOptions,
    rd: &RunDir,
    pos: (usize, usize),
) -> Result<Status> {
    let mut manifest = Manifest::new(run, &exp.path, &opts.device_name);
    manifest.write(&rd.manifest())?;
    // A rerun starts its metrics afresh.
    let _ = std::fs::remove_file(rd.metrics());
    let title = format!("[{}/{}] {} {} ({})", pos.0, pos.1, exp.name, run.id, run.label);
    let mut obs = Progress::new(title.clone(), rd.metrics(), opts.stop.clone());
    let result = trainer::train(&run.spec, &run.id, data, &opts.device, &mut obs);
    obs.finish();
    let result = match (result, obs.accounting.take()) {
        (Ok(f), Some(acc)) => record_accounting(run, rd, &mut manifest, acc, opts).map(|_| f),
        (r, _) => r,
    };
    manifest.ended = Some(crate::results::now());
    let status = match result {
        Ok(f) => {
            eprintln!(
                "{title}: done: test_acc {:.4}, test_loss {:.4}, {:.0} img/s, {:.1} s",
                f.test_acc, f.test_loss, f.img_per_s, f.wall_s
            );
            manifest.final_metrics = Some(f);
            Status::Done
        }
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("{title}: interrupted");
            Status::Interrupted
        }
        Err(e) => {
            eprintln!("{title}: failed: {e:#}");
            Status::Failed(format!("{e:#}"))
        }
    };
    manifest.status = status.clone();
    manifest.write(&rd.manifest())?;
    Ok(status)
}

/// Measures each worker's memory in a fresh process (where enabled), writes `workers.csv`, and records
/// the method-level facts in the manifest.
fn record_accounting(
    run: &Run,
    rd: &RunDir,
    manifest: &mut Manifest,
    mut acc: Accounting,
    opts: &RunOptions,
) -> Result<()> {
    if let Some(exe) = &opts.memprobe {
        let steps = 3;
        match run.spec.method.kind {
            MethodKind::Dp | MethodKind::SmallDense | MethodKind::StochasticDepth | MethodKind::Dropout => {
                let peak = probe_subprocess(exe, &rd.manifest(), None, steps, &opts.device_name, &opts.data_dir)?;
                acc.workers.iter_mut().for_each(|w| w.peak_bytes_measured = Some(peak));
            }
            MethodKind::Sdp => {
                for w in acc.workers.iter_mut() {
                    let probe = probe_subprocess(
                        exe,
                        &rd.manifest(),
                        Some(w.worker),
                        steps,
                        &opts.device_name,
                        &opts.data_dir,
                    )?;
                    w.peak_bytes_measured = Some(probe);
                }
            }
        }
    }
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
        eprintln!("spectral gap of the averaging graph: {g:.4}");
        e.insert("spectral_gap".into(), g.into());
    }
    Ok(())
}

/// Reports progress: an indicatif bar on a terminal, a plain line per evaluation otherwise; writes
/// `metrics.csv` (atomically, whole) after every evaluation.
struct Progress {
    title: String,
    bar: Option<ProgressBar>,
    rows: Vec<MetricsRow>,
    metrics_path: PathBuf,
    last_acc: Option<f64>,
    started: Instant,
    stop: Arc<AtomicBool>,
    accounting: Option<Accounting>,
}

impl Progress {
    fn new(title: String, metrics_path: PathBuf, stop: Arc<AtomicBool>) -> Self {
        Self {
            title,
            bar: None,
            rows: Vec::new(),
            metrics_path,
            last_acc: None,
            started: Instant::now(),
            stop,
            accounting: None,
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Observer for Progress {
    fn step(&mut self, epoch: usize, step: usize, total: usize, loss: f64) {
        if !std::io::stderr().is_terminal() {
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
        let ips = (step as f64) / self.started.elapsed().as_secs_f64().max(1e-9);
        let acc = self.last_acc.map(|a| format!(" acc {a:.3}")).unwrap_or_default();
        bar.set_message(format!("epoch {epoch} loss {loss:.3}{acc} ({ips:.1} it/s)"));
    }

    fn eval(&mut self, row: &MetricsRow) -> Result<()> {
        self.rows.push(row.clone());
        self.last_acc = Some(row.test_acc);
        write_metrics(&self.metrics_path, &self.rows)?;
        let line = format!(
            "{}: epoch {} step {} train_loss {:.4} test_loss {:.4} test_acc {:.4} {:.0} img/s {:.1} s",
            self.title, row.epoch, row.step, row.train_loss, row.test_loss, row.test_acc, row.img_per_s, row.wall_s
        );
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
        Ok(())
    }

    fn accounting(&mut self, acc: &Accounting) -> Result<()> {
        self.accounting = Some(acc.clone());
        Ok(())
    }

    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}
