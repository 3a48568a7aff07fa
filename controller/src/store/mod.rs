//! The controller's storage seam.
//!
//! [`Store`] is everything the controller keeps: devices, drift summaries, models,
//! rollouts and their per-device deployments. [`SqliteStore`] is the embedded default;
//! [`PgStore`] serves larger fleets and several controller replicas. Every backend passes
//! the one suite in `tests.rs`.

mod postgres;
mod sqlite;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use edgeloop_shared::bundle::{Lineage, Requirements};
use edgeloop_shared::protocol::{Envelope, ModelRef, OutboxStatus, ReceivedPayload, SampleChunk};
use serde::{Deserialize, Serialize};

use crate::plan::RolloutPlan;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("database task failed: {0}")]
    Task(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What happened to an ingested message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    Stored,
    /// Its message id was seen before: a redelivery, dropped.
    Duplicate,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRow {
    pub id: String,
    /// As last reported (heartbeat or last will); see `Controller` for staleness.
    pub online: bool,
    pub agent_version: Option<String>,
    pub model_name: Option<String>,
    pub model_version: Option<u64>,
    pub last_seen_ms: u64,
    pub inferences: u64,
    pub errors: u64,
    pub malformed_messages: u64,
    /// Headline drift figure of the latest summary, if any.
    pub last_psi_max: Option<f64>,
    /// The device's outbox as of its last heartbeat, with what it had to drop.
    pub outbox: OutboxStatus,
    /// From its enrollment: the group and tags rollouts target, its board and CPU.
    pub group: Option<String>,
    pub tags: Vec<String>,
    pub board: Option<String>,
    pub arch: Option<String>,
    /// The trust document version it last reported having applied (0: none).
    pub trust_version: u64,
}

/// A device's tags from their stored JSON (none when never enrolled).
pub(crate) fn parse_tags(id: &str, json: Option<String>) -> Result<Vec<String>> {
    match json {
        None => Ok(Vec::new()),
        Some(j) => serde_json::from_str(&j)
            .map_err(|e| StoreError::Corrupt(format!("tags of device {id}: {e}"))),
    }
}

/// An enrollment token, without its secret (the store keeps only the secret's SHA-256).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenRow {
    /// A public name for the token, for lists and the audit log.
    pub id: String,
    /// The group and tags every device enrolled with it gets.
    pub group: String,
    pub tags: Vec<String>,
    pub expires_ms: u64,
    /// Enrollments it still allows; None: any number until it expires.
    pub uses_left: Option<u64>,
    /// Devices enrolled with it are approved at once; otherwise they wait for an operator.
    pub auto_approve: bool,
    pub created_ms: u64,
    pub created_by: String,
}

/// What a device says about itself when it enrolls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub device_id: String,
    /// The device's own ed25519 public key (`ed25519:<base64>`), created at first boot.
    pub public_key: String,
    pub board: Option<String>,
    pub arch: Option<String>,
    pub agent_version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentStatus {
    /// Waiting for an operator; the device's messages are not accepted yet.
    Pending,
    /// In the registry.
    Approved,
}

/// A device's enrollment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnrollmentRow {
    pub device_id: String,
    pub public_key: String,
    pub token_id: String,
    pub group: String,
    pub tags: Vec<String>,
    pub board: Option<String>,
    pub arch: Option<String>,
    pub agent_version: Option<String>,
    pub status: EnrollmentStatus,
    pub created_ms: u64,
    pub decided_ms: Option<u64>,
    pub decided_by: Option<String>,
}

pub(crate) fn enrollment_status_str(status: EnrollmentStatus) -> &'static str {
    match status {
        EnrollmentStatus::Pending => "pending",
        EnrollmentStatus::Approved => "approved",
    }
}

pub(crate) fn parse_enrollment_status(s: &str) -> Result<EnrollmentStatus> {
    match s {
        "pending" => Ok(EnrollmentStatus::Pending),
        "approved" => Ok(EnrollmentStatus::Approved),
        other => Err(StoreError::Corrupt(format!("enrollment status `{other}`"))),
    }
}

/// The enrollment a token makes of a request: approved at once by an auto-approving token.
pub(crate) fn new_enrollment(
    token: &TokenRow,
    request: &EnrollRequest,
    now_ms: u64,
) -> EnrollmentRow {
    let approved = token.auto_approve;
    EnrollmentRow {
        device_id: request.device_id.clone(),
        public_key: request.public_key.clone(),
        token_id: token.id.clone(),
        group: token.group.clone(),
        tags: token.tags.clone(),
        board: request.board.clone(),
        arch: request.arch.clone(),
        agent_version: request.agent_version.clone(),
        status: if approved {
            EnrollmentStatus::Approved
        } else {
            EnrollmentStatus::Pending
        },
        created_ms: now_ms,
        decided_ms: approved.then_some(now_ms),
        decided_by: approved.then(|| format!("token {}", token.id)),
    }
}

/// How an enrollment attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum EnrollOutcome {
    /// Enrolled (approved or pending), or enrolled before with the same key.
    Enrolled(Box<EnrollmentRow>),
    /// No token has this secret, or it has expired.
    BadToken,
    /// The token allowed no more enrollments.
    UsedUp,
    /// The device id is enrolled with another key.
    KeyConflict,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetryRow {
    pub msg_id: String,
    pub device_id: String,
    pub received_ms: u64,
    pub model_name: String,
    pub model_version: u64,
    pub window_seq: u64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub samples: u64,
    pub psi_max: f64,
    /// The whole summary as received.
    pub summary: serde_json::Value,
}

/// Drift summaries of one device and model version merged per hour (by window end time).
/// Kept longer than the raw summaries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HourlyRow {
    pub device_id: String,
    pub model_name: String,
    pub model_version: u64,
    /// Start of the hour, in milliseconds since the Unix epoch.
    pub hour_ms: u64,
    pub windows: u64,
    pub samples: u64,
    /// The worst window's PSI, and the mean over the windows.
    pub psi_max: f64,
    pub psi_mean: f64,
    /// The merged window statistics (see `WindowStats::merge`).
    pub stats: serde_json::Value,
}

