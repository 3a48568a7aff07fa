//! Rollouts: a model version sent to a set of devices. The [`Dispatcher`] turns unfinished
//! deployments into signed deploy commands, and sends them again to devices that went
//! quiet, until each device reports the deployment finished.

use std::sync::Arc;
use std::time::Duration;

use edgeloop_agent::now_ms;
use edgeloop_shared::command::{Command, CommandAction, DeployAction, SignedCommand};
use edgeloop_shared::protocol::{Envelope, Message, ModelRef};
use edgeloop_shared::signing::SecretKey;
use edgeloop_shared::topics::{Channel, Topics};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::registry::ArtifactStore;
use crate::store::{DueDeployment, RolloutRow, Store, StoreError};

/// How often the dispatcher looks for work when nothing wakes it.
const DISPATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("a rollout needs at least one device, and none are known")]
    NoDevices,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a rollout of `name` v`version` to `devices`, or to every known device when
/// `devices` is `None`. A `rollback` sends rollback commands: the only ones with which a
/// device installs a version that is not above its active one.
pub async fn create(
    store: &dyn Store,
    name: &str,
    version: u64,
    rollback: bool,
    devices: Option<Vec<String>>,
) -> Result<RolloutRow, RolloutError> {
    let devices = match devices {
        Some(list) => list,
        None => store.devices().await?.into_iter().map(|d| d.id).collect(),
    };
    if devices.is_empty() {
        return Err(RolloutError::NoDevices);
    }
    let row = store
        .create_rollout(name, version, rollback, &devices, now_ms())
        .await?;
    info!(rollout = row.id, model = %name, version, rollback, devices = devices.len(), "rollout created");
    Ok(row)
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
            if let Err(e) = self.dispatch_due().await {
                warn!(error = %e, "rollout dispatch failed; retrying");
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
            let envelope = self.command(&due, seq, now);
            let topic = self
                .topics
                .device(&due.device_id, Channel::Commands)
                .expect("stored device ids are valid");
            if let Err(e) = self
                .client
                .publish(topic, QoS::AtLeastOnce, false, envelope.encode())
                .await
            {
                warn!(device = %due.device_id, error = %e, "cannot queue deploy command");
            } else {
                info!(device = %due.device_id, rollout = due.rollout_id, seq, "deploy command sent");
            }
        }
        Ok(())
    }

    fn command(&self, due: &DueDeployment, seq: u64, now: u64) -> Envelope {
        let command = Command {
            device_id: due.device_id.clone(),
            seq,
            issued_ms: now,
            expires_ms: now + self.command_ttl.as_millis() as u64,
            action: {
                let deploy = DeployAction {
                    rollout_id: due.rollout_id,
                    model: ModelRef {
                        name: due.model_name.clone(),
                        version: due.model_version,
                    },
                    bundle_url: ArtifactStore::url_path(&due.model_name, due.model_version),
                    bundle_sha256: due.bundle_sha256.clone(),
                    bundle_size: due.bundle_size,
                };
                if due.rollback {
                    CommandAction::Rollback(deploy)
                } else {
                    CommandAction::Deploy(deploy)
                }
            },
        };
        Envelope::new(
            due.device_id.clone(),
            uuid::Uuid::now_v7().to_string(),
            now,
            Message::Command(SignedCommand::sign(&command, &self.key)),
        )
    }
}
