//! Batches: several envelopes of one device and one topic in a single MQTT payload,
//! optionally zstd-compressed.
//!
//! A batch is a header line, a newline (`\n`), then the body:
//!
//! ```text
//! {"v":1,"kind":"batch","device_id":"sim-001","count":3,"encoding":"zstd","bytes":2345}
//! <body>
//! ```
//!
//! The body, decoded according to `encoding` (`"zstd"`: one zstd frame; `"identity"`: as
//! is), is exactly `bytes` long and is an array of `count` envelopes, each exactly as it
//! would travel alone: a JSON array of JSON envelopes, or with `"format":"msgpack"` in the
//! header a MessagePack array of MessagePack envelopes. Each envelope keeps its own message
//! id, so receipts, duplicates and rejections are per envelope, never per batch. A payload
//! whose first line is not a batch header is a single envelope.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::protocol::{DecodeError, Envelope, Format, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

/// Most envelopes in one batch.
pub const MAX_BATCH_MESSAGES: usize = 1024;
/// Largest decoded body of a batch, in bytes. Bounds what a small compressed payload may
/// expand to.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// The header line is looked for in this many leading bytes.
const MAX_HEADER_BYTES: usize = 512;
/// The compression level: zstd's default, a good ratio at a small CPU cost.
const ZSTD_LEVEL: i32 = 3;

/// How a batch body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Identity,
    Zstd,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header<'a> {
    v: u32,
    kind: &'a str,
    device_id: &'a str,
    count: usize,
    encoding: Encoding,
    bytes: usize,
    /// Absent: JSON (the first batches had no other).
    #[serde(default, skip_serializing_if = "Format::is_json")]
    format: Format,
}

#[derive(Deserialize)]
struct KindProbe<'a> {
    #[serde(borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

/// An envelope of a batch that could not be decoded. Its message id, when it could be read,
/// lets the receiver tell the sender that this one message is refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    pub msg_id: Option<String>,
    pub error: DecodeError,
}

/// A decoded MQTT payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Single(Box<Envelope>),
    Batch {
        /// The device the header names; every envelope must be from it too.
        device_id: String,
        items: Vec<Result<Envelope, ItemError>>,
    },
}

/// Encodes already-encoded envelopes, all in one format (that of the first), as one batch.
pub fn encode(device_id: &str, envelopes: &[&[u8]], encoding: Encoding) -> Vec<u8> {
    let format = envelopes.first().map_or(Format::Json, |e| Format::of(e));
    assert!(
        envelopes.iter().all(|e| Format::of(e) == format),
        "a batch holds envelopes of one format"
    );
    let mut body = Vec::with_capacity(envelopes.iter().map(|e| e.len() + 1).sum::<usize>() + 5);
    match format {
        Format::Json => {
            body.push(b'[');
            for (i, e) in envelopes.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(e);
            }
            body.push(b']');
        }
        Format::Msgpack => {
            let count = u32::try_from(envelopes.len()).expect("a batch holds under 2^32 envelopes");
            rmp::encode::write_array_len(&mut body, count).expect("writing to memory");
            for e in envelopes {
                body.extend_from_slice(e);
            }
        }
    }
    let header = Header {
        v: PROTOCOL_VERSION,
        kind: "batch",
        device_id,
        count: envelopes.len(),
        encoding,
        bytes: body.len(),
        format,
    };
    let mut out = serde_json::to_vec(&header).expect("headers serialize");
    out.push(b'\n');
    match encoding {
        Encoding::Identity => out.extend_from_slice(&body),
        Encoding::Zstd => out.extend_from_slice(
            &zstd::bulk::compress(&body, ZSTD_LEVEL).expect("compressing to memory cannot fail"),
        ),
    }
    out
}

/// Decodes an MQTT payload: a single envelope or a batch.
pub fn decode(bytes: &[u8]) -> Result<Payload, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let head = &bytes[..bytes.len().min(MAX_HEADER_BYTES)];
    if Format::of(bytes).is_json()
        && let Some(nl) = head.iter().position(|&b| b == b'\n')
        && let Ok(KindProbe { kind: Some(kind) }) = serde_json::from_slice(&bytes[..nl])
        && kind == "batch"
    {
        return decode_batch(&bytes[..nl], &bytes[nl + 1..]);
    }
    Envelope::decode(bytes).map(|e| Payload::Single(Box::new(e)))
}

