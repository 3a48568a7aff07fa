//! Retraining triggers. A policy per model watches the fleet's drift windows; when enough
//! devices drift for long enough it fires one retraining (one at a time per model, then a
//! cooldown), starts a trainer (a webhook to a training pipeline, or a local command), and
//! once a candidate that passed the quality gate is published, rolls it out by the policy's
//! plan, canary first. Every step is stored, so a controller restart picks it up again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgeloop_agent::now_ms;
use edgeloop_shared::protocol::SampleFormat;
use edgeloop_shared::signing::SecretKey;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::gate::GatePolicy;
use crate::plan::RolloutPlan;
use crate::registry::{self, ArtifactStore, PublishError, PublishRequest, QualityGate};
use crate::rollout::{self, ENGINE, RolloutRequest};
use crate::store::{
    RetrainingRow, RetrainingStatus, RetrainingUpdate, RolloutStatus, Store, StoreError,
    WindowPoint, record_audit_now,
};

/// The header that carries the webhook body's HMAC-SHA256, as `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-edgeloop-signature";

/// Who starts the training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trainer {
    /// POST a JSON description of the retraining to a pipeline (Airflow, Kubeflow, a CI
    /// dispatch…), which publishes the candidate with `edgeloop model publish --holdout`.
    Webhook {
        url: String,
        /// The environment variable holding the HMAC-SHA256 key…
        #[serde(default)]
        secret_env: Option<String>,
        /// …or a file holding it (trailing whitespace ignored). Unsigned when neither.
        #[serde(default)]
        secret_file: Option<PathBuf>,
        /// Extra headers (for example `Authorization`).
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// How the body wraps the payload, for the receiving API.
        #[serde(default)]
        format: WebhookFormat,
        /// Attempts after the first, with doubling waits from 1 s, on 5xx, 408, 429 and
        /// network errors.
        #[serde(default = "Trainer::default_retries")]
        retries: u32,
        #[serde(default = "Trainer::default_request_timeout_s")]
        timeout_s: u64,
    },
    /// The built-in reference trainer ([`crate::trainer`]): fits a softmax regression to the
    /// policy's `dataset` (a labelled CSV) inside the controller.
    Builtin {
        #[serde(default = "Trainer::default_label_column")]
        label_column: String,
        #[serde(default = "Trainer::default_epochs")]
        epochs: usize,
    },
    /// Run a program that writes `model.onnx` and `reference.csv` (for a tensor model
    /// `reference.npy`) into `$EDGELOOP_OUTPUT_DIR`; the controller publishes them through
    /// the quality gate.
    Command {
        program: PathBuf,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default = "Trainer::default_command_timeout_s")]
        timeout_s: u64,
    },
}

impl Trainer {
    fn default_label_column() -> String {
        crate::trainer::TrainOptions::default().label_column
    }
    fn default_epochs() -> usize {
        crate::trainer::TrainOptions::default().epochs
    }
    fn default_retries() -> u32 {
        3
    }
    fn default_request_timeout_s() -> u64 {
        10
    }
    fn default_command_timeout_s() -> u64 {
        3600
    }
}

/// How a retraining collects the devices' input samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectSamples {
    /// At most this many rows per device.
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// Train once every device answered, or after this long with the parts that came.
    #[serde(default = "CollectSamples::default_wait_s")]
    pub wait_s: u64,
}

impl CollectSamples {
    fn default_wait_s() -> u64 {
        300
    }
}

/// The samples a retraining collected, as its trainer receives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplesRef {
    pub dataset_id: u64,
    /// CSV for a table model's samples, NPY for a tensor model's (absent before tensor
    /// samples: CSV).
    #[serde(default)]
    pub format: SampleFormat,
    /// Where to fetch the merged file (`GET`, digest in `x-edgeloop-sha256`).
    pub url: String,
    pub sha256: String,
    pub rows: u64,
    /// The devices whose sample is in it.
    pub devices: Vec<String>,
}

/// Collected samples: what the trainer is told, and the file.
#[derive(Debug, Clone)]
struct Collected {
    reference: SamplesRef,
    file: Vec<u8>,
}

/// The shape of a webhook's body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// The [`WebhookPayload`] itself.
    #[default]
    Plain,
    /// Airflow's REST API, `POST /api/v1/dags/{dag_id}/dagRuns`:
    /// `{"dag_run_id": "edgeloop-retraining-<id>", "conf": payload}`.
    Airflow,
    /// GitHub's `POST /repos/{owner}/{repo}/dispatches`:
    /// `{"event_type": "edgeloop-retraining", "client_payload": payload}`.
    Github,
}

impl WebhookFormat {
    /// The request body for `payload`.
    pub fn body(self, payload: &WebhookPayload) -> Vec<u8> {
        let value = match self {
            WebhookFormat::Plain => serde_json::to_value(payload),
            WebhookFormat::Airflow => Ok(serde_json::json!({
                "dag_run_id": format!("edgeloop-retraining-{}", payload.retraining_id),
                "conf": payload,
            })),
            WebhookFormat::Github => Ok(serde_json::json!({
                "event_type": "edgeloop-retraining",
                "client_payload": payload,
            })),
        };
        serde_json::to_vec(&value.expect("the payload serializes")).expect("JSON serializes")
    }
}

/// When to retrain a model, how, and how to ship the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainingPolicy {
    /// The model name.
    pub model: String,
    /// A window drifts when its largest feature PSI reaches this…
    #[serde(default = "RetrainingPolicy::default_psi_threshold")]
    pub psi_threshold: f64,
    /// …or, when set, when at least this share of the model's features drifted under the
    /// model's drift policy (the window's dataset drift).
    #[serde(default)]
    pub min_drift_share: Option<f64>,
    /// …or, when true, when the model's predicted classes drifted from the reference's
    /// (the window's `prediction_drift`, under the model's drift policy).
    #[serde(default)]
    pub on_prediction_drift: bool,
    /// When set, a window with at least `min_labels` labelled predictions (feedback) has
    /// lost accuracy when its accuracy is below this.
    #[serde(default)]
    pub min_accuracy: Option<f64>,
    /// For a regression, when set: a window with at least `min_labels` true values has
    /// lost accuracy when its mean absolute error on them is above this (in the target's
    /// units).
    #[serde(default)]
    pub max_mae: Option<f64>,
    #[serde(default = "RetrainingPolicy::default_min_labels")]
    pub min_labels: u64,
    /// A device drifts when this many of its newest windows on its current version all do.
    #[serde(default = "RetrainingPolicy::default_consecutive_windows")]
    pub consecutive_windows: u32,
    /// Drifting devices needed, at least…
    #[serde(default = "RetrainingPolicy::default_min_devices")]
    pub min_devices: u64,
    /// …and at least this share of the devices reporting on that version.
    #[serde(default = "RetrainingPolicy::default_min_share")]
    pub min_share: f64,
    /// Windows received longer ago than this do not count.
    #[serde(default = "RetrainingPolicy::default_horizon_s")]
    pub horizon_s: u64,
    /// After a retraining fires, none fires for the model for this long.
    #[serde(default = "RetrainingPolicy::default_cooldown_s")]
    pub cooldown_s: u64,
    /// Also retrain on a schedule: when no retraining of the model has fired for this many
    /// seconds, whatever the drift.
    #[serde(default)]
    pub schedule_s: Option<u64>,
    /// A retraining with no candidate published this long after it fired is rejected.
    #[serde(default = "RetrainingPolicy::default_candidate_timeout_s")]
    pub candidate_timeout_s: u64,
    pub trainer: Trainer,
    /// Training data handed to the trainer (`EDGELOOP_DATASET`, and in the webhook body).
    #[serde(default)]
    pub dataset: Option<PathBuf>,
    /// Labelled holdout for the quality gate of a command trainer's candidate.
    #[serde(default)]
    pub holdout: Option<PathBuf>,
    /// Before training, ask the devices that run the model for their input samples and
    /// hand the merged dataset to the trainer.
    #[serde(default)]
    pub collect_samples: Option<CollectSamples>,
    #[serde(default)]
    pub gate: GatePolicy,
    /// How the candidate is rolled out.
    #[serde(default = "RetrainingPolicy::default_rollout")]
    pub rollout: RolloutPlan,
}

