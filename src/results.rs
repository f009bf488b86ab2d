//! Results on disk (docs/design.md §5): `manifest.json`, `metrics.csv` per run, `summary.csv` per experiment.
//!
//! Every file is written atomically (a temp file in the same directory, then rename), so an interrupted
//! or failed run never leaves a half-written file. Figures and reports read only these files.
//!
//! Each CSV file's schema is one row type here ([`MetricsRow`], [`WorkerRow`], [`AlignRow`],
//! [`SummaryRow`]): its serialised fields are the columns, and the same type is written ([`write_csv`],
//! [`write_metrics`]) and read back ([`read_csv`], [`read_metrics`]), so a column is added in one place.

use crate::spec::{Run, RunSpec};
use anyhow::{bail, Context, Result};
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
    write_rows(path, &columns::<T>()?, rows)
}

/// Writes `header`, then `rows` without theirs, atomically.
fn write_rows<T: Serialize>(path: &Path, header: &[String], rows: &[T]) -> Result<()> {
    let mut w = csv_writer(path, header)?;
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
    let (mut r, headers) = open_csv(path)?;
    records(path, &mut r, |rec, line| {
        rec.deserialize(Some(&headers)).map_err(|e| deserialize_error(path, line, &headers, rec, e))
    })
}

/// A CSV reader of `path` and the file's header.
fn open_csv(path: &Path) -> Result<(csv::Reader<std::fs::File>, csv::StringRecord)> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = r.headers().map_err(|e| csv_error(path, e))?.clone();
    Ok((r, headers))
}

/// Every remaining record of `r` (reading `path`) through `row(record, line)`.
fn records<T>(
    path: &Path,
    r: &mut csv::Reader<std::fs::File>,
    mut row: impl FnMut(&csv::StringRecord, u64) -> Result<T>,
) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| csv_error(path, e))?;
        rows.push(row(&rec, rec.position().map_or(0, |p| p.line()))?);
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

/// Final figures of a finished run, copied into the manifest and the summary. In the manifest the
/// headline metric is stored under `test_<metric>` (classification: `test_acc`), named by the run's task.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Final {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub test_loss: f64,
    /// The task's headline metric ([`crate::task::Metric::name`]): what `test_metric` measures.
    pub metric: String,
    pub test_metric: f64,
    pub wall_s: f64,
    pub img_per_s: f64,
}

impl Final {
    /// The final figures of the evaluation `r` of a run whose headline metric is `metric`.
    pub fn of(r: &MetricsRow, metric: &str) -> Self {
        Final {
            epoch: r.epoch,
            step: r.step,
            train_loss: r.train_loss,
            test_loss: r.test_loss,
            metric: metric.to_string(),
            test_metric: r.test_metric,
            wall_s: r.wall_s,
            img_per_s: r.img_per_s,
        }
    }
}

impl Serialize for Final {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(7))?;
        m.serialize_entry("epoch", &self.epoch)?;
        m.serialize_entry("step", &self.step)?;
        m.serialize_entry("train_loss", &self.train_loss)?;
        m.serialize_entry("test_loss", &self.test_loss)?;
        m.serialize_entry(&headline_column(&self.metric), &self.test_metric)?;
        m.serialize_entry("wall_s", &self.wall_s)?;
        m.serialize_entry("img_per_s", &self.img_per_s)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for Final {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            epoch: usize,
            step: usize,
            train_loss: f64,
            test_loss: f64,
            wall_s: f64,
            img_per_s: f64,
            #[serde(flatten)]
            rest: BTreeMap<String, f64>,
        }
        let r = Raw::deserialize(d)?;
        let mut headline = r.rest.iter().filter_map(|(k, v)| Some((metric_of_column(k)?, *v)));
        let Some((metric, test_metric)) = headline.next() else {
            return Err(serde::de::Error::custom("final metrics: no `test_<metric>` entry"));
        };
        if let Some((other, _)) = headline.next() {
            return Err(serde::de::Error::custom(format!(
                "final metrics: two headline entries, `test_{metric}` and `test_{other}`"
            )));
        }
        Ok(Final {
            epoch: r.epoch,
            step: r.step,
            train_loss: r.train_loss,
            test_loss: r.test_loss,
            metric: metric.to_string(),
            test_metric,
            wall_s: r.wall_s,
            img_per_s: r.img_per_s,
        })
    }
}

/// The column (and manifest key) of the headline metric `metric`: `test_<metric>`.
pub fn headline_column(metric: &str) -> String {
    format!("test_{metric}")
}

/// The metric a headline column names (`test_acc` → `acc`); `None` for `test_loss` and other columns.
fn metric_of_column(column: &str) -> Option<&str> {
    column.strip_prefix("test_").filter(|m| !m.is_empty() && *m != "loss")
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
/// order, the headline column named by the task's metric (`test_metric` is written `test_<metric>`:
/// classification's `test_acc`); [`MetricsRow::modes`] adds one `test_<metric>_<mode>` column per
/// evaluation mode after them ([`write_metrics`], [`read_metrics`]).
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
    /// The task's headline metric on the test split, in the evaluation mode `method.eval_mode`.
    #[serde(serialize_with = "decimal")]
    pub test_metric: f64,
    #[serde(serialize_with = "decimal")]
    pub lr: f64,
    #[serde(serialize_with = "one_decimal")]
    pub img_per_s: f64,
    #[serde(serialize_with = "three_decimals")]
    pub wall_s: f64,
    /// The headline metric of every evaluation mode (`full`, `recal`, …): the `test_<metric>_<mode>`
    /// columns.
    #[serde(skip)]
    pub modes: BTreeMap<String, f64>,
}

