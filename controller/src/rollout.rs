//! Rollouts: a model version sent to a set of devices in waves. The [`Dispatcher`] moves
//! each rollout along its plan (opens the next wave, stops one that fails, times out
//! devices that do not answer), turns the deployments of open waves into signed deploy
//! commands, and sends them again to devices that went quiet, until each device reports
//! the deployment finished. Operators pause, resume and abort through [`change`].

use std::sync::Arc;
use std::time::Duration;

use edgeloop_agent::now_ms;
use edgeloop_shared::command::{
    Command, CommandAction, DeltaOffer, DeployAction, SignedCommand, UploadAction,
};
use edgeloop_shared::protocol::{Envelope, Message, ModelRef};
use edgeloop_shared::signing::SecretKey;
use edgeloop_shared::topics::{Channel, Topics};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::plan::{
    Decision, DriftEvidence, GateWindow, OnFailure, PlanError, RolloutPlan, WaveCounts, next_step,
};
use crate::registry::ArtifactStore;
use crate::store::{
    DueDeployment, NewRollout, RolloutRow, RolloutStatus, Store, StoreError, record_audit_now,
};

/// How often the dispatcher looks for work when nothing wakes it.
const DISPATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long a dataset part may wait for its device's complete upload before it fails.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// The actor the engine writes into the audit log.
pub const ENGINE: &str = "controller";

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("at least one device is needed, and none are known")]
    NoDevices,
    #[error("no device is in group {group:?} with tags {tags:?}")]
    NoMatch {
        group: Option<String>,
        tags: Vec<String>,
    },
    #[error("name devices, or a group and tags, not both")]
    DevicesAndTarget,
    #[error("{model} is not for {}", .devices.iter().map(|(d, why)| format!("{d} ({why})")).collect::<Vec<_>>().join(", "))]
    NotForDevices {
        model: String,
        /// Each device with why, as the device itself would say.
        devices: Vec<(String, String)>,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("rollout {id} is {status}: cannot {action} it")]
    WrongState {
        id: u64,
        status: &'static str,
        action: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A rollout to create.
#[derive(Debug, Clone)]
pub struct RolloutRequest {
    pub name: String,
    pub version: u64,
    /// Send rollback commands: the only ones with which a device installs a version that
    /// is not above its active one.
    pub rollback: bool,
    /// Every known device when none (and no target).
    pub devices: Option<Vec<String>>,
    /// The devices of this group (when given) that have all these tags.
    pub target: Option<Target>,
    pub plan: RolloutPlan,
    /// Who asks, and why, for the audit log.
    pub actor: String,
    pub reason: Option<String>,
}

impl RolloutRequest {
    /// A rollout of `name` v`version` to every known device, all at once.
    pub fn new(name: &str, version: u64) -> Self {
        RolloutRequest {
            name: name.to_string(),
            version,
            rollback: false,
            devices: None,
            target: None,
            plan: RolloutPlan::default(),
            actor: ENGINE.to_string(),
            reason: None,
        }
    }
}

pub use crate::store::Target;

/// The devices a request names: the listed ones, those matching a target, or every known
/// device when it names neither; never none.
pub async fn select_devices(
    store: &dyn Store,
    devices: Option<Vec<String>>,
    target: Option<Target>,
) -> Result<Vec<String>, RolloutError> {
    let devices = match (devices, target) {
        (Some(_), Some(_)) => return Err(RolloutError::DevicesAndTarget),
        (Some(list), None) => list,
        (None, Some(target)) => {
            let matching: Vec<String> = store
                .devices()
                .await?
                .into_iter()
                .filter(|d| target.matches(d))
                .map(|d| d.id)
                .collect();
            if matching.is_empty() {
                return Err(RolloutError::NoMatch {
                    group: target.group,
                    tags: target.tags,
                });
            }
            matching
        }
        (None, None) => store.devices().await?.into_iter().map(|d| d.id).collect(),
    };
    if devices.is_empty() {
        return Err(RolloutError::NoDevices);
    }
    Ok(devices)
}

/// The devices of `devices` that the model is for, and those it is not for, with why:
/// by the architecture and board each reported at enrollment, judged as the device would
/// judge them. A device that never enrolled reported neither and is kept: it checks the
/// model itself at install.
async fn split_by_requirements(
    store: &dyn Store,
    requirements: &edgeloop_shared::bundle::Requirements,
    devices: Vec<String>,
) -> Result<(Vec<String>, Vec<(String, String)>), RolloutError> {
    if requirements.targets.is_empty() && requirements.boards.is_empty() {
        return Ok((devices, Vec::new()));
    }
    let known: std::collections::HashMap<String, crate::store::DeviceRow> = store
        .devices()
        .await?
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect();
    let mut fit = Vec::with_capacity(devices.len());
    let mut misfit = Vec::new();
    for id in devices {
        let why = known.get(&id).and_then(|d| {
            crate::store::enrolled_fit(requirements, d.arch.as_deref(), d.board.as_deref()).err()
        });
        match why {
            Some(why) => misfit.push((id, why.to_string())),
            None => fit.push(id),
        }
    }
    Ok((fit, misfit))
}

/// Creates a rollout, its first wave open. Devices the model is not for (by the
/// architecture and board they enrolled with) are left out of a rollout to a group or to
/// every device, and named ones are refused, so that no wave fails on them.
pub async fn create(
    store: &dyn Store,
    request: RolloutRequest,
) -> Result<RolloutRow, RolloutError> {
    request.plan.validate()?;
    let target = request.target.clone();
    let named = request.devices.is_some();
    let devices = select_devices(store, request.devices, request.target).await?;
    let requirements = store
        .model(&request.name, request.version)
        .await?
        .map(|m| m.requirements)
        .unwrap_or_default();
    let (devices, left_out) = split_by_requirements(store, &requirements, devices).await?;
    if !left_out.is_empty() && (named || devices.is_empty()) {
        return Err(RolloutError::NotForDevices {
            model: format!("{} v{}", request.name, request.version),
            devices: left_out,
        });
    }
    let now = now_ms();
    let row = store
        .create_rollout(&NewRollout {
            name: request.name,
            version: request.version,
            rollback: request.rollback,
            devices,
            plan: request.plan,
            target,
            now_ms: now,
        })
        .await?;
    let what = if row.rollback { "rollback" } else { "rollout" };
    audit(
        store,
        &request.actor,
        "rollout.create",
        row.id,
        Some(format!(
            "{what} of {} v{} to {} devices in {} waves{}{}",
            row.model_name,
            row.model_version,
            row.deployments.len(),
            row.plan.waves.len(),
            request.reason.map(|r| format!(": {r}")).unwrap_or_default(),
            if left_out.is_empty() {
                String::new()
            } else {
                format!(
                    "; left out {} the model is not for: {}",
                    left_out.len(),
                    left_out
                        .iter()
                        .map(|(d, _)| d.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )),
    )
    .await;
    info!(rollout = row.id, model = %row.model_name, version = row.model_version, rollback = row.rollback, devices = row.deployments.len(), "rollout created");
    Ok(row)
}

/// An operator's action on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Stop sending commands; in-flight deployments finish.
    Pause,
    /// Go on. A rollout paused because a wave failed moves on to the next wave.
    Resume,
    /// Stop for good: deployments never sent are cancelled; with `rollback`, devices that
    /// run the new version are rolled back to what they ran before.
    Abort { rollback: bool },
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::Pause => "pause",
            Change::Resume => "resume",
            Change::Abort { .. } => "abort",
        }
    }
}

/// Applies an operator's `change` to rollout `id`. Returns the rollout as it is now, and
/// the rollback rollouts an abort created.
pub async fn change(
    store: &dyn Store,
    id: u64,
    change: Change,
    actor: &str,
    reason: Option<&str>,
) -> Result<(RolloutRow, Vec<RolloutRow>), RolloutError> {
    let row = store
        .rollout(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("rollout {id}")))?;
    let wrong_state = || RolloutError::WrongState {
        id,
        status: row.status.as_str(),
        action: change.name(),
    };
    let now = now_ms();
    let mut rollbacks = Vec::new();
    let changed = match change {
        Change::Pause => {
            if row.status != RolloutStatus::InProgress {
                return Err(wrong_state());
            }
            store
                .set_rollout_status(
                    id,
                    RolloutStatus::InProgress,
                    RolloutStatus::Paused,
                    reason,
                    None,
                    now,
                )
                .await?
        }
        Change::Resume => {
            if row.status != RolloutStatus::Paused {
                return Err(wrong_state());
            }
            let deadline = now + row.plan.device_timeout_s * 1000;
            // The operator overrides a failed wave: the next one opens, before the rollout
            // is in progress again so that the engine does not judge the failed wave anew.
            let evidence = drift_evidence(store, &row).await?;
            if matches!(next_step(&row, evidence.as_ref()), Decision::Stop(_))
                && row.current_wave < row.plan.last_wave()
            {
                open_next_wave(store, &row, RolloutStatus::Paused, actor, now).await?;
            }
            store
                .set_rollout_status(
                    id,
                    RolloutStatus::Paused,
                    RolloutStatus::InProgress,
                    reason,
                    Some(deadline),
                    now,
                )
                .await?
        }
        Change::Abort { rollback } => {
            if !matches!(
                row.status,
                RolloutStatus::InProgress | RolloutStatus::Paused
            ) {
                return Err(wrong_state());
            }
            let aborted = store
                .set_rollout_status(id, row.status, RolloutStatus::Aborted, reason, None, now)
                .await?;
            if aborted && rollback {
                rollbacks = roll_back_devices(store, &row, actor).await?;
            }
            aborted
        }
    };
    if !changed {
        // Another replica or the engine changed it first.
        let now_row = store
            .rollout(id)
            .await?
            .expect("rollouts are never deleted");
        return Err(RolloutError::WrongState {
            id,
            status: now_row.status.as_str(),
            action: change.name(),
        });
    }
    audit(
        store,
        actor,
        &format!("rollout.{}", change.name()),
        id,
        reason.map(str::to_string),
    )
    .await;
    info!(
        rollout = id,
        action = change.name(),
        actor,
        "rollout changed"
    );
    let row = store
        .rollout(id)
        .await?
        .expect("rollouts are never deleted");
    Ok((row, rollbacks))
}

