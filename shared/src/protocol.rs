//! Protocol v1: the envelope every MQTT payload travels in, and the message kinds.
//!
//! On the wire an envelope is one UTF-8 JSON object:
//!
//! ```json
//! {"v":1,"device_id":"sim-001","msg_id":"0192…","ts_ms":1764372000000,
//!  "kind":"drift_summary","payload":{…}}
//! ```
//!
//! The same envelope may travel as MessagePack instead (a map with the same six keys, the
//! payload a map of the same fields): for a drift summary a third fewer bytes than JSON, read
//! in a third of the work. The first byte tells which (see [`Format::of`]).
//!
//! Decoding is strict: the version is checked first (so a future version gets a clear
//! "unsupported version" error rather than a confusing field error), then the envelope,
//! then the payload according to `kind`. Unknown fields are refused at every level; a new
//! field means a new protocol version.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::command::SignedCommand;
use crate::drift::WindowStats;
use crate::is_valid_identifier;

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest envelope accepted, in bytes. Brokers and both ends enforce it.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message is {size} bytes, more than the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("message is not a JSON object: {0}")]
    NotJson(String),
    #[error("message has no protocol version field `v`")]
    MissingVersion,
    #[error("protocol version {0} is not supported (this build speaks version {PROTOCOL_VERSION})")]
    UnsupportedVersion(u64),
    #[error("malformed envelope: {0}")]
    Envelope(String),
    #[error("unknown message kind `{0}`")]
    UnknownKind(String),
    #[error("malformed `{kind}` payload: {reason}")]
    Payload { kind: &'static str, reason: String },
    #[error("device id `{0}` is not a valid identifier")]
    BadDeviceId(String),
    #[error("message id must be 1 to 64 visible ASCII characters")]
    BadMessageId,
    #[error("strings may not contain the NUL character")]
    NulCharacter,
    #[error("malformed batch: {0}")]
    Batch(String),
    #[error("malformed MessagePack envelope: {0}")]
    MsgPack(String),
}

impl From<crate::msgpack::ScanError> for DecodeError {
    fn from(e: crate::msgpack::ScanError) -> Self {
        match e {
            crate::msgpack::ScanError::Nul => DecodeError::NulCharacter,
            e => DecodeError::MsgPack(e.to_string()),
        }
    }
}

/// How an envelope is spelled on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One UTF-8 JSON object: readable with any MQTT client.
    #[default]
    Json,
    /// One MessagePack map: a third fewer bytes, read in a third of the work.
    Msgpack,
}

impl Format {
    /// The format of an encoded envelope, from its first byte: a MessagePack map begins with
    /// a byte no JSON text begins with.
    pub fn of(bytes: &[u8]) -> Format {
        match bytes.first() {
            Some(&b) if crate::msgpack::is_map_start(b) => Format::Msgpack,
            _ => Format::Json,
        }
    }

    pub fn is_json(&self) -> bool {
        *self == Format::Json
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Msgpack => "msgpack",
        }
    }
}

/// A payload as it was received: its JSON text or its MessagePack bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceivedPayload<'a> {
    Json(&'a str),
    Msgpack(&'a [u8]),
}

/// What an envelope keeps of its received payload.
#[derive(Debug, Clone)]
enum Kept {
    Json(Arc<str>),
    Msgpack(Arc<[u8]>),
}

/// A model name and version, as reported by devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    pub name: String,
    pub version: u64,
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

/// Heartbeat and presence. Also the payload of the agent's MQTT last will (with
/// `online: false`), so the controller learns of an unclean disconnect from the broker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStatus {
    pub online: bool,
    pub agent_version: String,
    /// The active model, if the device has one.
    pub model: Option<ModelRef>,
    pub uptime_s: u64,
    /// Inferences run since the agent started.
    pub inferences: u64,
    /// Inputs that failed (wrong shape, model error) since the agent started.
    pub errors: u64,
    /// Incoming messages the agent refused as malformed since it started.
    pub malformed_messages: u64,
    /// The device's store-and-forward queue. Absent from agents that predate it (and from
    /// their last wills): then zeros.
    #[serde(default)]
    pub outbox: OutboxStatus,
    /// The version of the trust document the device has applied; absent or 0: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub trust_version: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The state of a device's outbox, and what it ever had to drop to stay in its budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxStatus {
    /// Messages waiting for the controller's receipt.
    pub entries: u64,
    /// Their size in bytes.
    pub bytes: u64,
    /// The most bytes the outbox may hold.
    pub budget_bytes: u64,
    /// Messages dropped unsent to stay within the budget, since the outbox was created.
    pub dropped: DropCounts,
}

/// Dropped messages by priority class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropCounts {
    /// Deployment statuses and command results (dropped last).
    pub control: u64,
    /// Drift summaries and heartbeats.
    pub telemetry: u64,
    /// Raw input samples (dropped first).
    pub samples: u64,
}

/// The controller's answer to device messages it has handled: each message id is either
/// stored (now or before: a duplicate is stored too) or rejected for good. A device keeps a
/// message until it is named in a receipt, and sends it again otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub stored: Vec<String>,
    pub rejected: Vec<RejectedMessage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectedMessage {
    pub msg_id: String,
    pub reason: String,
}

/// Drift statistics of one closed window, for one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSummary {
    pub model: ModelRef,
    /// Increases by one per window since the model became active on this device.
    pub window_seq: u64,
    pub stats: WindowStats,
}

/// Where a deployment stands on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployStage {
    /// The command was verified and the download started.
    Downloading,
    /// The bundle was downloaded and is being verified.
    Verifying,
    /// The verified bundle is being written to the inactive slot and smoke-tested.
    Installing,
    /// The new model is active and serving; its health window starts.
    Active,
    /// The new model passed its health window: its slot is committed.
    Committed,
    /// The new model failed its health window and the device went back to the previous
    /// one by itself; the detail says why.
    RolledBack,
    /// The deployment failed after the command was accepted; the previous model serves.
    Failed,
    /// The command itself was refused (signature, target, expiry, sequence, version).
    Rejected,
}

impl DeployStage {
    /// No further report follows for the command.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Committed | Self::RolledBack | Self::Failed | Self::Rejected
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Verifying => "verifying",
            Self::Installing => "installing",
            Self::Active => "active",
            Self::Committed => "committed",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }
}

/// Progress of a deploy command on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentStatus {
    /// The rollout the command belonged to; absent when the command could not be trusted.
    pub rollout_id: Option<u64>,
    /// Sequence number of the command this reports on.
    pub command_seq: u64,
    /// The model the command asked for; absent when the command could not be trusted.
    pub model: Option<ModelRef>,
    pub stage: DeployStage,
    /// Why it failed or was rejected, or other detail for people.
    pub detail: Option<String>,
}

/// Raw bytes of a sample upload per chunk: base64 makes a chunk's message about 88 kB,
/// well inside [`MAX_MESSAGE_BYTES`].
pub const SAMPLE_CHUNK_BYTES: usize = 64 * 1024;

/// How a device's input sample is written, told apart by its first bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleFormat {
    /// A table model's: a CSV file with the feature names, then `predicted` and `label`.
    #[default]
    Csv,
    /// A tensor model's: an NPY array of records `x`, `predicted`, `label`
    /// ([`crate::npy`]).
    Npy,
}

impl SampleFormat {
    /// The format of a sample file: NPY when it starts with NPY's magic, else CSV.
    pub fn of(file: &[u8]) -> SampleFormat {
        if file.starts_with(crate::npy::MAGIC) {
            SampleFormat::Npy
        } else {
            SampleFormat::Csv
        }
    }

    /// The file name extension, which is also the format's name.
    pub fn extension(self) -> &'static str {
        match self {
            SampleFormat::Csv => "csv",
            SampleFormat::Npy => "npy",
        }
    }
}

