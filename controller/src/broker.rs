//! The embedded MQTT broker (rumqttd), for single-box use: `edgeloop serve` and
//! `edgeloop demo` start it unless an external broker is configured.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use edgeloop_shared::protocol::MAX_MESSAGE_BYTES;

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
    pub fn start(listen: SocketAddr) -> Result<Self, BrokerError> {
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

        let config = rumqttd_config(addr)?;
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
        while !answers_mqtt(connect_to) {
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
fn answers_mqtt(addr: SocketAddr) -> bool {
    const CONNECT: [u8; 21] = [
        0x10, 19, // CONNECT, remaining length
        0, 4, b'M', b'Q', b'T', b'T', 4, // protocol name and level 4 (3.1.1)
        0x02, 0, 10, // clean session, keep-alive 10 s
        0, 7, b'p', b'r', b'o', b'b', b'e', b'-', b'0', // client id
    ];
    let handshake = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(&CONNECT)?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack)?;
        stream.write_all(&[0xE0, 0])?; // DISCONNECT
        Ok(connack == [0x20, 2, 0, 0])
    };
    handshake().unwrap_or(false)
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
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(broker.addr.port(), 0);
        assert!(answers_mqtt(broker.addr));
        let err = EmbeddedBroker::start(broker.addr).unwrap_err();
        assert!(matches!(err, BrokerError::Bind { .. }), "{err}");
    }
}
