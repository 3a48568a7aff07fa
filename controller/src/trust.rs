//! Trust documents: the controller checks them as a device would and relays the newest to
//! the fleet.
//!
//! An operator signs a document offline with a root key (`edgeloop trust sign`) and hands
//! it to the controller (`edgeloop trust publish`, `POST /api/v1/trust`). The controller
//! applies it to its own copy of the fleet's trust state, starting from the configured
//! `root_keys`, exactly as devices do: a document no device would apply (not signed by a
//! current root, not newer, listing a revoked key) is refused, so nobody who can reach the
//! API can block a rotation with a bogus high version. The document and the state it leads
//! to are kept in the store (replicas see the same; a version replaces another only if it
//! is still the one it was checked against) and published retained on
//! `{root}/v1/fleet/trust`, again at every start, so that a device gets it whenever it
//! connects.

use std::sync::Arc;

use edgeloop_shared::signing::SecretKey;
use edgeloop_shared::trust::{SignedTrust, TrustDocument, TrustError, TrustState};
use rumqttc::{AsyncClient, QoS};
use serde::Serialize;
use tracing::{info, warn};

use crate::store::{Store, StoreError, StoredTrust};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the controller has no root_keys configured, so it cannot check trust documents")]
    NoRoots,
    #[error("trust document refused: {0}")]
    Invalid(TrustError),
    #[error("trust document refused: {0}")]
    Stale(TrustError),
    #[error(
        "another trust document was published at the same time; check GET /api/v1/trust and try again"
    )]
    Raced,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stored trust document is damaged: {0}")]
    Corrupt(String),
    #[error("cannot publish the trust document: {0}")]
    Publish(String),
}

impl From<TrustError> for RelayError {
    fn from(e: TrustError) -> Self {
        match e {
            TrustError::Stale { .. } => RelayError::Stale(e),
            other => RelayError::Invalid(other),
        }
    }
}

/// The current document with what it says, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Current {
    pub signed: SignedTrust,
    pub document: TrustDocument,
    /// Why devices would refuse this controller's commands and bundles under it, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

pub struct TrustRelay {
    store: Arc<dyn Store>,
    root_keys: Vec<String>,
    topic: String,
    client: AsyncClient,
    /// The controller's own signing key, checked against every document.
    signing: SecretKey,
}

impl TrustRelay {
    /// Publishes the stored document again, if there is one.
    pub async fn start(
        store: Arc<dyn Store>,
        root_keys: Vec<String>,
        topic: String,
        client: AsyncClient,
        signing: SecretKey,
    ) -> Result<Self, RelayError> {
        let relay = TrustRelay {
            store,
            root_keys,
            topic,
            client,
            signing,
        };
        if let Some(current) = relay.current().await? {
            if let Some(warning) = &current.warning {
                warn!(%warning, version = current.document.version, "trust document in force");
            }
            relay.publish(&current.signed).await?;
        }
        Ok(relay)
    }

    pub async fn current(&self) -> Result<Option<Current>, RelayError> {
        let Some(stored) = self.store.trust().await? else {
            return Ok(None);
        };
        let signed: SignedTrust =
            serde_json::from_str(&stored.signed).map_err(|e| RelayError::Corrupt(e.to_string()))?;
        let document = signed.peek()?;
        Ok(Some(Current {
            warning: self.warning(&document),
            signed,
            document,
        }))
    }

    /// Checks a document against the fleet's trust state, keeps it and publishes it.
    pub async fn replace(&self, signed: SignedTrust) -> Result<Current, RelayError> {
        let stored = self.store.trust().await?;
        let state = match &stored {
            Some(s) => serde_json::from_str::<TrustState>(&s.state)
                .map_err(|e| RelayError::Corrupt(e.to_string()))?,
            None if self.root_keys.is_empty() => return Err(RelayError::NoRoots),
            None => TrustState::configured(&self.root_keys, &[self.signing.public().to_text()])
                .map_err(|e| RelayError::Invalid(TrustError::BadKey(e)))?,
        };
        let next = state.apply(&signed)?;
        let replaced = self
            .store
            .replace_trust(
                stored.as_ref().map_or(0, |s| s.version),
                &StoredTrust {
                    version: next.version,
                    state: serde_json::to_string(&next).expect("trust states serialize"),
                    signed: serde_json::to_string(&signed).expect("signed documents serialize"),
                },
            )
            .await?;
        if !replaced {
            return Err(RelayError::Raced);
        }
        self.publish(&signed).await?;
        let document = signed.peek()?;
        let warning = self.warning(&document);
        info!(version = document.version, key_id = %signed.key_id, "trust document published");
        if let Some(w) = &warning {
            warn!(warning = %w, "trust document published");
        }
        Ok(Current {
            signed,
            document,
            warning,
        })
    }

    async fn publish(&self, signed: &SignedTrust) -> Result<(), RelayError> {
        let payload = serde_json::to_vec(signed).expect("signed documents serialize");
        self.client
            .publish(&self.topic, QoS::AtLeastOnce, true, payload)
            .await
            .map_err(|e| RelayError::Publish(e.to_string()))
    }

    fn warning(&self, document: &TrustDocument) -> Option<String> {
        let own = self.signing.public().to_text();
        let id = self.signing.id();
        if document.revoked.contains(&id) {
            Some(format!(
                "it revokes this controller's signing key {id}: devices refuse its commands and bundles; restart the controller with a key the document lists"
            ))
        } else if !document.signing_keys.contains(&own) {
            Some(format!(
                "this controller's signing key {id} is not among its signing keys: devices refuse its commands and bundles"
            ))
        } else {
            None
        }
    }
}