/// What a retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub telemetry: u64,
    pub hourly: u64,
    pub seen_messages: u64,
}

pub(crate) const HOUR_MS: u64 = 3_600_000;

/// Identifies an hourly aggregate: device, model name, model version, hour start.
pub(crate) type HourKey = (String, String, u64, u64);

pub(crate) fn hour_key(device_id: &str, s: &edgeloop_shared::protocol::DriftSummary) -> HourKey {
    (
        device_id.to_string(),
        s.model.name.clone(),
        s.model.version,
        s.stats.end_ms / HOUR_MS * HOUR_MS,
    )
}

/// An hourly aggregate being updated: its columns, with the merged statistics parsed.
pub(crate) struct Hourly {
    pub windows: u64,
    pub samples: u64,
    pub psi_max: f64,
    pub psi_sum: f64,
    pub stats: edgeloop_shared::drift::WindowStats,
}

/// An hourly aggregate's merged statistics as stored: MessagePack, or the JSON text of rows
/// written by earlier versions. Every fold reads and writes them again (PostgreSQL once per
/// device and transaction, which with many devices is once per summary; SQLite once per
/// device-hour and flush): MessagePack does both several times faster than JSON.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StoredStats<'a> {
    Json(&'a str),
    Msgpack(&'a [u8]),
}

impl StoredStats<'_> {
    pub fn parse(self) -> std::result::Result<edgeloop_shared::drift::WindowStats, String> {
        match self {
            StoredStats::Json(text) => serde_json::from_str(text).map_err(|e| e.to_string()),
            StoredStats::Msgpack(bytes) => {
                edgeloop_shared::msgpack::from_slice(bytes).map_err(|e| e.to_string())
            }
        }
    }

    /// The statistics as the API shows them.
    pub fn to_value(self) -> Result<serde_json::Value> {
        let corrupt = |e: String| StoreError::Corrupt(format!("hourly aggregate: {e}"));
        match self {
            StoredStats::Json(text) => {
                serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))
            }
            StoredStats::Msgpack(_) => serde_json::to_value(self.parse().map_err(corrupt)?)
                .map_err(|e| corrupt(e.to_string())),
        }
    }
}

impl Hourly {
    /// The stored aggregate; `None`, with an error logged, when its statistics cannot be
    /// read: the hour then starts again from the summaries at hand, rather than refusing
    /// them for the database's fault.
    pub fn from_row(
        windows: u64,
        samples: u64,
        psi_max: f64,
        psi_sum: f64,
        stats: StoredStats<'_>,
    ) -> Option<Self> {
        match stats.parse() {
            Ok(stats) => Some(Hourly {
                windows,
                samples,
                psi_max,
                psi_sum,
                stats,
            }),
            Err(e) => {
                tracing::error!(error = %e, "unreadable hourly aggregate; it starts again");
                None
            }
        }
    }

    /// The aggregate of one summary.
    pub fn of(s: &edgeloop_shared::protocol::DriftSummary) -> Hourly {
        Hourly {
            windows: 1,
            samples: s.stats.samples,
            psi_max: s.stats.psi_max,
            psi_sum: s.stats.psi_max,
            stats: s.stats.clone(),
        }
    }

    /// Folds summaries (all of one [`HourKey`]) into `existing`, or into a new aggregate.
    /// A summary whose features do not match the aggregate's is left out of it, with a
    /// warning; the raw summary is still stored.
    pub fn fold(
        existing: Option<Hourly>,
        summaries: &[&edgeloop_shared::protocol::DriftSummary],
    ) -> Option<Hourly> {
        let mut summaries = summaries.iter();
        let mut hourly = match existing {
            Some(h) => h,
            None => Hourly::of(summaries.next()?),
        };
        for s in summaries {
            hourly.add(s);
        }
        Some(hourly)
    }

    /// Folds one more summary of the aggregate's [`HourKey`] in (see [`Hourly::fold`]).
    pub fn add(&mut self, s: &edgeloop_shared::protocol::DriftSummary) {
        if let Err(e) = self.stats.merge(&s.stats) {
            tracing::warn!(model = %s.model, error = %e, "summary left out of its hourly aggregate");
            return;
        }
        self.windows = self.windows.saturating_add(1);
        self.samples = self.samples.saturating_add(s.stats.samples);
        self.psi_max = self.psi_max.max(s.stats.psi_max);
        self.psi_sum += s.stats.psi_max;
    }

    /// Folds another aggregate of the same [`HourKey`] in: the summaries folded into
    /// `other` count as if each had been added here. When their features do not match it
    /// is left out whole, with a warning.
    pub fn absorb(&mut self, other: Hourly) {
        if let Err(e) = self.stats.merge(&other.stats) {
            tracing::warn!(windows = other.windows, error = %e,
                "summaries left out of their hourly aggregate");
            return;
        }
        self.windows = self.windows.saturating_add(other.windows);
        self.samples = self.samples.saturating_add(other.samples);
        self.psi_max = self.psi_max.max(other.psi_max);
        self.psi_sum += other.psi_sum;
    }

    pub fn stats_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(&self.stats).expect("stats serialize")
    }
}

/// A drift summary's JSON for the `telemetry` table: the text the device sent when it sent
/// JSON (it decoded into `s`), so that ingest does not serialize every summary again.
pub(crate) fn summary_json<'a>(
    e: &'a Envelope,
    s: &edgeloop_shared::protocol::DriftSummary,
) -> std::borrow::Cow<'a, str> {
    match e.received_payload() {
        Some(ReceivedPayload::Json(text)) => std::borrow::Cow::Borrowed(text),
        _ => std::borrow::Cow::Owned(serde_json::to_string(s).expect("summaries serialize")),
    }
}

