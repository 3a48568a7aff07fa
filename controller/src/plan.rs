//! Rollout plans: waves over deterministic cohorts, success and failure thresholds, a
//! per-device timeout, and the pure decision of what a rollout does next. The engine in
//! [`crate::rollout`] applies the decisions; nothing here touches the store.

use std::fmt;
use std::str::FromStr;

use edgeloop_shared::sha256_hex;
use serde::{Deserialize, Serialize};

use crate::store::{DeploymentRow, FAILED_STATES, FINAL_STATES, RUNNING_STATES, RolloutRow};

/// How far a wave reaches, counted from the start of the rollout: a number of devices, or
/// a percentage of the rollout's devices (rounded up). Written `"5"` or `"10%"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WaveSize {
    Devices(u64),
    Percent(f64),
}

impl WaveSize {
    /// The number of devices this wave reaches when the rollout has `total`.
    fn reach(self, total: usize) -> usize {
        match self {
            WaveSize::Devices(n) => (n as usize).min(total),
            // Rounded up, less a tolerance for percentages such as 33.33 of 3 devices.
            WaveSize::Percent(p) => {
                ((p / 100.0 * total as f64 - 1e-9).ceil().max(0.0) as usize).min(total)
            }
        }
    }
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveSize::Devices(n) => write!(f, "{n}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for WaveSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(WaveSize::Percent(p)),
                _ => Err(format!("`{s}` is not a percentage above 0 and at most 100")),
            }
        } else {
            match s.parse::<u64>() {
                Ok(n) if n > 0 => Ok(WaveSize::Devices(n)),
                _ => Err(format!(
                    "`{s}` is neither a device count above 0 nor a percentage such as `10%`"
                )),
            }
        }
    }
}

impl Serialize for WaveSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WaveSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the engine does when a wave fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop sending commands until an operator resumes or aborts.
    #[default]
    Pause,
    /// Stop for good and roll back the devices that run the new version.
    Abort,
}

/// How a rollout proceeds. Every field has a default; the default plan sends to every
/// device at once and never stops by itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPlan {
    /// Cumulative reach of each wave; the last must reach every device (`"100%"`).
    #[serde(default = "RolloutPlan::all_at_once")]
    pub waves: Vec<WaveSize>,
    /// Share of a wave's devices that must have committed the new version before the next
    /// wave starts.
    #[serde(default = "RolloutPlan::default_success_threshold")]
    pub success_threshold: f64,
    /// Share of a wave's executed deployments (committed or failed) that, once reached,
    /// stops the rollout as `on_failure` says. None: never stops early.
    #[serde(default)]
    pub failure_threshold: Option<f64>,
    /// Deployments of a wave that must have executed before either threshold is judged.
    #[serde(default = "RolloutPlan::default_min_executed")]
    pub min_executed: u64,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// A deployment not committed, failed or rolled back this long after its wave started
    /// counts as failed (`timed_out`).
    #[serde(default = "RolloutPlan::default_device_timeout_s")]
    pub device_timeout_s: u64,
    /// A gate on live drift telemetry, judged before a wave opens the next.
    #[serde(default)]
    pub telemetry_gate: Option<TelemetryGate>,
}

/// Before the next wave opens, the new version's drift on the devices that run it must not
/// be much worse than the old version's on the devices that still run that, over the same
/// period (since the current wave opened): a model whose reference does not fit what the
/// devices see stops at the canary even when every device reports it healthy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryGate {
    /// The new version's median window PSI may be at most this many times the old
    /// version's…
    #[serde(default = "TelemetryGate::default_max_drift_ratio")]
    pub max_drift_ratio: f64,
    /// …or at most this, whichever is higher: below it PSI is noise.
    #[serde(default = "TelemetryGate::default_drift_floor")]
    pub drift_floor: f64,
    /// Windows of the new version needed before the gate judges; the wave waits until then.
    #[serde(default = "TelemetryGate::default_min_windows")]
    pub min_windows: usize,
    /// When set, the new version's accuracy on feedback labels (pooled over its windows)
    /// may be at most this far below the old version's over the same period. The wave
    /// waits for `min_labels` labels of the new version; without as many of the old one,
    /// there is nothing to compare with and accuracy does not hold the wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    /// For a regression, when set: the new version's mean absolute error on true values
    /// (pooled over its windows) may be at most this share above the old version's (0.1:
    /// a tenth more). It waits for, and compares on, `min_labels` true values as
    /// `max_accuracy_drop` does; a classifier's labelled windows (with an accuracy) end the
    /// wait, as it has no such error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mae_rise: Option<f64>,
    #[serde(default = "TelemetryGate::default_min_labels")]
    pub min_labels: u64,
    /// When set, the new version's median window p99 latency may be at most this many
    /// times the old version's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ratio: Option<f64>,
    /// When set, the new version's share of failed inferences (pooled over its windows)
    /// may be at most this much above the old version's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate_increase: Option<f64>,
}

