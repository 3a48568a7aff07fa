//! The signed model bundle, format 1.
//!
//! A bundle is one file:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "ELBUNDLE"
//! 8       2     format, u16 big-endian (1)
//! 10      4     manifest length M, u32 big-endian
//! 14      M     manifest, UTF-8 JSON (`Manifest`)
//! 14+M    8     key id of the signing key
//! 22+M    64    ed25519 signature over "edgeloop/v1/bundle-manifest\0" ‖ manifest bytes
//! 86+M    8     artifact length A, u64 big-endian
//! 94+M    A     artifact: the ONNX model, zstd-compressed
//! ```
//!
//! The manifest carries the SHA-256 and the sizes of the artifact (compressed and raw), so
//! the one signature covers everything. [`verify`] checks framing and sizes first, then
//! the signature over the exact manifest bytes, then the compressed artifact's digest,
//! and only then decompresses, with the output capped at the signed raw size.

use serde::{Deserialize, Serialize};

use crate::drift::{DriftError, ReferenceProfile};
use crate::signing::{Context, KeyId, SIGNATURE_LEN, SecretKey, SignatureError, TrustedKeys};
use crate::{is_valid_identifier, sha256_hex};

pub const MAGIC: &[u8; 8] = b"ELBUNDLE";
pub const FORMAT: u16 = 1;
pub const FILE_EXTENSION: &str = "elb";
const HEADER_LEN: usize = 8 + 2 + 4;
const ZSTD_LEVEL: i32 = 10;

/// Size caps applied while parsing, before anything is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_manifest_bytes: usize,
    pub max_artifact_bytes: u64,
    pub max_model_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 4 << 20,
            max_artifact_bytes: 512 << 20,
            max_model_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("not an edgeloop bundle (bad magic)")]
    NotABundle,
    #[error("bundle format {0} is not supported (this build reads format {FORMAT})")]
    UnsupportedFormat(u16),
    #[error("bundle is truncated: the {0} is incomplete")]
    Truncated(&'static str),
    #[error("bundle has {0} unexpected bytes after the artifact")]
    TrailingBytes(u64),
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("manifest signature check failed: {0}")]
    Signature(#[from] SignatureError),
    #[error("manifest is malformed: {0}")]
    MalformedManifest(String),
    #[error("{what} size is {actual} bytes but the manifest says {expected}")]
    SizeMismatch {
        what: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("{what} SHA-256 is {actual} but the manifest says {expected}")]
    DigestMismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("artifact does not decompress: {0}")]
    Decompress(String),
    #[error("compression failed: {0}")]
    Compress(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    I64,
    I32,
    U8,
    Bool,
}

/// One model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    /// Dimensions; `null` is a symbolic dimension (the batch).
    pub shape: Vec<Option<u64>>,
    /// Feature names along the last axis (inputs) or class labels (outputs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
}

/// What the artifact is and how to check it. [`pack`] fills it in; build a manifest with
/// `Artifact::default()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub media_type: String,
    pub compression: Compression,
    /// SHA-256 of the compressed bytes stored in the bundle.
    pub sha256: String,
    pub compressed_size: u64,
    /// SHA-256 of the ONNX model after decompression.
    pub raw_sha256: String,
    pub raw_size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u16,
    pub name: String,
    /// Monotonic per model name: devices refuse a version not above the active one.
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub created_ms: u64,
    /// Filled in by [`pack`].
    pub artifact: Artifact,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Reference distribution of the inputs, for drift monitoring.
    pub reference: ReferenceProfile,
}

impl Manifest {
    pub fn model_ref(&self) -> crate::protocol::ModelRef {
        crate::protocol::ModelRef {
            name: self.name.clone(),
            version: self.version,
        }
    }

    fn validate(&self) -> Result<(), BundleError> {
        let bad = |m: String| BundleError::MalformedManifest(m);
        if self.format != FORMAT {
            return Err(bad(format!(
                "manifest format {} is not {FORMAT}",
                self.format
            )));
        }
        if !is_valid_identifier(&self.name) {
            return Err(bad(format!(
                "model name `{}` is not a valid identifier",
                self.name
            )));
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(bad("a model needs at least one input and one output".into()));
        }
        self.reference
            .validate()
            .map_err(|e: DriftError| bad(e.to_string()))?;
        Ok(())
    }
}

