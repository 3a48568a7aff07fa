//! What the health window compares between a new model and the one it replaced: latency in
//! service and, where ground-truth labels arrive, accuracy (a regression's: its mean
//! absolute error on the true values). Each model keeps a
//! [`ServiceRecord`] while it serves; at an install the record of the model being replaced
//! becomes the window's baseline, and the new model's own record is judged against it.

use edgeloop_shared::drift::Residuals;
use edgeloop_shared::stats::{LATENCY_BOUNDS_MS, latency_bucket, latency_quantile};
use serde::{Deserialize, Serialize};

/// Latency and labelled accuracy of one model in service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    /// Inference latency histogram over [`LATENCY_BOUNDS_MS`] (one more bucket: slower).
    #[serde(default)]
    pub latency_ms: Vec<u64>,
    /// Predictions a ground-truth label arrived for, and how many of them were right.
    #[serde(default)]
    pub labelled: u64,
    #[serde(default)]
    pub correct: u64,
    /// A regression's errors on the true values that arrived.
    #[serde(default, skip_serializing_if = "no_residuals")]
    pub residuals: Residuals,
}

fn no_residuals(r: &Residuals) -> bool {
    r.count == 0
}

impl ServiceRecord {
    pub fn observe_latency(&mut self, ms: f64) {
        // Empty when new; another length only in a record of other bounds: started over.
        if self.latency_ms.len() != LATENCY_BOUNDS_MS.len() + 1 {
            self.latency_ms = vec![0; LATENCY_BOUNDS_MS.len() + 1];
        }
        self.latency_ms[latency_bucket(ms)] += 1;
    }

    pub fn observe_label(&mut self, label: usize, predicted: usize) {
        self.labelled += 1;
        self.correct += u64::from(label == predicted);
    }

    /// The true value that arrived for a regression's prediction.
    pub fn observe_residual(&mut self, predicted: f64, truth: f64) {
        self.residuals.push(predicted, truth);
    }

    /// Inferences timed.
    pub fn timed(&self) -> u64 {
        self.latency_ms.iter().sum()
    }

    /// The 99th percentile latency, as its histogram bucket's upper bound.
    pub fn p99_ms(&self) -> Option<f64> {
        latency_quantile(&self.latency_ms, 0.99)
    }

    pub fn accuracy(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64)
    }

    /// What a report says of it: `p99 2.5 ms, accuracy 0.953 on 120 labels`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p99) = self.p99_ms() {
            parts.push(format!("p99 {p99} ms"));
        }
        if let Some(accuracy) = self.accuracy() {
            parts.push(format!(
                "accuracy {accuracy:.3} on {} labels",
                self.labelled
            ));
        }
        if let Some(mae) = self.residuals.mae() {
            parts.push(format!(
                "mae {mae:.4} on {} true values",
                self.residuals.count
            ));
        }
        parts.join(", ")
    }
}

/// The smallest latency ratio worth judging: neighbouring latency buckets are up to 2.5×
/// apart, so a smaller ratio trips on a slowdown that merely crosses a bucket bound.
pub const MIN_LATENCY_RATIO: f64 = 2.5;

/// The limits of [`compare`], from the agent's `[health]` configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceLimits {
    /// The new model's p99 latency may be at most this many times the old one's (0: off).
    /// Both are histogram buckets' upper bounds, 2–2.5× apart, so a useful ratio is at
    /// least [`MIN_LATENCY_RATIO`].
    pub max_latency_ratio: f64,
    /// Inferences each model must have had timed before latency is judged.
    pub min_inferences: u64,
    /// The new model's accuracy may fall at most this far below the old one's (0: off).
    pub max_accuracy_drop: f64,
    /// A regression's mean absolute error may rise at most this share above the old
    /// one's (0.2: 20 % more; 0: off).
    pub max_error_rise: f64,
    /// Labels (or true values) each model must have received before accuracy (or error)
    /// is judged.
    pub min_labels: u64,
}