/// A stored summary column as JSON: its text, or the MessagePack bytes it was received in
/// (SQLite keeps those as they came, as a BLOB).
pub(crate) fn summary_value(
    msg_id: &str,
    stored: ReceivedPayload<'_>,
) -> Result<serde_json::Value> {
    let read = match stored {
        ReceivedPayload::Json(text) => serde_json::from_str(text).map_err(|e| e.to_string()),
        ReceivedPayload::Msgpack(bytes) => {
            edgeloop_shared::msgpack::from_slice(bytes).map_err(|e| e.to_string())
        }
    };
    read.map_err(|e| StoreError::Corrupt(format!("summary {msg_id}: {e}")))
}

/// The last drift figure of a transaction's summaries per device and model, in message
/// order: a device's `last_psi_max` is written once per transaction, not once per summary.
pub(crate) fn latest_psi<'a>(
    summaries: &[(&'a str, &'a edgeloop_shared::protocol::DriftSummary)],
) -> std::collections::BTreeMap<(&'a str, &'a str, u64), f64> {
    summaries
        .iter()
        .map(|(device, s)| {
            (
                (*device, s.model.name.as_str(), s.model.version),
                s.stats.psi_max,
            )
        })
        .collect()
}

/// Groups the drift summaries of a transaction by hourly aggregate, in a stable order.
pub(crate) fn by_hour<'a>(
    summaries: &[(&'a str, &'a edgeloop_shared::protocol::DriftSummary)],
) -> std::collections::BTreeMap<HourKey, Vec<&'a edgeloop_shared::protocol::DriftSummary>> {
    let mut groups = std::collections::BTreeMap::<HourKey, Vec<_>>::new();
    for (device, s) in summaries {
        groups.entry(hour_key(device, s)).or_default().push(*s);
    }
    groups
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRow {
    pub name: String,
    pub version: u64,
    pub label: Option<String>,
    pub created_ms: u64,
    /// SHA-256 of the bundle file.
    pub bundle_sha256: String,
    pub bundle_size: u64,
    pub features: Vec<String>,
    pub signed_by: String,
    /// Where the model comes from and the gates it passed, as signed into its manifest.
    pub lineage: Option<Lineage>,
    /// What a device must satisfy to run it, as signed into its manifest; rollouts leave
    /// out the devices whose enrollment shows they do not.
    #[serde(skip_serializing_if = "Requirements::is_empty")]
    pub requirements: Requirements,
}

/// A model's requirements from their stored JSON (none before schema version 8).
pub(crate) fn parse_requirements(
    name: &str,
    version: u64,
    json: Option<String>,
) -> Result<Requirements> {
    json.map_or(Ok(Requirements::default()), |j| {
        serde_json::from_str(&j)
            .map_err(|e| StoreError::Corrupt(format!("requirements of {name} v{version}: {e}")))
    })
}

/// A model's requirements as stored.
pub(crate) fn requirements_json(model: &ModelRow) -> Option<String> {
    (!model.requirements.is_empty())
        .then(|| serde_json::to_string(&model.requirements).expect("requirements serialize"))
}

/// A model's lineage from its stored JSON.
pub(crate) fn parse_lineage(
    name: &str,
    version: u64,
    json: Option<String>,
) -> Result<Option<Lineage>> {
    json.map(|j| {
        serde_json::from_str(&j)
            .map_err(|e| StoreError::Corrupt(format!("lineage of {name} v{version}: {e}")))
    })
    .transpose()
}

/// A model's lineage as stored.
pub(crate) fn lineage_json(model: &ModelRow) -> Option<String> {
    model
        .lineage
        .as_ref()
        .map(|l| serde_json::to_string(l).expect("lineage serializes"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Some deployments have not finished.
    InProgress,
    /// Every device runs the model.
    Completed,
    /// Every deployment finished and some failed or were refused.
    Failed,
    /// Stopped sending commands, by an operator or a failed wave, until resumed.
    Paused,
    /// Stopped for good: deployments never sent were cancelled.
    Aborted,
}

impl RolloutStatus {
    /// A rollout's status from its deployments: how many there are, how many ended with
    /// the model running (`active`, or `superseded` by a later rollout) and how many ended
    /// at all. A rollout whose plan has a failure threshold (`gated`) is not failed here but
    /// left in progress: the engine judges it against the threshold
    /// ([`crate::plan::Decision::Finish`]).
    pub fn from_counts(total: u64, running: u64, finished: u64, gated: bool) -> Self {
        if finished < total {
            Self::InProgress
        } else if running == total {
            Self::Completed
        } else if gated {
            Self::InProgress
        } else {
            Self::Failed
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Paused => "paused",
            Self::Aborted => "aborted",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "in_progress" => Self::InProgress,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "paused" => Self::Paused,
            "aborted" => Self::Aborted,
            other => return Err(StoreError::Corrupt(format!("rollout status `{other}`"))),
        })
    }
}

/// State of one device's deployment within a rollout: `pending` (no command sent yet),
/// `sent`, a device-reported stage (`downloading` … `active`, `committed`, `rolled_back`,
/// `failed`, `rejected`), `superseded` by a later rollout, `cancelled` (never sent, the
/// rollout was aborted) or `timed_out` (no verdict within the plan's device timeout).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentRow {
    pub device_id: String,
    pub status: String,
    pub detail: Option<String>,
    pub command_seq: Option<u64>,
    pub updated_ms: u64,
    /// The wave the device belongs to (0 first).
    pub wave: u32,
    /// The model the device reported running when the rollout was created: what an abort
    /// rolls it back to.
    pub previous: Option<ModelRef>,
}

