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
//! 0.25 a significant one. The Jensen–Shannon distance uses the same bins.
//!
//! Each feature also has a sketch: [`SKETCH_BINS`] finer quantile bins of the reference,
//! binned the same way. The Kolmogorov–Smirnov statistic and the Wasserstein distance are
//! read from it (see [`crate::stats`] for their definitions and error bound). Bin counts,
//! sketch counts, moments, the latency histogram and the confusion counts all add up, so
//! that merged windows give the scores of the union of their inputs
//! ([`WindowStats::rescore`]).

use serde::{Deserialize, Serialize};

use crate::stats::{self, LATENCY_BOUNDS_MS, Moments, PageHinkley};
pub use crate::stats::{PSI_EPSILON, psi};

/// Default number of fine quantile bins in each feature's sketch.
pub const SKETCH_BINS: usize = 100;
/// The PSI at which a feature is usually said to have drifted moderately.
pub const PSI_WARN: f64 = 0.1;
/// The PSI at which a feature is usually said to have drifted significantly.
pub const PSI_ALERT: f64 = 0.25;
/// Default number of inner quantile bins per feature.
pub const DEFAULT_BINS: usize = 10;

/// The name a regression model's predicted value is watched under, as a feature of its own
/// ([`ReferenceProfile::predicted_value`], [`WindowStats::predicted_value`]).
pub const PREDICTION_FEATURE: &str = "prediction";

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
    #[error("drift policy: `{field}` {reason}")]
    BadPolicy { field: &'static str, reason: String },
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
    /// Finer quantile edges ([`SKETCH_BINS`] bins) for the KS statistic and the
    /// Wasserstein distance; empty in profiles made before they existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sketch_edges: Vec<f64>,
    /// Reference fraction per sketch bin (underflow, inner bins, overflow).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sketch_fractions: Vec<f64>,
    /// Finite reference values (the KS p-value's reference sample size); 0 in older
    /// profiles, which then use the profile's row count.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub count: u64,
    /// A categorical feature: `edges` are then its categories (the distinct reference
    /// values, ascending) and there is one bin per category plus a last one, "other", for
    /// values the reference never had. No sketch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub categorical: bool,
}

/// Most categories a categorical feature may have.
pub const MAX_CATEGORIES: usize = 256;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

/// Significant digits a score keeps on the wire: scores are recomputed from the counts
/// wherever precision matters, and 17 digits of each would triple a summary's size.
pub const SCORE_DIGITS: i32 = 6;

/// `x` rounded to [`SCORE_DIGITS`] significant digits.
pub fn round_score(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(SCORE_DIGITS - x.abs().log10().ceil() as i32);
    let rounded = (x * scale).round() / scale;
    if rounded.is_finite() { rounded } else { x }
}

fn score<S: serde::Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_score(*x))
}

fn score_opt<S: serde::Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match x {
        Some(x) => s.serialize_some(&round_score(*x)),
        None => s.serialize_none(),
    }
}

impl FeatureReference {
    /// The reference of a numeric feature from its reference values: `bins` quantile bins
    /// and the finer sketch. Non-finite values are ignored; none finite is an error.
    pub fn numeric(name: &str, column: &[f64], bins: usize) -> Result<Self, DriftError> {
        if bins == 0 {
            return Err(DriftError::NoBins(bins));
        }
        let mut values: Vec<f64> = column.iter().copied().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return Err(DriftError::NoFiniteValues {
                feature: name.to_string(),
            });
        }
        values.sort_by(f64::total_cmp);
        let (edges, fractions) = binned(&values, bins);
        let (sketch_edges, sketch_fractions) = binned(&values, SKETCH_BINS.max(bins));
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Ok(FeatureReference {
            name: name.to_string(),
            fractions,
            edges,
            mean,
            std: var.sqrt(),
            sketch_edges,
            sketch_fractions,
            count: values.len() as u64,
            categorical: false,
        })
    }

    /// Index into `fractions`/counts for `x` (which must not be NaN).
    pub fn bin_of(&self, x: f64) -> usize {
        if self.categorical {
            // + 0.0 makes −0 the category 0.
            let x = x + 0.0;
            self.edges
                .binary_search_by(|c| c.total_cmp(&x))
                .unwrap_or(self.edges.len())
        } else {
            bin_index(&self.edges, x)
        }
    }

    pub fn bin_count(&self) -> usize {
        if self.categorical {
            self.edges.len() + 1
        } else {
            bin_count(&self.edges)
        }
    }

    /// Whether the profile has a sketch for this feature.
    pub fn has_sketch(&self) -> bool {
        !self.sketch_edges.is_empty()
    }

    fn validate(&self) -> Result<(), DriftError> {
        let bad = |reason: &str| DriftError::BadReference {
            feature: self.name.clone(),
            reason: reason.to_string(),
        };
        if self.categorical {
            if self.has_sketch() || !self.sketch_fractions.is_empty() {
                return Err(bad("a categorical feature has no sketch"));
            }
            if self.edges.len() > MAX_CATEGORIES {
                return Err(bad(&format!("more than {MAX_CATEGORIES} categories")));
            }
            return check_distribution(&self.edges, &self.fractions, self.edges.len() + 1)
                .map_err(|r| bad(&format!("categories: {r}")));
        }
        check_bins(&self.edges, &self.fractions).map_err(|r| bad(&format!("bins: {r}")))?;
        if self.has_sketch() || !self.sketch_fractions.is_empty() {
            check_bins(&self.sketch_edges, &self.sketch_fractions)
                .map_err(|r| bad(&format!("sketch: {r}")))?;
        }
        Ok(())
    }
}

