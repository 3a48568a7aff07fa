//! The MQTT link: delivers the outbox to the broker at QoS 1 and hands incoming publishes
//! (commands) to the agent.
//!
//! Delivery is at-least-once, end to end, and driven by the outbox alone. After every
//! (re)connection the link sends the outbox from its oldest entry, packing consecutive
//! entries of one topic into batches (zstd-compressed, split to respect the payload limit).
//! The broker's PUBACK frees room in the in-flight window; an entry leaves the outbox only
//! when the controller's receipt names it, i.e. when it is committed to the controller's
//! store. An entry without a receipt is sent again after the receipt timeout or on the next
//! connection, and the controller drops the duplicate by message id. So neither a broker
//! that loses what it acknowledged (an embedded broker dying with its controller, a queue
//! limit) nor a lost PUBACK loses data. The MQTT session is persistent, so commands and
//! receipts published while the device is away wait for it at the broker; what the device
//! sends is held by its outbox, never by the broker's session.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, Publish, QoS,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use edgeloop_shared::batch::{self, Encoding, MAX_BATCH_BYTES};
use edgeloop_shared::protocol::{Envelope, Format, Message};

use crate::outbox::{Outbox, OutboxEntry};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BrokerAddrError {
    #[error("`{0}` is not an mqtt://host:port or mqtts://host:port URL")]
    Scheme(String),
    #[error("`{0}` has no valid port")]
    Port(String),
}

/// A broker address from an `mqtt://host[:port]` URL (port 1883 by default) or an
/// `mqtts://host[:port]` one (TLS, port 8883 by default). An IPv6 address goes in brackets
/// with its port: `mqtt://[::1]:1883`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddr {
    pub fn parse(url: &str) -> Result<Self, BrokerAddrError> {
        let (rest, tls) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (rest, true)
        } else {
            let rest = url
                .strip_prefix("mqtt://")
                .or_else(|| url.strip_prefix("tcp://"))
                .ok_or_else(|| BrokerAddrError::Scheme(url.to_string()))?;
            (rest, false)
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse()
                    .map_err(|_| BrokerAddrError::Port(url.to_string()))?,
            ),
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(BrokerAddrError::Scheme(url.to_string()));
        }
        Ok(BrokerAddr {
            host: host.to_string(),
            port,
            tls,
        })
    }

    /// Applies the transport to MQTT options: TLS with `tls` for an `mqtts://` address.
    pub fn configure(
        &self,
        options: &mut MqttOptions,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<(), TlsError> {
        if self.tls {
            let config = tls.ok_or(TlsError::NotConfigured)?;
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(config.clone()),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("a client certificate needs its key and a key its certificate: set both or neither")]
    Incomplete,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("an mqtts:// broker needs a TLS configuration")]
    NotConfigured,
}

/// Files for TLS to an `mqtts://` broker, in PEM. An empty path is unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificates the broker's certificate must chain to; unset: the system's roots.
    pub ca_file: PathBuf,
    /// The client certificate chain, for mutual TLS.
    pub cert_file: PathBuf,
    /// The client certificate's private key.
    pub key_file: PathBuf,
}

impl TlsFiles {
    /// A rustls client configuration (ring provider, TLS 1.2 and 1.3) from these files.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        let read_err = |path: &PathBuf, e: &dyn std::fmt::Display| TlsError::Read {
            path: path.clone(),
            reason: e.to_string(),
        };
        let certs = |path: &PathBuf| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| read_err(path, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| read_err(path, &e))?;
            if certs.is_empty() {
                return Err(TlsError::NoCertificate(path.clone()));
            }
            Ok(certs)
        };
        let mut roots = rustls::RootCertStore::empty();
        if set(&self.ca_file) {
            for cert in certs(&self.ca_file)? {
                roots.add(cert)?;
            }
        } else {
            // Unusable system certificates are skipped, as browsers do.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match (set(&self.cert_file), set(&self.key_file)) {
            (true, true) => {
                let key = PrivateKeyDer::from_pem_file(&self.key_file)
                    .map_err(|e| read_err(&self.key_file, &e))?;
                builder.with_client_auth_cert(certs(&self.cert_file)?, key)?
            }
            (false, false) => builder.with_no_client_auth(),
            _ => return Err(TlsError::Incomplete),
        };
        Ok(Arc::new(config))
    }
}