/// Creates rollback rollouts for the devices of `row` that run its version (active or
/// committed), back to the model each ran before, one rollout per previous model.
async fn roll_back_devices(
    store: &dyn Store,
    row: &RolloutRow,
    actor: &str,
) -> Result<Vec<RolloutRow>, RolloutError> {
    let mut groups = std::collections::BTreeMap::<(String, u64), Vec<String>>::new();
    for d in &row.deployments {
        if matches!(d.status.as_str(), "active" | "committed")
            && let Some(previous) = &d.previous
            && (previous.name != row.model_name || previous.version != row.model_version)
        {
            groups
                .entry((previous.name.clone(), previous.version))
                .or_default()
                .push(d.device_id.clone());
        }
    }
    let mut created = Vec::new();
    for ((name, version), devices) in groups {
        let request = RolloutRequest {
            // Only a rollback goes below the active version of the same model; another
            // model is an ordinary deploy.
            rollback: name == row.model_name,
            devices: Some(devices),
            actor: actor.to_string(),
            reason: Some(format!("rollout {} aborted", row.id)),
            ..RolloutRequest::new(&name, version)
        };
        created.push(create(store, request).await?);
    }
    Ok(created)
}

/// Opens the wave after `row`'s current one if the rollout is still `status` and in that
/// wave.
async fn open_next_wave(
    store: &dyn Store,
    row: &RolloutRow,
    status: RolloutStatus,
    actor: &str,
    now: u64,
) -> Result<(), StoreError> {
    let deadline = now + row.plan.device_timeout_s * 1000;
    if store
        .open_wave(row.id, status, row.current_wave, now, deadline)
        .await?
    {
        let next = row.current_wave + 1;
        let devices = row.deployments.iter().filter(|d| d.wave == next).count();
        audit(
            store,
            actor,
            "rollout.advance",
            row.id,
            // Counted from 1, as `edgeloop rollout list` and the dashboard show waves.
            Some(format!("wave {} opened: {devices} devices", next + 1)),
        )
        .await;
        info!(rollout = row.id, wave = next, devices, "wave opened");
    }
    Ok(())
}