thread_local! {
    /// A zstd decompression context per thread: making one for each batch cost about as
    /// much as decompressing its body.
    static UNZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses one zstd frame of at most `capacity` bytes.
fn unzstd(body: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    UNZSTD.with_borrow_mut(|context| {
        let context = match context {
            Some(c) => c,
            None => context.insert(zstd::bulk::Decompressor::new()?),
        };
        context.decompress(body, capacity)
    })
}

fn decode_batch(header: &[u8], body: &[u8]) -> Result<Payload, DecodeError> {
    let bad = |reason: String| DecodeError::Batch(reason);
    let header: Header<'_> =
        serde_json::from_slice(header).map_err(|e| bad(format!("header: {e}")))?;
    if header.v != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(header.v.into()));
    }
    if !crate::is_valid_identifier(header.device_id) {
        return Err(DecodeError::BadDeviceId(
            header.device_id.chars().take(64).collect(),
        ));
    }
    if header.count == 0 || header.count > MAX_BATCH_MESSAGES {
        return Err(bad(format!(
            "count {} is not in 1..={MAX_BATCH_MESSAGES}",
            header.count
        )));
    }
    if header.bytes > MAX_BATCH_BYTES {
        return Err(DecodeError::TooLarge {
            size: header.bytes,
            max: MAX_BATCH_BYTES,
        });
    }
    let decoded;
    let body = match header.encoding {
        Encoding::Identity => body,
        Encoding::Zstd => {
            // The declared size caps the output: a body that expands further is an error,
            // never an allocation beyond the limit.
            decoded = unzstd(body, header.bytes).map_err(|e| bad(format!("zstd body: {e}")))?;
            &decoded
        }
    };
    if body.len() != header.bytes {
        return Err(bad(format!(
            "body is {} bytes, the header says {}",
            body.len(),
            header.bytes
        )));
    }
    if header.format == Format::Msgpack {
        // Walked without the checks of content (NUL, non-finite floats): those refuse the
        // one envelope that has them, when it is decoded, not the whole batch.
        let raw =
            crate::msgpack::array_items(body, false).map_err(|e| bad(format!("body: {e}")))?;
        let raw = raw.into_iter().map(|r| &body[r]).collect();
        return items(header, raw, Format::Msgpack);
    }
    // The items' text, found by a scan that does not parse them (each is parsed as an
    // envelope next). serde_json splits the body itself when the scan finds anything
    // unexpected or an item does not decode, so that a body that is not a JSON array is
    // refused whole, with serde_json's reason.
    let split = |body| -> Result<Vec<&[u8]>, DecodeError> {
        Ok(serde_json::from_slice::<Vec<&RawValue>>(body)
            .map_err(|e| bad(format!("body: {e}")))?
            .into_iter()
            .map(|item| item.get().as_bytes())
            .collect())
    };
    let raw: Vec<&[u8]> = match crate::json_scan::array_items(body) {
        Some(items) => items.into_iter().map(|r| &body[r]).collect(),
        None => split(body)?,
    };
    let decoded = items(header, raw, Format::Json)?;
    if let Payload::Batch { items, .. } = &decoded
        && items.iter().any(Result::is_err)
    {
        split(body)?;
    }
    Ok(decoded)
}

