//! `table.md`: the comparison a reader wants from an experiment, one row per (variant, coverage): does SDP
//! at coverage C match DP, with what uncertainty (Welch's interval over seeds), at what memory and
//! communication, on what averaging graph (spectral gap). Then DP's absolute bytes, so ratios can be turned
//! back into bytes, and the final accuracy of every evaluation mode.

use super::plot::decimals_for;
use super::read::RunData;
use super::series::{cov_of, dp_reference, Series};
use super::stats::{mean_std, welch_interval};
use super::Headline;
use super::{accs, all_runs, mean_of, memory_ratio, DpRef};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The confidence level of the interval on the difference to DP.
const LEVEL: f64 = 0.95;

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}

/// `97.10 ± 0.31`, or `97.10 (n = 1)` (with `d` = 2 decimals): a single seed has no spread to report.
fn fmt_mean_std(xs: &[f64], d: usize) -> String {
    let (m, sd) = mean_std(xs);
    if xs.len() > 1 {
        format!("{m:.d$} ± {sd:.d$}")
    } else {
        format!("{m:.d$} (n = 1)")
    }
}

/// `+0.52 [-1.10, +2.14]`: mean(xs) − mean(dp) in the shown unit (percentage points for a percentage)
/// with Welch's interval, or the difference alone where either side has a single seed.
fn fmt_diff(xs: &[f64], dp: &[f64], d: usize) -> String {
    let diff = mean_std(xs).0 - mean_std(dp).0;
    match welch_interval(xs, dp, LEVEL) {
        Some(w) => format!("{diff:+.d$} [{:+.d$}, {:+.d$}]", w.diff - w.half_width, w.diff + w.half_width),
        None => format!("{diff:+.d$} (CI n/a: n = 1)"),
    }
}

