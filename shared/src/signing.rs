//! ed25519 keys, key ids and verification against a set of trusted keys.
//!
//! Signatures always cover the exact bytes that were produced by the signer, prefixed by a
//! domain-separation context (see [`Context`]), so that bytes signed as a bundle manifest
//! can never be replayed as a command and vice versa. Nothing is re-serialized before
//! verification.
//!
//! Text forms (used in config files and key files):
//! - public key: `ed25519:<base64 of the 32-byte key>`
//! - secret key: `ed25519-secret:<base64 of the 32-byte seed>`
//!
//! A key id is the first 8 bytes of SHA-256 over the 32-byte public key, in lowercase hex.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";
pub const SECRET_KEY_PREFIX: &str = "ed25519-secret:";
pub const SIGNATURE_LEN: usize = 64;

/// What a signature is for. The context string is prepended to the signed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    BundleManifest,
    Command,
    /// Trust documents (key rotation and revocation), signed by root keys.
    Trust,
    /// A device's proof, when it enrolls, that it holds the key it names.
    Enroll,
}

impl Context {
    fn prefix(self) -> &'static [u8] {
        match self {
            Context::BundleManifest => b"edgeloop/v1/bundle-manifest\0",
            Context::Command => b"edgeloop/v1/command\0",
            Context::Trust => b"edgeloop/v1/trust\0",
            Context::Enroll => b"edgeloop/v1/enroll\0",
        }
    }

    fn message(self, bytes: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(self.prefix().len() + bytes.len());
        m.extend_from_slice(self.prefix());
        m.extend_from_slice(bytes);
        m
    }
}

/// The bytes a device signs (context [`Context::Enroll`]) to prove, when it enrolls, that it
/// holds the key it names: its id, the key's text form and the time, one per line.
pub fn enroll_proof_bytes(device_id: &str, public_key: &str, issued_ms: u64) -> Vec<u8> {
    format!("{device_id}\n{public_key}\n{issued_ms}").into_bytes()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key text must start with `{expected}`")]
    WrongPrefix { expected: &'static str },
    #[error("key is not valid base64: {0}")]
    Base64(String),
    #[error("key must be 32 bytes, got {0}")]
    WrongLength(usize),
    #[error("not a valid ed25519 public key")]
    InvalidPoint,
    #[error("key id must be 16 hex characters, got `{0}`")]
    BadKeyId(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("signed by key {0}, which is not among the trusted keys")]
    UnknownKey(KeyId),
    #[error("signed by key {0}, which is revoked")]
    Revoked(KeyId),
    #[error("signature by key {0} does not match the signed bytes")]
    Invalid(KeyId),
    #[error("signature must be {SIGNATURE_LEN} bytes, got {0}")]
    WrongLength(usize),
}

/// Why signed bytes that travel base64-encoded were not opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("not valid base64: {0}")]
    Encoding(String),
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

/// First 8 bytes of SHA-256 over the public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }

    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(text).map_err(|_| KeyError::BadKeyId(text.to_string()))?;
        let id: [u8; 8] = bytes
            .try_into()
            .map_err(|_| KeyError::BadKeyId(text.to_string()))?;
        Ok(KeyId(id))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        KeyId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// An ed25519 public key with its key id.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::WrongLength(bytes.len()))?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::InvalidPoint)?;
        Ok(PublicKey {
            id: KeyId::of(&key),
            key,
        })
    }

    /// Parses `ed25519:<base64>`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let b64 = text
            .trim()
            .strip_prefix(PUBLIC_KEY_PREFIX)
            .ok_or(KeyError::WrongPrefix {
                expected: PUBLIC_KEY_PREFIX,
            })?;
        let bytes = B64
            .decode(b64)
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        Self::from_bytes(&bytes)
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC_KEY_PREFIX}{}", B64.encode(self.key.as_bytes()))
    }

    /// Verifies `signature` over `context` ‖ `bytes` (strict: rejects malleable signatures).
    pub fn verify(
        &self,
        context: Context,
        bytes: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        let sig: [u8; SIGNATURE_LEN] = signature
            .try_into()
            .map_err(|_| SignatureError::WrongLength(signature.len()))?;
        self.key
            .verify_strict(&context.message(bytes), &Signature::from_bytes(&sig))
            .map_err(|_| SignatureError::Invalid(self.id))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id)
    }
}

/// An ed25519 signing key. Its secret never appears in `Debug` output.
#[derive(Clone)]
pub struct SecretKey {
    key: SigningKey,
    public: PublicKey,
}

