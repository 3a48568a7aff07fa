//! The statistics behind drift scores, each a pure function of mergeable parts (bin
//! counts, moments), so that the controller can recompute a fleet's scores from merged
//! windows exactly as a device computes its own.
//!
//! Conventions follow the tools people compare against: PSI with empty bins floored at
//! 1e-4 (Evidently); the Jensen–Shannon *distance* with natural logarithms
//! (`scipy.spatial.distance.jensenshannon`); the two-sample Kolmogorov–Smirnov statistic
//! with the asymptotic p-value (`scipy.stats.kstwobign`); the Wasserstein-1 distance
//! divided by the reference's standard deviation (Evidently's "normed Wasserstein").
//! `tests/scripts/drift_reference.py` computes the same figures with numpy and scipy on
//! fixed data; `shared/tests/drift_reference.rs` holds the Rust side to them.

use serde::{Deserialize, Serialize};

/// Count, mean, sum of squared deviations, minimum and maximum of a stream of finite
/// values. Two of them merge into the moments of the union (Chan et al.'s parallel
/// update), up to floating-point rounding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Moments {
    pub count: u64,
    pub mean: f64,
    /// Σ (x − mean)²; the population variance is `m2 / count`.
    pub m2: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl Moments {
    /// Adds one value; a non-finite one is ignored (JSON cannot carry it, and one infinite
    /// input would spoil the mean for good).
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
        self.min = Some(self.min.map_or(x, |m| m.min(x)));
        self.max = Some(self.max.map_or(x, |m| m.max(x)));
    }

    pub fn merge(&mut self, other: &Moments) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        let delta = other.mean - self.mean;
        self.mean += delta * nb / n;
        self.m2 += other.m2 + delta * delta * na * nb / n;
        self.count = self.count.saturating_add(other.count);
        self.min = min_of(self.min, other.min);
        self.max = max_of(self.max, other.max);
    }

    /// Population variance; `None` without values.
    pub fn variance(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.m2 / self.count as f64).max(0.0))
    }
}

fn min_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Floor for empty bins, so that an empty bin does not make PSI infinite.
pub const PSI_EPSILON: f64 = 1e-4;