/// The placeholder name of the headline column in a row type's serialised fields: the files name it
/// after the metric (`test_metric` → `test_acc`, `final_test_metric` → `final_test_acc`).
const HEADLINE_FIELD: &str = "test_metric";

/// `header` with the headline field named after `metric`.
fn name_headline(mut header: Vec<String>, metric: &str) -> Vec<String> {
    for h in header.iter_mut() {
        if let Some(prefix) = h.strip_suffix(HEADLINE_FIELD) {
            *h = format!("{prefix}{}", headline_column(metric));
        }
    }
    header
}

/// The headline column of a header read from `path` (the first `<prefix>test_<metric>` column), its
/// position and the metric it names.
fn find_headline(path: &Path, headers: &csv::StringRecord, prefix: &str) -> Result<(usize, String)> {
    headers
        .iter()
        .enumerate()
        .find_map(|(i, h)| Some((i, metric_of_column(h.strip_prefix(prefix)?)?.to_string())))
        .with_context(|| format!("{}: line 1: no headline metric column `{prefix}test_<metric>`", path.display()))
}

/// `headers` with the column at `i` renamed to the row type's placeholder field `name`.
fn rename_column(headers: &csv::StringRecord, i: usize, name: &str) -> csv::StringRecord {
    headers.iter().enumerate().map(|(j, h)| if j == i { name } else { h }).collect()
}

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

/// Writes `metrics.csv` of a run whose headline metric is `metric`: the fixed columns, then one
/// `test_<metric>_<mode>` column per evaluation mode of the first row (empty in a row that lacks the mode).
pub fn write_metrics(path: &Path, metric: &str, rows: &[MetricsRow]) -> Result<()> {
    let modes: Vec<&String> = rows.first().map(|r| r.modes.keys().collect()).unwrap_or_default();
    let mut header = name_headline(columns::<MetricsRow>()?, metric);
    header.extend(modes.iter().map(|m| format!("{}_{m}", headline_column(metric))));
    let mut w = csv_writer(path, &header)?;
    for r in rows {
        let accs: Vec<String> = modes.iter().map(|m| r.modes.get(*m).map(f64::to_string).unwrap_or_default()).collect();
        w.serialize((r, accs)).with_context(|| format!("serialising a row of {}", path.display()))?;
    }
    finish_csv(path, w)
}

/// A run's `metrics.csv`: the metric its headline columns name, and its rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub metric: String,
    pub rows: Vec<MetricsRow>,
}

