//! `manifest.json`: what ran, where, with what, how it ended, and its final figures.

use super::rows::{headline_column, metric_of_column, MetricsRow};
use super::write_atomic;
use crate::spec::{Run, RunSpec};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

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

/// The resolved spec in a run's `manifest.json`, or in a JSON file holding just a resolved spec.
pub fn read_resolved_spec(path: &Path) -> Result<RunSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let spec = v.get("spec").cloned().unwrap_or(v);
    serde_json::from_value(spec).with_context(|| format!("{}: not a resolved run spec", path.display()))
}

pub use crate::io::{host, now};

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
}