/// Turns Nagle's algorithm off on the connection `eventloop` makes. MQTT at QoS 1 is a
/// conversation of small packets: a sender's in-flight window fills and waits for PUBACKs,
/// and a receiver's PUBACK is a few bytes. With Nagle's algorithm such a write waits for
/// the peer's delayed TCP acknowledgement (40 ms on Linux) whenever earlier bytes are
/// unacknowledged, and the window idles meanwhile.
pub fn no_delay(eventloop: &mut rumqttc::EventLoop) {
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
}

/// Exponential backoff with full jitter, for reconnecting.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: uniform in [ceiling / 2, ceiling], the ceiling doubling per attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter: f64 = rand::random();
        ceiling.mul_f64(0.5 + jitter / 2.0)
    }
}

/// Builds the last-will message for a new connection: (topic, payload). Called once per
/// connection so that each will carries its own message id.
pub type LastWillFn = Arc<dyn Fn() -> (String, Vec<u8>) + Send + Sync>;
/// The login to present, if any: a user name and a password.
pub type CredentialsFn = Arc<dyn Fn() -> Option<(String, String)> + Send + Sync>;

/// The longest wait for a receipt before a message is sent again.
const MAX_RECEIPT_TIMEOUT: Duration = Duration::from_secs(600);

/// What the link needs to know.
#[derive(Clone)]
pub struct LinkConfig {
    pub client_id: String,
    /// The device whose receipts the link accepts.
    pub device_id: String,
    pub broker: BrokerAddr,
    pub keep_alive: Duration,
    /// Most publishes handed to MQTT and not yet acknowledged by the broker.
    pub max_inflight: u16,
    /// Topics to subscribe to (QoS 1) after every connection; what arrives on them goes to
    /// the agent.
    pub subscriptions: Vec<String>,
    /// Where the controller's receipts arrive; the link handles them itself.
    pub receipts_topic: String,
    /// Published by the broker if the connection dies without a DISCONNECT.
    pub last_will: Option<LastWillFn>,
    /// TLS for an `mqtts://` broker.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The broker login, asked again before every connection attempt (enrollment may
    /// deliver it while the link is already trying).
    pub credentials: Option<CredentialsFn>,
    /// Largest MQTT packet received.
    pub max_packet_bytes: usize,
    /// How long a sent message waits for its receipt before it is sent again. Doubles with
    /// every resend of that message (up to ten minutes), so a controller that is down or
    /// behind is not flooded with copies, while a message lost alone (a broker that dropped
    /// it) goes again after this base time whatever happened to the others.
    pub receipt_timeout: Duration,
    pub packing: Packing,
}

/// How outbox entries are packed into publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    /// Most envelopes per publish.
    pub max_messages: usize,
    /// Largest payload of a publish; batches are split to fit, and an entry that cannot
    /// fit alone is dropped (and counted) rather than retried forever.
    pub max_payload_bytes: usize,
    /// Compress batches with zstd.
    pub compress: bool,
}

/// One MQTT publish: its topic, its payload and the outbox entries it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub payload: Vec<u8>,
    pub ids: Vec<u64>,
}

impl Packing {
    /// Groups consecutive entries of one topic and one format (a batch holds one), at most
    /// `max_messages` each.
    pub fn groups<'e>(&self, entries: &'e [OutboxEntry]) -> Vec<&'e [OutboxEntry]> {
        let mut groups = Vec::new();
        let mut start = 0;
        for i in 1..=entries.len() {
            let boundary = i == entries.len()
                || entries[i].topic != entries[start].topic
                || Format::of(&entries[i].payload) != Format::of(&entries[start].payload)
                || i - start == self.max_messages;
            if boundary {
                groups.push(&entries[start..i]);
                start = i;
            }
        }
        groups
    }

    /// Encodes a group as one or more publications, halving it until each fits. Entries
    /// that cannot fit alone come back in the second list.
    pub fn encode(
        &self,
        device_id: &str,
        group: &[OutboxEntry],
    ) -> (Vec<Publication>, Vec<OutboxEntry>) {
        let mut out = (Vec::new(), Vec::new());
        self.encode_into(device_id, group, &mut out);
        out
    }

    fn encode_into(
        &self,
        device_id: &str,
        group: &[OutboxEntry],
        out: &mut (Vec<Publication>, Vec<OutboxEntry>),
    ) {
        let Some(first) = group.first() else { return };
        let raw: usize = group.iter().map(|e| e.payload.len() + 1).sum();
        let fits_batch = raw + 2 <= MAX_BATCH_BYTES;
        let payload = if !fits_batch {
            None
        } else if group.len() == 1 && !self.compress {
            Some(first.payload.clone())
        } else if group.len() == 1 {
            // Compressed unless that makes it larger (a small or incompressible envelope).
            let zstd = batch::encode(device_id, &[first.payload.as_slice()], Encoding::Zstd);
            Some(if zstd.len() < first.payload.len() {
                zstd
            } else {
                first.payload.clone()
            })
        } else {
            let items: Vec<&[u8]> = group.iter().map(|e| e.payload.as_slice()).collect();
            let encoding = if self.compress {
                Encoding::Zstd
            } else {
                Encoding::Identity
            };
            Some(batch::encode(device_id, &items, encoding))
        };
        match payload {
            Some(payload) if payload.len() <= self.max_payload_bytes => out.0.push(Publication {
                topic: first.topic.clone(),
                payload,
                ids: group.iter().map(|e| e.id).collect(),
            }),
            _ if group.len() == 1 => out.1.push(first.clone()),
            _ => {
                let (a, b) = group.split_at(group.len() / 2);
                self.encode_into(device_id, a, out);
                self.encode_into(device_id, b, out);
            }
        }
    }
}