impl RetrainingPolicy {
    fn default_psi_threshold() -> f64 {
        0.25
    }
    fn default_consecutive_windows() -> u32 {
        2
    }
    fn default_min_labels() -> u64 {
        20
    }
    fn default_min_devices() -> u64 {
        1
    }
    fn default_min_share() -> f64 {
        0.5
    }
    fn default_horizon_s() -> u64 {
        3600
    }
    fn default_cooldown_s() -> u64 {
        3600
    }
    fn default_candidate_timeout_s() -> u64 {
        86_400
    }
    /// A canary, then a tenth, then everyone; a failed wave pauses.
    fn default_rollout() -> RolloutPlan {
        RolloutPlan {
            waves: ["1", "10%", "100%"]
                .iter()
                .map(|w| w.parse().expect("valid wave"))
                .collect(),
            failure_threshold: Some(0.2),
            ..RolloutPlan::default()
        }
    }

    /// Checks every field; the error names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !edgeloop_shared::is_valid_identifier(&self.model) {
            return Err(format!("model: `{}` is not a valid model name", self.model));
        }
        if !(self.psi_threshold > 0.0 && self.psi_threshold.is_finite()) {
            return Err(format!(
                "psi_threshold: {} must be above 0",
                self.psi_threshold
            ));
        }
        for (field, share) in [
            ("min_drift_share", self.min_drift_share),
            ("min_accuracy", self.min_accuracy),
        ] {
            if let Some(v) = share
                && !(v > 0.0 && v <= 1.0)
            {
                return Err(format!("{field}: {v} is not a share above 0 and at most 1"));
            }
        }
        if let Some(v) = self.max_mae
            && !(v > 0.0 && v.is_finite())
        {
            return Err(format!("max_mae: {v} must be above 0"));
        }
        if self.min_labels == 0 {
            return Err("min_labels: must be at least 1".into());
        }
        if self.consecutive_windows == 0 || self.consecutive_windows > 1000 {
            return Err("consecutive_windows: must be 1 to 1000".into());
        }
        if self.min_devices == 0 {
            return Err("min_devices: must be at least 1".into());
        }
        if self.schedule_s == Some(0) {
            return Err("schedule_s: must be at least 1".into());
        }
        if !(self.min_share > 0.0 && self.min_share <= 1.0) {
            return Err(format!(
                "min_share: {} is not a share above 0 and at most 1",
                self.min_share
            ));
        }
        for (field, value) in [
            ("horizon_s", self.horizon_s),
            ("candidate_timeout_s", self.candidate_timeout_s),
        ] {
            if value == 0 {
                return Err(format!("{field}: must be at least 1"));
            }
        }
        match &self.trainer {
            Trainer::Webhook {
                url,
                timeout_s,
                secret_env,
                secret_file,
                ..
            } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!("trainer.url: `{url}` is not an http(s) URL"));
                }
                if secret_env.is_some() && secret_file.is_some() {
                    return Err(
                        "trainer.secret_file: give secret_env or secret_file, not both".into(),
                    );
                }
                if *timeout_s == 0 {
                    return Err("trainer.timeout_s: must be at least 1".into());
                }
            }
            Trainer::Builtin {
                label_column,
                epochs,
            } => {
                crate::trainer::TrainOptions {
                    label_column: label_column.clone(),
                    epochs: *epochs,
                    ..Default::default()
                }
                .validate()
                .map_err(|e| format!("trainer.{e}"))?;
                if self.dataset.is_none() {
                    return Err(
                        "dataset: the built-in trainer fits a labelled dataset; name one".into(),
                    );
                }
                if self.holdout.is_none() {
                    return Err(
                        "holdout: the built-in trainer's candidate is gated on a holdout; name one"
                            .into(),
                    );
                }
            }
            Trainer::Command {
                program, timeout_s, ..
            } => {
                if program.as_os_str().is_empty() {
                    return Err("trainer.program: must name a program".into());
                }
                if *timeout_s == 0 {
                    return Err("trainer.timeout_s: must be at least 1".into());
                }
                if self.holdout.is_none() {
                    return Err(
                        "holdout: a command trainer's candidate is gated on a holdout; name one"
                            .into(),
                    );
                }
            }
        }
        if let Some(collect) = &self.collect_samples {
            if collect.wait_s == 0 {
                return Err("collect_samples.wait_s: must be at least 1".into());
            }
            if collect.max_rows == Some(0) {
                return Err("collect_samples.max_rows: must be at least 1".into());
            }
        }
        self.gate.validate().map_err(|e| format!("gate: {e}"))?;
        self.rollout
            .validate()
            .map_err(|e| format!("rollout: {e}"))?;
        Ok(())
    }

    /// Whether the windows say the model must be retrained: for each device its newest
    /// `consecutive_windows` windows on its current version all drifted (or, with
    /// `min_accuracy`, all lost accuracy; with `max_mae`, all erred above it); enough such
    /// devices among those reporting on one version. Drift is judged first.
    pub fn evaluate(&self, windows: &[WindowPoint]) -> Option<Fired> {
        let n = self.consecutive_windows;
        let drifted = |w: &WindowPoint| {
            w.psi_max >= self.psi_threshold
                || self.min_drift_share.is_some_and(|s| w.drift_share >= s)
                || (self.on_prediction_drift && w.prediction_drift)
        };
        if let Some((version, devices, reporting, worst)) =
            self.judge(windows, drifted, |w| w.psi_max, f64::max)
        {
            let mut shares = match self.min_drift_share {
                Some(s) => format!(" (or at least {s} of the features drifting)"),
                None => String::new(),
            };
            if self.on_prediction_drift {
                shares.push_str(" (or the predictions' distribution drifting)");
            }
            return Some(Fired {
                reason: format!(
                    "{} of {reporting} devices on v{version} drifted: PSI at or above {}{shares} in each of their last {n} windows (worst {worst:.3})",
                    devices.len(),
                    self.psi_threshold
                ),
                version,
                drifting: devices,
                reporting,
            });
        }
        self.lost_accuracy(windows)
            .or_else(|| self.error_rose(windows))
    }

    /// With `min_accuracy`: enough devices whose newest windows all lost accuracy.
    fn lost_accuracy(&self, windows: &[WindowPoint]) -> Option<Fired> {
        let floor = self.min_accuracy?;
        let lost = |w: &WindowPoint| {
            w.labelled >= self.min_labels && w.accuracy.is_some_and(|a| a < floor)
        };
        let accuracy = |w: &WindowPoint| w.accuracy.unwrap_or(1.0);
        let (version, devices, reporting, worst) = self.judge(windows, lost, accuracy, f64::min)?;
        Some(Fired {
            reason: format!(
                "{} of {reporting} devices on v{version} lost accuracy: below {floor} on at least {} labelled predictions in each of their last {} windows (worst {worst:.3})",
                devices.len(),
                self.min_labels,
                self.consecutive_windows
            ),
            version,
            drifting: devices,
            reporting,
        })
    }

    /// With `max_mae`: enough devices whose newest windows of a regression all erred more.
    fn error_rose(&self, windows: &[WindowPoint]) -> Option<Fired> {
        let ceiling = self.max_mae?;
        let erred =
            |w: &WindowPoint| w.labelled >= self.min_labels && w.mae.is_some_and(|e| e > ceiling);
        let mae = |w: &WindowPoint| w.mae.unwrap_or(0.0);
        let (version, devices, reporting, worst) = self.judge(windows, erred, mae, f64::max)?;
        Some(Fired {
            reason: format!(
                "{} of {reporting} devices on v{version} lost accuracy: mean absolute error above {ceiling} on at least {} true values in each of their last {} windows (worst {worst:.3})",
                devices.len(),
                self.min_labels,
                self.consecutive_windows
            ),
            version,
            drifting: devices,
            reporting,
        })
    }

    /// The version on which enough devices have `bad` newest windows: the version, those
    /// devices, how many report on it, and the worst `score` among their windows.
    fn judge(
        &self,
        windows: &[WindowPoint],
        bad: impl Fn(&WindowPoint) -> bool,
        score: impl Fn(&WindowPoint) -> f64,
        worse: fn(f64, f64) -> f64,
    ) -> Option<(u64, Vec<String>, usize, f64)> {
        let n = self.consecutive_windows as usize;
        let mut by_device = BTreeMap::<&str, Vec<&WindowPoint>>::new();
        for w in windows {
            by_device.entry(&w.device_id).or_default().push(w);
        }
        // version → (reporting devices, bad devices, worst score)
        let mut versions = BTreeMap::<u64, (usize, Vec<String>, Option<f64>)>::new();
        for (device, mut ws) in by_device {
            ws.sort_by_key(|w| std::cmp::Reverse(w.window_end_ms));
            let version = ws[0].model_version;
            let current: Vec<&&WindowPoint> = ws
                .iter()
                .take_while(|w| w.model_version == version)
                .take(n)
                .collect();
            let entry = versions.entry(version).or_default();
            entry.0 += 1;
            if current.len() == n && current.iter().all(|w| bad(w)) {
                entry.1.push(device.to_string());
                for w in &current {
                    let s = score(w);
                    entry.2 = Some(entry.2.map_or(s, |worst| worse(worst, s)));
                }
            }
        }
        versions
            .into_iter()
            .find(|(_, (reporting, bad, _))| {
                bad.len() as u64 >= self.min_devices
                    && bad.len() as f64 >= self.min_share * *reporting as f64
            })
            .map(|(version, (reporting, bad, worst))| {
                (version, bad, reporting, worst.unwrap_or_default())
            })
    }
}

