//! Drift statistics: a reference profile computed from reference data at publish time,
//! a window that counts live inputs into the same bins, and the Population Stability Index.
//!
//! Binning: each numeric feature has `k` quantile bins over the reference data's range
//! (`edges` holds `k + 1` ascending values, the first the reference minimum and the last
//! the maximum) plus an underflow bin before them and an overflow bin after them, so
//! `k + 2` counts in all (a constant feature has one edge and one inner bin holding
//! exactly that value). Bin `i` (1-based among the inner bins) holds
//! `edges[i-1] <= x < edges[i]`; the last inner bin also holds `x == max`. NaN is counted
//! apart and never binned.
//!
//! PSI follows the usual definition (and Evidently's smoothing): with `e` and `a` the
//! expected and actual bin fractions, each floored at [`PSI_EPSILON`],
//! `PSI = Σ (a − e) · ln(a / e)`. Below 0.1 is stable, 0.1–0.25 a moderate shift, above
//! 0.25 a significant one.

use serde::{Deserialize, Serialize};

/// Floor for empty bins, so that an empty bin does not make PSI infinite.
pub const PSI_EPSILON: f64 = 1e-4;
/// The PSI at which a feature is usually said to have drifted moderately.
pub const PSI_WARN: f64 = 0.1;
/// The PSI at which a feature is usually said to have drifted significantly.
pub const PSI_ALERT: f64 = 0.25;
/// Default number of inner quantile bins per feature.
pub const DEFAULT_BINS: usize = 10;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DriftError {
    #[error("reference data has {columns} columns but {names} feature names")]
    NamesMismatch { names: usize, columns: usize },
    #[error("reference data for feature `{feature}` has no finite values")]
    NoFiniteValues { feature: String },
    #[error("at least one bin is needed, got {0}")]
    NoBins(usize),
    #[error("a row has {got} values but the profile has {expected} features")]
    WrongWidth { expected: usize, got: usize },
    #[error("reference for feature `{feature}` is inconsistent: {reason}")]
    BadReference { feature: String, reason: String },
}

/// The reference distribution of one numeric input feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureReference {
    pub name: String,
    /// Ascending bin edges over the reference range (`k + 1` values for `k` inner bins).
    pub edges: Vec<f64>,
    /// Reference fraction per bin: underflow, the `k` inner bins, overflow (`k + 2` values).
    pub fractions: Vec<f64>,
    pub mean: f64,
    pub std: f64,
}

impl FeatureReference {
    /// Index into `fractions`/counts for `x` (which must not be NaN).
    pub fn bin_of(&self, x: f64) -> usize {
        bin_index(&self.edges, x)
    }

    pub fn bin_count(&self) -> usize {
        bin_count(&self.edges)
    }

    fn validate(&self) -> Result<(), DriftError> {
        let bad = |reason: &str| DriftError::BadReference {
            feature: self.name.clone(),
            reason: reason.to_string(),
        };
        if self.edges.is_empty() {
            return Err(bad("no bin edges"));
        }
        if self.edges.iter().any(|e| !e.is_finite()) {
            return Err(bad("a bin edge is not finite"));
        }
        if self.edges.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("bin edges are not strictly ascending"));
        }
        if self.fractions.len() != self.bin_count() {
            return Err(bad("fractions do not match the number of bins"));
        }
        let sum: f64 = self.fractions.iter().sum();
        if self.fractions.iter().any(|f| !(0.0..=1.0).contains(f)) || (sum - 1.0).abs() > 1e-6 {
            return Err(bad("fractions are not a distribution"));
        }
        Ok(())
    }
}

/// Reference distributions of all input features, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceProfile {
    pub samples: u64,
    pub features: Vec<FeatureReference>,
}

impl ReferenceProfile {
    /// Computes the profile from reference data given column by column.
    /// Non-finite values are ignored; a column without any finite value is an error.
    pub fn from_columns(
        names: &[String],
        columns: &[Vec<f64>],
        bins: usize,
    ) -> Result<Self, DriftError> {
        if names.len() != columns.len() {
            return Err(DriftError::NamesMismatch {
                names: names.len(),
                columns: columns.len(),
            });
        }
        if bins == 0 {
            return Err(DriftError::NoBins(bins));
        }
        let mut features = Vec::with_capacity(names.len());
        let mut samples = 0;
        for (name, column) in names.iter().zip(columns) {
            let mut values: Vec<f64> = column.iter().copied().filter(|v| v.is_finite()).collect();
            if values.is_empty() {
                return Err(DriftError::NoFiniteValues {
                    feature: name.clone(),
                });
            }
            values.sort_by(f64::total_cmp);
            let edges = quantile_edges(&values, bins);
            let mut counts = vec![0u64; bin_count(&edges)];
            for &v in &values {
                counts[bin_index(&edges, v)] += 1;
            }
            let n = values.len() as f64;
            let mean = values.iter().sum::<f64>() / n;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            samples = samples.max(column.len() as u64);
            features.push(FeatureReference {
                name: name.clone(),
                fractions: counts.iter().map(|&c| c as f64 / n).collect(),
                edges,
                mean,
                std: var.sqrt(),
            });
        }
        Ok(ReferenceProfile { samples, features })
    }

