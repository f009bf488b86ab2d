//! Results on disk (docs/design.md §5): `manifest.json`, `metrics.csv` per run, `summary.csv` per experiment.
//!
//! Every file is written atomically (a temp file in the same directory, then rename), so an interrupted
//! or failed run never leaves a half-written file. Figures and reports read only these files.
//!
//! Each CSV file's schema is one row type here ([`MetricsRow`], [`WorkerRow`], [`AlignRow`],
//! [`SummaryRow`]): its serialised fields are the columns, and the same type is written ([`write_csv`],
//! [`write_metrics`]) and read back ([`read_csv`], [`read_metrics`]), so a column is added in one place.

use crate::spec::{Run, RunSpec};
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
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

/// Writes `rows` as CSV, atomically: a header naming `T`'s fields (also when there is no row), then one
/// record per row.
pub fn write_csv<T: Serialize + Default>(path: &Path, rows: &[T]) -> Result<()> {
    let mut w = csv_writer(path, &columns::<T>()?)?;
    for r in rows {
        w.serialize(r).with_context(|| format!("serialising a row of {}", path.display()))?;
    }
    finish_csv(path, w)
}

/// The columns of a row type: the names of its serialised fields, in order.
fn columns<T: Serialize + Default>() -> Result<Vec<String>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.serialize(T::default())?;
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(csv::Reader::from_reader(bytes.as_slice()).headers()?.iter().map(String::from).collect())
}

/// A CSV writer into memory that has written `header` and serialises each record without one.
fn csv_writer(path: &Path, header: &[String]) -> Result<csv::Writer<Vec<u8>>> {
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
    w.write_record(header).with_context(|| format!("writing the header of {}", path.display()))?;
    Ok(w)
}

fn finish_csv(path: &Path, w: csv::Writer<Vec<u8>>) -> Result<()> {
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    write_atomic(path, &bytes)
}

/// Reads a CSV file with a header into rows of `T`, columns matched by name (others are ignored); errors
/// name the file, the line and the column.
pub fn read_csv<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    read_records(path, |headers, rec, line| {
        rec.deserialize(Some(headers)).map_err(|e| deserialize_error(path, line, headers, rec, e))
    })
}

/// Reads every record of a CSV file with a header through `row(headers, record, line)`.
fn read_records<T>(
    path: &Path,
    mut row: impl FnMut(&csv::StringRecord, &csv::StringRecord, u64) -> Result<T>,
) -> Result<Vec<T>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = r.headers().map_err(|e| csv_error(path, e))?.clone();
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| csv_error(path, e))?;
        rows.push(row(&headers, &rec, rec.position().map_or(0, |p| p.line()))?);
    }
    Ok(rows)
}

fn csv_error(path: &Path, e: csv::Error) -> anyhow::Error {
    match e.position() {
        Some(p) => anyhow::anyhow!("{}: line {}: {e}", path.display(), p.line()),
        None => anyhow::anyhow!("{}: {e}", path.display()),
    }
}

/// A record that does not fit its row type, naming the column and its text where csv says which.
fn deserialize_error(
    path: &Path,
    line: u64,
    headers: &csv::StringRecord,
    rec: &csv::StringRecord,
    e: csv::Error,
) -> anyhow::Error {
    let csv::ErrorKind::Deserialize { err, .. } = e.kind() else { return csv_error(path, e) };
    let column = err.field().and_then(|i| Some((headers.get(i as usize)?, rec.get(i as usize)?)));
    match (column, err.kind()) {
        (Some((name, text)), csv::DeserializeErrorKind::ParseInt(_) | csv::DeserializeErrorKind::ParseFloat(_)) => {
            not_a_number(path, line, name, text)
        }
        (Some((name, _)), kind) => anyhow::anyhow!("{}: line {line}: column `{name}`: {kind}", path.display()),
        (None, kind) => anyhow::anyhow!("{}: line {line}: {kind}", path.display()),
    }
}

fn not_a_number(path: &Path, line: u64, column: &str, text: &str) -> anyhow::Error {
    anyhow::anyhow!("{}: line {line}: column `{column}`: `{text}` is not a number", path.display())
}

