//! Grouping runs into series by their resolved spec (never by parsing labels): a series is the set of runs
//! whose specs agree on everything but `seed` and `method.coverage`; a point is the runs of one series at
//! one coverage (its seeds). Each series is named by kind, masking and regime plus any other field the
//! experiment varies, and compared with the DP series trained on the same workload and K.

use super::read::RunData;
use crate::spec::{Method, MethodName, RunSpec, RULES};
use crate::train::methods::{self, Look};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// Runs that differ only in `seed` and `method.coverage`.
pub(super) struct Series {
    pub label: String,
    pub slug: String,
    pub kind: MethodName,
    /// How its method is drawn (the registry's; an unregistered method's runs get the default look).
    pub look: Look,
    /// A representative spec (the first run's).
    pub spec: RunSpec,
    /// Coverage (in 1/10000) → indices into the experiment's runs.
    pub points: BTreeMap<u32, Vec<usize>>,
}

pub(super) fn cov_key(c: f64) -> u32 {
    (c * 10000.0).round() as u32
}

pub(super) fn cov_of(key: u32) -> f64 {
    key as f64 / 10000.0
}

/// The spec as flat `dotted.path → value` pairs, without the fields that never separate series.
fn flat_spec(spec: &RunSpec) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::String(s) => {
                out.insert(prefix.to_string(), s.clone());
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", &serde_json::to_value(spec).unwrap_or_default(), &mut out);
    for k in ["name", "seed", "method.coverage"] {
        out.remove(k);
    }
    out
}

pub(super) fn series_of(runs: &[RunData]) -> Vec<Series> {
    let flats: Vec<BTreeMap<String, String>> = runs.iter().map(|r| flat_spec(&r.spec)).collect();
    let mut order: Vec<BTreeMap<String, String>> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, f) in flats.iter().enumerate() {
        match order.iter().position(|o| o == f) {
            Some(j) => members[j].push(i),
            None => {
                order.push(f.clone());
                members.push(vec![i]);
            }
        }
    }
    // Fields that tell series apart, beyond kind/masking/regime (always named). The SDP-only `method.*`
    // fields are compared among SDP series only: DP and the baselines have them reset to defaults.
    let is_sdp = |f: &BTreeMap<String, String>| f.get("method.kind").map(String::as_str) == Some("sdp");
    let keys: BTreeSet<&String> = order.iter().flat_map(|f| f.keys()).collect();
    let mut varying = Vec::new();
    for k in keys {
        if ["method.kind", "method.masking", "method.regime"].contains(&k.as_str()) {
            continue;
        }
        let sdp_only = k.starts_with("method.") && k != "method.workers";
        let values: BTreeSet<Option<&String>> =
            order.iter().filter(|f| !sdp_only || is_sdp(f)).map(|f| f.get(k)).collect();
        if values.len() > 1 {
            varying.push(k.clone());
        }
    }
    let mut out: Vec<Series> = order
        .iter()
        .zip(members)
        .map(|(f, idx)| {
            let spec = runs[idx[0]].spec.clone();
            let m = &spec.method;
            let method = methods::of(&m.kind).ok();
            let look = method.map(|m| m.look()).unwrap_or_default();
            // `DP`, `SDP block forward`, `small dense`, … (an unregistered method: its name).
            let mut label = method.map_or_else(|| m.kind.to_string(), |method| method.legend(&spec));
            // Method fields at their default are left out (`SDP block forward` next to `SDP block forward
            // budget=flop_matched`); other fields are always named (`lr=0.1` next to `lr=0.05`).
            let defaults = flat_spec(&RunSpec { method: Method::default(), ..spec.clone() });
            for k in &varying {
                let sdp_only = k.starts_with("method.") && k != "method.workers";
                if sdp_only && (!look.masked || f.get(k) == defaults.get(k)) {
                    continue;
                }
                let short = k.rsplit('.').next().unwrap_or(k);
                let _ = write!(label, " {short}={}", f.get(k).map(String::as_str).unwrap_or("-"));
            }
            let mut points: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            for &i in &idx {
                points.entry(cov_key(runs[i].spec.method.coverage)).or_default().push(i);
            }
            Series { slug: slug(&label), label, kind: m.kind.clone(), look, spec, points }
        })
        .collect();
    share_full_coverage_runs(runs, &mut out);
    out.sort_by_key(order_key);
    out
}

