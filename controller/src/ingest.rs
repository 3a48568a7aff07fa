//! Telemetry ingest: the controller's MQTT connection and the actor that validates and
//! stores what devices send.
//!
//! The connection subscribes to every device channel with a persistent session (the broker
//! keeps QoS 1 messages while the controller is down) and manual acknowledgements: a
//! message is acknowledged only after its row is committed, so a controller crash causes
//! a redelivery, which the store drops by message id, never a loss.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use edgeloop_agent::link::{Backoff, BrokerAddr, no_delay};
use edgeloop_agent::now_ms;
use edgeloop_shared::batch::{self, ItemError, Payload};
use edgeloop_shared::protocol::{Envelope, Message, Receipt, RejectedMessage};
use edgeloop_shared::topics::{Channel, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, PubAck, PubRec, Publish, QoS, Request};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::registry::ArtifactStore;
use crate::store::{Ingested, Store, StoreError};

/// Most QoS 0 publishes waiting for the ingest actor; more are dropped. QoS 1 publishes
/// are never dropped here: the broker's in-flight window bounds how many it sends before
/// they are acknowledged, and so how many can wait.
const MAX_QOS0_BACKLOG: usize = 1024;
/// Every this many publishes waiting for the ingest actor, a warning: only the broker's
/// in-flight limit bounds them (MQTT 3.1.1 gives the receiver no say), and a broker
/// without one can send a whole persistent queue at once.
const BACKLOG_WARNING: usize = 10_000;
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
    /// Store transactions that committed publishes (group commits).
    pub commits: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub malformed: AtomicU64,
    pub store_errors: AtomicU64,
    pub unknown_device: AtomicU64,
    /// QoS 0 publishes dropped because ingest was behind.
    pub dropped_qos0: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IngestStatsSnapshot {
    pub received: u64,
    pub commits: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub store_errors: u64,
    pub unknown_device: u64,
    pub dropped_qos0: u64,
}

