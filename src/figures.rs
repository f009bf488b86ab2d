//! Figures and tables from results files only (DESIGN.md §5: "figures and reports read only these").
//!
//! For each experiment under `results/`, reads `summary.csv` and every run's `manifest.json`, `metrics.csv`
//! and `workers.csv`, groups the finished runs by their *resolved spec* (never by parsing labels), and writes
//! to `<out>/<experiment>/`:
//!
//! - `accuracy_vs_coverage.{svg,png}`: final test accuracy against coverage C, one line per method variant
//!   (kind, masking, regime, and any other field the experiment varies), mean ± std over seeds as error bars,
//!   DP as a horizontal reference with its ± std band;
//! - `memory_vs_coverage.{svg,png}`: mean per-worker peak memory relative to DP (measured by `sdp memprobe`;
//!   the byte estimate of `workers.csv` where nothing was measured, marked so) and the parameter fraction;
//! - `comm_vs_coverage.{svg,png}`: communication bytes per step relative to DP;
//! - `accuracy_vs_epoch_<variant>.{svg,png}`: test accuracy per evaluation, one line per coverage, DP dashed;
//! - `table.md`: the same numbers as a markdown table, plus the final accuracy of every evaluation mode.
//!
//! A series is the set of runs whose resolved specs agree on everything but `seed` and `method.coverage`;
//! a point is the runs of one series at one coverage (its seeds). A figure is written only when its data
//! exists. Runs that are not `done` are skipped with a note on stderr. Every file is written atomically.
//!
//! Text is laid out and drawn with plotters' `ab_glyph` backend from a font embedded in the binary
//! (`assets/fonts/DejaVuSans.ttf`), so no system font library (fontconfig, freetype) is needed; PNGs are
//! rendered into an in-memory RGB buffer and encoded with the `image` crate.

use crate::results::{write_atomic, Manifest, Status, SummaryRow};
use crate::spec::{MethodKind, RunSpec, SpecError};
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::element::{DashedPathElement, ErrorBar};
use plotters::prelude::*;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Pixel size of every figure (the SVG's user units are the same pixels).
const SIZE: (u32, u32) = (1100, 620);
/// PNGs are drawn at this multiple of `SIZE` (2200 × 1240 px).
const PNG_SCALE: u32 = 2;
/// Width of the legend panel on the right of each figure.
const LEGEND_W: u32 = 360;
const FONT: &str = "sans-serif";
/// DejaVu Sans 2.37 (Bitstream Vera license, `assets/fonts/LICENSE-DejaVu.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

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
            eprintln!("figures: {name}/{id}: status `{status}`, not done: skipped");
        }
        if exp.runs.is_empty() {
            eprintln!("figures: {name}: no finished runs, nothing to plot");
            written.push(Written { experiment: name, files: vec![], skipped: exp.skipped });
            continue;
        }
        let files = write_experiment(&exp, &out.join(&name))?;
        written.push(Written { experiment: name, files, skipped: exp.skipped });
    }
    Ok(written)
}

// ---------------------------------------------------------------------------------------------------------
// Reading the results files.

/// One finished run, as the results files describe it.
#[derive(Debug, Clone)]
struct RunData {
    spec: RunSpec,
    final_acc: f64,
    param_fraction: Option<f64>,
    /// Mean over workers of the measured peak bytes.
    peak_bytes: Option<f64>,
    /// Mean over workers of param + grad + optimizer + estimated activation bytes (workers.csv).
    est_bytes: Option<f64>,
    comm_bytes: Option<f64>,
    curve: Vec<EvalRow>,
}

#[derive(Debug, Clone)]
struct EvalRow {
    epoch: usize,
    test_acc: f64,
    /// `test_acc_<mode>` columns.
    modes: BTreeMap<String, f64>,
}

/// The columns of `workers.csv` that figures use (others are ignored).
#[derive(Debug, Deserialize)]
struct WorkerCols {
    param_fraction: f64,
    param_bytes: f64,
    grad_bytes: f64,
    optim_bytes: f64,
    activation_bytes_est: f64,
    peak_bytes_measured: Option<f64>,
    comm_bytes_per_step: f64,
}