/// Checks edges and fractions: ascending finite edges, one fraction per bin, a distribution.
fn check_bins(edges: &[f64], fractions: &[f64]) -> Result<(), &'static str> {
    check_distribution(edges, fractions, bin_count(edges))
}

/// Ascending finite edges (or categories), `bins` fractions, a distribution.
fn check_distribution(edges: &[f64], fractions: &[f64], bins: usize) -> Result<(), &'static str> {
    if edges.is_empty() {
        return Err("no bin edges");
    }
    if edges.iter().any(|e| !e.is_finite()) {
        return Err("a bin edge is not finite");
    }
    if edges.windows(2).any(|w| w[0] >= w[1]) {
        return Err("bin edges are not strictly ascending");
    }
    if fractions.len() != bins {
        return Err("fractions do not match the number of bins");
    }
    let sum: f64 = fractions.iter().sum();
    if fractions.iter().any(|f| !(0.0..=1.0).contains(f)) || (sum - 1.0).abs() > 1e-6 {
        return Err("fractions are not a distribution");
    }
    Ok(())
}

/// Quantile edges of sorted finite values and the share of the values in each bin.
fn binned(sorted: &[f64], bins: usize) -> (Vec<f64>, Vec<f64>) {
    let edges = quantile_edges(sorted, bins);
    let mut counts = vec![0u64; bin_count(&edges)];
    for &v in sorted {
        counts[bin_index(&edges, v)] += 1;
    }
    let n = sorted.len() as f64;
    (edges, counts.iter().map(|&c| c as f64 / n).collect())
}

/// Reference distributions of all input features, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceProfile {
    pub samples: u64,
    pub features: Vec<FeatureReference>,
    /// The share of the reference rows the model predicts as each class, by class index
    /// (what prediction drift compares a window's predictions with); empty when unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub predictions: Vec<f64>,
    /// A regression model's predicted value on the reference rows, binned as a numeric
    /// feature is (what prediction drift compares a window's predicted values with);
    /// `None` for a classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_value: Option<FeatureReference>,
}

impl ReferenceProfile {
    /// Records the model's predicted class for each reference row as the reference class
    /// histogram (`classes` classes; a class index beyond them is ignored).
    pub fn set_predictions(&mut self, predicted: impl IntoIterator<Item = usize>, classes: usize) {
        let mut counts = vec![0u64; classes];
        for class in predicted {
            if let Some(c) = counts.get_mut(class) {
                *c += 1;
            }
        }
        let total: u64 = counts.iter().sum();
        self.predictions = if total == 0 {
            Vec::new()
        } else {
            counts.iter().map(|&c| c as f64 / total as f64).collect()
        };
    }

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
            features.push(FeatureReference::numeric(name, column, bins)?);
            samples = samples.max(column.len() as u64);
        }
        Ok(ReferenceProfile {
            samples,
            features,
            predictions: Vec::new(),
            predicted_value: None,
        })
    }

    /// Records a regression model's predicted value for each reference row as the
    /// reference for prediction drift (binned as a numeric feature named `prediction`).
    pub fn set_predicted_values(&mut self, predicted: &[f64]) -> Result<(), DriftError> {
        self.predicted_value = Some(FeatureReference::numeric(
            PREDICTION_FEATURE,
            predicted,
            DEFAULT_BINS,
        )?);
        self.predictions.clear();
        Ok(())
    }

    /// Makes `feature` categorical, its categories the distinct finite values of `column`
    /// (its reference data): one bin each, plus "other" for values the reference never
    /// had. More than [`MAX_CATEGORIES`] distinct values is an error.
    pub fn set_categorical(&mut self, feature: &str, column: &[f64]) -> Result<(), DriftError> {
        let bad = |reason: String| DriftError::BadReference {
            feature: feature.to_string(),
            reason,
        };
        let reference = self
            .features
            .iter_mut()
            .find(|f| f.name == feature)
            .ok_or_else(|| bad("no such feature".into()))?;
        // + 0.0 makes −0 the category 0, as `bin_of` reads it.
        let mut values: Vec<f64> = column
            .iter()
            .filter(|v| v.is_finite())
            .map(|v| v + 0.0)
            .collect();
        if values.is_empty() {
            return Err(DriftError::NoFiniteValues {
                feature: feature.to_string(),
            });
        }
        values.sort_by(f64::total_cmp);
        let mut categories: Vec<f64> = values.clone();
        categories.dedup();
        if categories.len() > MAX_CATEGORIES {
            return Err(bad(format!(
                "{} distinct values; a categorical feature may have at most {MAX_CATEGORIES}",
                categories.len()
            )));
        }
        let mut counts = vec![0u64; categories.len() + 1];
        let mut at = 0;
        for v in &values {
            while categories[at] != *v {
                at += 1;
            }
            counts[at] += 1;
        }
        let n = values.len() as f64;
        reference.fractions = counts.iter().map(|&c| c as f64 / n).collect();
        reference.edges = categories;
        reference.sketch_edges.clear();
        reference.sketch_fractions.clear();
        reference.categorical = true;
        Ok(())
    }

    pub fn feature_names(&self) -> impl Iterator<Item = &str> {
        self.features.iter().map(|f| f.name.as_str())
    }

    /// Checks the internal consistency of a profile received from elsewhere.
    pub fn validate(&self) -> Result<(), DriftError> {
        self.features
            .iter()
            .chain(&self.predicted_value)
            .try_for_each(FeatureReference::validate)?;
        if self.predicted_value.is_some() && !self.predictions.is_empty() {
            return Err(DriftError::BadReference {
                feature: PREDICTION_FEATURE.into(),
                reason: "a profile holds a class histogram or a predicted value, not both".into(),
            });
        }
        Ok(())
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

/// Which score decides that a feature drifted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftMethod {
    /// PSI at or above `psi_alert`.
    #[default]
    Psi,
    /// Jensen–Shannon distance at or above `js`.
    Js,
    /// Normed Wasserstein distance at or above `wasserstein`.
    Wasserstein,
    /// KS p-value below `ks_alpha` divided by the number of features (Bonferroni).
    Ks,
}