/// Population Stability Index between reference fractions and observed counts:
/// `Σ (a − e) · ln(a / e)` with both fractions floored at [`PSI_EPSILON`]. 0 when nothing
/// was observed.
pub fn psi(expected: &[f64], actual_counts: &[u64]) -> f64 {
    let total: u64 = actual_counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    expected
        .iter()
        .zip(actual_counts)
        .map(|(&e, &c)| {
            let e = e.max(PSI_EPSILON);
            let a = (c as f64 / total as f64).max(PSI_EPSILON);
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// Jensen–Shannon distance (the square root of the divergence, natural logarithms, between
/// 0 and √ln 2) between reference fractions and observed counts. 0 when nothing was
/// observed.
pub fn js_distance(expected: &[f64], actual_counts: &[u64]) -> f64 {
    let total: u64 = actual_counts.iter().sum();
    let e_total: f64 = expected.iter().sum();
    if total == 0 || e_total <= 0.0 {
        return 0.0;
    }
    let kl = |p: f64, m: f64| if p > 0.0 { p * (p / m).ln() } else { 0.0 };
    let divergence: f64 = expected
        .iter()
        .zip(actual_counts)
        .map(|(&e, &c)| {
            let p = e / e_total;
            let q = c as f64 / total as f64;
            let m = (p + q) / 2.0;
            (kl(p, m) + kl(q, m)) / 2.0
        })
        .sum();
    divergence.max(0.0).sqrt()
}

/// The two-sample Kolmogorov–Smirnov statistic, `sup |F_window − F_reference|`, evaluated
/// at every bin boundary of `expected`/`actual_counts` (cumulative fractions bin after
/// bin). The true statistic is at most [`ks_error_bound`] above it. `None` when nothing
/// was observed.
pub fn ks_statistic(expected: &[f64], actual_counts: &[u64]) -> Option<f64> {
    let total: u64 = actual_counts.iter().sum();
    if total == 0 {
        return None;
    }
    let (mut fe, mut fa, mut d) = (0.0f64, 0.0f64, 0.0f64);
    for (&e, &c) in expected.iter().zip(actual_counts) {
        fe += e;
        fa += c as f64 / total as f64;
        d = d.max((fa - fe).abs());
    }
    Some(d.min(1.0))
}

/// How far the binned KS statistic can be below the exact one: within a bin, the
/// reference's CDF rises by that bin's fraction, so the largest inner bin fraction bounds
/// the error (1/100 with 100 quantile bins of a continuous feature).
pub fn ks_error_bound(expected: &[f64]) -> f64 {
    let n = expected.len();
    if n <= 2 {
        return 1.0;
    }
    expected[1..n - 1].iter().copied().fold(0.0, f64::max)
}

/// Survival function of the Kolmogorov distribution, `P(K > λ)`: the asymptotic p-value
/// of `√n_eff · D` (scipy's `kstwobign.sf`).
pub fn kolmogorov_sf(lambda: f64) -> f64 {
    if !lambda.is_finite() || lambda <= 0.0 {
        return 1.0;
    }
    if lambda < 1.0 {
        // The CDF's theta-function form converges fast for small λ:
        // K(λ) = √(2π)/λ · Σ_{k≥1} exp(−(2k−1)² π² / (8λ²)).
        let pi2 = std::f64::consts::PI * std::f64::consts::PI;
        let mut cdf = 0.0;
        for k in 1..=20 {
            let j = (2 * k - 1) as f64;
            cdf += (-j * j * pi2 / (8.0 * lambda * lambda)).exp();
        }
        (1.0 - (2.0 * std::f64::consts::PI).sqrt() / lambda * cdf).clamp(0.0, 1.0)
    } else {
        // P(K > λ) = 2 Σ_{k≥1} (−1)^{k−1} exp(−2k²λ²), fast for λ ≥ 1.
        let mut sf = 0.0;
        for k in 1..=100 {
            let term = (-2.0 * (k * k) as f64 * lambda * lambda).exp();
            sf += if k % 2 == 1 { term } else { -term };
            if term < 1e-17 {
                break;
            }
        }
        (2.0 * sf).clamp(0.0, 1.0)
    }
}

/// Asymptotic p-value of a two-sample KS statistic `d` between samples of `n` and `m`.
pub fn ks_p_value(d: f64, n: u64, m: u64) -> f64 {
    if n == 0 || m == 0 {
        return 1.0;
    }
    let (n, m) = (n as f64, m as f64);
    kolmogorov_sf((n * m / (n + m)).sqrt() * d)
}

/// Wasserstein-1 distance, `∫ |F_window − F_reference| dx`, between the reference and a
/// window binned on the same `edges` (underflow, inner bins, overflow), both taken as
/// uniform within each inner bin. Outside the edges the reference has no mass, so the
/// integral there is exact given `below`, the window's summed distances under the first
/// edge (`Σ edges[0] − x`), and `above`, its summed distances over the last one. `None`
/// when nothing was observed.
pub fn wasserstein(
    edges: &[f64],
    expected: &[f64],
    actual_counts: &[u64],
    below: f64,
    above: f64,
) -> Option<f64> {
    let total: u64 = actual_counts.iter().sum();
    if total == 0 || edges.is_empty() || expected.len() != actual_counts.len() {
        return None;
    }
    let a: Vec<f64> = actual_counts
        .iter()
        .map(|&c| c as f64 / total as f64)
        .collect();
    // Below the first edge: the reference has nothing, the window its underflow.
    let mut w = below.max(0.0) / total as f64;
    // Inner bins: the CDF difference is linear within each.
    let (mut fe, mut fa) = (expected[0], a[0]);
    for (i, pair) in edges.windows(2).enumerate() {
        let d0 = fa - fe;
        fe += expected[i + 1];
        fa += a[i + 1];
        w += segment_integral(d0, fa - fe, pair[1] - pair[0]);
    }
    // Above the last edge: the window's overflow.
    w += above.max(0.0) / total as f64;
    Some(w)
}

/// `∫₀^width |d0 + (d1 − d0)·t/width| dt`.
fn segment_integral(d0: f64, d1: f64, width: f64) -> f64 {
    if d0 * d1 >= 0.0 {
        width * (d0.abs() + d1.abs()) / 2.0
    } else {
        width * (d0 * d0 + d1 * d1) / (2.0 * (d0.abs() + d1.abs()))
    }
}

/// Pearson's chi-square goodness-of-fit test of observed counts against expected fractions
/// (categories or predicted classes): the statistic `Σ (O − E)² / E` with `E = n · p`
/// (each `p` floored at [`PSI_EPSILON`], so that a category the reference never saw gives
/// a large, finite statistic), and its p-value with `k − 1` degrees of freedom. `None`
/// when nothing was observed or there are fewer than two categories.
pub fn chi_square(expected: &[f64], actual_counts: &[u64]) -> Option<(f64, f64)> {
    let total: u64 = actual_counts.iter().sum();
    let k = expected.len().min(actual_counts.len());
    if total == 0 || k < 2 {
        return None;
    }
    let floored: Vec<f64> = expected[..k].iter().map(|p| p.max(PSI_EPSILON)).collect();
    let sum: f64 = floored.iter().sum();
    let n = total as f64;
    let statistic: f64 = floored
        .iter()
        .zip(actual_counts)
        .map(|(&p, &o)| {
            let e = n * p / sum;
            let d = o as f64 - e;
            d * d / e
        })
        .sum();
    Some((statistic, chi_square_sf(statistic, (k - 1) as f64)))
}

/// The chi-square distribution's survival function `P(X ≥ x)` with `dof` degrees of
/// freedom: the regularized upper incomplete gamma function `Q(dof / 2, x / 2)`.
pub fn chi_square_sf(x: f64, dof: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    gamma_q(dof / 2.0, x / 2.0)
}

/// Regularized upper incomplete gamma `Q(a, x)`, by its series below `a + 1` and its
/// continued fraction (modified Lentz) above, both to double precision.
fn gamma_q(a: f64, x: f64) -> f64 {
    const EPS: f64 = 1e-15;
    const TINY: f64 = 1e-300;
    let log_prefix = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        // P(a, x) = e^{-x} x^a / Γ(a + 1) · Σ x^n / ((a + 1)…(a + n))
        let (mut term, mut sum, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * EPS {
                break;
            }
        }
        (1.0 - sum * log_prefix.exp()).clamp(0.0, 1.0)
    } else {
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let step = d * c;
            h *= step;
            if (step - 1.0).abs() < EPS {
                break;
            }
        }
        (log_prefix.exp() * h).clamp(0.0, 1.0)
    }
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, nine terms; relative error below 1e-14).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// Upper bounds of the latency histogram's buckets, in milliseconds; one more bucket
/// counts everything slower.
pub const LATENCY_BOUNDS_MS: [f64; 16] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
    10000.0,
];