/// The drift windows a rollout's telemetry gate judges, received since its current wave
/// opened; None when its plan has no gate.
async fn drift_evidence(
    store: &dyn Store,
    row: &RolloutRow,
) -> Result<Option<DriftEvidence>, StoreError> {
    if row.plan.telemetry_gate.is_none() {
        return Ok(None);
    }
    let ours: std::collections::HashSet<&str> = row
        .deployments
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    let mut evidence = DriftEvidence::default();
    for w in store
        .recent_windows(&row.model_name, 1000, row.wave_opened_ms)
        .await?
        .into_iter()
        .filter(|w| ours.contains(w.device_id.as_str()))
    {
        let window = GateWindow {
            psi_max: w.psi_max,
            labelled: w.labelled,
            accuracy: w.accuracy,
            latency_p99_ms: w.latency_p99_ms,
            samples: w.samples,
            errors: w.errors,
            mae: w.mae,
        };
        if w.model_version == row.model_version {
            evidence.new.push(window);
        } else {
            evidence.old.push(window);
        }
    }
    Ok(Some(evidence))
}

/// Writes an audit entry about rollout `rollout`.
async fn audit(store: &dyn Store, actor: &str, action: &str, rollout: u64, detail: Option<String>) {
    record_audit_now(store, actor, action, format!("rollout/{rollout}"), detail).await;
}