/// When a feature and a window count as drifted. The defaults are the usual ones (and
/// Evidently's); a model's manifest may override them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftPolicy {
    pub method: DriftMethod,
    pub psi_warn: f64,
    pub psi_alert: f64,
    pub js: f64,
    pub wasserstein: f64,
    pub ks_alpha: f64,
    /// Share of the features that must drift for the window's dataset drift.
    pub dataset_share: f64,
    /// Page–Hinkley on the model's confidence: tolerated fall per input (δ), alarm level
    /// (λ), and the inputs seen before it may raise an alarm. `ph_lambda` 0 turns it off.
    pub ph_delta: f64,
    pub ph_lambda: f64,
    pub ph_min_samples: u64,
}

impl Default for DriftPolicy {
    fn default() -> Self {
        DriftPolicy {
            method: DriftMethod::Psi,
            psi_warn: PSI_WARN,
            psi_alert: PSI_ALERT,
            js: 0.1,
            wasserstein: 0.1,
            ks_alpha: 0.05,
            dataset_share: 0.5,
            ph_delta: 0.005,
            ph_lambda: 5.0,
            ph_min_samples: 30,
        }
    }
}

impl DriftPolicy {
    pub fn validate(&self) -> Result<(), DriftError> {
        let positive = |field: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(DriftError::BadPolicy {
                    field,
                    reason: format!("must be a positive number, got {v}"),
                })
            }
        };
        let share = |field: &'static str, v: f64| {
            if v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(DriftError::BadPolicy {
                    field,
                    reason: format!("must be in (0, 1], got {v}"),
                })
            }
        };
        positive("psi_warn", self.psi_warn)?;
        positive("psi_alert", self.psi_alert)?;
        if self.psi_warn > self.psi_alert {
            return Err(DriftError::BadPolicy {
                field: "psi_warn",
                reason: format!("{} is above psi_alert {}", self.psi_warn, self.psi_alert),
            });
        }
        positive("js", self.js)?;
        positive("wasserstein", self.wasserstein)?;
        share("ks_alpha", self.ks_alpha)?;
        share("dataset_share", self.dataset_share)?;
        if !(self.ph_delta.is_finite() && self.ph_delta >= 0.0) {
            return Err(DriftError::BadPolicy {
                field: "ph_delta",
                reason: format!("must be a number ≥ 0, got {}", self.ph_delta),
            });
        }
        if !(self.ph_lambda.is_finite() && self.ph_lambda >= 0.0) {
            return Err(DriftError::BadPolicy {
                field: "ph_lambda",
                reason: format!("must be a number ≥ 0 (0: off), got {}", self.ph_lambda),
            });
        }
        Ok(())
    }

    fn feature_drifted(&self, f: &FeatureWindow, features: usize) -> bool {
        match self.method {
            DriftMethod::Psi => f.psi >= self.psi_alert,
            DriftMethod::Js => f.js >= self.js,
            // A categorical feature has no distance between categories: JS decides.
            DriftMethod::Wasserstein => match (f.wasserstein, f.chi2_p) {
                (Some(w), _) => w >= self.wasserstein,
                (None, Some(_)) => f.js >= self.js,
                (None, None) => false,
            },
            // For a categorical feature, the chi-square test's p-value.
            DriftMethod::Ks => f
                .ks_p
                .or(f.chi2_p)
                .is_some_and(|p| p < self.ks_alpha / features.max(1) as f64),
        }
    }
}

/// Per-feature statistics of one finished window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureWindow {
    pub name: String,
    /// Counts per bin, in the profile's bin order (underflow, inner bins, overflow).
    pub counts: Vec<u64>,
    pub nan: u64,
    #[serde(serialize_with = "score")]
    pub psi: f64,
    /// Counts per sketch bin; empty when the profile has no sketch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sketch: Vec<u64>,
    /// Summed distances of the inputs below the sketch's first edge and above its last
    /// (for the Wasserstein distance outside the reference range).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub below: f64,
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub above: f64,
    #[serde(default)]
    pub moments: Moments,
    /// Jensen–Shannon distance on the PSI bins.
    #[serde(default, serialize_with = "score")]
    pub js: f64,
    /// KS statistic on the sketch, its asymptotic p-value, and how far the statistic may
    /// be below the exact one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub ks: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub ks_p: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub ks_error: Option<f64>,
    /// Wasserstein-1 distance on the sketch over the reference's standard deviation.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub wasserstein: Option<f64>,
    /// A categorical feature: the p-value of Pearson's chi-square test of its category
    /// counts against the reference's.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub chi2_p: Option<f64>,
    /// Whether the policy's score says this feature drifted.
    #[serde(default)]
    pub drifted: bool,
}

