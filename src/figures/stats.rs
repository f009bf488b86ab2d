//! The statistics behind "does SDP at coverage C match DP?" over a handful of seeds: mean ± sample
//! standard deviation, Student's t distribution (CDF through the regularized incomplete beta function,
//! quantile by bisection on it), and Welch's confidence interval for a difference of means whose variances
//! may differ (the Welch–Satterthwaite degrees of freedom are rarely whole numbers, so the t quantile is
//! computed for any positive real df instead of being read from a table).

/// Mean and sample standard deviation (n − 1 denominator; 0 for a single value, NaN for none).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Standard normal CDF.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// Regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1], by the continued
/// fraction of Numerical Recipes §6.4 (modified Lentz), on the side of x where it converges fast.
pub fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = libm::lgamma(a + b) - libm::lgamma(a) - libm::lgamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / guard(1.0 - qab * x / qap);
    let mut h = d;
    // Converges in O(sqrt(max(a, b))) terms; df above 1e7 never gets here (see `student_t_cdf`).
    for m in 1..=20_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 / guard(1.0 + aa * d);
        c = guard(1.0 + aa / c);
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 / guard(1.0 + aa * d);
        c = guard(1.0 + aa / c);
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// CDF of Student's t distribution with `df` > 0 degrees of freedom (any real; `f64::INFINITY` is the
/// normal distribution, as is any df above 1e7, where the two differ by less than 1e-7).
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    if df > 1e7 {
        return normal_cdf(t);
    }
    let tail = 0.5 * inc_beta(df / 2.0, 0.5, df / (df + t * t));
    if t > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The p-quantile of Student's t distribution with `df` > 0 degrees of freedom: the t with