/// A run's status in its manifest, stored as text: `running`, `done`, `interrupted` or `failed: reason`
/// (manifests written as `{"failed": "reason"}` by earlier versions are read too).
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Running,
    Done,
    Interrupted,
    Failed(String),
}

impl Serialize for Status {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Legacy { failed: String },
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Legacy { failed } => Status::Failed(failed),
            Raw::Text(t) => match t.as_str() {
                "running" => Status::Running,
                "done" => Status::Done,
                "interrupted" => Status::Interrupted,
                _ => match t.strip_prefix("failed: ") {
                    Some(reason) => Status::Failed(reason.to_string()),
                    None => return Err(serde::de::Error::custom(format!("unknown run status `{t}`"))),
                },
            },
        })
    }
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

impl From<&MetricsRow> for Final {
    fn from(r: &MetricsRow) -> Self {
        Final {
            epoch: r.epoch,
            step: r.step,
            train_loss: r.train_loss,
            test_loss: r.test_loss,
            test_acc: r.test_acc,
            wall_s: r.wall_s,
            img_per_s: r.img_per_s,
        }
    }
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

/// One row of `metrics.csv`: one evaluation. Its serialised fields are the file's fixed columns, in
/// order; [`MetricsRow::modes`] adds one `test_acc_<mode>` column per evaluation mode after them
/// ([`write_metrics`], [`read_metrics`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MetricsRow {
    /// The run's id (empty in the rows training reports: the runner stamps it).
    pub run_id: String,
    pub epoch: usize,
    pub step: usize,
    #[serde(serialize_with = "decimal")]
    pub train_loss: f64,
    #[serde(serialize_with = "decimal")]
    pub test_loss: f64,
    #[serde(serialize_with = "decimal")]
    pub test_acc: f64,
    #[serde(serialize_with = "decimal")]
    pub lr: f64,
    #[serde(serialize_with = "one_decimal")]
    pub img_per_s: f64,
    #[serde(serialize_with = "three_decimals")]
    pub wall_s: f64,
    /// Test accuracy of every evaluation mode (`full`, `recal`, …): the `test_acc_<mode>` columns.
    #[serde(skip)]
    pub modes: BTreeMap<String, f64>,
}

/// What the name of an evaluation mode's accuracy column in `metrics.csv` starts with.
const MODE_COLUMN: &str = "test_acc_";

/// `x` in plain decimal notation, the shortest that reads back the same (Rust's `Display`).
fn decimal<S: serde::Serializer>(x: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(x)
}

fn one_decimal<S: serde::Serializer>(x: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{x:.1}"))
}

fn three_decimals<S: serde::Serializer>(x: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{x:.3}"))
}

/// Writes `metrics.csv`: the fixed columns, then one `test_acc_<mode>` column per evaluation mode of the
/// first row (empty in a row that lacks the mode).
pub fn write_metrics(path: &Path, rows: &[MetricsRow]) -> Result<()> {
    let modes: Vec<&String> = rows.first().map(|r| r.modes.keys().collect()).unwrap_or_default();
    let mut header = columns::<MetricsRow>()?;
    header.extend(modes.iter().map(|m| format!("{MODE_COLUMN}{m}")));
    let mut w = csv_writer(path, &header)?;
    for r in rows {
        let accs: Vec<String> = modes.iter().map(|m| r.modes.get(*m).map(f64::to_string).unwrap_or_default()).collect();
        w.serialize((r, accs)).with_context(|| format!("serialising a row of {}", path.display()))?;
    }
    finish_csv(path, w)
}

/// Reads `metrics.csv`: the fixed columns, and every `test_acc_<mode>` column into
/// [`MetricsRow::modes`] (an empty cell: the mode was not evaluated at that row).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRow>> {
    read_records(path, |headers, rec, line| {
        let mut row: MetricsRow =
            rec.deserialize(Some(headers)).map_err(|e| deserialize_error(path, line, headers, rec, e))?;
        for (name, text) in headers.iter().zip(rec.iter()) {
            let Some(mode) = name.strip_prefix(MODE_COLUMN) else { continue };
            if !text.trim().is_empty() {
                let acc = text.trim().parse().map_err(|_| not_a_number(path, line, name, text))?;
                row.modes.insert(mode.to_string(), acc);
            }
        }
        Ok(row)
    })
}