/// The markdown of `table.md`.
pub(super) fn table_md(
    name: &str,
    metric: Headline,
    runs: &[RunData],
    series: &[Series],
    what: &str,
    skipped: usize,
) -> String {
    let Headline { name: short, noun, .. } = metric;
    let (scale, unit, digits) = (metric.scale(), metric.unit(), metric.decimals());
    // Percentage points for a percentage; the metric's own unit otherwise, with the direction said.
    let (diff_unit, diff_head) = if metric.percent {
        ("in percentage points", " (pp)")
    } else if metric.higher_is_better {
        ("in its unit", "")
    } else {
        ("in its unit; lower is better, so a negative Δ is a gain", "")
    };
    let mut t = String::new();
    let _ = writeln!(t, "# {name}: {what}\n");
    let _ = writeln!(
        t,
        "Written by `sdp figures` from the results of experiment `{name}` (each run's manifest.json, \
         metrics.csv, workers.csv): {} finished run(s){}.\n",
        runs.len(),
        if skipped == 0 { String::new() } else { format!(", {skipped} not done and left out") }
    );
    let _ = writeln!(
        t,
        "- **final test {short}**: the headline evaluation mode at the last epoch (never the best epoch), mean ± \
         sample std over the n seeds (`n = 1`: a single seed, no spread).\n\
         - **Δ vs DP**: mean {noun} minus DP's on the same workload and K, {diff_unit}, with \
         Welch's {:.0} % confidence interval (unequal variances, Welch–Satterthwaite degrees of freedom, \
         Student t quantile); `n/a` where either side has a single seed.\n\
         - **memory / DP**: peak bytes of one worker's training steps measured by `sdp memprobe`, relative to \
         DP's per-worker peak; mean over workers and the largest worker, each averaged over seeds. `est.`: \
         parameters, gradients, optimizer state and estimated activations (workers.csv) where nothing was \
         measured.\n\
         - **param fraction**: parameters one worker holds relative to DP's whole model (mean over workers).\n\
         - **comm / DP**: bytes sent per step per worker (holder-set all-reduce) relative to DP.\n\
         - **spectral gap**: of the worker–unit averaging graph (0: some workers' parameters are never \
         averaged together); `–` for methods without masking.\n",
        LEVEL * 100.0
    );
    let cov_decimals =
        decimals_for(&series.iter().flat_map(|s| s.points.keys().map(|&c| cov_of(c))).collect::<Vec<_>>()).max(2);
    let _ = writeln!(
        t,
        "| variant | C | n | final test {short}{unit} | Δ vs DP{diff_head} [95 % CI] | param fraction | memory / DP, mean \
         worker | memory / DP, largest worker | comm / DP | spectral gap |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    for s in series {
        let dp = dp_reference(s, series);
        let dp_ref = DpRef::of(dp, runs);
        let dp_accs = dp.map(|d| accs(runs, &all_runs(d), scale));
        for (&c, idx) in &s.points {
            let a = accs(runs, idx, scale);
            let diff = match (&dp_accs, s.look.reference) {
                (_, true) => "(reference)".to_string(),
                (Some(d), false) => fmt_diff(&a, d, digits),
                (None, false) => "– (no DP run)".to_string(),
            };
            let (mem_mean, mem_max) = match memory_ratio(runs, idx, dp_ref) {
                Some(m) => {
                    let est = if m.measured { "" } else { " (est.)" };
                    let max = if m.largest_worker.is_finite() {
                        format!("{:.3}{est}", m.largest_worker)
                    } else {
                        "–".into()
                    };
                    (format!("{:.3}{est}", m.mean_worker), max)
                }
                None => ("–".into(), "–".into()),
            };
            let comm = dp_ref.comm.and_then(|d| mean_of(runs, idx, |r| r.comm_bytes).map(|v| v / d));
            // Parameters per worker against DP's whole model (a smaller dense model's own fraction is 1).
            let params = dp_ref
                .params
                .and_then(|d| mean_of(runs, idx, |r| r.param_bytes).map(|v| v / d))
                .or_else(|| mean_of(runs, idx, |r| r.param_fraction));
            let _ = writeln!(
                t,
                "| {} | {:.cov_decimals$} | {} | {} | {diff} | {} | {mem_mean} | {mem_max} | {} | {} |",
                s.label,
                cov_of(c),
                idx.len(),
                fmt_mean_std(&a, digits),
                fmt_opt(params, 3),
                fmt_opt(comm, 3),
                fmt_opt(mean_of(runs, idx, |r| r.spectral_gap), 3),
            );
        }
    }
    // Absolute DP references, so that ratios can be turned back into bytes.
    for d in series.iter().filter(|s| s.look.reference) {
        let mib = |v: Option<f64>| fmt_opt(v.map(|b| b / 1048576.0), 2);
        let idx = all_runs(d);
        let _ = writeln!(
            t,
            "\n{}: peak memory {} MiB per worker (measured), {} MiB estimated; communication {} MiB per step \
             per worker.",
            d.label,
            mib(mean_of(runs, &idx, |r| r.peak.map(|p| p.mean))),
            mib(mean_of(runs, &idx, |r| r.est.map(|p| p.mean))),
            mib(mean_of(runs, &idx, |r| r.comm_bytes)),
        );
    }
    // Every evaluation mode at the last evaluation (metrics.csv), where the runs recorded them.
    let modes: BTreeSet<String> =
        runs.iter().filter_map(|r| r.curve.last()).flat_map(|e| e.modes.keys().cloned()).collect();
    if !modes.is_empty() {
        let _ = writeln!(t, "\n## Final test {noun} by evaluation mode{unit}, mean over seeds\n");
        let _ = writeln!(t, "| variant | C | n | {} |", modes.iter().cloned().collect::<Vec<_>>().join(" | "));
        let _ = writeln!(t, "|---|---|---|{}", "---|".repeat(modes.len()));
        for s in series {
            for (&c, idx) in &s.points {
                let cells: Vec<String> = modes
                    .iter()
                    .map(|mode| {
                        let last = |r: &RunData| r.curve.last().and_then(|e| e.modes.get(mode)).map(|a| a * scale);
                        fmt_opt(mean_of(runs, idx, last), digits)
                    })
                    .collect();
                let _ = writeln!(
                    t,
                    "| {} | {:.cov_decimals$} | {} | {} |",
                    s.label,
                    cov_of(c),
                    idx.len(),
                    cells.join(" | ")
                );
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_seed_has_no_fake_spread_and_no_interval() {
        assert_eq!(fmt_mean_std(&[97.1], 2), "97.10 (n = 1)");
        assert_eq!(fmt_mean_std(&[97.0, 98.0], 2), "97.50 ± 0.71");
        assert_eq!(fmt_mean_std(&[4.3, 4.35], 3), "4.325 ± 0.035");
        assert_eq!(fmt_diff(&[96.0], &[97.0, 98.0], 2), "-1.50 (CI n/a: n = 1)");
        assert_eq!(fmt_diff(&[96.0, 97.0], &[97.0], 2), "-0.50 (CI n/a: n = 1)");
        // n = 2 each with equal spread: df = 2, half width t_{0.975,2} · sqrt(0.5²·2/2 + ...) = 4.303 · 0.7071.
        assert_eq!(fmt_diff(&[96.0, 97.0], &[97.0, 98.0], 2), "-1.00 [-4.04, +2.04]");
    }
}
