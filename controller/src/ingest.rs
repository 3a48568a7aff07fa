//! Telemetry ingest: the controller's MQTT connection and the actor that validates and
//! stores what devices send.
//!
//! The connection subscribes to every device channel with a persistent session (the broker
//! keeps QoS 1 messages while the controller is down) and manual acknowledgements: a
//! message is acknowledged only after its row is committed, so a controller crash causes
//! a redelivery, which the store drops by message id, never a loss.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgeloop_agent::link::{Backoff, BrokerAddr};
use edgeloop_agent::now_ms;
use edgeloop_shared::batch::{self, ItemError, Payload};
use edgeloop_shared::protocol::{Envelope, Message, Receipt, RejectedMessage};
use edgeloop_shared::topics::{Channel, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::store::{Ingested, Store, StoreError};

/// Capacity of the channel from the connection to the ingest actor. The broker's in-flight
/// window bounds what is outstanding anyway; this only smooths bursts.
const INGEST_CAPACITY: usize = 256;
/// Capacity of the MQTT client's request channel (acknowledgements and commands).
const REQUEST_CAPACITY: usize = 1024;
/// Largest packet the controller's client reads. Well above the protocol's message limit so
/// that an oversize message reaches validation (and is refused there) instead of breaking
/// the connection and being redelivered forever.
const MAX_INCOMING_PACKET: usize = 16 << 20;

/// Ingest counters since the controller started.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub received: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub malformed: AtomicU64,
    pub store_errors: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IngestStatsSnapshot {
    pub received: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub store_errors: u64,
}

impl IngestStats {
    pub fn snapshot(&self) -> IngestStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IngestStatsSnapshot {
            received: get(&self.received),
            stored: get(&self.stored),
            duplicates: get(&self.duplicates),
            malformed: get(&self.malformed),
            store_errors: get(&self.store_errors),
        }
    }
}