    pub fn feature_names(&self) -> impl Iterator<Item = &str> {
        self.features.iter().map(|f| f.name.as_str())
    }

    /// Checks the internal consistency of a profile received from elsewhere.
    pub fn validate(&self) -> Result<(), DriftError> {
        self.features
            .iter()
            .try_for_each(FeatureReference::validate)
    }
}

/// `k + 1` edges at the quantiles `0, 1/k, …, 1` of sorted `values`, duplicates removed
/// (a discrete feature gets fewer, wider bins). A constant feature gets a single edge.
fn quantile_edges(sorted: &[f64], bins: usize) -> Vec<f64> {
    let last = (sorted.len() - 1) as f64;
    let mut edges: Vec<f64> = (0..=bins)
        .map(|i| {
            let pos = last * i as f64 / bins as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        })
        .collect();
    edges.dedup_by(|a, b| a <= b);
    edges
}

/// Number of bins for the given edges: underflow, the inner bins, overflow. A single edge
/// (a constant reference feature) has one inner bin holding exactly that value.
pub fn bin_count(edges: &[f64]) -> usize {
    edges.len().max(2) + 1
}

/// Bin index of `x` for the given edges: 0 is underflow, `bin_count(edges) - 1` overflow.
pub fn bin_index(edges: &[f64], x: f64) -> usize {
    let first = edges[0];
    let last = edges[edges.len() - 1];
    if x < first {
        0
    } else if x > last {
        bin_count(edges) - 1
    } else if edges.len() == 1 {
        1
    } else {
        // number of edges <= x, clamped so that x == max lands in the last inner bin
        edges.partition_point(|&e| e <= x).min(edges.len() - 1)
    }
}

/// Population Stability Index between reference fractions and observed counts.
/// Returns 0 when nothing was observed.
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

/// Per-feature statistics of one finished window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureWindow {
    pub name: String,
    /// Counts per bin, in the profile's bin order (underflow, inner bins, overflow).
    pub counts: Vec<u64>,
    pub nan: u64,
    pub psi: f64,
}

/// The statistics of one finished window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowStats {
    pub samples: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub features: Vec<FeatureWindow>,
    /// Largest per-feature PSI, the window's headline drift figure.
    pub psi_max: f64,
    /// Predicted class counts, by class index.
    pub predictions: Vec<u64>,
}

/// Why two windows cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("windows do not match: {0}")]
pub struct MergeError(String);

impl WindowStats {
    /// Adds another window of the same reference profile: counts add up, the time span
    /// widens, and each PSI figure becomes the larger of the two (an aggregate's PSI is the
    /// worst of its windows; its merged counts let PSI be recomputed against the reference).
    pub fn merge(&mut self, other: &WindowStats) -> Result<(), MergeError> {
        if self.features.len() != other.features.len() {
            return Err(MergeError(format!(
                "{} features against {}",
                self.features.len(),
                other.features.len()
            )));
        }
        for (a, b) in self.features.iter().zip(&other.features) {
            if a.name != b.name || a.counts.len() != b.counts.len() {
                return Err(MergeError(format!(
                    "feature `{}` with {} bins against `{}` with {}",
                    a.name,
                    a.counts.len(),
                    b.name,
                    b.counts.len()
                )));
            }
        }
        for (a, b) in self.features.iter_mut().zip(&other.features) {
            // Saturating: counts come from devices, and a hostile one must not overflow them.
            for (x, y) in a.counts.iter_mut().zip(&b.counts) {
                *x = x.saturating_add(*y);
            }
            a.nan = a.nan.saturating_add(b.nan);
            a.psi = a.psi.max(b.psi);
        }
        if self.predictions.len() < other.predictions.len() {
            self.predictions.resize(other.predictions.len(), 0);
        }
        for (x, y) in self.predictions.iter_mut().zip(&other.predictions) {
            *x = x.saturating_add(*y);
        }
        self.samples = self.samples.saturating_add(other.samples);
        self.start_ms = self.start_ms.min(other.start_ms);
        self.end_ms = self.end_ms.max(other.end_ms);
        self.psi_max = self.psi_max.max(other.psi_max);
        Ok(())
    }
}