/// One piece of a device's input sample, sent in answer to an `upload_samples` command.
///
/// The device writes its sample as one file ([`SampleFormat`]: CSV for a table model, NPY
/// for a tensor model), cuts it into pieces of [`SAMPLE_CHUNK_BYTES`] and sends each
/// as a message of its own; every piece names the whole file's size and SHA-256, so the
/// controller can put it together in any order and check it. A device that cannot read
/// its sample sends one piece with `count` 0 and the `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleChunk {
    /// The dataset the controller asked for (from the command).
    pub dataset_id: u64,
    /// Sequence number of the command this answers: a newer command's upload replaces an
    /// older one's.
    pub command_seq: u64,
    /// The model the sample was taken for; absent when the device kept none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    /// This piece's position, from 0, and how many pieces the file has.
    pub index: u32,
    pub count: u32,
    /// The whole file: its size, SHA-256 (lowercase hex) and data rows.
    pub total_bytes: u64,
    pub sha256: String,
    pub rows: u64,
    /// Base64 (standard alphabet, padded) of this piece's bytes.
    pub data: String,
    /// Why the device sent no sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SampleChunk {
    /// Cuts a sample file into the chunks that carry it.
    pub fn split(
        dataset_id: u64,
        command_seq: u64,
        model: Option<ModelRef>,
        rows: u64,
        file: &[u8],
    ) -> Vec<SampleChunk> {
        use base64::Engine;
        let sha256 = crate::sha256_hex(file);
        let pieces: Vec<&[u8]> = if file.is_empty() {
            vec![&[][..]]
        } else {
            file.chunks(SAMPLE_CHUNK_BYTES).collect()
        };
        let count = pieces.len() as u32;
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, piece)| SampleChunk {
                dataset_id,
                command_seq,
                model: model.clone(),
                index: i as u32,
                count,
                total_bytes: file.len() as u64,
                sha256: sha256.clone(),
                rows,
                data: base64::engine::general_purpose::STANDARD.encode(piece),
                error: None,
            })
            .collect()
    }

    /// The one chunk a device sends when it has no sample to send, saying why.
    pub fn failed(dataset_id: u64, command_seq: u64, error: String) -> SampleChunk {
        SampleChunk {
            dataset_id,
            command_seq,
            model: None,
            index: 0,
            count: 0,
            total_bytes: 0,
            sha256: String::new(),
            rows: 0,
            data: String::new(),
            error: Some(error),
        }
    }

    /// The piece's bytes, checked against the file's declared shape.
    pub fn bytes(&self) -> Result<Vec<u8>, String> {
        use base64::Engine;
        if self.error.is_some() || self.count == 0 {
            return Err("a failed upload carries no data".into());
        }
        if self.index >= self.count {
            return Err(format!("piece {} of {}", self.index, self.count));
        }
        let expected = (self.total_bytes as usize)
            .div_ceil(SAMPLE_CHUNK_BYTES)
            .max(1);
        if self.count as usize != expected {
            return Err(format!(
                "{} pieces for {} bytes (expected {expected})",
                self.count, self.total_bytes
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| format!("data is not base64: {e}"))?;
        let start = self.index as usize * SAMPLE_CHUNK_BYTES;
        let want = (self.total_bytes as usize - start.min(self.total_bytes as usize))
            .min(SAMPLE_CHUNK_BYTES);
        if bytes.len() != want {
            return Err(format!(
                "piece {} holds {} bytes, not {want}",
                self.index,
                bytes.len()
            ));
        }
        Ok(bytes)
    }
}

/// Puts an upload's pieces (in index order) back together and checks size and digest.
pub fn join_sample_chunks(
    pieces: &[Vec<u8>],
    total_bytes: u64,
    sha256: &str,
) -> Result<Vec<u8>, String> {
    let file: Vec<u8> = pieces.concat();
    if file.len() as u64 != total_bytes {
        return Err(format!(
            "{} bytes, not the declared {total_bytes}",
            file.len()
        ));
    }
    let digest = crate::sha256_hex(&file);
    if digest != sha256 {
        return Err(format!("SHA-256 {digest}, not the declared {sha256}"));
    }
    Ok(file)
}

/// Largest piece of a bundle sent over MQTT: its base64 in a message stays well under
/// [`MAX_MESSAGE_BYTES`].
pub const BUNDLE_CHUNK_BYTES: usize = 128 * 1024;
/// Most bytes one [`BundleRequest`] asks for.
pub const MAX_BUNDLE_REQUEST_BYTES: u64 = 8 * BUNDLE_CHUNK_BYTES as u64;

/// A device asks for part of a bundle over MQTT, for devices that can reach only the
/// broker (PROTOCOL §6.2). The controller answers with the [`BundleChunk`]s that cover
/// `[offset, offset + length)` of the file, cut from `offset` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRequest {
    /// The bundle file, by the SHA-256 a signed deploy command named.
    pub bundle_sha256: String,
    pub offset: u64,
    /// At most [`MAX_BUNDLE_REQUEST_BYTES`].
    pub length: u64,
}

/// A piece of a bundle file, sent to one device over MQTT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleChunk {
    pub bundle_sha256: String,
    /// Where the piece starts in the file, and the file's size.
    pub offset: u64,
    pub total_size: u64,
    /// SHA-256 (lowercase hex) of this piece's bytes.
    pub sha256: String,
    /// Base64 (standard alphabet, padded) of this piece's bytes.
    pub data: String,
    /// Set, with no data, when the controller has no such bundle or cannot read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl BundleChunk {
    /// The pieces that carry `bytes`, the part of a file of `total_size` bytes that starts
    /// at `offset`.
    pub fn cut(
        bundle_sha256: &str,
        bytes: &[u8],
        offset: u64,
        total_size: u64,
    ) -> Vec<BundleChunk> {
        use base64::Engine;
        let mut at = offset;
        bytes
            .chunks(BUNDLE_CHUNK_BYTES)
            .map(|piece| {
                let chunk = BundleChunk {
                    bundle_sha256: bundle_sha256.to_string(),
                    offset: at,
                    total_size,
                    sha256: crate::sha256_hex(piece),
                    data: base64::engine::general_purpose::STANDARD.encode(piece),
                    error: None,
                };
                at += piece.len() as u64;
                chunk
            })
            .collect()
    }

    /// The answer to a request the controller cannot serve.
    pub fn failed(bundle_sha256: &str, error: String) -> BundleChunk {
        BundleChunk {
            bundle_sha256: bundle_sha256.to_string(),
            offset: 0,
            total_size: 0,
            sha256: String::new(),
            data: String::new(),
            error: Some(error),
        }
    }

    /// The piece's bytes, checked against its digest and the size limit.
    pub fn bytes(&self) -> Result<Vec<u8>, String> {
        use base64::Engine;
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| format!("data is not base64: {e}"))?;
        if bytes.is_empty() || bytes.len() > BUNDLE_CHUNK_BYTES {
            return Err(format!("a piece of {} bytes", bytes.len()));
        }
        let digest = crate::sha256_hex(&bytes);
        if digest != self.sha256 {
            return Err(format!(
                "the piece at {} has SHA-256 {digest}, not {}",
                self.offset, self.sha256
            ));
        }
        Ok(bytes)
    }
}

