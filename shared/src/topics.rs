//! The MQTT topic scheme.
//!
//! ```text
//! {root}/v1/devices/{device_id}/status        device → controller  DeviceStatus, last will
//! {root}/v1/devices/{device_id}/telemetry     device → controller  DriftSummary
//! {root}/v1/devices/{device_id}/deployment    device → controller  DeploymentStatus
//! {root}/v1/devices/{device_id}/samples       device → controller  SampleChunk (uploads)
//! {root}/v1/devices/{device_id}/commands      controller → device  signed commands
//! {root}/v1/devices/{device_id}/receipts      controller → device  Receipt: what is stored
//! ```
//!
//! The root defaults to `edgeloop`; it lets several fleets (or test runs) share a broker.
//! The device id is a topic level of its own, so a broker ACL such as Mosquitto's
//! `pattern readwrite edgeloop/v1/devices/%c/#` pins each device to its own topics.

use crate::is_valid_identifier;

pub const DEFAULT_ROOT: &str = "edgeloop";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Status,
    Telemetry,
    Deployment,
    Commands,
    Receipts,
    Samples,
    /// A device's requests for bundle pieces over MQTT.
    Transfer,
    /// The bundle pieces the controller sends a device.
    Chunks,
}

impl Channel {
    pub const ALL: [Channel; 8] = [
        Channel::Status,
        Channel::Telemetry,
        Channel::Deployment,
        Channel::Commands,
        Channel::Receipts,
        Channel::Samples,
        Channel::Transfer,
        Channel::Chunks,
    ];

    /// Channels a device publishes on.
    pub const FROM_DEVICE: [Channel; 5] = [
        Channel::Status,
        Channel::Telemetry,
        Channel::Deployment,
        Channel::Samples,
        Channel::Transfer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Status => "status",
            Channel::Telemetry => "telemetry",
            Channel::Deployment => "deployment",
            Channel::Commands => "commands",
            Channel::Receipts => "receipts",
            Channel::Samples => "samples",
            Channel::Transfer => "transfer",
            Channel::Chunks => "chunks",
        }
    }

    /// The message kind that must travel on this channel.
    pub fn message_kind(self) -> &'static str {
        match self {
            Channel::Status => "status",
            Channel::Telemetry => "drift_summary",
            Channel::Deployment => "deployment_status",
            Channel::Commands => "command",
            Channel::Receipts => "receipt",
            Channel::Samples => "sample_chunk",
            Channel::Transfer => "bundle_request",
            Channel::Chunks => "bundle_chunk",
        }
    }

    fn parse(level: &str) -> Option<Self> {
        Channel::ALL.into_iter().find(|c| c.as_str() == level)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("topic root `{0}` must be non-empty and free of `+`, `#` and empty levels")]
    BadRoot(String),
    #[error("device id `{0}` is not a valid identifier")]
    BadDeviceId(String),
    #[error("topic `{0}` is not an edgeloop v1 device topic")]
    NotADeviceTopic(String),
}

/// Builds and parses topics under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            root: DEFAULT_ROOT.to_string(),
        }
    }
}

impl Topics {
    pub fn new(root: &str) -> Result<Self, TopicError> {
        let ok = !root.is_empty()
            && !root.starts_with('$')
            && root.split('/').all(|level| !level.is_empty())
            && !root.contains(['+', '#', '\0']);
        if !ok {
            return Err(TopicError::BadRoot(root.to_string()));
        }
        Ok(Topics {
            root: root.to_string(),
        })
    }

    pub fn device(&self, device_id: &str, channel: Channel) -> Result<String, TopicError> {
        if !is_valid_identifier(device_id) {
            return Err(TopicError::BadDeviceId(device_id.to_string()));
        }
        Ok(format!(
            "{}/v1/devices/{device_id}/{}",
            self.root,
            channel.as_str()
        ))
    }

    /// Where the current trust document is kept (retained) for the whole fleet.
    pub fn trust(&self) -> String {
        format!("{}/v1/fleet/trust", self.root)
    }

    /// The filter matching `channel` of every device.
    pub fn all_devices(&self, channel: Channel) -> String {
        format!("{}/v1/devices/+/{}", self.root, channel.as_str())
    }

    /// Splits a device topic into its device id and channel.
    pub fn parse<'t>(&self, topic: &'t str) -> Result<(&'t str, Channel), TopicError> {
        let not_ours = || TopicError::NotADeviceTopic(topic.chars().take(200).collect());
        let rest = topic
            .strip_prefix(self.root.as_str())
            .and_then(|r| r.strip_prefix("/v1/devices/"))
            .ok_or_else(not_ours)?;
        let (device_id, channel) = rest.split_once('/').ok_or_else(not_ours)?;
        let channel = Channel::parse(channel).ok_or_else(not_ours)?;
        if !is_valid_identifier(device_id) {
            return Err(TopicError::BadDeviceId(device_id.to_string()));
        }
        Ok((device_id, channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let t = Topics::new("fleet/a").unwrap();
        for channel in Channel::ALL {
            let topic = t.device("dev-1", channel).unwrap();
            assert_eq!(t.parse(&topic).unwrap(), ("dev-1", channel));
        }
        assert_eq!(
            Topics::default().device("d", Channel::Status).unwrap(),
            "edgeloop/v1/devices/d/status"
        );
        assert_eq!(
            t.all_devices(Channel::Telemetry),
            "fleet/a/v1/devices/+/telemetry"
        );
    }

    #[test]
    fn foreign_and_hostile_topics_are_refused() {
        let t = Topics::default();
        for bad in [
            "other/v1/devices/d/status",
            "edgeloop/v2/devices/d/status",
            "edgeloop/v1/devices/d/reboot",
            "edgeloop/v1/devices/d",
            "edgeloop/v1/devices/d/status/extra",
        ] {
            assert!(
                matches!(t.parse(bad), Err(TopicError::NotADeviceTopic(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            t.parse("edgeloop/v1/devices/../status"),
            Err(TopicError::BadDeviceId(_))
        ));
        assert!(t.device("a/b", Channel::Status).is_err());
        for root in ["", "a//b", "a/+", "#", "$SYS"] {
            assert!(Topics::new(root).is_err(), "{root}");
        }
    }
}