struct ExperimentData {
    name: String,
    /// `results/<experiment>`.
    dir: PathBuf,
    runs: Vec<RunData>,
    skipped: Vec<(String, String)>,
}

fn load_experiment(dir: &Path, name: &str) -> Result<ExperimentData> {
    let summary_path = dir.join("summary.csv");
    let summary: HashMap<String, SummaryRow> = if summary_path.is_file() {
        read_csv::<SummaryRow>(&summary_path)?.into_iter().map(|r| (r.run_id.clone(), r)).collect()
    } else {
        HashMap::new()
    };
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
        let metrics_path = rd.join("metrics.csv");
        let curve = if metrics_path.is_file() { read_metrics(&metrics_path)? } else { vec![] };
        let workers_path = rd.join("workers.csv");
        let workers = if workers_path.is_file() { read_csv::<WorkerCols>(&workers_path)? } else { vec![] };
        let n = workers.len() as f64;
        let mean = |f: &dyn Fn(&WorkerCols) -> f64| (n > 0.0).then(|| workers.iter().map(f).sum::<f64>() / n);
        let w_peak = if n > 0.0 && workers.iter().all(|w| w.peak_bytes_measured.is_some()) {
            mean(&|w| w.peak_bytes_measured.unwrap_or(0.0))
        } else {
            None
        };
        let row = summary.get(&m.run_id);
        let final_acc = match (row, &m.final_metrics, curve.last()) {
            (Some(r), _, _) => r.final_test_acc,
            (None, Some(f), _) => f.test_acc,
            (None, None, Some(last)) => last.test_acc,
            (None, None, None) => {
                bail!("{}: run is done but has no final metrics and no metrics.csv", manifest_path.display())
            }
        };
        runs.push(RunData {
            final_acc,
            param_fraction: row.and_then(|r| r.mean_param_fraction).or_else(|| mean(&|w| w.param_fraction)),
            peak_bytes: row.and_then(|r| r.mean_peak_bytes).or(w_peak),
            est_bytes: mean(&|w| w.param_bytes + w.grad_bytes + w.optim_bytes + w.activation_bytes_est),
            comm_bytes: row.and_then(|r| r.comm_bytes_per_step).or_else(|| mean(&|w| w.comm_bytes_per_step)),
            curve,
            spec: m.spec,
        });
    }
    Ok(ExperimentData { name: name.to_string(), dir: dir.to_path_buf(), runs, skipped })
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

// ---------------------------------------------------------------------------------------------------------
// Grouping runs into series (by resolved spec).

/// Runs that differ only in `seed` and `method.coverage`.
struct Series {
    label: String,
    slug: String,
    kind: MethodKind,
    /// A representative spec (the first run's).
    spec: RunSpec,
    /// Coverage (in 1/10000) → indices into the experiment's runs.
    points: BTreeMap<u32, Vec<usize>>,
}

fn cov_key(c: f64) -> u32 {
    (c * 10000.0).round() as u32
}

fn cov_of(key: u32) -> f64 {
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

fn kind_name(k: MethodKind) -> String {
    serde_json::to_value(k).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn series_of(runs: &[RunData]) -> Vec<Series> {
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
            let mut label = match m.kind {
                MethodKind::Dp => "DP".to_string(),
                MethodKind::Sdp => {
                    format!(
                        "SDP {} {}",
                        m.masking,
                        serde_json::to_value(m.regime)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default()
                    )
                }
                k => kind_name(k),
            };
            for k in &varying {
                let sdp_only = k.starts_with("method.") && k != "method.workers";
                if sdp_only && m.kind != MethodKind::Sdp {
                    continue;
                }
                let short = k.rsplit('.').next().unwrap_or(k);
                let _ = write!(label, " {short}={}", f.get(k).map(String::as_str).unwrap_or("-"));
            }
            let mut points: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            for &i in &idx {
                points.entry(cov_key(runs[i].spec.method.coverage)).or_default().push(i);
            }
            Series { slug: slug(&label), label, kind: m.kind, spec, points }
        })
        .collect();
    share_full_coverage_runs(runs, &mut out);
    // DP first, then the others in a stable order.
    out.sort_by(|a, b| (a.kind != MethodKind::Dp, &a.label).cmp(&(b.kind != MethodKind::Dp, &b.label)));
    out
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
    let is_full = |i: usize| runs[i].spec.method.kind == MethodKind::Sdp && runs[i].spec.full_coverage();
    let full: Vec<usize> = (0..runs.len()).filter(|&i| is_full(i)).collect();
    if full.is_empty() {
        return;
    }
    let only_full = |s: &Series| s.points.values().flatten().all(|&i| is_full(i));
    let mut absorbed = BTreeSet::new();
    for s in series.iter_mut().filter(|s| s.kind == MethodKind::Sdp && !only_full(s)) {
        let key = loose(&s.spec);
        for &i in full.iter().filter(|&&i| loose(&runs[i].spec) == key) {
            let point = s.points.entry(cov_key(runs[i].spec.method.coverage)).or_default();
            if !point.contains(&i) {
                point.push(i);
            }
            absorbed.insert(i);
        }
    }
    series.retain(|s| {
        !(s.kind == MethodKind::Sdp && only_full(s) && s.points.values().flatten().all(|i| absorbed.contains(i)))
    });
}

