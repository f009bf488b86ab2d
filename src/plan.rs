//! A run's spec resolved once: the names a spec gives (`method.masking`, `workload.dataset`,
//! `workload.model`, `--device`) looked up in their registries, with errors that name the spec key.
//!
//! `spec` knows the shape of a spec and nothing of what its names mean; this module sits above `spec`,
//! `masking`, `data` and `models` and is the one place where a name becomes the thing it names. Spec files
//! are loaded through [`load`] / [`parse`], which resolve every run before any is returned, so a wrong name
//! is an error of the file (with its line) rather than of a run that has started.

use crate::data::registry::DataRef;
use crate::masking;
use crate::models;
use crate::spec::{self, Experiment, RunSpec, SpecError};
use crate::task;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

/// What a run's names resolve to.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `method.masking`.
    pub strategy: masking::Registered,
    /// `workload.dataset`.
    pub data: DataRef,
    /// The task the dataset is for.
    pub task: task::Registered,
}

impl Plan {
    /// Resolves `spec`; the error names the offending key (`method.masking: unknown masking strategy …`).
    pub fn of(spec: &RunSpec) -> Result<Self> {
        resolve(spec).map_err(|(key, msg)| SpecError(format!("{key}: {msg}")).into())
    }

    /// The name of the run's headline metric (its task's), which names the results' headline columns.
    pub fn metric(&self) -> &'static str {
        self.task.task.metric().name
    }
}

/// Resolves every name of `spec`, or says which key is wrong and why.
pub fn resolve(spec: &RunSpec) -> Result<Plan, (String, String)> {
    let (w, m) = (&spec.workload, &spec.method);
    let err = |k: &str, e: anyhow::Error| (k.to_string(), format!("{e:#}"));
    let data = DataRef::parse(&w.dataset).map_err(|e| err("workload.dataset", e))?;
    let task = task::task(data.source().task()).map_err(|e| err("workload.dataset", e))?;
    if !task.task.eval_modes().contains(&m.eval_mode) {
        let msg = format!("`{}` does not apply to the {} task", m.eval_mode.name(), task.name);
        return Err(("method.eval_mode".into(), msg));
    }
    let family = models::of(w, 1).map_err(|e| {
        // The model rejects its shape overrides, or (none given) needs them.
        let key = if w.widths.is_some() || w.depths.is_some() { "workload.widths" } else { "workload.model" };
        err(key, e)
    })?;
    let strategy = masking::strategy(&m.masking).map_err(|e| err("method.masking", e))?;
    // A method may need what the family lacks: narrowing (small_dense), per-step drops (the dropping
    // baselines).
    let rules = m.kind.rules().map_err(|e| ("method.kind".to_string(), e))?;
    let (needs, kind) = (rules.needs(), rules.name());
    let missing =
        if needs.narrowing { family.with_widths(&family.stages().0).err().map(|e| format!("{e:#}")) } else { None };
    let missing = missing.or_else(|| {
        (needs.drops && !family.drops())
            .then(|| "its networks do not implement per-step drops (Net::forward_dropping, Family::drops)".into())
    });
    if let Some(why) = missing {
        let model = w.model.as_str();
        return Err((
            "method.kind".into(),
            format!("{kind} is not implemented for workload.model = \"{model}\": {why}"),
        ));
    }
    Ok(Plan { strategy, data, task })
}

/// Reads, overrides, expands, validates and resolves a spec file: every run's names are checked here.
pub fn load(path: &Path, overrides: &[String]) -> Result<Experiment> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading spec {}", path.display()))?;
    parse(&text, path, overrides)
}

/// As [`load`], from text (`path` is used in messages and recorded in the experiment).
pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Experiment> {
    // The headline metric of each dataset's task, as resolving every run found it.
    let metrics = RefCell::new(BTreeMap::new());
    let exp = spec::parse_checked(text, path, overrides, &|s| {
        let plan = resolve(s)?;
        metrics.borrow_mut().insert(s.workload.dataset.clone(), plan.metric());
        Ok(())
    })?;
    one_metric(&exp, &metrics.into_inner())?;
    Ok(exp)
}

/// An experiment's runs report one headline metric: its summary has one headline column and its figures
/// compare one quantity. A grid over datasets of different tasks is an error naming two runs. (Every run
/// has been resolved by now: `metrics` maps its dataset to its task's metric.)
fn one_metric(exp: &Experiment, metrics: &BTreeMap<String, &'static str>) -> Result<()> {
    let metric = |r: &spec::Run| metrics.get(&r.spec.workload.dataset).copied().unwrap_or_default();
    let Some(first) = exp.runs.first() else { return Ok(()) };
    let (want, other) = (metric(first), exp.runs.iter().find(|r| metric(r) != metric(first)));
    match other {
        None => Ok(()),
        Some(r) => Err(SpecError(format!(
            "{}: key `workload.dataset`: run `{}` reports `{want}` and run `{}` `{}`: the runs of one experiment \
             report one metric (put datasets of different tasks in separate spec files)",
            exp.path.display(),
            first.label,
            r.label,
            metric(r)
        ))
        .into()),
    }
}

/// The device `--device` names: `cpu`, `cuda` (device 0) or `cuda:N`.
pub fn device(s: &str) -> Result<Device> {
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
