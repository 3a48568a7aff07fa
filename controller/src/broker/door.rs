//! The embedded broker's front door: with broker logins on, every device connection goes
//! through it, and it holds each device to its own topics. rumqttd 0.20 checks logins but
//! has no topic ACL, so without the door a device with a login could publish receipts on
//! another device's topic (which would make that device drop telemetry it still holds),
//! send telemetry as another device, or read the whole fleet's.
//!
//! The rules are those of docs/PROTOCOL.md §2 for a Mosquitto ACL. A device may publish
//! only on its own device-to-controller channels, may name only one of them as its last
//! will, and may subscribe only to its own controller-to-device channels and to the fleet's
//! trust topic. Anything else closes the connection, logged with the device id: MQTT 3.1.1
//! gives a broker no way to refuse a PUBLISH but that (§3.3.5), and a device that tries is
//! misconfigured or hostile. The controller's login passes unchecked.
//!
//! The door adds its secret to the password of every CONNECT it forwards, and the broker
//! admits no login without that secret ([`super::BrokerAuth`]), so connecting to rumqttd's
//! own loopback port gets around nothing. Only the client's direction is read; the broker's
//! is copied as it comes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use edgeloop_shared::topics::{Channel, Topics};
use rumqttc::mqttbytes::{self, FixedHeader, PacketType};
use rumqttc::{Connect, Publish, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Who a connection is, by its CONNECT (the broker then checks that it is so).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Client {
    Controller,
    Device(String),
}

/// Why the door closed a connection.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    #[error("malformed MQTT packet: {0}")]
    Malformed(#[from] mqttbytes::Error),
    #[error("the first packet is {0:?}, not CONNECT")]
    NotConnect(PacketType),
    #[error("a second CONNECT")]
    SecondConnect,
    #[error("device `{device}` may not publish on `{topic}`")]
    Publish { device: String, topic: String },
    #[error("device `{device}` may not name `{topic}` as its last will")]
    Will { device: String, topic: String },
    #[error("device `{device}` may not subscribe to `{filter}`")]
    Subscribe { device: String, filter: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The topic rules of one fleet, and the way to the broker behind them.
pub(super) struct Door {
    pub topics: Topics,
    pub controller_user: String,
    /// Added in front of every password forwarded; see [`super::BrokerAuth::allows`].
    pub secret: String,
    /// rumqttd's own listener.
    pub broker: SocketAddr,
    /// Largest packet read, as the broker's own limit.
    pub max_packet: usize,
}

impl Door {
    /// May `device` publish on `topic`: one of its own device-to-controller channels.
    fn may_publish(&self, device: &str, topic: &str) -> bool {
        matches!(self.topics.parse(topic),
            Ok((id, channel)) if id == device && Channel::FROM_DEVICE.contains(&channel))
    }

    /// May `device` subscribe to `filter`: one of its own controller-to-device channels
    /// (named exactly, no wildcards), or the fleet's trust topic.
    fn may_subscribe(&self, device: &str, filter: &str) -> bool {
        filter == self.topics.trust()
            || matches!(self.topics.parse(filter),
                Ok((id, channel)) if id == device && !Channel::FROM_DEVICE.contains(&channel))
    }

    /// Accepts connections until the process ends.
    pub async fn serve(self: Arc<Self>, listener: std::net::TcpListener) {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "embedded broker's front door cannot listen");
                return;
            }
        };
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(self.clone().relay(stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    warn!(error = %e, "embedded broker cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Carries one client's connection to the broker and back, until either side closes
    /// or the client breaks a rule.
    async fn relay(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let broker = match TcpStream::connect(self.broker).await {
            Ok(b) => b,
            Err(e) => {
                warn!(%peer, error = %e, "embedded broker unreachable behind its front door");
                return;
            }
        };
        // As every connection of edgeloop's: acknowledgements are small and latency-bound.
        for stream in [&client, &broker] {
            let _ = stream.set_nodelay(true);
        }
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut broker_rx, mut broker_tx) = broker.into_split();
        tokio::select! {
            outcome = self.inspect(&mut client_rx, &mut broker_tx) => match outcome {
                Ok(()) | Err(Refusal::Io(_)) => {}
                Err(refusal) => warn!(%peer, reason = %refusal, "broker connection closed"),
            },
            outcome = tokio::io::copy(&mut broker_rx, &mut client_tx) => {
                debug!(%peer, ?outcome, "broker closed a connection");
            }
        }
        // Dropping the halves closes both connections; the broker then publishes the
        // device's last will, as for any connection lost.
    }

    /// Reads the client's packets, checks each, and forwards those that pass. Returns at
    /// the client's end of stream, or with the first rule it breaks.
    async fn inspect(
        &self,
        from: &mut OwnedReadHalf,
        to: &mut OwnedWriteHalf,
    ) -> Result<(), Refusal> {
        let mut input = BytesMut::with_capacity(16 * 1024);
        let mut output = BytesMut::with_capacity(16 * 1024);
        let mut client = None;
        loop {
            let refusal = self.take(&mut input, &mut output, &mut client).err();
            // What passed before a refusal still goes to the broker.
            if !output.is_empty() {
                to.write_all(&output).await?;
                output.clear();
            }
            if let Some(refusal) = refusal {
                return Err(refusal);
            }
            if from.read_buf(&mut input).await? == 0 {
                return Ok(());
            }
        }
    }

    /// Takes the whole packets at the front of `input`, checks each, and appends those that
    /// pass to `output`; stops at the first that does not.
    fn take(
        &self,
        input: &mut BytesMut,
        output: &mut BytesMut,
        client: &mut Option<Client>,
    ) -> Result<(), Refusal> {
        loop {
            let header = match mqttbytes::check(input.iter(), self.max_packet) {
                Ok(header) => header,
                Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let frame = input.split_to(header.frame_length()).freeze();
            match client {
                None => *client = Some(self.admit(header, frame, output)?),
                Some(Client::Controller) => output.extend_from_slice(&frame),
                Some(Client::Device(id)) => {
                    self.check(id, header, &frame)?;
                    output.extend_from_slice(&frame);
                }
            }
        }
    }

    /// The first packet: a CONNECT, whose last will a device may only set on its own
    /// channels. Writes it to `output` with the door's secret added to the password.
    fn admit(
        &self,
        header: FixedHeader,
        frame: Bytes,
        output: &mut BytesMut,
    ) -> Result<Client, Refusal> {
        let kind = header.packet_type()?;
        if kind != PacketType::Connect {
            return Err(Refusal::NotConnect(kind));
        }
        let mut connect = Connect::read(header, frame)?;
        let client = match &connect.login {
            Some(login) if login.username == self.controller_user => Client::Controller,
            _ => Client::Device(connect.client_id.clone()),
        };
        if let (Client::Device(device), Some(will)) = (&client, &connect.last_will)
            && !self.may_publish(device, &will.topic)
        {
            return Err(Refusal::Will {
                device: device.clone(),
                topic: will.topic.clone(),
            });
        }
        // Without a login the broker refuses the client anyway.
        if let Some(login) = &mut connect.login {
            login.password.insert_str(0, &self.secret);
        }
        connect.write(output)?;
        Ok(client)
    }

    /// A device's later packets: what it publishes and subscribes to. The rest
    /// (acknowledgements, pings, unsubscriptions, DISCONNECT) passes.
    fn check(&self, device: &str, header: FixedHeader, frame: &Bytes) -> Result<(), Refusal> {
        match header.packet_type()? {
            PacketType::Publish => {
                let publish = Publish::read(header, frame.clone())?;
                if !self.may_publish(device, &publish.topic) {
                    return Err(Refusal::Publish {
                        device: device.to_string(),
                        topic: publish.topic,
                    });
                }
            }
            PacketType::Subscribe => {
                let subscribe = Subscribe::read(header, frame.clone())?;
                if let Some(f) = subscribe
                    .filters
                    .into_iter()
                    .find(|f| !self.may_subscribe(device, &f.path))
                {
                    return Err(Refusal::Subscribe {
                        device: device.to_string(),
                        filter: f.path,
                    });
                }
            }
            PacketType::Connect => return Err(Refusal::SecondConnect),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn door() -> Door {
        Door {
            topics: Topics::new("fleet").unwrap(),
            controller_user: "ctl".into(),
            secret: "s3cret".into(),
            broker: "127.0.0.1:1".parse().unwrap(),
            max_packet: 1 << 20,
        }
    }

    #[test]
    fn a_device_publishes_on_its_own_uplink_channels_only() {
        let d = door();
        for channel in Channel::FROM_DEVICE {
            let topic = d.topics.device("dev-1", channel).unwrap();
            assert!(d.may_publish("dev-1", &topic), "{topic}");
            assert!(!d.may_publish("dev-2", &topic), "{topic} as dev-2");
        }
        for topic in [
            "fleet/v1/devices/dev-1/receipts",
            "fleet/v1/devices/dev-1/commands",
            "fleet/v1/devices/dev-1/chunks",
            "fleet/v1/fleet/trust",
            "fleet/v1/devices/dev-1/telemetry/x",
            "other/v1/devices/dev-1/telemetry",
            "$SYS/x",
        ] {
            assert!(!d.may_publish("dev-1", topic), "{topic}");
        }
    }

    #[test]
    fn a_device_subscribes_to_its_own_downlink_channels_and_the_trust_topic_only() {
        let d = door();
        for channel in [Channel::Commands, Channel::Receipts, Channel::Chunks] {
            let topic = d.topics.device("dev-1", channel).unwrap();
            assert!(d.may_subscribe("dev-1", &topic), "{topic}");
            assert!(!d.may_subscribe("dev-2", &topic), "{topic} as dev-2");
        }
        assert!(d.may_subscribe("dev-1", "fleet/v1/fleet/trust"));
        for filter in [
            "fleet/v1/devices/dev-1/telemetry",
            "fleet/v1/devices/+/receipts",
            "fleet/v1/devices/dev-1/#",
            "fleet/#",
            "#",
            "$share/g/fleet/v1/devices/dev-1/receipts",
        ] {
            assert!(!d.may_subscribe("dev-1", filter), "{filter}");
        }
    }
}