/// Every message kind of protocol v1.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Status(DeviceStatus),
    DriftSummary(DriftSummary),
    DeploymentStatus(DeploymentStatus),
    Command(SignedCommand),
    Receipt(Receipt),
    SampleChunk(SampleChunk),
    BundleRequest(BundleRequest),
    BundleChunk(BundleChunk),
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Status(_) => "status",
            Message::DriftSummary(_) => "drift_summary",
            Message::DeploymentStatus(_) => "deployment_status",
            Message::Command(_) => "command",
            Message::Receipt(_) => "receipt",
            Message::SampleChunk(_) => "sample_chunk",
            Message::BundleRequest(_) => "bundle_request",
            Message::BundleChunk(_) => "bundle_chunk",
        }
    }

    fn decode_payload(kind: &str, payload: ReceivedPayload<'_>) -> Result<Self, DecodeError> {
        Self::read_payload(kind, payload, false)
    }

    /// [`Message::decode_payload`]; with `quick_only`, MessagePack only as
    /// [`crate::msgpack::read_quickly`] reads it, and an error for whatever it leaves to
    /// rmp-serde (the caller then decodes the envelope the long way).
    fn read_payload(
        kind: &str,
        payload: ReceivedPayload<'_>,
        quick_only: bool,
    ) -> Result<Self, DecodeError> {
        fn parse<T: for<'de> Deserialize<'de>>(
            kind: &'static str,
            payload: ReceivedPayload<'_>,
            quick_only: bool,
        ) -> Result<T, DecodeError> {
            let reason = match payload {
                ReceivedPayload::Json(text) => {
                    serde_json::from_str(text).map_err(|e| e.to_string())
                }
                ReceivedPayload::Msgpack(bytes) if quick_only => {
                    crate::msgpack::read_quickly(bytes).ok_or_else(String::new)
                }
                ReceivedPayload::Msgpack(bytes) => {
                    crate::msgpack::from_slice(bytes).map_err(|e| e.to_string())
                }
            };
            reason.map_err(|reason| DecodeError::Payload { kind, reason })
        }
        Ok(match kind {
            "status" => Message::Status(parse("status", payload, quick_only)?),
            "drift_summary" => Message::DriftSummary(parse("drift_summary", payload, quick_only)?),
            "deployment_status" => {
                Message::DeploymentStatus(parse("deployment_status", payload, quick_only)?)
            }
            "command" => Message::Command(parse("command", payload, quick_only)?),
            "receipt" => Message::Receipt(parse("receipt", payload, quick_only)?),
            "sample_chunk" => Message::SampleChunk(parse("sample_chunk", payload, quick_only)?),
            "bundle_request" => {
                Message::BundleRequest(parse("bundle_request", payload, quick_only)?)
            }
            "bundle_chunk" => Message::BundleChunk(parse("bundle_chunk", payload, quick_only)?),
            other => return Err(DecodeError::UnknownKind(other.chars().take(64).collect())),
        })
    }
}

/// A message serializes as its payload: the envelope says its kind.
impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Message::Status(m) => m.serialize(s),
            Message::DriftSummary(m) => m.serialize(s),
            Message::DeploymentStatus(m) => m.serialize(s),
            Message::Command(m) => m.serialize(s),
            Message::Receipt(m) => m.serialize(s),
            Message::SampleChunk(m) => m.serialize(s),
            Message::BundleRequest(m) => m.serialize(s),
            Message::BundleChunk(m) => m.serialize(s),
        }
    }
}

/// One protocol message with its routing and identity fields.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The device the message is from (telemetry) or for (commands).
    pub device_id: String,
    /// Unique per message; receivers use it to drop duplicates of a redelivery.
    pub msg_id: String,
    /// When the sender created the message, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub message: Message,
    /// The payload as it was received, when the envelope was decoded; see
    /// [`Envelope::received_payload`].
    received_payload: Option<Kept>,
}

/// Two envelopes are equal when they say the same thing, however their payloads were
/// spelled on the wire.
impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.device_id == other.device_id
            && self.msg_id == other.msg_id
            && self.ts_ms == other.ts_ms
            && self.message == other.message
    }
}

#[derive(Serialize)]
struct WireOut<'a> {
    v: u32,
    device_id: &'a str,
    msg_id: &'a str,
    ts_ms: u64,
    kind: &'a str,
    payload: Box<RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireIn<'a> {
    v: u32,
    #[serde(borrow)]
    device_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    msg_id: std::borrow::Cow<'a, str>,
    ts_ms: u64,
    #[serde(borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: Option<serde_json::Value>,
}

impl Envelope {
    pub fn new(
        device_id: impl Into<String>,
        msg_id: impl Into<String>,
        ts_ms: u64,
        message: Message,
    ) -> Self {
        Envelope {
            device_id: device_id.into(),
            msg_id: msg_id.into(),
            ts_ms,
            message,
            received_payload: None,
        }
    }