impl RetrainingPolicy {
    /// A scheduled retraining of the version most of the model's devices run (`versions`:
    /// one entry per device); None without a schedule or a device. Whether it is due is the
    /// store's to say ([`crate::store::Store::start_retraining`] with the schedule as the
    /// cooldown).
    pub fn scheduled(&self, versions: &[u64]) -> Option<Fired> {
        let every = self.schedule_s?;
        let mut counts = BTreeMap::<u64, usize>::new();
        for v in versions {
            *counts.entry(*v).or_default() += 1;
        }
        let (version, _) = counts.into_iter().max_by_key(|(v, n)| (*n, *v))?;
        Some(Fired {
            version,
            drifting: Vec::new(),
            reporting: versions.len(),
            reason: format!("schedule: none fired in the last {every} s"),
        })
    }
}

/// A trigger's evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub version: u64,
    pub drifting: Vec<String>,
    pub reporting: usize,
    pub reason: String,
}

/// The JSON a webhook trainer receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookPayload {
    pub event: String,
    pub retraining_id: u64,
    pub model: String,
    pub from_version: u64,
    pub reason: String,
    pub drifting_devices: Vec<String>,
    pub dataset: Option<String>,
    pub dataset_sha256: Option<String>,
    /// The devices' input samples, when the policy collects them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<SamplesRef>,
    /// The controller's API, for the pipeline to follow up.
    pub controller_url: String,
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The retraining actor: evaluates every policy on a tick and moves retrainings on.
pub struct Retrainer {
    pub store: Arc<dyn Store>,
    pub artifacts: ArtifactStore,
    pub key: SecretKey,
    pub policies: Vec<RetrainingPolicy>,
    /// Where trainers' working directories and logs go (`{data_dir}/retrainings/{id}`).
    pub data_dir: PathBuf,
    pub controller_url: String,
    pub interval: Duration,
    /// Wakes the rollout dispatcher when a candidate's rollout is created.
    pub dispatcher_wake: Arc<Notify>,
    /// This replica's name for the `retrainer` lease.
    pub holder: String,
}

const LEASE_TTL: Duration = Duration::from_secs(30);