fn slug(s: &str) -> String {
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
fn dp_reference<'a>(s: &Series, series: &'a [Series]) -> Option<&'a Series> {
    let dps = || series.iter().filter(|d| d.kind == MethodKind::Dp && d.spec.workload == s.spec.workload);
    let same_k = |d: &&Series| d.spec.method.workers == s.spec.method.workers;
    dps().find(|d| same_k(d) && d.spec.optim == s.spec.optim).or_else(|| dps().find(same_k)).or_else(|| dps().next())
}

/// Mean and sample standard deviation (0 for a single value).
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Mean of `f` over all runs of a series (its DP value), where every run has it.
fn series_mean(s: &Series, runs: &[RunData], f: impl Fn(&RunData) -> Option<f64>) -> Option<f64> {
    let vals: Option<Vec<f64>> = s.points.values().flatten().map(|&i| f(&runs[i])).collect();
    vals.filter(|v| !v.is_empty()).map(|v| mean_std(&v).0)
}

/// Per coverage: mean ± std over seeds of `f(run) / reference`, where every run has `f` and `reference > 0`.
fn ratio_points(
    s: &Series,
    runs: &[RunData],
    reference: Option<f64>,
    f: impl Fn(&RunData) -> Option<f64>,
) -> Vec<(f64, f64, f64)> {
    let Some(r) = reference.filter(|r| *r > 0.0) else { return vec![] };
    let mut out = Vec::new();
    for (&c, idx) in &s.points {
        let vals: Option<Vec<f64>> = idx.iter().map(|&i| f(&runs[i]).map(|v| v / r)).collect();
        if let Some(v) = vals {
            let (m, sd) = mean_std(&v);
            out.push((cov_of(c), m, sd));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// What a figure shows, independent of the backend.

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
];

#[derive(Clone)]
struct Line {
    name: String,
    color: RGBColor,
    dashed: bool,
    markers: bool,
    /// (x, y, std of y).
    points: Vec<(f64, f64, f64)>,
}

/// A horizontal reference line with a ± band.
#[derive(Clone)]
struct HLine {
    name: String,
    color: RGBColor,
    y: f64,
    band: f64,
}

struct Plot {
    title: String,
    /// What was trained: dataset, model, K.
    subtitle: String,
    x_label: String,
    y_label: String,
    lines: Vec<Line>,
    hlines: Vec<HLine>,
    /// Fixed x range (else from the data).
    x_range: Option<(f64, f64)>,
    /// The x values are whole numbers (epochs): integer tick labels only.
    integer_x: bool,
    /// Clamp the y range to this (accuracy: [0, 100]).
    y_clamp: Option<(f64, f64)>,
}

impl Plot {
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let xs: Vec<f64> = self.lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)).collect();
        let (x0, x1) = self.x_range.unwrap_or_else(|| {
            let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if lo.is_finite() {
                (lo, hi)
            } else {
                (0.0, 1.0)
            }
        });
        let (x0, x1) = if x1 - x0 < 1e-9 { (x0 - 0.5, x1 + 0.5) } else { (x0, x1) };
        let pad = (x1 - x0) * 0.05;
        let mut ys: Vec<f64> = Vec::new();
        for l in &self.lines {
            for &(_, y, s) in &l.points {
                ys.extend([y - s, y + s]);
            }
        }
        for h in &self.hlines {
            ys.extend([h.y - h.band, h.y + h.band]);
        }
        let ys: Vec<f64> = ys.into_iter().filter(|y| y.is_finite()).collect();
        let lo = ys.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let span = (hi - lo).max(1e-3 * hi.abs().max(1.0));
        let (mut y0, mut y1) = (lo - 0.1 * span, hi + 0.1 * span);
        if let Some((a, b)) = self.y_clamp {
            (y0, y1) = (y0.max(a), y1.min(b));
        }
        ((x0 - pad, x1 + pad), (y0, y1))
    }
}

