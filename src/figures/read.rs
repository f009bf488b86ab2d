//! Reading one experiment's results: each run's `manifest.json` (status, resolved spec, final metrics,
//! method facts in `extra`), `metrics.csv` (the accuracy curve) and `workers.csv` (what each worker held,
//! measured and sent). `summary.csv` is not read: it is rebuilt from the manifests, which stay the source.

use crate::results::{Manifest, Status};
use crate::spec::RunSpec;
use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One finished run, as the results files describe it.
#[derive(Debug, Clone)]
pub(super) struct RunData {
    pub spec: RunSpec,
    pub final_acc: f64,
    /// Mean over workers of the fraction of the full model's parameters held.
    pub param_fraction: Option<f64>,
    /// Measured peak bytes per worker (`sdp memprobe`), where every worker was measured.
    pub peak: Option<Spread>,
    /// Parameter + gradient + optimizer + estimated activation bytes per worker (workers.csv).
    pub est: Option<Spread>,
    /// Mean over workers of the bytes sent per step.
    pub comm_bytes: Option<f64>,
    /// Spectral gap of the worker–unit averaging graph (manifest `extra.spectral_gap`; SDP runs only).
    pub spectral_gap: Option<f64>,
    pub curve: Vec<EvalRow>,
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

#[derive(Debug, Clone)]
pub(super) struct EvalRow {
    pub epoch: usize,
    pub test_acc: f64,
    /// `test_acc_<mode>` columns.
    pub modes: BTreeMap<String, f64>,
}

/// The columns of `workers.csv` that figures use (others are ignored).
#[derive(Debug, Deserialize)]
struct WorkerCols {
    param_fraction: f64,
    param_bytes: f64,
    grad_bytes: f64,
    optim_bytes: f64,
    activation_bytes_est: f64,
    /// Empty where the run did not measure memory.
    peak_bytes_measured: Option<f64>,
    comm_bytes_per_step: f64,
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
    let curve = if metrics_path.is_file() { read_metrics(&metrics_path)? } else { vec![] };
    let final_acc = match (&m.final_metrics, curve.last()) {
        (Some(f), _) => f.test_acc,
        (None, Some(last)) => last.test_acc,
        (None, None) => {
            bail!("{}: run is done but has no final metrics and no metrics.csv", manifest_path.display())
        }
    };
    let workers_path = rd.join("workers.csv");
    let (param_fraction, peak, est, comm_bytes) = if workers_path.is_file() {
        let workers = read_csv::<WorkerCols>(&workers_path)?;
        let col = |f: &dyn Fn(&WorkerCols) -> f64| workers.iter().map(f).collect::<Vec<f64>>();
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
            Spread::of(&col(&|w| w.peak_bytes_measured.unwrap_or(f64::NAN))).filter(|_| measured > 0),
            Spread::of(&col(&|w| w.param_bytes + w.grad_bytes + w.optim_bytes + w.activation_bytes_est)),
            mean(col(&|w| w.comm_bytes_per_step)),
        )
    } else {
        // Without workers.csv: the means the runner recorded in the manifest (no largest worker).
        let spread = |v: Option<f64>| v.map(|mean| Spread { mean, max: f64::NAN });
        (
            extra("mean_param_fraction")?,
            spread(extra("mean_peak_bytes_measured")?),
            None,
            extra("mean_comm_bytes_per_step")?,
        )
    };
    Ok(RunData {
        final_acc,
        param_fraction,
        peak,
        est,
        comm_bytes,
        spectral_gap: extra("spectral_gap")?,
        curve,
        spec: m.spec,
    })
}

/// Reads a CSV with a header into rows of `T`; errors name the file and the line.
fn read_csv<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = r.headers().map_err(|e| csv_error(path, e))?.clone();
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| csv_error(path, e))?;
        let line = rec.position().map_or(0, |p| p.line());
        rows.push(rec.deserialize(Some(&headers)).map_err(|e| anyhow!("{}: line {line}: {e}", path.display()))?);
    }
    Ok(rows)
}

fn csv_error(path: &Path, e: csv::Error) -> anyhow::Error {
    match e.position() {
        Some(p) => anyhow!("{}: line {}: {e}", path.display(), p.line()),
        None => anyhow!("{}: {e}", path.display()),
    }
}

/// Reads `metrics.csv`: `epoch`, `test_acc` and every `test_acc_<mode>` column.
fn read_metrics(path: &Path) -> Result<Vec<EvalRow>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = r.headers().map_err(|e| csv_error(path, e))?.clone();
    let col = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| anyhow!("{}: line 1: no column `{name}`", path.display()))
    };
    let (epoch_i, acc_i) = (col("epoch")?, col("test_acc")?);
    let modes: Vec<(usize, String)> = headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.strip_prefix("test_acc_").map(|m| (i, m.to_string())))
        .collect();
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| csv_error(path, e))?;
        let line = rec.position().map_or(0, |p| p.line());
        let field = |i: usize| -> Result<f64> {
            let s = rec.get(i).unwrap_or_default();
            s.trim().parse::<f64>().map_err(|_| {
                anyhow!("{}: line {line}: column `{}`: `{s}` is not a number", path.display(), &headers[i])
            })
        };
        let epoch = field(epoch_i)?;
        if epoch < 0.0 || epoch.fract() != 0.0 {
            bail!("{}: line {line}: column `epoch`: `{epoch}` is not an epoch number", path.display());
        }
        let mut m = BTreeMap::new();
        for (i, name) in &modes {
            // An empty mode column means the mode was not evaluated at that row.
            if !rec.get(*i).unwrap_or_default().trim().is_empty() {
                m.insert(name.clone(), field(*i)?);
            }
        }
        rows.push(EvalRow { epoch: epoch as usize, test_acc: field(acc_i)?, modes: m });
    }
    Ok(rows)
}