    /// The payload exactly as it was received (it decoded into [`Envelope::message`]), in
    /// the envelope's format; `None` for an envelope made here. A store keeps these bytes
    /// instead of serializing the message again.
    pub fn received_payload(&self) -> Option<ReceivedPayload<'_>> {
        match self.received_payload.as_ref()? {
            Kept::Json(text) => Some(ReceivedPayload::Json(text)),
            Kept::Msgpack(bytes) => Some(ReceivedPayload::Msgpack(bytes)),
        }
    }

    /// Serializes to the wire form, as JSON.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(Format::Json)
    }

    /// Serializes to the wire form, in `format`.
    pub fn encode_as(&self, format: Format) -> Vec<u8> {
        if format == Format::Msgpack {
            return self.encode_msgpack();
        }
        let payload =
            serde_json::value::to_raw_value(&self.message).expect("protocol messages serialize");
        let wire = WireOut {
            v: PROTOCOL_VERSION,
            device_id: &self.device_id,
            msg_id: &self.msg_id,
            ts_ms: self.ts_ms,
            kind: self.message.kind(),
            payload,
        };
        serde_json::to_vec(&wire).expect("envelopes always serialize")
    }

    /// A map of the same six keys, in the same order; the payload's structs are maps of
    /// their fields by name, as in JSON.
    fn encode_msgpack(&self) -> Vec<u8> {
        use rmp::encode::{write_map_len, write_str, write_uint};
        let mut out = Vec::with_capacity(256);
        let written: Result<(), rmp::encode::ValueWriteError> = (|| {
            write_map_len(&mut out, 6)?;
            write_str(&mut out, "v")?;
            write_uint(&mut out, u64::from(PROTOCOL_VERSION))?;
            write_str(&mut out, "device_id")?;
            write_str(&mut out, &self.device_id)?;
            write_str(&mut out, "msg_id")?;
            write_str(&mut out, &self.msg_id)?;
            write_str(&mut out, "ts_ms")?;
            write_uint(&mut out, self.ts_ms)?;
            write_str(&mut out, "kind")?;
            write_str(&mut out, self.message.kind())?;
            write_str(&mut out, "payload")?;
            Ok(())
        })();
        written.expect("writing to memory cannot fail");
        rmp_serde::encode::write_named(&mut out, &self.message)
            .expect("protocol messages serialize");
        out
    }

    /// The message id an undecodable envelope names, if it names a valid one at the top
    /// level: then the sender can be told that this message is refused for good.
    pub fn probe_msg_id(bytes: &[u8]) -> Option<String> {
        #[derive(Deserialize)]
        struct MsgIdProbe {
            msg_id: Option<String>,
        }
        let id = match Format::of(bytes) {
            Format::Json => serde_json::from_slice::<MsgIdProbe>(bytes).ok()?.msg_id?,
            Format::Msgpack => {
                let fields = crate::msgpack::map_fields(bytes, false).ok()?;
                let (_, at) = fields.into_iter().find(|(key, _)| *key == "msg_id")?;
                crate::msgpack::str_of(&bytes[at]).ok()?.to_string()
            }
        };
        Self::is_valid_msg_id(&id).then_some(id)
    }

    /// A message id is 1 to 64 visible ASCII characters.
    pub fn is_valid_msg_id(id: &str) -> bool {
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic())
    }

    /// Parses and validates the wire form, JSON or MessagePack ([`Format::of`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_as(bytes, Format::of(bytes))
    }

    /// Parses and validates the wire form in `format`.
    pub fn decode_as(bytes: &[u8], format: Format) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        match format {
            Format::Msgpack => Self::decode_msgpack(bytes),
            Format::Json => match Self::decode_scanned(bytes) {
                Some(envelope) => Ok(envelope),
                None => Self::decode_parsed(bytes),
            },
        }
    }

    /// The MessagePack form: a valid envelope spelled as [`Envelope::encode_as`] spells it
    /// in one pass ([`Envelope::decode_msgpack_quickly`]), anything else the long way. The
    /// two agree on every input (a property test checks it).
    fn decode_msgpack(bytes: &[u8]) -> Result<Self, DecodeError> {
        match Self::decode_msgpack_quickly(bytes) {
            Some(envelope) => Ok(envelope),
            None => Self::decode_msgpack_walked(bytes),
        }
    }

    /// The MessagePack form the long way: the envelope's map walked once (which also
    /// refuses NUL in a string and floats that are not finite, as JSON cannot spell them),
    /// its small fields read from their bytes, the payload read typed
    /// ([`crate::msgpack::from_slice`]). Checks come in the order of the JSON form's:
    /// version, envelope, identifiers, payload.
    fn decode_msgpack_walked(bytes: &[u8]) -> Result<Self, DecodeError> {
        use crate::msgpack::{ScanError, map_fields, str_of, uint_of};
        const KEYS: [&str; 6] = ["v", "device_id", "msg_id", "ts_ms", "kind", "payload"];
        // One walk that also checks the content; when the content is what fails, the walk
        // again without the check gives the fields, so that the version and the envelope
        // are judged first, as in JSON, and the content error comes after them.
        let (fields, content) = match map_fields(bytes, true) {
            Ok(fields) => (fields, None),
            Err(e @ (ScanError::Nul | ScanError::NonFinite)) => {
                (map_fields(bytes, false)?, Some(e))
            }
            Err(e) => return Err(e.into()),
        };
        let mut at: [Option<std::ops::Range<usize>>; 6] = Default::default();
        let mut misfit = None;
        for (key, range) in fields {
            match KEYS.iter().position(|k| *k == key) {
                Some(slot) if at[slot].is_none() => at[slot] = Some(range),
                Some(_) => misfit = Some(format!("duplicate field `{key}`")),
                None => {
                    let key: String = key.chars().take(64).collect();
                    misfit = Some(format!("unknown field `{key}`"));
                }
            }
        }
        let version = at[0].clone().ok_or(DecodeError::MissingVersion)?;
        match uint_of(&bytes[version]) {
            Ok(v) if v == u64::from(PROTOCOL_VERSION) => {}
            Ok(v) => return Err(DecodeError::UnsupportedVersion(v)),
            Err(_) => return Err(DecodeError::Envelope("version is not a number".into())),
        }
        if let Some(misfit) = misfit {
            return Err(DecodeError::Envelope(misfit));
        }
        let field = |slot: usize| {
            at[slot]
                .clone()
                .map(|r| &bytes[r])
                .ok_or_else(|| DecodeError::Envelope(format!("missing field `{}`", KEYS[slot])))
        };
        let bad = |name: &str, e: ScanError| DecodeError::Envelope(format!("`{name}`: {e}"));
        let device_id = str_of(field(1)?).map_err(|e| bad("device_id", e))?;
        let msg_id = str_of(field(2)?).map_err(|e| bad("msg_id", e))?;
        let ts_ms = uint_of(field(3)?).map_err(|e| bad("ts_ms", e))?;
        let kind = str_of(field(4)?).map_err(|e| bad("kind", e))?;
        let payload = field(5)?;
        if !is_valid_identifier(device_id) {
            return Err(DecodeError::BadDeviceId(
                device_id.chars().take(64).collect(),
            ));
        }
        if !Self::is_valid_msg_id(msg_id) {
            return Err(DecodeError::BadMessageId);
        }
        if let Some(e) = content {
            return Err(e.into());
        }
        let message = Message::decode_payload(kind, ReceivedPayload::Msgpack(payload))?;
        Ok(Envelope {
            device_id: device_id.to_string(),
            msg_id: msg_id.to_string(),
            ts_ms,
            message,
            received_payload: Some(Kept::Msgpack(Arc::from(payload))),
        })
    }

    /// A valid envelope spelled as [`Envelope::encode_as`] spells it (its six keys in that
    /// order, the payload last), read in one pass: the payload is read typed from where its
    /// key ends to the end of the bytes, by [`crate::msgpack::read_quickly`], which refuses
    /// NUL and non-finite floats as the walk would, so the payload is not walked first (a
    /// fifth of the decode's instructions). `None` for anything else, which [`Envelope::decode_msgpack`]'s
    /// walk then decodes or explains.
    fn decode_msgpack_quickly(bytes: &[u8]) -> Option<Self> {
        use crate::msgpack::{str_of, uint_of, value_end};
        let (&0x86, _) = bytes.split_first()? else {
            return None;
        };
        let mut at = 1;
        // The value after the key `name`, walked with the checks of the long way.
        let mut field = |name: &str| -> Option<&[u8]> {
            let key_end = value_end(bytes, at, true).ok()?;
            if str_of(&bytes[at..key_end]).ok()? != name {
                return None;
            }
            at = value_end(bytes, key_end, true).ok()?;
            Some(&bytes[key_end..at])
        };
        let version = uint_of(field("v")?).ok()?;
        let device_id = str_of(field("device_id")?).ok()?;
        let msg_id = str_of(field("msg_id")?).ok()?;
        let ts_ms = uint_of(field("ts_ms")?).ok()?;
        let kind = str_of(field("kind")?).ok()?;
        let key_end = value_end(bytes, at, true).ok()?;
        if str_of(&bytes[at..key_end]).ok()? != "payload"
            || version != u64::from(PROTOCOL_VERSION)
            || !is_valid_identifier(device_id)
            || !Self::is_valid_msg_id(msg_id)
        {
            return None;
        }
        let payload = &bytes[key_end..];
        let message = Message::read_payload(kind, ReceivedPayload::Msgpack(payload), true).ok()?;
        Some(Envelope {
            device_id: device_id.to_string(),
            msg_id: msg_id.to_string(),
            ts_ms,
            message,
            received_payload: Some(Kept::Msgpack(Arc::from(payload))),
        })
    }

    /// A well-formed envelope of this version, with its payload read once: the fields are
    /// found by [`json_scan`](crate::json_scan), the small ones parsed from their text and
    /// the payload parsed typed. `None` for anything else, which [`Envelope::decode_parsed`]
    /// then decodes or explains; the two agree on every input (a property test checks it).
    fn decode_scanned(bytes: &[u8]) -> Option<Self> {
        const KEYS: [&[u8]; 6] = [b"v", b"device_id", b"msg_id", b"ts_ms", b"kind", b"payload"];
        let mut at: [Option<std::ops::Range<usize>>; 6] = Default::default();
        for (key, range) in crate::json_scan::object_fields(bytes)? {
            let slot = KEYS.iter().position(|k| *k == key)?;
            if at[slot].replace(range).is_some() {
                return None;
            }
        }
        let [
            Some(v),
            Some(device_id),
            Some(msg_id),
            Some(ts_ms),
            Some(kind),
            Some(payload),
        ] = at
        else {
            return None;
        };
        if serde_json::from_slice::<u32>(&bytes[v]).ok()? != PROTOCOL_VERSION {
            return None;
        }
        let device_id: std::borrow::Cow<'_, str> =
            serde_json::from_slice(&bytes[device_id]).ok()?;
        let msg_id: std::borrow::Cow<'_, str> = serde_json::from_slice(&bytes[msg_id]).ok()?;
        let ts_ms: u64 = serde_json::from_slice(&bytes[ts_ms]).ok()?;
        let kind: std::borrow::Cow<'_, str> = serde_json::from_slice(&bytes[kind]).ok()?;
        let payload = std::str::from_utf8(&bytes[payload]).ok()?;
        if !is_valid_identifier(&device_id)
            || !Self::is_valid_msg_id(&msg_id)
            || has_escaped_nul(payload.as_bytes())
        {
            return None;
        }
        let message = Message::decode_payload(&kind, ReceivedPayload::Json(payload)).ok()?;
        Some(Envelope {
            device_id: device_id.into_owned(),
            msg_id: msg_id.into_owned(),
            ts_ms,
            message,
            received_payload: Some(Kept::Json(Arc::from(payload))),
        })
    }

    /// [`Envelope::decode`] by serde_json alone: the envelope with its payload's text, then
    /// the payload typed, and every error in the order the checks come.
    fn decode_parsed(bytes: &[u8]) -> Result<Self, DecodeError> {
        // One parse for a well-formed envelope of this version; anything else is parsed
        // again, version first, so that the error says what is wrong in the right order.
        // (serde would also read a struct from a JSON array: only objects take the fast path.)
        let is_object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let wire = match serde_json::from_slice::<WireIn<'_>>(bytes) {
            Ok(wire) if is_object && wire.v == PROTOCOL_VERSION => wire,
            _ => return Err(Self::diagnose(bytes)),
        };
        if !is_valid_identifier(&wire.device_id) {
            return Err(DecodeError::BadDeviceId(
                wire.device_id.chars().take(64).collect(),
            ));
        }
        if !Self::is_valid_msg_id(&wire.msg_id) {
            return Err(DecodeError::BadMessageId);
        }
        if has_escaped_nul(wire.payload.get().as_bytes()) {
            return Err(DecodeError::NulCharacter);
        }
        let message =
            Message::decode_payload(&wire.kind, ReceivedPayload::Json(wire.payload.get()))?;
        Ok(Envelope {
            device_id: wire.device_id.into_owned(),
            msg_id: wire.msg_id.into_owned(),
            ts_ms: wire.ts_ms,
            message,
            received_payload: Some(Kept::Json(Arc::from(wire.payload.get()))),
        })
    }
}

