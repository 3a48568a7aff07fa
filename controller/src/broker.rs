//! The embedded MQTT broker (rumqttd), for single-box use: `edgeloop serve` and
//! `edgeloop demo` start it unless an external broker is configured.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeloop_shared::protocol::MAX_MESSAGE_BYTES;
use edgeloop_shared::topics::Topics;

use crate::store::Store;

mod door;

/// Who may connect to the embedded broker when it checks credentials: the controller
/// itself, by the login it made at start, and every device with an approved enrollment,
/// as its own id and with the broker password it was issued (`Store::broker_login`).
/// Devices then come in through the broker's front door ([`door`]), which holds each to
/// its own topics under `topics`.
#[derive(Clone)]
pub struct BrokerAuth {
    pub store: Arc<dyn Store>,
    pub controller_user: String,
    pub controller_password: String,
    pub topics: Topics,
    /// What the front door puts before every password it forwards: a login without it
    /// did not come through the door.
    door_secret: String,
}

/// Random bytes as hex.
fn random_hex(bytes: usize) -> Result<String, BrokerError> {
    let mut secret = vec![0u8; bytes];
    getrandom::fill(&mut secret).map_err(|e| BrokerError::Config(format!("no entropy: {e}")))?;
    Ok(hex::encode(secret))
}

impl BrokerAuth {
    /// A fresh random login for the controller's own connection.
    pub fn new(
        store: Arc<dyn Store>,
        controller_user: &str,
        topics: Topics,
    ) -> Result<Self, BrokerError> {
        Ok(BrokerAuth {
            store,
            controller_user: controller_user.to_string(),
            controller_password: random_hex(24)?,
            topics,
            door_secret: random_hex(24)?,
        })
    }

    /// The login the controller's own connection presents at rumqttd's own listener
    /// ([`EmbeddedBroker::controller_url`]), as if it had come through the door.
    pub fn controller_login(&self) -> (String, String) {
        (
            self.controller_user.clone(),
            format!("{}{}", self.door_secret, self.controller_password),
        )
    }

    async fn allows(&self, client_id: String, user: String, password: String) -> bool {
        let through_door = password
            .get(..self.door_secret.len())
            .is_some_and(|prefix| crate::store::same_secret(prefix, &self.door_secret));
        if !through_door {
            tracing::warn!(client = %client_id, "broker login refused: it did not come through the broker's front door");
            return false;
        }
        let password = &password[self.door_secret.len()..];
        if user == self.controller_user {
            return crate::store::same_secret(password, &self.controller_password);
        }
        // A device logs in as itself: its credentials are no use under another client id.
        if user != client_id {
            tracing::warn!(client = %client_id, %user, "broker login refused: the user is not the client id");
            return false;
        }
        let hash = edgeloop_shared::sha256_hex(password.as_bytes());
        match self.store.broker_login(&user, &hash).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(client = %client_id, "broker login refused: no approved enrollment with that password");
                false
            }
            Err(e) => {
                tracing::error!(client = %client_id, error = %e, "broker login refused: the store failed");
                false
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source} (is another MQTT broker running there?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded broker configuration: {0}")]
    Config(String),
    #[error("embedded broker did not accept connections on {0} within 10 s")]
    NotReady(SocketAddr),
}

/// A running embedded broker. It lives until the process ends.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// rumqttd's own listener: `addr` itself, or with logins the loopback port behind the
    /// front door, where the controller's own connection goes.
    inner: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `listen` (port 0 picks a free port) and waits until it accepts
    /// connections. With `auth`, rumqttd listens on a loopback port instead and `listen`
    /// is its front door's ([`door`]).
    pub fn start(listen: SocketAddr, auth: Option<BrokerAuth>) -> Result<Self, BrokerError> {
        let bind = |at: SocketAddr| {
            let bound = |source| BrokerError::Bind { addr: at, source };
            let listener = TcpListener::bind(at).map_err(bound)?;
            let addr = listener.local_addr().map_err(bound)?;
            Ok::<_, BrokerError>((listener, addr))
        };
        // Bind first so that a busy port is a clear error here, not a log line in a thread.
        let (public, addr) = bind(listen)?;
        let inner = match &auth {
            None => {
                drop(public);
                addr
            }
            Some(auth) => {
                let (probe, inner) = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
                drop(probe);
                let door = Arc::new(door::Door {
                    topics: auth.topics.clone(),
                    controller_user: auth.controller_user.clone(),
                    secret: auth.door_secret.clone(),
                    broker: inner,
                    max_packet: MAX_PAYLOAD,
                });
                public
                    .set_nonblocking(true)
                    .map_err(|e| BrokerError::Config(e.to_string()))?;
                std::thread::Builder::new()
                    .name("broker-door".into())
                    .spawn(move || {
                        match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(runtime) => runtime.block_on(door.serve(public)),
                            Err(e) => tracing::error!(error = %e, "broker front door runtime"),
                        }
                    })
                    .map_err(|e| BrokerError::Config(e.to_string()))?;
                inner
            }
        };