impl FeatureWindow {
    /// Adds another window of the same feature and bins: counts and moments add up; each
    /// score becomes the worse of the two until [`WindowStats::rescore`].
    fn merge(&mut self, other: &FeatureWindow) {
        let (a, b) = (self, other);
        add_counts(&mut a.counts, &b.counts);
        if a.sketch.len() == b.sketch.len() {
            add_counts(&mut a.sketch, &b.sketch);
            a.below += b.below;
            a.above += b.above;
        } else {
            // One side predates sketches: the merged sketch would not cover all inputs.
            a.sketch.clear();
            (a.below, a.above) = (0.0, 0.0);
        }
        a.nan = a.nan.saturating_add(b.nan);
        a.moments.merge(&b.moments);
        a.psi = a.psi.max(b.psi);
        a.js = a.js.max(b.js);
        a.ks = max_opt(a.ks, b.ks);
        a.ks_p = min_opt(a.ks_p, b.ks_p);
        a.chi2_p = min_opt(a.chi2_p, b.chi2_p);
        a.ks_error = max_opt(a.ks_error, b.ks_error);
        a.wasserstein = max_opt(a.wasserstein, b.wasserstein);
        a.drifted |= b.drifted;
    }

    /// Counts one finite value into the reference's bins, sketch and moments.
    #[inline]
    fn count(&mut self, reference: &FeatureReference, x: f64) {
        self.counts[reference.bin_of(x)] += 1;
        if !self.sketch.is_empty() {
            let edges = &reference.sketch_edges;
            let bin = bin_index(edges, x);
            self.sketch[bin] += 1;
            if bin == 0 {
                self.below += edges[0] - x;
            } else if bin == self.sketch.len() - 1 {
                self.above += x - edges[edges.len() - 1];
            }
        }
        self.moments.push(x);
    }

    /// An empty window of the feature `reference` describes.
    fn empty(reference: &FeatureReference) -> Self {
        FeatureWindow {
            name: reference.name.clone(),
            counts: vec![0; reference.bin_count()],
            sketch: if reference.has_sketch() {
                vec![0; bin_count(&reference.sketch_edges)]
            } else {
                Vec::new()
            },
            ..FeatureWindow::default()
        }
    }

    /// Inputs of this feature outside the reference range (the underflow and overflow
    /// bins).
    pub fn out_of_range(&self) -> u64 {
        match self.counts.as_slice() {
            [] => 0,
            [only] => *only,
            [first, .., last] => first.saturating_add(*last),
        }
    }

    /// Recomputes the scores from the counts.
    fn score(&mut self, reference: &FeatureReference, reference_count: u64) {
        self.psi = psi(&reference.fractions, &self.counts);
        self.js = stats::js_distance(&reference.fractions, &self.counts);
        let sketched =
            reference.has_sketch() && self.sketch.len() == reference.sketch_fractions.len();
        let observed: u64 = self.sketch.iter().sum();
        if sketched && observed > 0 {
            let d = stats::ks_statistic(&reference.sketch_fractions, &self.sketch);
            self.ks = d;
            self.ks_p = d.map(|d| stats::ks_p_value(d, reference_count, observed));
            self.ks_error = Some(stats::ks_error_bound(&reference.sketch_fractions));
            self.wasserstein = (reference.std > 0.0)
                .then(|| {
                    stats::wasserstein(
                        &reference.sketch_edges,
                        &reference.sketch_fractions,
                        &self.sketch,
                        self.below,
                        self.above,
                    )
                })
                .flatten()
                .map(|w| w / reference.std);
        } else {
            (self.ks, self.ks_p, self.ks_error, self.wasserstein) = (None, None, None, None);
        }
        self.chi2_p = if reference.categorical {
            stats::chi_square(&reference.fractions, &self.counts).map(|(_, p)| p)
        } else {
            None
        };
    }
}

/// The statistics of one finished window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowStats {
    pub samples: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub features: Vec<FeatureWindow>,
    /// Largest per-feature PSI, the window's headline drift figure.
    #[serde(serialize_with = "score")]
    pub psi_max: f64,
    /// Predicted class counts, by class index.
    pub predictions: Vec<u64>,
    /// Inferences that failed on a valid input (the model's fault, not the input's).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub errors: u64,
    /// Share of the features that drifted, and whether that makes the window's dataset
    /// drift under the policy.
    #[serde(default, serialize_with = "score")]
    pub drift_share: f64,
    #[serde(default)]
    pub dataset_drift: bool,
    /// Inference latency histogram: counts per bucket of
    /// [`LATENCY_BOUNDS_MS`](crate::stats::LATENCY_BOUNDS_MS), the last one slower.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_ms: Vec<u64>,
    /// Ground-truth labels received: `confusion[label][predicted]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
    /// Share of labelled predictions that were right; `None` without labels.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub accuracy: Option<f64>,
    /// Prediction drift: the window's predicted classes against the reference's (the
    /// profile's `predictions`): PSI, Jensen–Shannon distance and the chi-square test's
    /// p-value; `None` without a reference histogram or without predictions.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub prediction_psi: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub prediction_js: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub prediction_chi2_p: Option<f64>,
    /// Whether the policy's method says the predictions drifted (PSI and JS by their
    /// thresholds; Wasserstein by the JS threshold, as classes have no distance; KS by the
    /// chi-square p-value below `ks_alpha`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prediction_drift: bool,
    /// The Page–Hinkley test saw the model's confidence fall during this window (which
    /// then closed early).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub confidence_alert: bool,
    /// A regression model's predicted values, counted and scored as a feature against the
    /// profile's `predicted_value`; the prediction drift scores above are its PSI and JS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_value: Option<Box<FeatureWindow>>,
    /// A regression model's errors on the predictions whose true value arrived (the
    /// mergeable sums), and their mean absolute and root mean squared error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residuals: Option<Residuals>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub mae: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "score_opt"
    )]
    pub rmse: Option<f64>,
}