/// The link actor. See the module documentation.
pub struct Link {
    config: LinkConfig,
    outbox: Outbox,
    incoming: mpsc::Sender<Publish>,
}

/// Capacity of the channel from a connection's event-loop task to the link.
const EVENT_CAPACITY: usize = 64;

/// One MQTT connection: a fresh client and event loop, polled in a task of its own.
///
/// A new connection gets a new client, so no request queued for a dead connection and no
/// event it buffered can reach the next one; and `EventLoop::poll` is never cancelled
/// half-way through writing a packet, because nothing else is selected against it.
struct Connection {
    client: AsyncClient,
    events: mpsc::Receiver<Result<Event, ConnectionError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Outbox entries sent during one connection.
#[derive(Debug, Default)]
struct Inflight {
    /// Every entry at or below this outbox id was sent in this connection, or skipped
    /// because it had been.
    cursor: u64,
    /// Publishes handed to the client whose packet id is not known yet, in send order.
    awaiting_pkid: VecDeque<Vec<u64>>,
    /// Packet id → outbox ids, for publishes waiting for their PUBACK.
    by_pkid: HashMap<u16, Vec<u64>>,
    /// Entries sent in this connection and not yet confirmed by a receipt.
    sent: HashMap<u64, Sent>,
    /// How many times entries taken back for a resend were sent in this connection.
    resent: HashMap<u64, u32>,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    times: u32,
}

impl Sent {
    /// Whether its receipt is overdue at `now`: after the base timeout, doubled for every
    /// earlier send.
    fn overdue(&self, base: Duration, now: Instant) -> bool {
        let wait = base
            .saturating_mul(1 << (self.times.saturating_sub(1)).min(16))
            .min(MAX_RECEIPT_TIMEOUT);
        now.saturating_duration_since(self.at) >= wait
    }
}

impl Inflight {
    /// Publishes awaiting their PUBACK.
    fn publishes(&self) -> usize {
        self.awaiting_pkid.len() + self.by_pkid.len()
    }

    fn awaiting_puback(&self, id: u64) -> bool {
        self.by_pkid
            .values()
            .chain(&self.awaiting_pkid)
            .any(|ids| ids.contains(&id))
    }
}

impl Link {
    pub fn new(config: LinkConfig, outbox: Outbox, incoming: mpsc::Sender<Publish>) -> Self {
        Link {
            config,
            outbox,
            incoming,
        }
    }