/// Why a message was dropped without being stored.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error(transparent)]
    Topic(#[from] edgeloop_shared::topics::TopicError),
    #[error("`{0}` is not a device-to-controller channel")]
    WrongDirection(&'static str),
    #[error(transparent)]
    Decode(#[from] edgeloop_shared::protocol::DecodeError),
    #[error("topic is for device `{topic}` but the envelope says `{envelope}`")]
    DeviceMismatch { topic: String, envelope: String },
    #[error("channel `{channel}` carries `{expected}` messages, not `{got}`")]
    WrongKind {
        channel: &'static str,
        expected: &'static str,
        got: &'static str,
    },
}

/// What a device publish holds, once checked against its topic.
#[derive(Debug, Default, PartialEq)]
pub struct Checked {
    /// The device the topic names.
    pub device_id: String,
    /// Envelopes to store.
    pub accepted: Vec<Envelope>,
    /// Envelopes refused for good, named by message id so the device can drop them.
    pub rejected: Vec<RejectedMessage>,
    /// Envelopes refused whose message id could not even be read.
    pub unidentified: u64,
}

/// Checks a publish against its topic: the topic must be a device-to-controller channel;
/// a batch must come from the topic's device; every envelope must be from that device and
/// of the channel's kind. A payload that cannot be decoded at all is refused whole; an
/// envelope of a batch that fails is refused alone.
pub fn validate(topics: &Topics, topic: &str, payload: &[u8]) -> Result<Checked, Rejection> {
    let (device_id, channel) = topics.parse(topic)?;
    if !Channel::FROM_DEVICE.contains(&channel) {
        return Err(Rejection::WrongDirection(channel.as_str()));
    }
    let mut checked = Checked {
        device_id: device_id.to_string(),
        ..Checked::default()
    };
    let items = match batch::decode(payload) {
        Ok(Payload::Single(envelope)) => vec![Ok(envelope)],
        Ok(Payload::Batch {
            device_id: from,
            items,
        }) => {
            if from != device_id {
                return Err(Rejection::DeviceMismatch {
                    topic: device_id.to_string(),
                    envelope: from,
                });
            }
            items
        }
        Err(error) => {
            // A single envelope that does not decode may still name itself; then the
            // device learns that it is refused instead of sending it forever.
            let msg_id = serde_json::from_slice::<MsgIdProbe>(payload)
                .ok()
                .and_then(|p| p.msg_id)
                .filter(|id| Envelope::is_valid_msg_id(id));
            match msg_id {
                Some(msg_id) => vec![Err(ItemError {
                    msg_id: Some(msg_id),
                    error,
                })],
                None => return Err(Rejection::Decode(error)),
            }
        }
    };
    for item in items {
        let refusal = match item {
            Ok(envelope) if envelope.device_id != device_id => (
                Some(envelope.msg_id),
                Rejection::DeviceMismatch {
                    topic: device_id.to_string(),
                    envelope: envelope.device_id,
                },
            ),
            Ok(envelope) if envelope.message.kind() != channel.message_kind() => (
                Some(envelope.msg_id),
                Rejection::WrongKind {
                    channel: channel.as_str(),
                    expected: channel.message_kind(),
                    got: envelope.message.kind(),
                },
            ),
            Ok(envelope) => {
                checked.accepted.push(envelope);
                continue;
            }
            Err(ItemError { msg_id, error }) => (msg_id, Rejection::Decode(error)),
        };
        match refusal {
            (Some(msg_id), reason) => checked.rejected.push(RejectedMessage {
                msg_id,
                reason: reason.to_string(),
            }),
            (None, _) => checked.unidentified += 1,
        }
    }
    Ok(checked)
}

#[derive(serde::Deserialize)]
struct MsgIdProbe {
    msg_id: Option<String>,
}

/// The controller's MQTT connection settings.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub broker: BrokerAddr,
    pub client_id: String,
    pub topics: Topics,
    /// TLS for an `mqtts://` broker.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Subscribe as a member of this shared-subscription group (`$share/{group}/…`), so
    /// that replicas split the messages between them.
    pub shared_group: Option<String>,
}

/// Starts the MQTT connection and the ingest actor. Returns the client, which the rollout
/// dispatcher publishes commands with.
pub fn start(
    config: BusConfig,
    store: Arc<dyn Store>,
    stats: Arc<IngestStats>,
    shutdown: CancellationToken,
) -> AsyncClient {
    let mut options = MqttOptions::new(&config.client_id, &config.broker.host, config.broker.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_INCOMING_PACKET);
    if let Err(e) = config.broker.configure(&mut options, config.tls.as_ref()) {
        // The server builds the TLS configuration for every mqtts:// broker before this.
        error!(error = %e, "broker transport");
    }
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let (tx, rx) = mpsc::channel(INGEST_CAPACITY);
    let filters: Vec<String> = Channel::FROM_DEVICE
        .iter()
        .map(|c| {
            let filter = config.topics.all_devices(*c);
            match &config.shared_group {
                Some(group) => format!("$share/{group}/{filter}"),
                None => filter,
            }
        })
        .collect();
    tokio::spawn(connection(
        eventloop,
        client.clone(),
        filters,
        tx,
        shutdown.clone(),
    ));
    tokio::spawn(
        Ingestor {
            store,
            stats,
            topics: config.topics,
            client: client.clone(),
        }
        .run(rx, shutdown),
    );
    client
}

async fn connection(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    ingest: mpsc::Sender<Publish>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    info!(session_present = ack.session_present, "controller connected to broker");
                    backoff.reset();
                    for filter in &filters {
                        if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                            error!(%filter, error = %e, "cannot subscribe");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if ingest.send(publish).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "controller broker connection failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }
}

/// Validates and stores device messages, then acknowledges them.
struct Ingestor {
    store: Arc<dyn Store>,
    stats: Arc<IngestStats>,
    topics: Topics,
    client: AsyncClient,
}

/// How handling a publish ended.
enum Handled {
    /// Stored or refused for good: acknowledge it, and send the receipt if there is one.
    Done(Option<(String, Receipt)>),
    /// Shutdown came before the store could commit: do not acknowledge.
    Interrupted,
}

impl Ingestor {
    async fn run(self, mut rx: mpsc::Receiver<Publish>, shutdown: CancellationToken) {
        loop {
            let publish = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => break,
                },
            };
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            let receipt = match self.handle(&publish, &shutdown).await {
                Handled::Done(receipt) => receipt,
                // No ack: the broker delivers the message again to the next session.
                Handled::Interrupted => break,
            };
            if let Err(e) = self.client.ack(&publish).await {
                warn!(error = %e, "cannot acknowledge message");
            }
            if let Some((device_id, receipt)) = receipt {
                self.send_receipt(&device_id, receipt).await;
            }
        }
    }

    /// Tells a device which of its messages are stored, so it can let go of them.
    async fn send_receipt(&self, device_id: &str, receipt: Receipt) {
        let Ok(topic) = self.topics.device(device_id, Channel::Receipts) else {
            return;
        };
        let envelope = Envelope::new(
            device_id,
            uuid::Uuid::now_v7().to_string(),
            now_ms(),
            Message::Receipt(receipt),
        );
        // If it is lost, the device sends its messages again and gets a receipt for the
        // duplicates: a cost, not a loss.
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, envelope.encode())
            .await
        {
            warn!(device = device_id, error = %e, "cannot send receipt");
        }
    }

    async fn handle(&self, publish: &Publish, shutdown: &CancellationToken) -> Handled {
        let checked = match validate(&self.topics, &publish.topic, &publish.payload) {
            Ok(c) => c,
            Err(reason) => {
                let n = self.stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(topic = %publish.topic, bytes = publish.payload.len(), %reason, malformed_total = n, "dropped malformed message");
                return Handled::Done(None);
            }
        };
        let Checked {
            device_id,
            accepted,
            mut rejected,
            unidentified,
        } = checked;
        let refused = rejected.len() as u64 + unidentified;
        if refused > 0 {
            let n = self.stats.malformed.fetch_add(refused, Ordering::Relaxed) + refused;
            for r in &rejected {
                warn!(device = %device_id, msg_id = %r.msg_id, reason = %r.reason, malformed_total = n, "dropped malformed message");
            }
            if unidentified > 0 {
                warn!(device = %device_id, count = unidentified, malformed_total = n, "dropped malformed messages without a readable id");
            }
        }
        let mut stored = Vec::new();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !accepted.is_empty() {
            match self.store.ingest_many(&accepted, now_ms()).await {
                Ok(results) => {
                    let dups = results
                        .iter()
                        .filter(|r| **r == Ingested::Duplicate)
                        .count() as u64;
                    self.stats
                        .stored
                        .fetch_add(results.len() as u64 - dups, Ordering::Relaxed);
                    self.stats.duplicates.fetch_add(dups, Ordering::Relaxed);
                    if dups > 0 {
                        debug!(device = %device_id, dups, "duplicates dropped");
                    }
                    stored = accepted.into_iter().map(|e| e.msg_id).collect();
                    break;
                }
                Err(e @ StoreError::Corrupt(_)) => {
                    // The store refused these messages for what they are: retrying cannot help.
                    self.stats
                        .malformed
                        .fetch_add(accepted.len() as u64, Ordering::Relaxed);
                    error!(device = %device_id, error = %e, "messages refused by the store; dropped");
                    rejected.extend(accepted.into_iter().map(|m| RejectedMessage {
                        msg_id: m.msg_id,
                        reason: e.to_string(),
                    }));
                    break;
                }
                Err(e) => {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    error!(device = %device_id, error = %e, "cannot store messages; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Handled::Interrupted,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        if stored.is_empty() && rejected.is_empty() {
            return Handled::Done(None);
        }
        Handled::Done(Some((device_id, Receipt { stored, rejected })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_shared::protocol::{DeviceStatus, Message};

    fn status_bytes(device: &str) -> Vec<u8> {
        Envelope::new(
            device,
            "m1",
            1,
            Message::Status(DeviceStatus {
                online: true,
                agent_version: "x".into(),
                model: None,
                uptime_s: 0,
                inferences: 0,
                errors: 0,
                malformed_messages: 0,
                outbox: Default::default(),
            }),
        )
        .encode()
    }

    #[test]
    fn validation_ties_topic_envelope_and_kind_together() {
        let t = Topics::default();
        let ok = validate(&t, "edgeloop/v1/devices/d1/status", &status_bytes("d1")).unwrap();
        assert_eq!((ok.device_id.as_str(), ok.accepted.len()), ("d1", 1));
        let refused = validate(&t, "edgeloop/v1/devices/d2/status", &status_bytes("d1")).unwrap();
        assert!(refused.accepted.is_empty());
        assert_eq!(refused.rejected[0].msg_id, "m1");
        assert!(
            refused.rejected[0]
                .reason
                .contains("topic is for device `d2`")
        );
        let refused =
            validate(&t, "edgeloop/v1/devices/d1/telemetry", &status_bytes("d1")).unwrap();
        assert!(
            refused.rejected[0]
                .reason
                .contains("carries `drift_summary`")
        );
        // A single envelope that does not decode but names itself is refused by name.
        let refused = validate(
            &t,
            "edgeloop/v1/devices/d1/status",
            br#"{"v":9,"msg_id":"m9"}"#,
        )
        .unwrap();
        assert_eq!(refused.rejected[0].msg_id, "m9");
        assert!(matches!(
            validate(&t, "edgeloop/v1/devices/d1/commands", &status_bytes("d1")),
            Err(Rejection::WrongDirection("commands"))
        ));
        assert!(matches!(
            validate(&t, "edgeloop/v1/devices/d1/status", b"\xff\xfe"),
            Err(Rejection::Decode(_))
        ));
        assert!(matches!(
            validate(&t, "elsewhere", &status_bytes("d1")),
            Err(Rejection::Topic(_))
        ));
    }

    #[test]
    fn a_batch_is_checked_envelope_by_envelope() {
        let t = Topics::default();
        let items = [status_bytes("d1"), status_bytes("d2"), b"{}".to_vec()];
        let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
        let bytes = batch::encode("d1", &refs, batch::Encoding::Zstd);
        let checked = validate(&t, "edgeloop/v1/devices/d1/status", &bytes).unwrap();
        assert_eq!(checked.accepted.len(), 1);
        assert_eq!(checked.rejected.len(), 1, "the other device's envelope");
        assert_eq!(checked.unidentified, 1);
        assert!(matches!(
            validate(&t, "edgeloop/v1/devices/d2/status", &bytes),
            Err(Rejection::DeviceMismatch { .. })
        ));
    }
}