/// The batch of the envelopes `raw`, each decoded alone.
fn items(header: Header<'_>, raw: Vec<&[u8]>, format: Format) -> Result<Payload, DecodeError> {
    if raw.len() != header.count {
        return Err(DecodeError::Batch(format!(
            "body holds {} envelopes, the header says {}",
            raw.len(),
            header.count
        )));
    }
    let items = raw
        .into_iter()
        .map(|item| {
            Envelope::decode_as(item, format).map_err(|error| ItemError {
                msg_id: Envelope::probe_msg_id(item),
                error,
            })
        })
        .collect();
    Ok(Payload::Batch {
        device_id: header.device_id.to_string(),
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DeviceStatus, Message};

    fn envelope(id: &str) -> Envelope {
        Envelope::new(
            "dev-1",
            id,
            7,
            Message::Status(DeviceStatus {
                online: true,
                agent_version: "0.1.0".into(),
                uptime_s: 1,
                inferences: 2,
                ..DeviceStatus::default()
            }),
        )
    }

    fn encoded(ids: &[&str]) -> Vec<Vec<u8>> {
        ids.iter().map(|id| envelope(id).encode()).collect()
    }

    fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
        v.iter().map(Vec::as_slice).collect()
    }

    /// The items of `envelopes` sent as one batch and decoded.
    fn batch_items(envelopes: &[Vec<u8>], encoding: Encoding) -> Vec<Result<Envelope, ItemError>> {
        match decode(&encode("dev-1", &refs(envelopes), encoding)).unwrap() {
            Payload::Batch { items, .. } => items,
            single => panic!("not a batch: {single:?}"),
        }
    }

    #[test]
    fn batches_round_trip_in_both_encodings_and_single_envelopes_pass_through() {
        let items = encoded(&["a", "b", "c"]);
        for encoding in [Encoding::Identity, Encoding::Zstd] {
            let bytes = encode("dev-1", &refs(&items), encoding);
            let Payload::Batch { device_id, items } = decode(&bytes).unwrap() else {
                panic!("not a batch")
            };
            assert_eq!(device_id, "dev-1");
            let ids: Vec<String> = items.into_iter().map(|i| i.unwrap().msg_id).collect();
            assert_eq!(ids, ["a", "b", "c"]);
        }
        assert_eq!(
            decode(&envelope("x").encode()).unwrap(),
            Payload::Single(Box::new(envelope("x")))
        );
    }

    #[test]
    fn messagepack_batches_round_trip_and_say_so_in_their_header() {
        let items: Vec<Vec<u8>> = ["a", "b", "c"]
            .iter()
            .map(|id| envelope(id).encode_as(Format::Msgpack))
            .collect();
        for encoding in [Encoding::Identity, Encoding::Zstd] {
            let bytes = encode("dev-1", &refs(&items), encoding);
            let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
            let header: serde_json::Value = serde_json::from_slice(&bytes[..nl]).unwrap();
            assert_eq!(header["format"], "msgpack");
            let Payload::Batch { items, .. } = decode(&bytes).unwrap() else {
                panic!("not a batch")
            };
            let got: Vec<Envelope> = items.into_iter().map(Result::unwrap).collect();
            assert_eq!(got, [envelope("a"), envelope("b"), envelope("c")]);
        }
        // A JSON batch's header is as it always was: no `format`.
        let json = encode("dev-1", &refs(&encoded(&["a"])), Encoding::Identity);
        assert!(!String::from_utf8_lossy(&json).contains("format"));
    }

    #[test]
    fn a_bad_messagepack_envelope_is_named_and_a_bad_body_refused_whole() {
        let mut items: Vec<Vec<u8>> = vec![envelope("a").encode_as(Format::Msgpack)];
        // A NUL in a string: this envelope alone is refused, by its message id.
        let mut nul = envelope("b");
        let Message::Status(s) = &mut nul.message else {
            unreachable!()
        };
        s.agent_version = "0\0".into();
        items.push(nul.encode_as(Format::Msgpack));
        let got = batch_items(&items, Encoding::Zstd);
        assert!(got[0].is_ok());
        let err = got[1].as_ref().unwrap_err();
        assert_eq!(err.msg_id.as_deref(), Some("b"));
        assert_eq!(err.error, DecodeError::NulCharacter);
        // A body cut short, or not an array, is no batch of envelopes.
        let body = encode("dev-1", &refs(&items[..1]), Encoding::Identity);
        let body = &body[body.iter().position(|&b| b == b'\n').unwrap() + 1..];
        for bad in [&body[..body.len() - 1], &body[1..]] {
            let mut bytes = format!(
                r#"{{"v":1,"kind":"batch","device_id":"dev-1","count":1,"encoding":"identity","bytes":{},"format":"msgpack"}}"#,
                bad.len()
            )
            .into_bytes();
            bytes.push(b'\n');
            bytes.extend_from_slice(bad);
            assert!(matches!(decode(&bytes), Err(DecodeError::Batch(_))));
        }
    }

    #[test]
    #[should_panic(expected = "one format")]
    fn a_batch_of_two_formats_is_a_bug() {
        let items = [
            envelope("a").encode(),
            envelope("b").encode_as(Format::Msgpack),
        ];
        encode("dev-1", &refs(&items), Encoding::Identity);
    }

    #[test]
    fn the_header_is_one_json_line() {
        let bytes = encode("dev-1", &refs(&encoded(&["a"])), Encoding::Zstd);
        let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
        let header: serde_json::Value = serde_json::from_slice(&bytes[..nl]).unwrap();
        assert_eq!(header["kind"], "batch");
        assert_eq!(header["encoding"], "zstd");
        assert_eq!(header["count"], 1);
    }

    #[test]
    fn compression_pays_on_telemetry() {
        let items = encoded(&["a", "b", "c", "d", "e", "f", "g", "h"]);
        let plain: usize = items.iter().map(Vec::len).sum();
        let zstd = encode("dev-1", &refs(&items), Encoding::Zstd).len();
        assert!(zstd * 3 < plain, "{zstd} vs {plain}");
    }

    #[test]
    fn one_bad_envelope_is_named_and_the_others_survive() {
        let mut items = encoded(&["a"]);
        items.push(
            br#"{"v":1,"device_id":"dev-1","msg_id":"b","ts_ms":1,"kind":"nope","payload":{}}"#
                .to_vec(),
        );
        items.push(br#"{"msg_id":"bad id"}"#.to_vec());
        let items = batch_items(&items, Encoding::Identity);
        assert!(items[0].is_ok());
        let err = items[1].as_ref().unwrap_err();
        assert_eq!(err.msg_id.as_deref(), Some("b"));
        assert_eq!(err.error, DecodeError::UnknownKind("nope".into()));
        assert_eq!(items[2].as_ref().unwrap_err().msg_id, None);
    }

    #[test]
    fn a_body_that_is_not_a_json_array_of_values_is_refused_whole() {
        let mut items = encoded(&["a"]);
        // Brackets that the scan splits on, but no JSON value.
        items.push(b"{nope}".to_vec());
        let err = decode(&encode("dev-1", &refs(&items), Encoding::Identity)).unwrap_err();
        let DecodeError::Batch(reason) = err else {
            panic!("{err:?}")
        };
        assert!(reason.starts_with("body: "), "{reason}");
    }

    #[test]
    fn lying_or_hostile_batches_are_refused() {
        let items = encoded(&["a", "b"]);
        let good = encode("dev-1", &refs(&items), Encoding::Zstd);
        let nl = good.iter().position(|&b| b == b'\n').unwrap();
        let with_header = |h: &str| {
            let mut b = h.as_bytes().to_vec();
            b.push(b'\n');
            b.extend_from_slice(&good[nl + 1..]);
            b
        };
        let header: serde_json::Value = serde_json::from_slice(&good[..nl]).unwrap();
        let bytes = header["bytes"].as_u64().unwrap();
        let cases = [
            // wrong count
            format!(
                r#"{{"v":1,"kind":"batch","device_id":"dev-1","count":3,"encoding":"zstd","bytes":{bytes}}}"#
            ),
            // understated size: the body expands past it
            format!(
                r#"{{"v":1,"kind":"batch","device_id":"dev-1","count":2,"encoding":"zstd","bytes":{}}}"#,
                bytes - 1
            ),
            // overstated size
            format!(
                r#"{{"v":1,"kind":"batch","device_id":"dev-1","count":2,"encoding":"zstd","bytes":{}}}"#,
                bytes + 1
            ),
            // not compressed as declared
            format!(
                r#"{{"v":1,"kind":"batch","device_id":"dev-1","count":2,"encoding":"identity","bytes":{bytes}}}"#
            ),
            // unknown field
            format!(
                r#"{{"v":1,"kind":"batch","device_id":"dev-1","count":2,"encoding":"zstd","bytes":{bytes},"x":1}}"#
            ),
        ];
        for case in cases {
            assert!(
                matches!(decode(&with_header(&case)), Err(DecodeError::Batch(_))),
                "{case}"
            );
        }
        let bomb = format!(
            r#"{{"v":1,"kind":"batch","device_id":"dev-1","count":2,"encoding":"zstd","bytes":{}}}"#,
            MAX_BATCH_BYTES + 1
        );
        assert!(matches!(
            decode(&with_header(&bomb)),
            Err(DecodeError::TooLarge { .. })
        ));
        let v2 = format!(
            r#"{{"v":2,"kind":"batch","device_id":"dev-1","count":2,"encoding":"zstd","bytes":{bytes}}}"#
        );
        assert_eq!(
            decode(&with_header(&v2)),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 5);
        assert!(matches!(decode(&truncated), Err(DecodeError::Batch(_))));
        // The thread's decompression context serves the next batch after each refusal.
        assert!(matches!(decode(&good), Ok(Payload::Batch { .. })));
    }

    #[test]
    fn a_zstd_bomb_is_stopped_at_the_declared_size() {
        let body = vec![b' '; MAX_BATCH_BYTES * 4];
        let compressed = zstd::bulk::compress(&body, 19).unwrap();
        assert!(compressed.len() < MAX_MESSAGE_BYTES);
        let mut bytes = format!(
            r#"{{"v":1,"kind":"batch","device_id":"dev-1","count":1,"encoding":"zstd","bytes":{MAX_BATCH_BYTES}}}"#
        )
        .into_bytes();
        bytes.push(b'\n');
        bytes.extend_from_slice(&compressed);
        assert!(matches!(decode(&bytes), Err(DecodeError::Batch(_))));
    }
}
