//! Figures and tables from results files only (docs/design.md §5: "figures and reports read only these").
//!
//! For each experiment under `results/`, reads every run's `manifest.json`, `metrics.csv` and
//! `workers.csv` ([`read`]), groups the finished runs by their *resolved spec* ([`series`]; never by parsing
//! labels), and writes to `<out>/<experiment>/` what a paper about the experiment would show:
//!
//! - `table.md` ([`table`]): per variant and coverage C, the seeds, final test accuracy mean ± std, the
//!   difference to DP with Welch's 95 % interval ([`stats`]), parameter fraction, measured per-worker
//!   memory / DP (mean and largest worker), communication / DP and the spectral gap; then the final
//!   accuracy of every evaluation mode;
//! - `accuracy_vs_coverage.{svg,png}`: final test accuracy against C, one line per method variant, mean ±
//!   std over seeds as error bars, DP as a horizontal reference with its ± std band;
//! - `accuracy_vs_memory.{svg,png}`: final test accuracy against measured per-worker peak memory / DP (the
//!   trade-off SDP offers): one line per variant through its coverages, a whisker to the largest worker,
//!   DP as the point at 1;
//! - `memory_vs_coverage.{svg,png}`: per-worker peak memory / DP (measured by `sdp memprobe`; the byte
//!   estimate of `workers.csv` where nothing was measured, marked so) and the parameter fraction;
//! - `comm_vs_coverage.{svg,png}`: communication bytes per step relative to DP;
//! - `accuracy_vs_epoch_<variant>.{svg,png}`: test accuracy per evaluation, one line per coverage, DP dashed.
//!
//! A figure is written only when it has something to show (no accuracy-vs-coverage figure without a
//! series other than DP, no memory figure without memory data, no curve of a single evaluation), and
//! figures of an earlier rendering that no longer apply are removed. Runs that are not `done` are
//! skipped with a note on stderr. Every file is written atomically, and the same results give
//! byte-identical files (no timestamps, no paths, stable order), so rendered figures can be committed and
//! checked by rendering again.

pub mod stats;

mod plot;
mod read;
mod series;
mod table;

use crate::results::write_atomic;
use crate::spec::{RunSpec, SpecError};
use crate::task::{Metric, CLASSIFY};
use crate::train::methods;
use anyhow::{bail, Context, Result};
use plot::{Axis, HLine, Line, Marker, Plot, Point, PALETTE};
use plotters::style::{RGBColor, BLACK};
use read::{load_experiment, ExperimentData, RunData};
use series::{cov_of, dp_reference, series_of, Series};
use stats::mean_std;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What `render` wrote for one experiment.
#[derive(Debug, Clone)]
pub struct Written {
    pub experiment: String,
    /// Every file written, in order (figures as `.svg` then `.png`, then `table.md`).
    pub files: Vec<PathBuf>,
    /// Runs that were not `done`: (run id, status).
    pub skipped: Vec<(String, String)>,
}