/// The bucket of a latency in milliseconds (`LATENCY_BOUNDS_MS.len()` for the slowest).
pub fn latency_bucket(ms: f64) -> usize {
    LATENCY_BOUNDS_MS.partition_point(|&b| b < ms)
}

/// The quantile `q` of a latency histogram, as its bucket's upper bound (the slowest
/// bucket answers the last bound). `None` when empty.
pub fn latency_quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &c) in buckets.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(LATENCY_BOUNDS_MS[i.min(LATENCY_BOUNDS_MS.len() - 1)]);
        }
    }
    LATENCY_BOUNDS_MS.last().copied()
}

/// Page–Hinkley test for a fall in a stream's mean (here: the model's confidence). It
/// keeps `m_t = Σ (mean_t − x_t − δ)` and alarms when `m_t − min m ≥ λ`, after at least
/// `min_samples` values; an alarm restarts it.
#[derive(Debug, Clone, PartialEq)]
pub struct PageHinkley {
    delta: f64,
    lambda: f64,
    min_samples: u64,
    n: u64,
    mean: f64,
    cumulative: f64,
    minimum: f64,
}

impl PageHinkley {
    pub fn new(delta: f64, lambda: f64, min_samples: u64) -> Self {
        PageHinkley {
            delta,
            lambda,
            min_samples,
            n: 0,
            mean: 0.0,
            cumulative: 0.0,
            minimum: 0.0,
        }
    }

