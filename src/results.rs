//! Results on disk (DESIGN.md §5): `manifest.json`, `metrics.csv` per run, `summary.csv` per experiment.
//!
//! Every file is written atomically (a temp file in the same directory, then rename), so an interrupted
//! or failed run never leaves a half-written file. Figures and reports read only these files.

use crate::spec::{Run, RunSpec};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: temp file + fsync + rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Serialises rows as CSV (header from the first row's field names) and writes them atomically.
pub fn write_csv<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r).with_context(|| format!("serialising a row of {}", path.display()))?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    write_atomic(path, &bytes)
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Done,
    Interrupted,
    Failed(String),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Running => f.write_str("running"),
            Status::Done => f.write_str("done"),
            Status::Interrupted => f.write_str("interrupted"),
            Status::Failed(r) => write!(f, "failed: {r}"),
        }
    }
}

/// Final figures of a finished run, copied into the manifest and the summary.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Final {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub wall_s: f64,
    pub img_per_s: f64,
}

/// `manifest.json`: what ran, where, with what, and how it ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub run_id: String,
    pub experiment: String,
    pub label: String,
    pub spec_file: String,
    pub seed: u64,
    pub spec: RunSpec,
    pub status: Status,
    pub git_rev: String,
    pub sdp_version: String,
    pub crate_versions: BTreeMap<String, String>,
    pub device: String,
    pub host: String,
    pub started: String,
    pub ended: Option<String>,
    pub final_metrics: Option<Final>,
    /// Method-specific facts (spectral gap, achieved coverage, …).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    pub fn new(run: &Run, spec_file: &Path, device: &str) -> Self {
        Self {
            run_id: run.id.clone(),
            experiment: run.spec.name.clone(),
            label: run.label.clone(),
            spec_file: spec_file.display().to_string(),
            seed: run.spec.seed,
            spec: run.spec.clone(),
            status: Status::Running,
            git_rev: git_rev(),
            sdp_version: env!("CARGO_PKG_VERSION").to_string(),
            crate_versions: BTreeMap::from([
                ("candle-core".to_string(), "0.11.1".to_string()),
                ("candle-nn".to_string(), "0.11.1".to_string()),
            ]),
            device: device.to_string(),
            host: host(),
            started: now(),
            ended: None,
            final_metrics: None,
            extra: BTreeMap::new(),
        }
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// One row of `metrics.csv`: one evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricsRow {
    pub run_id: String,
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub lr: f64,
    pub img_per_s: f64,
    pub wall_s: f64,
    /// Test accuracy of every evaluation mode (`full`, `recal`, …): the `test_acc_<mode>` columns.
    #[serde(skip)]
    pub modes: BTreeMap<String, f64>,
}

/// Writes `metrics.csv`: the fixed columns, then one `test_acc_<mode>` column per evaluation mode.
pub fn write_metrics(path: &Path, rows: &[MetricsRow]) -> Result<()> {
    let modes: Vec<&String> = rows.first().map(|r| r.modes.keys().collect()).unwrap_or_default();
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> =
        ["run_id", "epoch", "step", "train_loss", "test_loss", "test_acc", "lr", "img_per_s", "wall_s"]
            .map(String::from)
            .to_vec();
    header.extend(modes.iter().map(|m| format!("test_acc_{m}")));
    w.write_record(&header)?;
    for r in rows {
        let mut rec = vec![
            r.run_id.clone(),
            r.epoch.to_string(),
            r.step.to_string(),
            r.train_loss.to_string(),
            r.test_loss.to_string(),
            r.test_acc.to_string(),
            r.lr.to_string(),
            format!("{:.1}", r.img_per_s),
            format!("{:.3}", r.wall_s),
        ];
        rec.extend(modes.iter().map(|m| r.modes.get(*m).map(|v| v.to_string()).unwrap_or_default()));
        w.write_record(&rec)?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    write_atomic(path, &bytes)
}

/// One row of `workers.csv`: what one worker holds, measures and sends.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WorkerRow {
    pub run_id: String,
    pub worker: usize,
    pub units_held: usize,
    /// Achieved fraction of the full model's parameters this worker holds.
    pub param_fraction: f64,
    pub param_bytes: usize,
    pub grad_bytes: usize,
    /// Optimizer state actually held at the end of training.
    pub optim_bytes: usize,
    /// Estimated activation bytes at the per-worker batch (see `ResNet::activation_elems`).
    pub activation_bytes_est: usize,
    /// Peak resident bytes of the worker's steps alone in a fresh process (`sdp memprobe`); empty where
    /// not measured (non-CPU device, or probing disabled).
    pub peak_bytes_measured: Option<u64>,
    /// Bytes sent per step with coordinates all-reduced per holder set (the scheme SDP needs).
    pub comm_bytes_per_step: f64,
    /// Bytes sent per step by a plain all-reduce of the whole masked model among all K workers.
    pub comm_bytes_per_step_masked: f64,
}

