//! The quality and bias gate. A candidate model and the current one both run with tract on
//! a labelled holdout; the candidate passes if its metric is no worse than the current
//! model's less a tolerance, and no segment of the holdout (a column such as device group
//! or board, or quantile buckets of a feature) falls below a parity bound relative to the
//! candidate's overall figure. Evaluation reads files and runs models; [`judge`] is pure.
//!
//! A model of feature rows is judged on a CSV holdout; a tensor model (images, sequences)
//! on an NPY holdout of records `x` and `label`, the format of the devices' samples
//! ([`edgeloop_shared::npy`]), so a labelled dataset of theirs is a holdout as it is.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use edgeloop_agent::runtime::{Plan, RuntimeError};
use serde::{Deserialize, Serialize};

/// Segments with fewer holdout rows than this are reported but not judged: their figure is
/// noise.
pub const DEFAULT_MIN_SEGMENT_ROWS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("holdout {path}: {message}")]
    Holdout { path: String, message: String },
    #[error("holdout {row}: {message}")]
    Row { row: RowAt, message: String },
    #[error("the holdout has no rows")]
    Empty,
    #[error("model: {0}")]
    Model(#[from] RuntimeError),
    #[error("invalid gate policy: {0}")]
    Policy(String),
}

/// The figure a model is judged by: accuracy or F1 for a classifier (higher is better),
/// mean absolute or root mean squared error for a regression (lower is better).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Share of rows whose predicted class is the label.
    #[default]
    Accuracy,
    /// F1 averaged over the classes that occur as label or prediction (macro F1).
    F1,
    /// Mean absolute error of a regression's predicted values.
    Mae,
    /// Root mean squared error of a regression's predicted values.
    Rmse,
}

impl Metric {
    /// Whether the metric judges a regression (an error: lower is better).
    pub fn is_regression(self) -> bool {
        matches!(self, Metric::Mae | Metric::Rmse)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::Mae => "mae",
            Metric::Rmse => "rmse",
        })
    }
}

impl std::str::FromStr for Metric {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "accuracy" => Ok(Metric::Accuracy),
            "f1" => Ok(Metric::F1),
            "mae" => Ok(Metric::Mae),
            "rmse" => Ok(Metric::Rmse),
            other => Err(format!(
                "`{other}`: expected accuracy or f1 (classifiers), mae or rmse (regressions)"
            )),
        }
    }
}

/// How the holdout is cut into segments for the bias check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Segments {
    /// The values of a holdout column that is not a model feature (device group, board,
    /// site): one segment per value.
    Column(String),
    /// A model feature cut into `buckets` equal-count buckets.
    Buckets { feature: String, buckets: usize },
}

impl std::str::FromStr for Segments {
    type Err = String;

    /// `COLUMN`, or `FEATURE:N` for N quantile buckets of a feature.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if !s.is_empty() => Ok(Segments::Column(s.to_string())),
            Some((feature, n)) if !feature.is_empty() => match n.parse::<usize>() {
                Ok(buckets) if (2..=100).contains(&buckets) => Ok(Segments::Buckets {
                    feature: feature.to_string(),
                    buckets,
                }),
                _ => Err(format!(
                    "`{n}` in `{s}` is not a bucket count from 2 to 100"
                )),
            },
            _ => Err(format!(
                "`{s}` is neither a column name nor FEATURE:BUCKETS"
            )),
        }
    }
}

/// What the gate demands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatePolicy {
    /// The figure judged; when absent, accuracy for a classifier and mae for a regression
    /// ([`GatePolicy::for_model`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    /// How much worse than the current model the candidate may be overall: by this much
    /// accuracy or F1, or, for an error, by this share of the current model's (0.01: 1 %
    /// more).
    #[serde(default = "GatePolicy::default_tolerance")]
    pub tolerance: f64,
    /// The lowest share of its overall figure any segment of the candidate may reach (0.8:
    /// no segment below 80 % of the overall accuracy); for an error, no segment's error
    /// above the overall error divided by it.
    #[serde(default = "GatePolicy::default_parity")]
    pub parity: f64,
    /// The holdout column with the class index of each row (a regression's: its true
    /// value).
    #[serde(default = "GatePolicy::default_label_column")]
    pub label_column: String,
    #[serde(default)]
    pub segments: Option<Segments>,
    #[serde(default = "GatePolicy::default_min_segment_rows")]
    pub min_segment_rows: usize,
}