/// Table and legend order: the methods in registry order (DP, the reference, then SDP, then the
/// baselines); within a method by masking, then forward before backward, then by label.
fn order_key(s: &Series) -> (usize, String, usize, String) {
    let kind = RULES.names().iter().position(|k| *k == s.kind.as_str()).unwrap_or(usize::MAX);
    let regime = match s.spec.method.regime {
        crate::spec::Regime::Forward => 0,
        crate::spec::Regime::Backward => 1,
    };
    (kind, s.spec.method.masking.clone(), regime, s.label.clone())
}

/// SDP runs at full coverage (m = K) stand for every masking, regime, rescaling and resampling
/// (`RunSpec::canonical` gives them one run id), so each SDP series that matches such a run apart from
/// those fields gets it as its full-coverage point. A series made only of such runs is dropped once
/// another series has taken them.
fn share_full_coverage_runs(runs: &[RunData], series: &mut Vec<Series>) {
    let loose = |spec: &RunSpec| {
        let mut f = flat_spec(spec);
        for k in ["method.masking", "method.regime", "method.rescale", "method.resample_every"] {
            f.remove(k);
        }
        f
    };
    let masked = |spec: &RunSpec| methods::of(&spec.method.kind).is_ok_and(|m| m.look().masked);
    let is_full = |i: usize| masked(&runs[i].spec) && runs[i].spec.full_coverage();
    let full: Vec<usize> = (0..runs.len()).filter(|&i| is_full(i)).collect();
    if full.is_empty() {
        return;
    }
    let only_full = |s: &Series| s.points.values().flatten().all(|&i| is_full(i));
    let mut absorbed = BTreeSet::new();
    for s in series.iter_mut().filter(|s| s.look.masked && !only_full(s)) {
        let key = loose(&s.spec);
        for &i in full.iter().filter(|&&i| loose(&runs[i].spec) == key) {
            let point = s.points.entry(cov_key(runs[i].spec.method.coverage)).or_default();
            if !point.contains(&i) {
                point.push(i);
            }
            absorbed.insert(i);
        }
    }
    series.retain(|s| !(s.look.masked && only_full(s) && s.points.values().flatten().all(|i| absorbed.contains(i))));
}

pub(super) fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

