//! What this device trusts: the configured keys until a trust document is applied, then
//! the state that document leads to, kept in `{state_dir}/trust.json` across restarts.
//!
//! A document is verified against the current root keys, written to disk (write, fsync,
//! rename) and only then adopted; the signing keys it names are shared with the installer,
//! which checks bundles against them, and with the command check.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use edgeloop_shared::signing::{KeyError, TrustedKeys};
use edgeloop_shared::trust::{SignedTrust, TrustError, TrustState};

use crate::slots::{SlotError, write_atomic};

const TRUST_FILE: &str = "trust.json";

#[derive(Debug, thiserror::Error)]
pub enum TrustLoadError {
    #[error("a configured key does not parse: {0}")]
    Key(#[from] KeyError),
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Refused(#[from] TrustError),
    #[error("cannot record the trust state: {0}")]
    Persist(#[from] SlotError),
}

/// The signing keys, shared by everything that checks a signature.
#[derive(Debug, Clone, Default)]
pub struct SigningKeys(Arc<RwLock<TrustedKeys>>);

impl SigningKeys {
    pub fn new(keys: TrustedKeys) -> Self {
        SigningKeys(Arc::new(RwLock::new(keys)))
    }

    /// The keys as they are now.
    pub fn get(&self) -> TrustedKeys {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, keys: TrustedKeys) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }
}

pub struct Trust {
    path: PathBuf,
    state: TrustState,
    signing: SigningKeys,
}

impl Trust {
    /// The stored state if a document was applied before, else the configured keys. A
    /// stored state that cannot be read is an error: falling back to the configuration
    /// could trust a key a document revoked.
    pub fn load(
        state_dir: &Path,
        root_keys: &[String],
        signing_keys: &[String],
    ) -> Result<Self, TrustLoadError> {
        let path = state_dir.join(TRUST_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| TrustLoadError::Unreadable {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                TrustState::configured(root_keys, signing_keys)?
            }
            Err(e) => {
                return Err(TrustLoadError::Unreadable {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let signing = SigningKeys::new(state.signing());
        Ok(Trust {
            path,
            state,
            signing,
        })
    }

    pub fn signing(&self) -> &SigningKeys {
        &self.signing
    }

    /// The version of the last document applied (0: none).
    pub fn version(&self) -> u64 {
        self.state.version
    }

    /// Verifies, records and adopts a signed document.
    pub fn apply(&mut self, signed: &SignedTrust) -> Result<&TrustState, ApplyError> {
        let next = self.state.apply(signed)?;
        let bytes = serde_json::to_vec_pretty(&next).expect("trust states always serialize");
        write_atomic(&self.path, &bytes)?;
        self.signing.set(next.signing());
        self.state = next;
        Ok(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_shared::signing::{Context, SecretKey, SignatureError};
    use edgeloop_shared::trust::TrustDocument;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn signed_by_trusted(keys: &SigningKeys, n: u8) -> Result<(), SignatureError> {
        let sig = key(n).sign(Context::Command, b"c");
        keys.get().verify(key(n).id(), Context::Command, b"c", &sig)
    }

    #[test]
    fn an_applied_document_is_kept_across_restarts_and_shared_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let roots = [key(1).public().to_text()];
        let signing = [key(2).public().to_text()];
        let mut trust = Trust::load(dir.path(), &roots, &signing).unwrap();
        let shared = trust.signing().clone();
        assert!(signed_by_trusted(&shared, 2).is_ok());
        let document = TrustDocument {
            version: 1,
            issued_ms: 1,
            root_keys: roots.to_vec(),
            signing_keys: vec![key(3).public().to_text()],
            revoked: vec![key(2).id()],
        };
        trust.apply(&SignedTrust::sign(&document, &key(1))).unwrap();
        // Everything holding the shared keys sees the change.
        assert!(signed_by_trusted(&shared, 3).is_ok());
        assert!(signed_by_trusted(&shared, 2).is_err());

        // After a restart the stored state wins over the configuration.
        let again = Trust::load(dir.path(), &roots, &signing).unwrap();
        assert_eq!(again.version(), 1);
        assert!(signed_by_trusted(again.signing(), 3).is_ok());
        assert!(signed_by_trusted(again.signing(), 2).is_err());

        // A damaged record is an error, not a silent return to the configuration.
        std::fs::write(dir.path().join(TRUST_FILE), b"{").unwrap();
        assert!(matches!(
            Trust::load(dir.path(), &roots, &signing),
            Err(TrustLoadError::Unreadable { .. })
        ));
    }

    #[test]
    fn a_refused_document_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut trust = Trust::load(
            dir.path(),
            &[key(1).public().to_text()],
            &[key(2).public().to_text()],
        )
        .unwrap();
        let document = TrustDocument {
            version: 1,
            issued_ms: 1,
            root_keys: vec![key(9).public().to_text()],
            signing_keys: vec![key(9).public().to_text()],
            revoked: vec![key(1).id(), key(2).id()],
        };
        // Signed by the signing key: not a root.
        assert!(matches!(
            trust.apply(&SignedTrust::sign(&document, &key(2))),
            Err(ApplyError::Refused(TrustError::Signature(_)))
        ));
        assert_eq!(trust.version(), 0);
        assert!(signed_by_trusted(trust.signing(), 2).is_ok());
        assert!(!dir.path().join(TRUST_FILE).exists());
    }
}
