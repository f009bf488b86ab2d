//! The CSV files' schemas: `metrics.csv` (one row per evaluation), `workers.csv`, `alignment.csv` and
//! `summary.csv`, each one row type written and read by the same code. The headline columns are named by
//! the task's metric (`test_<metric>`, `test_<metric>_<mode>`, `final_test_<metric>`).

use super::csv_io::{columns, csv_writer, deserialize_error, finish_csv, not_a_number, open_csv, records, write_rows};
use super::{clean_temp_files, list_experiment, Manifest, Status};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The column (and manifest key) of the headline metric `metric`: `test_<metric>`.
pub fn headline_column(metric: &str) -> String {
    format!("test_{metric}")
}

/// The metric a headline column names (`test_acc` → `acc`); `None` for `test_loss` and other columns.
pub(super) fn metric_of_column(column: &str) -> Option<&str> {
    column.strip_prefix("test_").filter(|m| !m.is_empty() && *m != "loss")
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
        method: s.method.kind.to_string(),
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
    let mut first_spec = None;
    for entry in list_experiment(&exp_dir)? {
        // A manifest being replaced right now is complete either way (atomic rename); an unreadable
        // one is not a finished run.
        let Ok(m) = entry.manifest else { continue };
        first_spec.get_or_insert_with(|| m.spec.clone());
        let Some(row) = summary_row(&m)? else { continue };
        let named = m.final_metrics.as_ref().map_or("", |f| f.metric.as_str());
        match &metric {
            Some((other, by)) if other != named => bail!(
                "{}: run {by} reports `{other}` and run {} `{named}`: one summary has one headline metric \
                 (put runs of different tasks in different experiments)",
                exp_dir.display(),
                m.run_id
            ),
            Some(_) => {}
            None => metric = Some((named.to_string(), m.run_id.clone())),
        }
        rows.push(row);
    }
    rows.sort_by(|a, b| (&a.label, &a.run_id).cmp(&(&b.label, &b.run_id)));
    // No finished run: the metric of the task its first run's dataset names (resolving a spec reads no
    // data), else classification's.
    let metric = match metric {
        Some((m, _)) => m,
        None => first_spec
            .and_then(|s| crate::plan::Plan::of(&s).ok())
            .map_or(crate::task::CLASSIFY.task.metric().name, |p| p.metric())
            .to_string(),
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

#[cfg(test)]
mod tests {
    use super::super::{read_csv, write_csv, Final, Listed, RunDir};
    use super::*;
    use crate::spec::Run;
    use serde::de::DeserializeOwned;

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
}