        let mut config = rumqttd_config(inner)?;
        // The readiness probe comes in as clients do, through the door when there is one.
        let login = auth
            .as_ref()
            .map(|a| (a.controller_user.clone(), a.controller_password.clone()));
        if let Some(auth) = auth {
            for server in config.v4.iter_mut().flat_map(|v4| v4.values_mut()) {
                let auth = auth.clone();
                server.set_auth_handler(move |client_id, user, password| {
                    let auth = auth.clone();
                    async move { auth.allows(client_id, user, password).await }
                });
            }
        }
        std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(|e| BrokerError::Config(e.to_string()))?;

        let deadline = Instant::now() + Duration::from_secs(10);
        let connect_to = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        while !answers_mqtt(connect_to, login.as_ref()) {
            if Instant::now() > deadline {
                return Err(BrokerError::NotReady(addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(%addr, "embedded MQTT broker listening");
        Ok(EmbeddedBroker { addr, inner })
    }

    /// The URL clients use to reach this broker.
    pub fn url(&self) -> String {
        format!(
            "mqtt://{}:{}",
            crate::reachable_host(self.addr),
            self.addr.port()
        )
    }

    /// The URL of the controller's own connection: rumqttd's own listener, with
    /// [`BrokerAuth::controller_login`] (its traffic needs no checking by the door).
    pub fn controller_url(&self) -> String {
        if self.inner == self.addr {
            self.url()
        } else {
            format!("mqtt://127.0.0.1:{}", self.inner.port())
        }
    }
}

/// True when an MQTT 3.1.1 CONNECT at `addr` is answered with an accepting CONNACK. A full
/// handshake (rather than a bare TCP connect) keeps the broker from logging the probe as
/// an aborted connection.
fn answers_mqtt(addr: SocketAddr, login: Option<&(String, String)>) -> bool {
    let handshake = || -> std::io::Result<bool> {
        let (mut stream, accepted) =
            mqtt_connect(addr, "probe-0", login, Duration::from_millis(500))?;
        stream.write_all(&[0xE0, 0])?; // DISCONNECT
        Ok(accepted)
    };
    handshake().unwrap_or(false)
}

/// Connects to `addr` and sends an MQTT 3.1.1 CONNECT, waiting at most `wait` for each
/// step; returns the connection and whether its CONNACK accepted it.
fn mqtt_connect(
    addr: SocketAddr,
    client_id: &str,
    login: Option<&(String, String)>,
    wait: Duration,
) -> std::io::Result<(TcpStream, bool)> {
    let mut stream = TcpStream::connect_timeout(&addr, wait)?;
    stream.set_read_timeout(Some(wait))?;
    stream.write_all(&connect_packet(client_id, login))?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    Ok((stream, connack == [0x20, 2, 0, 0]))
}

/// An MQTT 3.1.1 CONNECT with a clean session and a keep-alive of 10 s.
fn connect_packet(client_id: &str, login: Option<&(String, String)>) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(if login.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&[0, 10]);
    string(&mut body, client_id);
    if let Some((user, password)) = login {
        string(&mut body, user);
        string(&mut body, password);
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        packet.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

/// Largest MQTT packet body the broker reads: room for the largest envelope plus topic and
/// MQTT headers.
const MAX_PAYLOAD: usize = MAX_MESSAGE_BYTES + 4096;

fn rumqttd_config(addr: SocketAddr) -> Result<rumqttd::Config, BrokerError> {
    let max_payload = MAX_PAYLOAD;
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "{addr}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload}
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    toml::from_str(&text).map_err(|e| BrokerError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_starts_on_a_free_port_and_a_busy_port_is_a_clear_error() {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        assert_ne!(broker.addr.port(), 0);
        assert!(answers_mqtt(broker.addr, None));
        let err = EmbeddedBroker::start(broker.addr, None).unwrap_err();
        assert!(matches!(err, BrokerError::Bind { .. }), "{err}");
    }

    async fn approve(store: &Arc<dyn Store>, device: &str, password: &str) {
        crate::store::approve_device(store.as_ref(), device, password)
            .await
            .unwrap();
    }

    /// A store, broker logins against it, and the embedded broker checking them.
    async fn broker_with_auth(
        dir: &std::path::Path,
    ) -> (Arc<dyn Store>, BrokerAuth, EmbeddedBroker) {
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SqliteStore::open(&dir.join("s.sqlite")).unwrap());
        let auth = BrokerAuth::new(store.clone(), "ctl", Topics::default()).unwrap();
        let broker = tokio::task::spawn_blocking({
            let auth = auth.clone();
            move || EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), Some(auth))
        })
        .await
        .unwrap()
        .unwrap();
        (store, auth, broker)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_auth_the_broker_admits_the_controller_and_approved_devices_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, auth, broker) = broker_with_auth(dir.path()).await;
        let login = (
            auth.controller_user.clone(),
            auth.controller_password.clone(),
        );
        let probe = |client: &'static str, login: Option<(String, String)>| {
            let addr = broker.addr;
            tokio::task::spawn_blocking(move || {
                mqtt_connect(addr, client, login.as_ref(), Duration::from_secs(2))
                    .is_ok_and(|(_, accepted)| accepted)
            })
        };
        assert!(probe("ctl", Some(login.clone())).await.unwrap());
        assert!(!probe("ctl", None).await.unwrap(), "no login");
        assert!(
            !probe("ctl", Some(("ctl".into(), "guess".into())))
                .await
                .unwrap(),
            "a wrong password"
        );

        let password = "p4ssw0rd".to_string();
        approve(&store, "dev-1", &password).await;
        let device = |user: &str| Some((user.to_string(), password.clone()));
        assert!(probe("dev-1", device("dev-1")).await.unwrap());
        assert!(
            !probe("dev-2", device("dev-1")).await.unwrap(),
            "its login under another client id"
        );
        assert!(
            !probe("dev-1", Some(("dev-1".into(), "other".into())))
                .await
                .unwrap(),
            "a wrong password"
        );
    }

