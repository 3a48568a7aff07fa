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
use edgeloop_shared::protocol::Envelope;
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

/// Checks topic and envelope against each other and returns the decoded envelope.
pub fn validate(topics: &Topics, topic: &str, payload: &[u8]) -> Result<Envelope, Rejection> {
    let (device_id, channel) = topics.parse(topic)?;
    if !Channel::FROM_DEVICE.contains(&channel) {
        return Err(Rejection::WrongDirection(channel.as_str()));
    }
    let envelope = Envelope::decode(payload)?;
    if envelope.device_id != device_id {
        return Err(Rejection::DeviceMismatch {
            topic: device_id.to_string(),
            envelope: envelope.device_id,
        });
    }
    if envelope.message.kind() != channel.message_kind() {
        return Err(Rejection::WrongKind {
            channel: channel.as_str(),
            expected: channel.message_kind(),
            got: envelope.message.kind(),
        });
    }
    Ok(envelope)
}

/// The controller's MQTT connection settings.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub broker: BrokerAddr,
    pub client_id: String,
    pub topics: Topics,
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
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let (tx, rx) = mpsc::channel(INGEST_CAPACITY);
    tokio::spawn(connection(
        eventloop,
        client.clone(),
        config.topics.clone(),
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
    topics: Topics,
    ingest: mpsc::Sender<Publish>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let filters: Vec<String> = Channel::FROM_DEVICE
        .iter()
        .map(|c| topics.all_devices(*c))
        .collect();
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
            if !self.handle(&publish, &shutdown).await {
                // Shutting down before the row was committed: no ack, so the broker
                // delivers the message again to the next controller session.
                break;
            }
            if let Err(e) = self.client.ack(&publish).await {
                warn!(error = %e, "cannot acknowledge message");
            }
        }
    }

    /// Returns false only when shutdown interrupted a retry and the message was not stored.
    async fn handle(&self, publish: &Publish, shutdown: &CancellationToken) -> bool {
        let envelope = match validate(&self.topics, &publish.topic, &publish.payload) {
            Ok(e) => e,
            Err(reason) => {
                let n = self.stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(topic = %publish.topic, bytes = publish.payload.len(), %reason, malformed_total = n, "dropped malformed message");
                return true;
            }
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.store.ingest(&envelope, now_ms()).await {
                Ok(Ingested::Stored) => {
                    self.stats.stored.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Ok(Ingested::Duplicate) => {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    debug!(msg_id = %envelope.msg_id, "duplicate dropped");
                    return true;
                }
                Err(e @ StoreError::Corrupt(_)) => {
                    // The store refused this message for what it is: retrying cannot help.
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    error!(device = %envelope.device_id, msg_id = %envelope.msg_id, error = %e, "message refused by the store; dropped");
                    return true;
                }
                Err(e) => {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    error!(device = %envelope.device_id, msg_id = %envelope.msg_id, error = %e, "cannot store message; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
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
            }),
        )
        .encode()
    }

    #[test]
    fn validation_ties_topic_envelope_and_kind_together() {
        let t = Topics::default();
        assert!(validate(&t, "edgeloop/v1/devices/d1/status", &status_bytes("d1")).is_ok());
        assert!(matches!(
            validate(&t, "edgeloop/v1/devices/d2/status", &status_bytes("d1")),
            Err(Rejection::DeviceMismatch { .. })
        ));
        assert!(matches!(
            validate(&t, "edgeloop/v1/devices/d1/telemetry", &status_bytes("d1")),
            Err(Rejection::WrongKind { .. })
        ));
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
}