impl IngestStats {
    pub fn snapshot(&self) -> IngestStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IngestStatsSnapshot {
            received: get(&self.received),
            commits: get(&self.commits),
            stored: get(&self.stored),
            duplicates: get(&self.duplicates),
            malformed: get(&self.malformed),
            store_errors: get(&self.store_errors),
            unknown_device: get(&self.unknown_device),
            dropped_qos0: get(&self.dropped_qos0),
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
    #[error("sample chunk refused: {0}")]
    BadChunk(String),
}

/// A sample chunk whose data does not fit the file it declares.
fn bad_chunk(message: &Message) -> Option<String> {
    match message {
        Message::SampleChunk(c) if c.error.is_none() => c.bytes().err(),
        _ => None,
    }
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
        Ok(Payload::Single(envelope)) => vec![Ok(*envelope)],
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
            match Envelope::probe_msg_id(payload) {
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
            Ok(envelope) => match bad_chunk(&envelope.message) {
                Some(reason) => (Some(envelope.msg_id), Rejection::BadChunk(reason)),
                None => {
                    checked.accepted.push(envelope);
                    continue;
                }
            },
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

/// The controller's MQTT connection settings.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub broker: BrokerAddr,
    pub client_id: String,
    /// The login at the broker, if it asks for one.
    pub credentials: Option<(String, String)>,
    pub topics: Topics,
    /// Hear devices the registry does not know (registering them on first contact).
    pub accept_unknown_devices: bool,
    /// TLS for an `mqtts://` broker.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Subscribe as a member of this shared-subscription group (`$share/{group}/…`), so
    /// that replicas split the messages between them.
    pub shared_group: Option<String>,
    /// Where the bundles devices may ask for over MQTT are.
    pub artifacts: ArtifactStore,
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
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user, password);
    }
    if let Err(e) = config.broker.configure(&mut options, config.tls.as_ref()) {
        // The server builds the TLS configuration for every mqtts:// broker before this.
        error!(error = %e, "broker transport");
    }
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    // The broker sends no more than its in-flight window before the acknowledgements,
    // which leave after each commit: with Nagle's algorithm ingest idled between groups.
    no_delay(&mut eventloop);
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(AtomicUsize::new(0));
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
    let (raw_tx, raw_rx) = mpsc::unbounded_channel();
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    tokio::spawn(connection(
        eventloop,
        client.clone(),
        filters,
        Backlog {
            tx: raw_tx,
            waiting: backlog.clone(),
        },
        acks_rx,
        stats.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(decoder(config.topics.clone(), raw_rx, tx));
    tokio::spawn(
        Ingestor {
            store,
            stats,
            topics: config.topics,
            client: client.clone(),
            acks: acks_tx,
            artifacts: config.artifacts,
            serving: crate::transfer::Serving::default(),
            accept_unknown: config.accept_unknown_devices,
            known: std::collections::HashSet::new(),
        }
        .run(rx, backlog, shutdown),
    );
    client
}

/// A publish as it arrived, with the connection it arrived on (see [`Acks`]) and the
/// outcome of validating it.
type Received = (Session, Publish, Result<Checked, Rejection>);

/// The connections to the broker, counted from 1 as they are made.
type Session = u64;

/// Acknowledgements owed on one connection, in the order its publishes arrived (brokers
/// may insist: rumqttd does). Those of an earlier connection are never written: on a new
/// one the broker sends the unacknowledged publishes again, and their duplicates are
/// acknowledged then.
struct Acks {
    session: Session,
    requests: Vec<Request>,
}

/// The way from the connection task to the ingest actor, through the decoder. It never
/// makes the connection task wait: the actor's acknowledgements and receipts leave through
/// the event loop that task polls, so a connection task waiting for room while the actor
/// waits to acknowledge would deadlock (a broker with a large in-flight window showed it).
struct Backlog {
    tx: mpsc::UnboundedSender<(Session, Publish)>,
    /// Publishes sent and not yet taken by the actor.
    waiting: Arc<AtomicUsize>,
}

/// Validates publishes in the order they arrived, between the connection task and the
/// ingest actor: decoding the next messages overlaps with the actor committing the previous
/// ones, and the connection task, which writes the acknowledgements, never waits for a
/// decode (rumqttc hands out every packet it has read before it sends what is queued).
async fn decoder(
    topics: Topics,
    mut rx: mpsc::UnboundedReceiver<(Session, Publish)>,
    tx: mpsc::UnboundedSender<Received>,
) {
    while let Some((session, publish)) = rx.recv().await {
        let checked = validate(&topics, &publish.topic, &publish.payload);
        if tx.send((session, publish, checked)).is_err() {
            break;
        }
    }
}

/// The acknowledgement a publish is owed once it is committed: PUBACK at QoS 1 (PUBREC at
/// QoS 2, which no subscription here grants), none at QoS 0.
fn ack_for(publish: &Publish) -> Option<Request> {
    match publish.qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(Request::PubAck(PubAck::new(publish.pkid))),
        QoS::ExactlyOnce => Some(Request::PubRec(PubRec::new(publish.pkid))),
    }
}

/// Writes a committed group's acknowledgements to the connection in one write. rumqttc's
/// `AsyncClient::ack` flushes each on its own (a system call per message here and a read
/// per message at the broker), so the connection task, which owns the event loop, writes
/// them itself. With no connection they are dropped: the broker delivers the messages
/// again to the next session and the store drops them as duplicates.
async fn acknowledge(
    eventloop: &mut rumqttc::EventLoop,
    acks: Vec<Request>,
) -> Result<(), rumqttc::StateError> {
    let Some(network) = eventloop.network.as_mut() else {
        return Ok(());
    };
    for ack in acks {
        if let Some(packet) = eventloop.state.handle_outgoing_packet(ack)? {
            network.write(packet).await?;
        }
    }
    network.flush().await
}

/// Splits a group's acknowledgements by the connection each publish came on.
fn acks_by_session(group: &[(Session, Publish)]) -> Vec<Acks> {
    let mut acks: Vec<Acks> = Vec::new();
    for (session, publish) in group {
        let Some(request) = ack_for(publish) else {
            continue;
        };
        match acks.last_mut() {
            Some(last) if last.session == *session => last.requests.push(request),
            _ => acks.push(Acks {
                session: *session,
                requests: vec![request],
            }),
        }
    }
    acks
}

/// Reads the broker connection, and writes the acknowledgements of committed publishes.
async fn connection(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    ingest: Backlog,
    mut acks: mpsc::UnboundedReceiver<Acks>,
    stats: Arc<IngestStats>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let flush_timeout = Duration::from_secs(eventloop.network_options().connection_timeout());
    let mut session: Session = 0;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // Before reading more: the broker's in-flight window waits for these. Taking
            // this branch drops a `poll` in progress, which loses nothing: what it has read
            // waits in the event loop's state, what it has written in its write buffer,
            // and the acknowledgements' flush below sends that too.
            Some(owed) = acks.recv() => {
                if owed.session != session {
                    debug!(count = owed.requests.len(), "acknowledgements of an earlier connection dropped");
                    continue;
                }
                match tokio::time::timeout(flush_timeout, acknowledge(&mut eventloop, owed.requests)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot acknowledge messages; reconnecting");
                        eventloop.clean();
                    }
                    Err(_) => {
                        warn!("acknowledgements not written in time; reconnecting");
                        eventloop.clean();
                    }
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    session += 1;
                    info!(session_present = ack.session_present, "controller connected to broker");
                    backoff.reset();
                    for filter in &filters {
                        if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                            error!(%filter, error = %e, "cannot subscribe");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if publish.qos == QoS::AtMostOnce
                        && ingest.waiting.load(Ordering::Relaxed) >= MAX_QOS0_BACKLOG
                    {
                        let n = stats.dropped_qos0.fetch_add(1, Ordering::Relaxed) + 1;
                        warn!(topic = %publish.topic, dropped_qos0_total = n,
                            "dropped a QoS 0 message: ingest is behind (devices publish at QoS 1)");
                        continue;
                    }
                    let waiting = ingest.waiting.fetch_add(1, Ordering::Relaxed) + 1;
                    if waiting.is_multiple_of(BACKLOG_WARNING) {
                        warn!(waiting, "ingest is behind the broker: set a finite \
                            max_inflight_messages on the broker to bound what waits in memory");
                    }
                    if ingest.tx.send((session, publish)).is_err() {
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
    /// Acknowledgements of committed publishes, for the connection task to write.
    acks: mpsc::UnboundedSender<Acks>,
    artifacts: ArtifactStore,
    /// Bundle requests being answered.
    serving: crate::transfer::Serving,
    accept_unknown: bool,
    /// Devices found in the registry (a device is never removed while the controller runs).
    known: std::collections::HashSet<String>,
}

/// Most message ids in one receipt: about 40 KB, well under any packet limit.
const MAX_RECEIPT_IDS: usize = 1000;
/// Longest rejection reason sent back, in characters.
const MAX_REASON_CHARS: usize = 200;

/// Splits a receipt into parts of at most [`MAX_RECEIPT_IDS`] ids, with reasons shortened.
fn split_receipt(receipt: Receipt) -> Vec<Receipt> {
    let mut parts = Vec::new();
    let mut part = Receipt::default();
    let full = |p: &Receipt| p.stored.len() + p.rejected.len() >= MAX_RECEIPT_IDS;
    for id in receipt.stored {
        part.stored.push(id);
        if full(&part) {
            parts.push(std::mem::take(&mut part));
        }
    }
    for mut r in receipt.rejected {
        if let Some((cut, _)) = r.reason.char_indices().nth(MAX_REASON_CHARS) {
            r.reason.truncate(cut);
        }
        part.rejected.push(r);
        if full(&part) {
            parts.push(std::mem::take(&mut part));
        }
    }
    if !part.stored.is_empty() || !part.rejected.is_empty() {
        parts.push(part);
    }
    parts
}

/// Most publishes stored in one transaction (group commit). Whatever has arrived while the
/// previous group was being committed goes into the next one, up to this many.
const MAX_GROUP: usize = 128;

/// Shutdown came before the store could commit: nothing of the group is acknowledged.
struct Interrupted;

impl Ingestor {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Received>,
        backlog: Arc<AtomicUsize>,
        shutdown: CancellationToken,
    ) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        let mut validated = Vec::with_capacity(MAX_GROUP);
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => break,
                },
            };
            group.clear();
            let mut next = Some(first);
            while let Some((session, publish, checked)) = next.take() {
                group.push((session, publish));
                validated.push(checked);
                if group.len() < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            backlog.fetch_sub(group.len(), Ordering::Relaxed);
            self.stats
                .received
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            // No ack on interruption: the broker delivers the messages again to the next
            // session.
            let Ok(receipts) = self
                .handle_group(&group, validated.drain(..), &shutdown)
                .await
            else {
                break;
            };
            if acks_by_session(&group)
                .into_iter()
                .any(|owed| self.acks.send(owed).is_err())
            {
                break;
            }
            for (device_id, receipt) in receipts {
                self.send_receipt(&device_id, receipt).await;
            }
        }
    }