/// What a model predicted for one input, or the ground truth that arrived for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// A classifier's class index.
    Class(usize),
    /// A regression model's value.
    Value(f64),
}

impl Target {
    /// The number it is: the class index, or the value.
    pub fn number(self) -> f64 {
        match self {
            Target::Class(class) => class as f64,
            Target::Value(value) => value,
        }
    }
}

/// The errors (predicted − true) of labelled regression predictions, as sums that merge by
/// addition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Residuals {
    pub count: u64,
    /// Σ error: its mean is the model's bias.
    pub sum: f64,
    /// Σ |error|.
    pub sum_abs: f64,
    /// Σ error².
    pub sum_sq: f64,
}

impl Residuals {
    /// Adds one labelled prediction; a non-finite error is ignored (JSON cannot carry it).
    pub fn push(&mut self, predicted: f64, truth: f64) {
        let error = predicted - truth;
        if !error.is_finite() {
            return;
        }
        self.count += 1;
        self.sum += error;
        self.sum_abs += error.abs();
        self.sum_sq += error * error;
    }

    pub fn merge(&mut self, other: &Residuals) {
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        self.sum_abs += other.sum_abs;
        self.sum_sq += other.sum_sq;
    }

    /// Mean absolute error; `None` without labels.
    pub fn mae(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_abs / self.count as f64)
    }

    /// Root mean squared error; `None` without labels.
    pub fn rmse(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.sum_sq / self.count as f64).sqrt())
    }

    /// Mean error (predicted − true); `None` without labels.
    pub fn bias(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Why two windows cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("windows do not match: {0}")]
pub struct MergeError(String);

/// Adds `b` into `a` element by element, growing `a` as needed (saturating: counts come
/// from devices, and a hostile one must not overflow them).
fn add_counts(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.saturating_add(*y);
    }
}