/// One row of `workers.csv`: what one worker holds, measures and sends.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkerRow {
    /// The run's id (empty in the rows training reports: the runner stamps it).
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
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AlignRow {
    /// The run's id (empty in the rows training reports: the runner stamps it).
    pub run_id: String,
    pub step: usize,
    pub worker: usize,
    /// Cosine between the worker's subnetwork gradient and the full model's gradient on the same batch,
    /// over the worker's coordinates.
    pub cosine_to_full_grad: f64,
}

/// One row of `summary.csv`: one finished run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
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

/// The summary row of a finished run's manifest; `None` unless the run is done.
fn summary_row(m: &Manifest) -> Result<Option<SummaryRow>> {
    let (Status::Done, Some(f)) = (&m.status, &m.final_metrics) else { return Ok(None) };
    let s = &m.spec;
    Ok(Some(SummaryRow {
        run_id: m.run_id.clone(),
        label: m.label.clone(),
        seed: m.seed,
        dataset: s.workload.dataset.clone(),
        model: s.workload.model.as_str().to_string(),
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
    }))
}

/// Rewrites `results/<experiment>/summary.csv` from the manifests in the experiment's folder: one row
/// per finished run, whatever command made it, sorted by label then run id; the header even when no run
/// is done. Each writer rebuilds the whole file from the folder and renames it into place, so concurrent
/// writers leave a complete file.
pub fn write_summary(results: &Path, experiment: &str) -> Result<PathBuf> {
    let exp_dir = results.join(experiment);
    clean_temp_files(&exp_dir, false);
    let mut rows = Vec::new();
    for entry in list_experiment(&exp_dir)? {
        // A manifest being replaced right now is complete either way (atomic rename); an unreadable
        // one is not a finished run.
        if let Ok(m) = entry.manifest {
            rows.extend(summary_row(&m)?);
        }
    }
    rows.sort_by(|a, b| (&a.label, &a.run_id).cmp(&(&b.label, &b.run_id)));
    let path = exp_dir.join("summary.csv");
    write_csv(&path, &rows)?;
    Ok(path)
}

/// Removes `.NAME.PID.tmp` / `.NAME.tmp-PID` files left in `dir` by writers that died mid-write: those of
/// dead processes, or with `all`, every one but this process's (the caller owns the folder).
pub fn clean_temp_files(dir: &Path, all: bool) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            continue;
        }
        let pid = if let Some(stem) = name.strip_suffix(".tmp") {
            stem.rsplit_once('.').and_then(|(_, p)| p.parse::<u32>().ok())
        } else {
            name.rsplit_once(".tmp-").and_then(|(_, p)| p.parse::<u32>().ok())
        };
        let Some(pid) = pid else { continue };
        if pid != std::process::id() && (all || !crate::lock::pid_alive(pid)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// One run folder found under a results directory.
pub struct Listed {
    pub experiment: String,
    pub run_id: String,
    pub dir: PathBuf,
    /// The manifest, or why it could not be read (one line).
    pub manifest: std::result::Result<Manifest, String>,
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Every run folder (one holding a `manifest.json`) of one experiment folder, sorted by name; none when
/// the folder does not exist.
fn list_experiment(exp: &Path) -> Result<Vec<Listed>> {
    let entries = match std::fs::read_dir(exp) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", exp.display())),
    };
    let mut runs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("manifest.json").is_file()).collect();
    runs.sort();
    Ok(runs
        .into_iter()
        .map(|r| Listed {
            experiment: file_name(exp),
            run_id: file_name(&r),
            manifest: Manifest::read(&r.join("manifest.json")).map_err(|e| format!("{e:#}").replace('\n', " ")),
            dir: r,
        })
        .collect())
}

/// Every run under `results/`, by experiment then run id, readable manifest or not.
pub fn list(results: &Path) -> Result<Vec<Listed>> {
    let exps = std::fs::read_dir(results).with_context(|| format!("reading {}", results.display()))?;
    let mut exps: Vec<_> = exps.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    exps.sort();
    let mut out = Vec::new();
    for exp in exps {
        out.extend(list_experiment(&exp)?);
    }
    Ok(out)
}