/// The final deployment states: a device reported an outcome, or the controller gave up.
pub const FINAL_STATES: [&str; 8] = [
    "active",
    "failed",
    "rejected",
    "superseded",
    "committed",
    "rolled_back",
    "cancelled",
    "timed_out",
];
/// [`FINAL_STATES`] as an SQL list for `status IN (…)` in every store.
pub(crate) const FINAL_STATES_SQL: &str = "'active', 'failed', 'rejected', 'superseded', 'committed', 'rolled_back', 'cancelled', 'timed_out'";
/// The health window's verdicts: the only reports that still change a deployment that is
/// `active`, or `timed_out` waiting for one.
pub(crate) const HEALTH_VERDICTS_SQL: &str = "'committed', 'rolled_back'";
/// The final states a health verdict may still replace.
pub(crate) const AWAITING_VERDICT_SQL: &str = "'active', 'timed_out'";
/// The rollout states in which the store sets completed or failed from the deployments.
pub(crate) const SELF_FINISHING_SQL: &str = "'in_progress', 'completed', 'failed'";
/// The final states in which the device runs the model (its own, or a later rollout's):
/// what [`RolloutStatus::from_counts`] counts as running.
pub const RUNNING_STATES: [&str; 3] = ["active", "superseded", "committed"];
/// [`RUNNING_STATES`] as an SQL list.
pub(crate) const RUNNING_STATES_SQL: &str = "'active', 'superseded', 'committed'";
/// The final states that count against a wave: the deployment did not end with the model
/// running.
pub const FAILED_STATES: [&str; 4] = ["failed", "rejected", "rolled_back", "timed_out"];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutRow {
    pub id: u64,
    pub model_name: String,
    pub model_version: u64,
    /// A rollback: devices accept this version although it is not above their active one.
    pub rollback: bool,
    pub created_ms: u64,
    pub status: RolloutStatus,
    /// Why the rollout was paused, aborted or resumed, when it was.
    pub reason: Option<String>,
    pub plan: RolloutPlan,
    /// The wave whose devices get commands now (and every earlier one).
    pub current_wave: u32,
    /// When the current wave opened.
    pub wave_opened_ms: u64,
    /// The group and tags the rollout was created for; devices that match later join it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    pub deployments: Vec<DeploymentRow>,
}

/// Devices chosen by their enrollment: a group, tags, or both.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl Target {
    pub fn matches(&self, device: &DeviceRow) -> bool {
        self.matches_parts(device.group.as_deref(), &device.tags)
    }

    pub fn matches_parts(&self, group: Option<&str>, tags: &[String]) -> bool {
        self.group.as_deref().is_none_or(|g| group == Some(g))
            && self.tags.iter().all(|t| tags.contains(t))
    }
}

/// A rollout devices may still join: created for a target, not a rollback, neither failed
/// nor aborted.
pub(crate) struct Joinable {
    pub id: u64,
    pub model_name: String,
    pub model_version: u64,
    pub target: Target,
    /// The model's: devices it is not for do not join.
    pub requirements: Requirements,
}

/// What the store knows of a device when deciding whether it joins a rollout.
pub(crate) struct JoinCandidate {
    pub id: String,
    pub group: Option<String>,
    pub tags: Vec<String>,
    pub model: Option<ModelRef>,
    /// The newest rollout the device has a deployment in.
    pub newest_rollout: Option<u64>,
    /// A deployment of the device has not finished.
    pub busy: bool,
    /// As reported at enrollment.
    pub arch: Option<String>,
    pub board: Option<String>,
}

/// Whether a model with `requirements` is for a device that enrolled with this architecture
/// and board, judged as the device judges it. A device that never enrolled reported
/// neither and passes: it checks the model itself at install.
pub(crate) fn enrolled_fit(
    requirements: &Requirements,
    arch: Option<&str>,
    board: Option<&str>,
) -> std::result::Result<(), edgeloop_shared::bundle::TargetMismatch> {
    match arch {
        Some(arch) => requirements.fits(arch, board),
        None => Ok(()),
    }
}

/// The statuses of [`Joinable`] rollouts, as an SQL list.
pub(crate) const JOINABLE_STATUSES_SQL: &str = "'in_progress', 'paused', 'completed'";

/// Which devices join which rollouts: a device joins the newest joinable rollout whose
/// target it matches and whose model is for it ([`enrolled_fit`]), unless it already has a
/// deployment in that rollout or a newer one, has a deployment under way, or runs that
/// version of the model or a newer one.
pub(crate) fn late_joiners(rollouts: &[Joinable], devices: &[JoinCandidate]) -> Vec<(u64, String)> {
    let mut newest_first: Vec<&Joinable> = rollouts.iter().collect();
    newest_first.sort_by_key(|r| std::cmp::Reverse(r.id));
    devices
        .iter()
        .filter(|d| !d.busy)
        .filter_map(|d| {
            let r = newest_first.iter().find(|r| {
                r.target.matches_parts(d.group.as_deref(), &d.tags)
                    && enrolled_fit(&r.requirements, d.arch.as_deref(), d.board.as_deref()).is_ok()
            })?;
            let runs_it = d
                .model
                .as_ref()
                .is_some_and(|m| m.name == r.model_name && m.version >= r.model_version);
            let seen = d.newest_rollout.is_some_and(|n| n >= r.id);
            (!runs_it && !seen).then(|| (r.id, d.id.clone()))
        })
        .collect()
}

/// A `rollouts` row as every store reads it, before its deployments are attached.
pub(crate) struct StoredRollout {
    pub id: u64,
    pub model_name: String,
    pub model_version: u64,
    pub created_ms: u64,
    pub status: String,
    pub rollback: bool,
    /// JSON; none in rollouts created before plans existed (the default plan).
    pub plan: Option<String>,
    pub current_wave: u32,
    pub wave_opened_ms: u64,
    pub reason: Option<String>,
    /// JSON of a [`Target`]; none for rollouts to named devices or to all.
    pub target: Option<String>,
}

