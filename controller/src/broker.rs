//! The embedded MQTT broker (rumqttd), for single-box use: `edgeloop serve` and
//! `edgeloop demo` start it unless an external broker is configured.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeloop_shared::protocol::MAX_MESSAGE_BYTES;

use crate::store::Store;

/// Who may connect to the embedded broker when it checks credentials: the controller
/// itself, by the login it made at start, and every device with an approved enrollment,
/// as its own id and with the broker password it was issued (`Store::broker_login`).
#[derive(Clone)]
pub struct BrokerAuth {
    pub store: Arc<dyn Store>,
    pub controller_user: String,
    pub controller_password: String,
}

impl BrokerAuth {
    /// A fresh random login for the controller's own connection.
    pub fn new(store: Arc<dyn Store>, controller_user: &str) -> Result<Self, BrokerError> {
        let mut secret = [0u8; 24];
        getrandom::fill(&mut secret)
            .map_err(|e| BrokerError::Config(format!("no entropy: {e}")))?;
        Ok(BrokerAuth {
            store,
            controller_user: controller_user.to_string(),
            controller_password: hex::encode(secret),
        })
    }

    async fn allows(&self, client_id: String, user: String, password: String) -> bool {
        if user == self.controller_user {
            return crate::store::same_secret(&password, &self.controller_password);
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
    pub addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `listen` (port 0 picks a free port) and waits until it accepts
    /// connections.
    pub fn start(listen: SocketAddr, auth: Option<BrokerAuth>) -> Result<Self, BrokerError> {
        // Bind first so that a busy port is a clear error here, not a log line in a thread.
        let probe = TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
        let addr = probe.local_addr().map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
        drop(probe);

        let mut config = rumqttd_config(addr)?;
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
        Ok(EmbeddedBroker { addr })
    }

    /// The URL clients use to reach this broker.
    pub fn url(&self) -> String {
        format!(
            "mqtt://{}:{}",
            crate::reachable_host(self.addr),
            self.addr.port()
        )
    }
}

/// True when an MQTT 3.1.1 CONNECT at `addr` is answered with an accepting CONNACK. A full
/// handshake (rather than a bare TCP connect) keeps the broker from logging the probe as
/// an aborted connection.
fn answers_mqtt(addr: SocketAddr, login: Option<&(String, String)>) -> bool {
    let connect = connect_packet("probe-0", login);
    let handshake = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(&connect)?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack)?;
        stream.write_all(&[0xE0, 0])?; // DISCONNECT
        Ok(connack == [0x20, 2, 0, 0])
    };
    handshake().unwrap_or(false)
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

fn rumqttd_config(addr: SocketAddr) -> Result<rumqttd::Config, BrokerError> {
    // Room for the largest envelope plus topic and MQTT headers.
    let max_payload = MAX_MESSAGE_BYTES + 4096;
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_auth_the_broker_admits_the_controller_and_approved_devices_only() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("s.sqlite")).unwrap());
        let auth = BrokerAuth::new(store.clone(), "ctl").unwrap();
        let login = (
            auth.controller_user.clone(),
            auth.controller_password.clone(),
        );
        let broker = tokio::task::spawn_blocking({
            let auth = auth.clone();
            move || EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), Some(auth))
        })
        .await
        .unwrap()
        .unwrap();
        let probe = |client: &'static str, login: Option<(String, String)>| {
            let addr = broker.addr;
            tokio::task::spawn_blocking(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                stream
                    .write_all(&connect_packet(client, login.as_ref()))
                    .unwrap();
                let mut connack = [0u8; 4];
                stream.read_exact(&mut connack).is_ok() && connack == [0x20, 2, 0, 0]
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

        // A device with an approved enrollment and an issued password.
        let token = crate::store::TokenRow {
            id: "t".into(),
            group: "g".into(),
            tags: vec![],
            expires_ms: u64::MAX / 2,
            uses_left: None,
            auto_approve: true,
            created_ms: 0,
            created_by: "test".into(),
        };
        store.create_token(&token, &"00".repeat(32)).await.unwrap();
        let request = crate::store::EnrollRequest {
            device_id: "dev-1".into(),
            public_key: "ed25519:x".into(),
            board: None,
            arch: None,
            agent_version: None,
        };
        store.enroll(&"00".repeat(32), &request, 1).await.unwrap();
        let password = "p4ssw0rd".to_string();
        let hash = edgeloop_shared::sha256_hex(password.as_bytes());
        store.set_broker_password("dev-1", &hash).await.unwrap();
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
}