/// Writes figures and a table for each experiment under `results` (or only those named) to
/// `out/<experiment>/`. An experiment name with no directory under `results` is a usage error.
pub fn render(results: &Path, out: &Path, experiments: &[String]) -> Result<Vec<Written>> {
    if !results.is_dir() {
        bail!("no results directory {}", results.display());
    }
    let names: Vec<String> = if experiments.is_empty() {
        let mut names: Vec<String> = std::fs::read_dir(results)
            .with_context(|| format!("reading {}", results.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    } else {
        for e in experiments {
            if !results.join(e).is_dir() {
                return Err(SpecError(format!("no experiment `{e}` under {}", results.display())).into());
            }
        }
        experiments.to_vec()
    };
    let mut written = Vec::new();
    for name in names {
        let exp = load_experiment(&results.join(&name), &name)?;
        for (id, status) in &exp.skipped {
            crate::say!("figures: {name}/{id}: status `{status}`, not done: skipped");
        }
        if exp.runs.is_empty() {
            crate::say!("figures: {name}: no finished runs, nothing to plot");
            written.push(Written { experiment: name, files: vec![], skipped: exp.skipped });
            continue;
        }
        let files = write_experiment(&exp, &out.join(&name))?;
        written.push(Written { experiment: name, files, skipped: exp.skipped });
    }
    Ok(written)
}

/// What was trained, for the subtitle: dataset, model, K.
fn describe(runs: &[RunData]) -> String {
    let uniq = |f: &dyn Fn(&RunSpec) -> String| -> String {
        let set: BTreeSet<String> = runs.iter().map(|r| f(&r.spec)).collect();
        set.into_iter().collect::<Vec<_>>().join("/")
    };
    let model = |s: &RunSpec| {
        let name = s.workload.model.as_str();
        match (&s.workload.widths, &s.workload.depths) {
            (Some(w), Some(d)) => format!("{name} widths {w:?} depths {d:?}"),
            _ => name.to_string(),
        }
    };
    format!(
        "{}, {}, K = {}",
        uniq(&|s| s.workload.dataset.clone()),
        uniq(&model),
        uniq(&|s| s.method.workers.to_string())
    )
}
/// Removes figures in `dir` named as this module names them for the headline `metric` (any other file is
/// left alone) that this rendering did not write: they would show what the results no longer say.
fn remove_stale(dir: &Path, written: &[PathBuf], metric: &str) -> Result<()> {
    let stems = [
        format!("{metric}_vs_coverage"),
        format!("{metric}_vs_memory"),
        "memory_vs_coverage".into(),
        "comm_vs_coverage".into(),
    ];
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e.with_context(|| format!("reading {}", dir.display()))?.path();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let ours = stems.iter().any(|s| s == stem) || stem.starts_with(&format!("{metric}_vs_epoch_"));
        let figure = ours && path.extension().is_some_and(|x| x == "svg" || x == "png");
        if figure && path.is_file() && !written.contains(&path) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            crate::say!("figures: removed {} (nothing to show any more)", path.display());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Numbers per point (the seeds of one series at one coverage), shared by the figures and the table.

fn all_runs(s: &Series) -> Vec<usize> {
    s.points.values().flatten().cloned().collect()
}

/// Final test values of the headline metric of the runs `idx`, as shown (`scale`: 100 for a percentage).
fn accs(runs: &[RunData], idx: &[usize], scale: f64) -> Vec<f64> {
    idx.iter().map(|&i| runs[i].final_metric * scale).collect()
}

/// Mean over the runs `idx` of `f(run)`, where every run has it.
fn mean_of(runs: &[RunData], idx: &[usize], f: impl Fn(&RunData) -> Option<f64>) -> Option<f64> {
    let v: Option<Vec<f64>> = idx.iter().map(|&i| f(&runs[i])).collect();
    v.filter(|v| !v.is_empty()).map(|v| mean_std(&v).0).filter(|m| m.is_finite())
}

/// DP's per-worker numbers that ratios are taken against.
#[derive(Clone, Copy, Default)]
struct DpRef {
    /// DP's parameter bytes per worker (the whole model).
    params: Option<f64>,
    peak: Option<f64>,
    est: Option<f64>,
    comm: Option<f64>,
}

impl DpRef {
    fn of(dp: Option<&Series>, runs: &[RunData]) -> Self {
        let Some(d) = dp else { return DpRef::default() };
        let idx = all_runs(d);
        let positive = |v: Option<f64>| v.filter(|v| *v > 0.0);
        DpRef {
            params: positive(mean_of(runs, &idx, |r| r.param_bytes)),
            peak: positive(mean_of(runs, &idx, |r| r.peak.map(|p| p.mean))),
            est: positive(mean_of(runs, &idx, |r| r.est.map(|p| p.mean))),
            comm: positive(mean_of(runs, &idx, |r| r.comm_bytes)),
        }
    }
}

/// Per-worker memory / DP of the runs `idx`, mean over seeds.
#[derive(Clone, Copy, Debug)]
struct MemRatio {
    mean_worker: f64,
    /// NaN where only the mean was recorded.
    largest_worker: f64,
    /// Measured peaks (else the byte estimate).
    measured: bool,
}

fn memory_ratio(runs: &[RunData], idx: &[usize], dp: DpRef) -> Option<MemRatio> {
    let ratio = |reference: Option<f64>, f: &dyn Fn(&RunData) -> Option<read::Spread>, measured: bool| {
        let r = reference?;
        Some(MemRatio {
            mean_worker: mean_of(runs, idx, |run| f(run).map(|s| s.mean / r))?,
            largest_worker: mean_of(runs, idx, |run| f(run).map(|s| s.max / r)).unwrap_or(f64::NAN),
            measured,
        })
    };
    ratio(dp.peak, &|r| r.peak, true).or_else(|| ratio(dp.est, &|r| r.est, false))
}

/// A coverage as a reader writes it: `0.5`, `0.25`, `1`.
fn fmt_cov(c: f64) -> String {
    plot::tick_label(c, plot::decimals_for(&[c]))
}

/// Colour, dash and marker of a series: the reference (DP) black; the others by their index among the
/// other series, dashed and marked as their method's [`methods::Look`] says (SDP solid with circles, each
/// baseline dashed with its own marker).
fn style(i: usize, s: &Series) -> (RGBColor, bool, Marker) {
    let marker = match s.look.marker {
        methods::Marker::Circle => Marker::Circle,
        methods::Marker::Square => Marker::Square,
        methods::Marker::Triangle => Marker::Triangle,
        methods::Marker::Cross => Marker::Cross,
    };
    if s.look.reference {
        (BLACK, false, marker)
    } else {
        (PALETTE[i % PALETTE.len()], s.look.dashed, marker)
    }
}

// ---------------------------------------------------------------------------------------------------------
// The figures of one experiment.

/// The headline metric of an experiment's runs as its files name it (`acc`), and the noun titles, axes
/// and tables use (`accuracy`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Headline<'a> {
    pub name: &'a str,
    pub noun: &'a str,
    /// Shown × 100 in percent (accuracy); otherwise as it is (a loss in nats).
    pub percent: bool,
    pub higher_is_better: bool,
}

impl Headline<'_> {
    /// What a stored value is multiplied by to be shown.
    pub fn scale(&self) -> f64 {
        if self.percent {
            100.0
        } else {
            1.0
        }
    }

    /// What figure names call the metric: `accuracy` for a percentage (the names of the image tiers), the
    /// metric's own name otherwise (`nll_vs_coverage`).
    pub fn stem(&self) -> &str {
        if self.percent {
            "accuracy"
        } else {
            self.name
        }
    }

    /// Decimals of a shown value: 2 for a percentage, 3 otherwise (a loss in nats moves by hundredths).
    pub fn decimals(&self) -> usize {
        if self.percent {
            2
        } else {
            3
        }
    }

    /// The unit after a label: ` (%)` or nothing.
    pub fn unit(&self) -> &'static str {
        if self.percent {
            " (%)"
        } else {
            ""
        }
    }
}

