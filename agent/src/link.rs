//! The MQTT link: delivers the outbox to the broker at QoS 1 and hands incoming publishes
//! (commands) to the agent.
//!
//! Delivery is at-least-once and driven by the outbox alone. After every (re)connection the
//! link sends the outbox from its oldest entry; an entry is removed only when its PUBACK
//! arrives. A message whose PUBACK was lost is therefore sent again, and the controller
//! drops the duplicate by message id. The MQTT session is clean: the outbox, not the
//! broker, holds what is pending, so nothing depends on the broker's session store.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, Publish, QoS,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::outbox::Outbox;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BrokerAddrError {
    #[error("`{0}` is not an mqtt://host:port URL")]
    Scheme(String),
    #[error("`{0}` has no valid port")]
    Port(String),
}

/// A broker address from an `mqtt://host[:port]` URL (port 1883 by default; an IPv6
/// address goes in brackets with its port: `mqtt://[::1]:1883`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    pub fn parse(url: &str) -> Result<Self, BrokerAddrError> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .ok_or_else(|| BrokerAddrError::Scheme(url.to_string()))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse()
                    .map_err(|_| BrokerAddrError::Port(url.to_string()))?,
            ),
            _ => (rest, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(BrokerAddrError::Scheme(url.to_string()));
        }
        Ok(BrokerAddr {
            host: host.to_string(),
            port,
        })
    }
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

/// What the link needs to know.
#[derive(Clone)]
pub struct LinkConfig {
    pub client_id: String,
    pub broker: BrokerAddr,
    pub keep_alive: Duration,
    /// Most outbox entries handed to MQTT and not yet acknowledged.
    pub max_inflight: u16,
    /// Topics to subscribe to (QoS 1) after every connection.
    pub subscriptions: Vec<String>,
    /// Published by the broker if the connection dies without a DISCONNECT.
    pub last_will: Option<LastWillFn>,
    /// Largest MQTT packet sent or received. An outbox entry that cannot fit is dropped
    /// with an error rather than retried forever.
    pub max_packet_bytes: usize,
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

/// Outbox entries in flight during one connection.
#[derive(Debug, Default)]
struct Inflight {
    /// Highest outbox id handed to the MQTT client in this connection.
    cursor: u64,
    /// Ids handed to the client whose packet id is not known yet, in send order.
    awaiting_pkid: VecDeque<u64>,
    /// Packet id → outbox id, for publishes waiting for their PUBACK.
    by_pkid: HashMap<u16, u64>,
}

impl Inflight {
    fn len(&self) -> usize {
        self.awaiting_pkid.len() + self.by_pkid.len()
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
        options
            .set_keep_alive(c.keep_alive)
            .set_clean_session(true)
            .set_inflight(c.max_inflight.max(1))
            .set_max_packet_size(c.max_packet_bytes, c.max_packet_bytes);
        if let Some(will) = &c.last_will {
            let (topic, payload) = will();
            options.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, false));
        }
        options
    }

    /// Starts connecting: the task polls until the connection fails, then ends.
    fn connect(&self) -> Connection {
        // The request channel holds at most one window of publishes plus subscriptions.
        let capacity = usize::from(self.config.max_inflight) + self.config.subscriptions.len() + 8;
        let (client, mut eventloop) = AsyncClient::new(self.options(), capacity);
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

    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut connection = self.connect();
        let mut flight = Inflight::default();
        let mut connected = false;
        loop {
            if connected {
                self.fill_window(&connection.client, &mut flight);
            }
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.outbox.queued(), if connected => continue,
                event = connection.events.recv() => event,
            };
            match event {
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    info!(client = %self.config.client_id, "connected to broker");
                    connected = true;
                    backoff.reset();
                    for topic in &self.config.subscriptions {
                        if let Err(e) = connection.client.try_subscribe(topic, QoS::AtLeastOnce) {
                            warn!(%topic, error = %e, "cannot subscribe");
                        }
                    }
                }
                Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    if let Some(id) = flight.awaiting_pkid.pop_front() {
                        flight.by_pkid.insert(pkid, id);
                    }
                }
                Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                    if let Some(id) = flight.by_pkid.remove(&ack.pkid)
                        && let Err(e) = self.outbox.acknowledge(id)
                    {
                        // The entry stays and is sent again later: a duplicate, not a loss.
                        warn!(error = %e, id, "cannot remove acknowledged outbox entry");
                    }
                }
                Some(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                    if self.incoming.send(publish).await.is_err() {
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
                    flight = Inflight::default();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    // Everything of the old connection (client, queued requests, events)
                    // goes with it; the outbox is sent again from its oldest entry.
                    connection = self.connect();
                }
                None => {
                    // The event-loop task ended without an error: it was aborted.
                    break;
                }
            }
        }
    }

    /// Hands outbox entries to the MQTT client until the in-flight window is full.
    fn fill_window(&self, client: &AsyncClient, flight: &mut Inflight) {
        let room = usize::from(self.config.max_inflight).saturating_sub(flight.len());
        if room == 0 {
            return;
        }
        let entries = match self.outbox.after(flight.cursor, room) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, "cannot read outbox");
                return;
            }
        };
        for entry in entries {
            // Topic, payload and MQTT headers must fit in one packet; an entry that cannot
            // would break every connection it is tried on.
            if entry.topic.len() + entry.payload.len() + 16 > self.config.max_packet_bytes {
                error!(id = entry.id, topic = %entry.topic, bytes = entry.payload.len(),
                    "outbox entry exceeds the MQTT packet limit; dropped");
                if let Err(e) = self.outbox.acknowledge(entry.id) {
                    warn!(error = %e, id = entry.id, "cannot remove oversize outbox entry");
                }
                flight.cursor = entry.id;
                continue;
            }
            if client
                .try_publish(&entry.topic, QoS::AtLeastOnce, false, entry.payload)
                .is_err()
            {
                // Channel full: the rest goes out when acknowledgements make room.
                return;
            }
            flight.cursor = entry.id;
            flight.awaiting_pkid.push_back(entry.id);
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
                port: 1883
            }
        );
        assert_eq!(BrokerAddr::parse("mqtt://broker.local").unwrap().port, 1883);
        assert_eq!(BrokerAddr::parse("mqtt://[::1]:1884").unwrap().host, "::1");
        assert!(BrokerAddr::parse("http://x:1").is_err());
        assert!(BrokerAddr::parse("mqtt://x:notaport").is_err());
        assert!(BrokerAddr::parse("mqtt://").is_err());
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