impl Retrainer {
    pub async fn run(self, shutdown: CancellationToken) {
        if self.policies.is_empty() {
            return;
        }
        let this = Arc::new(self);
        let mut tick = tokio::time::interval(this.interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            match this
                .store
                .acquire_lease(
                    "retrainer",
                    &this.holder,
                    now_ms(),
                    LEASE_TTL.as_millis() as u64,
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!(error = %e, "cannot take the retrainer lease; retrying");
                    continue;
                }
            }
            if let Err(e) = this.step(&shutdown).await {
                warn!(error = %e, "retraining step failed; retrying");
            }
        }
    }

    async fn step(self: &Arc<Self>, shutdown: &CancellationToken) -> Result<(), StoreError> {
        let now = now_ms();
        let open: Vec<RetrainingRow> = self
            .store
            .retrainings(1000)
            .await?
            .into_iter()
            .filter(|r| r.status.is_open())
            .collect();
        for row in &open {
            if let Some(policy) = self.policies.iter().find(|p| p.model == row.model_name) {
                self.progress(policy, row, now).await?;
            }
        }
        for policy in &self.policies {
            let since = now.saturating_sub(policy.horizon_s * 1000);
            let windows = self
                .store
                .recent_windows(&policy.model, policy.consecutive_windows, since)
                .await?;
            let (fired, quiet_for_s) = match policy.evaluate(&windows) {
                Some(fired) => (fired, policy.cooldown_s),
                None => {
                    let versions: Vec<u64> = self
                        .store
                        .devices()
                        .await?
                        .into_iter()
                        .filter(|d| d.model_name.as_deref() == Some(policy.model.as_str()))
                        .filter_map(|d| d.model_version)
                        .collect();
                    match (policy.scheduled(&versions), policy.schedule_s) {
                        (Some(fired), Some(every)) => (fired, every),
                        _ => continue,
                    }
                }
            };
            // Fired now, not at the step's start: windows stored since then may be part of
            // the evidence, and a retraining never fires before what made it fire.
            let fired_ms = now_ms();
            let cooldown_since = fired_ms.saturating_sub(quiet_for_s * 1000);
            let Some(row) = self
                .store
                .start_retraining(
                    &policy.model,
                    fired.version,
                    &fired.reason,
                    fired_ms,
                    cooldown_since,
                )
                .await?
            else {
                continue;
            };
            info!(retraining = row.id, model = %policy.model, reason = %fired.reason, "retraining fired");
            self.audit("retraining.fire", &row, Some(fired.reason.clone()))
                .await;
            let (this, policy, shutdown) = (self.clone(), policy.clone(), shutdown.clone());
            tokio::spawn(async move {
                this.train(&policy, &row, &fired, shutdown).await;
            });
        }
        Ok(())
    }

    /// Moves an open retraining on: a published candidate that passed the gate is rolled
    /// out; the rollout's end ends the retraining.
    async fn progress(
        &self,
        policy: &RetrainingPolicy,
        row: &RetrainingRow,
        now: u64,
    ) -> Result<(), StoreError> {
        match row.status {
            RetrainingStatus::Training => {
                let candidate = self
                    .store
                    .models()
                    .await?
                    .into_iter()
                    .filter(|m| {
                        m.name == row.model_name
                            && m.version > row.from_version
                            && m.created_ms >= row.fired_ms
                    })
                    .max_by_key(|m| m.version);
                let Some(candidate) = candidate else {
                    if now.saturating_sub(row.fired_ms) > policy.candidate_timeout_s * 1000 {
                        self.end(
                            row,
                            RetrainingUpdate::status(
                                RetrainingStatus::Rejected,
                                format!(
                                    "no candidate was published within candidate_timeout_s ({} s)",
                                    policy.candidate_timeout_s
                                ),
                            ),
                            true,
                        )
                        .await;
                    }
                    return Ok(());
                };
                let verdict = candidate
                    .lineage
                    .as_ref()
                    .and_then(|l| l.gates.get("quality"))
                    .cloned();
                if !verdict.as_deref().is_some_and(|v| v.starts_with("passed")) {
                    self.end(
                        row,
                        RetrainingUpdate {
                            candidate_version: Some(candidate.version),
                            gate: verdict,
                            ..RetrainingUpdate::status(
                                RetrainingStatus::Rejected,
                                format!(
                                    "v{} was published without passing the quality gate (publish it with --holdout)",
                                    candidate.version
                                ),
                            )
                        },
                        true,
                    )
                    .await;
                    return Ok(());
                }
                let devices: Vec<String> = self
                    .store
                    .devices()
                    .await?
                    .into_iter()
                    .filter(|d| d.model_name.as_deref() == Some(row.model_name.as_str()))
                    .map(|d| d.id)
                    .collect();
                let created = rollout::create(
                    self.store.as_ref(),
                    RolloutRequest {
                        devices: Some(devices),
                        plan: policy.rollout.clone(),
                        reason: Some(format!("retraining {}: {}", row.id, row.reason)),
                        ..RolloutRequest::new(&row.model_name, candidate.version)
                    },
                )
                .await;
                match created {
                    Ok(rollout) => {
                        self.dispatcher_wake.notify_one();
                        let update = RetrainingUpdate {
                            candidate_version: Some(candidate.version),
                            gate: verdict,
                            rollout_id: Some(rollout.id),
                            ..RetrainingUpdate::status(
                                RetrainingStatus::RollingOut,
                                format!(
                                    "rolling out v{} (rollout {})",
                                    candidate.version, rollout.id
                                ),
                            )
                        };
                        self.store.update_retraining(row.id, &update, now).await?;
                        info!(
                            retraining = row.id,
                            rollout = rollout.id,
                            version = candidate.version,
                            "candidate rolling out"
                        );
                    }
                    Err(e) => {
                        self.end(
                            row,
                            RetrainingUpdate::status(
                                RetrainingStatus::Failed,
                                format!("cannot roll out v{}: {e}", candidate.version),
                            ),
                            true,
                        )
                        .await;
                    }
                }
            }
            RetrainingStatus::RollingOut => {
                let Some(id) = row.rollout_id else {
                    return Ok(());
                };
                let Some(rollout) = self.store.rollout(id).await? else {
                    return Ok(());
                };
                // Completed once every device has judged the candidate healthy, not merely
                // activated it: a health window may still roll it back.
                let judged = rollout
                    .deployments
                    .iter()
                    .all(|d| matches!(d.status.as_str(), "committed" | "superseded"));
                let ended = match rollout.status {
                    RolloutStatus::Completed if judged => {
                        Some((RetrainingStatus::Completed, false))
                    }
                    RolloutStatus::Completed => None,
                    RolloutStatus::Failed | RolloutStatus::Aborted => {
                        Some((RetrainingStatus::Failed, true))
                    }
                    RolloutStatus::InProgress | RolloutStatus::Paused => None,
                };
                if let Some((status, alert)) = ended {
                    let detail = format!(
                        "rollout {id} {}{}",
                        rollout.status.as_str(),
                        rollout.reason.map(|r| format!(": {r}")).unwrap_or_default()
                    );
                    self.end(row, RetrainingUpdate::status(status, detail), alert)
                        .await;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Ends a retraining; an alert is an error in the log and an `retraining.alert` audit
    /// entry.
    async fn end(&self, row: &RetrainingRow, update: RetrainingUpdate, alert: bool) {
        match self
            .store
            .update_retraining(row.id, &update, now_ms())
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(retraining = row.id, error = %e, "cannot record the retraining's end");
                return;
            }
        }
        let detail = update.detail.clone().unwrap_or_default();
        if alert {
            error!(retraining = row.id, model = %row.model_name, status = update.status.as_str(), %detail, "retraining alert");
            self.audit("retraining.alert", row, Some(detail)).await;
        } else {
            info!(retraining = row.id, status = update.status.as_str(), %detail, "retraining ended");
            self.audit(
                &format!("retraining.{}", update.status.as_str()),
                row,
                Some(detail),
            )
            .await;
        }
    }

    async fn audit(&self, action: &str, row: &RetrainingRow, detail: Option<String>) {
        record_audit_now(
            self.store.as_ref(),
            ENGINE,
            action,
            format!("retraining/{}", row.id),
            detail,
        )
        .await;
    }

    /// Runs the policy's trainer for a fired retraining.
    async fn train(
        &self,
        policy: &RetrainingPolicy,
        row: &RetrainingRow,
        fired: &Fired,
        shutdown: CancellationToken,
    ) {
        let samples = match &policy.collect_samples {
            None => None,
            Some(collect) => match self.collect(row, collect, &shutdown).await {
                Ok(collected) => Some(collected),
                Err(update) => return self.end(row, update, true).await,
            },
        };
        let outcome = match &policy.trainer {
            Trainer::Webhook {
                url,
                secret_env,
                secret_file,
                headers,
                format,
                retries,
                timeout_s,
            } => {
                let reference = samples.as_ref().map(|s| s.reference.clone());
                let body = format.body(&self.payload(policy, row, fired, reference));
                let secret = webhook_secret(secret_env.as_deref(), secret_file.as_deref());
                let called = match secret {
                    Ok(secret) => {
                        call_webhook(url, secret.as_deref(), headers, *retries, *timeout_s, body)
                            .await
                    }
                    Err(e) => Err(e),
                };
                called
                    .map(|answer| {
                        format!("the webhook accepted ({answer}); waiting for the pipeline to publish a candidate")
                    })
                    .map_err(|e| RetrainingUpdate::status(RetrainingStatus::Failed, e))
            }
            Trainer::Builtin {
                label_column,
                epochs,
            } => {
                let options = crate::trainer::TrainOptions {
                    label_column: label_column.clone(),
                    epochs: *epochs,
                    ..Default::default()
                };
                self.run_builtin(policy, row, options).await
            }
            Trainer::Command {
                program,
                args,
                timeout_s,
            } => {
                let samples = samples.as_ref();
                self.run_command(
                    policy, row, fired, samples, program, args, *timeout_s, shutdown,
                )
                .await
            }
        };
        match outcome {
            Ok(detail) => {
                let update = RetrainingUpdate::status(RetrainingStatus::Training, detail);
                if let Err(e) = self
                    .store
                    .update_retraining(row.id, &update, now_ms())
                    .await
                {
                    warn!(retraining = row.id, error = %e, "cannot record the trainer's result");
                }
            }
            Err(update) => self.end(row, update, true).await,
        }
    }

    fn payload(
        &self,
        policy: &RetrainingPolicy,
        row: &RetrainingRow,
        fired: &Fired,
        samples: Option<SamplesRef>,
    ) -> WebhookPayload {
        WebhookPayload {
            event: "retraining".into(),
            retraining_id: row.id,
            model: row.model_name.clone(),
            from_version: row.from_version,
            reason: row.reason.clone(),
            drifting_devices: fired.drifting.clone(),
            dataset: policy.dataset.as_ref().map(|p| p.display().to_string()),
            dataset_sha256: policy
                .dataset
                .as_ref()
                .and_then(|p| std::fs::read(p).ok())
                .map(|b| edgeloop_shared::sha256_hex(&b)),
            samples,
            controller_url: self.controller_url.clone(),
        }
    }

    /// Runs the command trainer and publishes what it wrote through the quality gate.
    /// Ok: what was published; Err: how the retraining ends.
    #[allow(clippy::too_many_arguments)]
    async fn run_command(
        &self,
        policy: &RetrainingPolicy,
        row: &RetrainingRow,
        fired: &Fired,
        samples: Option<&Collected>,
        program: &Path,
        args: &[String],
        timeout_s: u64,
        shutdown: CancellationToken,
    ) -> Result<String, RetrainingUpdate> {
        let failed = |m: String| RetrainingUpdate::status(RetrainingStatus::Failed, m);
        let (dir, output) = self.work_dir(row)?;
        let log_path = dir.join("trainer.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| failed(format!("cannot create {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| failed(format!("{}: {e}", log_path.display())))?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env("EDGELOOP_RETRAINING_ID", row.id.to_string())
            .env("EDGELOOP_MODEL", &row.model_name)
            .env("EDGELOOP_FROM_VERSION", row.from_version.to_string())
            .env("EDGELOOP_REASON", &row.reason)
            .env("EDGELOOP_DRIFTING_DEVICES", fired.drifting.join(","))
            .env("EDGELOOP_OUTPUT_DIR", &output)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        if let Some(dataset) = &policy.dataset {
            command.env("EDGELOOP_DATASET", dataset);
        }
        if let Some(samples) = samples {
            let path = dir.join(format!("samples.{}", samples.reference.format.extension()));
            std::fs::write(&path, &samples.file)
                .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
            command
                .env("EDGELOOP_SAMPLES", &path)
                .env("EDGELOOP_SAMPLES_SHA256", &samples.reference.sha256)
                .env(
                    "EDGELOOP_SAMPLES_DATASET_ID",
                    samples.reference.dataset_id.to_string(),
                );
        }
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", program.display())))?;
        let status = tokio::select! {
            status = child.wait() => status.map_err(|e| failed(format!("waiting for the trainer: {e}")))?,
            _ = tokio::time::sleep(Duration::from_secs(timeout_s)) => {
                let _ = child.kill().await;
                return Err(failed(format!(
                    "the trainer ran past timeout_s ({timeout_s} s) and was killed; log: {}",
                    log_path.display()
                )));
            }
            _ = shutdown.cancelled() => {
                let _ = child.kill().await;
                return Err(failed("the controller stopped during training".into()));
            }
        };
        if !status.success() {
            let tail = std::fs::read_to_string(&log_path)
                .ok()
                .and_then(|l| l.lines().last().map(str::to_string))
                .unwrap_or_default();
            return Err(failed(format!(
                "the trainer exited with {status}: {tail} (log: {})",
                log_path.display()
            )));
        }
        self.register(policy, row, &output, &log_path).await
    }

    /// Asks the devices that run the model for their samples and waits until every one
    /// answered or `wait_s` passed; the merge of what came is the trainer's. Err: no device
    /// sent a sample.
    async fn collect(
        &self,
        row: &RetrainingRow,
        collect: &CollectSamples,
        shutdown: &CancellationToken,
    ) -> Result<Collected, RetrainingUpdate> {
        let failed = |m: String| RetrainingUpdate::status(RetrainingStatus::Failed, m);
        let dataset = crate::datasets::request(
            self.store.as_ref(),
            crate::datasets::DatasetRequest {
                model: Some(row.model_name.clone()),
                max_rows: collect.max_rows,
                actor: ENGINE.into(),
                reason: Some(format!("retraining {}: {}", row.id, row.reason)),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| failed(format!("cannot ask for samples: {e}")))?;
        self.dispatcher_wake.notify_one();
        let update = RetrainingUpdate::status(
            RetrainingStatus::Training,
            format!("collecting samples: dataset {}", dataset.id),
        );
        if let Err(e) = self
            .store
            .update_retraining(row.id, &update, now_ms())
            .await
        {
            warn!(retraining = row.id, error = %e, "cannot record the sample collection");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(collect.wait_s);
        loop {
            match self.store.dataset(dataset.id).await {
                Ok(Some(d)) if d.is_settled() => break,
                Ok(_) => {}
                Err(e) => warn!(dataset = dataset.id, error = %e, "cannot read the dataset"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    return Err(failed("the controller stopped while collecting samples".into()));
                }
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let file = crate::datasets::file(self.store.as_ref(), dataset.id, None)
            .await
            .map_err(|e| failed(format!("cannot merge the samples: {e}")))?
            .ok_or_else(|| failed(format!("dataset {} vanished", dataset.id)))?;
        if file.devices.is_empty() {
            return Err(failed(format!(
                "no device sent its sample for dataset {} within collect_samples.wait_s ({} s)",
                dataset.id, collect.wait_s
            )));
        }
        let rows = file
            .row
            .parts
            .iter()
            .filter(|p| file.devices.contains(&p.device_id))
            .filter_map(|p| p.rows)
            .sum();
        info!(
            retraining = row.id,
            dataset = dataset.id,
            rows,
            devices = file.devices.len(),
            "samples collected"
        );
        Ok(Collected {
            reference: SamplesRef {
                dataset_id: dataset.id,
                format: file.format,
                // Pinned to the parts complete now: a part that completes later does not
                // change the file behind this digest.
                url: format!(
                    "{}/api/v1/datasets/{}/file?devices={}",
                    self.controller_url.trim_end_matches('/'),
                    dataset.id,
                    file.devices.join(",")
                ),
                sha256: file.sha256,
                rows,
                devices: file.devices,
            },
            file: file.bytes,
        })
    }

    /// A retraining's working directory and, inside it, the empty-to-start `output` the
    /// trainer writes its candidate into.
    fn work_dir(&self, row: &RetrainingRow) -> Result<(PathBuf, PathBuf), RetrainingUpdate> {
        let dir = self.data_dir.join("retrainings").join(row.id.to_string());
        let output = dir.join("output");
        std::fs::create_dir_all(&output).map_err(|e| {
            RetrainingUpdate::status(
                RetrainingStatus::Failed,
                format!("cannot create {}: {e}", output.display()),
            )
        })?;
        Ok((dir, output))
    }

    /// The version a retraining starts from, opened and verified.
    async fn retrained(
        &self,
        row: &RetrainingRow,
    ) -> Result<edgeloop_shared::bundle::VerifiedBundle, RetrainingUpdate> {
        registry::open_published(
            self.store.as_ref(),
            &self.artifacts,
            &self.key,
            &row.model_name,
            row.from_version,
        )
        .await
        .map(|(_, bundle)| bundle)
        .map_err(|e| RetrainingUpdate::status(RetrainingStatus::Failed, e.to_string()))
    }

    /// Fits the built-in model to the policy's dataset and publishes it, gated.
    async fn run_builtin(
        &self,
        policy: &RetrainingPolicy,
        row: &RetrainingRow,
        options: crate::trainer::TrainOptions,
    ) -> Result<String, RetrainingUpdate> {
        let failed = |m: String| RetrainingUpdate::status(RetrainingStatus::Failed, m);
        let current = self.retrained(row).await?;
        if current.manifest.is_regression() {
            return Err(failed(format!(
                "{} is a regression; the built-in trainer fits classifiers: retrain it with a \
                 command or webhook trainer",
                row.model_name
            )));
        }
        let (dir, output) = self.work_dir(row)?;
        let dataset = policy
            .dataset
            .clone()
            .expect("validated: the built-in trainer has a dataset");
        let trained =
            tokio::task::spawn_blocking(move || crate::trainer::train_csv(&dataset, &options))
                .await
                .expect("training does not panic")
                .map_err(|e| failed(format!("the built-in trainer: {e}")))?;
        let log_path = dir.join("trainer.log");
        let written = std::fs::write(output.join("model.onnx"), &trained.onnx)
            .and_then(|()| std::fs::write(output.join("reference.csv"), &trained.reference_csv))
            .and_then(|()| {
                std::fs::write(
                    &log_path,
                    format!(
                        "built-in trainer: softmax regression over {} features, {} classes; training accuracy {:.4}\n",
                        trained.features.len(),
                        trained.classes,
                        trained.train_accuracy
                    ),
                )
            });
        written.map_err(|e| failed(format!("cannot write the trained model: {e}")))?;
        self.register(policy, row, &output, &log_path).await
    }

    /// Publishes a trainer's candidate (`model.onnx` and `reference.csv` in `output`, or
    /// for a tensor model `reference.npy`, an array of reference inputs), gated.
    async fn register(
        &self,
        policy: &RetrainingPolicy,
        row: &RetrainingRow,
        output: &Path,
        log_path: &Path,
    ) -> Result<String, RetrainingUpdate> {
        let failed = |m: String| RetrainingUpdate::status(RetrainingStatus::Failed, m);
        let current = self.retrained(row).await?;
        // A tensor model's successor takes the same tensors, laid out as devices send them.
        let tensor = current
            .manifest
            .inputs
            .first()
            .filter(|i| i.is_tensor())
            .cloned();
        let model_path = output.join("model.onnx");
        let reference = output.join(match tensor {
            Some(_) => "reference.npy",
            None => "reference.csv",
        });
        let onnx = std::fs::read(&model_path).map_err(|e| {
            failed(format!(
                "the trainer left no {}: {e} (log: {})",
                model_path.display(),
                log_path.display()
            ))
        })?;
        if !reference.exists() {
            return Err(failed(format!(
                "the trainer left no {} (log: {})",
                reference.display(),
                log_path.display()
            )));
        }
        let newest = self
            .store
            .models()
            .await
            .map_err(|e| failed(e.to_string()))?
            .iter()
            .filter(|m| m.name == row.model_name)
            .map(|m| m.version)
            .max()
            .unwrap_or(row.from_version);
        let holdout = policy
            .holdout
            .as_deref()
            .expect("validated: command and built-in trainers have one");
        let published = registry::publish(
            self.store.as_ref(),
            &self.artifacts,
            &self.key,
            PublishRequest {
                name: &row.model_name,
                version: newest + 1,
                label: Some(format!("retraining {}", row.id)),
                onnx: &onnx,
                reference_csv: &reference,
                label_column: None,
                categorical: Vec::new(),
                regression: current.manifest.is_regression(),
                class_labels: current.manifest.served_output().names.clone(),
                // Trainers learn from data in the units devices receive, and their models
                // take those units: the current model's preprocessing is not carried over.
                preprocess: None,
                layout: tensor.as_ref().and_then(|t| t.layout),
                channel_axis: tensor.as_ref().and_then(|t| t.channel_axis),
                created_ms: now_ms(),
                requirements: current.manifest.requirements.clone(),
                drift: None,
                lineage: Some(edgeloop_shared::bundle::Lineage {
                    parent_version: Some(row.from_version),
                    training_data_sha256: policy
                        .dataset
                        .as_ref()
                        .and_then(|p| std::fs::read(p).ok())
                        .map(|b| edgeloop_shared::sha256_hex(&b)),
                    ..Default::default()
                }),
                gate: Some(QualityGate {
                    holdout,
                    policy: policy.gate.clone(),
                    against: Some(row.from_version),
                }),
            },
        )
        .await;
        match published {
            Ok(model) => Ok(format!(
                "published v{}: quality gate {}",
                model.version,
                model
                    .lineage
                    .and_then(|l| l.gates.get("quality").cloned())
                    .unwrap_or_default()
            )),
            Err(PublishError::GateFailed(report)) => Err(RetrainingUpdate {
                gate: Some(report.summary()),
                ..RetrainingUpdate::status(
                    RetrainingStatus::Rejected,
                    format!(
                        "the candidate failed the quality gate: {}",
                        report.summary()
                    ),
                )
            }),
            Err(e) => Err(failed(format!("cannot publish the candidate: {e}"))),
        }
    }
}

/// The webhook's HMAC key, read when the retraining fires (so a rotated secret is used).
fn webhook_secret(env: Option<&str>, file: Option<&Path>) -> Result<Option<String>, String> {
    if let Some(var) = env {
        return std::env::var(var).map(Some).map_err(|_| {
            format!("the webhook's secret_env {var} is not set in the controller's environment")
        });
    }
    if let Some(path) = file {
        return std::fs::read_to_string(path)
            .map(|s| Some(s.trim_end().to_string()))
            .map_err(|e| format!("the webhook's secret_file {}: {e}", path.display()));
    }
    Ok(None)
}

/// POSTs the payload, retrying what may pass on a second try. Ok: the answer's status.
async fn call_webhook(
    url: &str,
    secret: Option<&str>,
    headers: &BTreeMap<String, String>,
    retries: u32,
    timeout_s: u64,
    body: Vec<u8>,
) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(timeout_s))
        .build()
        .map_err(|e| e.to_string())?;
    let mut last = String::new();
    for attempt in 0..=retries {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << (attempt - 1).min(6))).await;
        }
        let mut request = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(secret) = &secret {
            request = request.header(SIGNATURE_HEADER, signature(secret.as_bytes(), &body));
        }
        for (name, value) in headers {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                return Ok(format!("HTTP {}", response.status().as_u16()));
            }
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                last = format!(
                    "HTTP {}: {}",
                    status.as_u16(),
                    text.chars().take(200).collect::<String>()
                );
                let retryable = status.is_server_error()
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                if !retryable {
                    return Err(format!("the webhook {url} refused the retraining: {last}"));
                }
            }
            Err(e) => last = e.to_string(),
        }
        warn!(%url, attempt, error = %last, "webhook attempt failed");
    }
    Err(format!(
        "the webhook {url} failed {} times; last: {last}",
        retries + 1
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetrainingPolicy {
        RetrainingPolicy {
            min_devices: 2,
            ..toml::from_str(
                "model = \"m\"\ntrainer = { kind = \"webhook\", url = \"http://127.0.0.1:1/\" }\n",
            )
            .unwrap()
        }
    }

    fn w(device: &str, version: u64, end: u64, psi: f64) -> WindowPoint {
        WindowPoint {
            device_id: device.into(),
            model_version: version,
            window_end_ms: end,
            psi_max: psi,
            drift_share: 0.0,
            labelled: 0,
            accuracy: None,
            latency_p99_ms: None,
            samples: 10,
            errors: 0,
            prediction_drift: false,
            mae: None,
        }
    }

    /// A window without PSI drift, with `labelled` labels and this accuracy.
    fn labelled(device: &str, end: u64, labelled: u64, accuracy: f64) -> WindowPoint {
        WindowPoint {
            labelled,
            accuracy: Some(accuracy),
            ..w(device, 1, end, 0.01)
        }
    }

    #[test]
    fn drifting_predictions_fire_when_asked_for() {
        let mut p = policy();
        let predicted = |device: &str, end: u64, drifted: bool| WindowPoint {
            prediction_drift: drifted,
            ..w(device, 1, end, 0.05)
        };
        let windows = [
            predicted("a", 2, true),
            predicted("a", 1, true),
            predicted("b", 2, true),
            predicted("b", 1, false),
        ];
        assert_eq!(p.evaluate(&windows), None, "not judged unless asked");
        p.on_prediction_drift = true;
        p.min_devices = 1;
        let fired = p.evaluate(&windows).unwrap();
        assert_eq!(fired.drifting, ["a"], "b's older window did not drift");
        assert!(
            fired
                .reason
                .contains("(or the predictions' distribution drifting)"),
            "{}",
            fired.reason
        );
        let policy: RetrainingPolicy = toml::from_str(
            "model = \"m\"\non_prediction_drift = true\ntrainer = { kind = \"webhook\", url = \"http://x\" }",
        )
        .unwrap();
        assert!(policy.on_prediction_drift);
    }

    #[test]
    fn lost_accuracy_or_a_drifting_share_of_features_fires_when_asked_for() {
        let mut p = policy();
        let windows = [
            labelled("a", 2, 40, 0.70),
            labelled("a", 1, 40, 0.80),
            labelled("b", 2, 25, 0.60),
            labelled("b", 1, 30, 0.85),
            // c is below the floor, but on too few labels to say
            labelled("c", 2, 5, 0.20),
            labelled("c", 1, 5, 0.20),
        ];
        assert_eq!(
            p.evaluate(&windows),
            None,
            "accuracy is not judged unless asked"
        );
        p.min_accuracy = Some(0.9);
        let fired = p.evaluate(&windows).unwrap();
        assert_eq!(fired.drifting, ["a", "b"]);
        assert!(
            fired
                .reason
                .starts_with("2 of 3 devices on v1 lost accuracy: below 0.9 on at least 20"),
            "{}",
            fired.reason
        );
        assert!(fired.reason.contains("worst 0.600"), "{}", fired.reason);
        p.min_accuracy = Some(0.75);
        assert_eq!(p.evaluate(&windows), None, "b's older window is above 0.75");

        let share = |device: &str, end: u64, s: f64| WindowPoint {
            drift_share: s,
            ..w(device, 1, end, 0.05)
        };
        let windows = [
            share("a", 2, 0.75),
            share("a", 1, 0.5),
            share("b", 2, 1.0),
            share("b", 1, 0.5),
        ];
        assert_eq!(p.evaluate(&windows), None, "PSI alone says nothing drifted");
        p.min_drift_share = Some(0.5);
        let fired = p.evaluate(&windows).unwrap();
        assert!(
            fired
                .reason
                .contains("or at least 0.5 of the features drifting"),
            "{}",
            fired.reason
        );
        assert_eq!(fired.drifting, ["a", "b"]);
        for (field, bad) in [("min_accuracy", 1.5), ("min_drift_share", 0.0)] {
            let mut q = policy();
            if field == "min_accuracy" {
                q.min_accuracy = Some(bad);
            } else {
                q.min_drift_share = Some(bad);
            }
            assert!(q.validate().unwrap_err().starts_with(field));
        }
    }

    #[test]
    fn a_regressions_error_above_the_ceiling_fires_when_asked_for() {
        let mut p = policy();
        let valued = |device: &str, end: u64, values: u64, mae: f64| WindowPoint {
            labelled: values,
            mae: Some(mae),
            ..w(device, 1, end, 0.01)
        };
        let windows = [
            valued("a", 2, 40, 3.5),
            valued("a", 1, 40, 2.5),
            valued("b", 2, 25, 4.0),
            valued("b", 1, 30, 1.5),
            // c errs most, but on too few true values to say
            valued("c", 2, 5, 9.0),
            valued("c", 1, 5, 9.0),
        ];
        assert_eq!(
            p.evaluate(&windows),
            None,
            "error is not judged unless asked"
        );
        p.max_mae = Some(1.0);
        let fired = p.evaluate(&windows).unwrap();
        assert_eq!(fired.drifting, ["a", "b"]);
        assert!(
            fired.reason.starts_with(
                "2 of 3 devices on v1 lost accuracy: mean absolute error above 1 on at least 20 true values in each of their last 2 windows (worst 4.000)"
            ),
            "{}",
            fired.reason
        );
        p.max_mae = Some(2.0);
        assert_eq!(p.evaluate(&windows), None, "b's older window erred less");
        for bad in [0.0, -1.0, f64::INFINITY] {
            let q = RetrainingPolicy {
                max_mae: Some(bad),
                ..policy()
            };
            assert!(q.validate().unwrap_err().starts_with("max_mae"), "{bad}");
        }
        let policy: RetrainingPolicy = toml::from_str(
            "model = \"m\"\nmax_mae = 0.5\ntrainer = { kind = \"webhook\", url = \"http://x\" }",
        )
        .unwrap();
        assert_eq!(policy.max_mae, Some(0.5));
    }

    #[test]
    fn drift_on_enough_devices_for_enough_windows_fires_once_per_evidence() {
        let p = policy();
        // a and b drift in both newest windows, c only in one: 2 of 3 devices.
        let windows = [
            w("a", 1, 2, 0.5),
            w("a", 1, 1, 0.3),
            w("b", 1, 2, 0.9),
            w("b", 1, 1, 0.4),
            w("c", 1, 2, 0.9),
            w("c", 1, 1, 0.1),
        ];
        let fired = p.evaluate(&windows).unwrap();
        assert_eq!(fired.version, 1);
        assert_eq!(fired.drifting, ["a", "b"]);
        assert_eq!(fired.reporting, 3);
        assert!(
            fired.reason.starts_with("2 of 3 devices on v1 drifted"),
            "{}",
            fired.reason
        );
        assert!(fired.reason.contains("worst 0.900"), "{}", fired.reason);
        // One device is not enough; one drifting window is not enough.
        assert_eq!(
            p.evaluate(
                &windows[..4]
                    .iter()
                    .filter(|x| x.device_id == "a")
                    .cloned()
                    .collect::<Vec<_>>()
            ),
            None
        );
        assert_eq!(p.evaluate(&[w("a", 1, 2, 0.9), w("b", 1, 2, 0.9)]), None);
        // Windows of an older version do not count for a device's current one.
        assert_eq!(
            p.evaluate(&[
                w("a", 2, 3, 0.9),
                w("a", 1, 2, 0.9),
                w("b", 2, 3, 0.9),
                w("b", 1, 2, 0.9)
            ]),
            None
        );
        // The share: 2 drifting of 5 reporting is below 0.5.
        let mut five = windows.to_vec();
        five.extend([
            w("d", 1, 2, 0.0),
            w("d", 1, 1, 0.0),
            w("e", 1, 2, 0.0),
            w("e", 1, 1, 0.0),
        ]);
        assert_eq!(p.evaluate(&five), None);
    }

    #[test]
    fn a_schedule_fires_for_the_version_most_devices_run() {
        let mut p = policy();
        assert_eq!(p.scheduled(&[1, 2, 2]), None, "no schedule");
        p.schedule_s = Some(86_400);
        let fired = p.scheduled(&[1, 2, 2, 3]).unwrap();
        assert_eq!((fired.version, fired.reporting), (2, 4));
        assert!(fired.drifting.is_empty());
        assert_eq!(fired.reason, "schedule: none fired in the last 86400 s");
        assert_eq!(p.scheduled(&[]), None, "no device runs the model");
        p.schedule_s = Some(0);
        assert!(p.validate().unwrap_err().starts_with("schedule_s"));
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let cases = [
            (
                "model = \"m\"\npsi_threshold = 0\ntrainer = { kind = \"webhook\", url = \"http://x\" }",
                "psi_threshold",
            ),
            (
                "model = \"m\"\nmin_share = 2\ntrainer = { kind = \"webhook\", url = \"http://x\" }",
                "min_share",
            ),
            (
                "model = \"m\"\ntrainer = { kind = \"webhook\", url = \"ftp://x\" }",
                "trainer.url",
            ),
            (
                "model = \"m\"\ntrainer = { kind = \"command\", program = \"/bin/true\" }",
                "holdout",
            ),
            (
                "model = \"m\"\nholdout = \"h.csv\"\ntrainer = { kind = \"builtin\" }",
                "dataset",
            ),
            (
                "model = \"m\"\ndataset = \"d.csv\"\nholdout = \"h.csv\"\ntrainer = { kind = \"builtin\", epochs = 0 }",
                "trainer.epochs",
            ),
            (
                "model = \"m\"\nrollout = { waves = [\"50%\"] }\ntrainer = { kind = \"webhook\", url = \"http://x\" }",
                "rollout: invalid rollout plan: waves",
            ),
            (
                "model = \"m\"\ngate = { parity = 3 }\ntrainer = { kind = \"webhook\", url = \"http://x\" }",
                "gate: invalid gate policy: parity",
            ),
            (
                "model = \"m\"\ncollect_samples = { wait_s = 0 }\ntrainer = { kind = \"webhook\", url = \"http://x\" }",
                "collect_samples.wait_s",
            ),
            (
                "model = \"m\"\ncollect_samples = { max_rows = 0 }\ntrainer = { kind = \"webhook\", url = \"http://x\" }",
                "collect_samples.max_rows",
            ),
        ];
        for (toml_text, field) in cases {
            let p: RetrainingPolicy = toml::from_str(toml_text).unwrap();
            let err = p.validate().unwrap_err();
            assert!(err.starts_with(field), "{err} should start with {field}");
        }
        let err = toml::from_str::<RetrainingPolicy>(
            "model = \"m\"\ntrainer = { kind = \"webhook\", url = \"http://x\", retry = 3 }",
        )
        .unwrap_err();
        assert!(err.to_string().contains("retry"), "{err}");
        policy().validate().unwrap();
    }

    #[test]
    fn webhook_bodies_fit_airflow_and_github() {
        let payload = WebhookPayload {
            event: "retraining".into(),
            retraining_id: 7,
            model: "m".into(),
            from_version: 1,
            reason: "drift".into(),
            drifting_devices: vec!["a".into()],
            dataset: None,
            dataset_sha256: None,
            samples: Some(SamplesRef {
                dataset_id: 3,
                format: SampleFormat::Csv,
                url: "http://c/api/v1/datasets/3/file".into(),
                sha256: "00".into(),
                rows: 10,
                devices: vec!["a".into()],
            }),
            controller_url: "http://c".into(),
        };
        let parse = |f: WebhookFormat| -> serde_json::Value {
            serde_json::from_slice(&f.body(&payload)).unwrap()
        };
        assert_eq!(parse(WebhookFormat::Plain)["retraining_id"], 7);
        let airflow = parse(WebhookFormat::Airflow);
        assert_eq!(airflow["dag_run_id"], "edgeloop-retraining-7");
        assert_eq!(airflow["conf"]["model"], "m");
        let github = parse(WebhookFormat::Github);
        assert_eq!(github["event_type"], "edgeloop-retraining");
        assert_eq!(github["client_payload"]["from_version"], 1);
        // GitHub allows at most 10 top-level keys in client_payload.
        assert!(github["client_payload"].as_object().unwrap().len() <= 10);
    }

    #[test]
    fn the_webhook_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