    /// Tells a device which of its messages are stored, so it can let go of them; in
    /// several receipts when one would be large.
    async fn send_receipt(&self, device_id: &str, receipt: Receipt) {
        let Ok(topic) = self.topics.device(device_id, Channel::Receipts) else {
            return;
        };
        for part in split_receipt(receipt) {
            let envelope = Envelope::new(
                device_id,
                uuid::Uuid::now_v7().to_string(),
                now_ms(),
                Message::Receipt(part),
            );
            // If it is lost, the device sends its messages again and gets a receipt for the
            // duplicates: a cost, not a loss.
            if let Err(e) = self
                .client
                .publish(&topic, QoS::AtLeastOnce, false, envelope.encode())
                .await
            {
                warn!(device = device_id, error = %e, "cannot send receipt");
            }
        }
    }

    /// Whether a device may be heard: always when unknown devices are accepted, otherwise
    /// when the registry has it. `None` when the registry cannot be read.
    async fn may_hear(&mut self, device_id: &str) -> Option<bool> {
        if self.accept_unknown || self.known.contains(device_id) {
            return Some(true);
        }
        match self.store.device_exists(device_id).await {
            Ok(true) => {
                self.known.insert(device_id.to_string());
                Some(true)
            }
            Ok(false) => Some(false),
            Err(e) => {
                error!(device = device_id, error = %e, "cannot read the device registry");
                None
            }
        }
    }