/// One row of `alignment.csv`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AlignRow {
    pub run_id: String,
    pub step: usize,
    pub worker: usize,
    /// Cosine between the worker's subnetwork gradient and the full model's gradient on the same batch,
    /// over the worker's coordinates.
    pub cosine_to_full_grad: f64,
}

/// One row of `summary.csv`: one finished run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SummaryRow {
    pub run_id: String,
    pub label: String,
    pub seed: u64,
    pub dataset: String,
    pub model: String,
    pub method: String,
    pub workers: usize,
    pub epochs: usize,
    pub final_test_acc: f64,
    pub final_test_loss: f64,
    pub final_train_loss: f64,
    pub img_per_s: f64,
    pub wall_s: f64,
    /// Mean over workers of the achieved parameter fraction.
    pub mean_param_fraction: Option<f64>,
    /// Mean over workers of the measured peak resident bytes (`sdp memprobe`).
    pub mean_peak_bytes: Option<f64>,
    /// Mean over workers of the bytes sent per step (holder-set all-reduce).
    pub comm_bytes_per_step: Option<f64>,
    pub spectral_gap: Option<f64>,
}

/// The resolved spec in a run's `manifest.json`, or in a JSON file holding just a resolved spec.
pub fn read_resolved_spec(path: &Path) -> Result<RunSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let spec = v.get("spec").cloned().unwrap_or(v);
    serde_json::from_value(spec).with_context(|| format!("{}: not a resolved run spec", path.display()))
}

/// Paths of one run's results.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn new(results: &Path, experiment: &str, run_id: &str) -> Self {
        Self { dir: results.join(experiment).join(run_id) }
    }
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.csv")
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// The run's status on disk, if it has a readable manifest.
    pub fn status(&self) -> Option<Status> {
        Manifest::read(&self.manifest()).ok().map(|m| m.status)
    }
}

/// Rewrites `results/<experiment>/summary.csv` from the manifests of `runs` that are done.
pub fn write_summary(results: &Path, experiment: &str, runs: &[Run]) -> Result<PathBuf> {
    let mut rows = Vec::new();
    for run in runs {
        let rd = RunDir::new(results, experiment, &run.id);
        let Ok(m) = Manifest::read(&rd.manifest()) else { continue };
        let (Status::Done, Some(f)) = (&m.status, &m.final_metrics) else { continue };
        let s = &m.spec;
        rows.push(SummaryRow {
            run_id: m.run_id.clone(),
            label: m.label.clone(),
            seed: m.seed,
            dataset: s.workload.dataset.clone(),
            model: serde_json::to_value(s.workload.model)?.as_str().unwrap_or_default().to_string(),
            method: serde_json::to_value(s.method.kind)?.as_str().unwrap_or_default().to_string(),
            workers: s.method.workers,
            epochs: s.workload.epochs,
            final_test_acc: f.test_acc,
            final_test_loss: f.test_loss,
            final_train_loss: f.train_loss,
            img_per_s: f.img_per_s,
            wall_s: f.wall_s,
            mean_param_fraction: m.extra.get("mean_param_fraction").and_then(|v| v.as_f64()),
            mean_peak_bytes: m.extra.get("mean_peak_bytes_measured").and_then(|v| v.as_f64()),
            comm_bytes_per_step: m.extra.get("mean_comm_bytes_per_step").and_then(|v| v.as_f64()),
            spectral_gap: m.extra.get("spectral_gap").and_then(|v| v.as_f64()),
        });
    }
    let path = results.join(experiment).join("summary.csv");
    write_csv(&path, &rows)?;
    Ok(path)
}

/// All runs under `results/`: (experiment, run id, manifest) for every readable manifest.
pub fn list(results: &Path) -> Result<Vec<(String, String, Manifest)>> {
    let mut out = Vec::new();
    let Ok(exps) = std::fs::read_dir(results) else { return Ok(out) };
    let mut exps: Vec<_> = exps.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    exps.sort();
    for exp in exps {
        let mut runs: Vec<_> = std::fs::read_dir(&exp)
            .with_context(|| format!("reading {}", exp.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("manifest.json").is_file())
            .collect();
        runs.sort();
        for r in runs {
            if let Ok(m) = Manifest::read(&r.join("manifest.json")) {
                let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                out.push((name(&exp), name(&r), m));
            }
        }
    }
    Ok(out)
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The git revision of the working tree the binary runs in (`+dirty` when modified), or `unknown`.
fn git_rev() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "--short=12", "HEAD"]) {
        Some(rev) => match run(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{rev}+dirty"),
            _ => rev,
        },
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temp_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a/b.txt");
        write_atomic(&p, b"one")?;
        write_atomic(&p, b"two")?;
        assert_eq!(std::fs::read_to_string(&p)?, "two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a"))?.map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        Ok(())
    }
}