/// Draws `p` on `root`, every length (fonts, margins, strokes) multiplied by `k` (the PNG is drawn at 2×:
/// small text rasterised by plotters' ab_glyph backend can sit a pixel off its baseline, which 2× hides).
fn draw_plot<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, p: &Plot, k: u32) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing: {e}");
    let ki = k as i32;
    let font = |size: u32| (FONT, (size * k) as f64);
    root.fill(&WHITE).map_err(e)?;
    root.draw(&Text::new(p.title.clone(), (12 * ki, 8 * ki), font(20))).map_err(e)?;
    root.draw(&Text::new(p.subtitle.clone(), (12 * ki, 34 * ki), font(14))).map_err(e)?;
    let (_, area) = root.split_vertically(58 * k);
    let (plot_area, legend_area) = area.split_horizontally((SIZE.0 - LEGEND_W) * k);
    let ((x0, x1), (y0, y1)) = p.ranges();
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(12 * k)
        .x_label_area_size(48 * k)
        .y_label_area_size(70 * k)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    // Whole-number axes get at most one tick per unit, labelled without decimals.
    let x_ticks = if p.integer_x { ((x1 - x0).floor() as usize + 1).clamp(2, 12) } else { 10 };
    let int_label = |v: &f64| format!("{v:.0}");
    let float_label = |v: &f64| format!("{v}");
    let x_fmt: &dyn Fn(&f64) -> String = if p.integer_x { &int_label } else { &float_label };
    chart
        .configure_mesh()
        .x_labels(x_ticks)
        .x_label_formatter(x_fmt)
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .axis_desc_style(font(16))
        .label_style(font(13))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(200, 200, 200).stroke_width(k))
        .axis_style(BLACK.stroke_width(k))
        .draw()
        .map_err(e)?;
    let stroke = |c: RGBColor, w: u32| c.stroke_width(w * k);
    for h in &p.hlines {
        if h.band > 0.0 {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, h.y - h.band), (x1, h.y + h.band)],
                    h.color.mix(0.12).filled(),
                )))
                .map_err(e)?;
        }
        chart
            .draw_series(std::iter::once(PathElement::new(vec![(x0, h.y), (x1, h.y)], stroke(h.color, 2))))
            .map_err(e)?;
    }
    for l in &p.lines {
        let pts: Vec<(f64, f64)> = l.points.iter().map(|&(x, y, _)| (x, y)).collect();
        if l.dashed {
            let dashed = DashedPathElement::new(pts.clone(), 8 * ki, 5 * ki, stroke(l.color, 2));
            chart.draw_series(std::iter::once(dashed)).map_err(e)?;
        } else {
            chart.draw_series(std::iter::once(PathElement::new(pts.clone(), stroke(l.color, 2)))).map_err(e)?;
        }
        if l.markers {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4 * ki, l.color.filled()))).map_err(e)?;
        }
        chart
            .draw_series(
                l.points
                    .iter()
                    .filter(|p| p.2 > 0.0)
                    .map(|&(x, y, s)| ErrorBar::new_vertical(x, y - s, y, y + s, stroke(l.color, 1), 10 * k)),
            )
            .map_err(e)?;
    }
    // The legend, in its own panel so that it never covers data.
    let (mut x, mut y) = (10 * ki, 20 * ki);
    let entries = p
        .hlines
        .iter()
        .map(|h| (&h.name, h.color, false, false))
        .chain(p.lines.iter().map(|l| (&l.name, l.color, l.dashed, l.markers)));
    for (name, color, dashed, markers) in entries {
        let seg = vec![(x, y), (x + 34 * ki, y)];
        if dashed {
            legend_area.draw(&DashedPathElement::new(seg, 8 * ki, 5 * ki, stroke(color, 2))).map_err(e)?;
        } else {
            legend_area.draw(&PathElement::new(seg, stroke(color, 2))).map_err(e)?;
        }
        if markers {
            legend_area.draw(&Circle::new((x + 17 * ki, y), 4 * ki, color.filled())).map_err(e)?;
        }
        legend_area.draw(&Text::new(name.clone(), (x + 42 * ki, y - 8 * ki), font(13))).map_err(e)?;
        y += 22 * ki;
        if y > (SIZE.1 as i32 - 100) * ki {
            (x, y) = (x + 10 * ki, 20 * ki); // more entries than fit: overlap rather than drop them
        }
    }
    root.present().map_err(e)?;
    Ok(())
}