/// Counts live inputs into the reference bins until the window is finished.
#[derive(Debug, Clone)]
pub struct DriftWindow {
    profile: ReferenceProfile,
    counts: Vec<Vec<u64>>,
    nan: Vec<u64>,
    predictions: Vec<u64>,
    samples: u64,
    start_ms: u64,
}

impl DriftWindow {
    pub fn new(profile: ReferenceProfile, start_ms: u64) -> Self {
        let counts = profile
            .features
            .iter()
            .map(|f| vec![0; f.bin_count()])
            .collect();
        let nan = vec![0; profile.features.len()];
        DriftWindow {
            profile,
            counts,
            nan,
            predictions: Vec::new(),
            samples: 0,
            start_ms,
        }
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// When the window opened, in milliseconds since the Unix epoch.
    pub fn start_ms(&self) -> u64 {
        self.start_ms
    }

    /// Adds one input row and the class the model predicted for it, if any.
    pub fn observe(
        &mut self,
        row: &[f32],
        predicted_class: Option<usize>,
    ) -> Result<(), DriftError> {
        if row.len() != self.profile.features.len() {
            return Err(DriftError::WrongWidth {
                expected: self.profile.features.len(),
                got: row.len(),
            });
        }
        for (i, (&x, feature)) in row.iter().zip(&self.profile.features).enumerate() {
            if x.is_nan() {
                self.nan[i] += 1;
            } else {
                self.counts[i][feature.bin_of(f64::from(x))] += 1;
            }
        }
        if let Some(class) = predicted_class {
            if self.predictions.len() <= class {
                self.predictions.resize(class + 1, 0);
            }
            self.predictions[class] += 1;
        }
        self.samples += 1;
        Ok(())
    }

    /// Closes the window at `end_ms`, returns its statistics and starts the next window.
    pub fn finish(&mut self, end_ms: u64) -> WindowStats {
        let features: Vec<FeatureWindow> = self
            .profile
            .features
            .iter()
            .zip(&mut self.counts)
            .zip(&mut self.nan)
            .map(|((reference, counts), nan)| {
                let counts = std::mem::replace(counts, vec![0; reference.bin_count()]);
                FeatureWindow {
                    name: reference.name.clone(),
                    psi: psi(&reference.fractions, &counts),
                    counts,
                    nan: std::mem::take(nan),
                }
            })
            .collect();
        let stats = WindowStats {
            samples: self.samples,
            start_ms: self.start_ms,
            end_ms,
            psi_max: features.iter().map(|f| f.psi).fold(0.0, f64::max),
            features,
            predictions: std::mem::take(&mut self.predictions),
        };
        self.samples = 0;
        self.start_ms = end_ms;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(counts: Vec<u64>, psi: f64, start: u64, predictions: Vec<u64>) -> WindowStats {
        WindowStats {
            samples: counts.iter().sum(),
            start_ms: start,
            end_ms: start + 10,
            features: vec![FeatureWindow {
                name: "x".into(),
                counts,
                nan: 1,
                psi,
            }],
            psi_max: psi,
            predictions,
        }
    }

    #[test]
    fn windows_merge_into_an_aggregate() {
        let mut a = stats(vec![1, 2, 3], 0.1, 100, vec![6]);
        a.merge(&stats(vec![4, 0, 1], 0.4, 50, vec![2, 3])).unwrap();
        assert_eq!(a.features[0].counts, [5, 2, 4]);
        assert_eq!(a.features[0].nan, 2);
        assert_eq!(a.samples, 11);
        assert_eq!((a.start_ms, a.end_ms), (50, 110));
        assert_eq!(a.psi_max, 0.4);
        assert_eq!(a.predictions, [8, 3]);
        assert!(a.merge(&stats(vec![1, 2], 0.0, 0, vec![])).is_err());
        let mut other = stats(vec![1, 2, 3], 0.0, 0, vec![]);
        other.features[0].name = "y".into();
        assert!(a.merge(&other).is_err());
        assert_eq!(a.samples, 11, "a failed merge changes nothing");
    }

    /// A small deterministic generator so tests need no rand crate.
    struct Lcg(u64);
    impl Lcg {
        fn uniform(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn profile_of(values: Vec<f64>) -> ReferenceProfile {
        ReferenceProfile::from_columns(&["x".to_string()], &[values], DEFAULT_BINS).unwrap()
    }

    #[test]
    fn bins_put_boundaries_in_the_upper_bin_and_the_maximum_in_the_last_inner_bin() {
        let edges = [0.0, 1.0, 2.0];
        assert_eq!(bin_index(&edges, -0.1), 0);
        assert_eq!(bin_index(&edges, 0.0), 1);
        assert_eq!(bin_index(&edges, 0.5), 1);
        assert_eq!(bin_index(&edges, 1.0), 2);
        assert_eq!(bin_index(&edges, 2.0), 2);
        assert_eq!(bin_index(&edges, 2.5), 3);
        assert_eq!(bin_index(&[5.0], 5.0), 1);
        assert_eq!(bin_index(&[5.0], 4.0), 0);
        assert_eq!(bin_index(&[5.0], 6.0), 2);
    }

    #[test]
    fn reference_bins_hold_equal_shares_of_the_reference_data() {
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let p = profile_of(values);
        let f = &p.features[0];
        assert_eq!(f.edges.len(), 11);
        assert_eq!(f.fractions.len(), 12);
        assert_eq!(f.fractions[0], 0.0);
        assert_eq!(f.fractions[11], 0.0);
        for share in &f.fractions[1..11] {
            assert!((share - 0.1).abs() < 0.002, "{share}");
        }
        assert!((f.mean - 499.5).abs() < 1e-9);
        p.validate().unwrap();
    }

    #[test]
    fn a_discrete_or_constant_feature_gets_fewer_bins() {
        let p = profile_of(vec![1.0, 1.0, 1.0, 2.0, 2.0, 3.0]);
        assert!(p.features[0].edges.windows(2).all(|w| w[0] < w[1]));
        p.validate().unwrap();
        let c = profile_of(vec![7.0; 20]);
        assert_eq!(c.features[0].edges, vec![7.0]);
        assert_eq!(c.features[0].fractions, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn reference_errors_name_the_problem() {
        assert_eq!(
            ReferenceProfile::from_columns(&["a".into()], &[vec![f64::NAN]], 10),
            Err(DriftError::NoFiniteValues {
                feature: "a".into()
            })
        );
        assert_eq!(
            ReferenceProfile::from_columns(&["a".into()], &[], 10),
            Err(DriftError::NamesMismatch {
                names: 1,
                columns: 0
            })
        );
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
    fn a_window_from_the_reference_distribution_is_stable_and_a_shifted_one_drifts() {
        let mut rng = Lcg(42);
        let reference: Vec<f64> = (0..5000).map(|_| rng.uniform() * 10.0).collect();
        let profile = profile_of(reference);
        let mut window = DriftWindow::new(profile, 1_000);
        for _ in 0..2000 {
            window
                .observe(&[(rng.uniform() * 10.0) as f32], Some(0))
                .unwrap();
        }
        let same = window.finish(2_000);
        assert_eq!(same.samples, 2000);
        assert_eq!((same.start_ms, same.end_ms), (1_000, 2_000));
        assert_eq!(same.predictions, vec![2000]);
        assert!(same.psi_max < PSI_WARN, "{}", same.psi_max);
        assert_eq!(same.features[0].counts.iter().sum::<u64>(), 2000);

        for _ in 0..2000 {
            window
                .observe(&[(rng.uniform() * 10.0 + 4.0) as f32], Some(1))
                .unwrap();
        }
        let shifted = window.finish(3_000);
        assert_eq!(shifted.start_ms, 2_000);
        assert_eq!(shifted.predictions, vec![0, 2000]);
        assert!(shifted.psi_max > PSI_ALERT, "{}", shifted.psi_max);
        assert!(
            shifted.features[0].counts[11] > 700,
            "overflow bin catches the shift"
        );
    }

    #[test]
    fn nan_is_counted_apart_and_wrong_width_is_refused() {
        let mut window = DriftWindow::new(profile_of((0..100).map(f64::from).collect()), 0);
        window.observe(&[f32::NAN], None).unwrap();
        window.observe(&[3.0], None).unwrap();
        assert_eq!(
            window.observe(&[1.0, 2.0], None),
            Err(DriftError::WrongWidth {
                expected: 1,
                got: 2
            })
        );
        let stats = window.finish(1);
        assert_eq!(stats.samples, 2);
        assert_eq!(stats.features[0].nan, 1);
        assert_eq!(stats.features[0].counts.iter().sum::<u64>(), 1);
    }

    #[test]
    fn validate_refuses_inconsistent_profiles() {
        let mut p = profile_of((0..100).map(f64::from).collect());
        p.features[0].fractions.pop();
        assert!(matches!(p.validate(), Err(DriftError::BadReference { .. })));
        let mut p = profile_of((0..100).map(f64::from).collect());
        p.features[0].edges.swap(0, 1);
        assert!(matches!(p.validate(), Err(DriftError::BadReference { .. })));
    }
}
