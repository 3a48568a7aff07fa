//! Model updates: download a bundle, verify it, install it into the inactive slot,
//! smoke-test it, and switch. Also the boot path that finds the model to serve.

use std::time::Duration;

use edgeloop_shared::bundle::{self, BundleError, Limits, VerifiedBundle};
use edgeloop_shared::command::DeployAction;
use edgeloop_shared::signing::TrustedKeys;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::runtime::{LoadedModel, RuntimeError};
use crate::slots::{Slot, SlotError, Slots};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("download from {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error("download from {url} answered HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("bundle is larger than {limit} bytes (the command says {expected}); download stopped")]
    TooLarge { expected: u64, limit: u64 },
    #[error("downloaded {actual} bytes but the command says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("bundle SHA-256 is {actual} but the command says {expected}")]
    DigestMismatch { expected: String, actual: String },
    #[error("bundle verification failed: {0}")]
    Verify(#[from] BundleError),
    #[error("bundle holds {found} but the command asked for {expected}")]
    WrongModel { expected: String, found: String },
    #[error("cannot write the model slot: {0}")]
    Slot(#[from] SlotError),
    #[error("model does not load or fails its smoke test: {0}")]
    Load(#[from] RuntimeError),
    #[error("install task failed: {0}")]
    Task(String),
}

/// The model being served and where it came from.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Shared with the local API, whose requests in flight keep it while it is replaced.
    pub model: std::sync::Arc<LoadedModel>,
    pub slot: Slot,
}

/// Downloads, verifies and installs bundles. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Installer {
    trusted: TrustedKeys,
    http: reqwest::Client,
    controller_url: String,
    max_bundle_bytes: u64,
    slots: Slots,
    limits: Limits,
}

impl Installer {
    pub fn new(
        trusted: TrustedKeys,
        controller_url: &str,
        max_bundle_bytes: u64,
        slots: Slots,
    ) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build()
            .expect("a plain HTTP client always builds");
        Installer {
            trusted,
            http,
            controller_url: controller_url.trim_end_matches('/').to_string(),
            max_bundle_bytes,
            slots,
            limits: Limits::default(),
        }
    }

    /// The URL a command's `bundle_url` stands for: absolute as given, or a path on the
    /// controller.
    pub fn resolve_url(&self, bundle_url: &str) -> String {
        if bundle_url.starts_with("http://") || bundle_url.starts_with("https://") {
            bundle_url.to_string()
        } else {
            format!(
                "{}/{}",
                self.controller_url,
                bundle_url.trim_start_matches('/')
            )
        }
    }

    /// Downloads the bundle, refusing more bytes than the command announced (or than the
    /// configured maximum) as they arrive, and checks size and SHA-256 at the end.
    pub async fn download(&self, action: &DeployAction) -> Result<Vec<u8>, InstallError> {
        let url = self.resolve_url(&action.bundle_url);
        let limit = action.bundle_size.min(self.max_bundle_bytes);
        if action.bundle_size > self.max_bundle_bytes {
            return Err(InstallError::TooLarge {
                expected: action.bundle_size,
                limit,
            });
        }
        let failed = |e: reqwest::Error| InstallError::Download {
            url: url.clone(),
            reason: e.to_string(),
        };
        let mut response = self.http.get(&url).send().await.map_err(failed)?;
        if !response.status().is_success() {
            return Err(InstallError::HttpStatus {
                url,
                status: response.status().as_u16(),
            });
        }
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(InstallError::TooLarge {
                expected: action.bundle_size,
                limit,
            });
        }
        let mut bytes = Vec::with_capacity(limit as usize);
        let mut digest = Sha256::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(InstallError::TooLarge {
                    expected: action.bundle_size,
                    limit,
                });
            }
            digest.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        if bytes.len() as u64 != action.bundle_size {
            return Err(InstallError::SizeMismatch {
                expected: action.bundle_size,
                actual: bytes.len() as u64,
            });
        }
        let actual = hex::encode(digest.finalize());
        if actual != action.bundle_sha256 {
            return Err(InstallError::DigestMismatch {
                expected: action.bundle_sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Verifies a downloaded bundle and checks that it is the model the command named.
    pub fn verify(
        &self,
        bytes: &[u8],
        action: &DeployAction,
    ) -> Result<VerifiedBundle, InstallError> {
        let verified = bundle::verify(bytes, &self.trusted, &self.limits)?;
        let found = verified.manifest.model_ref();
        if found != action.model {
            return Err(InstallError::WrongModel {
                expected: action.model.to_string(),
                found: found.to_string(),
            });
        }
        Ok(verified)
    }

    /// Writes the bundle to the slot that is not active, loads and smoke-tests it there,
    /// then makes that slot active.
    pub fn install(
        &self,
        bytes: &[u8],
        verified: &VerifiedBundle,
        active: Option<Slot>,
    ) -> Result<Installed, InstallError> {
        let slot = active.map_or(Slot::A, Slot::other);
        self.slots.write(slot, bytes)?;
        // Load what is on disk, not what is in memory: that is what the next boot will serve.
        let on_disk = self.slots.read(slot)?;
        let reverified = bundle::verify(&on_disk, &self.trusted, &self.limits)?;
        debug_assert_eq!(reverified.manifest, verified.manifest);
        let model = LoadedModel::load(&reverified)?;
        self.slots.activate(slot)?;
        Ok(Installed {
            model: std::sync::Arc::new(model),
            slot,
        })
    }

    /// Finds the model to serve at start: the active slot's bundle, re-verified and loaded;
    /// if that fails, the other slot's, which then becomes active; otherwise none.
    pub fn boot(&self) -> Option<Installed> {
        let active = self.slots.active()?;
        for slot in [active, active.other()] {
            match self.load_slot(slot) {
                Ok(model) => {
                    if slot != active {
                        warn!(?slot, "active slot is unusable; serving the other slot");
                        if let Err(e) = self.slots.activate(slot) {
                            warn!(error = %e, "cannot repoint the active slot");
                        }
                    }
                    info!(model = %model.manifest.model_ref(), ?slot, "serving model");
                    return Some(Installed {
                        model: std::sync::Arc::new(model),
                        slot,
                    });
                }
                Err(e) => warn!(?slot, error = %e, "cannot serve model slot"),
            }
        }
        None
    }

    fn load_slot(&self, slot: Slot) -> Result<LoadedModel, InstallError> {
        let bytes = self.slots.read(slot)?;
        let verified = bundle::verify(&bytes, &self.trusted, &self.limits)?;
        Ok(LoadedModel::load(&verified)?)
    }
}