impl Envelope {
    /// Why `bytes` is not an envelope of this protocol version.
    #[cold]
    fn diagnose(bytes: &[u8]) -> DecodeError {
        let probe: VersionProbe = match serde_json::from_slice(bytes) {
            Ok(p) => p,
            Err(e) => return DecodeError::NotJson(e.to_string()),
        };
        match probe.v {
            None => DecodeError::MissingVersion,
            Some(v) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {
                match serde_json::from_slice::<WireIn<'_>>(bytes) {
                    Err(e) => DecodeError::Envelope(e.to_string()),
                    // Not reached: a probe reads only objects, and such an envelope
                    // decodes on the first parse.
                    Ok(_) => DecodeError::Envelope("unreadable envelope".into()),
                }
            }
            Some(v) => match v.as_u64() {
                Some(n) => DecodeError::UnsupportedVersion(n),
                None => DecodeError::Envelope(format!("version `{v}` is not a number")),
            },
        }
    }
}

/// True when JSON text holds a `\u0000` escape (a NUL in some string). Raw control
/// characters are already refused by the JSON parser; stores such as PostgreSQL cannot
/// keep a NUL in text, so it is refused here, where the error is clear.
fn has_escaped_nul(json: &[u8]) -> bool {
    if !json.contains(&b'\\') {
        return false;
    }
    let mut backslashes = 0usize;
    for (i, &b) in json.iter().enumerate() {
        if b == b'\\' {
            backslashes += 1;
            continue;
        }
        if backslashes % 2 == 1 && b == b'u' && json[i + 1..].starts_with(b"0000") {
            return true;
        }
        backslashes = 0;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::FeatureWindow;

    #[test]
    fn a_sample_file_travels_in_chunks_and_is_put_back_together() {
        let file: Vec<u8> = (0..SAMPLE_CHUNK_BYTES * 2 + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let model = Some(ModelRef {
            name: "m".into(),
            version: 2,
        });
        let chunks = SampleChunk::split(7, 42, model, 9, &file);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.count == 3 && c.rows == 9));
        for chunk in &chunks {
            let bytes = Envelope::new("d", "m1", 1, Message::SampleChunk(chunk.clone())).encode();
            assert!(bytes.len() < MAX_MESSAGE_BYTES, "{}", bytes.len());
            let back = Envelope::decode(&bytes).unwrap();
            assert_eq!(back.message, Message::SampleChunk(chunk.clone()));
        }
        let pieces: Vec<Vec<u8>> = chunks.iter().map(|c| c.bytes().unwrap()).collect();
        let joined = join_sample_chunks(&pieces, chunks[0].total_bytes, &chunks[0].sha256);
        assert_eq!(joined.unwrap(), file);

        // An empty file is one empty piece.
        let empty = SampleChunk::split(7, 42, None, 0, b"");
        assert_eq!(empty.len(), 1);
        assert_eq!(
            join_sample_chunks(&[empty[0].bytes().unwrap()], 0, &empty[0].sha256).unwrap(),
            b""
        );
    }

    #[test]
    fn a_tampered_or_misshapen_sample_chunk_is_refused() {
        let file = vec![b'x'; SAMPLE_CHUNK_BYTES + 10];
        let chunks = SampleChunk::split(1, 1, None, 1, &file);
        let mut short = chunks[1].clone();
        short.data = "eHg=".into(); // two bytes where ten belong
        assert!(short.bytes().unwrap_err().contains("holds 2 bytes"));
        let mut beyond = chunks[1].clone();
        beyond.index = 2;
        assert!(beyond.bytes().is_err());
        let mut miscounted = chunks[0].clone();
        miscounted.count = 5;
        assert!(miscounted.bytes().unwrap_err().contains("expected 2"));
        let mut garbage = chunks[0].clone();
        garbage.data = "not base64!".into();
        assert!(garbage.bytes().unwrap_err().contains("base64"));
        let failed = SampleChunk {
            error: Some("no sample".into()),
            count: 0,
            ..chunks[0].clone()
        };
        assert!(failed.bytes().is_err());

        let mut pieces: Vec<Vec<u8>> = chunks.iter().map(|c| c.bytes().unwrap()).collect();
        pieces[1][0] = b'y';
        let err = join_sample_chunks(&pieces, file.len() as u64, &chunks[0].sha256).unwrap_err();
        assert!(err.contains("SHA-256"), "{err}");
        let err =
            join_sample_chunks(&pieces[..1], file.len() as u64, &chunks[0].sha256).unwrap_err();
        assert!(err.contains("bytes"), "{err}");
    }

    fn status() -> Message {
        Message::Status(DeviceStatus {
            online: true,
            agent_version: "0.1.0".into(),
            model: Some(ModelRef {
                name: "vibration".into(),
                version: 3,
            }),
            uptime_s: 12,
            inferences: 100,
            errors: 0,
            malformed_messages: 0,
            outbox: OutboxStatus::default(),
            trust_version: 2,
        })
    }

    fn summary() -> Message {
        Message::DriftSummary(DriftSummary {
            model: ModelRef {
                name: "vibration".into(),
                version: 3,
            },
            window_seq: 7,
            stats: WindowStats {
                samples: 2,
                start_ms: 1,
                end_ms: 2,
                features: vec![FeatureWindow {
                    name: "rms".into(),
                    counts: vec![0, 1, 1],
                    nan: 0,
                    psi: 0.5,
                    ..FeatureWindow::default()
                }],
                psi_max: 0.5,
                predictions: vec![2],
                ..WindowStats::default()
            },
        })
    }

    #[test]
    fn every_kind_round_trips() {
        let deploy = Message::DeploymentStatus(DeploymentStatus {
            rollout_id: Some(4),
            command_seq: 9,
            model: None,
            stage: DeployStage::Rejected,
            detail: Some("expired".into()),
        });
        let receipt = Message::Receipt(Receipt {
            stored: vec!["a".into()],
            rejected: vec![RejectedMessage {
                msg_id: "b".into(),
                reason: "bad".into(),
            }],
        });
        let request = Message::BundleRequest(BundleRequest {
            bundle_sha256: "ab".repeat(32),
            offset: 0,
            length: 10,
        });
        let chunks = SampleChunk::split(7, 42, None, 3, b"abc\0def");
        let sample = Message::SampleChunk(chunks[0].clone());
        for message in [status(), summary(), deploy, receipt, request, sample] {
            let e = Envelope::new("dev-1", "m-1", 1_700_000_000_000, message);
            assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
            let packed = e.encode_as(Format::Msgpack);
            assert_eq!(Format::of(&packed), Format::Msgpack);
            assert_eq!(Envelope::decode(&packed).unwrap(), e);
            assert_eq!(Envelope::probe_msg_id(&packed).as_deref(), Some("m-1"));
        }
    }

    /// A drift summary as the agent makes one, with every field the protocol has.
    fn full_summary() -> DriftSummary {
        use crate::drift::{DriftWindow, ReferenceProfile, Residuals};
        let names = vec!["rms".to_string(), "peak".to_string()];
        let columns: Vec<Vec<f64>> = (0..2)
            .map(|c| {
                (0..500)
                    .map(|i| ((i * 37 + c * 11) % 97) as f64 / 7.0)
                    .collect()
            })
            .collect();
        let profile = ReferenceProfile::from_columns(&names, &columns, 10).unwrap();
        let mut window = DriftWindow::new(profile, 1_000);
        for i in 0..300 {
            let row = [(i % 89) as f32 / 6.0 + 1.5, (i % 53) as f32 / 5.0 - 3.0];
            window.observe(&row, Some(i % 3)).unwrap();
            window.observe_latency(0.3 * i as f64);
            window.observe_label(i % 3, (i + 1) % 3);
        }
        window.observe_errors(2);
        let mut stats = window.finish(61_000);
        stats.predicted_value = Some(Box::new(stats.features[1].clone()));
        stats.residuals = Some(Residuals {
            count: 3,
            sum: -1.5,
            sum_abs: 2.0,
            sum_sq: 4.25,
        });
        (stats.mae, stats.rmse) = (Some(0.7), Some(1.1));
        (stats.confidence_alert, stats.prediction_drift) = (true, true);
        DriftSummary {
            model: ModelRef {
                name: "vibration".into(),
                version: 70_000,
            },
            window_seq: u64::MAX,
            stats,
        }
    }

    /// The payload of each kind of message as MessagePack.
    fn packed_payloads() -> Vec<(&'static str, Vec<u8>)> {
        let (Message::Status(status), Message::DriftSummary(summary)) = (status(), summary())
        else {
            unreachable!()
        };
        fn packed(value: &impl Serialize) -> Vec<u8> {
            rmp_serde::to_vec_named(value).unwrap()
        }
        vec![
            ("status", packed(&status)),
            ("drift_summary", packed(&summary)),
            ("drift_summary", packed(&full_summary())),
            (
                "receipt",
                packed(&Receipt {
                    stored: vec!["m-1".into(), "m-2".into()],
                    rejected: vec![RejectedMessage {
                        msg_id: "m-3".into(),
                        reason: "bad".into(),
                    }],
                }),
            ),
            (
                "sample_chunk",
                packed(&SampleChunk::split(7, 42, None, 3, b"abc\0def")[0]),
            ),
            (
                "bundle_request",
                packed(&BundleRequest {
                    bundle_sha256: "ab".repeat(32),
                    offset: 70_000,
                    length: 10,
                }),
            ),
            (
                "bundle_chunk",
                packed(&BundleChunk::cut(&"cd".repeat(32), b"0123456789", 5, 100_000)[0]),
            ),
        ]
    }

    /// Reads `bytes` as `kind`'s payload quickly and with rmp-serde; when the quick read
    /// gives a value, rmp-serde gives the same one.
    fn reads_as_rmp_serde_does(kind: &str, bytes: &[u8]) -> bool {
        fn same<T: for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> bool {
            let Some(quick) = crate::msgpack::read_quickly::<T>(bytes) else {
                return false;
            };
            assert_eq!(
                rmp_serde::from_slice::<T>(bytes).ok().as_ref(),
                Some(&quick),
                "{bytes:02x?}"
            );
            true
        }
        match kind {
            "status" => same::<DeviceStatus>(bytes),
            "drift_summary" => same::<DriftSummary>(bytes),
            "receipt" => same::<Receipt>(bytes),
            "sample_chunk" => same::<SampleChunk>(bytes),
            "bundle_request" => same::<BundleRequest>(bytes),
            "bundle_chunk" => same::<BundleChunk>(bytes),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn the_one_pass_messagepack_decode_takes_what_devices_send_and_agrees_with_the_walk() {
        let mut envelopes: Vec<Vec<u8>> =
            [status(), summary(), Message::DriftSummary(full_summary())]
                .into_iter()
                .map(|m| Envelope::new("dev-1", "m-1", 7, m).encode_as(Format::Msgpack))
                .collect();
        for bytes in &envelopes {
            assert!(Envelope::decode_msgpack_quickly(bytes).is_some());
        }
        // NUL and a float that is not finite, in the payload: refused either way.
        let mut nul = status();
        if let Message::Status(s) = &mut nul {
            s.agent_version = "0.1\0".into();
        }
        let mut nan = full_summary();
        nan.stats.features[0].moments.mean = f64::NAN;
        for m in [nul, Message::DriftSummary(nan)] {
            let bytes = Envelope::new("dev-1", "m-1", 7, m).encode_as(Format::Msgpack);
            assert!(Envelope::decode_msgpack_quickly(&bytes).is_none());
            assert!(Envelope::decode(&bytes).is_err());
            envelopes.push(bytes);
        }
        // Any byte mostly breaks the structure; small integers mostly change a count.
        let every_byte: Vec<u8> = (0..=255).collect();
        let fixints: Vec<u8> = (0..0x80).collect();
        for (alphabet, least) in [(every_byte, 20), (fixints, 40)] {
            let one_pass = std::sync::atomic::AtomicUsize::new(0);
            mutations(&envelopes, &alphabet, |bytes| {
                if let Some(quick) = Envelope::decode_msgpack_quickly(bytes) {
                    one_pass.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let walked = Envelope::decode_msgpack_walked(bytes).unwrap();
                    // As text, which NaN equals.
                    assert_eq!(format!("{quick:?}"), format!("{walked:?}"));
                }
            });
            let one_pass = one_pass.into_inner();
            assert!(one_pass > least && one_pass < 3000, "{one_pass}");
        }
    }

    #[test]
    fn the_quick_messagepack_read_takes_what_devices_send_and_reads_it_as_rmp_serde_does() {
        let payloads = packed_payloads();
        for (kind, bytes) in &payloads {
            // Without this, every summary would take rmp-serde's slower road unnoticed.
            assert!(
                reads_as_rmp_serde_does(kind, bytes),
                "{kind} left to rmp-serde"
            );
        }
        // The envelope's decoder takes that road.
        let e = Envelope::new("dev-1", "m-1", 7, Message::DriftSummary(full_summary()));
        let decoded = Envelope::decode(&e.encode_as(Format::Msgpack)).unwrap();
        let Some(ReceivedPayload::Msgpack(bytes)) = decoded.received_payload() else {
            panic!("no bytes kept")
        };
        let read = rmp_serde::from_slice(bytes).map(Message::DriftSummary);
        assert_eq!(read.unwrap(), decoded.message);
        // Damaged payloads: whatever the quick read takes, rmp-serde reads alike; what it
        // does not, rmp-serde answers, through `from_slice`.
        fn agrees<T: for<'de> Deserialize<'de> + std::fmt::Debug>(bytes: &[u8]) {
            // As text, which NaN equals.
            let answer = |r: Result<T, rmp_serde::decode::Error>| {
                format!("{:?}", r.map_err(|e| e.to_string()))
            };
            assert_eq!(
                answer(crate::msgpack::from_slice::<T>(bytes)),
                answer(rmp_serde::from_slice::<T>(bytes))
            );
        }
        let kinds: std::collections::BTreeSet<&str> = payloads.iter().map(|(k, _)| *k).collect();
        let texts: Vec<Vec<u8>> = payloads.into_iter().map(|(_, b)| b).collect();
        // Any byte mostly breaks the structure; small integers mostly change a count.
        let every_byte: Vec<u8> = (0..=255).collect();
        let fixints: Vec<u8> = (0..0x80).collect();
        for alphabet in [every_byte, fixints] {
            let quick_reads = std::sync::atomic::AtomicUsize::new(0);
            mutations(&texts, &alphabet, |bytes| {
                for kind in &kinds {
                    if reads_as_rmp_serde_does(kind, bytes) {
                        quick_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                agrees::<DeviceStatus>(bytes);
                agrees::<DriftSummary>(bytes);
                agrees::<Receipt>(bytes);
                agrees::<SampleChunk>(bytes);
                agrees::<BundleRequest>(bytes);
                agrees::<BundleChunk>(bytes);
            });
            // The mutations reach both roads.
            let quick_reads = quick_reads.into_inner();
            assert!(quick_reads > 50 && quick_reads < 3000, "{quick_reads}");
        }
    }

    /// The JSON envelope `text` spelled as MessagePack, key for key (duplicate keys kept).
    fn transcoded(text: &[u8]) -> Option<Vec<u8>> {
        let fields = crate::json_scan::object_fields(text)?;
        let mut out = Vec::new();
        rmp::encode::write_map_len(&mut out, fields.len() as u32).unwrap();
        for (key, range) in fields {
            let key: String = serde_json::from_slice(&[b"\"", key, b"\""].concat()).ok()?;
            rmp::encode::write_str(&mut out, &key).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&text[range]).ok()?;
            rmp_serde::encode::write_named(&mut out, &value).unwrap();
        }
        Some(out)
    }

    #[test]
    fn a_messagepack_envelope_decodes_as_its_json_spelling_does() {
        for text in spellings() {
            let Some(packed) = transcoded(&text) else {
                continue;
            };
            let (json, msgpack) = (Envelope::decode(&text), Envelope::decode(&packed));
            match (&json, &msgpack) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                // serde_json's own reading of a duplicate key.
                (Err(DecodeError::NotJson(_)), Err(_)) => {}
                (Err(a), Err(b)) => assert_eq!(
                    std::mem::discriminant(a),
                    std::mem::discriminant(b),
                    "{a} / {b}"
                ),
                _ => panic!("{}: {json:?} / {msgpack:?}", String::from_utf8_lossy(&text)),
            }
        }
    }

    #[test]
    fn a_damaged_messagepack_envelope_gets_an_error_never_a_panic() {
        let texts: Vec<Vec<u8>> = [status(), summary()]
            .into_iter()
            .map(|m| Envelope::new("dev-1", "m-1", 7, m).encode_as(Format::Msgpack))
            .collect();
        let every_byte: Vec<u8> = (0..=255).collect();
        mutations(&texts, &every_byte, |bytes| {
            // Whatever decodes travels again in both spellings; scores are rounded to six
            // digits as they are written, so the second writing says what the first did.
            if let Ok(e) = Envelope::decode_as(bytes, Format::Msgpack) {
                let once = Envelope::decode(&e.encode_as(Format::Msgpack)).unwrap();
                let twice = Envelope::decode(&once.encode_as(Format::Msgpack)).unwrap();
                assert_eq!(once, twice);
                Envelope::decode(&e.encode()).unwrap();
            }
        });
    }

    #[test]
    fn messagepack_refuses_what_json_cannot_say() {
        let packed = |value: serde_json::Value| rmp_serde::to_vec_named(&value).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&Envelope::new("d", "m", 1, summary()).encode()).unwrap();
        v["payload"]["stats"]["features"][0]["name"] = "a\u{0}b".into();
        assert_eq!(
            Envelope::decode(&packed(v.clone())),
            Err(DecodeError::NulCharacter)
        );
        // A NaN where a score goes: JSON has no spelling for it, MessagePack has.
        v["payload"]["stats"]["features"][0]["name"] = "rms".into();
        let mut nan = packed(v.clone());
        let at = nan
            .windows(4)
            .position(|w| w == [0xa3, b'p', b's', b'i'])
            .unwrap()
            + 4;
        assert_eq!(nan[at], 0xcb, "psi is an f64");
        nan[at + 1..at + 9].copy_from_slice(&f64::NAN.to_be_bytes());
        assert!(matches!(
            Envelope::decode(&nan),
            Err(DecodeError::MsgPack(_))
        ));
        // Bytes after the map, a missing field, an unknown one, a version of the future.
        let mut trailing = packed(v.clone());
        trailing.push(0xc0);
        assert!(matches!(
            Envelope::decode(&trailing),
            Err(DecodeError::MsgPack(_))
        ));
        let mut missing = v.clone();
        missing.as_object_mut().unwrap().remove("payload");
        assert!(matches!(
            Envelope::decode(&packed(missing)),
            Err(DecodeError::Envelope(_))
        ));
        let mut unknown = v.clone();
        unknown["x"] = 1.into();
        assert!(matches!(
            Envelope::decode(&packed(unknown)),
            Err(DecodeError::Envelope(_))
        ));
        let mut future = v.clone();
        future["v"] = 2.into();
        future["x"] = 1.into();
        assert_eq!(
            Envelope::decode(&packed(future)),
            Err(DecodeError::UnsupportedVersion(2))
        );
        // The version comes before the content too: a NaN in an envelope of version 2.
        let mut nan_future = nan.clone();
        let v_at = nan_future
            .windows(2)
            .position(|w| w == [0xa1, b'v'])
            .unwrap()
            + 2;
        assert_eq!(nan_future[v_at], 0x01);
        nan_future[v_at] = 0x02;
        assert_eq!(
            Envelope::decode(&nan_future),
            Err(DecodeError::UnsupportedVersion(2))
        );
        future = v.clone();
        future.as_object_mut().unwrap().remove("v");
        assert_eq!(
            Envelope::decode(&packed(future)),
            Err(DecodeError::MissingVersion)
        );
        let mut wrong = v.clone();
        wrong["payload"]["window_seq"] = "seven".into();
        assert!(matches!(
            Envelope::decode(&packed(wrong)),
            Err(DecodeError::Payload { .. })
        ));
    }

    #[test]
    fn a_drift_summary_in_messagepack_is_smaller_than_in_json() {
        let e = Envelope::new(
            "dev-1",
            "0192f4c8-8d3e-7a51-9c3e-2f1a5b6c7d8e",
            7,
            summary(),
        );
        let (json, packed) = (e.encode().len(), e.encode_as(Format::Msgpack).len());
        assert!(packed < json, "{packed} B against {json} B");
    }

    /// Envelopes as other senders may spell them, and as they should not.
    fn spellings() -> Vec<Vec<u8>> {
        let mut texts: Vec<Vec<u8>> = [status(), summary()]
            .into_iter()
            .map(|m| Envelope::new("dev-1", "m-1", 7, m).encode())
            .collect();
        let payload = r#"{"stored":["a\"b","é"],"rejected":[{"msg_id":"c","reason":"x,}]"}]}"#;
        for text in [
            // The payload first, spaces everywhere, escapes in strings.
            format!(
                r#" {{ "payload" : {payload} , "kind":"receipt", "ts_ms" : 3, "msg_id":"m\u002d2", "device_id":"dev-1","v":1 }}"#
            ),
            format!(r#"{{"v":1,"device_id":"dev-1","msg_id":"m","ts_ms":3,"kind":"receipt","payload":{payload},"x":1}}"#),
            format!(r#"{{"v":1,"v":1,"device_id":"dev-1","msg_id":"m","ts_ms":3,"kind":"receipt","payload":{payload}}}"#),
            format!(r#"{{"v":2,"device_id":"dev-1","msg_id":"m","ts_ms":3,"kind":"receipt","payload":{payload}}}"#),
            format!(r#"{{"\u0076":1,"device_id":"dev-1","msg_id":"m","ts_ms":3,"kind":"receipt","payload":{payload}}}"#),
            r#"{"v":1,"device_id":"dev-1","msg_id":"m","ts_ms":3,"kind":"receipt","payload":{"stored":["\u0000"]}}"#.into(),
            r#"{"v":1,"device_id":"dev 1","msg_id":"m","ts_ms":3,"kind":"receipt","payload":{}}"#.into(),
            r#"{"v":1,"device_id":"dev-1","msg_id":"m","ts_ms":-3,"kind":"receipt","payload":{}}"#.into(),
            r#"{"v":1,"device_id":"dev-1","msg_id":"m","ts_ms":3,"kind":"receipt","payload":[]}"#.into(),
        ] {
            texts.push(text.into_bytes());
        }
        texts
    }

    /// The scan's fast path and serde_json's full parse decode every input alike: the same
    /// envelope with the same payload text, or the same error.
    fn decodes_alike(bytes: &[u8]) {
        match (Envelope::decode(bytes), Envelope::decode_parsed(bytes)) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b);
                assert_eq!(a.received_payload(), b.received_payload());
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!(
                "{}: scanned {a:?}, parsed {b:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    #[test]
    fn the_scanned_decode_takes_well_formed_envelopes_and_agrees_with_serde_json() {
        let texts = spellings();
        for (i, text) in texts.iter().enumerate() {
            // Well-formed envelopes take the scan (the first three spellings).
            assert_eq!(Envelope::decode_scanned(text).is_some(), i < 3, "{i}");
            decodes_alike(text);
        }
        mutations(&texts, b"{}[]\",:\\ 0a-1.e", decodes_alike);
    }

    /// Runs `check` on 3 000 copies of `texts`, each with one to three bytes removed,
    /// inserted or replaced (from `alphabet`), or cut short.
    fn mutations(texts: &[Vec<u8>], alphabet: &[u8], check: impl Fn(&[u8])) {
        let ops = proptest::collection::vec((0usize..4, 0usize..4096, 0..alphabet.len()), 1..4);
        // A fixed seed: the same inputs every run, so that a failure can be run again.
        let mut runner = proptest::test_runner::TestRunner::new_with_rng(
            proptest::test_runner::Config::with_cases(3000),
            proptest::test_runner::TestRng::deterministic_rng(
                proptest::test_runner::RngAlgorithm::ChaCha,
            ),
        );
        runner
            .run(&(0..texts.len(), ops), |(which, ops)| {
                let mut bytes = texts[which].clone();
                for (op, at, with) in ops {
                    let at = at % (bytes.len() + 1);
                    match op {
                        0 if at < bytes.len() => {
                            bytes.remove(at);
                        }
                        1 => bytes.insert(at, alphabet[with]),
                        2 if at < bytes.len() => bytes[at] = alphabet[with],
                        _ => bytes.truncate(at),
                    }
                }
                check(&bytes);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn the_wire_form_is_the_documented_one() {
        let bytes = Envelope::new("dev-1", "m-1", 5, status()).encode();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["kind"], "status");
        assert_eq!(v["device_id"], "dev-1");
        assert_eq!(v["payload"]["model"]["version"], 3);
    }

    #[test]
    fn a_decoded_envelope_keeps_its_payload_text() {
        let made = Envelope::new("dev-1", "m-1", 5, summary());
        assert_eq!(made.received_payload(), None);
        // Spelled with spaces, as another implementation may send it.
        let spaced = format!(
            r#"{{"v":1,"device_id":"dev-1","msg_id":"m-1","ts_ms":5,"kind":"drift_summary","payload": {} }}"#,
            serde_json::to_string_pretty(&made.message).unwrap()
        );
        let got = decode_str(&spaced).unwrap();
        // The same message, whatever its spelling; the text is the one received.
        assert_eq!(got, made);
        let Some(ReceivedPayload::Json(text)) = got.received_payload() else {
            panic!("no text kept")
        };
        assert!(text.starts_with("{\n"), "{text}");
        let Message::DriftSummary(s) = &got.message else {
            panic!("{got:?}")
        };
        assert_eq!(&serde_json::from_str::<DriftSummary>(text).unwrap(), s);
        // MessagePack keeps its bytes.
        let packed = made.encode_as(Format::Msgpack);
        let got = Envelope::decode(&packed).unwrap();
        let Some(ReceivedPayload::Msgpack(bytes)) = got.received_payload() else {
            panic!("no bytes kept")
        };
        assert!(packed.ends_with(bytes));
        assert_eq!(&rmp_serde::from_slice::<DriftSummary>(bytes).unwrap(), s);
    }

    fn decode_str(s: &str) -> Result<Envelope, DecodeError> {
        Envelope::decode(s.as_bytes())
    }

    #[test]
    fn malformed_input_gets_a_specific_error() {
        assert!(matches!(
            decode_str("not json"),
            Err(DecodeError::NotJson(_))
        ));
        assert!(matches!(decode_str("[1,2]"), Err(DecodeError::NotJson(_))));
        // An envelope's fields as an array, which serde would read into a struct.
        let array = r#"[1,"d1","m1",0,"status",{"online":true}]"#;
        assert!(matches!(decode_str(array), Err(DecodeError::NotJson(_))));
        assert!(matches!(
            decode_str(&format!(" \n{array}")),
            Err(DecodeError::NotJson(_))
        ));
        assert_eq!(decode_str("{}"), Err(DecodeError::MissingVersion));
        assert_eq!(
            decode_str(r#"{"v":2,"anything":true}"#),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert!(matches!(
            decode_str(r#"{"v":"1"}"#),
            Err(DecodeError::Envelope(_))
        ));
        assert!(matches!(
            decode_str(r#"{"v":1,"device_id":"d","msg_id":"m","ts_ms":1,"kind":"status"}"#),
            Err(DecodeError::Envelope(_))
        ));
        assert_eq!(
            decode_str(
                r#"{"v":1,"device_id":"d","msg_id":"m","ts_ms":1,"kind":"reboot","payload":{}}"#
            ),
            Err(DecodeError::UnknownKind("reboot".into()))
        );
        assert!(matches!(
            decode_str(
                r#"{"v":1,"device_id":"d","msg_id":"m","ts_ms":1,"kind":"status","payload":{"online":true}}"#
            ),
            Err(DecodeError::Payload { kind: "status", .. })
        ));
        assert_eq!(
            decode_str(
                r#"{"v":1,"device_id":"a/b","msg_id":"m","ts_ms":1,"kind":"status","payload":{}}"#
            ),
            Err(DecodeError::BadDeviceId("a/b".into()))
        );
        assert_eq!(
            decode_str(
                r#"{"v":1,"device_id":"d","msg_id":"","ts_ms":1,"kind":"status","payload":{}}"#
            ),
            Err(DecodeError::BadMessageId)
        );
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            Envelope::decode(&big),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn nul_characters_and_odd_message_ids_are_refused() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&Envelope::new("d", "m", 1, status()).encode()).unwrap();
        v["payload"]["agent_version"] = "a\u{0}b".into();
        assert_eq!(
            Envelope::decode(v.to_string().as_bytes()),
            Err(DecodeError::NulCharacter)
        );
        // An escaped backslash followed by "u0000" is text, not a NUL.
        v["payload"]["agent_version"] = "a\\u0000".into();
        assert!(Envelope::decode(v.to_string().as_bytes()).is_ok());
        for id in ["a b", "a\u{7}", "é"] {
            let e = Envelope::new("d", id, 1, status()).encode();
            assert_eq!(
                Envelope::decode(&e),
                Err(DecodeError::BadMessageId),
                "{id:?}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused_in_envelope_and_payload() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&Envelope::new("d", "m", 1, status()).encode()).unwrap();
        v["extra"] = 1.into();
        assert!(matches!(
            Envelope::decode(v.to_string().as_bytes()),
            Err(DecodeError::Envelope(_))
        ));
        v.as_object_mut().unwrap().remove("extra");
        v["payload"]["extra"] = 1.into();
        assert!(matches!(
            Envelope::decode(v.to_string().as_bytes()),
            Err(DecodeError::Payload { .. })
        ));
    }

    #[test]
    fn bundle_pieces_cover_the_range_travel_and_are_checked() {
        let file: Vec<u8> = (0..(2 * BUNDLE_CHUNK_BYTES + 100) as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let sha = crate::sha256_hex(&file);
        let from = 10u64;
        let chunks = BundleChunk::cut(&sha, &file[10..], from, file.len() as u64);
        assert_eq!(chunks.len(), 3);
        let mut joined = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(chunk.offset, from + (i * BUNDLE_CHUNK_BYTES) as u64);
            assert_eq!(chunk.total_size, file.len() as u64);
            let bytes = Envelope::new("d", "m1", 1, Message::BundleChunk(chunk.clone())).encode();
            assert!(bytes.len() < MAX_MESSAGE_BYTES, "{} bytes", bytes.len());
            let back = Envelope::decode(&bytes).unwrap();
            assert_eq!(back.message, Message::BundleChunk(chunk.clone()));
            joined.extend(chunk.bytes().unwrap());
        }
        assert_eq!(joined, file[10..]);

        // A piece whose bytes do not match its digest, or that is too large or empty, is
        // refused; a failed answer carries its reason.
        let mut altered = chunks[0].clone();
        altered.data = chunks[1].data.clone();
        assert!(altered.bytes().unwrap_err().contains("SHA-256"));
        let big = vec![0u8; BUNDLE_CHUNK_BYTES + 1];
        let oversize = BundleChunk {
            sha256: crate::sha256_hex(&big),
            data: {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(&big)
            },
            ..chunks[0].clone()
        };
        assert!(oversize.bytes().unwrap_err().contains("bytes"));
        assert!(BundleChunk::cut(&sha, &[], 0, 0).is_empty());
        let failed = BundleChunk::failed(&sha, "no such bundle".into());
        assert_eq!(failed.bytes().unwrap_err(), "no such bundle");

        let request = Message::BundleRequest(BundleRequest {
            bundle_sha256: sha,
            offset: 0,
            length: MAX_BUNDLE_REQUEST_BYTES,
        });
        let bytes = Envelope::new("d", "m2", 1, request.clone()).encode();
        assert_eq!(Envelope::decode(&bytes).unwrap().message, request);
    }
}
