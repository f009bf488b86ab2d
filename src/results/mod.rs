//! Results on disk (docs/design.md §5): `manifest.json`, `metrics.csv` per run, `summary.csv` per experiment.
//!
//! Every file is written atomically (a temp file in the same directory, then rename), so an interrupted
//! or failed run never leaves a half-written file. Figures and reports read only these files.
//!
//! Each CSV file's schema is one row type (`rows.rs`: [`MetricsRow`], [`WorkerRow`], [`AlignRow`],
//! [`SummaryRow`]): its serialised fields are the columns, and the same type is written ([`write_csv`],
//! [`write_metrics`]) and read back ([`read_csv`], [`read_metrics`]), so a column is added in one place.
//! `csv_io.rs` writes and reads CSV files, `manifest.rs` the manifest; this file lists what is on disk.

mod csv_io;
mod manifest;
mod rows;

pub use csv_io::{read_csv, write_atomic, write_csv};
pub use manifest::{host, now, read_resolved_spec, Final, Manifest, Status};
pub use rows::{
    headline_column, read_metrics, read_summary, write_metrics, write_summary, AlignRow, Metrics, MetricsRow,
    SummaryRow, WorkerRow,
};

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

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
        if pid != std::process::id() && (all || !crate::io::pid_alive(pid)) {
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