/// Registers the embedded font with plotters once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok());
    if ok {
        Ok(())
    } else {
        bail!("the embedded font assets/fonts/DejaVuSans.ttf could not be parsed")
    }
}

/// Writes `stem.svg` and `stem.png` (atomically) and returns their paths.
fn write_plot(dir: &Path, stem: &str, p: &Plot) -> Result<Vec<PathBuf>> {
    ensure_font()?;
    let svg_path = dir.join(format!("{stem}.svg"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw_plot(&root, p, 1).with_context(|| format!("rendering {}", svg_path.display()))?;
    }
    write_atomic(&svg_path, svg.as_bytes())?;

    let png_path = dir.join(format!("{stem}.png"));
    let (w, h) = (SIZE.0 * PNG_SCALE, SIZE.1 * PNG_SCALE);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw_plot(&root, p, PNG_SCALE).with_context(|| format!("rendering {}", png_path.display()))?;
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .with_context(|| format!("encoding {}", png_path.display()))?;
    write_atomic(&png_path, &png)?;
    Ok(vec![svg_path, png_path])
}

// ---------------------------------------------------------------------------------------------------------
// The figures and the table of one experiment.

fn describe(runs: &[RunData]) -> String {
    let uniq = |f: &dyn Fn(&RunSpec) -> String| -> String {
        let set: BTreeSet<String> = runs.iter().map(|r| f(&r.spec)).collect();
        set.into_iter().collect::<Vec<_>>().join("/")
    };
    let model = |s: &RunSpec| {
        let name = serde_json::to_value(s.workload.model).ok().and_then(|v| v.as_str().map(String::from));
        match (&s.workload.widths, &s.workload.depths) {
            (Some(w), Some(d)) => format!("{} widths {w:?} depths {d:?}", name.unwrap_or_default()),
            _ => name.unwrap_or_default(),
        }
    };
    format!(
        "{}, {}, K = {}",
        uniq(&|s| s.workload.dataset.clone()),
        uniq(&model),
        uniq(&|s| s.method.workers.to_string())
    )
}

fn write_experiment(exp: &ExperimentData, dir: &Path) -> Result<Vec<PathBuf>> {
    let runs = &exp.runs;
    let series = series_of(runs);
    let what = describe(runs);
    let mut files = Vec::new();
    let color = |i: usize, s: &Series| if s.kind == MethodKind::Dp { BLACK } else { PALETTE[i % PALETTE.len()] };
    let others: Vec<(usize, &Series)> = series.iter().filter(|s| s.kind != MethodKind::Dp).enumerate().collect();
    let dps: Vec<&Series> = series.iter().filter(|s| s.kind == MethodKind::Dp).collect();
    let cov_range = {
        let cs: Vec<f64> = others.iter().flat_map(|(_, s)| s.points.keys().map(|&c| cov_of(c))).collect();
        let lo = cs.iter().cloned().fold(1.0, f64::min);
        (lo.min(1.0), 1.0)
    };

    // Final test accuracy vs coverage.
    let mut acc = Plot {
        title: format!("{}: final test accuracy vs coverage", exp.name),
        subtitle: what.clone(),
        x_label: "coverage C (fraction of maskable units per worker)".into(),
        y_label: "final test accuracy (%), mean ± std over seeds".into(),
        lines: vec![],
        hlines: vec![],
        x_range: Some(cov_range),
        integer_x: false,
        y_clamp: Some((0.0, 100.0)),
    };
    for d in &dps {
        let accs: Vec<f64> = d.points.values().flatten().map(|&i| runs[i].final_acc * 100.0).collect();
        let (m, sd) = mean_std(&accs);
        let name = if sd > 0.0 { format!("{} (shaded: ± std)", d.label) } else { d.label.clone() };
        acc.hlines.push(HLine { name, color: BLACK, y: m, band: sd });
    }
    for &(i, s) in &others {
        let points = s
            .points
            .iter()
            .map(|(&c, idx)| {
                let accs: Vec<f64> = idx.iter().map(|&i| runs[i].final_acc * 100.0).collect();
                let (m, sd) = mean_std(&accs);
                (cov_of(c), m, sd)
            })
            .collect();
        acc.lines.push(Line { name: s.label.clone(), color: color(i, s), dashed: false, markers: true, points });
    }
    files.extend(write_plot(dir, "accuracy_vs_coverage", &acc)?);

    // Memory and parameter fraction relative to DP.
    let mut mem = Plot {
        title: format!("{}: per-worker memory vs coverage", exp.name),
        subtitle: what.clone(),
        x_label: "coverage C (fraction of maskable units per worker)".into(),
        y_label: "per-worker memory / DP (ratio)".into(),
        lines: vec![],
        hlines: vec![],
        x_range: Some(cov_range),
        integer_x: false,
        y_clamp: Some((0.0, f64::INFINITY)),
    };
    let mut measured_any = false;
    for &(i, s) in &others {
        let dp = dp_reference(s, &series);
        let measured = ratio_points(s, runs, dp.and_then(|d| series_mean(d, runs, |r| r.peak_bytes)), |r| r.peak_bytes);
        let (points, what) = if !measured.is_empty() {
            measured_any = true;
            (measured, "peak memory (measured)")
        } else {
            (
                ratio_points(s, runs, dp.and_then(|d| series_mean(d, runs, |r| r.est_bytes)), |r| r.est_bytes),
                "memory (estimated)",
            )
        };
        if !points.is_empty() {
            let name = format!("{}: {what}", s.label);
            mem.lines.push(Line { name, color: color(i, s), dashed: false, markers: true, points });
        }
        let frac = ratio_points(s, runs, Some(1.0), |r| r.param_fraction);
        if !frac.is_empty() {
            let name = format!("{}: parameter fraction", s.label);
            mem.lines.push(Line { name, color: color(i, s), dashed: true, markers: false, points: frac });
        }
    }
    if !mem.lines.is_empty() {
        mem.hlines.push(HLine { name: "DP (= 1)".into(), color: BLACK, y: 1.0, band: 0.0 });
        if !measured_any {
            mem.y_label = "per-worker memory / DP (ratio; estimated, not measured)".into();
        }
        files.extend(write_plot(dir, "memory_vs_coverage", &mem)?);
    }

    // Communication per step relative to DP.
    let mut comm = Plot {
        title: format!("{}: communication per step vs coverage", exp.name),
        subtitle: what.clone(),
        x_label: "coverage C (fraction of maskable units per worker)".into(),
        y_label: "communication bytes per step per worker / DP (ratio)".into(),
        lines: vec![],
        hlines: vec![],
        x_range: Some(cov_range),
        integer_x: false,
        y_clamp: Some((0.0, f64::INFINITY)),
    };
    for &(i, s) in &others {
        let dp = dp_reference(s, &series);
        let points = ratio_points(s, runs, dp.and_then(|d| series_mean(d, runs, |r| r.comm_bytes)), |r| r.comm_bytes);
        if !points.is_empty() {
            comm.lines.push(Line { name: s.label.clone(), color: color(i, s), dashed: false, markers: true, points });
        }
    }
    if !comm.lines.is_empty() {
        comm.hlines.push(HLine { name: "DP (= 1)".into(), color: BLACK, y: 1.0, band: 0.0 });
        files.extend(write_plot(dir, "comm_vs_coverage", &comm)?);
    }

    // Test accuracy vs epoch: one figure per variant (every coverage), DP dashed for reference; DP alone
    // when there is nothing else.
    let groups: Vec<&Series> = if others.is_empty() { dps.clone() } else { others.iter().map(|(_, s)| *s).collect() };
    for s in groups {
        let mut p = Plot {
            title: format!("{}: test accuracy vs epoch, {}", exp.name, s.label),
            subtitle: what.clone(),
            x_label: "epoch".into(),
            y_label: "test accuracy (%), mean over seeds".into(),
            lines: vec![],
            hlines: vec![],
            x_range: None,
            integer_x: true,
            y_clamp: Some((0.0, 100.0)),
        };
        let curve = |idx: &[usize]| -> Vec<(f64, f64, f64)> {
            let mut by_epoch: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            for &i in idx {
                for r in &runs[i].curve {
                    by_epoch.entry(r.epoch).or_default().push(r.test_acc * 100.0);
                }
            }
            by_epoch.into_iter().map(|(e, v)| (e as f64, mean_std(&v).0, 0.0)).collect()
        };
        for (j, (&c, idx)) in s.points.iter().enumerate() {
            let points = curve(idx);
            if points.is_empty() {
                continue;
            }
            let (name, color) = if s.kind == MethodKind::Dp {
                (s.label.clone(), BLACK)
            } else {
                (format!("{} C = {}", s.label, cov_of(c)), PALETTE[j % PALETTE.len()])
            };
            p.lines.push(Line { name, color, dashed: false, markers: true, points });
        }
        // DP dashed, drawn last so that it stays visible where SDP at C = 1 coincides with it.
        if s.kind != MethodKind::Dp {
            for d in &dps {
                let idx: Vec<usize> = d.points.values().flatten().cloned().collect();
                let points = curve(&idx);
                if !points.is_empty() {
                    p.lines.push(Line { name: d.label.clone(), color: BLACK, dashed: true, markers: false, points });
                }
            }
        }
        if !p.lines.is_empty() {
            files.extend(write_plot(dir, &format!("accuracy_vs_epoch_{}", s.slug), &p)?);
        }
    }

    let table = dir.join("table.md");
    write_atomic(&table, table_md(exp, &series, &what).as_bytes())?;
    files.push(table);
    Ok(files)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}

/// The numbers behind the figures, one row per (variant, coverage).
fn table_md(exp: &ExperimentData, series: &[Series], what: &str) -> String {
    let runs = &exp.runs;
    let mut t = String::new();
    let _ = writeln!(t, "# {}: {what}\n", exp.name);
    let _ = writeln!(
        t,
        "Written by `sdp figures` from `{}/` (summary.csv, manifest.json, metrics.csv, workers.csv): \
         {} finished run(s){}.\n",
        exp.dir.display(),
        runs.len(),
        if exp.skipped.is_empty() { String::new() } else { format!(", {} not done and left out", exp.skipped.len()) }
    );
    let _ = writeln!(
        t,
        "Final test accuracy: the headline evaluation mode at the last epoch (never the best epoch), mean ± \
         sample std over seeds. Memory and communication: per-worker means relative to DP on the same \
         workload and K (DP = 1); memory is the peak measured by `sdp memprobe`, or `est.` (parameters, \
         gradients, optimizer state and estimated activations from workers.csv) where nothing was measured.\n"
    );
    let _ = writeln!(
        t,
        "| method | coverage C | seeds | final test acc (%) | param fraction | peak memory / DP | \
         comm bytes/step / DP |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|");
    for s in series {
        let dp = dp_reference(s, series);
        let dp_peak = dp.and_then(|d| series_mean(d, runs, |r| r.peak_bytes));
        let dp_est = dp.and_then(|d| series_mean(d, runs, |r| r.est_bytes));
        let dp_comm = dp.and_then(|d| series_mean(d, runs, |r| r.comm_bytes));
        for (&c, idx) in &s.points {
            let accs: Vec<f64> = idx.iter().map(|&i| runs[i].final_acc * 100.0).collect();
            let (m, sd) = mean_std(&accs);
            let one = Series {
                label: String::new(),
                slug: String::new(),
                kind: s.kind,
                spec: s.spec.clone(),
                points: BTreeMap::from([(c, idx.clone())]),
            };
            let first = |pts: Vec<(f64, f64, f64)>| pts.first().map(|p| p.1);
            let frac = first(ratio_points(&one, runs, Some(1.0), |r| r.param_fraction));
            let mem = match first(ratio_points(&one, runs, dp_peak, |r| r.peak_bytes)) {
                Some(v) => fmt_opt(Some(v), 3),
                None => match first(ratio_points(&one, runs, dp_est, |r| r.est_bytes)) {
                    Some(v) => format!("{v:.3} (est.)"),
                    None => "–".into(),
                },
            };
            let comm = first(ratio_points(&one, runs, dp_comm, |r| r.comm_bytes));
            let _ = writeln!(
                t,
                "| {} | {:.3} | {} | {m:.2} ± {sd:.2} | {} | {mem} | {} |",
                s.label,
                cov_of(c),
                idx.len(),
                fmt_opt(frac, 3),
                fmt_opt(comm, 3)
            );
        }
    }
    // Absolute DP references, so that ratios can be turned back into bytes.
    for d in series.iter().filter(|s| s.kind == MethodKind::Dp) {
        let mib = |v: Option<f64>| fmt_opt(v.map(|b| b / 1048576.0), 2);
        let _ = writeln!(
            t,
            "\n{}: peak memory {} MiB per worker (measured), {} MiB estimated; communication {} MiB per step \
             per worker.",
            d.label,
            mib(series_mean(d, runs, |r| r.peak_bytes)),
            mib(series_mean(d, runs, |r| r.est_bytes)),
            mib(series_mean(d, runs, |r| r.comm_bytes)),
        );
    }
    // Every evaluation mode at the last evaluation (metrics.csv), where the runs recorded them.
    let modes: BTreeSet<String> =
        runs.iter().filter_map(|r| r.curve.last()).flat_map(|e| e.modes.keys().cloned()).collect();
    if !modes.is_empty() {
        let _ = writeln!(t, "\n## Final test accuracy by evaluation mode (%), mean over seeds\n");
        let _ = writeln!(t, "| method | coverage C | {} |", modes.iter().cloned().collect::<Vec<_>>().join(" | "));
        let _ = writeln!(t, "|---|---|{}", "---|".repeat(modes.len()));
        for s in series {
            for (&c, idx) in &s.points {
                let cells: Vec<String> = modes
                    .iter()
                    .map(|mode| {
                        let v: Option<Vec<f64>> = idx
                            .iter()
                            .map(|&i| runs[i].curve.last().and_then(|e| e.modes.get(mode)).map(|a| a * 100.0))
                            .collect();
                        fmt_opt(v.map(|v| mean_std(&v).0), 2)
                    })
                    .collect();
                let _ = writeln!(t, "| {} | {:.3} | {} |", s.label, cov_of(c), cells.join(" | "));
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[1.0]), (1.0, 0.0));
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
    }

    #[test]
    fn full_coverage_runs_are_shared_by_every_sdp_series() -> Result<()> {
        let text = r#"
name = "t"
[workload]
dataset = "shapes"
model = "resnet18"
epochs = 1
batch_size = 8
[method]
kind = "sdp"
workers = 4
masking = ["neuron", "block"]
regime = ["forward", "backward"]
coverage = [0.5, 1.0]
"#;
        let exp = crate::spec::parse(text, Path::new("t.toml"), &[])?;
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
            final_acc: 0.5,
            param_fraction: None,
            peak_bytes: None,
            est_bytes: None,
            comm_bytes: None,
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
        let exp = crate::spec::parse(text, Path::new("t.toml"), &[])?;
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
            assert_eq!(sizes, if s.kind == MethodKind::Dp { vec![2] } else { vec![2, 2] }, "{}", s.label);
        }
        // The DP reference trained with the same optimizer settings.
        assert_eq!(dp_reference(&series[5], &series).map(|d| d.label.as_str()), Some("DP lr=0.1"));
        assert_eq!(dp_reference(&series[2], &series).map(|d| d.label.as_str()), Some("DP lr=0.05"));
        Ok(())
    }

    #[test]
    fn slugs_are_file_name_safe() {
        assert_eq!(slug("SDP block forward lr=0.05"), "sdp_block_forward_lr_0.05");
    }
}