    /// Admits one validated publish; `None` when nothing of it is stored or answered (a
    /// topic that is not a device's, a payload without readable ids, an unknown device).
    async fn check(
        &mut self,
        publish: &Publish,
        validated: Result<Checked, Rejection>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Checked>, Interrupted> {
        let checked = match validated {
            Ok(c) => c,
            Err(reason) => {
                let n = self.stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(topic = %publish.topic, bytes = publish.payload.len(), %reason, malformed_total = n, "dropped malformed message");
                return Ok(None);
            }
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.may_hear(&checked.device_id).await {
                Some(true) => break,
                Some(false) => {
                    // No receipt: the device keeps its messages and delivers them once it
                    // is registered.
                    let n = self.stats.unknown_device.fetch_add(1, Ordering::Relaxed) + 1;
                    warn!(device = %checked.device_id, unknown_device_total = n,
                        "dropped a message from a device the registry does not know");
                    return Ok(None);
                }
                None => tokio::select! {
                    _ = shutdown.cancelled() => return Err(Interrupted),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                },
            }
        }
        let refused = checked.rejected.len() as u64 + checked.unidentified;
        if refused > 0 {
            let n = self.stats.malformed.fetch_add(refused, Ordering::Relaxed) + refused;
            for r in &checked.rejected {
                warn!(device = %checked.device_id, msg_id = %r.msg_id, reason = %r.reason, malformed_total = n, "dropped malformed message");
            }
            if checked.unidentified > 0 {
                warn!(device = %checked.device_id, count = checked.unidentified, malformed_total = n, "dropped malformed messages without a readable id");
            }
        }
        Ok(Some(checked))
    }

    /// Checks a group of publishes and stores all their envelopes in one transaction;
    /// returns the receipts to send, one per device.
    async fn handle_group(
        &mut self,
        group: &[(Session, Publish)],
        validated: impl Iterator<Item = Result<Checked, Rejection>>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<(String, Receipt)>, Interrupted> {
        let mut checked = Vec::with_capacity(group.len());
        for ((_, publish), validated) in group.iter().zip(validated) {
            if let Some(c) = self.check(publish, validated, shutdown).await? {
                checked.push(c);
            }
        }
        // The envelopes move into one list; each publish keeps the ids of its own.
        let mut envelopes = Vec::with_capacity(checked.len());
        let mut answers = Vec::with_capacity(checked.len());
        for c in checked {
            let ids: Vec<String> = c.accepted.iter().map(|m| m.msg_id.clone()).collect();
            envelopes.extend(c.accepted);
            answers.push((c.device_id, c.rejected, ids));
        }
        let envelopes: Arc<[Envelope]> = envelopes.into();
        let refused_by_store = match self.store_envelopes(&envelopes, shutdown).await? {
            Ok(()) => Vec::new(),
            // Something spoiled the group: store each envelope alone, so that only what the
            // store refuses is refused.
            Err(_) => {
                let mut refused = Vec::new();
                for m in envelopes.iter() {
                    if let Err(e) = self
                        .store_envelopes(&Arc::from([m.clone()]), shutdown)
                        .await?
                    {
                        refused.push((m.msg_id.clone(), e));
                    }
                }
                refused
            }
        };
        self.stats
            .malformed
            .fetch_add(refused_by_store.len() as u64, Ordering::Relaxed);
        // Requests for bundle pieces are answered once stored (a redelivered one again:
        // pieces cost bandwidth, not correctness).
        for envelope in envelopes.iter() {
            if let Message::BundleRequest(request) = &envelope.message
                && !refused_by_store
                    .iter()
                    .any(|(id, _)| *id == envelope.msg_id)
            {
                let Some(claim) = self.serving.claim(&envelope.device_id) else {
                    warn!(device = %envelope.device_id, "busy serving bundle pieces; a request is dropped (the device asks again)");
                    continue;
                };
                tokio::spawn(crate::transfer::serve(
                    self.artifacts.clone(),
                    self.client.clone(),
                    self.topics.clone(),
                    envelope.device_id.clone(),
                    request.clone(),
                    claim,
                ));
            }
        }
        let mut receipts: Vec<(String, Receipt)> = Vec::new();
        for (device_id, rejected, ids) in answers {
            let mut receipt = Receipt {
                stored: Vec::new(),
                rejected,
            };
            for msg_id in ids {
                match refused_by_store.iter().find(|(id, _)| *id == msg_id) {
                    Some((_, reason)) => receipt.rejected.push(RejectedMessage {
                        msg_id,
                        reason: reason.clone(),
                    }),
                    None => receipt.stored.push(msg_id),
                }
            }
            if receipt.stored.is_empty() && receipt.rejected.is_empty() {
                continue;
            }
            match receipts.iter_mut().find(|(d, _)| *d == device_id) {
                Some((_, r)) => {
                    r.stored.append(&mut receipt.stored);
                    r.rejected.append(&mut receipt.rejected);
                }
                None => receipts.push((device_id, receipt)),
            }
        }
        Ok(receipts)
    }

    /// Stores envelopes in one transaction, retrying while the store is unavailable.
    /// `Ok(Err(reason))` when the store refuses them for what they are.
    async fn store_envelopes(
        &self,
        envelopes: &Arc<[Envelope]>,
        shutdown: &CancellationToken,
    ) -> Result<Result<(), String>, Interrupted> {
        if envelopes.is_empty() {
            return Ok(Ok(()));
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.store.ingest_many(envelopes.clone(), now_ms()).await {
                Ok(results) => {
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                    let dups = results
                        .iter()
                        .filter(|r| **r == Ingested::Duplicate)
                        .count() as u64;
                    self.stats
                        .stored
                        .fetch_add(results.len() as u64 - dups, Ordering::Relaxed);
                    self.stats.duplicates.fetch_add(dups, Ordering::Relaxed);
                    if dups > 0 {
                        debug!(dups, "duplicates dropped");
                    }
                    return Ok(Ok(()));
                }
                Err(e @ StoreError::Corrupt(_)) => {
                    // Refused for what they are: retrying cannot help.
                    error!(error = %e, count = envelopes.len(), "messages refused by the store; dropped");
                    return Ok(Err(e.to_string()));
                }
                Err(e) => {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    error!(error = %e, "cannot store messages; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(Interrupted),
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
                ..DeviceStatus::default()
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
        // So is one in MessagePack, and a good one is taken.
        // {"v": 9, "msg_id": "m8"}
        let packed = b"\x82\xa1v\x09\xa6msg_id\xa2m8";
        let refused = validate(&t, "edgeloop/v1/devices/d1/status", packed).unwrap();
        assert_eq!(refused.rejected[0].msg_id, "m8");
        assert!(refused.rejected[0].reason.contains("version 9"));
        let status = Envelope::decode(&status_bytes("d1")).unwrap();
        let packed = status.encode_as(edgeloop_shared::protocol::Format::Msgpack);
        let ok = validate(&t, "edgeloop/v1/devices/d1/status", &packed).unwrap();
        assert_eq!(ok.accepted, [status]);
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
    fn large_receipts_are_split_and_reasons_shortened() {
        let receipt = Receipt {
            stored: (0..2500).map(|i| format!("s{i}")).collect(),
            rejected: vec![RejectedMessage {
                msg_id: "r".into(),
                reason: "é".repeat(500),
            }],
        };
        let parts = split_receipt(receipt);
        assert_eq!(parts.len(), 3);
        assert!(
            parts
                .iter()
                .all(|p| p.stored.len() + p.rejected.len() <= MAX_RECEIPT_IDS)
        );
        let ids: usize = parts.iter().map(|p| p.stored.len()).sum();
        assert_eq!(ids, 2500);
        assert_eq!(
            parts[2].rejected[0].reason.chars().count(),
            MAX_REASON_CHARS
        );
        assert!(split_receipt(Receipt::default()).is_empty());
        // The largest part fits the protocol's limit with room to spare.
        let bytes = Envelope::new("d", "m", 1, Message::Receipt(parts[0].clone())).encode();
        assert!(bytes.len() < edgeloop_shared::protocol::MAX_MESSAGE_BYTES / 4);
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

    #[test]
    fn a_groups_acknowledgements_keep_arrival_order_and_their_connection() {
        let publish = |qos, pkid| {
            let mut p = Publish::new("t", qos, Vec::new());
            p.pkid = pkid;
            p
        };
        let group = [
            (1, publish(QoS::AtLeastOnce, 7)),
            (1, publish(QoS::AtMostOnce, 0)),
            (1, publish(QoS::AtLeastOnce, 8)),
            (2, publish(QoS::AtLeastOnce, 7)),
            (2, publish(QoS::ExactlyOnce, 9)),
        ];
        let acks = acks_by_session(&group);
        let seen: Vec<(Session, Vec<Request>)> =
            acks.into_iter().map(|a| (a.session, a.requests)).collect();
        assert_eq!(
            seen,
            [
                (
                    1,
                    vec![
                        Request::PubAck(PubAck::new(7)),
                        Request::PubAck(PubAck::new(8))
                    ]
                ),
                (
                    2,
                    vec![
                        Request::PubAck(PubAck::new(7)),
                        Request::PubRec(PubRec::new(9))
                    ]
                ),
            ],
            "QoS 0 owes nothing; a new connection starts a new list"
        );
        assert!(acks_by_session(&[(3, publish(QoS::AtMostOnce, 0))]).is_empty());
    }
}