/// Reads `metrics.csv`: the headline column (the first `test_<metric>` but `test_loss`) names the metric,
/// the fixed columns fill the rows, and every `test_<metric>_<mode>` column goes into
/// [`MetricsRow::modes`] (an empty cell: the mode was not evaluated at that row).
pub fn read_metrics(path: &Path) -> Result<Metrics> {
    let (mut r, headers) = open_csv(path)?;
    let (at, metric) = find_headline(path, &headers, "")?;
    let fields = rename_column(&headers, at, HEADLINE_FIELD);
    let mode_prefix = format!("{}_", headline_column(&metric));
    let rows = records(path, &mut r, |rec, line| {
        let mut row: MetricsRow =
            rec.deserialize(Some(&fields)).map_err(|e| deserialize_error(path, line, &headers, rec, e))?;
        for (column, text) in headers.iter().zip(rec.iter()) {
            let Some(mode) = column.strip_prefix(&mode_prefix) else { continue };
            if !text.trim().is_empty() {
                let value = text.trim().parse().map_err(|_| not_a_number(path, line, column, text))?;
                row.modes.insert(mode.to_string(), value);
            }
        }
        Ok(row)
    })?;
    Ok(Metrics { metric, rows })
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
    /// The final headline metric: the column `final_test_<metric>` (classification: `final_test_acc`).
    pub final_test_metric: f64,
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
        final_test_metric: f.test_metric,
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
/// writers leave a complete file. The headline column is named by the finished runs' metric
/// (`final_test_<metric>`); runs that report different metrics cannot share one summary and are an
/// error naming two of them.
pub fn write_summary(results: &Path, experiment: &str) -> Result<PathBuf> {
    let exp_dir = results.join(experiment);
    clean_temp_files(&exp_dir, false);
    let mut rows = Vec::new();
    let mut metric: Option<(String, String)> = None; // (metric, the run that named it)
    let mut first_dataset = None;
    for entry in list_experiment(&exp_dir)? {
        // A manifest being replaced right now is complete either way (atomic rename); an unreadable
        // one is not a finished run.
        let Ok(m) = entry.manifest else { continue };
        first_dataset.get_or_insert_with(|| m.spec.workload.dataset.clone());
        let Some(row) = summary_row(&m)? else { continue };
        let named = &m.final_metrics.as_ref().map(|f| f.metric.clone()).unwrap_or_default();
        match &metric {
            Some((other, by)) if other != named => bail!(
                "{}: run {by} reports `{other}` and run {} `{named}`: one summary has one headline metric \
                 (put runs of different tasks in different experiments)",
                exp_dir.display(),
                m.run_id
            ),
            Some(_) => {}
            None => metric = Some((named.clone(), m.run_id.clone())),
        }
        rows.push(row);
    }
    rows.sort_by(|a, b| (&a.label, &a.run_id).cmp(&(&b.label, &b.run_id)));
    // No finished run: the metric of the task its runs' dataset names.
    let metric = match metric {
        Some((m, _)) => m,
        None => crate::task::metric_of_dataset(first_dataset.as_deref().unwrap_or_default()).name.to_string(),
    };
    let path = exp_dir.join("summary.csv");
    write_rows(&path, &name_headline(columns::<SummaryRow>()?, &metric), &rows)?;
    Ok(path)
}

/// Reads a `summary.csv`: the metric its headline column (`final_test_<metric>`) names, and its rows.
pub fn read_summary(path: &Path) -> Result<(String, Vec<SummaryRow>)> {
    let (mut r, headers) = open_csv(path)?;
    let (at, metric) = find_headline(path, &headers, "final_")?;
    let fields = rename_column(&headers, at, &format!("final_{HEADLINE_FIELD}"));
    let rows = records(path, &mut r, |rec, line| {
        rec.deserialize(Some(&fields)).map_err(|e| deserialize_error(path, line, &headers, rec, e))
    })?;
    Ok((metric, rows))
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
            let (metric, rows) = read_summary(&exp.join("summary.csv"))?;
            write_rows(&out, &name_headline(columns::<SummaryRow>()?, &metric), &rows)?;
            assert_eq!(std::fs::read(exp.join("summary.csv"))?, std::fs::read(&out)?, "{}", exp.display());
            // Finished runs only: a run training in this checkout has not written all its files yet.
            let done = |r: &Listed| r.manifest.as_ref().is_ok_and(|m| m.status == Status::Done);
            for run in list_experiment(&exp)?.into_iter().filter(done) {
                let m = read_metrics(&run.dir.join("metrics.csv"))?;
                assert_eq!(m.metric, "acc");
                write_metrics(&out, &m.metric, &m.rows)?;
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
        write_metrics(&path, "acc", &[row])?;
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

    /// A finished run of experiment `exp` under `results` whose task's metric is `metric`.
    fn finished_run(results: &Path, exp: &str, id: &str, metric: &str) -> Result<()> {
        let spec = crate::plan::parse(crate::spec::MIN_SPEC, Path::new("t.toml"), &[])?.runs.remove(0).spec;
        let run = Run { id: id.into(), label: id.into(), spec };
        let mut m = Manifest::new(&run, Path::new("e.toml"), "cpu");
        m.status = Status::Done;
        let row = MetricsRow { test_metric: 0.25, ..Default::default() };
        m.final_metrics = Some(Final::of(&row, metric));
        m.write(&RunDir::new(results, exp, id).manifest())
    }

    #[test]
    fn the_headline_columns_are_named_by_the_task_metric() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("metrics.csv");
        let row =
            MetricsRow { test_metric: 0.75, modes: BTreeMap::from([("full".to_string(), 0.75)]), ..Default::default() };
        write_metrics(&path, "top2", std::slice::from_ref(&row))?;
        let header = std::fs::read_to_string(&path)?.lines().next().unwrap_or_default().to_string();
        assert_eq!(header, "run_id,epoch,step,train_loss,test_loss,test_top2,lr,img_per_s,wall_s,test_top2_full");
        assert_eq!(read_metrics(&path)?, Metrics { metric: "top2".into(), rows: vec![row.clone()] });
        // The manifest stores the final value under the metric's name, and reads it back.
        let f = Final::of(&row, "top2");
        let json = serde_json::to_value(&f)?;
        assert_eq!(json["test_top2"], 0.75, "{json}");
        assert_eq!(serde_json::from_value::<Final>(json)?, f);
        // The summary's headline column too; runs of two metrics cannot share one.
        finished_run(tmp.path(), "e", "a", "top2")?;
        let (metric, rows) = read_summary(&write_summary(tmp.path(), "e")?)?;
        assert_eq!((metric.as_str(), rows.len(), rows[0].final_test_metric), ("top2", 1, 0.25));
        finished_run(tmp.path(), "e", "b", "acc")?;
        let e = write_summary(tmp.path(), "e").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("run a reports `top2` and run b `acc`"), "{e}");
        // A file without a headline column is named as such.
        std::fs::write(&path, "run_id,epoch,test_loss\n,1,0.5\n")?;
        let e = read_metrics(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.ends_with("line 1: no headline metric column `test_<metric>`"), "{e}");
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