impl StoredRollout {
    pub(crate) fn into_rollout(self, deployments: Vec<DeploymentRow>) -> Result<RolloutRow> {
        let plan = match &self.plan {
            None => RolloutPlan::default(),
            Some(json) => serde_json::from_str(json)
                .map_err(|e| StoreError::Corrupt(format!("plan of rollout {}: {e}", self.id)))?,
        };
        let target =
            match &self.target {
                None => None,
                Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                    StoreError::Corrupt(format!("target of rollout {}: {e}", self.id))
                })?),
            };
        Ok(RolloutRow {
            target,
            id: self.id,
            model_name: self.model_name,
            model_version: self.model_version,
            rollback: self.rollback,
            created_ms: self.created_ms,
            status: RolloutStatus::parse(&self.status)?,
            reason: self.reason,
            plan,
            current_wave: self.current_wave,
            wave_opened_ms: self.wave_opened_ms,
            deployments,
        })
    }
}

/// A deployment's previous model from its two nullable columns.
pub(crate) fn previous_model(name: Option<String>, version: Option<i64>) -> Option<ModelRef> {
    Some(ModelRef {
        name: name?,
        version: version? as u64,
    })
}

/// One drift window as the retraining triggers read it.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPoint {
    pub device_id: String,
    pub model_version: u64,
    pub window_end_ms: u64,
    pub psi_max: f64,
    /// Share of the model's features that drifted under its drift policy.
    pub drift_share: f64,
    /// Predictions labelled with ground truth, and the share of them that were right.
    pub labelled: u64,
    pub accuracy: Option<f64>,
    /// The window's p99 inference latency (its histogram bucket's bound), in milliseconds.
    pub latency_p99_ms: Option<f64>,
    /// Inputs in the window, and inferences that failed on valid inputs.
    pub samples: u64,
    pub errors: u64,
    /// The model's predicted classes drifted from the reference's under its drift policy.
    pub prediction_drift: bool,
    /// A regression's mean absolute error on the window's `labelled` true values.
    pub mae: Option<f64>,
}

/// Where a retraining stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetrainingStatus {
    /// The trainer was started (or the webhook accepted); waiting for a candidate.
    Training,
    /// A candidate passed the gate and is being rolled out.
    RollingOut,
    /// The candidate runs on the fleet.
    Completed,
    /// The candidate failed the gate, or none came: nothing shipped.
    Rejected,
    /// The trainer, the webhook or the rollout failed.
    Failed,
}

impl RetrainingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Training => "training",
            Self::RollingOut => "rolling_out",
            Self::Completed => "completed",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "training" => Self::Training,
            "rolling_out" => Self::RollingOut,
            "completed" => Self::Completed,
            "rejected" => Self::Rejected,
            "failed" => Self::Failed,
            other => return Err(StoreError::Corrupt(format!("retraining status `{other}`"))),
        })
    }

    /// Still under way: no other retraining of the model starts meanwhile.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Training | Self::RollingOut)
    }
}

/// The retraining states still under way, as an SQL list.
pub(crate) const OPEN_RETRAINING_SQL: &str = "'training', 'rolling_out'";

/// One retraining: why it fired, and how far it got.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetrainingRow {
    pub id: u64,
    pub model_name: String,
    /// The version whose drift fired it.
    pub from_version: u64,
    pub fired_ms: u64,
    pub reason: String,
    pub status: RetrainingStatus,
    /// The latest step's detail or error.
    pub detail: Option<String>,
    pub candidate_version: Option<u64>,
    /// The quality gate's verdict on the candidate.
    pub gate: Option<String>,
    pub rollout_id: Option<u64>,
    pub updated_ms: u64,
}

/// A change to a retraining; fields left `None` keep their value.
#[derive(Debug, Clone)]
pub struct RetrainingUpdate {
    pub status: RetrainingStatus,
    pub detail: Option<String>,
    pub candidate_version: Option<u64>,
    pub gate: Option<String>,
    pub rollout_id: Option<u64>,
}

impl RetrainingUpdate {
    pub fn status(status: RetrainingStatus, detail: impl Into<String>) -> Self {
        RetrainingUpdate {
            status,
            detail: Some(detail.into()),
            candidate_version: None,
            gate: None,
            rollout_id: None,
        }
    }
}

/// What [`Store::create_rollout`] needs.
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub name: String,
    pub version: u64,
    /// A rollback: devices accept this version although it is not above their active one.
    pub rollback: bool,
    pub devices: Vec<String>,
    pub plan: RolloutPlan,
    /// The group and tags the devices were chosen by, so that devices enrolled later join.
    pub target: Option<Target>,
    pub now_ms: u64,
}

impl NewRollout {
    /// When the first wave's deployments time out.
    pub fn first_deadline_ms(&self) -> u64 {
        self.now_ms + self.plan.device_timeout_s * 1000
    }
}

/// Where one device's part of a dataset stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartStatus {
    /// The upload command is being sent; nothing came back yet.
    Requested,
    /// Chunks are arriving.
    Receiving,
    /// Every chunk arrived and the file matched its size and SHA-256.
    Complete,
    /// The device could not send its sample, the file did not match, or no answer came in
    /// time; the detail says which.
    Failed,
}

impl PartStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Receiving => "receiving",
            Self::Complete => "complete",
            Self::Failed => "failed",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "requested" => Self::Requested,
            "receiving" => Self::Receiving,
            "complete" => Self::Complete,
            "failed" => Self::Failed,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "dataset part status `{other}`"
                )));
            }
        })
    }
}

/// One device's sample within a dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetPart {
    pub device_id: String,
    pub status: PartStatus,
    /// The model the device sampled for, and the file's shape, once its chunks arrive.
    pub model: Option<ModelRef>,
    pub rows: Option<u64>,
    pub bytes: Option<u64>,
    pub sha256: Option<String>,
    pub chunks: Option<u32>,
    pub chunks_received: u32,
    pub detail: Option<String>,
    pub updated_ms: u64,
}