impl Default for GatePolicy {
    fn default() -> Self {
        GatePolicy {
            metric: None,
            tolerance: Self::default_tolerance(),
            parity: Self::default_parity(),
            label_column: Self::default_label_column(),
            segments: None,
            min_segment_rows: Self::default_min_segment_rows(),
        }
    }
}

impl GatePolicy {
    fn default_tolerance() -> f64 {
        0.01
    }
    fn default_parity() -> f64 {
        0.8
    }
    fn default_label_column() -> String {
        "label".into()
    }
    fn default_min_segment_rows() -> usize {
        DEFAULT_MIN_SEGMENT_ROWS
    }

    /// The metric judged (accuracy when none is set).
    pub fn metric(&self) -> Metric {
        self.metric.unwrap_or_default()
    }

    /// The policy for a classifier or a regression: its metric set (mae for a regression
    /// when none is), and refused when it judges the other kind of model.
    pub fn for_model(mut self, regression: bool) -> Result<Self, GateError> {
        let metric = self.metric.unwrap_or(if regression {
            Metric::Mae
        } else {
            Metric::Accuracy
        });
        if metric.is_regression() != regression {
            return Err(GateError::Policy(format!(
                "metric {metric} judges {}; this model is {}",
                if regression {
                    "classifiers"
                } else {
                    "regressions"
                },
                if regression {
                    "a regression (mae or rmse)"
                } else {
                    "a classifier (accuracy or f1)"
                }
            )));
        }
        self.metric = Some(metric);
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), GateError> {
        if !(0.0..=1.0).contains(&self.tolerance) {
            return Err(GateError::Policy(format!(
                "tolerance: {} is not between 0 and 1",
                self.tolerance
            )));
        }
        if !(0.0..=1.0).contains(&self.parity) {
            return Err(GateError::Policy(format!(
                "parity: {} is not between 0 and 1",
                self.parity
            )));
        }
        Ok(())
    }
}

/// Where in a holdout a row is: a CSV's line, an NPY array's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowAt {
    Line(usize),
    Record(usize),
}

impl fmt::Display for RowAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowAt::Line(line) => write!(f, "row {line}"),
            RowAt::Record(i) => write!(f, "record {i}"),
        }
    }
}

/// A labelled holdout, its features in the order a model wants them.
#[derive(Debug, Clone)]
pub struct Holdout {
    /// The features of a table; empty for tensors.
    pub features: Vec<String>,
    /// Rows of features, or flat tensors.
    pub rows: Vec<Vec<f32>>,
    /// Whether the rows are records of an NPY file rather than lines of a CSV.
    pub records: bool,
    /// Each row's class index, or for a regression its true value.
    pub labels: Vec<f64>,
    /// The segment of each row, when the policy asks for segments.
    pub segments: Option<Vec<String>>,
}