struct Ctx<'a> {
    name: &'a str,
    /// The headline metric of the runs' task, which titles and axes name.
    metric: Headline<'a>,
    what: String,
    runs: &'a [RunData],
    series: &'a [Series],
}

impl Ctx<'_> {
    /// Every series but DP, with its index (for its colour).
    fn others(&self) -> Vec<(usize, &Series)> {
        self.series.iter().filter(|s| !s.look.reference).enumerate().collect()
    }

    fn dps(&self) -> Vec<&Series> {
        self.series.iter().filter(|s| s.look.reference).collect()
    }

    fn plot(&self, what: &str, x: Axis, y: Axis) -> Plot {
        Plot {
            title: format!("{}: {what}", self.name),
            subtitle: self.what.clone(),
            x,
            y,
            lines: vec![],
            hlines: vec![],
        }
    }

    fn coverage_axis(&self) -> Axis {
        let mut a = Axis::new("coverage C (fraction of maskable units per worker)", (0.0, 1.0), 0.2);
        a.preferred_ticks = self.others().iter().flat_map(|(_, s)| s.points.keys().map(|&c| cov_of(c))).collect();
        a
    }

    /// DP as a horizontal line with its ± std band (none for a single seed).
    fn dp_band(&self, d: &Series) -> HLine {
        let a = accs(self.runs, &all_runs(d), self.metric.scale());
        let (m, sd) = mean_std(&a);
        let name = if a.len() > 1 {
            format!("{}, mean ± std (n = {})", d.label, a.len())
        } else {
            format!("{} (n = 1)", d.label)
        };
        HLine { name, color: BLACK, y: m, band: if a.len() > 1 { sd } else { 0.0 }, dashed: false }
    }
}

/// The headline metric's axis: 0–100 for a percentage, from 0 up otherwise.
fn accuracy_axis(metric: &Headline, label: &str) -> Axis {
    if metric.percent {
        Axis::new(label, (0.0, 100.0), 2.0)
    } else {
        Axis::new(label, (0.0, f64::INFINITY), 0.05)
    }
}

fn ratio_axis(label: &str) -> Axis {
    Axis::new(label, (0.0, f64::INFINITY), 0.2)
}