    /// An MQTT client of the embedded broker, its event loop polled by the test.
    struct Peer {
        id: String,
        client: rumqttc::AsyncClient,
        events: rumqttc::EventLoop,
    }

    impl Peer {
        fn new(url: &str, id: &str, login: (String, String), will: Option<&str>) -> Peer {
            let addr = edgeloop_agent::link::BrokerAddr::parse(url).unwrap();
            let mut options = rumqttc::MqttOptions::new(id, addr.host, addr.port);
            options.set_credentials(login.0, login.1);
            if let Some(topic) = will {
                options.set_last_will(rumqttc::LastWill::new(
                    topic,
                    "gone",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                ));
            }
            let (client, events) = rumqttc::AsyncClient::new(options, 16);
            Peer {
                id: id.to_string(),
                client,
                events,
            }
        }

        /// Polls until `wanted` says yes to an event; the error if the connection fails.
        async fn until(
            &mut self,
            wanted: impl Fn(&rumqttc::Event) -> bool,
        ) -> Result<(), rumqttc::ConnectionError> {
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if wanted(&self.events.poll().await?) {
                        return Ok(());
                    }
                }
            })
            .await
            .expect("no answer within 5 s")
        }

        async fn connected(&mut self) -> Result<(), rumqttc::ConnectionError> {
            self.until(|e| matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))))
                .await
        }

        async fn subscribed(&mut self, filter: &str) -> Result<(), rumqttc::ConnectionError> {
            self.client
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            self.until(|e| matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))))
                .await
        }

        /// Publishes at QoS 0 (nothing for the client to send again after a refusal) and
        /// polls until it is written, then sends a ping: the error if the connection is
        /// closed meanwhile.
        async fn publish(
            &mut self,
            topic: &str,
            text: &str,
        ) -> Result<(), rumqttc::ConnectionError> {
            self.client
                .publish(
                    topic,
                    rumqttc::QoS::AtMostOnce,
                    false,
                    text.as_bytes().to_vec(),
                )
                .await
                .unwrap();
            self.until(|e| matches!(e, rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(_))))
                .await?;
            self.client
                .subscribe(
                    format!("edgeloop/v1/devices/{}/receipts", self.id),
                    rumqttc::QoS::AtMostOnce,
                )
                .await
                .unwrap();
            self.until(|e| matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))))
                .await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_auth_a_device_is_held_to_its_own_topics() {
        let dir = tempfile::tempdir().unwrap();
        let (store, auth, broker) = broker_with_auth(dir.path()).await;
        assert_ne!(broker.url(), broker.controller_url());
        let password = "p4ssw0rd".to_string();
        for device in ["dev-1", "dev-2"] {
            approve(&store, device, &password).await;
        }
        let login = |device: &str| (device.to_string(), password.clone());
        let topic = |device: &str, channel: &str| format!("edgeloop/v1/devices/{device}/{channel}");

        // The controller hears everything, on rumqttd's own port.
        let mut controller = Peer::new(
            &broker.controller_url(),
            "ctl",
            auth.controller_login(),
            None,
        );
        controller.connected().await.unwrap();
        controller.subscribed("#").await.unwrap();
        let heard = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
        let listener = tokio::spawn({
            let heard = heard.clone();
            async move {
                loop {
                    if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) =
                        controller.events.poll().await
                    {
                        let text = String::from_utf8_lossy(&p.payload).to_string();
                        heard.lock().unwrap().push((p.topic, text));
                    }
                }
            }
        });

        // Its own channels, both ways, and the trust topic.
        let mut device = Peer::new(
            &broker.url(),
            "dev-1",
            login("dev-1"),
            Some(&topic("dev-1", "status")),
        );
        device.connected().await.unwrap();
        for channel in ["receipts", "commands", "chunks"] {
            device.subscribed(&topic("dev-1", channel)).await.unwrap();
        }
        device.subscribed("edgeloop/v1/fleet/trust").await.unwrap();
        device
            .publish(&topic("dev-1", "telemetry"), "mine")
            .await
            .unwrap();

        // A receipt on another device's topic closes the connection and goes nowhere.
        device
            .publish(&topic("dev-2", "receipts"), "forged")
            .await
            .unwrap_err();
        // Nor may it read another device's telemetry, or publish on its own downlink.
        let mut device = Peer::new(&broker.url(), "dev-1", login("dev-1"), None);
        device.connected().await.unwrap();
        device
            .subscribed(&topic("+", "telemetry"))
            .await
            .unwrap_err();
        let mut device = Peer::new(&broker.url(), "dev-1", login("dev-1"), None);
        device.connected().await.unwrap();
        device
            .publish(&topic("dev-1", "receipts"), "own receipt")
            .await
            .unwrap_err();
        // A last will on another device's topic: refused before the broker sees it.
        let mut device = Peer::new(
            &broker.url(),
            "dev-1",
            login("dev-1"),
            Some(&topic("dev-2", "status")),
        );
        device.connected().await.unwrap_err();
        // rumqttd's own port admits no device: the door is the only way in.
        let mut device = Peer::new(&broker.controller_url(), "dev-1", login("dev-1"), None);
        device.connected().await.unwrap_err();

        // What a device sent before a refused publish, in the same write, still arrives.
        let addr = broker.addr;
        let (own, forged) = (topic("dev-1", "telemetry"), topic("dev-2", "receipts"));
        let dev1 = login("dev-1");
        tokio::task::spawn_blocking(move || {
            let (mut stream, accepted) =
                mqtt_connect(addr, "dev-1", Some(&dev1), Duration::from_secs(5)).unwrap();
            assert!(accepted);
            let mut packets = bytes::BytesMut::new();
            for (topic, text) in [(own, "before"), (forged, "forged too")] {
                let publish = rumqttc::Publish::new(topic, rumqttc::QoS::AtMostOnce, text);
                publish.write(&mut packets).unwrap();
            }
            stream.write_all(&packets).unwrap();
            // The door closes the connection (a timeout would be an error of another kind).
            let mut rest = Vec::new();
            match stream.read_to_end(&mut rest) {
                Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            }
        })
        .await
        .unwrap();

        // A well-behaved device is not held back by another's refusals.
        let mut other = Peer::new(&broker.url(), "dev-2", login("dev-2"), None);
        other.connected().await.unwrap();
        other
            .publish(&topic("dev-2", "status"), "last")
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !heard.lock().unwrap().iter().any(|(_, text)| text == "last") {
            assert!(Instant::now() < deadline, "{:?}", heard.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        listener.abort();
        let heard = heard.lock().unwrap().clone();
        let texts: Vec<&str> = heard.iter().map(|(_, text)| text.as_str()).collect();
        assert!(texts.contains(&"mine"), "{heard:?}");
        assert!(!texts.contains(&"forged"), "{heard:?}");
        assert!(!texts.contains(&"own receipt"), "{heard:?}");
        assert!(texts.contains(&"before"), "{heard:?}");
        assert!(!texts.contains(&"forged too"), "{heard:?}");
    }
}