/// A dataset version: the input samples the controller asked a set of devices for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetRow {
    pub id: u64,
    /// The model whose devices were asked, when the request named one.
    pub model_name: Option<String>,
    pub created_ms: u64,
    pub created_by: String,
    pub reason: Option<String>,
    pub max_rows: Option<u64>,
    pub parts: Vec<DatasetPart>,
}

impl DatasetRow {
    /// No part is waiting any more.
    pub fn is_settled(&self) -> bool {
        self.parts
            .iter()
            .all(|p| matches!(p.status, PartStatus::Complete | PartStatus::Failed))
    }
}

/// What [`Store::create_dataset`] needs.
#[derive(Debug, Clone)]
pub struct NewDataset {
    pub model_name: Option<String>,
    pub devices: Vec<String>,
    pub created_by: String,
    pub reason: Option<String>,
    pub max_rows: Option<u64>,
    pub now_ms: u64,
}

/// A dataset part whose upload command should be (re)sent.
#[derive(Debug, Clone, PartialEq)]
pub struct DueUpload {
    pub dataset_id: u64,
    pub device_id: String,
    pub max_rows: Option<u64>,
}

/// What the store holds of a part when a chunk for it arrives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PartState {
    pub status: PartStatus,
    /// The command whose upload is being collected.
    pub upload_seq: Option<u64>,
    pub sha256: Option<String>,
}

/// What a store does with an arriving sample chunk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ChunkStep {
    /// Drop it, for this reason (logged).
    Ignore(&'static str),
    /// A new upload (the first, or a newer command's): forget any chunks of an older one,
    /// record the file's shape, then keep the chunk.
    Begin,
    /// Keep the chunk with the others of its upload.
    Add,
    /// The device says it cannot send its sample.
    Fail(String),
}

/// Matches a chunk against its part: only the newest command's upload is collected, a
/// complete part never changes, and one command's chunks must all describe one file.
pub(crate) fn chunk_step(part: Option<&PartState>, chunk: &SampleChunk) -> ChunkStep {
    let Some(part) = part else {
        return ChunkStep::Ignore("no such dataset, or this device was not asked");
    };
    if part.status == PartStatus::Complete {
        return ChunkStep::Ignore("the part is complete already");
    }
    match part.upload_seq {
        Some(seq) if chunk.command_seq < seq => ChunkStep::Ignore("a newer upload replaced it"),
        Some(seq) if chunk.command_seq == seq => {
            if part.status == PartStatus::Failed {
                ChunkStep::Ignore("the upload failed already")
            } else if part.sha256.as_deref() != Some(chunk.sha256.as_str()) {
                ChunkStep::Ignore("it describes another file than its upload's first chunk")
            } else {
                ChunkStep::Add
            }
        }
        _ => match &chunk.error {
            Some(error) => ChunkStep::Fail(error.chars().take(500).collect()),
            None => ChunkStep::Begin,
        },
    }
}

/// A dataset's file from its complete parts (device id order). CSV: one header, which
/// every part must share, then every part's rows. NPY (a tensor model's samples): every
/// part's records, which must all be of one input shape.
pub fn merge_parts(parts: &[(String, Vec<u8>)]) -> std::result::Result<Vec<u8>, String> {
    use edgeloop_shared::protocol::SampleFormat;
    let formats: Vec<SampleFormat> = parts.iter().map(|(_, f)| SampleFormat::of(f)).collect();
    if let Some(i) = formats.iter().position(|f| *f != formats[0]) {
        return Err(format!(
            "the sample of {} is {}, that of {} {}: one dataset holds one model's inputs",
            parts[i].0,
            formats[i].extension().to_uppercase(),
            parts[0].0,
            formats[0].extension().to_uppercase()
        ));
    }
    if formats.first() == Some(&SampleFormat::Npy) {
        return edgeloop_shared::npy::merge_samples(parts);
    }
    let mut merged = Vec::new();
    let mut header: Option<&[u8]> = None;
    for (device, file) in parts {
        let end = file
            .iter()
            .position(|&b| b == b'\n')
            .map_or(file.len(), |i| i + 1);
        let (head, rows) = file.split_at(end);
        match header {
            None => {
                header = Some(head);
                merged.extend_from_slice(head);
            }
            Some(h) if h != head => {
                return Err(format!(
                    "the sample of {device} has other columns ({}) than the first ({})",
                    String::from_utf8_lossy(head).trim_end(),
                    String::from_utf8_lossy(h).trim_end()
                ));
            }
            Some(_) => {}
        }
        merged.extend_from_slice(rows);
    }
    Ok(merged)
}

/// Writes an audit entry stamped now; a failure is logged, not returned: the action it
/// records has happened.
pub async fn record_audit_now(
    store: &dyn Store,
    actor: &str,
    action: &str,
    target: String,
    detail: Option<String>,
) {
    let entry = AuditEntry {
        at_ms: edgeloop_agent::now_ms(),
        actor: actor.to_string(),
        action: action.to_string(),
        target,
        detail,
    };
    if let Err(e) = store.record_audit(&entry).await {
        tracing::warn!(error = %e, ?entry, "cannot write the audit log");
    }
}

/// One line of the audit log: who did what to what, when, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    /// The operator (as the API request named itself) or `controller` for the engine.
    pub actor: String,
    /// For example `rollout.create`, `rollout.pause`, `rollout.advance`.
    pub action: String,
    /// What was acted on, for example `rollout/3`.
    pub target: String,
    pub detail: Option<String>,
}

/// The trust document the controller relays, with the trust state it leads to (both JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTrust {
    pub version: u64,
    pub state: String,
    pub signed: String,
}

/// A deployment the dispatcher should (re)send a command for.
#[derive(Debug, Clone, PartialEq)]
pub struct DueDeployment {
    pub rollout_id: u64,
    pub device_id: String,
    pub model_name: String,
    pub model_version: u64,
    pub bundle_sha256: String,
    pub bundle_size: u64,
    pub rollback: bool,
    /// A delta bundle against the version the device reports running, if one was made.
    pub delta: Option<ModelDelta>,
}