/// A ratio axis that starts at 0.
fn ratio_axis_from_zero(label: &str) -> Axis {
    Axis { anchor: Some(0.0), ..ratio_axis(label) }
}

fn accuracy_vs_coverage(cx: &Ctx) -> Option<Plot> {
    let others = cx.others();
    if others.is_empty() {
        return None;
    }
    let noun = cx.metric.noun;
    let y = accuracy_axis(&cx.metric, &format!("final test {noun}{}, mean ± std over seeds", cx.metric.unit()));
    let mut p = cx.plot(&format!("final test {noun} vs coverage"), cx.coverage_axis(), y);
    p.hlines = cx.dps().into_iter().map(|d| cx.dp_band(d)).collect();
    for (i, s) in others {
        let points = s
            .points
            .iter()
            .map(|(&c, idx)| {
                let (m, sd) = mean_std(&accs(cx.runs, idx, cx.metric.scale()));
                Point { y_std: sd, ..Point::new(cov_of(c), m) }
            })
            .collect();
        let (color, dashed, marker) = style(i, s);
        p.lines.push(Line { name: s.label.clone(), color, dashed, marker, points });
    }
    Some(p)
}

/// Accuracy against measured memory: only where every run of a series and its DP reference measured it.
fn accuracy_vs_memory(cx: &Ctx) -> Option<Plot> {
    let x = ratio_axis("per-worker peak memory / DP (measured)");
    let noun = cx.metric.noun;
    let y = accuracy_axis(&cx.metric, &format!("final test {noun}{}, mean ± std over seeds", cx.metric.unit()));
    let mut p = cx.plot(&format!("final test {noun} vs per-worker memory"), x, y);
    p.subtitle = format!("{}; marker: mean over workers, whisker: largest worker", cx.what);
    let mut dps_used: Vec<&Series> = vec![];
    for (i, s) in cx.others() {
        let Some(dp) = dp_reference(s, cx.series) else { continue };
        let dp_ref = DpRef::of(Some(dp), cx.runs);
        let mut points = vec![];
        for (&c, idx) in &s.points {
            let Some(mem) = memory_ratio(cx.runs, idx, dp_ref).filter(|m| m.measured) else { continue };
            let (m, sd) = mean_std(&accs(cx.runs, idx, cx.metric.scale()));
            let x_hi = Some(mem.largest_worker).filter(|h| *h > mem.mean_worker * (1.0 + 1e-6));
            points.push(Point {
                y_std: sd,
                x_hi,
                tag: Some(format!("C={}", fmt_cov(cov_of(c)))),
                ..Point::new(mem.mean_worker, m)
            });
        }
        if points.is_empty() {
            continue;
        }
        if !dps_used.iter().any(|d| std::ptr::eq(*d, dp)) {
            dps_used.push(dp);
        }
        let (color, dashed, marker) = style(i, s);
        p.lines.push(Line { name: s.label.clone(), color, dashed, marker, points });
    }
    if p.lines.is_empty() {
        return None;
    }
    // DP: the point at 1 (first in the legend), with a faint dashed line at its accuracy to read against.
    for d in dps_used.into_iter().rev() {
        let a = accs(cx.runs, &all_runs(d), cx.metric.scale());
        let (m, sd) = mean_std(&a);
        let name =
            if a.len() > 1 { format!("{} (= 1), mean ± std", d.label) } else { format!("{} (= 1, n = 1)", d.label) };
        let point = Point { y_std: if a.len() > 1 { sd } else { 0.0 }, ..Point::new(1.0, m) };
        p.lines.insert(0, Line { name, color: BLACK, dashed: false, marker: Marker::Circle, points: vec![point] });
        p.hlines.push(HLine { name: String::new(), color: RGBColor(150, 150, 150), y: m, band: 0.0, dashed: true });
    }
    Some(p)
}

