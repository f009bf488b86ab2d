//! Reading one experiment's results: each run's `manifest.json` (status, resolved spec, final metrics,
//! method facts in `extra`), `metrics.csv` (the accuracy curve) and `workers.csv` (what each worker held,
//! measured and sent). `summary.csv` is not read: it is rebuilt from the manifests, which stay the source.

use crate::results::{read_csv, read_metrics, Manifest, MetricsRow, Status, WorkerRow};
use crate::spec::RunSpec;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// One finished run, as the results files describe it.
#[derive(Debug, Clone)]
pub(super) struct RunData {
    pub spec: RunSpec,
    /// The headline metric the run's files name (`acc`), and its final value.
    pub metric: String,
    pub final_metric: f64,
    /// Mean over workers of the fraction of the full model's parameters held.
    pub param_fraction: Option<f64>,
    /// Mean over workers of the parameter bytes held (workers.csv).
    pub param_bytes: Option<f64>,
    /// Measured peak bytes per worker (`sdp memprobe`), where every worker was measured.
    pub peak: Option<Spread>,
    /// Parameter + gradient + optimizer + estimated activation bytes per worker (workers.csv).
    pub est: Option<Spread>,
    /// Mean over workers of the bytes sent per step.
    pub comm_bytes: Option<f64>,
    /// Spectral gap of the worker–unit averaging graph (manifest `extra.spectral_gap`; SDP runs only).
    pub spectral_gap: Option<f64>,
    /// Every evaluation (metrics.csv).
    pub curve: Vec<MetricsRow>,
}

/// A per-worker quantity: its mean over workers and its largest worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Spread {
    pub mean: f64,
    pub max: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Option<Self> {
        (!v.is_empty()).then(|| Spread {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            max: v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

pub(super) struct ExperimentData {
    pub name: String,
    pub runs: Vec<RunData>,
    /// Runs that were not `done`: (run id, status).
    pub skipped: Vec<(String, String)>,
}

pub(super) fn load_experiment(dir: &Path, name: &str) -> Result<ExperimentData> {
    let mut run_dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    run_dirs.sort();
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for rd in run_dirs {
        let manifest_path = rd.join("manifest.json");
        let m = Manifest::read(&manifest_path)
            .map_err(|e| anyhow!("{e:#} (name other experiments on the command line to leave `{name}` out)"))?;
        if m.status != Status::Done {
            skipped.push((m.run_id.clone(), m.status.to_string()));
            continue;
        }
        runs.push(load_run(&rd, m)?);
    }
    Ok(ExperimentData { name: name.to_string(), runs, skipped })
}

fn load_run(rd: &Path, m: Manifest) -> Result<RunData> {
    let manifest_path = rd.join("manifest.json");
    let extra = |key: &str| -> Result<Option<f64>> {
        match m.extra.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) => Ok(Some(x)),
                None => bail!("{}: extra.{key}: `{v}` is not a number", manifest_path.display()),
            },
        }
    };
    let metrics_path = rd.join("metrics.csv");
    let curve = if metrics_path.is_file() { read_metrics(&metrics_path)? } else { Default::default() };
    let (metric, final_metric) = match (&m.final_metrics, curve.rows.last()) {
        (Some(f), _) => (f.metric.clone(), f.test_metric),
        (None, Some(last)) => (curve.metric.clone(), last.test_metric),
        (None, None) => {
            bail!("{}: run is done but has no final metrics and no metrics.csv", manifest_path.display())
        }
    };
    let workers_path = rd.join("workers.csv");
    let (param_fraction, param_bytes, peak, est, comm_bytes) = if workers_path.is_file() {
        let workers = read_csv::<WorkerRow>(&workers_path)?;
        let col = |f: &dyn Fn(&WorkerRow) -> f64| workers.iter().map(f).collect::<Vec<f64>>();
        let measured = workers.iter().filter(|w| w.peak_bytes_measured.is_some()).count();
        if measured != 0 && measured != workers.len() {
            bail!(
                "{}: column `peak_bytes_measured`: {measured} of {} workers measured (all or none expected)",
                workers_path.display(),
                workers.len()
            );
        }
        let mean = |v: Vec<f64>| Spread::of(&v).map(|s| s.mean);
        (
            mean(col(&|w| w.param_fraction)),
            mean(col(&|w| w.param_bytes as f64)),
            Spread::of(&col(&|w| w.peak_bytes_measured.map_or(f64::NAN, |p| p as f64))).filter(|_| measured > 0),
            Spread::of(&col(&|w| (w.param_bytes + w.grad_bytes + w.optim_bytes + w.activation_bytes_est) as f64)),
            mean(col(&|w| w.comm_bytes_per_step)),
        )
    } else {
        // Without workers.csv: the means the runner recorded in the manifest (no largest worker).
        let spread = |v: Option<f64>| v.map(|mean| Spread { mean, max: f64::NAN });
        (
            extra("mean_param_fraction")?,
            None,
            spread(extra("mean_peak_bytes_measured")?),
            None,
            extra("mean_comm_bytes_per_step")?,
        )
    };
    Ok(RunData {
        metric,
        final_metric,
        param_fraction,
        param_bytes,
        peak,
        est,
        comm_bytes,
        spectral_gap: extra("spectral_gap")?,
        curve: curve.rows,
        spec: m.spec,
    })
}