/// One engine step: times out silent deployments, then moves every rollout in progress
/// along its plan.
pub async fn advance(store: &dyn Store) -> Result<(), RolloutError> {
    let now = now_ms();
    let expired = store.expire_deployments(now).await?;
    if expired > 0 {
        warn!(deployments = expired, "deployments timed out");
    }
    // Devices enrolled since a rollout to their group or tags was created join it.
    for (rollout, device) in store.join_rollouts(now).await? {
        info!(rollout, device = %device, "a device joined the rollout of its group");
        audit(
            store,
            ENGINE,
            "rollout.join",
            rollout,
            Some(format!("device {device} matches the rollout's target")),
        )
        .await;
    }
    for row in store.rollouts_in_progress().await? {
        let evidence = drift_evidence(store, &row).await?;
        match next_step(&row, evidence.as_ref()) {
            Decision::Wait => {}
            Decision::Advance => {
                open_next_wave(store, &row, RolloutStatus::InProgress, ENGINE, now).await?
            }
            Decision::Stop(reason) => {
                let counts = WaveCounts::of(&row.deployments, row.current_wave);
                warn!(rollout = row.id, wave = row.current_wave, ?counts, %reason, "wave failed");
                let change = match row.plan.on_failure {
                    OnFailure::Pause => Change::Pause,
                    OnFailure::Abort => Change::Abort { rollback: true },
                };
                match self::change(store, row.id, change, ENGINE, Some(&reason)).await {
                    Ok(_) | Err(RolloutError::WrongState { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Decision::Finish(reason) => {
                if store
                    .set_rollout_status(
                        row.id,
                        RolloutStatus::InProgress,
                        RolloutStatus::Failed,
                        Some(&reason),
                        None,
                        now,
                    )
                    .await?
                {
                    audit(store, ENGINE, "rollout.fail", row.id, Some(reason)).await;
                }
            }
        }
    }
    Ok(())
}

/// Sends deploy commands for unfinished deployments.
pub struct Dispatcher {
    pub store: Arc<dyn Store>,
    pub key: SecretKey,
    pub topics: Topics,
    pub client: AsyncClient,
    pub command_ttl: Duration,
    pub resend_after: Duration,
    /// Notified when a rollout is created, so the first commands go out at once.
    pub wake: Arc<Notify>,
    /// This replica's name for the dispatch lease: among replicas sharing a database, the
    /// lease holder alone sends commands.
    pub holder: String,
}

/// How long the dispatch lease lasts without renewal: a replica that dies hands dispatch
/// over to another after this.
const LEASE_TTL: Duration = Duration::from_secs(5);

impl Dispatcher {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(DISPATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            let now = now_ms();
            match self
                .store
                .acquire_lease(
                    "dispatcher",
                    &self.holder,
                    now,
                    LEASE_TTL.as_millis() as u64,
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!(error = %e, "cannot take the dispatch lease; retrying");
                    continue;
                }
            }
            if let Err(e) = advance(self.store.as_ref()).await {
                warn!(error = %e, "rollout engine step failed; retrying");
            }
            if let Err(e) = self.dispatch_due().await {
                warn!(error = %e, "rollout dispatch failed; retrying");
            }
            if let Err(e) = self.dispatch_uploads().await {
                warn!(error = %e, "upload dispatch failed; retrying");
            }
        }
    }

    async fn dispatch_due(&self) -> Result<(), StoreError> {
        let now = now_ms();
        let quiet_since = now.saturating_sub(self.resend_after.as_millis() as u64);
        for due in self.store.due_deployments(quiet_since).await? {
            let Some(seq) = self
                .store
                .mark_sent(due.rollout_id, &due.device_id, now)
                .await?
            else {
                continue;
            };
            if self
                .send(&due.device_id, seq, now, deploy_action(&due))
                .await
            {
                info!(device = %due.device_id, rollout = due.rollout_id, seq, "deploy command sent");
            }
        }
        Ok(())
    }

    /// Sends upload commands for dataset parts nothing came back for, and fails the parts
    /// that stayed incomplete for [`UPLOAD_TIMEOUT`].
    async fn dispatch_uploads(&self) -> Result<(), StoreError> {
        let now = now_ms();
        let expired = self
            .store
            .expire_uploads(now.saturating_sub(UPLOAD_TIMEOUT.as_millis() as u64), now)
            .await?;
        if expired > 0 {
            warn!(
                parts = expired,
                "dataset parts failed: no complete upload in time"
            );
        }
        let quiet_since = now.saturating_sub(self.resend_after.as_millis() as u64);
        for due in self.store.due_uploads(quiet_since).await? {
            let Some(seq) = self
                .store
                .mark_upload_sent(due.dataset_id, &due.device_id, now)
                .await?
            else {
                continue;
            };
            let action = CommandAction::UploadSamples(UploadAction {
                dataset_id: due.dataset_id,
                max_rows: due.max_rows,
            });
            if self.send(&due.device_id, seq, now, action).await {
                info!(device = %due.device_id, dataset = due.dataset_id, seq, "upload command sent");
            }
        }
        Ok(())
    }

    /// Signs a command and queues it for the device (QoS 1); a failure is logged, and the
    /// command goes again when it is due again. True when it was queued.
    async fn send(&self, device_id: &str, seq: u64, now: u64, action: CommandAction) -> bool {
        let command = Command {
            device_id: device_id.to_string(),
            seq,
            issued_ms: now,
            expires_ms: now + self.command_ttl.as_millis() as u64,
            action,
        };
        let envelope = Envelope::new(
            device_id.to_string(),
            uuid::Uuid::now_v7().to_string(),
            now,
            Message::Command(SignedCommand::sign(&command, &self.key)),
        );
        let topic = self
            .topics
            .device(device_id, Channel::Commands)
            .expect("stored device ids are valid");
        match self
            .client
            .publish(topic, QoS::AtLeastOnce, false, envelope.encode())
            .await
        {
            Ok(()) => true,
            Err(e) => {
                warn!(device = %device_id, error = %e, "cannot queue a command");
                false
            }
        }
    }
}

/// The deploy or rollback command a due deployment needs.
fn deploy_action(due: &DueDeployment) -> CommandAction {
    let deploy = DeployAction {
        rollout_id: due.rollout_id,
        model: ModelRef {
            name: due.model_name.clone(),
            version: due.model_version,
        },
        bundle_url: ArtifactStore::url_path(&due.model_name, due.model_version),
        bundle_sha256: due.bundle_sha256.clone(),
        bundle_size: due.bundle_size,
        delta: due.delta.as_ref().map(|d| DeltaOffer {
            base_sha256: d.base_sha256.clone(),
            bundle_url: ArtifactStore::delta_url_path(&d.name, d.version, d.base_version),
            bundle_sha256: d.bundle_sha256.clone(),
            bundle_size: d.bundle_size,
        }),
    };
    if due.rollback {
        CommandAction::Rollback(deploy)
    } else {
        CommandAction::Deploy(deploy)
    }
}