/// The drift comparison with its default limits; every other comparison off.
impl Default for TelemetryGate {
    fn default() -> Self {
        TelemetryGate {
            max_drift_ratio: Self::default_max_drift_ratio(),
            drift_floor: Self::default_drift_floor(),
            min_windows: Self::default_min_windows(),
            max_accuracy_drop: None,
            max_mae_rise: None,
            min_labels: Self::default_min_labels(),
            max_latency_ratio: None,
            max_error_rate_increase: None,
        }
    }
}

impl TelemetryGate {
    fn default_max_drift_ratio() -> f64 {
        2.0
    }
    fn default_drift_floor() -> f64 {
        0.1
    }
    fn default_min_windows() -> usize {
        3
    }
    fn default_min_labels() -> u64 {
        50
    }

    fn validate(&self) -> Result<(), PlanError> {
        if !(self.max_drift_ratio >= 1.0 && self.max_drift_ratio.is_finite()) {
            return Err(PlanError(format!(
                "telemetry_gate.max_drift_ratio: {} must be at least 1",
                self.max_drift_ratio
            )));
        }
        if !(self.drift_floor >= 0.0 && self.drift_floor.is_finite()) {
            return Err(PlanError(
                "telemetry_gate.drift_floor: must be 0 or more".into(),
            ));
        }
        for (field, n) in [
            ("min_windows", self.min_windows as u64),
            ("min_labels", self.min_labels),
        ] {
            if n == 0 {
                return Err(PlanError(format!(
                    "telemetry_gate.{field}: must be at least 1"
                )));
            }
        }
        for (field, share) in [
            ("max_accuracy_drop", self.max_accuracy_drop),
            ("max_error_rate_increase", self.max_error_rate_increase),
        ] {
            if let Some(d) = share
                && !(0.0..=1.0).contains(&d)
            {
                return Err(PlanError(format!(
                    "telemetry_gate.{field}: {d} must be between 0 and 1"
                )));
            }
        }
        if let Some(r) = self.max_mae_rise
            && !(r >= 0.0 && r.is_finite())
        {
            return Err(PlanError(format!(
                "telemetry_gate.max_mae_rise: {r} must be 0 or more"
            )));
        }
        if let Some(r) = self.max_latency_ratio
            && !(r >= 1.0 && r.is_finite())
        {
            return Err(PlanError(format!(
                "telemetry_gate.max_latency_ratio: {r} must be at least 1"
            )));
        }
        Ok(())
    }

    /// Judges the evidence: None while there are too few windows of the new version.
    pub fn judge(&self, version: u64, evidence: &DriftEvidence) -> Option<Result<(), String>> {
        if evidence.new.len() < self.min_windows {
            return None;
        }
        let psi = |ws: &[GateWindow]| ws.iter().map(|w| w.psi_max).collect::<Vec<_>>();
        let (new_psi, old_psi) = (psi(&evidence.new), psi(&evidence.old));
        if let Err(why) = self.judge_drift(version, &new_psi, &old_psi) {
            return Some(Err(why));
        }
        if let Some(drop) = self.max_accuracy_drop {
            let (new_labels, new_accuracy) = pooled_accuracy(&evidence.new);
            if new_labels < self.min_labels {
                return None;
            }
            let (old_labels, old_accuracy) = pooled_accuracy(&evidence.old);
            if old_labels >= self.min_labels && new_accuracy < old_accuracy - drop {
                return Some(Err(format!(
                    "telemetry gate: v{version}'s accuracy {new_accuracy:.3} on {new_labels} labels is more than {drop} below the old version's {old_accuracy:.3} on {old_labels}"
                )));
            }
        }
        // A classifier's labelled windows carry an accuracy and no error: the comparison
        // is not for it, and waiting for true values would hold the wave for good.
        let classifier = evidence.new.iter().any(|w| w.accuracy.is_some());
        if let Some(rise) = self.max_mae_rise
            && !classifier
        {
            let (new_values, new_mae) = pooled_mae(&evidence.new);
            if new_values < self.min_labels {
                return None;
            }
            let (old_values, old_mae) = pooled_mae(&evidence.old);
            if old_values >= self.min_labels && new_mae > old_mae * (1.0 + rise) {
                return Some(Err(format!(
                    "telemetry gate: v{version}'s mean absolute error {new_mae:.4} on {new_values} true values is more than {rise} above the old version's {old_mae:.4} on {old_values}"
                )));
            }
        }
        if let Some(increase) = self.max_error_rate_increase {
            let rate = |ws: &[GateWindow]| {
                let (errors, samples) = ws
                    .iter()
                    .fold((0u64, 0u64), |(e, s), w| (e + w.errors, s + w.samples));
                (samples > 0).then(|| errors as f64 / samples as f64)
            };
            if let Some(new) = rate(&evidence.new) {
                let old = rate(&evidence.old).unwrap_or(0.0);
                if new > old + increase {
                    return Some(Err(format!(
                        "telemetry gate: v{version}'s error rate {new:.4} is more than {increase} above the old version's {old:.4}"
                    )));
                }
            }
        }
        if let Some(ratio) = self.max_latency_ratio {
            let p99 = |ws: &[GateWindow]| {
                ws.iter()
                    .filter_map(|w| w.latency_p99_ms)
                    .collect::<Vec<_>>()
            };
            let (new, old) = (p99(&evidence.new), p99(&evidence.old));
            if !new.is_empty() && !old.is_empty() {
                let (new, old) = (median(&new), median(&old));
                if new > old * ratio {
                    return Some(Err(format!(
                        "telemetry gate: v{version}'s median p99 latency {new} ms is above {ratio}x the old version's {old} ms"
                    )));
                }
            }
        }
        Some(Ok(()))
    }

