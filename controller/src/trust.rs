//! Trust documents: the controller relays the current one to the fleet.
//!
//! An operator signs a document offline with a root key (`edgeloop trust sign`) and hands
//! it to the controller (`edgeloop trust publish`, `POST /api/v1/trust`). The controller
//! keeps the newest in `{data_dir}/trust.json` and publishes it retained on
//! `{root}/v1/fleet/trust`, again at every start, so that a device gets it whenever it
//! connects. The controller does not hold root keys and cannot verify the signature:
//! devices do, against their own roots. It refuses what no device would apply anyway: a
//! document that does not parse or is not newer than the one it has.

use std::path::PathBuf;

use edgeloop_shared::signing::SecretKey;
use edgeloop_shared::trust::{SignedTrust, TrustDocument, TrustError};
use rumqttc::{AsyncClient, QoS};
use serde::Serialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

const TRUST_FILE: &str = "trust.json";

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("trust document refused: {0}")]
    Invalid(#[from] TrustError),
    #[error("trust document version {version} is not above the current {current}")]
    NotNewer { version: u64, current: u64 },
    #[error("cannot keep the trust document in {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot publish the trust document: {0}")]
    Publish(String),
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
    path: PathBuf,
    topic: String,
    client: AsyncClient,
    /// The controller's own signing key, checked against every document.
    signing: SecretKey,
    current: Mutex<Option<SignedTrust>>,
}

impl TrustRelay {
    /// Loads the stored document, if any, and publishes it again.
    pub async fn start(
        data_dir: &std::path::Path,
        topic: String,
        client: AsyncClient,
        signing: SecretKey,
    ) -> Result<Self, RelayError> {
        let path = data_dir.join(TRUST_FILE);
        let current = match std::fs::read(&path) {
            Ok(bytes) => Some(serde_json::from_slice::<SignedTrust>(&bytes).map_err(|e| {
                RelayError::Invalid(TrustError::Malformed(format!("{}: {e}", path.display())))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(RelayError::Io { path, source }),
        };
        let relay = TrustRelay {
            path,
            topic,
            client,
            signing,
            current: Mutex::new(current.clone()),
        };
        if let Some(signed) = current {
            let document = signed.peek()?;
            if let Some(warning) = relay.warning(&document) {
                warn!(%warning, "trust document in force");
            }
            relay.publish(&signed).await?;
        }
        Ok(relay)
    }

    pub async fn current(&self) -> Result<Option<Current>, RelayError> {
        let Some(signed) = self.current.lock().await.clone() else {
            return Ok(None);
        };
        let document = signed.peek()?;
        Ok(Some(Current {
            warning: self.warning(&document),
            signed,
            document,
        }))
    }

    /// Keeps and publishes a newer document.
    pub async fn replace(&self, signed: SignedTrust) -> Result<Current, RelayError> {
        let document = signed.peek()?;
        let mut current = self.current.lock().await;
        if let Some(old) = current.as_ref() {
            let version = old.peek()?.version;
            if document.version <= version {
                return Err(RelayError::NotNewer {
                    version: document.version,
                    current: version,
                });
            }
        }
        let bytes = serde_json::to_vec_pretty(&signed).expect("signed documents serialize");
        let tmp = self.path.with_extension("tmp");
        let io = |source| RelayError::Io {
            path: self.path.clone(),
            source,
        };
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        self.publish(&signed).await?;
        *current = Some(signed.clone());
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