/// Why the new model's record breaches the limits against the old model's, if it does.
/// Nothing is judged before both records hold enough evidence.
pub fn compare(new: &ServiceRecord, old: &ServiceRecord, limits: &ServiceLimits) -> Option<String> {
    let timed = limits.min_inferences.max(1);
    if limits.max_latency_ratio > 0.0
        && new.timed() >= timed
        && old.timed() >= timed
        && let (Some(new_p99), Some(old_p99)) = (new.p99_ms(), old.p99_ms())
        && new_p99 > limits.max_latency_ratio * old_p99
    {
        return Some(format!(
            "p99 latency {new_p99} ms over {} inferences, over {}x the previous model's \
             {old_p99} ms",
            new.timed(),
            limits.max_latency_ratio
        ));
    }
    let labels = limits.min_labels.max(1);
    if limits.max_accuracy_drop > 0.0
        && new.labelled >= labels
        && old.labelled >= labels
        && let (Some(new_accuracy), Some(old_accuracy)) = (new.accuracy(), old.accuracy())
        && new_accuracy < old_accuracy - limits.max_accuracy_drop
    {
        return Some(format!(
            "accuracy {new_accuracy:.3} on {} labels, more than {} below the previous model's \
             {old_accuracy:.3} on {}",
            new.labelled, limits.max_accuracy_drop, old.labelled
        ));
    }
    let (new_errors, old_errors) = (&new.residuals, &old.residuals);
    if limits.max_error_rise > 0.0
        && new_errors.count >= labels
        && old_errors.count >= labels
        && let (Some(new_mae), Some(old_mae)) = (new_errors.mae(), old_errors.mae())
        && new_mae > old_mae * (1.0 + limits.max_error_rise)
    {
        return Some(format!(
            "mean absolute error {new_mae:.4} on {} true values, more than {} above the \
             previous model's {old_mae:.4} on {}",
            new_errors.count, limits.max_error_rise, old_errors.count
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(latencies: &[(f64, u64)], labelled: u64, correct: u64) -> ServiceRecord {
        let mut r = ServiceRecord::default();
        for &(ms, n) in latencies {
            for _ in 0..n {
                r.observe_latency(ms);
            }
        }
        for i in 0..labelled {
            r.observe_label(1, usize::from(i < correct));
        }
        r
    }

    const LIMITS: ServiceLimits = ServiceLimits {
        max_latency_ratio: 3.0,
        min_inferences: 100,
        max_accuracy_drop: 0.1,
        max_error_rise: 0.2,
        min_labels: 50,
    };

    #[test]
    fn a_slower_model_breaches_the_latency_ratio_once_both_are_timed_enough() {
        let old = record(&[(0.8, 200)], 0, 0);
        assert_eq!(old.p99_ms(), Some(1.0));
        let slow = record(&[(8.0, 150)], 0, 0);
        let reason = compare(&slow, &old, &LIMITS).unwrap();
        assert!(
            reason.contains("p99 latency 10 ms over 150 inferences"),
            "{reason}"
        );
        assert!(reason.contains("3x the previous model's 1 ms"), "{reason}");
        // Too few inferences on either side: not judged yet.
        assert_eq!(compare(&record(&[(8.0, 99)], 0, 0), &old, &LIMITS), None);
        assert_eq!(compare(&slow, &record(&[(0.8, 99)], 0, 0), &LIMITS), None);
        // Within the ratio; a rare slow inference does not move the p99.
        let similar = record(&[(2.0, 150)], 0, 0);
        assert_eq!(compare(&similar, &old, &LIMITS), None);
        let one_slow = record(&[(0.8, 199), (500.0, 1)], 0, 0);
        assert_eq!(compare(&one_slow, &old, &LIMITS), None);
        // Off.
        let off = ServiceLimits {
            max_latency_ratio: 0.0,
            ..LIMITS
        };
        assert_eq!(compare(&slow, &old, &off), None);
    }

    #[test]
    fn a_less_accurate_model_breaches_the_accuracy_drop_once_both_have_labels() {
        let old = record(&[], 100, 95);
        assert_eq!(old.accuracy(), Some(0.95));
        let worse = record(&[], 60, 30);
        let reason = compare(&worse, &old, &LIMITS).unwrap();
        assert!(
            reason.contains(
                "accuracy 0.500 on 60 labels, more than 0.1 below the previous model's 0.950 on 100"
            ),
            "{reason}"
        );
        assert_eq!(compare(&record(&[], 49, 0), &old, &LIMITS), None);
        assert_eq!(compare(&worse, &record(&[], 49, 49), &LIMITS), None);
        assert_eq!(
            compare(&record(&[], 60, 52), &old, &LIMITS),
            None,
            "0.867: within 0.1"
        );
        let off = ServiceLimits {
            max_accuracy_drop: 0.0,
            ..LIMITS
        };
        assert_eq!(compare(&worse, &old, &off), None);
    }

    /// A regression's record: `n` true values, each `error` off.
    fn errors(n: u64, error: f64) -> ServiceRecord {
        let mut r = ServiceRecord::default();
        for i in 0..n {
            // Errors of both signs: the mean absolute error is `error`.
            let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
            r.observe_residual(10.0 + sign * error, 10.0);
        }
        r
    }

    #[test]
    fn a_regression_breaches_the_error_rise_once_both_have_true_values() {
        let old = errors(100, 2.0);
        let worse = errors(60, 2.5);
        let reason = compare(&worse, &old, &LIMITS).unwrap();
        assert!(
            reason.contains(
                "mean absolute error 2.5000 on 60 true values, more than 0.2 above the previous \
                 model's 2.0000 on 100"
            ),
            "{reason}"
        );
        assert_eq!(
            compare(&errors(60, 2.3), &old, &LIMITS),
            None,
            "15 %: within 20 %"
        );
        assert_eq!(compare(&errors(49, 9.0), &old, &LIMITS), None, "too few");
        assert_eq!(
            compare(&worse, &errors(49, 0.1), &LIMITS),
            None,
            "too few before"
        );
        let off = ServiceLimits {
            max_error_rise: 0.0,
            ..LIMITS
        };
        assert_eq!(compare(&worse, &old, &off), None);
        assert_eq!(errors(4, 0.25).describe(), "mae 0.2500 on 4 true values");
        let text = serde_json::to_string(&errors(2, 1.0)).unwrap();
        assert_eq!(
            serde_json::from_str::<ServiceRecord>(&text).unwrap(),
            errors(2, 1.0)
        );
        assert!(
            !serde_json::to_string(&ServiceRecord::default())
                .unwrap()
                .contains("residuals")
        );
    }

    #[test]
    fn a_record_describes_itself_and_round_trips() {
        let r = record(&[(0.3, 10)], 4, 3);
        assert_eq!(r.describe(), "p99 0.5 ms, accuracy 0.750 on 4 labels");
        assert_eq!(ServiceRecord::default().describe(), "");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<ServiceRecord>(&json).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<ServiceRecord>("{}").unwrap(),
            ServiceRecord::default()
        );
        // A record of other histogram bounds starts over rather than misplace counts.
        let mut odd: ServiceRecord = serde_json::from_str(r#"{"latency_ms": [5, 5]}"#).unwrap();
        odd.observe_latency(0.3);
        assert_eq!(odd.timed(), 1);
    }
}