/// A bundle whose signature, digests and sizes all checked out.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    pub manifest: Manifest,
    pub key_id: KeyId,
    /// The decompressed ONNX model.
    pub model: Vec<u8>,
}

/// Compresses `model`, fills in `manifest.artifact`, signs the manifest and lays out the file.
pub fn pack(mut manifest: Manifest, model: &[u8], key: &SecretKey) -> Result<Vec<u8>, BundleError> {
    let compressed = zstd::bulk::compress(model, ZSTD_LEVEL)
        .map_err(|e| BundleError::Compress(e.to_string()))?;
    manifest.format = FORMAT;
    manifest.artifact = Artifact {
        media_type: "application/onnx".into(),
        compression: Compression::Zstd,
        sha256: sha256_hex(&compressed),
        compressed_size: compressed.len() as u64,
        raw_sha256: sha256_hex(model),
        raw_size: model.len() as u64,
    };
    manifest.validate()?;
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifests always serialize");
    let signature = key.sign(Context::BundleManifest, &manifest_bytes);

    let mut out = Vec::with_capacity(
        HEADER_LEN + manifest_bytes.len() + 8 + SIGNATURE_LEN + 8 + compressed.len(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_be_bytes());
    let manifest_len = u32::try_from(manifest_bytes.len()).map_err(|_| BundleError::TooLarge {
        what: "manifest",
        size: manifest_bytes.len() as u64,
        limit: u64::from(u32::MAX),
    })?;
    out.extend_from_slice(&manifest_len.to_be_bytes());
    out.extend_from_slice(&manifest_bytes);
    out.extend_from_slice(&key.id().0);
    out.extend_from_slice(&signature);
    out.extend_from_slice(&(compressed.len() as u64).to_be_bytes());
    out.extend_from_slice(&compressed);
    Ok(out)
}

/// Byte ranges of the parts of a bundle, after the framing checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub manifest: std::ops::Range<usize>,
    pub key_id: std::ops::Range<usize>,
    pub signature: std::ops::Range<usize>,
    pub artifact: std::ops::Range<usize>,
}

/// Checks magic, format, lengths and size caps, and returns where each part lies.
pub fn layout(bytes: &[u8], limits: &Limits) -> Result<Layout, BundleError> {
    if bytes.len() < MAGIC.len() {
        return Err(BundleError::Truncated("header"));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(BundleError::NotABundle);
    }
    if bytes.len() < HEADER_LEN {
        return Err(BundleError::Truncated("header"));
    }
    let format = u16::from_be_bytes([bytes[8], bytes[9]]);
    if format != FORMAT {
        return Err(BundleError::UnsupportedFormat(format));
    }
    let manifest_len = u32::from_be_bytes(bytes[10..14].try_into().expect("4 bytes")) as usize;
    if manifest_len > limits.max_manifest_bytes {
        return Err(BundleError::TooLarge {
            what: "manifest",
            size: manifest_len as u64,
            limit: limits.max_manifest_bytes as u64,
        });
    }
    let manifest = HEADER_LEN..HEADER_LEN + manifest_len;
    let key_id = manifest.end..manifest.end + 8;
    let signature = key_id.end..key_id.end + SIGNATURE_LEN;
    let artifact_len_at = signature.end..signature.end + 8;
    for (range, what) in [
        (&manifest, "manifest"),
        (&key_id, "key id"),
        (&signature, "signature"),
        (&artifact_len_at, "artifact length"),
    ] {
        if bytes.len() < range.end {
            return Err(BundleError::Truncated(what));
        }
    }
    let artifact_len =
        u64::from_be_bytes(bytes[artifact_len_at.clone()].try_into().expect("8 bytes"));
    if artifact_len > limits.max_artifact_bytes {
        return Err(BundleError::TooLarge {
            what: "artifact",
            size: artifact_len,
            limit: limits.max_artifact_bytes,
        });
    }
    let available = (bytes.len() - artifact_len_at.end) as u64;
    if available < artifact_len {
        return Err(BundleError::Truncated("artifact"));
    }
    if available > artifact_len {
        return Err(BundleError::TrailingBytes(available - artifact_len));
    }
    Ok(Layout {
        manifest,
        key_id,
        signature,
        artifact: artifact_len_at.end..bytes.len(),
    })
}