/// `student_t_cdf(t, df) = p`, by bisection to a relative precision of 1e-12. NaN for p outside (0, 1) or
/// df ≤ 0.
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0 && df > 0.0) {
        return f64::NAN;
    }
    if p == 0.5 {
        return 0.0;
    }
    if p < 0.5 {
        return -student_t_quantile(1.0 - p, df);
    }
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while student_t_cdf(hi, df) < p {
        (lo, hi) = (hi, hi * 2.0);
        if hi > 1e300 {
            return f64::INFINITY;
        }
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if student_t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-12 * hi {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// A confidence interval for mean(a) − mean(b): `diff ± half_width`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Welch {
    pub diff: f64,
    pub half_width: f64,
    /// Welch–Satterthwaite degrees of freedom (n_a + n_b − 2 when both samples have zero variance, where
    /// the interval has zero width whatever the df).
    pub df: f64,
}

/// Welch's `level` (e.g. 0.95) confidence interval for mean(a) − mean(b) without assuming equal variances:
/// se² = s_a²/n_a + s_b²/n_b, df = se⁴ / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1)), half width
/// t_{(1+level)/2, df} · se. `None` when either side has fewer than two values (no variance estimate, so
/// no interval).
pub fn welch_interval(a: &[f64], b: &[f64], level: f64) -> Option<Welch> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let ((ma, sa), (mb, sb)) = (mean_std(a), mean_std(b));
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (va, vb) = (sa * sa / na, sb * sb / nb);
    let se2 = va + vb;
    if se2 == 0.0 {
        return Some(Welch { diff: ma - mb, half_width: 0.0, df: na + nb - 2.0 });
    }
    let df = se2 * se2 / (va * va / (na - 1.0) + vb * vb / (nb - 1.0));
    let t = student_t_quantile(0.5 + level / 2.0, df);
    Some(Welch { diff: ma - mb, half_width: t * se2.sqrt(), df })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[1.0]), (1.0, 0.0));
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert!(close(m, 2.0, 1e-12) && close(s, 1.0, 1e-12));
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn t_quantiles_match_the_printed_tables() {
        // Two-sided 95 % (p = 0.975) and other quantiles from standard t tables (3 decimals).
        for (p, df, want) in [
            (0.975, 1.0, 12.706),
            (0.975, 2.0, 4.303),
            (0.975, 3.0, 3.182),
            (0.975, 4.0, 2.776),
            (0.975, 5.0, 2.571),
            (0.975, 10.0, 2.228),
            (0.975, 30.0, 2.042),
            (0.975, 100.0, 1.984),
            (0.975, f64::INFINITY, 1.960),
            (0.95, 5.0, 2.015),
            (0.995, 2.0, 9.925),
            (0.9, 20.0, 1.325),
        ] {
            let got = student_t_quantile(p, df);
            assert!(close(got, want, 0.0006), "t_({p}, {df}) = {got}, table {want}");
        }
        assert!(close(student_t_quantile(0.025, 4.0), -2.776, 0.0006));
        assert_eq!(student_t_quantile(0.5, 3.0), 0.0);
        assert!(student_t_quantile(1.0, 3.0).is_nan() && student_t_quantile(0.9, 0.0).is_nan());
    }

    #[test]
    fn t_quantiles_match_the_closed_forms() {
        // df = 1 (Cauchy): t = tan(π (p − ½)); df = 2: t = (2p − 1) / sqrt(2 p (1 − p)).
        for p in [0.51, 0.6, 0.75, 0.9, 0.975, 0.999] {
            let cauchy = (std::f64::consts::PI * (p - 0.5)).tan();
            assert!(close(student_t_quantile(p, 1.0), cauchy, 1e-9 * cauchy.max(1.0)), "p = {p}");
            let two = (2.0 * p - 1.0) / (2.0 * p * (1.0 - p)).sqrt();
            assert!(close(student_t_quantile(p, 2.0), two, 1e-9 * two.max(1.0)), "p = {p}");
        }
        // Non-integer df (what Welch gives) lies between its integer neighbours, and large df tends to normal.
        let t = student_t_quantile(0.975, 4.5);
        assert!(t < 2.776 && t > 2.571, "{t}");
        assert!(close(student_t_quantile(0.975, 1e6), 1.959966, 1e-5));
        assert!(close(student_t_quantile(0.975, 1e8), 1.959964, 1e-6));
    }

    #[test]
    fn incomplete_beta_known_values() {
        // I_x(1, 1) = x; I_x(a, 1) = x^a; I_½(a, a) = ½.
        assert!(close(inc_beta(1.0, 1.0, 0.3), 0.3, 1e-14));
        assert!(close(inc_beta(3.0, 1.0, 0.7), 0.343, 1e-13));
        assert!(close(inc_beta(2.5, 2.5, 0.5), 0.5, 1e-13));
        assert!(close(inc_beta(0.5, 0.5, 0.25), 1.0 / 3.0, 1e-12), "arcsine law: 2/π asin(√x)");
    }

    #[test]
    fn welch_interval_by_hand() {
        // a: mean 2.5, s² = 5/3; b: mean 5, s² = 20/3. se² = 5/12 + 5/3 = 25/12,
        // df = (25/12)² / ((5/12)²/3 + (5/3)²/3) = 4.41176…
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [2.0, 4.0, 6.0, 8.0];
        let w = welch_interval(&a, &b, 0.95).expect("two samples of four");
        assert!(close(w.diff, -2.5, 1e-12));
        let df = (25.0_f64 / 12.0).powi(2) / ((5.0_f64 / 12.0).powi(2) / 3.0 + (5.0_f64 / 3.0).powi(2) / 3.0);
        assert!(close(w.df, df, 1e-12) && close(w.df, 4.41176, 1e-5), "{}", w.df);
        let half = student_t_quantile(0.975, df) * (25.0_f64 / 12.0).sqrt();
        assert!(close(w.half_width, half, 1e-12));
        // Between the df = 4 and df = 5 intervals.
        let se = (25.0_f64 / 12.0).sqrt();
        assert!(w.half_width < 2.776 * se && w.half_width > 2.571 * se, "{}", w.half_width);
        // Equal variances and sizes: df = 2(n − 1).
        let w = welch_interval(&[1.0, 3.0], &[2.0, 4.0], 0.95).expect("n = 2");
        assert!(close(w.df, 2.0, 1e-12) && close(w.half_width, 4.303 * 2.0_f64.sqrt(), 0.001), "{w:?}");
        // No spread at all: a zero-width interval.
        let w = welch_interval(&[1.0, 1.0], &[0.5, 0.5], 0.95).expect("n = 2");
        assert_eq!((w.diff, w.half_width), (0.5, 0.0));
        // One seed on either side: no interval.
        assert_eq!(welch_interval(&[1.0], &[1.0, 2.0], 0.95), None);
        assert_eq!(welch_interval(&[1.0, 2.0], &[3.0], 0.95), None);
    }
}