impl WindowStats {
    /// Adds another window of the same reference profile: counts, moments, latencies and
    /// labels add up and the time span widens. Without the profile, each score becomes
    /// the worse of the two; [`WindowStats::rescore`] then computes the scores of the
    /// merged counts.
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
        match (&self.predicted_value, &other.predicted_value) {
            (Some(a), Some(b)) if a.counts.len() != b.counts.len() => {
                return Err(MergeError(format!(
                    "predicted values in {} bins against {}",
                    a.counts.len(),
                    b.counts.len()
                )));
            }
            (Some(_), None) if other.samples > 0 => {
                return Err(MergeError(
                    "a regression's window against a classifier's".into(),
                ));
            }
            (None, Some(_)) if self.samples > 0 => {
                return Err(MergeError(
                    "a classifier's window against a regression's".into(),
                ));
            }
            _ => {}
        }
        for (a, b) in self.features.iter_mut().zip(&other.features) {
            a.merge(b);
        }
        match (&mut self.predicted_value, &other.predicted_value) {
            (Some(a), Some(b)) => a.merge(b),
            (a @ None, Some(b)) => *a = Some(b.clone()),
            _ => {}
        }
        if let Some(b) = &other.residuals {
            self.residuals.get_or_insert_default().merge(b);
        }
        self.mae = self.residuals.as_ref().and_then(Residuals::mae);
        self.rmse = self.residuals.as_ref().and_then(Residuals::rmse);
        add_counts(&mut self.predictions, &other.predictions);
        self.errors = self.errors.saturating_add(other.errors);
        add_counts(&mut self.latency_ms, &other.latency_ms);
        if self.confusion.len() < other.confusion.len() {
            self.confusion.resize(other.confusion.len(), Vec::new());
        }
        for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
            add_counts(a, b);
        }
        self.accuracy = accuracy(&self.confusion);
        self.samples = self.samples.saturating_add(other.samples);
        self.start_ms = self.start_ms.min(other.start_ms);
        self.end_ms = self.end_ms.max(other.end_ms);
        self.psi_max = self.psi_max.max(other.psi_max);
        self.drift_share = self.drift_share.max(other.drift_share);
        self.dataset_drift |= other.dataset_drift;
        self.prediction_psi = max_opt(self.prediction_psi, other.prediction_psi);
        self.prediction_js = max_opt(self.prediction_js, other.prediction_js);
        self.prediction_chi2_p = min_opt(self.prediction_chi2_p, other.prediction_chi2_p);
        self.prediction_drift |= other.prediction_drift;
        self.confidence_alert |= other.confidence_alert;
        Ok(())
    }

    /// Recomputes every score from the counts against `profile` under `policy`: after a
    /// merge, the scores of the union of the merged windows' inputs.
    pub fn rescore(
        &mut self,
        profile: &ReferenceProfile,
        policy: &DriftPolicy,
    ) -> Result<(), MergeError> {
        if profile.features.len() != self.features.len() {
            return Err(MergeError(format!(
                "{} features against a profile of {}",
                self.features.len(),
                profile.features.len()
            )));
        }
        let n = self.features.len();
        let mut drifted = 0;
        for (f, reference) in self.features.iter_mut().zip(&profile.features) {
            if f.name != reference.name || f.counts.len() != reference.fractions.len() {
                return Err(MergeError(format!(
                    "feature `{}` does not match the profile's `{}`",
                    f.name, reference.name
                )));
            }
            let reference_count = if reference.count > 0 {
                reference.count
            } else {
                profile.samples
            };
            f.score(reference, reference_count);
            f.drifted = f.counts.iter().any(|&c| c > 0) && policy.feature_drifted(f, n);
            drifted += usize::from(f.drifted);
        }
        self.psi_max = self.features.iter().map(|f| f.psi).fold(0.0, f64::max);
        self.drift_share = if n == 0 {
            0.0
        } else {
            drifted as f64 / n as f64
        };
        self.dataset_drift = n > 0 && self.drift_share >= policy.dataset_share;
        self.score_predictions(&profile.predictions, policy);
        if let Some(reference) = &profile.predicted_value {
            let window = self
                .predicted_value
                .get_or_insert_with(|| Box::new(FeatureWindow::empty(reference)));
            if window.counts.len() != reference.fractions.len() {
                return Err(MergeError(format!(
                    "predicted values in {} bins against a profile of {}",
                    window.counts.len(),
                    reference.fractions.len()
                )));
            }
            self.score_predicted_values(reference, policy);
        }
        self.accuracy = accuracy(&self.confusion);
        self.mae = self.residuals.as_ref().and_then(Residuals::mae);
        self.rmse = self.residuals.as_ref().and_then(Residuals::rmse);
        Ok(())
    }

    /// Prediction drift of a regression model: its predicted values scored as a feature
    /// against the reference's, the window's prediction PSI and JS being that feature's.
    fn score_predicted_values(&mut self, reference: &FeatureReference, policy: &DriftPolicy) {
        let Some(window) = self.predicted_value.as_mut() else {
            return;
        };
        let reference_count = reference.count.max(1);
        window.score(reference, reference_count);
        let observed = window.counts.iter().any(|&c| c > 0);
        window.drifted = observed && policy.feature_drifted(window, 1);
        self.prediction_psi = observed.then_some(window.psi);
        self.prediction_js = observed.then_some(window.js);
        self.prediction_chi2_p = None;
        self.prediction_drift = window.drifted;
    }

    /// Prediction drift against the reference class histogram.
    fn score_predictions(&mut self, reference: &[f64], policy: &DriftPolicy) {
        let observed = self.predictions.iter().any(|&c| c > 0);
        if reference.is_empty() || !observed {
            self.prediction_psi = None;
            self.prediction_js = None;
            self.prediction_chi2_p = None;
            self.prediction_drift = false;
            return;
        }
        // A class index beyond the reference's counts as a class it never predicted.
        let classes = reference.len().max(self.predictions.len());
        let mut expected = reference.to_vec();
        expected.resize(classes, 0.0);
        let mut counts = self.predictions.clone();
        counts.resize(classes, 0);
        let psi = stats::psi(&expected, &counts);
        let js = stats::js_distance(&expected, &counts);
        let chi2_p = stats::chi_square(&expected, &counts).map(|(_, p)| p);
        self.prediction_psi = Some(psi);
        self.prediction_js = Some(js);
        self.prediction_chi2_p = chi2_p;
        self.prediction_drift = match policy.method {
            DriftMethod::Psi => psi >= policy.psi_alert,
            DriftMethod::Js | DriftMethod::Wasserstein => js >= policy.js,
            DriftMethod::Ks => chi2_p.is_some_and(|p| p < policy.ks_alpha),
        };
    }

    /// Labelled predictions in the window (class labels, or true values of a regression).
    pub fn labelled(&self) -> u64 {
        let classes: u64 = self.confusion.iter().flatten().sum();
        classes.saturating_add(self.residuals.map_or(0, |r| r.count))
    }

    /// The latency below which `q` of the window's inferences finished, in milliseconds
    /// (a bucket's upper bound).
    pub fn latency_quantile_ms(&self, q: f64) -> Option<f64> {
        stats::latency_quantile(&self.latency_ms, q)
    }
}

/// The smaller of two p-values (the stronger evidence of drift), or whichever exists.
fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

fn accuracy(confusion: &[Vec<u64>]) -> Option<f64> {
    let total: u64 = confusion.iter().flatten().sum();
    let right: u64 = confusion
        .iter()
        .enumerate()
        .map(|(i, row)| row.get(i).copied().unwrap_or(0))
        .sum();
    (total > 0).then(|| right as f64 / total as f64)
}

/// Counts live inputs into the reference bins until the window is finished.
#[derive(Debug, Clone)]
pub struct DriftWindow {
    profile: ReferenceProfile,
    policy: DriftPolicy,
    current: WindowStats,
    confidence: Option<PageHinkley>,
}

impl DriftWindow {
    pub fn new(profile: ReferenceProfile, start_ms: u64) -> Self {
        Self::with_policy(profile, DriftPolicy::default(), start_ms)
    }

    pub fn with_policy(profile: ReferenceProfile, policy: DriftPolicy, start_ms: u64) -> Self {
        let confidence = (policy.ph_lambda > 0.0)
            .then(|| PageHinkley::new(policy.ph_delta, policy.ph_lambda, policy.ph_min_samples));
        let current = Self::empty(&profile, start_ms);
        DriftWindow {
            profile,
            policy,
            current,
            confidence,
        }
    }