/// A delta bundle of a published model: compressed against an earlier version, so that
/// only a device running that version can use it (PROTOCOL §7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelDelta {
    pub name: String,
    pub version: u64,
    pub base_version: u64,
    /// SHA-256 of the base version's ONNX model, which a device checks before taking it.
    pub base_sha256: String,
    pub bundle_sha256: String,
    pub bundle_size: u64,
}

/// A device's report about a command, kept as an audit trail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentEvent {
    pub device_id: String,
    pub received_ms: u64,
    pub rollout_id: Option<u64>,
    pub command_seq: u64,
    pub stage: String,
    pub model: Option<String>,
    pub detail: Option<String>,
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies device messages idempotently, all in one transaction: each message id is
    /// recorded with its effect, so a redelivery changes nothing. One result per envelope.
    /// Shared, not borrowed: a store that works on another thread takes them along without
    /// copying every message.
    async fn ingest_many(
        &self,
        envelopes: Arc<[Envelope]>,
        received_ms: u64,
    ) -> Result<Vec<Ingested>>;

    /// [`Store::ingest_many`] for one message.
    async fn ingest(&self, envelope: &Envelope, received_ms: u64) -> Result<Ingested> {
        let results = self
            .ingest_many(Arc::from([envelope.clone()]), received_ms)
            .await?;
        Ok(results[0])
    }

    async fn devices(&self) -> Result<Vec<DeviceRow>>;
    /// Adds devices to the registry (offline, never seen) unless they are there already;
    /// returns how many were new.
    async fn register_devices(&self, ids: &[String]) -> Result<u64>;
    async fn device_exists(&self, id: &str) -> Result<bool>;
    async fn telemetry(&self, device_id: &str, limit: u32) -> Result<Vec<TelemetryRow>>;
    /// Hourly aggregates of a device, newest hour first, with every summary stored so far.
    async fn hourly(&self, device_id: &str, limit: u32) -> Result<Vec<HourlyRow>>;
    /// Writes the hourly aggregates that ingest has folded in memory but not yet into the
    /// database (SQLite: see `SqliteStore`'s pending hours; PostgreSQL folds in each ingest
    /// transaction and has none). [`Store::hourly`] and [`Store::prune`] do it first.
    async fn flush_hourly(&self) -> Result<()> {
        Ok(())
    }
    /// Retention: deletes raw summaries and the duplicate-detection record of messages
    /// received before `raw_before_ms` (a copy of such a message arriving later would be
    /// stored again), and hourly aggregates of hours before `aggregates_before_ms`.
    async fn prune(&self, raw_before_ms: u64, aggregates_before_ms: u64) -> Result<Pruned>;

    /// Takes or renews the lease `name` for `holder` until `now_ms + ttl_ms`; false when
    /// another holder's lease has not expired. Replicas sharing a database use it so that
    /// one of them at a time does a job.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<bool>;
    async fn deployment_events(&self, device_id: &str, limit: u32) -> Result<Vec<DeploymentEvent>>;

    /// The trust document being relayed, if any.
    async fn trust(&self) -> Result<Option<StoredTrust>>;
    /// Replaces the trust document if the stored one is still version `previous` (0: none
    /// yet); false when another replica replaced it first.
    async fn replace_trust(&self, previous: u64, next: &StoredTrust) -> Result<bool>;

    /// Records a published model; a name and version that exist already are a conflict.
    async fn insert_model(&self, model: &ModelRow) -> Result<()>;
    async fn models(&self) -> Result<Vec<ModelRow>>;
    async fn model(&self, name: &str, version: u64) -> Result<Option<ModelRow>>;
    /// Records a delta bundle of a published model; recording one for the same versions
    /// again replaces it.
    async fn insert_model_delta(&self, delta: &ModelDelta) -> Result<()>;
    /// The delta bundles of a model version, by base version.
    async fn model_deltas(&self, name: &str, version: u64) -> Result<Vec<ModelDelta>>;

    /// Creates a rollout of a model to the given devices (a rollback when `rollback`), each
    /// in the wave its plan assigns ([`RolloutPlan::assign`]), the first wave open.
    /// Unfinished deployments of those devices in earlier rollouts become `superseded`.
    async fn create_rollout(&self, new: &NewRollout) -> Result<RolloutRow>;
    /// Adds the devices that match a rollout's target but came later (see
    /// [`late_joiners`]) to it, in its current wave, and returns them by rollout.
    async fn join_rollouts(&self, now_ms: u64) -> Result<Vec<(u64, String)>>;
    async fn rollouts(&self) -> Result<Vec<RolloutRow>>;
    async fn rollout(&self, id: u64) -> Result<Option<RolloutRow>>;
    /// The rollouts whose status is `in_progress`.
    async fn rollouts_in_progress(&self) -> Result<Vec<RolloutRow>>;
    /// Opens wave `from + 1` of rollout `id` at `now_ms` if its status is `status` and it is
    /// still in wave `from`; that wave's deployments time out at `deadline_ms`. False when it
    /// was not.
    async fn open_wave(
        &self,
        id: u64,
        status: RolloutStatus,
        from: u32,
        now_ms: u64,
        deadline_ms: u64,
    ) -> Result<bool>;
    /// Moves rollout `id` from status `from` to `to` with a reason; false when it was not
    /// in `from`. Aborting cancels the deployments never sent. With `deadline_ms`, the open
    /// deployments of the waves opened so far get that deadline (a resume).
    async fn set_rollout_status(
        &self,
        id: u64,
        from: RolloutStatus,
        to: RolloutStatus,
        reason: Option<&str>,
        deadline_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<bool>;
    /// Marks `timed_out` the deployments of rollouts in progress that are past their
    /// deadline and neither finished nor judged by the health window; returns how many.
    async fn expire_deployments(&self, now_ms: u64) -> Result<u64>;

    /// The newest `per_device` drift windows of each device for model `name` received
    /// since `since_ms`, newest first within each device.
    async fn recent_windows(
        &self,
        name: &str,
        per_device: u32,
        since_ms: u64,
    ) -> Result<Vec<WindowPoint>>;
    /// Records a fired retraining of `name` (status `training`) unless one of the model is
    /// still under way or one fired at or after `cooldown_since_ms`; None then.
    async fn start_retraining(
        &self,
        name: &str,
        from_version: u64,
        reason: &str,
        now_ms: u64,
        cooldown_since_ms: u64,
    ) -> Result<Option<RetrainingRow>>;
    /// Moves a retraining on, if it is still under way and never back: an update that says
    /// `training` (a trainer's progress) applies only while it is training, so it cannot undo
    /// a rollout the candidate started meanwhile. False when it did not apply.
    async fn update_retraining(
        &self,
        id: u64,
        update: &RetrainingUpdate,
        now_ms: u64,
    ) -> Result<bool>;
    /// Retrainings, newest first.
    async fn retrainings(&self, limit: u32) -> Result<Vec<RetrainingRow>>;

    /// Stores an enrollment token under the SHA-256 of its secret.
    async fn create_token(&self, token: &TokenRow, secret_sha256: &str) -> Result<()>;
    async fn tokens(&self) -> Result<Vec<TokenRow>>;
    /// Enrolls a device with the token whose secret hashes to `secret_sha256`, in one
    /// transaction: checks and spends a use of the token, records the enrollment, and with
    /// an auto-approving token puts the device in the registry. Enrolling again with the same
    /// key returns the enrollment as it is, spending nothing.
    async fn enroll(
        &self,
        secret_sha256: &str,
        request: &EnrollRequest,
        now_ms: u64,
    ) -> Result<EnrollOutcome>;
    /// Approves a pending enrollment and puts the device in the registry; None when there
    /// is no pending enrollment of that id.
    async fn approve_enrollment(
        &self,
        device_id: &str,
        by: &str,
        now_ms: u64,
    ) -> Result<Option<EnrollmentRow>>;
    async fn enrollments(&self) -> Result<Vec<EnrollmentRow>>;
    /// Replaces the broker password (its SHA-256) of an approved enrollment; false when the
    /// device has no approved enrollment.
    async fn set_broker_password(&self, device_id: &str, password_sha256: &str) -> Result<bool>;
    /// True when the device's enrollment is approved and its broker password hashes to
    /// `password_sha256`.
    async fn broker_login(&self, device_id: &str, password_sha256: &str) -> Result<bool>;

    async fn record_audit(&self, entry: &AuditEntry) -> Result<()>;
    /// The audit log, newest first.
    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>>;

    /// Unfinished deployments on devices reported online, in the open waves of rollouts in
    /// progress, whose last command or report is older than `quiet_since_ms`.
    async fn due_deployments(&self, quiet_since_ms: u64) -> Result<Vec<DueDeployment>>;
    /// Takes the next command sequence number for a device and marks the deployment sent;
    /// `None` when the deployment has finished or been superseded meanwhile.
    async fn mark_sent(&self, rollout_id: u64, device_id: &str, now_ms: u64)
    -> Result<Option<u64>>;

    /// Records a dataset request: one part per device, each `requested`.
    async fn create_dataset(&self, new: &NewDataset) -> Result<DatasetRow>;
    /// Datasets, newest first, with their parts (without their files).
    async fn datasets(&self, limit: u32) -> Result<Vec<DatasetRow>>;
    async fn dataset(&self, id: u64) -> Result<Option<DatasetRow>>;
    /// The files of a dataset's complete parts, in device id order.
    async fn dataset_files(&self, id: u64) -> Result<Vec<(String, Vec<u8>)>>;
    /// Parts still `requested` from devices reported online, whose command was never sent
    /// or last sent before `quiet_since_ms`.
    async fn due_uploads(&self, quiet_since_ms: u64) -> Result<Vec<DueUpload>>;
    /// Takes the next command sequence number for a device and records it as the part's
    /// command; `None` when the part is no longer `requested`.
    async fn mark_upload_sent(
        &self,
        dataset_id: u64,
        device_id: &str,
        now_ms: u64,
    ) -> Result<Option<u64>>;
    /// Fails the parts still requested or receiving whose last change is before
    /// `before_ms`; returns how many.
    async fn expire_uploads(&self, before_ms: u64, now_ms: u64) -> Result<u64>;
}