/// Verifies a whole bundle against the trusted keys and returns its manifest and model.
pub fn verify(
    bytes: &[u8],
    trusted: &TrustedKeys,
    limits: &Limits,
) -> Result<VerifiedBundle, BundleError> {
    let layout = layout(bytes, limits)?;
    let manifest_bytes = &bytes[layout.manifest];
    let key_id = KeyId(bytes[layout.key_id].try_into().expect("8 bytes"));
    trusted.verify(
        key_id,
        Context::BundleManifest,
        manifest_bytes,
        &bytes[layout.signature],
    )?;
    let manifest: Manifest = serde_json::from_slice(manifest_bytes)
        .map_err(|e| BundleError::MalformedManifest(e.to_string()))?;
    manifest.validate()?;

    let artifact = &bytes[layout.artifact];
    let a = &manifest.artifact;
    if artifact.len() as u64 != a.compressed_size {
        return Err(BundleError::SizeMismatch {
            what: "compressed artifact",
            expected: a.compressed_size,
            actual: artifact.len() as u64,
        });
    }
    let digest = sha256_hex(artifact);
    if digest != a.sha256 {
        return Err(BundleError::DigestMismatch {
            what: "compressed artifact",
            expected: a.sha256.clone(),
            actual: digest,
        });
    }
    if a.raw_size > limits.max_model_bytes {
        return Err(BundleError::TooLarge {
            what: "model",
            size: a.raw_size,
            limit: limits.max_model_bytes,
        });
    }
    // The cap is the signed raw size: a decompression bomb fails here, not in memory.
    let model = zstd::bulk::decompress(artifact, a.raw_size as usize)
        .map_err(|e| BundleError::Decompress(e.to_string()))?;
    if model.len() as u64 != a.raw_size {
        return Err(BundleError::SizeMismatch {
            what: "model",
            expected: a.raw_size,
            actual: model.len() as u64,
        });
    }
    let digest = sha256_hex(&model);
    if digest != a.raw_sha256 {
        return Err(BundleError::DigestMismatch {
            what: "model",
            expected: a.raw_sha256.clone(),
            actual: digest,
        });
    }
    Ok(VerifiedBundle {
        manifest,
        key_id,
        model,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::drift::DEFAULT_BINS;

    pub(crate) fn manifest(version: u64) -> Manifest {
        let names = vec!["a".to_string(), "b".to_string()];
        let columns = vec![
            (0..50).map(f64::from).collect(),
            (0..50).map(|i| f64::from(i) * 2.0).collect(),
        ];
        Manifest {
            format: FORMAT,
            name: "demo".into(),
            version,
            label: Some("test".into()),
            created_ms: 1,
            artifact: Artifact::default(),
            inputs: vec![TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![None, Some(2)],
                names: names.clone(),
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                dtype: DType::F32,
                shape: vec![None, Some(2)],
                names: vec!["no".into(), "yes".into()],
            }],
            reference: ReferenceProfile::from_columns(&names, &columns, DEFAULT_BINS).unwrap(),
        }
    }

    fn model_bytes() -> Vec<u8> {
        (0..4096u32).flat_map(|i| (i % 251).to_le_bytes()).collect()
    }

    fn setup() -> (SecretKey, TrustedKeys, Vec<u8>) {
        let key = SecretKey::from_seed([5; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        let bytes = pack(manifest(3), &model_bytes(), &key).unwrap();
        (key, trusted, bytes)
    }

    #[test]
    fn a_packed_bundle_verifies_and_yields_the_model() {
        let (key, trusted, bytes) = setup();
        let v = verify(&bytes, &trusted, &Limits::default()).unwrap();
        assert_eq!(v.model, model_bytes());
        assert_eq!(v.key_id, key.id());
        assert_eq!(v.manifest.version, 3);
        assert_eq!(v.manifest.artifact.raw_size, model_bytes().len() as u64);
        assert!(v.manifest.artifact.compressed_size < v.manifest.artifact.raw_size);
    }

    #[test]
    fn a_flipped_byte_anywhere_is_refused() {
        let (_, trusted, bytes) = setup();
        let l = layout(&bytes, &Limits::default()).unwrap();
        // Every single byte of the file matters; flipping it must never verify.
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(
                verify(&t, &trusted, &Limits::default()).is_err(),
                "byte {i} flipped and accepted"
            );
        }
        let flip = |at: usize| {
            let mut t = bytes.clone();
            t[at] ^= 0x20;
            verify(&t, &trusted, &Limits::default()).unwrap_err()
        };
        assert!(matches!(
            flip(l.manifest.start + 20),
            BundleError::Signature(SignatureError::Invalid(_))
        ));
        assert!(matches!(
            flip(l.signature.start + 3),
            BundleError::Signature(SignatureError::Invalid(_))
        ));
        assert!(matches!(
            flip(l.key_id.start),
            BundleError::Signature(SignatureError::UnknownKey(_))
        ));
        assert!(matches!(
            flip(l.artifact.start + 10),
            BundleError::DigestMismatch {
                what: "compressed artifact",
                ..
            }
        ));
        assert_eq!(flip(0), BundleError::NotABundle);
    }

    #[test]
    fn truncation_and_trailing_bytes_are_refused() {
        let (_, trusted, bytes) = setup();
        let limits = Limits::default();
        for cut in [0, 5, 12, 40, bytes.len() - 1] {
            assert!(
                matches!(
                    verify(&bytes[..cut], &trusted, &limits),
                    Err(BundleError::Truncated(_))
                ),
                "cut at {cut}"
            );
        }
        assert_eq!(
            verify(&bytes[..bytes.len() - 1], &trusted, &limits).unwrap_err(),
            BundleError::Truncated("artifact")
        );
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"xx");
        assert_eq!(
            verify(&longer, &trusted, &limits).unwrap_err(),
            BundleError::TrailingBytes(2)
        );
    }

    #[test]
    fn a_bundle_signed_by_an_untrusted_key_is_refused() {
        let (_, trusted, _) = setup();
        let stranger = SecretKey::from_seed([6; 32]);
        let bytes = pack(manifest(3), &model_bytes(), &stranger).unwrap();
        assert_eq!(
            verify(&bytes, &trusted, &Limits::default()).unwrap_err(),
            BundleError::Signature(SignatureError::UnknownKey(stranger.id()))
        );
    }

    #[test]
    fn size_limits_apply_before_any_work() {
        let (_, trusted, bytes) = setup();
        let tight = Limits {
            max_manifest_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            verify(&bytes, &trusted, &tight),
            Err(BundleError::TooLarge {
                what: "manifest",
                ..
            })
        ));
        let tight = Limits {
            max_model_bytes: 100,
            ..Limits::default()
        };
        assert!(matches!(
            verify(&bytes, &trusted, &tight),
            Err(BundleError::TooLarge { what: "model", .. })
        ));
    }

    #[test]
    fn a_signed_manifest_cannot_smuggle_a_decompression_bomb() {
        // A key holder who lies about the raw size still cannot make the verifier inflate
        // more than the signed size: decompression stops at the cap.
        let key = SecretKey::from_seed([5; 32]);
        let trusted = TrustedKeys::new([key.public().clone()]);
        let bomb = vec![0u8; 8 << 20];
        let bytes = pack(manifest(1), &bomb, &key).unwrap();
        let l = layout(&bytes, &Limits::default()).unwrap();
        let mut m: Manifest = serde_json::from_slice(&bytes[l.manifest.clone()]).unwrap();
        m.artifact.raw_size = 1024;
        let manifest_bytes = serde_json::to_vec(&m).unwrap();
        let mut forged = Vec::new();
        forged.extend_from_slice(MAGIC);
        forged.extend_from_slice(&FORMAT.to_be_bytes());
        forged.extend_from_slice(&(manifest_bytes.len() as u32).to_be_bytes());
        forged.extend_from_slice(&manifest_bytes);
        forged.extend_from_slice(&key.id().0);
        forged.extend_from_slice(&key.sign(Context::BundleManifest, &manifest_bytes));
        forged.extend_from_slice(&bytes[l.artifact.start - 8..]);
        assert!(matches!(
            verify(&forged, &trusted, &Limits::default()),
            Err(BundleError::Decompress(_))
        ));
    }

    #[test]
    fn a_manifest_with_a_hostile_name_is_refused_at_pack_time() {
        let key = SecretKey::from_seed([5; 32]);
        let mut m = manifest(1);
        m.name = "../etc".into();
        assert!(matches!(
            pack(m, b"x", &key),
            Err(BundleError::MalformedManifest(_))
        ));
    }
}