    fn empty(profile: &ReferenceProfile, start_ms: u64) -> WindowStats {
        WindowStats {
            start_ms,
            features: profile.features.iter().map(FeatureWindow::empty).collect(),
            predicted_value: profile
                .predicted_value
                .as_ref()
                .map(|p| Box::new(FeatureWindow::empty(p))),
            ..WindowStats::default()
        }
    }

    pub fn samples(&self) -> u64 {
        self.current.samples
    }

    /// When the window opened, in milliseconds since the Unix epoch.
    pub fn start_ms(&self) -> u64 {
        self.current.start_ms
    }

    pub fn policy(&self) -> &DriftPolicy {
        &self.policy
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
        for ((&x, reference), f) in row
            .iter()
            .zip(&self.profile.features)
            .zip(&mut self.current.features)
        {
            if x.is_nan() {
                f.nan += 1;
                continue;
            }
            f.count(reference, f64::from(x));
        }
        if let Some(class) = predicted_class {
            let predictions = &mut self.current.predictions;
            if predictions.len() <= class {
                predictions.resize(class + 1, 0);
            }
            predictions[class] += 1;
        }
        self.current.samples += 1;
        Ok(())
    }

    /// Counts inferences that failed on valid inputs.
    pub fn observe_errors(&mut self, n: u64) {
        self.current.errors += n;
    }

    /// Counts how long one inference took.
    pub fn observe_latency(&mut self, ms: f64) {
        let latency = &mut self.current.latency_ms;
        if latency.is_empty() {
            latency.resize(LATENCY_BOUNDS_MS.len() + 1, 0);
        }
        latency[stats::latency_bucket(ms)] += 1;
    }

    /// Counts a regression model's predicted value for the input last observed (a model
    /// without a reference of predicted values, a classifier, ignores it).
    pub fn observe_value(&mut self, value: f64) {
        if let (Some(reference), Some(window)) = (
            self.profile.predicted_value.as_ref(),
            self.current.predicted_value.as_mut(),
        ) {
            if value.is_nan() {
                window.nan += 1;
            } else {
                window.count(reference, value);
            }
        }
    }

    /// Counts the true value that arrived for a regression model's prediction.
    pub fn observe_residual(&mut self, predicted: f64, truth: f64) {
        self.current
            .residuals
            .get_or_insert_default()
            .push(predicted, truth);
    }

    /// Counts a ground-truth label for a prediction.
    pub fn observe_label(&mut self, label: usize, predicted: usize) {
        let confusion = &mut self.current.confusion;
        let size = confusion.len().max(label + 1).max(predicted + 1);
        confusion.resize(size, Vec::new());
        for row in confusion.iter_mut() {
            row.resize(size, 0);
        }
        confusion[label][predicted] += 1;
    }

    /// Feeds the model's confidence in one prediction (its top score) to the Page–Hinkley
    /// test; true when the confidence has fallen, and the window should close now.
    pub fn observe_confidence(&mut self, confidence: f64) -> bool {
        let fired = self
            .confidence
            .as_mut()
            .is_some_and(|ph| ph.push(confidence));
        self.current.confidence_alert |= fired;
        fired
    }