fn memory_vs_coverage(cx: &Ctx) -> Option<Plot> {
    let y = ratio_axis_from_zero("per-worker memory / DP");
    let mut p = cx.plot("per-worker memory vs coverage", cx.coverage_axis(), y);
    p.subtitle = format!("{}; marker: mean over workers, whisker: largest worker", cx.what);
    let mut measured_any = false;
    // A parameter-fraction curve (its points rounded, as the key) and the series that share it.
    struct Fraction<'s> {
        key: Vec<(i64, i64)>,
        color: RGBColor,
        points: Vec<Point>,
        shared: Vec<&'s Series>,
    }
    let mut fractions: Vec<Fraction> = vec![];
    for (i, s) in cx.others() {
        let dp_ref = DpRef::of(dp_reference(s, cx.series), cx.runs);
        let (color, _, marker) = style(i, s);
        let mut points = vec![];
        let mut measured = true;
        for (&c, idx) in &s.points {
            if let Some(mem) = memory_ratio(cx.runs, idx, dp_ref) {
                measured &= mem.measured;
                let y_hi = Some(mem.largest_worker).filter(|h| *h > mem.mean_worker * (1.0 + 1e-6));
                points.push(Point { y_hi, ..Point::new(cov_of(c), mem.mean_worker) });
            }
        }
        if !points.is_empty() {
            measured_any |= measured;
            let what = if measured { "peak memory" } else { "memory (estimated)" };
            p.lines.push(Line { name: format!("{}: {what}", s.label), color, dashed: false, marker, points });
        }
        let frac: Vec<Point> = s
            .points
            .iter()
            .filter_map(|(&c, idx)| Some(Point::new(cov_of(c), mean_of(cx.runs, idx, |r| r.param_fraction)?)))
            .collect();
        // A method that holds the whole model (stochastic depth, dropout) adds nothing to DP's line at 1.
        if !frac.is_empty() && frac.iter().any(|q| q.y < 0.999) {
            let key: Vec<(i64, i64)> =
                frac.iter().map(|q| ((q.x * 1e4).round() as i64, (q.y * 1e3).round() as i64)).collect();
            match fractions.iter_mut().find(|f| f.key == key) {
                Some(f) => f.shared.push(s),
                None => fractions.push(Fraction { key, color, points: frac, shared: vec![s] }),
            }
        }
    }
    // One parameter-fraction line per distinct curve (the fraction depends on the masking, not on the regime
    // or the budget): named by the maskings of the SDP series sharing it, else by their labels.
    for Fraction { color, points, shared, .. } in fractions {
        let maskings: BTreeSet<&str> = shared.iter().map(|s| s.spec.method.masking.as_str()).collect();
        let name = if let [one] = shared.as_slice() {
            format!("{}: parameters", one.label)
        } else if shared.iter().all(|s| s.look.masked) {
            format!("SDP {}: parameters", maskings.into_iter().collect::<Vec<_>>().join("/"))
        } else {
            format!("{} and {} more: parameters", shared[0].label, shared.len() - 1)
        };
        p.lines.push(Line { name, color, dashed: true, marker: Marker::None, points });
    }
    if p.lines.is_empty() {
        return None;
    }
    p.hlines.push(HLine { name: "DP (= 1)".into(), color: BLACK, y: 1.0, band: 0.0, dashed: false });
    p.y.label = if measured_any {
        "per-worker memory / DP (peak measured)".into()
    } else {
        "per-worker memory / DP (estimated, not measured)".into()
    };
    Some(p)
}

fn comm_vs_coverage(cx: &Ctx) -> Option<Plot> {
    let y = ratio_axis_from_zero("communication bytes per step per worker / DP");
    let mut p = cx.plot("communication per step vs coverage", cx.coverage_axis(), y);
    for (i, s) in cx.others() {
        let Some(dp_comm) = DpRef::of(dp_reference(s, cx.series), cx.runs).comm else { continue };
        let points: Vec<Point> = s
            .points
            .iter()
            .filter_map(|(&c, idx)| Some(Point::new(cov_of(c), mean_of(cx.runs, idx, |r| r.comm_bytes)? / dp_comm)))
            .collect();
        if !points.is_empty() {
            let (color, dashed, marker) = style(i, s);
            p.lines.push(Line { name: s.label.clone(), color, dashed, marker, points });
        }
    }
    if p.lines.is_empty() {
        return None;
    }
    p.hlines.push(HLine { name: "DP (= 1)".into(), color: BLACK, y: 1.0, band: 0.0, dashed: false });
    Some(p)
}

