//! The `sdp bench step --profile` table: each part's time per step, its share of the step, its counted
//! FLOPs and their rate, then the step's FLOPs, its GFLOP/s and their fraction of the measured GEMM peak
//! (`crate::ops::profile` says what is counted).

use crate::ops::peak::Peak;
use crate::ops::profile::PartTotals;
use std::fmt::Write;

/// The table for `parts` accumulated over `steps` timed steps that took `times` seconds.
pub fn profile_table(parts: &[PartTotals], steps: usize, times: &[f64], peak: Option<Peak>) -> String {
    let steps = steps.max(1) as f64;
    let mean_step = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let mut out = String::new();
    let _ = writeln!(out, "profile (mean per timed step; exclusive times):");
    let _ = writeln!(out, "  {:<40} {:>9} {:>7} {:>11} {:>9}", "part", "ms/step", "share", "GFLOP/step", "GFLOP/s");
    let pct = |s: f64| if mean_step > 0.0 { 100.0 * s / mean_step } else { 0.0 };
    let (mut timed, mut flops) = (0.0, 0u64);
    for p in parts.iter().filter(|p| p.calls > 0) {
        let s = p.seconds / steps;
        timed += s;
        flops += p.flops;
        let gf = p.flops as f64 / steps * 1e-9;
        let rate = if p.flops > 0 && s > 0.0 { format!("{:.1}", gf / s) } else { "-".into() };
        let gf = if p.flops > 0 { format!("{gf:.3}") } else { "-".into() };
        let _ = writeln!(out, "  {:<40} {:>9.2} {:>6.1}% {:>11} {:>9}", p.part.label(), s * 1e3, pct(s), gf, rate);
    }
    let rest = (mean_step - timed).max(0.0);
    let label = "untimed (batches to tensors, bookkeeping)";
    let _ = writeln!(out, "  {:<40} {:>9.2} {:>6.1}% {:>11} {:>9}", label, rest * 1e3, pct(rest), "-", "-");
    let gflop = flops as f64 / steps * 1e-9;
    let rate = if mean_step > 0.0 { gflop / mean_step } else { 0.0 };
    let _ = write!(out, "step: {:.2} ms mean, {gflop:.3} GFLOP counted, {rate:.1} GFLOP/s", mean_step * 1e3);
    match peak {
        Some(p) => {
            let _ = writeln!(
                out,
                ", {:.1} % of the measured fp32 GEMM peak ({:.1} GFLOP/s at n = {}, {} threads)",
                100.0 * rate / p.gflops.max(f64::MIN_POSITIVE),
                p.gflops,
                p.size,
                p.threads
            );
        }
        None => out.push('\n'),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::profile::Part;

    #[test]
    fn the_table_adds_up_to_the_step() {
        let part = |part, seconds, calls, flops| PartTotals { part, seconds, calls, flops };
        // Two steps of 100 ms: 60 ms of convolutions (8 GFLOP in all), 20 ms of optimizer, 20 ms untimed.
        let parts = [
            part(Part::ConvForward, 0.12, 40, 8_000_000_000),
            part(Part::Optimizer, 0.04, 2, 0),
            part(Part::Loss, 0.0, 0, 0),
        ];
        let t = profile_table(&parts, 2, &[0.1, 0.1], Some(Peak { gflops: 100.0, size: 1024, threads: 2 }));
        assert!(t.contains("conv forward") && t.contains("60.00") && t.contains("60.0%"), "{t}");
        assert!(t.contains("66.7"), "conv rate 4 GFLOP / 60 ms: {t}");
        assert!(!t.contains("loss"), "a part that never ran is not listed: {t}");
        assert!(t.contains("untimed") && t.contains("20.00"), "{t}");
        assert!(t.contains("4.000 GFLOP counted, 40.0 GFLOP/s, 40.0 % of the measured fp32 GEMM peak"), "{t}");
    }
}