/// The experiment folders under `results/` (those holding at least one run).
pub fn experiments(results: &Path) -> Result<Vec<String>> {
    Ok(list(results)?
        .into_iter()
        .map(|l| l.experiment)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect())
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn host() -> String {
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
    fn status_is_stored_as_text_and_old_manifests_still_read() -> Result<()> {
        let failed = Status::Failed("out of memory".into());
        assert_eq!(serde_json::to_string(&failed)?, "\"failed: out of memory\"");
        for s in [Status::Running, Status::Done, Status::Interrupted, failed.clone()] {
            assert_eq!(serde_json::from_str::<Status>(&serde_json::to_string(&s)?)?, s);
        }
        assert_eq!(serde_json::from_str::<Status>(r#"{"failed": "out of memory"}"#)?, failed);
        let e = serde_json::from_str::<Status>("\"weird\"").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("unknown run status `weird`"), "{e}");
        Ok(())
    }

    #[test]
    fn empty_summary_has_its_header_and_dead_writers_temp_files_go() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("exp"))?;
        let dead = dir.path().join("exp/.summary.csv.999999999.tmp");
        std::fs::write(&dead, "half")?;
        let path = write_summary(dir.path(), "exp")?;
        let text = std::fs::read_to_string(path)?;
        assert!(text.starts_with("run_id,label,seed,dataset,model,method,workers,epochs,final_test_acc"), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!dead.exists(), "temp file of a dead writer left behind");
        Ok(())
    }

    /// Reads `path` as rows of `T` and writes them again to `out`: the same bytes.
    fn rewrites_the_same<T: Serialize + DeserializeOwned + Default>(path: &Path, out: &Path) -> Result<()> {
        write_csv(out, &read_csv::<T>(path)?)?;
        anyhow::ensure!(std::fs::read(path)? == std::fs::read(out)?, "{} written back differs", path.display());
        Ok(())
    }

    #[test]
    fn committed_results_files_read_back_and_write_the_same_bytes() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let out = tmp.path().join("out.csv");
        let mut files = 0;
        for exp in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("results/mini"))? {
            let exp = exp?.path();
            rewrites_the_same::<SummaryRow>(&exp.join("summary.csv"), &out)?;
            // Finished runs only: a run training in this checkout has not written all its files yet.
            let done = |r: &Listed| r.manifest.as_ref().is_ok_and(|m| m.status == Status::Done);
            for run in list_experiment(&exp)?.into_iter().filter(done) {
                write_metrics(&out, &read_metrics(&run.dir.join("metrics.csv"))?)?;
                assert_eq!(std::fs::read(run.dir.join("metrics.csv"))?, std::fs::read(&out)?, "{}", run.run_id);
                rewrites_the_same::<WorkerRow>(&run.dir.join("workers.csv"), &out)?;
                if run.dir.join("alignment.csv").is_file() {
                    rewrites_the_same::<AlignRow>(&run.dir.join("alignment.csv"), &out)?;
                }
                files += 1;
            }
        }
        assert!(files > 0, "no run under results/mini");
        Ok(())
    }

    #[test]
    fn a_cell_that_is_not_a_number_is_named_by_file_line_and_column() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("metrics.csv");
        let row = MetricsRow { modes: BTreeMap::from([("full".to_string(), 0.5)]), ..Default::default() };
        write_metrics(&path, &[row])?;
        let text = std::fs::read_to_string(&path)?;
        assert_eq!(text.lines().nth(1), Some(",0,0,0,0,0,0,0.0,0.000,0.5"));
        for (bad, column, cell) in
            [(",1.5,0,0,0,0,0,0,0,0.5", "epoch", "1.5"), (",0,0,0,0,0,0,0,0,high", "test_acc_full", "high")]
        {
            std::fs::write(&path, format!("{text}{bad}\n"))?;
            let e = read_metrics(&path).err().map(|e| e.to_string()).unwrap_or_default();
            let want = format!("{}: line 3: column `{column}`: `{cell}` is not a number", path.display());
            assert_eq!(e, want);
        }
        Ok(())
    }

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