impl Holdout {
    /// Reads a CSV with a header: the model's `features` (any order, other columns
    /// allowed), the policy's label column (class indices, or true values when the
    /// policy's metric judges a regression) and segment column if any.
    pub fn read(path: &Path, features: &[String], policy: &GatePolicy) -> Result<Self, GateError> {
        let shown = path.display().to_string();
        let bad = |message: String| GateError::Holdout {
            path: shown.clone(),
            message,
        };
        let mut reader = csv::Reader::from_path(path).map_err(|e| bad(e.to_string()))?;
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| bad(e.to_string()))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let column = |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| bad(format!("no column `{name}`")))
        };
        let feature_at: Vec<usize> = features
            .iter()
            .map(|f| column(f))
            .collect::<Result<_, _>>()?;
        let label_at = column(&policy.label_column)?;
        let segment_at = match &policy.segments {
            Some(Segments::Column(c)) => Some(column(c)?),
            _ => None,
        };
        let mut holdout = Holdout {
            features: features.to_vec(),
            records: false,
            rows: Vec::new(),
            labels: Vec::new(),
            segments: segment_at.map(|_| Vec::new()),
        };
        for (i, record) in reader.records().enumerate() {
            let row = RowAt::Line(i + 2); // the header is line 1
            let record = record.map_err(|e| GateError::Row {
                row,
                message: e.to_string(),
            })?;
            let field = |at: usize| record.get(at).unwrap_or("").trim();
            let values = feature_at
                .iter()
                .zip(features)
                .map(|(&at, name)| match field(at).parse::<f32>() {
                    Ok(v) if v.is_finite() => Ok(v),
                    _ => Err(GateError::Row {
                        row,
                        message: format!("`{name}` is `{}`, not a finite number", field(at)),
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let text = field(label_at);
            let label = if policy.metric().is_regression() {
                text.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| GateError::Row {
                        row,
                        message: format!("label `{text}` is not a finite number"),
                    })?
            } else {
                text.parse::<usize>().map_err(|_| GateError::Row {
                    row,
                    message: format!("label `{text}` is not a class index (0, 1, …)"),
                })? as f64
            };
            holdout.rows.push(values);
            holdout.labels.push(label);
            if let (Some(at), Some(segments)) = (segment_at, holdout.segments.as_mut()) {
                segments.push(field(at).to_string());
            }
        }
        if holdout.rows.is_empty() {
            return Err(GateError::Empty);
        }
        if let Some(Segments::Buckets { feature, buckets }) = &policy.segments {
            let at = features
                .iter()
                .position(|f| f == feature)
                .ok_or_else(|| bad(format!("`{feature}` is not a feature of the model")))?;
            holdout.segments = Some(bucket(&holdout.rows, at, feature, *buckets));
        }
        Ok(holdout)
    }

    /// Reads an NPY holdout of records `x` (tensors of `row_shape`), `predicted` (ignored)
    /// and `label`: the devices' sample format. Every record needs a label; a holdout of
    /// tensors has no columns to segment by.
    pub fn read_tensors(
        path: &Path,
        row_shape: &[usize],
        policy: &GatePolicy,
    ) -> Result<Self, GateError> {
        let bad = |message: String| GateError::Holdout {
            path: path.display().to_string(),
            message,
        };
        if policy.segments.is_some() {
            return Err(GateError::Policy(
                "a holdout of tensors (NPY) has no columns to segment by: judge it without \
                 segments"
                    .into(),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let file = edgeloop_shared::npy::read_sample(&bytes).map_err(|e| {
            bad(format!(
                "{e} (a tensor model's holdout is an NPY array of records `x`, `predicted`, \
                 `label`, as `edgeloop dataset get` writes one)"
            ))
        })?;
        if file.row_shape != row_shape {
            return Err(bad(format!(
                "its inputs are of shape {:?}; the model takes {row_shape:?}",
                file.row_shape
            )));
        }
        let width: usize = row_shape.iter().product();
        let mut holdout = Holdout {
            features: Vec::new(),
            records: true,
            rows: Vec::with_capacity(file.rows),
            labels: Vec::with_capacity(file.rows),
            segments: None,
        };
        let f64_at = |b: &[u8]| f64::from_le_bytes(b.try_into().expect("8 bytes"));
        for (i, record) in bytes[file.data_start..]
            .chunks_exact(edgeloop_shared::npy::sample_record_bytes(row_shape))
            .enumerate()
        {
            let row = RowAt::Record(i);
            let (x, rest) = record.split_at(width * 4);
            let values: Vec<f32> = x
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            if let Some(at) = values.iter().position(|v| !v.is_finite()) {
                return Err(GateError::Row {
                    row,
                    message: format!("`x` holds {} at index {at}", values[at]),
                });
            }
            let label = f64_at(&rest[8..16]);
            let label = match label {
                l if l.is_nan() => Err("has no label (NaN)".to_string()),
                l if !l.is_finite() => Err(format!("label {l} is not a finite number")),
                l if !policy.metric().is_regression() && (l < 0.0 || l.fract() != 0.0) => {
                    Err(format!("label {l} is not a class index (0, 1, …)"))
                }
                l => Ok(l),
            }
            .map_err(|message| GateError::Row { row, message })?;
            holdout.rows.push(values);
            holdout.labels.push(label);
        }
        if holdout.rows.is_empty() {
            return Err(GateError::Empty);
        }
        Ok(holdout)
    }

    /// Where the `i`-th row is, for errors.
    fn at(&self, i: usize) -> RowAt {
        if self.records {
            RowAt::Record(i)
        } else {
            RowAt::Line(i + 2)
        }
    }
}

/// Names each row's equal-count bucket of feature `at`: `temperature[q2]`, with edges at
/// the holdout's own quantiles.
fn bucket(rows: &[Vec<f32>], at: usize, feature: &str, buckets: usize) -> Vec<String> {
    let mut sorted: Vec<f32> = rows.iter().map(|r| r[at]).collect();
    sorted.sort_by(f32::total_cmp);
    let edges: Vec<f32> = (1..buckets)
        .map(|k| sorted[(k * sorted.len() / buckets).min(sorted.len() - 1)])
        .collect();
    rows.iter()
        .map(|r| {
            let q = edges.iter().filter(|&&e| r[at] >= e).count();
            format!("{feature}[q{}]", q + 1)
        })
        .collect()
}

/// A model's figure on a holdout, overall and per segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub value: f64,
    pub rows: usize,
    pub segments: BTreeMap<String, SegmentScore>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentScore {
    pub value: f64,
    pub rows: usize,
}

/// Runs `onnx` on every holdout row and scores its predictions.
pub fn evaluate(
    onnx: &[u8],
    preprocess: Option<&edgeloop_shared::bundle::Preprocess>,
    holdout: &Holdout,
    metric: Metric,
) -> Result<Evaluation, GateError> {
    let plan = Plan::compile(onnx, holdout.features.len())?.with_preprocess(preprocess)?;
    evaluate_plan(&plan, holdout, metric)
}

/// Runs `plan` on every holdout row and scores its predictions.
pub fn evaluate_plan(
    plan: &Plan,
    holdout: &Holdout,
    metric: Metric,
) -> Result<Evaluation, GateError> {
    let regression = metric.is_regression();
    let classes = plan.classes();
    if regression && classes != 1 {
        return Err(GateError::Policy(format!(
            "metric {metric} judges a regression, but the model gives {classes} scores"
        )));
    }
    let mut predicted = Vec::with_capacity(holdout.rows.len());
    for (i, row) in holdout.rows.iter().enumerate() {
        let p = plan
            .infer(row, &holdout.features)
            .map_err(|e| GateError::Row {
                row: holdout.at(i),
                message: e.to_string(),
            })?;
        predicted.push(p.target(regression).number());
    }
    if let Some((i, label)) = holdout
        .labels
        .iter()
        .enumerate()
        .find(|(_, l)| !regression && **l >= classes as f64)
    {
        return Err(GateError::Row {
            row: holdout.at(i),
            message: format!("label {label} is not one of the model's {classes} classes"),
        });
    }
    Ok(score(
        metric,
        &holdout.labels,
        &predicted,
        holdout.segments.as_deref(),
    ))
}

/// Scores predictions against labels, overall and per segment.
pub fn score(
    metric: Metric,
    labels: &[f64],
    predicted: &[f64],
    segments: Option<&[String]>,
) -> Evaluation {
    let mut by_segment = BTreeMap::<&str, (Vec<f64>, Vec<f64>)>::new();
    if let Some(segments) = segments {
        for ((s, l), p) in segments.iter().zip(labels).zip(predicted) {
            let entry = by_segment.entry(s).or_default();
            entry.0.push(*l);
            entry.1.push(*p);
        }
    }
    Evaluation {
        value: metric_value(metric, labels, predicted),
        rows: labels.len(),
        segments: by_segment
            .into_iter()
            .map(|(s, (l, p))| {
                (
                    s.to_string(),
                    SegmentScore {
                        value: metric_value(metric, &l, &p),
                        rows: l.len(),
                    },
                )
            })
            .collect(),
    }
}

/// The metric of predictions against labels: class indices (as numbers) for accuracy and
/// F1, values for the errors.
fn metric_value(metric: Metric, labels: &[f64], predicted: &[f64]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let n = labels.len() as f64;
    let errors = || labels.iter().zip(predicted).map(|(l, p)| p - l);
    match metric {
        Metric::Mae => errors().map(f64::abs).sum::<f64>() / n,
        Metric::Rmse => (errors().map(|e| e * e).sum::<f64>() / n).sqrt(),
        Metric::Accuracy => {
            let hits = labels.iter().zip(predicted).filter(|(l, p)| l == p).count();
            hits as f64 / n
        }
        Metric::F1 => {
            let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
            let predicted: Vec<usize> = predicted.iter().map(|&p| p as usize).collect();
            let (labels, predicted) = (&labels[..], &predicted[..]);
            let classes: std::collections::BTreeSet<usize> =
                labels.iter().chain(predicted).copied().collect();
            let f1s = classes.iter().map(|&c| {
                let tp = labels
                    .iter()
                    .zip(predicted)
                    .filter(|&(l, p)| *l == c && *p == c)
                    .count();
                let fp = predicted.iter().filter(|&&p| p == c).count() - tp;
                let fn_ = labels.iter().filter(|&&l| l == c).count() - tp;
                if tp == 0 {
                    0.0
                } else {
                    2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
                }
            });
            f1s.sum::<f64>() / classes.len() as f64
        }
    }
}

/// The gate's verdict, with every figure it used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub policy: GatePolicy,
    pub candidate: Evaluation,
    /// None when there is no current model to compare with (the first version).
    pub current: Option<Evaluation>,
    pub passed: bool,
    /// Why it failed, one line per broken rule; empty when it passed.
    pub failures: Vec<String>,
}

impl GateReport {
    /// One line: the verdict and the figures behind it.
    pub fn summary(&self) -> String {
        let metric = self.policy.metric();
        let mut line = format!(
            "{}: {metric} {:.4}",
            if self.passed { "passed" } else { "failed" },
            self.candidate.value
        );
        if let Some(current) = &self.current {
            line += &format!(
                " against {:.4} (tolerance {})",
                current.value, self.policy.tolerance
            );
        }
        if let Some((name, worst)) = self.worst_segment() {
            line += &format!(
                "; worst segment {name} {:.4} over {} rows (parity {})",
                worst.value, worst.rows, self.policy.parity
            );
        }
        for f in &self.failures {
            line += &format!("; {f}");
        }
        line
    }

    fn worst_segment(&self) -> Option<(&String, &SegmentScore)> {
        let judged = self
            .candidate
            .segments
            .iter()
            .filter(|(_, s)| s.rows >= self.policy.min_segment_rows);
        if self.policy.metric().is_regression() {
            judged.max_by(|a, b| a.1.value.total_cmp(&b.1.value))
        } else {
            judged.min_by(|a, b| a.1.value.total_cmp(&b.1.value))
        }
    }
}

/// Judges a candidate's evaluation against the current model's.
pub fn judge(
    policy: &GatePolicy,
    candidate: Evaluation,
    current: Option<Evaluation>,
) -> GateReport {
    let metric = policy.metric();
    let mut failures = Vec::new();
    if metric.is_regression() {
        // An error: lower is better, the tolerance a share of the current model's.
        if let Some(current) = &current
            && candidate.value > current.value * (1.0 + policy.tolerance)
        {
            failures.push(format!(
                "{metric} {:.4} is above the current model's {:.4} by more than the \
                 tolerance {}",
                candidate.value, current.value, policy.tolerance
            ));
        }
        let ceiling = candidate.value / policy.parity.max(f64::MIN_POSITIVE);
        for (name, segment) in &candidate.segments {
            if segment.rows >= policy.min_segment_rows && segment.value > ceiling {
                failures.push(format!(
                    "segment {name}: {metric} {:.4} is above {:.4} (the overall {:.4} over \
                     parity {})",
                    segment.value, ceiling, candidate.value, policy.parity
                ));
            }
        }
    } else {
        if let Some(current) = &current
            && candidate.value < current.value - policy.tolerance
        {
            failures.push(format!(
                "{metric} {:.4} is below the current model's {:.4} less the tolerance {}",
                candidate.value, current.value, policy.tolerance
            ));
        }
        let floor = policy.parity * candidate.value;
        for (name, segment) in &candidate.segments {
            if segment.rows >= policy.min_segment_rows && segment.value < floor {
                failures.push(format!(
                    "segment {name}: {metric} {:.4} is below {:.4} ({} of the overall {:.4})",
                    segment.value, floor, policy.parity, candidate.value
                ));
            }
        }
    }
    GateReport {
        policy: policy.clone(),
        passed: failures.is_empty(),
        candidate,
        current,
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(value: f64, segments: &[(&str, f64, usize)]) -> Evaluation {
        Evaluation {
            value,
            rows: 100,
            segments: segments
                .iter()
                .map(|(n, v, r)| {
                    (
                        n.to_string(),
                        SegmentScore {
                            value: *v,
                            rows: *r,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn metrics_count_what_they_say() {
        let labels = [0.0, 0.0, 1.0, 1.0, 1.0, 0.0];
        let predicted = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        assert!((metric_value(Metric::Accuracy, &labels, &predicted) - 4.0 / 6.0).abs() < 1e-12);
        // Class 0: tp 2, fp 1, fn 1 → 2/3; class 1 the same.
        assert!((metric_value(Metric::F1, &labels, &predicted) - 2.0 / 3.0).abs() < 1e-12);
        // A class never predicted scores 0 in the macro average.
        assert!(
            (metric_value(Metric::F1, &[0.0, 1.0], &[0.0, 0.0]) - (2.0 / 3.0) / 2.0).abs() < 1e-12
        );
        // Errors of a regression: 1, −1, 2, 0.
        let (truth, values) = ([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 5.0, 4.0]);
        assert_eq!(metric_value(Metric::Mae, &truth, &values), 1.0);
        assert_eq!(metric_value(Metric::Rmse, &truth, &values), 1.5f64.sqrt());
        let segments = ["a", "a", "b", "b", "b", "a"].map(String::from);
        let e = score(Metric::Accuracy, &labels, &predicted, Some(&segments));
        assert_eq!(e.segments["a"].rows, 3);
        assert!((e.segments["a"].value - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.segments["b"].value - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_candidate_passes_within_tolerance_and_parity_and_fails_naming_the_rule() {
        let policy = GatePolicy {
            tolerance: 0.02,
            parity: 0.9,
            ..GatePolicy::default()
        };
        let current = eval(0.90, &[]);
        assert!(
            judge(
                &policy,
                eval(0.885, &[("g1", 0.85, 50)]),
                Some(current.clone())
            )
            .passed
        );
        let worse = judge(&policy, eval(0.87, &[]), Some(current.clone()));
        assert!(!worse.passed);
        assert!(
            worse.failures[0].contains("below the current model's 0.9000"),
            "{:?}",
            worse.failures
        );
        let biased = judge(
            &policy,
            eval(0.95, &[("g1", 0.97, 50), ("g2", 0.80, 50)]),
            Some(current),
        );
        assert!(!biased.passed);
        assert!(
            biased.failures[0].starts_with("segment g2"),
            "{:?}",
            biased.failures
        );
        assert!(
            biased.summary().contains("worst segment g2 0.8000"),
            "{}",
            biased.summary()
        );
        // Too few rows to judge a segment; no current model to compare with.
        assert!(judge(&policy, eval(0.95, &[("tiny", 0.1, 5)]), None).passed);
    }

    /// For an error (a regression's), lower is better: the tolerance is a share of the
    /// current model's error, and no segment's error may exceed the overall over parity.
    #[test]
    fn a_regression_is_judged_on_its_error() {
        let policy = GatePolicy {
            tolerance: 0.05,
            parity: 0.8,
            ..GatePolicy::default()
        }
        .for_model(true)
        .unwrap();
        assert_eq!(policy.metric, Some(Metric::Mae));
        let current = eval(2.0, &[]);
        // 2.09 is within 5 % of 2.0; a segment at 2.5 within 2.09 / 0.8 = 2.6125.
        let within = judge(
            &policy,
            eval(2.09, &[("g1", 2.5, 50)]),
            Some(current.clone()),
        );
        assert!(within.passed, "{}", within.summary());
        let worse = judge(&policy, eval(2.2, &[]), Some(current.clone()));
        assert!(
            !worse.passed && worse.failures[0].contains("above the current model's 2.0000"),
            "{:?}",
            worse.failures
        );
        let biased = judge(
            &policy,
            eval(1.5, &[("g1", 1.0, 50), ("g2", 2.0, 50)]),
            Some(current),
        );
        assert!(!biased.passed);
        assert!(biased.failures[0].starts_with("segment g2: mae 2.0000 is above 1.8750"));
        assert!(
            biased.summary().contains("worst segment g2 2.0000"),
            "{}",
            biased.summary()
        );
        // A metric of the other kind of model is refused; none set takes the model's.
        let f1 = GatePolicy {
            metric: Some(Metric::F1),
            ..GatePolicy::default()
        };
        let e = f1.clone().for_model(true).unwrap_err().to_string();
        assert!(e.contains("metric f1 judges classifiers"), "{e}");
        assert_eq!(f1.for_model(false).unwrap().metric(), Metric::F1);
        let rmse = GatePolicy {
            metric: Some(Metric::Rmse),
            ..GatePolicy::default()
        };
        assert!(rmse.for_model(false).is_err());
        let default = GatePolicy::default().for_model(false).unwrap();
        assert_eq!(default.metric, Some(Metric::Accuracy));
        assert_eq!("rmse".parse::<Metric>(), Ok(Metric::Rmse));
        assert!("r2".parse::<Metric>().unwrap_err().contains("mae or rmse"));
    }

    #[test]
    fn segments_parse_from_the_command_line() {
        assert_eq!("board".parse(), Ok(Segments::Column("board".into())));
        assert_eq!(
            "temperature:4".parse(),
            Ok(Segments::Buckets {
                feature: "temperature".into(),
                buckets: 4
            })
        );
        for bad in ["", ":4", "t:1", "t:x"] {
            assert!(bad.parse::<Segments>().is_err(), "{bad}");
        }
    }

    #[test]
    fn buckets_have_equal_counts() {
        let rows: Vec<Vec<f32>> = (0..100).map(|i| vec![i as f32]).collect();
        let names = bucket(&rows, 0, "t", 4);
        for q in 1..=4 {
            assert_eq!(
                names.iter().filter(|n| **n == format!("t[q{q}]")).count(),
                25
            );
        }
    }
}
