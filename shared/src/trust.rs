//! Key rotation and revocation: signed trust documents.
//!
//! A device trusts two sets of keys. *Signing keys* sign bundles and commands; the
//! controller holds one online. *Root keys* sign trust documents only, and are meant to be
//! kept offline, so that a stolen signing key can be revoked by a key the thief does not
//! have.
//!
//! A [`TrustDocument`] names the complete root and signing key sets to trust from now on,
//! and key ids to revoke for good. Its exact JSON bytes are signed (context
//! `edgeloop/v1/trust\0`) by a root key the device trusts *before* applying it, and travel
//! base64-encoded in a [`SignedTrust`]. Versions only go up: a device applies a document
//! only when its version is above the last one it applied, so an old document replayed
//! cannot bring back a revoked key. Revocations accumulate: once revoked, a key id is never
//! trusted again, whatever a later document or the device's configuration lists.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::signing::{
    Context, KeyError, KeyId, OpenError, PublicKey, SecretKey, SignatureError, TrustedKeys,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDocument {
    /// Above the version of every document applied before.
    pub version: u64,
    pub issued_ms: u64,
    /// Keys that may sign the next trust documents (`ed25519:<base64>`).
    pub root_keys: Vec<String>,
    /// Keys that may sign bundles and commands (`ed25519:<base64>`).
    pub signing_keys: Vec<String>,
    /// Key ids never to trust again, in any role.
    #[serde(default)]
    pub revoked: Vec<KeyId>,
}

impl TrustDocument {
    /// What makes a document unusable on any device: version 0, an empty key list, a key
    /// that does not parse, or a key it both lists and revokes. For signing tools; devices
    /// check this and more in [`TrustState::apply`].
    pub fn check(&self) -> Result<(), TrustError> {
        if self.version == 0 {
            return Err(TrustError::Stale {
                version: 0,
                applied: 0,
            });
        }
        check_lists(self, &self.revoked.iter().copied().collect())
    }
}

/// Every listed key parses, none is revoked, and both lists have one.
fn check_lists(document: &TrustDocument, revoked: &BTreeSet<KeyId>) -> Result<(), TrustError> {
    for key in document.root_keys.iter().chain(&document.signing_keys) {
        let id = PublicKey::parse(key)?.id();
        if revoked.contains(&id) {
            return Err(TrustError::ListsRevoked(id));
        }
    }
    if document.root_keys.is_empty() {
        return Err(TrustError::Empty("root"));
    }
    if document.signing_keys.is_empty() {
        return Err(TrustError::Empty("signing"));
    }
    Ok(())
}