    fn options(&self) -> MqttOptions {
        let c = &self.config;
        let mut options = MqttOptions::new(&c.client_id, &c.broker.host, c.broker.port);
        // The outgoing limit leaves room for the topic and MQTT headers around a payload.
        let outgoing = c.packing.max_payload_bytes + 1024;
        options
            .set_keep_alive(c.keep_alive)
            .set_clean_session(false)
            .set_inflight(c.max_inflight.max(1))
            .set_max_packet_size(c.max_packet_bytes, outgoing);
        if let Some((user, password)) = c.credentials.as_ref().and_then(|f| f()) {
            options.set_credentials(user, password);
        }
        if let Some(will) = &c.last_will {
            let (topic, payload) = will();
            options.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, false));
        }
        // The agent checked at start that an mqtts:// broker has a TLS configuration.
        let _ = c.broker.configure(&mut options, c.tls.as_ref());
        options
    }

    /// Starts connecting: the task polls until the connection fails, then ends.
    fn connect(&self) -> Connection {
        // The request channel holds at most one window of publishes plus subscriptions.
        let capacity = usize::from(self.config.max_inflight) + self.config.subscriptions.len() + 8;
        let (client, mut eventloop) = AsyncClient::new(self.options(), capacity);
        no_delay(&mut eventloop);
        let (tx, events) = mpsc::channel(EVENT_CAPACITY);
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if tx.send(event).await.is_err() || failed {
                    break;
                }
            }
        });
        Connection {
            client,
            events,
            task,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut connection = self.connect();
        let mut flight = Inflight::default();
        let mut connected = false;
        let mut resend = tokio::time::interval(
            (self.config.receipt_timeout / 4).max(Duration::from_millis(250)),
        );
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if connected {
                self.fill_window(&connection.client, &mut flight);
            }
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.outbox.queued(), if connected => continue,
                _ = resend.tick(), if connected => {
                    self.rewind_unconfirmed(&mut flight);
                    continue;
                }
                event = connection.events.recv() => event,
            };
            match event {
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    info!(client = %self.config.client_id, "connected to broker");
                    connected = true;
                    backoff.reset();
                    // Receipts first: the broker handles the subscription before the
                    // publishes that follow it on this connection.
                    let topics = std::iter::once(&self.config.receipts_topic)
                        .chain(&self.config.subscriptions);
                    for topic in topics {
                        if let Err(e) = connection.client.try_subscribe(topic, QoS::AtLeastOnce) {
                            warn!(%topic, error = %e, "cannot subscribe");
                        }
                    }
                }
                Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    if let Some(ids) = flight.awaiting_pkid.pop_front() {
                        flight.by_pkid.insert(pkid, ids);
                    }
                }
                Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                    // The broker has it; the entries stay until the controller's receipt.
                    flight.by_pkid.remove(&ack.pkid);
                }
                Some(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                    if publish.topic == self.config.receipts_topic {
                        self.on_receipt(&publish.payload, &mut flight);
                    } else if !self.config.subscriptions.contains(&publish.topic) {
                        // A persistent session keeps the subscriptions of an earlier
                        // configuration (another topic root, another device id): what
                        // arrives on them is not for this device.
                        info!(topic = %publish.topic, "unsubscribing from a topic of an earlier session");
                        if let Err(e) = connection.client.try_unsubscribe(publish.topic.clone()) {
                            debug!(error = %e, "cannot unsubscribe");
                        }
                    } else if self.incoming.send(publish).await.is_err() {
                        debug!("agent stopped listening; link stops");
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if connected {
                        warn!(client = %self.config.client_id, error = %e, "broker connection lost");
                    } else {
                        debug!(client = %self.config.client_id, error = %e, "cannot connect to broker");
                    }
                    connected = false;
                    // Everything unconfirmed is sent again on the next connection.
                    flight = Inflight::default();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    // Everything of the old connection (client, queued requests, events)
                    // goes with it.
                    connection = self.connect();
                }
                None => {
                    // The event-loop task ended without an error: it was aborted.
                    break;
                }
            }
        }
    }

    /// Removes what a receipt confirms from the outbox.
    fn on_receipt(&mut self, payload: &[u8], flight: &mut Inflight) {
        let receipt = match Envelope::decode(payload) {
            Ok(Envelope {
                device_id,
                message: Message::Receipt(receipt),
                ..
            }) if device_id == self.config.device_id => receipt,
            Ok(other) => {
                warn!(kind = other.message.kind(), device = %other.device_id, "ignored a message on the receipts topic");
                return;
            }
            Err(e) => {
                warn!(error = %e, "ignored a malformed receipt");
                return;
            }
        };
        for rejected in &receipt.rejected {
            error!(msg_id = %rejected.msg_id, reason = %rejected.reason,
                "the controller refused a message for good; it is dropped");
        }
        let ids: Vec<&str> = receipt
            .stored
            .iter()
            .map(String::as_str)
            .chain(receipt.rejected.iter().map(|r| r.msg_id.as_str()))
            .collect();
        match self.outbox.confirm(&ids) {
            Ok(removed) => {
                for id in removed {
                    flight.sent.remove(&id);
                    flight.resent.remove(&id);
                }
            }
            // The entries stay and are sent again later: a duplicate, not a loss.
            Err(e) => warn!(error = %e, "cannot remove confirmed outbox entries"),
        }
    }

    /// Makes entries whose receipt is overdue due again.
    fn rewind_unconfirmed(&mut self, flight: &mut Inflight) {
        let (base, now) = (self.config.receipt_timeout, Instant::now());
        let overdue: Vec<u64> = flight
            .sent
            .iter()
            .filter(|(id, sent)| sent.overdue(base, now) && !flight.awaiting_puback(**id))
            .map(|(id, _)| *id)
            .collect();
        let Some(&first) = overdue.iter().min() else {
            return;
        };
        debug!(count = overdue.len(), "no receipt; sending again");
        for id in &overdue {
            if let Some(sent) = flight.sent.remove(id) {
                flight.resent.insert(*id, sent.times);
            }
        }
        flight.cursor = flight.cursor.min(first - 1);
    }

    /// Hands outbox entries to the MQTT client until the in-flight window is full.
    fn fill_window(&self, client: &AsyncClient, flight: &mut Inflight) {
        let packing = self.config.packing;
        loop {
            let room = usize::from(self.config.max_inflight).saturating_sub(flight.publishes());
            if room == 0 {
                return;
            }
            let limit = (room * packing.max_messages).min(4096);
            let entries = match self.outbox.after(flight.cursor, limit) {
                Ok(entries) => entries,
                Err(e) => {
                    warn!(error = %e, "cannot read outbox");
                    return;
                }
            };
            let Some(last) = entries.last().map(|e| e.id) else {
                return;
            };
            // Entries taken back for a resend and gone from the outbox since (dropped for
            // room) are forgotten, so the count of resends stays bounded by the outbox.
            if !flight.resent.is_empty() {
                let cursor = flight.cursor;
                let present: std::collections::HashSet<u64> =
                    entries.iter().map(|e| e.id).collect();
                flight
                    .resent
                    .retain(|id, _| *id <= cursor || *id > last || present.contains(id));
            }
            let due: Vec<OutboxEntry> = entries
                .into_iter()
                .filter(|e| !flight.sent.contains_key(&e.id))
                .collect();
            for group in packing.groups(&due) {
                let (publications, too_big) = packing.encode(&self.config.device_id, group);
                if !too_big.is_empty() {
                    for entry in &too_big {
                        error!(id = entry.id, topic = %entry.topic, bytes = entry.payload.len(),
                            limit = packing.max_payload_bytes,
                            "outbox entry exceeds the payload limit; dropped");
                    }
                    let discard: Vec<_> = too_big.iter().map(|e| (e.id, e.priority)).collect();
                    if let Err(e) = self.outbox.discard(&discard) {
                        warn!(error = %e, "cannot remove oversize outbox entries");
                    }
                }
                for publication in publications {
                    let first = publication.ids[0];
                    if flight.publishes() >= usize::from(self.config.max_inflight)
                        || client
                            .try_publish(
                                &publication.topic,
                                QoS::AtLeastOnce,
                                false,
                                publication.payload,
                            )
                            .is_err()
                    {
                        // Window or channel full: the rest goes out when PUBACKs make room.
                        flight.cursor = first - 1;
                        return;
                    }
                    let now = Instant::now();
                    for id in &publication.ids {
                        let times = flight.resent.remove(id).unwrap_or(0) + 1;
                        flight.sent.insert(*id, Sent { at: now, times });
                    }
                    flight.awaiting_pkid.push_back(publication.ids);
                }
            }
            flight.cursor = last;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        assert_eq!(
            BrokerAddr::parse("mqtt://127.0.0.1:1883").unwrap(),
            BrokerAddr {
                host: "127.0.0.1".into(),
                port: 1883,
                tls: false,
            }
        );
        assert_eq!(BrokerAddr::parse("mqtt://broker.local").unwrap().port, 1883);
        let tls = BrokerAddr::parse("mqtts://broker.local").unwrap();
        assert_eq!((tls.port, tls.tls), (8883, true));
        assert_eq!(BrokerAddr::parse("mqtt://[::1]:1884").unwrap().host, "::1");
        assert!(BrokerAddr::parse("http://x:1").is_err());
        assert!(BrokerAddr::parse("mqtt://x:notaport").is_err());
        assert!(BrokerAddr::parse("mqtt://").is_err());
    }

    fn entry(id: u64, topic: &str, bytes: usize) -> OutboxEntry {
        let envelope = format!(
            r#"{{"v":1,"device_id":"d","msg_id":"m{id}","ts_ms":1,"kind":"status","payload":"{}"}}"#,
            "x".repeat(bytes)
        );
        OutboxEntry {
            id,
            topic: topic.into(),
            msg_id: format!("m{id}"),
            priority: crate::outbox::Priority::Telemetry,
            payload: envelope.into_bytes(),
        }
    }

    #[test]
    fn entries_are_grouped_by_topic_and_count() {
        let packing = Packing {
            max_messages: 2,
            max_payload_bytes: 4096,
            compress: true,
        };
        let entries = [
            entry(1, "a", 10),
            entry(2, "a", 10),
            entry(3, "a", 10),
            entry(4, "b", 10),
            entry(5, "a", 10),
        ];
        let sizes: Vec<Vec<u64>> = packing
            .groups(&entries)
            .iter()
            .map(|g| g.iter().map(|e| e.id).collect())
            .collect();
        assert_eq!(sizes, [vec![1, 2], vec![3], vec![4], vec![5]]);
    }

    #[test]
    fn messages_of_two_formats_travel_in_separate_batches() {
        let packing = Packing {
            max_messages: 64,
            max_payload_bytes: 65536,
            compress: true,
        };
        let packed = |id: u64| {
            let status = Message::Status(edgeloop_shared::protocol::DeviceStatus::default());
            OutboxEntry {
                payload: Envelope::new("d", format!("m{id}"), 1, status).encode_as(Format::Msgpack),
                ..entry(id, "t", 0)
            }
        };
        // An outbox written before and after the format was changed.
        let entries = [entry(1, "t", 10), packed(2), packed(3), entry(4, "t", 10)];
        let groups: Vec<Vec<u64>> = packing
            .groups(&entries)
            .iter()
            .map(|g| g.iter().map(|e| e.id).collect())
            .collect();
        assert_eq!(groups, [vec![1], vec![2, 3], vec![4]]);
        let (publications, _) = packing.encode("d", &entries[1..3]);
        let batch::Payload::Batch { items, .. } = batch::decode(&publications[0].payload).unwrap()
        else {
            panic!("a batch")
        };
        let ids: Vec<String> = items.into_iter().map(|i| i.unwrap().msg_id).collect();
        assert_eq!(ids, ["m2", "m3"]);
    }

    #[test]
    fn batches_split_to_fit_and_what_cannot_fit_alone_is_set_aside() {
        let packing = Packing {
            max_messages: 64,
            max_payload_bytes: 2000,
            compress: false,
        };
        let entries: Vec<OutboxEntry> = (1..=8).map(|i| entry(i, "t", 400)).collect();
        let (publications, too_big) = packing.encode("d", &entries);
        assert!(too_big.is_empty());
        assert!(publications.len() >= 2);
        let ids: Vec<u64> = publications.iter().flat_map(|p| p.ids.clone()).collect();
        assert_eq!(
            ids,
            (1..=8).collect::<Vec<_>>(),
            "order and completeness kept"
        );
        for p in &publications {
            assert!(p.payload.len() <= 2000);
            let batch::Payload::Batch { items, .. } = batch::decode(&p.payload).unwrap() else {
                panic!("a batch")
            };
            assert_eq!(items.len(), p.ids.len());
        }
        let (publications, too_big) = packing.encode("d", &[entry(9, "t", 3000)]);
        assert!(publications.is_empty());
        assert_eq!(too_big[0].id, 9);
        // A single entry without compression travels as a plain envelope.
        let (publications, _) = packing.encode("d", &[entry(10, "t", 10)]);
        assert_eq!(publications[0].payload, entry(10, "t", 10).payload);
    }

    #[test]
    fn compression_lets_a_large_batch_fit_one_publish() {
        let packing = Packing {
            max_messages: 64,
            max_payload_bytes: 2000,
            compress: true,
        };
        let entries: Vec<OutboxEntry> = (1..=8).map(|i| entry(i, "t", 400)).collect();
        let (publications, _) = packing.encode("d", &entries);
        assert_eq!(publications.len(), 1);
    }

    #[test]
    fn each_message_backs_off_on_its_own() {
        let base = Duration::from_secs(10);
        let at = Instant::now();
        let overdue = |after_s: u64, times: u32| {
            Sent { at, times }.overdue(base, at + Duration::from_secs(after_s))
        };
        assert!(!overdue(9, 1) && overdue(10, 1));
        assert!(!overdue(19, 2) && overdue(20, 2));
        assert!(!overdue(39, 3) && overdue(40, 3));
        assert!(!overdue(599, 40) && overdue(600, 40), "ten minutes at most");
    }

    #[test]
    fn backoff_grows_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        assert!(b.next_delay() >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