/// Test accuracy per evaluation for one variant (every coverage), DP dashed for reference.
fn accuracy_vs_epoch(cx: &Ctx, s: &Series) -> Option<Plot> {
    let mut x = Axis::new("epoch", (0.0, f64::INFINITY), 1.0);
    x.integer = true;
    let noun = cx.metric.noun;
    let y = accuracy_axis(&cx.metric, &format!("test {noun}{}, mean over seeds", cx.metric.unit()));
    let mut p = cx.plot(&format!("test {noun} vs epoch, {}", s.label), x, y);
    let curve = |idx: &[usize]| -> Vec<Point> {
        let mut by_epoch: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for &i in idx {
            for r in &cx.runs[i].curve {
                by_epoch.entry(r.epoch).or_default().push(r.test_metric * cx.metric.scale());
            }
        }
        by_epoch.into_iter().map(|(e, v)| Point::new(e as f64, mean_std(&v).0)).collect()
    };
    for (j, (&c, idx)) in s.points.iter().enumerate() {
        let points = curve(idx);
        if points.is_empty() {
            continue;
        }
        let (name, color) = if s.look.reference {
            (s.label.clone(), BLACK)
        } else {
            // The variant is in the title.
            (format!("C = {}", fmt_cov(cov_of(c))), PALETTE[j % PALETTE.len()])
        };
        p.lines.push(Line { name, color, dashed: false, marker: Marker::Circle, points });
    }
    // DP dashed, drawn last so that it stays visible where SDP at C = 1 coincides with it.
    if !s.look.reference {
        if let Some(d) = dp_reference(s, cx.series) {
            let points = curve(&all_runs(d));
            if !points.is_empty() {
                p.lines.push(Line { name: d.label.clone(), color: BLACK, dashed: true, marker: Marker::None, points });
            }
        }
    }
    // A single evaluation is a table entry, not a curve.
    p.lines.iter().any(|l| l.points.len() > 1).then_some(p)
}

/// The headline metric an experiment's runs report (one for all, or an error naming two that differ):
/// named as their files name it, its noun taken from the task of their dataset where that task is
/// registered in this process and reports the same metric.
fn headline_metric(exp: &ExperimentData) -> Result<Headline<'_>> {
    let Some(first) = exp.runs.first() else {
        let Metric { name, noun, percent, higher_is_better } = CLASSIFY.task.metric();
        return Ok(Headline { name, noun, percent, higher_is_better });
    };
    if let Some(other) = exp.runs.iter().find(|r| r.metric != first.metric) {
        anyhow::bail!(
            "experiment `{}`: runs report different headline metrics (`{}` and `{}`): one experiment's figures \
             compare one metric",
            exp.name,
            first.metric,
            other.metric
        );
    }
    // The task that reports the recorded metric. A task this process does not know (registered by another
    // program): its name stands for its noun, and it is taken for a fraction where larger is better, as
    // accuracy.
    let (noun, percent, higher_is_better) = match crate::task::metric_named(&first.metric) {
        Some(known) => (known.noun, known.percent, known.higher_is_better),
        None => (&first.metric[..], true, true),
    };
    Ok(Headline { name: &first.metric, noun, percent, higher_is_better })
}

fn write_experiment(exp: &ExperimentData, dir: &Path) -> Result<Vec<PathBuf>> {
    let series = series_of(&exp.runs);
    let metric = headline_metric(exp)?;
    let cx = Ctx { name: &exp.name, metric, what: describe(&exp.runs), runs: &exp.runs, series: &series };
    let mut figures: Vec<(String, Plot)> = vec![];
    let mut add = |stem: &str, p: Option<Plot>| {
        if let Some(p) = p {
            figures.push((stem.to_string(), p));
        }
    };
    let m = metric.stem();
    add(&format!("{m}_vs_coverage"), accuracy_vs_coverage(&cx));
    add(&format!("{m}_vs_memory"), accuracy_vs_memory(&cx));
    add("memory_vs_coverage", memory_vs_coverage(&cx));
    add("comm_vs_coverage", comm_vs_coverage(&cx));
    // One curve figure per variant; DP's own only when there is nothing else (it is dashed in the others).
    let others = cx.others();
    let curves: Vec<&Series> = if others.is_empty() { cx.dps() } else { others.iter().map(|(_, s)| *s).collect() };
    for s in curves {
        add(&format!("{m}_vs_epoch_{}", s.slug), accuracy_vs_epoch(&cx, s));
    }
    let mut files = Vec::new();
    for (stem, p) in &figures {
        files.extend(plot::write_plot(dir, stem, p)?);
    }
    let table = dir.join("table.md");
    write_atomic(
        &table,
        table::table_md(&exp.name, metric, &exp.runs, &series, &cx.what, exp.skipped.len()).as_bytes(),
    )?;
    files.push(table);
    remove_stale(dir, &files, metric.stem())?;
    Ok(files)
}