impl SecretKey {
    /// Builds a key from a 32-byte seed. The caller supplies the randomness (the core has
    /// no entropy source of its own); use the operating system's generator.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let verifying = key.verifying_key();
        SecretKey {
            public: PublicKey {
                id: KeyId::of(&verifying),
                key: verifying,
            },
            key,
        }
    }

    /// Parses `ed25519-secret:<base64 seed>`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let b64 = text
            .trim()
            .strip_prefix(SECRET_KEY_PREFIX)
            .ok_or(KeyError::WrongPrefix {
                expected: SECRET_KEY_PREFIX,
            })?;
        let bytes = B64
            .decode(b64)
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        let seed: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength(bytes.len()))?;
        Ok(Self::from_seed(seed))
    }

    pub fn to_text(&self) -> String {
        format!("{SECRET_KEY_PREFIX}{}", B64.encode(self.key.to_bytes()))
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn id(&self) -> KeyId {
        self.public.id
    }

    /// Signs `context` ‖ `bytes`.
    pub fn sign(&self, context: Context, bytes: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(&context.message(bytes)).to_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public.id)
    }
}

/// The set of public keys a verifier trusts, by key id, and the ids it knows are revoked.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, PublicKey>,
    revoked: std::collections::BTreeSet<KeyId>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (k.id(), k)).collect(),
            revoked: Default::default(),
        }
    }

    /// `keys` less the `revoked` ones, whose signatures are refused as revoked.
    pub fn with_revoked(
        keys: impl IntoIterator<Item = PublicKey>,
        revoked: impl IntoIterator<Item = KeyId>,
    ) -> Self {
        let revoked: std::collections::BTreeSet<KeyId> = revoked.into_iter().collect();
        TrustedKeys {
            keys: keys
                .into_iter()
                .filter(|k| !revoked.contains(&k.id()))
                .map(|k| (k.id(), k))
                .collect(),
            revoked,
        }
    }

    /// Parses each `ed25519:<base64>` line of a config list.
    pub fn parse_all<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<Self, KeyError> {
        texts
            .into_iter()
            .map(PublicKey::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, id: KeyId) -> bool {
        self.keys.contains_key(&id)
    }

    /// Decodes signed bytes and their signature as they travel (base64) and verifies them;
    /// returns the bytes, to be parsed only now.
    pub fn open_encoded(
        &self,
        key_id: KeyId,
        context: Context,
        bytes: &str,
        signature: &str,
    ) -> Result<Vec<u8>, OpenError> {
        use base64::Engine;
        let decode = |text: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| OpenError::Encoding(e.to_string()))
        };
        let (bytes, signature) = (decode(bytes)?, decode(signature)?);
        self.verify(key_id, context, &bytes, &signature)?;
        Ok(bytes)
    }

    pub fn verify(
        &self,
        key_id: KeyId,
        context: Context,
        bytes: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        if self.revoked.contains(&key_id) {
            return Err(SignatureError::Revoked(key_id));
        }
        self.keys
            .get(&key_id)
            .ok_or(SignatureError::UnknownKey(key_id))?
            .verify(context, bytes, signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    #[test]
    fn text_forms_round_trip() {
        let k = key(1);
        let again = SecretKey::parse(&k.to_text()).unwrap();
        assert_eq!(again.public(), k.public());
        let public = PublicKey::parse(&k.public().to_text()).unwrap();
        assert_eq!(public.id(), k.id());
        assert_eq!(KeyId::parse(&k.id().to_string()).unwrap(), k.id());
    }

    #[test]
    fn malformed_key_text_is_refused_with_a_reason() {
        assert!(matches!(
            PublicKey::parse("rsa:AAAA"),
            Err(KeyError::WrongPrefix { .. })
        ));
        assert!(matches!(
            PublicKey::parse("ed25519:!!!"),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(
            PublicKey::parse("ed25519:AAAA"),
            Err(KeyError::WrongLength(3))
        );
        assert!(matches!(KeyId::parse("xyz"), Err(KeyError::BadKeyId(_))));
        // a secret key pasted where a public key belongs is refused, not misread
        assert!(PublicKey::parse(&key(2).to_text()).is_err());
    }

    #[test]
    fn verification_needs_a_trusted_key_the_exact_bytes_and_the_same_context() {
        let k = key(3);
        let trusted = TrustedKeys::new([k.public().clone()]);
        let sig = k.sign(Context::Command, b"hello");
        assert_eq!(
            trusted.verify(k.id(), Context::Command, b"hello", &sig),
            Ok(())
        );
        assert_eq!(
            trusted.verify(k.id(), Context::Command, b"hellO", &sig),
            Err(SignatureError::Invalid(k.id()))
        );
        assert_eq!(
            trusted.verify(k.id(), Context::BundleManifest, b"hello", &sig),
            Err(SignatureError::Invalid(k.id()))
        );
        let stranger = key(4);
        let sig = stranger.sign(Context::Command, b"hello");
        assert_eq!(
            trusted.verify(stranger.id(), Context::Command, b"hello", &sig),
            Err(SignatureError::UnknownKey(stranger.id()))
        );
        // claiming a trusted key id does not help a stranger
        assert_eq!(
            trusted.verify(k.id(), Context::Command, b"hello", &sig),
            Err(SignatureError::Invalid(k.id()))
        );
        assert_eq!(
            trusted.verify(k.id(), Context::Command, b"hello", &sig[..10]),
            Err(SignatureError::WrongLength(10))
        );
    }
}