/// Gives `device` an approved enrollment with `password` as its broker password, as the
/// enrollment API does once a device has proved its key (a token of its own, used at
/// once): for tests and benches that need devices with broker logins.
#[doc(hidden)]
pub async fn approve_device(store: &dyn Store, device: &str, password: &str) -> Result<()> {
    let secret = edgeloop_shared::sha256_hex(device.as_bytes());
    let token = TokenRow {
        id: format!("approve-{device}"),
        group: "default".into(),
        tags: vec![],
        expires_ms: u64::MAX / 2,
        uses_left: Some(1),
        auto_approve: true,
        created_ms: 0,
        created_by: "test".into(),
    };
    store.create_token(&token, &secret).await?;
    let request = EnrollRequest {
        device_id: device.into(),
        public_key: format!("ed25519:{device}"),
        board: None,
        arch: None,
        agent_version: None,
    };
    store.enroll(&secret, &request, 1).await?;
    let hash = edgeloop_shared::sha256_hex(password.as_bytes());
    store.set_broker_password(device, &hash).await?;
    Ok(())
}

/// Compares two secrets' hashes in time that does not depend on where they differ.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The detail of a part that [`Store::expire_uploads`] failed.
pub const UPLOAD_EXPIRED: &str = "no complete upload came from the device in time";