    /// The drift part of [`TelemetryGate::judge`], on each side's window PSIs.
    fn judge_drift(&self, version: u64, new_psi: &[f64], old_psi: &[f64]) -> Result<(), String> {
        let new = median(new_psi);
        let (limit, against) = if old_psi.is_empty() {
            (
                self.drift_floor,
                "no window of the old version to compare with".to_string(),
            )
        } else {
            let old = median(old_psi);
            (
                (old * self.max_drift_ratio).max(self.drift_floor),
                format!(
                    "the old version's {old:.3} over {} windows, limit {}x",
                    old_psi.len(),
                    self.max_drift_ratio
                ),
            )
        };
        if new <= limit {
            Ok(())
        } else {
            Err(format!(
                "telemetry gate: v{version}'s median drift (PSI) {new:.3} over {} windows is above {limit:.3} ({against})",
                new_psi.len()
            ))
        }
    }
}

/// Labels and the share of them predicted right, over windows.
fn pooled_accuracy(windows: &[GateWindow]) -> (u64, f64) {
    let (labels, right) = windows.iter().fold((0u64, 0.0), |(n, r), w| {
        (
            n + w.labelled,
            r + w.accuracy.unwrap_or(0.0) * w.labelled as f64,
        )
    });
    (
        labels,
        if labels == 0 {
            0.0
        } else {
            right / labels as f64
        },
    )
}

/// True values and the mean absolute error on them, over the windows of a regression.
fn pooled_mae(windows: &[GateWindow]) -> (u64, f64) {
    let (values, sum_abs) = windows
        .iter()
        .filter_map(|w| w.mae.map(|mae| (w.labelled, mae)))
        .fold((0u64, 0.0), |(n, s), (labelled, mae)| {
            (n + labelled, s + mae * labelled as f64)
        });
    (
        values,
        if values == 0 {
            0.0
        } else {
            sum_abs / values as f64
        },
    )
}

/// What the telemetry gate reads of one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateWindow {
    pub psi_max: f64,
    pub labelled: u64,
    pub accuracy: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub samples: u64,
    pub errors: u64,
    /// A regression's mean absolute error on its `labelled` true values.
    pub mae: Option<f64>,
}

/// The largest feature PSI of each window received since the current wave opened: of the
/// new version on the rollout's devices that run it, and of other versions on those that do
/// not yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriftEvidence {
    pub new: Vec<GateWindow>,
    pub old: Vec<GateWindow>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

impl Default for RolloutPlan {
    fn default() -> Self {
        RolloutPlan {
            waves: Self::all_at_once(),
            success_threshold: Self::default_success_threshold(),
            failure_threshold: None,
            min_executed: Self::default_min_executed(),
            on_failure: OnFailure::default(),
            device_timeout_s: Self::default_device_timeout_s(),
            telemetry_gate: None,
        }
    }
}

/// A plan that cannot be followed; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid rollout plan: {0}")]
pub struct PlanError(pub String);

/// How a wave's deployments stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaveCounts {
    /// Deployments in the wave, less those superseded by a later rollout or cancelled.
    pub total: u64,
    pub committed: u64,
    /// Failed, refused, rolled back by the device, or timed out.
    pub failed: u64,
}

impl WaveCounts {
    pub fn executed(&self) -> u64 {
        self.committed + self.failed
    }

    /// Counts the deployments of `wave`.
    pub fn of(deployments: &[DeploymentRow], wave: u32) -> Self {
        let mut counts = WaveCounts::default();
        for d in deployments.iter().filter(|d| d.wave == wave) {
            match d.status.as_str() {
                "superseded" | "cancelled" => continue,
                "committed" => counts.committed += 1,
                s if FAILED_STATES.contains(&s) => counts.failed += 1,
                _ => {}
            }
            counts.total += 1;
        }
        counts
    }
}

/// What a rollout in progress does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Wait,
    /// Start the next wave.
    Advance,
    /// Stop as the plan's `on_failure` says, for this reason.
    Stop(String),
    /// End as failed, for this reason: every deployment has ended and some failed, below
    /// the failure threshold. (Rollouts without a threshold are ended by the store.)
    Finish(String),
}