/// A trust document as it travels: the signed bytes, base64-encoded, and their signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTrust {
    pub key_id: KeyId,
    /// Base64 (standard alphabet, padded) of the exact JSON bytes that were signed.
    pub document: String,
    /// Base64 of the 64-byte ed25519 signature.
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error("trust document is not valid base64: {0}")]
    Encoding(String),
    #[error("trust document signature refused (it must be signed by a trusted root key): {0}")]
    Signature(#[from] SignatureError),
    #[error("trust document signed by revoked key {0}")]
    RevokedSigner(KeyId),
    #[error("signed trust document does not parse: {0}")]
    Malformed(String),
    #[error("trust document lists a key that does not parse: {0}")]
    BadKey(#[from] KeyError),
    #[error("trust document version {version} is not above the applied {applied} (replay?)")]
    Stale { version: u64, applied: u64 },
    #[error("trust document leaves no {0} key")]
    Empty(&'static str),
    #[error("trust document both lists and revokes key {0}")]
    ListsRevoked(KeyId),
}

impl SignedTrust {
    pub fn sign(document: &TrustDocument, root: &SecretKey) -> Self {
        let bytes = serde_json::to_vec(document).expect("trust documents always serialize");
        let signature = root.sign(Context::Trust, &bytes);
        SignedTrust {
            key_id: root.id(),
            document: B64.encode(&bytes),
            signature: B64.encode(signature),
        }
    }

    /// Reads the document without checking its signature: for showing it, and for a
    /// controller that relays documents it cannot verify (devices verify them).
    pub fn peek(&self) -> Result<TrustDocument, TrustError> {
        let bytes = B64
            .decode(&self.document)
            .map_err(|e| TrustError::Encoding(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| TrustError::Malformed(e.to_string()))
    }

    /// Checks the signature over the exact bytes received under `roots`, then parses them.
    pub fn open(&self, roots: &TrustedKeys) -> Result<TrustDocument, TrustError> {
        let bytes = roots
            .open_encoded(self.key_id, Context::Trust, &self.document, &self.signature)
            .map_err(|e| match e {
                OpenError::Encoding(e) => TrustError::Encoding(e),
                OpenError::Signature(e) => TrustError::Signature(e),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| TrustError::Malformed(e.to_string()))
    }
}

/// What a device trusts: where it stands after its configuration and every trust document
/// it applied. Serializable, so that a device keeps it across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustState {
    /// The version of the last document applied; 0 for none.
    pub version: u64,
    pub root_keys: Vec<String>,
    pub signing_keys: Vec<String>,
    pub revoked: BTreeSet<KeyId>,
}

impl TrustState {
    /// The state of a device that has applied no document: its configured keys.
    pub fn configured(root_keys: &[String], signing_keys: &[String]) -> Result<Self, KeyError> {
        for key in root_keys.iter().chain(signing_keys) {
            PublicKey::parse(key)?;
        }
        Ok(TrustState {
            version: 0,
            root_keys: root_keys.to_vec(),
            signing_keys: signing_keys.to_vec(),
            revoked: BTreeSet::new(),
        })
    }

    /// Keys that may sign bundles and commands: the signing keys, less every revoked one.
    pub fn signing(&self) -> TrustedKeys {
        self.trusted(&self.signing_keys)
    }

    /// Keys that may sign trust documents: the root keys, less every revoked one.
    pub fn roots(&self) -> TrustedKeys {
        self.trusted(&self.root_keys)
    }

    fn trusted(&self, texts: &[String]) -> TrustedKeys {
        TrustedKeys::with_revoked(
            texts.iter().filter_map(|t| PublicKey::parse(t).ok()),
            self.revoked.iter().copied(),
        )
    }

    /// Verifies a signed document against the current roots and returns the state it
    /// leads to. `self` is unchanged: the caller persists the new state, then adopts it.
    pub fn apply(&self, signed: &SignedTrust) -> Result<TrustState, TrustError> {
        if self.revoked.contains(&signed.key_id) {
            return Err(TrustError::RevokedSigner(signed.key_id));
        }
        let document = signed.open(&self.roots())?;
        if document.version <= self.version {
            return Err(TrustError::Stale {
                version: document.version,
                applied: self.version,
            });
        }
        let mut revoked = self.revoked.clone();
        revoked.extend(document.revoked.iter().copied());
        check_lists(&document, &revoked)?;
        Ok(TrustState {
            version: document.version,
            root_keys: document.root_keys,
            signing_keys: document.signing_keys,
            revoked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn text(n: u8) -> String {
        key(n).public().to_text()
    }

    /// Root key 1, signing key 2.
    fn initial() -> TrustState {
        TrustState::configured(&[text(1)], &[text(2)]).unwrap()
    }

    fn doc(version: u64, roots: &[u8], signing: &[u8], revoked: &[u8]) -> TrustDocument {
        TrustDocument {
            version,
            issued_ms: 1,
            root_keys: roots.iter().map(|n| text(*n)).collect(),
            signing_keys: signing.iter().map(|n| text(*n)).collect(),
            revoked: revoked.iter().map(|n| key(*n).id()).collect(),
        }
    }

    #[test]
    fn a_root_key_rotates_the_signing_key_and_revokes_the_old_one() {
        let state = initial();
        assert!(
            state
                .signing()
                .verify(
                    key(2).id(),
                    Context::Command,
                    b"x",
                    &key(2).sign(Context::Command, b"x")
                )
                .is_ok()
        );
        // Introduce signing key 3 beside 2.
        let both = state
            .apply(&SignedTrust::sign(&doc(1, &[1], &[2, 3], &[]), &key(1)))
            .unwrap();
        for k in [2, 3] {
            let sig = key(k).sign(Context::Command, b"x");
            assert!(
                both.signing()
                    .verify(key(k).id(), Context::Command, b"x", &sig)
                    .is_ok()
            );
        }
        // Then revoke 2.
        let rotated = both
            .apply(&SignedTrust::sign(&doc(2, &[1], &[3], &[2]), &key(1)))
            .unwrap();
        let sig = key(2).sign(Context::Command, b"x");
        assert_eq!(
            rotated
                .signing()
                .verify(key(2).id(), Context::Command, b"x", &sig),
            Err(SignatureError::Revoked(key(2).id()))
        );
        // The state survives a round trip through its stored form.
        let stored = serde_json::to_string(&rotated).unwrap();
        assert_eq!(
            serde_json::from_str::<TrustState>(&stored).unwrap(),
            rotated
        );
    }

    #[test]
    fn each_refusal_has_its_own_error() {
        let state = initial();
        // Signed by the signing key, not a root: a stolen signing key cannot rotate.
        assert!(matches!(
            state.apply(&SignedTrust::sign(&doc(1, &[9], &[9], &[1]), &key(2))),
            Err(TrustError::Signature(SignatureError::UnknownKey(_)))
        ));
        let applied = state
            .apply(&SignedTrust::sign(&doc(3, &[1], &[2], &[]), &key(1)))
            .unwrap();
        // Replays and older documents.
        for version in [1, 3] {
            assert_eq!(
                applied.apply(&SignedTrust::sign(&doc(version, &[1], &[2], &[]), &key(1))),
                Err(TrustError::Stale {
                    version,
                    applied: 3
                })
            );
        }
        let mut tampered = SignedTrust::sign(&doc(4, &[1], &[2], &[]), &key(1));
        tampered.document = B64.encode(serde_json::to_vec(&doc(4, &[1], &[2, 9], &[])).unwrap());
        assert!(matches!(
            applied.apply(&tampered),
            Err(TrustError::Signature(SignatureError::Invalid(_)))
        ));
        assert_eq!(
            applied.apply(&SignedTrust::sign(&doc(4, &[], &[2], &[]), &key(1))),
            Err(TrustError::Empty("root"))
        );
        assert_eq!(
            applied.apply(&SignedTrust::sign(&doc(4, &[1], &[], &[]), &key(1))),
            Err(TrustError::Empty("signing"))
        );
        assert_eq!(
            applied.apply(&SignedTrust::sign(&doc(4, &[1], &[2], &[2]), &key(1))),
            Err(TrustError::ListsRevoked(key(2).id()))
        );
        let mut garbled = SignedTrust::sign(&doc(4, &[1], &[2], &[]), &key(1));
        garbled.signature = "***".into();
        assert!(matches!(
            applied.apply(&garbled),
            Err(TrustError::Encoding(_))
        ));
    }

    #[test]
    fn a_document_no_device_could_apply_is_caught_before_signing() {
        assert!(doc(1, &[1], &[2], &[]).check().is_ok());
        assert!(matches!(
            doc(0, &[1], &[2], &[]).check(),
            Err(TrustError::Stale { version: 0, .. })
        ));
        assert_eq!(
            doc(1, &[1], &[2], &[2]).check(),
            Err(TrustError::ListsRevoked(key(2).id()))
        );
        assert_eq!(
            doc(1, &[1], &[], &[]).check(),
            Err(TrustError::Empty("signing"))
        );
    }

    #[test]
    fn a_revocation_is_for_good_and_a_revoked_root_signs_nothing() {
        // Root 1 hands over to root 5 and revokes itself and signing key 2.
        let handed = initial()
            .apply(&SignedTrust::sign(&doc(1, &[5], &[3], &[1, 2]), &key(1)))
            .unwrap();
        assert_eq!(
            handed.apply(&SignedTrust::sign(&doc(2, &[1], &[3], &[]), &key(1))),
            Err(TrustError::RevokedSigner(key(1).id()))
        );
        // A later document cannot list a revoked key again, even if it forgets the list.
        assert_eq!(
            handed.apply(&SignedTrust::sign(&doc(2, &[5], &[2], &[]), &key(5))),
            Err(TrustError::ListsRevoked(key(2).id()))
        );
        let next = handed
            .apply(&SignedTrust::sign(&doc(2, &[5], &[3, 4], &[]), &key(5)))
            .unwrap();
        assert!(next.revoked.contains(&key(1).id()) && next.revoked.contains(&key(2).id()));
    }
}