    /// Adds a value; true when it raises the alarm.
    pub fn push(&mut self, x: f64) -> bool {
        if !x.is_finite() {
            return false;
        }
        self.n += 1;
        self.mean += (x - self.mean) / self.n as f64;
        self.cumulative += self.mean - x - self.delta;
        self.minimum = self.minimum.min(self.cumulative);
        if self.n >= self.min_samples && self.cumulative - self.minimum >= self.lambda {
            *self = PageHinkley::new(self.delta, self.lambda, self.min_samples);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_square_p_values_match_the_distribution() {
        // Textbook critical values at the 5 % level (scipy.stats.chi2.isf(0.05, k)).
        for (x, dof) in [
            (3.841_458_820_694_124, 1.0),
            (5.991_464_547_107_979, 2.0),
            (9.487_729_036_781_154, 4.0),
            (18.307_038_053_275_146, 10.0),
            (124.342_113_404_070_6, 100.0),
        ] {
            let p = chi_square_sf(x, dof);
            assert!((p - 0.05).abs() < 1e-10, "dof {dof}: {p}");
        }
        // With two degrees of freedom the survival function is exp(−x/2) exactly.
        for x in [0.1, 1.0, 3.0, 20.0, 80.0] {
            let p = chi_square_sf(x, 2.0);
            assert!((p / (-x / 2.0f64).exp() - 1.0).abs() < 1e-12, "{x}: {p}");
        }
        assert_eq!(chi_square_sf(0.0, 3.0), 1.0);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-14);
        assert!((ln_gamma(10.0) - 362_880f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn chi_square_tests_counts_against_fractions() {
        // Observed exactly as expected: statistic 0, p 1.
        let (x, p) = chi_square(&[0.5, 0.25, 0.25], &[50, 25, 25]).unwrap();
        assert!(x.abs() < 1e-12 && (p - 1.0).abs() < 1e-12, "{x} {p}");
        // 60/40 against 50/50 over 100: (10² / 50) · 2 = 4, p = chi2.sf(4, 1) = 0.0455.
        let (x, p) = chi_square(&[0.5, 0.5], &[60, 40]).unwrap();
        assert!((x - 4.0).abs() < 1e-12);
        assert!((p - 0.045_500_263_896_358_4).abs() < 1e-9, "{p}");
        // A class the reference never predicted: large and finite.
        let (x, p) = chi_square(&[1.0, 0.0], &[90, 10]).unwrap();
        assert!(x.is_finite() && x > 5e3 && p < 1e-12, "{x} {p}");
        assert_eq!(chi_square(&[0.5, 0.5], &[0, 0]), None);
        assert_eq!(chi_square(&[1.0], &[5]), None);
    }

    #[test]
    fn moments_merge_into_the_moments_of_the_union() {
        let xs = [1.0, 4.0, -2.5, 8.0, 3.25, 0.0, 7.5];
        let mut all = Moments::default();
        xs.iter().for_each(|&x| all.push(x));
        let (mut a, mut b) = (Moments::default(), Moments::default());
        xs[..3].iter().for_each(|&x| a.push(x));
        xs[3..].iter().for_each(|&x| b.push(x));
        a.merge(&b);
        assert_eq!(a.count, 7);
        assert!((a.mean - all.mean).abs() < 1e-12);
        assert!((a.m2 - all.m2).abs() < 1e-9);
        assert_eq!((a.min, a.max), (Some(-2.5), Some(8.0)));
        let mean = xs.iter().sum::<f64>() / 7.0;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 7.0;
        assert!((all.variance().unwrap() - var).abs() < 1e-12);
        let mut empty = Moments::default();
        empty.merge(&all);
        assert_eq!(empty, all);
        all.push(f64::INFINITY);
        assert_eq!(all.count, 7, "non-finite values are not moments");
    }

    #[test]
    fn psi_is_zero_for_identical_and_large_for_disjoint_distributions() {
        assert!(psi(&[0.5, 0.5], &[50, 50]).abs() < 1e-12);
        assert_eq!(psi(&[0.5, 0.5], &[0, 0]), 0.0);
        // hand-computed: e = (0.5, 0.5), a = (0.9, 0.1)
        let expected = (0.9 - 0.5) * (0.9f64 / 0.5).ln() + (0.1 - 0.5) * (0.1f64 / 0.5).ln();
        assert!((psi(&[0.5, 0.5], &[90, 10]) - expected).abs() < 1e-12);
        assert!(psi(&[1.0, 0.0], &[0, 100]) > 10.0);
    }

    #[test]
    fn js_distance_is_bounded_and_symmetric_in_shape() {
        assert!(js_distance(&[0.25; 4], &[5, 5, 5, 5]).abs() < 1e-12);
        let disjoint = js_distance(&[1.0, 0.0], &[0, 10]);
        assert!((disjoint - 2f64.ln().sqrt()).abs() < 1e-12);
        // hand-computed: p = (0.5, 0.5), q = (0.9, 0.1), m = (0.7, 0.3)
        let kl = |p: [f64; 2], m: [f64; 2]| p[0] * (p[0] / m[0]).ln() + p[1] * (p[1] / m[1]).ln();
        let expected = ((kl([0.5, 0.5], [0.7, 0.3]) + kl([0.9, 0.1], [0.7, 0.3])) / 2.0).sqrt();
        assert!((js_distance(&[0.5, 0.5], &[9, 1]) - expected).abs() < 1e-12);
        assert_eq!(js_distance(&[0.5, 0.5], &[0, 0]), 0.0);
    }

    #[test]
    fn ks_reads_the_largest_cdf_gap_at_the_bin_boundaries() {
        assert_eq!(ks_statistic(&[0.0, 0.5, 0.5, 0.0], &[0, 0, 0, 0]), None);
        assert!(ks_statistic(&[0.0, 0.5, 0.5, 0.0], &[0, 5, 5, 0]).unwrap() < 1e-12);
        let d = ks_statistic(&[0.0, 0.5, 0.5, 0.0], &[0, 9, 1, 0]).unwrap();
        assert!((d - 0.4).abs() < 1e-12);
        assert_eq!(ks_statistic(&[0.0, 1.0, 0.0], &[0, 0, 7]), Some(1.0));
        assert_eq!(ks_error_bound(&[0.0, 0.2, 0.5, 0.3, 0.0]), 0.5);
    }

    #[test]
    fn kolmogorov_tail_matches_known_values() {
        // scipy.stats.kstwobign.sf at 0.5, 1.0, 1.36 and 2.0
        for (lambda, sf) in [
            (0.5, 0.963_945_243_664_875_1),
            (1.0, 0.269_999_671_677_354_56),
            (1.36, 0.049_485_876_755_377_876),
            (2.0, 0.000_670_925_255_779_695_3),
        ] {
            assert!((kolmogorov_sf(lambda) - sf).abs() < 1e-9, "{lambda}");
        }
        // both series agree where they meet
        assert!((kolmogorov_sf(0.999_999_9) - kolmogorov_sf(1.0)).abs() < 1e-6);
        assert_eq!(kolmogorov_sf(0.0), 1.0);
        assert_eq!(ks_p_value(0.5, 0, 10), 1.0);
    }

    #[test]
    fn wasserstein_of_a_shift_is_the_shift() {
        // Reference uniform on [0, 10) in 10 bins; the window is the same shifted by 1,
        // i.e. one bin: the transport cost is 1.
        let edges: Vec<f64> = (0..=10).map(f64::from).collect();
        let mut expected = vec![0.1; 12];
        expected[0] = 0.0;
        expected[11] = 0.0;
        let mut counts = vec![10u64; 12];
        counts[0] = 0;
        counts[1] = 0;
        counts[11] = 10;
        // the 10 inputs above 10 spread evenly over [10, 11]: 5 in summed distance
        let w = wasserstein(&edges, &expected, &counts, 0.0, 5.0).unwrap();
        assert!((w - 1.0).abs() < 1e-12, "{w}");
        let same: Vec<u64> = expected.iter().map(|e| (e * 100.0) as u64).collect();
        assert!(wasserstein(&edges, &expected, &same, 0.0, 0.0).unwrap() < 1e-12);
        assert_eq!(wasserstein(&edges, &expected, &[0; 12], 0.0, 0.0), None);
    }

    #[test]
    fn latency_buckets_and_quantiles() {
        assert_eq!(latency_bucket(0.01), 0);
        assert_eq!(latency_bucket(0.05), 0);
        assert_eq!(latency_bucket(0.07), 1);
        assert_eq!(latency_bucket(50_000.0), LATENCY_BOUNDS_MS.len());
        let mut buckets = vec![0u64; LATENCY_BOUNDS_MS.len() + 1];
        buckets[latency_bucket(0.3)] = 98;
        buckets[latency_bucket(40.0)] = 2;
        assert_eq!(latency_quantile(&buckets, 0.5), Some(0.5));
        assert_eq!(latency_quantile(&buckets, 0.99), Some(50.0));
        assert_eq!(latency_quantile(&[0; 3], 0.99), None);
    }

    #[test]
    fn page_hinkley_alarms_on_a_fall_in_confidence_and_not_on_noise() {
        let mut ph = PageHinkley::new(0.005, 5.0, 30);
        let mut noise = 0u64;
        let mut next = || {
            noise = noise.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((noise >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 0.1
        };
        for _ in 0..5000 {
            assert!(!ph.push(0.9 + next()), "steady confidence raised an alarm");
        }
        let fired = (1..=200).find(|_| ph.push(0.6 + next()));
        let after = fired.expect("a fall of 0.3 in confidence is detected");
        assert!(after <= 40, "detected after {after} values");
    }
}