/// The DP series a series' ratios are relative to: the same workload, optimizer and K; else the same
/// workload and K; else the same workload.
pub(super) fn dp_reference<'a>(s: &Series, series: &'a [Series]) -> Option<&'a Series> {
    let dps = || series.iter().filter(|d| d.look.reference && d.spec.workload == s.spec.workload);
    let same_k = |d: &&Series| d.spec.method.workers == s.spec.method.workers;
    dps().find(|d| same_k(d) && d.spec.optim == s.spec.optim).or_else(|| dps().find(same_k)).or_else(|| dps().next())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::MIN_SPEC;
    use anyhow::{Context, Result};
    use std::path::Path;

    #[test]
    fn full_coverage_runs_are_shared_by_every_sdp_series() -> Result<()> {
        let text = format!(
            r#"{MIN_SPEC}[method]
kind = "sdp"
workers = 4
masking = ["neuron", "block"]
regime = ["forward", "backward"]
coverage = [0.5, 1.0]
"#
        );
        let exp = crate::plan::parse(&text, Path::new("t.toml"), &[])?;
        // Four runs at C = 0.5 and one run for all four variants at C = 1 (RunSpec::canonical).
        assert_eq!(exp.runs.len(), 5);
        let runs: Vec<RunData> = exp.runs.into_iter().map(|r| run(r.spec)).collect();
        let full = runs.iter().position(|r| r.spec.full_coverage()).context("no full-coverage run")?;
        let series = series_of(&runs);
        assert_eq!(series.len(), 4, "{:?}", series.iter().map(|s| &s.label).collect::<Vec<_>>());
        for s in &series {
            assert_eq!(s.points.keys().copied().collect::<Vec<_>>(), [cov_key(0.5), cov_key(1.0)], "{}", s.label);
            assert_eq!(s.points[&cov_key(1.0)], [full], "{}", s.label);
        }
        Ok(())
    }

    fn run(spec: RunSpec) -> RunData {
        RunData {
            spec,
            metric: "acc".into(),
            final_metric: 0.5,
            param_fraction: None,
            param_bytes: None,
            peak: None,
            est: None,
            comm_bytes: None,
            spectral_gap: None,
            curve: vec![],
        }
    }

    #[test]
    fn series_are_named_by_the_fields_that_vary() -> Result<()> {
        let text = r#"
name = "t"
seeds = [0, 1]
[workload]
dataset = "shapes"
model = "resnet18"
epochs = 1
batch_size = 8
[optim]
lr = [0.05, 0.1]
[method]
kind = ["dp", "sdp"]
workers = 4
masking = ["block", "neuron"]
coverage = [0.5, 1.0]
"#;
        let exp = crate::plan::parse(text, Path::new("t.toml"), &[])?;
        let runs: Vec<RunData> = exp.runs.into_iter().map(|r| run(r.spec)).collect();
        let series = series_of(&runs);
        let labels: Vec<&str> = series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "DP lr=0.05",
                "DP lr=0.1",
                "SDP block forward lr=0.05",
                "SDP block forward lr=0.1",
                "SDP neuron forward lr=0.05",
                "SDP neuron forward lr=0.1"
            ]
        );
        // Each SDP series has both coverages with both seeds; DP one point with both seeds.
        for s in &series {
            let sizes: Vec<usize> = s.points.values().map(Vec::len).collect();
            assert_eq!(sizes, if s.look.reference { vec![2] } else { vec![2, 2] }, "{}", s.label);
        }
        // The DP reference trained with the same optimizer settings.
        assert_eq!(dp_reference(&series[5], &series).map(|d| d.label.as_str()), Some("DP lr=0.1"));
        assert_eq!(dp_reference(&series[2], &series).map(|d| d.label.as_str()), Some("DP lr=0.05"));
        Ok(())
    }

    #[test]
    fn series_come_in_reading_order() -> Result<()> {
        let text = format!(
            r#"{MIN_SPEC}[method]
kind = ["dropout", "sdp", "small_dense", "dp"]
workers = 4
masking = ["neuron", "block"]
regime = ["backward", "forward"]
coverage = 0.5
"#
        );
        let exp = crate::plan::parse(&text, Path::new("t.toml"), &[])?;
        let runs: Vec<RunData> = exp.runs.into_iter().map(|r| run(r.spec)).collect();
        let labels: Vec<String> = series_of(&runs).into_iter().map(|s| s.label).collect();
        assert_eq!(
            labels,
            [
                "DP",
                "SDP block forward",
                "SDP block backward",
                "SDP neuron forward",
                "SDP neuron backward",
                "small dense",
                "dropout"
            ]
        );
        Ok(())
    }

    #[test]
    fn method_fields_at_their_default_are_not_named() -> Result<()> {
        let text = format!(
            r#"{MIN_SPEC}[method]
kind = ["dp", "sdp"]
workers = 4
coverage = 0.5
budget = ["same_steps", "flop_matched"]
"#
        );
        let exp = crate::plan::parse(&text, Path::new("t.toml"), &[])?;
        let runs: Vec<RunData> = exp.runs.into_iter().map(|r| run(r.spec)).collect();
        let labels: Vec<String> = series_of(&runs).into_iter().map(|s| s.label).collect();
        assert_eq!(labels, ["DP", "SDP block forward", "SDP block forward budget=flop_matched"]);
        Ok(())
    }

    #[test]
    fn slugs_are_file_name_safe() {
        assert_eq!(slug("SDP block forward lr=0.05"), "sdp_block_forward_lr_0.05");
    }
}
