//! Builds outgoing protocol messages and queues them in the outbox.

use edgeloop_shared::protocol::{
    BundleRequest, DeployStage, DeploymentStatus, DeviceStatus, DriftSummary, Envelope, Format,
    MAX_MESSAGE_BYTES, Message, ModelRef, SampleChunk,
};
use edgeloop_shared::topics::{Channel, Topics};
use tracing::warn;

use crate::now_ms;
use crate::outbox::{Enqueued, NewEntry, Outbox, Priority};

/// Queues this device's messages on their topics. Cheap to clone.
#[derive(Clone)]
pub struct Reporter {
    device_id: String,
    topics: Topics,
    outbox: Outbox,
    format: Format,
}

impl Reporter {
    /// Queues messages spelled in `format`.
    pub fn new(device_id: &str, topics: Topics, outbox: Outbox, format: Format) -> Self {
        Reporter {
            device_id: device_id.to_string(),
            topics,
            outbox,
            format,
        }
    }

    /// Wraps a message in a fresh envelope (new message id, current time).
    pub fn envelope(&self, message: Message) -> Envelope {
        Envelope::new(
            self.device_id.clone(),
            uuid::Uuid::now_v7().to_string(),
            now_ms(),
            message,
        )
    }

    pub fn topic(&self, channel: Channel) -> String {
        self.topics
            .device(&self.device_id, channel)
            .expect("the device id was validated with the config")
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn queue(&self, channel: Channel, message: Message) {
        let priority = match channel {
            Channel::Deployment | Channel::Transfer => Priority::Control,
            Channel::Samples => Priority::Samples,
            _ => Priority::Telemetry,
        };
        let envelope = self.envelope(message);
        let bytes = envelope.encode_as(self.format);
        if bytes.len() > MAX_MESSAGE_BYTES {
            // No broker or controller would take it; queuing it would only block the outbox.
            warn!(
                channel = channel.as_str(),
                bytes = bytes.len(),
                limit = MAX_MESSAGE_BYTES,
                "message over the protocol's size limit; not sent"
            );
            return;
        }
        let topic = self.topic(channel);
        let entry = NewEntry {
            topic: &topic,
            msg_id: &envelope.msg_id,
            priority,
            payload: &bytes,
        };
        match self.outbox.enqueue(entry) {
            Ok(Enqueued::Queued { evicted: 0, .. }) => {}
            Ok(Enqueued::Queued { evicted, .. }) => {
                warn!(
                    evicted,
                    "outbox full: older, lower-priority messages dropped (counted)"
                );
            }
            Ok(Enqueued::Dropped) => {
                warn!(
                    channel = channel.as_str(),
                    "outbox full of higher-priority messages: message dropped (counted)"
                );
            }
            // Nothing else can hold it: say so loudly rather than silently dropping.
            Err(e) => {
                warn!(error = %e, channel = channel.as_str(), "cannot queue message; it is lost")
            }
        }
    }

    pub fn status(&self, status: DeviceStatus) {
        self.queue(Channel::Status, Message::Status(status));
    }

    pub fn bundle_request(&self, request: BundleRequest) {
        self.queue(Channel::Transfer, Message::BundleRequest(request));
    }

    pub fn sample_chunk(&self, chunk: SampleChunk) {
        self.queue(Channel::Samples, Message::SampleChunk(chunk));
    }

    pub fn drift(&self, summary: DriftSummary) {
        self.queue(Channel::Telemetry, Message::DriftSummary(summary));
    }

    pub fn deployment(
        &self,
        rollout_id: Option<u64>,
        command_seq: u64,
        model: Option<ModelRef>,
        stage: DeployStage,
        detail: Option<String>,
    ) {
        self.queue(
            Channel::Deployment,
            Message::DeploymentStatus(DeploymentStatus {
                rollout_id,
                command_seq,
                model,
                stage,
                detail,
            }),
        );
    }
}