impl RolloutPlan {
    fn all_at_once() -> Vec<WaveSize> {
        vec![WaveSize::Percent(100.0)]
    }
    fn default_success_threshold() -> f64 {
        1.0
    }
    fn default_min_executed() -> u64 {
        1
    }
    fn default_device_timeout_s() -> u64 {
        3600
    }

    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |m: String| Err(PlanError(m));
        match self.waves.last() {
            None => return bad("waves: at least one wave is needed".into()),
            Some(WaveSize::Percent(p)) if *p >= 100.0 => {}
            Some(last) => {
                return bad(format!(
                    "waves: the last wave must reach every device (`100%`), not `{last}`"
                ));
            }
        }
        if self.waves.len() > 100 {
            return bad(format!("waves: {} waves, at most 100", self.waves.len()));
        }
        let percents: Vec<f64> = self
            .waves
            .iter()
            .filter_map(|w| match w {
                WaveSize::Percent(p) => Some(*p),
                WaveSize::Devices(_) => None,
            })
            .collect();
        if percents.windows(2).any(|w| w[1] <= w[0]) {
            return bad("waves: percentages must rise from wave to wave".into());
        }
        if !(self.success_threshold > 0.0 && self.success_threshold <= 1.0) {
            return bad(format!(
                "success_threshold: {} is not a share above 0 and at most 1",
                self.success_threshold
            ));
        }
        if let Some(t) = self.failure_threshold
            && !(t > 0.0 && t <= 1.0)
        {
            return bad(format!(
                "failure_threshold: {t} is not a share above 0 and at most 1"
            ));
        }
        if self.min_executed == 0 {
            return bad("min_executed: must be at least 1".into());
        }
        if self.device_timeout_s == 0 {
            return bad("device_timeout_s: must be at least 1".into());
        }
        if let Some(gate) = &self.telemetry_gate {
            gate.validate()?;
        }
        Ok(())
    }

    /// The index of the last wave.
    pub fn last_wave(&self) -> u32 {
        self.waves.len().saturating_sub(1) as u32
    }

    /// The wave of each of `devices` (in the same order) in rollout `rollout_id`. Devices
    /// are ordered by a hash of the rollout id and their own id, so cohorts are
    /// deterministic, differ from one rollout to the next, and do not follow device names;
    /// wave `k` takes devices up to its reach. Every wave reaches at least as far as the
    /// one before it.
    pub fn assign(&self, rollout_id: u64, devices: &[String]) -> Vec<u32> {
        let mut order: Vec<(String, usize)> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (sha256_hex(format!("{rollout_id}:{d}").as_bytes()), i))
            .collect();
        order.sort();
        let mut ends = Vec::with_capacity(self.waves.len());
        for w in &self.waves {
            let previous = ends.last().copied().unwrap_or(0);
            ends.push(w.reach(devices.len()).max(previous));
        }
        // The last wave is validated to reach 100%; keep every device covered regardless.
        if let Some(last) = ends.last_mut() {
            *last = devices.len();
        }
        let mut waves = vec![0; devices.len()];
        let mut wave = 0;
        for (position, (_, index)) in order.into_iter().enumerate() {
            while position >= ends[wave] {
                wave += 1;
            }
            waves[index] = wave as u32;
        }
        waves
    }

    /// What a rollout in progress in `wave` does next, given that wave's deployments.
    pub fn decide(&self, wave: u32, counts: WaveCounts) -> Decision {
        let executed = counts.executed();
        if let Some(threshold) = self.failure_threshold
            && counts.failed > 0
            && executed >= self.min_executed.min(counts.total)
            && counts.failed as f64 >= threshold * executed as f64
        {
            return Decision::Stop(format!(
                "wave {wave}: {} of {executed} executed deployments failed, at or above the failure threshold {threshold}",
                counts.failed
            ));
        }
        if wave >= self.last_wave() {
            // The last wave ends when its deployments do; the store marks the rollout
            // completed or failed then.
            return Decision::Wait;
        }
        if counts.total == 0 {
            return Decision::Advance;
        }
        if counts.committed as f64 >= self.success_threshold * counts.total as f64
            && executed >= self.min_executed.min(counts.total)
        {
            return Decision::Advance;
        }
        if executed == counts.total {
            return Decision::Stop(format!(
                "wave {wave}: {} of {} deployments committed, below the success threshold {}",
                counts.committed, counts.total, self.success_threshold
            ));
        }
        Decision::Wait
    }
}