    /// Closes the window at `end_ms`, returns its statistics and starts the next window.
    pub fn finish(&mut self, end_ms: u64) -> WindowStats {
        let next = Self::empty(&self.profile, end_ms);
        let mut stats = std::mem::replace(&mut self.current, next);
        stats.end_ms = end_ms;
        stats
            .rescore(&self.profile, &self.policy)
            .expect("a window matches its own profile");
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
                ..FeatureWindow::default()
            }],
            psi_max: psi,
            predictions,
            ..WindowStats::default()
        }
    }

    #[test]
    fn scores_keep_six_significant_digits_on_the_wire() {
        assert_eq!(round_score(0.123456789), 0.123457);
        assert_eq!(round_score(12.3456789), 12.3457);
        assert_eq!(round_score(1.234567e-30), 1.23457e-30);
        assert_eq!(round_score(0.0), 0.0);
        assert_eq!(round_score(-0.5), -0.5);
        let window = FeatureWindow {
            psi: 0.0123456789,
            ks_p: Some(0.987654321),
            ..FeatureWindow::default()
        };
        let json = serde_json::to_string(&window).unwrap();
        assert!(json.contains("\"psi\":0.0123457"), "{json}");
        assert!(json.contains("\"ks_p\":0.987654"), "{json}");
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

    #[test]
    fn predictions_drift_against_the_reference_class_histogram() {
        let mut profile = profile_of((0..1000).map(f64::from).collect());
        // The model predicts class 1 for one reference row in ten.
        profile.set_predictions((0..1000).map(|i| usize::from(i % 10 == 0)), 2);
        assert_eq!(profile.predictions, [0.9, 0.1]);
        // Windows of 200 inputs from the reference range, one class in `every` a fault.
        let window = |every: usize, method: DriftMethod| {
            let policy = DriftPolicy {
                method,
                ..DriftPolicy::default()
            };
            let mut w = DriftWindow::with_policy(profile.clone(), policy, 0);
            for i in 0..200 {
                w.observe(&[(i * 5) as f32], Some(usize::from(i % every == 0)))
                    .unwrap();
            }
            w.finish(1)
        };
        for method in [
            DriftMethod::Psi,
            DriftMethod::Js,
            DriftMethod::Wasserstein,
            DriftMethod::Ks,
        ] {
            let same = window(10, method);
            assert_eq!(same.predictions, [180, 20]);
            assert!(same.prediction_psi.unwrap() < 1e-9, "{same:?}");
            assert!(same.prediction_js.unwrap() < 1e-9);
            assert!((same.prediction_chi2_p.unwrap() - 1.0).abs() < 1e-9);
            assert!(!same.prediction_drift, "{method:?}");
            // Half the predictions are faults: every method sees it.
            let shifted = window(2, method);
            assert!(shifted.prediction_psi.unwrap() > 0.25, "{shifted:?}");
            assert!(shifted.prediction_js.unwrap() > 0.1);
            assert!(shifted.prediction_chi2_p.unwrap() < 1e-6);
            assert!(shifted.prediction_drift, "{method:?}");
            // On the wire, and back.
            let json = serde_json::to_string(&shifted).unwrap();
            assert!(json.contains("\"prediction_drift\":true"), "{json}");
            let back: WindowStats = serde_json::from_str(&json).unwrap();
            assert_eq!(back.prediction_drift, shifted.prediction_drift);
        }
        // Without a reference histogram there is no prediction drift to speak of.
        let mut plain = DriftWindow::new(profile_of((0..1000).map(f64::from).collect()), 0);
        plain.observe(&[1.0], Some(1)).unwrap();
        let plain = plain.finish(1);
        assert_eq!(
            (plain.prediction_psi, plain.prediction_drift),
            (None, false)
        );
        assert!(
            !serde_json::to_string(&plain)
                .unwrap()
                .contains("prediction_")
        );
    }

    #[test]
    fn categorical_features_count_categories_and_take_the_chi_square_test() {
        // `site` takes the codes 0, 1, 2 in the reference, half, 30 % and 20 % of rows.
        let site: Vec<f64> = (0..1000)
            .map(|i| match i % 10 {
                0..5 => 0.0,
                5..8 => 1.0,
                _ => 2.0,
            })
            .collect();
        let level: Vec<f64> = (0..1000).map(f64::from).collect();
        let names = ["site".to_string(), "level".to_string()];
        let mut profile =
            ReferenceProfile::from_columns(&names, &[site.clone(), level], DEFAULT_BINS).unwrap();
        profile.set_categorical("site", &site).unwrap();
        let f = &profile.features[0];
        assert!(f.categorical && !f.has_sketch());
        assert_eq!(f.edges, [0.0, 1.0, 2.0]);
        assert_eq!(f.fractions, [0.5, 0.3, 0.2, 0.0]);
        assert_eq!((f.bin_of(1.0), f.bin_of(7.0), f.bin_of(0.5)), (1, 3, 3));
        assert_eq!(f.bin_of(-0.0), 0, "−0 is the category 0");
        let mut signed = profile.clone();
        signed.set_categorical("site", &[-0.0, 0.0, 1.0]).unwrap();
        assert_eq!(signed.features[0].edges, [0.0, 1.0]);
        assert_eq!(signed.features[0].fractions[0], 2.0 / 3.0);
        profile.validate().unwrap();
        let json = serde_json::to_string(&profile).unwrap();
        assert_eq!(
            serde_json::from_str::<ReferenceProfile>(&json).unwrap(),
            profile
        );

        let window = |codes: &dyn Fn(usize) -> f32, method: DriftMethod| {
            let policy = DriftPolicy {
                method,
                ..DriftPolicy::default()
            };
            let mut w = DriftWindow::with_policy(profile.clone(), policy, 0);
            for i in 0..400 {
                w.observe(&[codes(i), (i * 2) as f32], Some(0)).unwrap();
            }
            w.finish(1)
        };
        let same = |i: usize| [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0][i % 10];
        // Mostly code 2 now, and a code the reference never had.
        let shifted = |i: usize| [2.0, 2.0, 2.0, 2.0, 7.0, 1.0, 0.0, 2.0, 2.0, 7.0][i % 10];
        for method in [
            DriftMethod::Psi,
            DriftMethod::Js,
            DriftMethod::Wasserstein,
            DriftMethod::Ks,
        ] {
            let w = window(&same, method);
            let site = &w.features[0];
            assert_eq!(site.counts, [200, 120, 80, 0]);
            assert!(site.sketch.is_empty() && site.ks.is_none() && site.wasserstein.is_none());
            // Only the floored "other" bin keeps the statistic above 0.
            assert!(site.chi2_p.unwrap() > 0.99, "{site:?}");
            assert!(!site.drifted, "{method:?}");
            assert_eq!(
                w.features[1].chi2_p, None,
                "a numeric feature has no chi-square"
            );
            let w = window(&shifted, method);
            let site = &w.features[0];
            assert_eq!(site.counts, [40, 40, 240, 80]);
            assert!(site.chi2_p.unwrap() < 1e-12, "{site:?}");
            assert!(site.drifted, "{method:?}: {site:?}");
        }
        // Tampered or too many categories: refused, naming the feature.
        let mut bad = profile.clone();
        bad.features[0].fractions.pop();
        assert!(
            matches!(bad.validate(), Err(DriftError::BadReference { feature, .. }) if feature == "site")
        );
        let many: Vec<f64> = (0..=MAX_CATEGORIES).map(|i| i as f64).collect();
        let err = profile.clone().set_categorical("level", &many).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        assert!(profile.clone().set_categorical("nope", &site).is_err());
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