/// The plan's decision for a rollout in progress, from its current wave's counts and, when
/// the plan has a telemetry gate, the drift `evidence` (a wave waits while there is none);
/// and, in the last wave, whether it has ended.
pub fn next_step(row: &RolloutRow, evidence: Option<&DriftEvidence>) -> Decision {
    let mut decision = row.plan.decide(
        row.current_wave,
        WaveCounts::of(&row.deployments, row.current_wave),
    );
    if decision == Decision::Advance
        && let Some(gate) = &row.plan.telemetry_gate
    {
        decision = match evidence.and_then(|e| gate.judge(row.model_version, e)) {
            None => Decision::Wait,
            Some(Ok(())) => Decision::Advance,
            Some(Err(reason)) => Decision::Stop(reason),
        };
    }
    // Ended, and no device is still in its health window (`active`, awaiting a verdict).
    let ended = row
        .deployments
        .iter()
        .all(|d| d.status != "active" && FINAL_STATES.contains(&d.status.as_str()));
    if decision == Decision::Wait && row.current_wave >= row.plan.last_wave() && ended {
        let failed = row
            .deployments
            .iter()
            .filter(|d| !RUNNING_STATES.contains(&d.status.as_str()))
            .count();
        if failed > 0 {
            return Decision::Finish(format!(
                "every deployment has ended: {failed} of {} failed, below the failure threshold",
                row.deployments.len()
            ));
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(waves: &[&str]) -> RolloutPlan {
        RolloutPlan {
            waves: waves.iter().map(|w| w.parse().unwrap()).collect(),
            ..RolloutPlan::default()
        }
    }

    fn devices(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dev-{i:03}")).collect()
    }

    fn sizes(waves: &[u32], count: usize) -> Vec<usize> {
        (0..count as u32)
            .map(|w| waves.iter().filter(|&&x| x == w).count())
            .collect()
    }

    #[test]
    fn wave_sizes_parse_and_print_and_bad_ones_say_why() {
        assert_eq!("5".parse::<WaveSize>(), Ok(WaveSize::Devices(5)));
        assert_eq!(" 12.5% ".parse::<WaveSize>(), Ok(WaveSize::Percent(12.5)));
        assert_eq!(WaveSize::Percent(10.0).to_string(), "10%");
        for bad in ["0", "0%", "101%", "-3", "ten", ""] {
            assert!(bad.parse::<WaveSize>().is_err(), "{bad}");
        }
        let json = r#"{"waves": ["1", "10%", "100%"], "failure_threshold": 0.2}"#;
        let parsed: RolloutPlan = serde_json::from_str(json).unwrap();
        assert_eq!(parsed.waves.len(), 3);
        assert_eq!(parsed.failure_threshold, Some(0.2));
        assert_eq!(parsed.success_threshold, 1.0);
        let back: RolloutPlan =
            serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
        assert_eq!(back, parsed);
        let err = serde_json::from_str::<RolloutPlan>(r#"{"wavez": []}"#).unwrap_err();
        assert!(err.to_string().contains("wavez"), "{err}");
        let err = serde_json::from_str::<RolloutPlan>(r#"{"waves": ["1", "x"]}"#).unwrap_err();
        assert!(err.to_string().contains("`x`"), "{err}");
    }

    #[test]
    fn invalid_plans_name_the_field() {
        let cases = [
            (plan(&[]), "waves"),
            (plan(&["1", "50%"]), "waves: the last wave"),
            (
                plan(&["50%", "10%", "100%"]),
                "waves: percentages must rise",
            ),
            (
                RolloutPlan {
                    success_threshold: 0.0,
                    ..RolloutPlan::default()
                },
                "success_threshold",
            ),
            (
                RolloutPlan {
                    failure_threshold: Some(1.5),
                    ..RolloutPlan::default()
                },
                "failure_threshold",
            ),
            (
                RolloutPlan {
                    min_executed: 0,
                    ..RolloutPlan::default()
                },
                "min_executed",
            ),
            (
                RolloutPlan {
                    device_timeout_s: 0,
                    ..RolloutPlan::default()
                },
                "device_timeout_s",
            ),
        ];
        for (plan, field) in cases {
            let err = plan.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
        plan(&["1", "10%", "50%", "100%"]).validate().unwrap();
        RolloutPlan::default().validate().unwrap();
    }

    #[test]
    fn cohorts_are_deterministic_cumulative_and_differ_between_rollouts() {
        let p = plan(&["1", "10%", "50%", "100%"]);
        let ids = devices(100);
        let a = p.assign(7, &ids);
        assert_eq!(a, p.assign(7, &ids), "same rollout, same cohorts");
        assert_eq!(sizes(&a, 4), [1, 9, 40, 50]);
        let b = p.assign(8, &ids);
        assert_ne!(a, b, "another rollout draws other cohorts");
        // A device's wave does not depend on the order the devices were listed in.
        let mut reversed = ids.clone();
        reversed.reverse();
        let mut r = p.assign(7, &reversed);
        r.reverse();
        assert_eq!(r, a);
        // Small fleets: a wave never shrinks what the previous one reached.
        assert_eq!(sizes(&p.assign(1, &devices(3)), 4), [1, 0, 1, 1]);
        assert_eq!(
            sizes(&plan(&["5", "100%"]).assign(1, &devices(2)), 2),
            [2, 0]
        );
        assert!(
            plan(&["100%"])
                .assign(3, &devices(5))
                .iter()
                .all(|&w| w == 0)
        );
    }

    fn counts(total: u64, committed: u64, failed: u64) -> WaveCounts {
        WaveCounts {
            total,
            committed,
            failed,
        }
    }

    #[test]
    fn a_wave_advances_at_the_success_threshold_and_stops_at_the_failure_threshold() {
        let p = RolloutPlan {
            waves: vec![WaveSize::Devices(10), WaveSize::Percent(100.0)],
            success_threshold: 0.8,
            failure_threshold: Some(0.3),
            min_executed: 4,
            ..RolloutPlan::default()
        };
        assert_eq!(p.decide(0, counts(10, 0, 0)), Decision::Wait);
        assert_eq!(p.decide(0, counts(10, 7, 0)), Decision::Wait);
        assert_eq!(p.decide(0, counts(10, 8, 0)), Decision::Advance);
        // Failures below the minimum executed are not judged yet.
        assert_eq!(p.decide(0, counts(10, 0, 3)), Decision::Wait);
        // 2 of 5 executed: 40 % is over 30 %.
        let Decision::Stop(why) = p.decide(0, counts(10, 3, 2)) else {
            panic!("should stop");
        };
        assert!(why.contains("2 of 5"), "{why}");
        assert_eq!(p.decide(0, counts(10, 8, 2)), Decision::Advance);
        // The last wave stops on failures too, but never advances.
        assert!(matches!(p.decide(1, counts(10, 1, 5)), Decision::Stop(_)));
        assert_eq!(p.decide(1, counts(10, 10, 0)), Decision::Wait);
        // An empty wave (everything superseded) is skipped.
        assert_eq!(p.decide(0, counts(0, 0, 0)), Decision::Advance);
    }

    #[test]
    fn a_wave_that_ends_below_the_success_threshold_stops_even_without_a_failure_threshold() {
        let p = plan(&["2", "100%"]);
        assert_eq!(p.decide(0, counts(2, 1, 0)), Decision::Wait);
        let Decision::Stop(why) = p.decide(0, counts(2, 1, 1)) else {
            panic!("should stop");
        };
        assert!(why.contains("1 of 2 deployments committed"), "{why}");
        // With no failure threshold the last wave just ends; the rollout is then failed.
        assert_eq!(p.decide(1, counts(3, 1, 2)), Decision::Wait);
    }

    #[test]
    fn a_gated_rollout_whose_deployments_all_ended_below_the_threshold_finishes_failed() {
        use crate::store::{FINAL_STATES_SQL, RUNNING_STATES_SQL, RolloutStatus};
        let sql = |states: &[&str]| {
            states
                .iter()
                .map(|s| format!("'{s}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert_eq!(FINAL_STATES_SQL, sql(&FINAL_STATES));
        assert_eq!(RUNNING_STATES_SQL, sql(&RUNNING_STATES));
        let deployment = |status: &str| DeploymentRow {
            device_id: "d".into(),
            status: status.into(),
            detail: None,
            command_seq: None,
            updated_ms: 0,
            wave: 0,
            previous: None,
        };
        let mut row = RolloutRow {
            id: 1,
            model_name: "m".into(),
            model_version: 2,
            rollback: false,
            created_ms: 0,
            status: RolloutStatus::InProgress,
            reason: None,
            plan: RolloutPlan {
                failure_threshold: Some(0.5),
                ..RolloutPlan::default()
            },
            current_wave: 0,
            wave_opened_ms: 0,
            target: None,
            deployments: ["committed", "committed", "rolled_back", "sent"]
                .map(deployment)
                .to_vec(),
        };
        assert_eq!(next_step(&row, None), Decision::Wait, "one has not ended");
        row.deployments[3].status = "active".into();
        assert_eq!(
            next_step(&row, None),
            Decision::Wait,
            "one awaits its health verdict"
        );
        row.deployments[3].status = "committed".into();
        let Decision::Finish(why) = next_step(&row, None) else {
            panic!("should finish");
        };
        assert!(why.contains("1 of 4 failed"), "{why}");
        row.deployments[2].status = "superseded".into();
        assert_eq!(
            next_step(&row, None),
            Decision::Wait,
            "all run it: the store completes it"
        );
        row.deployments[0].status = "failed".into();
        row.deployments[1].status = "timed_out".into();
        assert!(
            matches!(next_step(&row, None), Decision::Stop(_)),
            "2 of 3 executed failed"
        );
    }

    #[test]
    fn the_telemetry_gate_compares_accuracy_and_latency_with_the_old_version() {
        let gate = TelemetryGate {
            max_drift_ratio: 2.0,
            drift_floor: 0.1,
            min_windows: 2,
            max_accuracy_drop: Some(0.05),
            max_mae_rise: None,
            min_labels: 50,
            max_latency_ratio: Some(2.0),
            max_error_rate_increase: Some(0.01),
        };
        gate.validate().unwrap();
        let w = |labelled: u64, accuracy: f64, p99: f64| GateWindow {
            psi_max: 0.05,
            labelled,
            accuracy: (labelled > 0).then_some(accuracy),
            latency_p99_ms: Some(p99),
            samples: 100,
            errors: 0,
            mae: None,
        };
        let judge =
            |new: Vec<GateWindow>, old: Vec<GateWindow>| gate.judge(4, &DriftEvidence { new, old });
        // Too few labels of the new version yet: wait.
        assert_eq!(
            judge(
                vec![w(10, 0.5, 1.0), w(10, 0.5, 1.0)],
                vec![w(100, 0.9, 1.0)]
            ),
            None
        );
        // 0.88 pooled against 0.90: within 0.05.
        assert_eq!(
            judge(
                vec![w(40, 0.85, 1.0), w(60, 0.9, 1.0)],
                vec![w(100, 0.9, 1.0)]
            ),
            Some(Ok(()))
        );
        let Some(Err(why)) = judge(
            vec![w(50, 0.7, 1.0), w(50, 0.8, 1.0)],
            vec![w(100, 0.9, 1.0)],
        ) else {
            panic!("an accuracy drop of 0.15 fails");
        };
        assert!(
            why.contains(
                "accuracy 0.750 on 100 labels is more than 0.05 below the old version's 0.900"
            ),
            "{why}"
        );
        // No old labels: nothing to compare with.
        assert_eq!(
            judge(vec![w(50, 0.5, 1.0), w(50, 0.5, 1.0)], vec![w(0, 0.0, 1.0)]),
            Some(Ok(()))
        );
        // Latency: a median p99 of 10 ms against 2.5 ms is over 2x.
        let Some(Err(why)) = judge(
            vec![w(50, 0.9, 10.0), w(50, 0.9, 10.0)],
            vec![w(100, 0.9, 2.5)],
        ) else {
            panic!("a slower version fails");
        };
        assert!(
            why.contains("p99 latency 10 ms is above 2x the old version's 2.5 ms"),
            "{why}"
        );
        // Errors: 3 in 200 against 1 in 100 is within 0.01 more; 5 in 200 is not.
        let failing = |errors: u64| GateWindow {
            errors,
            ..w(50, 0.9, 1.0)
        };
        let old = vec![GateWindow {
            errors: 1,
            ..w(100, 0.9, 1.0)
        }];
        assert_eq!(
            judge(vec![failing(1), failing(2)], old.clone()),
            Some(Ok(()))
        );
        let Some(Err(why)) = judge(vec![failing(2), failing(3)], old) else {
            panic!("more errors fail");
        };
        assert!(
            why.contains("error rate 0.0250 is more than 0.01 above the old version's 0.0100"),
            "{why}"
        );
        let bad = TelemetryGate {
            max_latency_ratio: Some(0.5),
            ..gate.clone()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("max_latency_ratio")
        );
    }

    #[test]
    fn the_telemetry_gate_compares_a_regressions_error_with_the_old_version() {
        let gate = TelemetryGate {
            max_mae_rise: Some(0.1),
            min_windows: 2,
            ..TelemetryGate::default()
        };
        gate.validate().unwrap();
        let w = |values: u64, mae: f64| GateWindow {
            psi_max: 0.05,
            labelled: values,
            mae: (values > 0).then_some(mae),
            ..GateWindow::default()
        };
        let judge =
            |new: Vec<GateWindow>, old: Vec<GateWindow>| gate.judge(3, &DriftEvidence { new, old });
        // Too few true values of the new version yet: wait.
        assert_eq!(judge(vec![w(10, 9.0), w(10, 9.0)], vec![w(100, 1.0)]), None);
        // Pooled: (30·1.0 + 70·1.1) / 100 = 1.07 against 1.0, within a tenth more.
        assert_eq!(
            judge(vec![w(30, 1.0), w(70, 1.1)], vec![w(60, 0.9), w(40, 1.15)]),
            Some(Ok(()))
        );
        let Some(Err(why)) = judge(vec![w(50, 1.2), w(50, 1.4)], vec![w(100, 1.0)]) else {
            panic!("an error a third higher fails");
        };
        assert!(
            why.contains(
                "v3's mean absolute error 1.3000 on 100 true values is more than 0.1 above the old version's 1.0000 on 100"
            ),
            "{why}"
        );
        // Windows without true values do not count.
        assert_eq!(
            judge(vec![w(50, 1.0), w(50, 1.0), w(0, 0.0)], vec![w(0, 0.0)]),
            Some(Ok(())),
            "no old true values: nothing to compare with"
        );
        // A classifier's labelled windows: the comparison does not apply, nothing waits.
        let classified = |labelled: u64| GateWindow {
            psi_max: 0.05,
            labelled,
            accuracy: Some(0.9),
            ..GateWindow::default()
        };
        assert_eq!(
            judge(vec![classified(10), classified(10)], vec![classified(10)]),
            Some(Ok(()))
        );
        let bad = TelemetryGate {
            max_mae_rise: Some(-0.1),
            ..gate.clone()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("max_mae_rise")
        );
    }

    #[test]
    fn the_telemetry_gate_holds_a_wave_until_it_has_evidence_and_stops_a_drifting_version() {
        let gate = TelemetryGate {
            max_drift_ratio: 2.0,
            drift_floor: 0.1,
            min_windows: 3,
            max_accuracy_drop: None,
            max_mae_rise: None,
            min_labels: 50,
            max_latency_ratio: None,
            max_error_rate_increase: None,
        };
        let windows = |psi: &[f64]| {
            psi.iter()
                .map(|&psi_max| GateWindow {
                    psi_max,
                    ..GateWindow::default()
                })
                .collect()
        };
        let evidence = |new: &[f64], old: &[f64]| DriftEvidence {
            new: windows(new),
            old: windows(old),
        };
        assert_eq!(
            gate.judge(2, &evidence(&[0.5, 0.5], &[0.1])),
            None,
            "too few windows"
        );
        assert_eq!(
            gate.judge(2, &evidence(&[0.05, 0.3, 0.1], &[0.06, 0.07])),
            Some(Ok(()))
        );
        // Below the floor passes even against a calmer old version.
        assert_eq!(
            gate.judge(2, &evidence(&[0.08, 0.09, 0.07], &[0.01])),
            Some(Ok(()))
        );
        let Some(Err(why)) = gate.judge(2, &evidence(&[5.0, 6.0, 7.0, 8.0], &[0.1, 0.2, 0.1]))
        else {
            panic!("should fail");
        };
        assert!(
            why.starts_with(
                "telemetry gate: v2's median drift (PSI) 6.500 over 4 windows is above 0.200"
            ),
            "{why}"
        );
        // A version that drifts less than the old one (a retrained model) passes.
        assert_eq!(
            gate.judge(2, &evidence(&[0.05, 0.06, 0.05], &[8.0, 9.0])),
            Some(Ok(()))
        );
        // No old windows: judged against the floor alone.
        assert!(matches!(
            gate.judge(2, &evidence(&[0.5, 0.5, 0.5], &[])),
            Some(Err(_))
        ));

        // In a rollout: the wave's success alone no longer opens the next wave.
        let mut p = plan(&["1", "100%"]);
        p.telemetry_gate = Some(gate);
        p.validate().unwrap();
        let row = RolloutRow {
            id: 1,
            model_name: "m".into(),
            model_version: 2,
            rollback: false,
            created_ms: 0,
            status: crate::store::RolloutStatus::InProgress,
            reason: None,
            plan: p,
            current_wave: 0,
            wave_opened_ms: 0,
            target: None,
            deployments: vec![DeploymentRow {
                device_id: "d".into(),
                status: "committed".into(),
                detail: None,
                command_seq: None,
                updated_ms: 0,
                wave: 0,
                previous: None,
            }],
        };
        assert_eq!(next_step(&row, None), Decision::Wait);
        assert_eq!(
            next_step(&row, Some(&evidence(&[0.1], &[0.1]))),
            Decision::Wait
        );
        assert_eq!(
            next_step(&row, Some(&evidence(&[0.1; 3], &[0.1]))),
            Decision::Advance
        );
        assert!(matches!(
            next_step(&row, Some(&evidence(&[9.0; 3], &[0.1]))),
            Decision::Stop(_)
        ));
        let bad = RolloutPlan {
            telemetry_gate: Some(TelemetryGate {
                max_drift_ratio: 0.5,
                drift_floor: 0.1,
                min_windows: 3,
                max_accuracy_drop: None,
                max_mae_rise: None,
                min_labels: 50,
                max_latency_ratio: None,
                max_error_rate_increase: None,
            }),
            ..RolloutPlan::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("telemetry_gate.max_drift_ratio")
        );
    }

    #[test]
    fn wave_counts_leave_out_superseded_and_cancelled_deployments() {
        let row = |status: &str, wave: u32| DeploymentRow {
            device_id: "d".into(),
            status: status.into(),
            detail: None,
            command_seq: None,
            updated_ms: 0,
            wave,
            previous: None,
        };
        let deployments = [
            row("committed", 0),
            row("rolled_back", 0),
            row("timed_out", 0),
            row("active", 0),
            row("superseded", 0),
            row("cancelled", 0),
            row("committed", 1),
        ];
        assert_eq!(WaveCounts::of(&deployments, 0), counts(4, 1, 2));
        assert_eq!(WaveCounts::of(&deployments, 1), counts(1, 1, 0));
    }
}
