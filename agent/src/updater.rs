//! Model updates: download a bundle, verify it, install it into the inactive slot,
//! smoke-test it, and switch. Also the boot path that finds the model to serve.

use std::time::Duration;

use edgeloop_shared::bundle::{self, BundleError, Limits, VerifiedBundle};
use edgeloop_shared::command::{DeltaOffer, DeployAction};
use edgeloop_shared::signing::TrustedKeys;

use crate::config::BundleTransfer;
use crate::transfer::{MAX_STALLS, PIECE_TIMEOUT, Pieces};
use crate::trust::SigningKeys;
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
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the command's bundle digest `{0}` is not 64 lowercase hex digits")]
    BadDigest(String),
    #[error("{url} sent more than the {announced} bytes the command announces; download stopped")]
    Oversize { url: String, announced: u64 },
    #[error("the model needs agent version {required} or later; this is {running}")]
    AgentTooOld { required: String, running: String },
    #[error(transparent)]
    WrongTarget(#[from] edgeloop_shared::bundle::TargetMismatch),
    #[error(
        "one inference takes {median_ms:.3} ms here (median), over the model's budget of {budget_ms} ms"
    )]
    OverLatencyBudget { median_ms: f64, budget_ms: f64 },
}

/// A file a signed command names: where to fetch it, its SHA-256 and its exact size.
#[derive(Debug, Clone, Copy)]
pub struct Remote<'a> {
    pub url: &'a str,
    pub sha256: &'a str,
    pub size: u64,
}

impl<'a> Remote<'a> {
    /// The full bundle of a deployment.
    pub fn bundle(action: &'a DeployAction) -> Self {
        Remote {
            url: &action.bundle_url,
            sha256: &action.bundle_sha256,
            size: action.bundle_size,
        }
    }

    /// The delta bundle a deployment offers.
    pub fn delta(offer: &'a DeltaOffer) -> Self {
        Remote {
            url: &offer.bundle_url,
            sha256: &offer.bundle_sha256,
            size: offer.bundle_size,
        }
    }
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
    /// The keys bundles must be signed with, as trust documents leave them.
    trusted: SigningKeys,
    http: reqwest::Client,
    controller_url: String,
    max_bundle_bytes: u64,
    slots: Slots,
    /// Where partial downloads wait to be resumed, one file per bundle digest.
    downloads: std::path::PathBuf,
    limits: Limits,
    transfer: BundleTransfer,
    /// Where pieces of a bundle fetched over MQTT arrive; none: HTTP only.
    pieces: Option<Pieces>,
    /// The board this device is, for models that name the boards they are for.
    board: Option<String>,
}

/// What a download has been checked for so far: the bundle's framing and signature as it
/// streams, and the SHA-256 of the whole file the command names.
struct Received<'t> {
    check: bundle::StreamCheck<'t>,
    digest: Sha256,
    bytes: u64,
}

impl<'t> Received<'t> {
    fn new(trusted: &'t TrustedKeys, limits: Limits) -> Self {
        Received {
            check: bundle::StreamCheck::new(trusted, limits),
            digest: Sha256::new(),
            bytes: 0,
        }
    }

    fn update(&mut self, chunk: &[u8]) -> Result<(), BundleError> {
        self.check.update(chunk)?;
        self.digest.update(chunk);
        self.bytes += chunk.len() as u64;
        Ok(())
    }
}

/// Size of the pieces a partial download is read back in.
const READ_BACK_CHUNK: usize = 64 * 1024;

impl Installer {
    pub fn new(
        trusted: SigningKeys,
        controller_url: &str,
        max_bundle_bytes: u64,
        slots: Slots,
        downloads: std::path::PathBuf,
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
            downloads,
            limits: Limits::default(),
            transfer: BundleTransfer::Http,
            pieces: None,
            board: None,
        }
    }

    /// Installs only models for this board (or for any), as well as for this architecture.
    pub fn on_board(mut self, board: &str) -> Self {
        self.board = (!board.is_empty()).then(|| board.to_string());
        self
    }

    /// Fetches bundles the way `transfer` says, over MQTT through `pieces`.
    pub fn with_transfer(mut self, transfer: BundleTransfer, pieces: Pieces) -> Self {
        self.transfer = transfer;
        self.pieces = Some(pieces);
        self
    }

    /// Hands a bundle piece that arrived over MQTT to the transfer waiting for it.
    pub fn deliver(&self, chunk: edgeloop_shared::protocol::BundleChunk) -> bool {
        self.pieces.as_ref().is_some_and(|p| p.deliver(chunk))
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

    /// Where the download of the file with this digest is kept until it is installed.
    fn part_path(&self, sha256: &str) -> Result<std::path::PathBuf, InstallError> {
        // Signed, but still a file name: only the digest's own alphabet may reach the path.
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(InstallError::BadDigest(sha256.to_string()));
        }
        Ok(self.downloads.join(format!("{sha256}.part")))
    }

    /// Downloads the bundle into a file named by its digest, checking it as it streams:
    /// the manifest signature as soon as the head is in (a tampered or foreign bundle
    /// stops the download there), the size against the command (and the configured
    /// maximum) with every chunk, and the SHA-256 at the end. A download cut short is
    /// resumed where it stopped, also by the next process: over HTTP with a Range request,
    /// over MQTT by asking for the pieces from there on. What is already on disk is checked
    /// again first. Bytes proven bad are deleted.
    pub async fn download(&self, remote: Remote<'_>) -> Result<Vec<u8>, InstallError> {
        let url = self.resolve_url(remote.url);
        if remote.size > self.max_bundle_bytes {
            return Err(InstallError::TooLarge {
                expected: remote.size,
                limit: self.max_bundle_bytes,
            });
        }
        let path = self.part_path(remote.sha256)?;
        tokio::fs::create_dir_all(&self.downloads)
            .await
            .map_err(|source| InstallError::Io {
                action: "cannot create",
                path: self.downloads.clone(),
                source,
            })?;
        let trusted = self.trusted.get();
        let mut part = Part::open(path, remote.size, &trusted, self.limits).await?;
        if part.received.bytes < remote.size {
            match (self.transfer, &self.pieces) {
                (BundleTransfer::Mqtt, Some(pieces)) => {
                    fetch_mqtt(pieces, remote.sha256, &mut part).await?
                }
                (BundleTransfer::Auto, Some(pieces)) => {
                    match fetch_http(&self.http, &url, &mut part).await {
                        Err(e @ InstallError::Download { .. }) => {
                            info!(%url, error = %e, "the controller's HTTP endpoint cannot be reached; fetching the bundle over MQTT");
                            fetch_mqtt(pieces, remote.sha256, &mut part).await?
                        }
                        other => other?,
                    }
                }
                _ => fetch_http(&self.http, &url, &mut part).await?,
            }
        }
        part.finish(remote.sha256).await
    }

    /// Deletes the download of a file once it is installed or refused.
    pub fn discard_download(&self, sha256: &str) {
        if let Ok(path) = self.part_path(sha256)
            && let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %path.display(), error = %e, "cannot delete a finished download");
        }
    }

    /// Partial downloads of other bundles are abandoned: one install runs at a time.
    /// (The full bundle and the delta of one command are kept side by side, so that each
    /// resumes.)
    pub async fn keep_only_downloads(&self, digests: &[&str]) {
        let keep: Vec<std::path::PathBuf> = digests
            .iter()
            .filter_map(|d| self.part_path(d).ok())
            .collect();
        let Ok(mut dir) = tokio::fs::read_dir(&self.downloads).await else {
            return;
        };
        while let Ok(Some(entry)) = dir.next_entry().await {
            let path = entry.path();
            if !keep.contains(&path) && path.extension().is_some_and(|e| e == "part") {
                info!(path = %path.display(), "abandoning the partial download of another bundle");
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
    }

    /// Verifies a downloaded bundle and checks that it is the model the command named.
    /// A delta bundle needs `base`, the model it was made against.
    pub fn verify(
        &self,
        bytes: &[u8],
        action: &DeployAction,
        base: Option<&[u8]>,
    ) -> Result<VerifiedBundle, InstallError> {
        let verified = bundle::verify_delta(bytes, &self.trusted.get(), &self.limits, base)?;
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
        check_requirements(&verified.manifest.requirements, self.board.as_deref())?;
        let slot = active.map_or(Slot::A, Slot::other);
        let expanded = verified.manifest.artifact.delta_base_sha256.is_some();
        self.slots
            .write(slot, bytes, expanded.then_some(verified.model.as_slice()))?;
        // Load what is on disk, not what is in memory: that is what the next boot will serve.
        let reverified = self.verify_slot(slot)?;
        debug_assert_eq!(reverified.manifest, verified.manifest);
        let model = LoadedModel::load(&reverified)?;
        if let Some(budget_ms) = reverified.manifest.requirements.latency_budget_ms {
            let median_ms = model.median_latency(LATENCY_ROUNDS)?.as_secs_f64() * 1000.0;
            if median_ms > budget_ms {
                return Err(InstallError::OverLatencyBudget {
                    median_ms,
                    budget_ms,
                });
            }
        }
        self.slots
            .activate(slot, &reverified.manifest.model_ref())?;
        Ok(Installed {
            model: std::sync::Arc::new(model),
            slot,
        })
    }

    /// Slots holding a bundle signed by a key that is not trusted now (after a trust
    /// document revoked it): the device would refuse them at its next start.
    pub fn slots_signed_by_untrusted(&self) -> Vec<(Slot, edgeloop_shared::signing::KeyId)> {
        let trusted = self.trusted.get();
        [Slot::A, Slot::B]
            .into_iter()
            .filter_map(|slot| {
                let bytes = self.slots.read(slot).ok()?;
                let layout = bundle::layout(&bytes, &self.limits).ok()?;
                let id = edgeloop_shared::signing::KeyId(bytes[layout.key_id].try_into().ok()?);
                (!trusted.contains(id)).then_some((slot, id))
            })
            .collect()
    }

    /// Finds the model to serve at start: the active slot's bundle, re-verified and loaded;
    /// if that fails, the other slot's, which then becomes active; otherwise none.
    pub fn boot(&self) -> Option<Installed> {
        let active = self.slots.active()?;
        for slot in [active, active.other()] {
            match self.load_slot(slot) {
                Ok(model) => {
                    let serving = model.manifest.model_ref();
                    if slot != active {
                        warn!(?slot, "active slot is unusable; serving the other slot");
                        // It records the version when it can; the pointer moves regardless,
                        // as this slot's model is the only one that serves.
                        let moved = self.slots.activate(slot, &serving).or_else(|e| {
                            warn!(error = %e, "cannot record the version served");
                            self.slots.reactivate(slot)
                        });
                        if let Err(e) = moved {
                            warn!(error = %e, "cannot repoint the active slot");
                        }
                    } else if let Err(e) = self.slots.record_version(&serving) {
                        // Slots made active by an agent that kept no record get one now.
                        warn!(error = %e, "cannot record the version served");
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

    /// Goes back to `expected`, which `slot` must still hold: verified and loaded again,
    /// then made active.
    pub fn roll_back_to(
        &self,
        slot: Slot,
        expected: &edgeloop_shared::protocol::ModelRef,
    ) -> Result<Installed, InstallError> {
        let model = self.load_slot(slot)?;
        let found = model.manifest.model_ref();
        if &found != expected {
            return Err(InstallError::WrongModel {
                expected: expected.to_string(),
                found: found.to_string(),
            });
        }
        self.slots.reactivate(slot)?;
        Ok(Installed {
            model: std::sync::Arc::new(model),
            slot,
        })
    }

    /// The highest version of the model `name` this device has made active; an unreadable
    /// record is an error.
    pub fn highest_version(&self, name: &str) -> Result<Option<u64>, InstallError> {
        Ok(self.slots.highest(name)?)
    }

    fn load_slot(&self, slot: Slot) -> Result<LoadedModel, InstallError> {
        Ok(LoadedModel::load(&self.verify_slot(slot)?)?)
    }

    /// The slot's bundle, verified: with the model kept beside it when it is a delta
    /// bundle (whose base may be gone), else decompressed from it.
    pub fn verify_slot(&self, slot: Slot) -> Result<VerifiedBundle, InstallError> {
        let bytes = self.slots.read(slot)?;
        let trusted = self.trusted.get();
        let kept = self.slots.read_model(slot)?;
        Ok(bundle::verify_expanded(
            &bytes,
            kept,
            &trusted,
            &self.limits,
        )?)
    }
}

/// A download's file, and what has been checked of its bytes so far.
struct Part<'t> {
    file: tokio::fs::File,
    path: std::path::PathBuf,
    /// The size the command announces.
    size: u64,
    received: Received<'t>,
    trusted: &'t TrustedKeys,
    limits: Limits,
}

impl<'t> Part<'t> {
    /// Opens the file, checking what an earlier attempt left as if it were arriving now.
    async fn open(
        path: std::path::PathBuf,
        size: u64,
        trusted: &'t TrustedKeys,
        limits: Limits,
    ) -> Result<Part<'t>, InstallError> {
        use tokio::io::AsyncReadExt;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .await
            .map_err(io_error("cannot open", &path))?;
        let mut part = Part {
            file,
            path,
            size,
            received: Received::new(trusted, limits),
            trusted,
            limits,
        };
        let on_disk = part
            .file
            .metadata()
            .await
            .map_err(io_error("cannot read", &part.path))?
            .len();
        if on_disk > size {
            part.restart().await?;
        } else if on_disk > 0 {
            let mut buf = vec![0; READ_BACK_CHUNK];
            loop {
                let n = part
                    .file
                    .read(&mut buf)
                    .await
                    .map_err(io_error("cannot read", &part.path))?;
                if n == 0 {
                    break;
                }
                if let Err(e) = part.received.update(&buf[..n]) {
                    return Err(part.discard(e.into()));
                }
            }
        }
        Ok(part)
    }

    /// Bad bytes are not kept for the next attempt.
    fn discard(&self, e: InstallError) -> InstallError {
        let _ = std::fs::remove_file(&self.path);
        e
    }

    /// Empties the file, to download from the start.
    async fn restart(&mut self) -> Result<(), InstallError> {
        self.file
            .set_len(0)
            .await
            .map_err(io_error("cannot truncate", &self.path))?;
        self.received = Received::new(self.trusted, self.limits);
        Ok(())
    }

    /// Checks and appends the next bytes; more than the announced size is `oversize`.
    async fn append(
        &mut self,
        bytes: &[u8],
        oversize: impl FnOnce() -> InstallError,
    ) -> Result<(), InstallError> {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        if self.received.bytes + bytes.len() as u64 > self.size {
            return Err(self.discard(oversize()));
        }
        if let Err(e) = self.received.update(bytes) {
            return Err(self.discard(e.into()));
        }
        self.file
            .seek(std::io::SeekFrom::Start(
                self.received.bytes - bytes.len() as u64,
            ))
            .await
            .map_err(io_error("cannot seek", &self.path))?;
        self.file
            .write_all(bytes)
            .await
            .map_err(io_error("cannot write", &self.path))
    }

    async fn sync(&self) -> Result<(), InstallError> {
        self.file
            .sync_data()
            .await
            .map_err(io_error("cannot sync", &self.path))
    }

    /// The complete file, once its size, digest and stream checks hold.
    async fn finish(self, sha256: &str) -> Result<Vec<u8>, InstallError> {
        let Part {
            path,
            size,
            received,
            ..
        } = self;
        if received.bytes != size {
            // Kept: the next attempt resumes from here.
            return Err(InstallError::SizeMismatch {
                expected: size,
                actual: received.bytes,
            });
        }
        let discard = |e: InstallError| {
            let _ = std::fs::remove_file(&path);
            e
        };
        let actual = hex::encode(received.digest.finalize());
        if actual != sha256 {
            return Err(discard(InstallError::DigestMismatch {
                expected: sha256.to_string(),
                actual,
            }));
        }
        received.check.finish().map_err(|e| discard(e.into()))?;
        tokio::fs::read(&path)
            .await
            .map_err(io_error("cannot read", &path))
    }
}

fn io_error(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// Fetches the rest of a download over HTTP: at most two requests, a resume and a fresh
/// start when the server cannot resume from where this device stands.
async fn fetch_http(
    http: &reqwest::Client,
    url: &str,
    part: &mut Part<'_>,
) -> Result<(), InstallError> {
    let size = part.size;
    let mut attempts = 0;
    while part.received.bytes < size && attempts < 2 {
        attempts += 1;
        let failed = |e: reqwest::Error| InstallError::Download {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let from = part.received.bytes;
        let mut request = http.get(url);
        if from > 0 {
            info!(%url, from, of = size, "resuming download");
            request = request.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let mut response = request.send().await.map_err(failed)?;
        let status = response.status().as_u16();
        let restart = match status {
            206 if from > 0 => content_range_start(&response) != Some(from),
            200 => from > 0,
            // The file is shorter than what this device holds of it.
            416 if from > 0 => true,
            _ => {
                return Err(InstallError::HttpStatus {
                    url: url.to_string(),
                    status,
                });
            }
        };
        if restart {
            info!(%url, status, from,
                "the server cannot resume from here; downloading from the start");
            part.restart().await?;
            if status != 200 {
                continue;
            }
        }
        let oversize = || InstallError::Oversize {
            url: url.to_string(),
            announced: size,
        };
        if response
            .content_length()
            .is_some_and(|n| part.received.bytes + n > size)
        {
            return Err(part.discard(oversize()));
        }
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            part.append(&chunk, oversize).await?;
        }
        part.sync().await?;
    }
    Ok(())
}

/// Fetches the rest of a download over MQTT (PROTOCOL §6.2): asks for a window of pieces
/// from where the file stands, takes them in order, and asks again when they stop coming.
async fn fetch_mqtt(
    pieces: &Pieces,
    sha256: &str,
    part: &mut Part<'_>,
) -> Result<(), InstallError> {
    use edgeloop_shared::protocol::MAX_BUNDLE_REQUEST_BYTES;
    const VIA: &str = "the broker (MQTT)";
    let size = part.size;
    let mut receiving = pieces.open(sha256);
    let mut stalls = 0;
    while part.received.bytes < size {
        let from = part.received.bytes;
        let window_end = (from + MAX_BUNDLE_REQUEST_BYTES).min(size);
        pieces.request(sha256, from, window_end - from);
        while part.received.bytes < window_end {
            let chunk = match tokio::time::timeout(PIECE_TIMEOUT, receiving.rx.recv()).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Err(InstallError::Task("the piece channel closed".into())),
                Err(_) => {
                    stalls += 1;
                    if stalls >= MAX_STALLS {
                        part.sync().await?;
                        return Err(InstallError::Download {
                            url: VIA.into(),
                            reason: format!(
                                "no piece came in {} s; {} of {size} bytes are kept",
                                (PIECE_TIMEOUT * MAX_STALLS).as_secs(),
                                part.received.bytes
                            ),
                        });
                    }
                    break;
                }
            };
            if let Some(reason) = &chunk.error {
                return Err(InstallError::Download {
                    url: VIA.into(),
                    reason: reason.clone(),
                });
            }
            if chunk.total_size != size {
                return Err(InstallError::SizeMismatch {
                    expected: size,
                    actual: chunk.total_size,
                });
            }
            // A piece of an earlier window, or one after a lost piece: the next request
            // asks again from where the file stands.
            if chunk.offset != part.received.bytes {
                continue;
            }
            match chunk.bytes() {
                Ok(bytes) => {
                    part.append(&bytes, || InstallError::Oversize {
                        url: VIA.into(),
                        announced: size,
                    })
                    .await?;
                    stalls = 0;
                }
                Err(reason) => {
                    warn!(offset = chunk.offset, %reason, "a damaged bundle piece; asking again");
                    stalls += 1;
                    break;
                }
            }
        }
    }
    part.sync().await
}

/// Passes through the golden vectors when measuring latency against a budget.
const LATENCY_ROUNDS: usize = 20;

/// What the manifest asks of the device itself: its agent version, architecture and board.
fn check_requirements(
    requirements: &edgeloop_shared::bundle::Requirements,
    board: Option<&str>,
) -> Result<(), InstallError> {
    check_requirements_of(
        requirements,
        crate::AGENT_VERSION,
        std::env::consts::ARCH,
        board,
    )
}

fn check_requirements_of(
    requirements: &edgeloop_shared::bundle::Requirements,
    running: &str,
    arch: &str,
    board: Option<&str>,
) -> Result<(), InstallError> {
    if let Some(required) = &requirements.min_agent_version
        && !bundle::version_at_least(running, required)
    {
        return Err(InstallError::AgentTooOld {
            required: required.clone(),
            running: running.to_string(),
        });
    }
    Ok(requirements.fits(arch, board)?)
}

/// The first byte of a 206 response's `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split_once('-')?.0.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_shared::bundle::{Artifact, DType, Manifest, TensorSpec};
    use edgeloop_shared::drift::{DEFAULT_BINS, ReferenceProfile};
    use edgeloop_shared::protocol::{
        BUNDLE_CHUNK_BYTES, BundleChunk, BundleRequest, MAX_BUNDLE_REQUEST_BYTES,
    };
    use edgeloop_shared::signing::SecretKey;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn signed_bundle(key: &SecretKey) -> Vec<u8> {
        let names = vec!["a".to_string()];
        let manifest = Manifest {
            format: bundle::FORMAT,
            name: "demo".into(),
            version: 2,
            label: None,
            created_ms: 1,
            artifact: Artifact::default(),
            inputs: vec![TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![None, Some(1)],
                names: names.clone(),
                kind: None,
                preprocess: None,
                layout: None,
                channel_axis: None,
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                dtype: DType::F32,
                shape: vec![None, Some(1)],
                names: vec![],
                kind: None,
                preprocess: None,
                layout: None,
                channel_axis: None,
            }],
            reference: ReferenceProfile::from_columns(
                &names,
                &[(0..50).map(f64::from).collect()],
                DEFAULT_BINS,
            )
            .unwrap(),
            drift: None,
            golden: None,
            requirements: Default::default(),
            lineage: None,
        };
        // Incompressible bytes, so that the bundle is large enough to cut in the middle.
        let model: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        bundle::pack(manifest, &model, key).unwrap()
    }

    /// How the fake server answers one request: the raw bytes it writes before closing.
    type Answer = Box<dyn Fn(usize, &str) -> Vec<u8> + Send + Sync>;

    /// An HTTP server written by hand, so that a response can be cut exactly where a test
    /// wants it. Records the head of every request.
    async fn serve(answer: Answer) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/artifacts/demo/2", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let n = {
                    let mut r = seen.lock().unwrap();
                    r.push(head.clone());
                    r.len()
                };
                let _ = socket.write_all(&answer(n, &head)).await;
                let _ = socket.flush().await;
                // The client sees what was sent before it sees the connection end.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let _ = socket.shutdown().await;
            }
        });
        (url, requests)
    }

    fn response(status: &str, headers: &str, body: &[u8], content_length: usize) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {content_length}\r\nconnection: close\r\n{headers}\r\n"
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    }

    /// The `Range` start a request asked for.
    fn range_start(head: &str) -> Option<usize> {
        let line = head.lines().find(|l| l.starts_with("range:"))?;
        line.trim_start_matches("range:")
            .trim()
            .strip_prefix("bytes=")?
            .trim_end_matches('-')
            .parse()
            .ok()
    }

    fn installer(dir: &std::path::Path, key: &SecretKey) -> Installer {
        Installer::new(
            SigningKeys::new(TrustedKeys::new([key.public().clone()])),
            "http://127.0.0.1:1",
            10 << 20,
            Slots::open(dir).unwrap(),
            dir.join("downloads"),
        )
    }

    fn action(url: &str, bundle: &[u8]) -> DeployAction {
        DeployAction {
            rollout_id: 1,
            model: edgeloop_shared::protocol::ModelRef {
                name: "demo".into(),
                version: 2,
            },
            bundle_url: url.to_string(),
            bundle_sha256: edgeloop_shared::sha256_hex(bundle),
            bundle_size: bundle.len() as u64,
            delta: None,
        }
    }

    /// A state directory, a signing key and a bundle it signed.
    fn fixture() -> (tempfile::TempDir, SecretKey, Arc<Vec<u8>>) {
        let key = SecretKey::from_seed([9; 32]);
        let bundle = Arc::new(signed_bundle(&key));
        (tempfile::tempdir().unwrap(), key, bundle)
    }

    /// A server answering every request with the whole of `bundle`.
    fn whole(bundle: &Arc<Vec<u8>>) -> Answer {
        let b = bundle.clone();
        Box::new(move |_, _| response("200 OK", "", &b, b.len()))
    }

    /// An installer that fetches over MQTT from a fake controller: `answer` gets each
    /// request (and how many came before it) and the bundle, and delivers what it likes.
    fn over_mqtt(
        dir: &std::path::Path,
        key: &SecretKey,
        bundle: Arc<Vec<u8>>,
        answer: impl Fn(usize, &BundleRequest, &[u8], &Pieces) + Send + Sync + 'static,
    ) -> (Installer, Arc<Mutex<Vec<BundleRequest>>>) {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<BundleRequest>();
        let pieces = Pieces::new(Arc::new(move |r| {
            let _ = tx.send(r);
        }));
        let installer = installer(dir, key).with_transfer(BundleTransfer::Mqtt, pieces.clone());
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(request.clone());
                    seen.len() - 1
                };
                answer(n, &request, &bundle, &pieces);
            }
        });
        (installer, requests)
    }

    /// What a controller answers: the pieces of the range asked for.
    fn pieces_of(request: &BundleRequest, bundle: &[u8]) -> Vec<BundleChunk> {
        let start = request.offset as usize;
        let end = (start + request.length as usize).min(bundle.len());
        BundleChunk::cut(
            &request.bundle_sha256,
            &bundle[start..end],
            request.offset,
            bundle.len() as u64,
        )
    }

    #[tokio::test]
    async fn a_bundle_comes_over_mqtt_in_windows_and_damaged_pieces_are_asked_again() {
        let (dir, key, _) = fixture();
        // Large enough for two request windows.
        let bundle = Arc::new(
            bundle::pack(
                vibration(1),
                // Bytes zstd cannot shrink, posing as a model: it is only transferred.
                &edgeloop_shared::pseudo_random_bytes(
                    MAX_BUNDLE_REQUEST_BYTES as usize + 300_000,
                    7,
                ),
                &key,
            )
            .unwrap(),
        );
        let (installer, requests) = over_mqtt(dir.path(), &key, bundle.clone(), |n, r, b, p| {
            let mut pieces = pieces_of(r, b);
            // Another bundle's piece, which is ignored.
            let mut stray = pieces[0].clone();
            stray.bundle_sha256 = "cd".repeat(32);
            p.deliver(stray);
            if n == 0 {
                // The second piece of the first window comes damaged.
                pieces[1].data = pieces[0].data.clone();
            }
            for piece in pieces {
                p.deliver(piece);
            }
        });
        let action = action("/artifacts/demo/2", &bundle);
        let got = installer.download(Remote::bundle(&action)).await.unwrap();
        assert_eq!(got, *bundle);
        let requests = requests.lock().unwrap().clone();
        assert_eq!(requests[0].offset, 0);
        assert_eq!(
            requests[1].offset, BUNDLE_CHUNK_BYTES as u64,
            "asked again from the damaged piece"
        );
        assert!(
            requests
                .iter()
                .all(|r| r.length <= MAX_BUNDLE_REQUEST_BYTES)
        );
        assert_eq!(
            requests.last().unwrap().offset + requests.last().unwrap().length,
            bundle.len() as u64
        );
    }

    #[tokio::test]
    async fn over_mqtt_a_refusal_a_wrong_size_and_a_tampered_bundle_stop_the_transfer() {
        let (dir, key, bundle) = fixture();
        let deploy = action("/artifacts/demo/2", &bundle);
        let (refusing, _) = over_mqtt(dir.path(), &key, bundle.clone(), |_, r, _, p| {
            p.deliver(BundleChunk::failed(
                &r.bundle_sha256,
                "no bundle has SHA-256 …".into(),
            ));
        });
        let err = refusing
            .download(Remote::bundle(&deploy))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, InstallError::Download { reason, .. } if reason.contains("no bundle")),
            "{err}"
        );

        let (lying, _) = over_mqtt(dir.path(), &key, bundle.clone(), |_, r, b, p| {
            for mut piece in pieces_of(r, b) {
                piece.total_size += 1;
                p.deliver(piece);
            }
        });
        let err = lying.download(Remote::bundle(&deploy)).await.unwrap_err();
        assert!(matches!(err, InstallError::SizeMismatch { .. }), "{err}");

        // Pieces whose own digests hold, of a bundle whose signature does not.
        let layout = bundle::layout(&bundle, &Limits::default()).unwrap();
        let mut tampered = bundle.to_vec();
        tampered[layout.manifest.start + 3] ^= 1;
        let tampered = Arc::new(tampered);
        let (forging, _) = over_mqtt(dir.path(), &key, tampered.clone(), |_, r, b, p| {
            for piece in pieces_of(r, b) {
                p.deliver(piece);
            }
        });
        let forged = action("/artifacts/demo/2", &tampered);
        let err = forging.download(Remote::bundle(&forged)).await.unwrap_err();
        assert!(matches!(err, InstallError::Verify(_)), "{err}");
        assert!(!forging.part_path(&forged.bundle_sha256).unwrap().exists());
    }

    #[tokio::test]
    async fn a_cut_download_resumes_where_it_stopped_also_after_a_restart() {
        let (dir, key, bundle) = fixture();
        let cut = bundle.len() / 2;
        let b = bundle.clone();
        let (url, requests) = serve(Box::new(move |n, head| match (n, range_start(head)) {
            // The first answer promises everything and stops half-way.
            (1, None) => response("200 OK", "", &b[..cut], b.len()),
            (_, Some(from)) => response(
                "206 Partial Content",
                &format!(
                    "content-range: bytes {from}-{}/{}\r\n",
                    b.len() - 1,
                    b.len()
                ),
                &b[from..],
                b.len() - from,
            ),
            _ => response("500 Internal Server Error", "", b"", 0),
        }))
        .await;
        let action = action(&url, &bundle);

        let first = installer(dir.path(), &key)
            .download(Remote::bundle(&action))
            .await;
        assert!(
            matches!(first, Err(InstallError::Download { .. })),
            "{first:?}"
        );
        let part = dir
            .path()
            .join("downloads")
            .join(format!("{}.part", action.bundle_sha256));
        let kept = std::fs::read(&part).unwrap();
        assert!(
            kept == bundle[..cut],
            "the partial file holds {} bytes, not the {cut} received",
            kept.len()
        );

        // A new installer, as after a restart, picks the partial file up.
        let again = installer(dir.path(), &key);
        assert_eq!(
            again.download(Remote::bundle(&action)).await.unwrap(),
            *bundle
        );
        let requests = requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 2);
        assert_eq!(range_start(&requests[1]), Some(cut));
        again.discard_download(&action.bundle_sha256);
        assert!(!part.exists());
    }

    #[tokio::test]
    async fn a_server_that_cannot_resume_is_downloaded_from_the_start() {
        let (dir, key, bundle) = fixture();
        let (url, requests) = serve(whole(&bundle)).await;
        let action = action(&url, &bundle);
        let installer = installer(dir.path(), &key);
        let part = installer.part_path(&action.bundle_sha256).unwrap();
        std::fs::create_dir_all(part.parent().unwrap()).unwrap();
        std::fs::write(&part, &bundle[..1000]).unwrap();
        assert_eq!(
            installer.download(Remote::bundle(&action)).await.unwrap(),
            *bundle
        );
        assert_eq!(range_start(&requests.lock().unwrap()[0]), Some(1000));
    }

    #[tokio::test]
    async fn a_server_that_answers_another_range_or_416_is_downloaded_from_the_start() {
        let (dir, key, bundle) = fixture();
        for odd in ["wrong range", "416"] {
            let b = bundle.clone();
            let (url, requests) = serve(Box::new(move |_, head| match range_start(head) {
                Some(_) if odd == "416" => response(
                    "416 Range Not Satisfiable",
                    &format!("content-range: bytes */{}\r\n", b.len()),
                    b"",
                    0,
                ),
                // Claims to resume, but from the start of the file.
                Some(_) => response(
                    "206 Partial Content",
                    &format!("content-range: bytes 0-{}/{}\r\n", b.len() - 1, b.len()),
                    &b,
                    b.len(),
                ),
                None => response("200 OK", "", &b, b.len()),
            }))
            .await;
            let action = action(&url, &bundle);
            let installer = installer(dir.path(), &key);
            let part = installer.part_path(&action.bundle_sha256).unwrap();
            std::fs::create_dir_all(part.parent().unwrap()).unwrap();
            std::fs::write(&part, &bundle[..1000]).unwrap();
            assert_eq!(
                installer.download(Remote::bundle(&action)).await.unwrap(),
                *bundle,
                "{odd}"
            );
            let requests = requests.lock().unwrap().clone();
            assert_eq!(
                requests.iter().map(|r| range_start(r)).collect::<Vec<_>>(),
                vec![Some(1000), None],
                "{odd}"
            );
        }
    }

    #[test]
    fn the_device_must_be_recent_enough_and_of_a_listed_architecture_and_board() {
        use edgeloop_shared::bundle::{Requirements, TargetMismatch};
        let needs = |min: Option<&str>, targets: &[&str]| Requirements {
            min_agent_version: min.map(str::to_string),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ..Requirements::default()
        };
        let check =
            |r: &Requirements, running, arch, board| check_requirements_of(r, running, arch, board);
        assert!(check(&needs(None, &[]), "0.1.0", "x86_64", None).is_ok());
        assert!(check(&needs(Some("0.1.0"), &["x86_64"]), "0.1.0", "x86_64", None).is_ok());
        assert!(check(&needs(Some("0.1.2"), &[]), "0.1.10", "x86_64", None).is_ok());
        assert!(matches!(
            check(&needs(Some("0.2.0"), &[]), "0.1.9", "x86_64", None),
            Err(InstallError::AgentTooOld { .. })
        ));
        let err = check(&needs(None, &["aarch64", "arm"]), "0.1.0", "x86_64", None).unwrap_err();
        assert!(
            matches!(err, InstallError::WrongTarget(TargetMismatch::Arch { .. })),
            "{err}"
        );
        let boards = Requirements {
            targets: vec!["aarch64".into()],
            boards: vec!["rpi4".into(), "rpi5".into()],
            ..Requirements::default()
        };
        assert!(check(&boards, "0.1.0", "aarch64", Some("rpi5")).is_ok());
        let err = check(&boards, "0.1.0", "aarch64", Some("jetson-orin-nano")).unwrap_err();
        assert!(
            matches!(err, InstallError::WrongTarget(TargetMismatch::Board { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("a jetson-orin-nano"), "{err}");
        let err = check(&boards, "0.1.0", "aarch64", None).unwrap_err();
        assert!(err.to_string().contains("no named board"), "{err}");
        // The architecture is checked first: a board of the list on the wrong CPU is refused.
        assert!(matches!(
            check(&boards, "0.1.0", "x86_64", Some("rpi4")),
            Err(InstallError::WrongTarget(TargetMismatch::Arch { .. }))
        ));
    }

    const MODEL_V1: &[u8] = include_bytes!("../../controller/assets/vibration/model_v1.onnx");
    const MODEL_V2: &[u8] = include_bytes!("../../controller/assets/vibration/model_v2.onnx");

    /// The manifest of the vibration example model, version `version`.
    fn vibration(version: u64) -> Manifest {
        let names: Vec<String> = ["rms", "peak", "kurtosis", "temperature"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let columns: Vec<Vec<f64>> = (1..=4)
            .map(|f| (0..20).map(|i| f64::from(i * f)).collect())
            .collect();
        Manifest::classifier("vibration", version, &names, &columns, 2).unwrap()
    }

    #[test]
    fn a_delta_install_keeps_its_model_and_serves_after_its_base_is_overwritten() {
        let (dir, key, _) = fixture();
        let installer = installer(dir.path(), &key);
        let trusted = installer.trusted.get();
        let limits = Limits::default();
        let full_v1 = bundle::pack(vibration(1), MODEL_V1, &key).unwrap();
        let v1 = bundle::verify(&full_v1, &trusted, &limits).unwrap();
        let first = installer.install(&full_v1, &v1, None).unwrap();

        // v2 as a delta against v1, which the active slot holds.
        let delta_v2 = bundle::pack_delta(vibration(2), MODEL_V2, MODEL_V1, &key).unwrap();
        let base = installer.verify_slot(first.slot).unwrap();
        assert_eq!(base.model, MODEL_V1);
        let v2 = bundle::verify_delta(&delta_v2, &trusted, &limits, Some(&base.model)).unwrap();
        let second = installer.install(&delta_v2, &v2, Some(first.slot)).unwrap();
        assert_eq!(second.model.manifest.version, 2);
        assert_eq!(
            installer.slots.read_model(second.slot).unwrap().as_deref(),
            Some(MODEL_V2)
        );

        // v3, a full bundle, overwrites v1: v2 still verifies and serves, without its base.
        let full_v3 = bundle::pack(vibration(3), MODEL_V1, &key).unwrap();
        let v3 = bundle::verify(&full_v3, &trusted, &limits).unwrap();
        let third = installer.install(&full_v3, &v3, Some(second.slot)).unwrap();
        assert_eq!(third.slot, first.slot);
        assert_eq!(installer.slots.read_model(third.slot).unwrap(), None);
        let back = installer
            .roll_back_to(second.slot, &second.model.manifest.model_ref())
            .unwrap();
        assert_eq!(back.model.manifest.version, 2);
        assert_eq!(installer.boot().unwrap().model.manifest.version, 2);

        // The kept model is held to the signed digest: damaged, the slot is refused and
        // the boot falls back to the other slot.
        let kept = dir.path().join("slots/b/model.onnx");
        let mut damaged = std::fs::read(&kept).unwrap();
        damaged[100] ^= 1;
        std::fs::write(&kept, damaged).unwrap();
        let err = installer.verify_slot(second.slot).unwrap_err();
        assert!(
            matches!(
                err,
                InstallError::Verify(BundleError::DigestMismatch { what: "model", .. })
            ),
            "{err}"
        );
        let booted = installer.boot().unwrap();
        assert_eq!(
            (booted.slot, booted.model.manifest.version),
            (third.slot, 3)
        );
    }

    #[test]
    fn a_model_over_its_latency_budget_is_not_activated() {
        let (dir, key, _) = fixture();
        let pack = |budget_ms: f64| {
            let mut manifest = vibration(1);
            manifest.requirements.latency_budget_ms = Some(budget_ms);
            bundle::pack(manifest, MODEL_V1, &key).unwrap()
        };
        let installer = installer(dir.path(), &key);
        // A nanosecond for one inference: no device meets that.
        let tight = pack(1e-6);
        let verified =
            bundle::verify(&tight, &installer.trusted.get(), &Limits::default()).unwrap();
        let err = installer.install(&tight, &verified, None).unwrap_err();
        assert!(
            matches!(err, InstallError::OverLatencyBudget { .. }),
            "{err}"
        );
        assert_eq!(installer.slots.active(), None, "nothing was activated");
        let roomy = pack(10_000.0);
        let verified =
            bundle::verify(&roomy, &installer.trusted.get(), &Limits::default()).unwrap();
        installer.install(&roomy, &verified, None).unwrap();
        assert!(installer.slots.active().is_some());
    }

    #[tokio::test]
    async fn a_tampered_head_stops_the_download_and_leaves_nothing() {
        let (dir, key, bundle) = fixture();
        let layout = bundle::layout(&bundle, &Limits::default()).unwrap();
        let mut tampered = bundle.to_vec();
        tampered[layout.manifest.start + 10] ^= 0x20;
        let (url, _) = serve(whole(&Arc::new(tampered.clone()))).await;
        let installer = installer(dir.path(), &key);
        let action = action(&url, &tampered);
        let err = installer
            .download(Remote::bundle(&action))
            .await
            .unwrap_err();
        assert!(
            matches!(err, InstallError::Verify(BundleError::Signature(_))),
            "{err}"
        );
        assert!(!installer.part_path(&action.bundle_sha256).unwrap().exists());

        // Bad bytes left on disk by an earlier attempt are found before anything is fetched.
        let (url, requests) = serve(Box::new(|_, _| response("500 Oops", "", b"", 0))).await;
        let action = DeployAction {
            bundle_url: url,
            ..action
        };
        let part = installer.part_path(&action.bundle_sha256).unwrap();
        std::fs::write(&part, &tampered[..layout.artifact.start]).unwrap();
        let err = installer
            .download(Remote::bundle(&action))
            .await
            .unwrap_err();
        assert!(matches!(err, InstallError::Verify(_)), "{err}");
        assert!(requests.lock().unwrap().is_empty());
        assert!(!part.exists());
    }

    #[tokio::test]
    async fn more_bytes_than_announced_and_a_wrong_digest_are_refused() {
        let (dir, key, bundle) = fixture();
        let installer = installer(dir.path(), &key);
        // With a length announced, and without one: then the overflow is caught as the
        // bytes arrive.
        let b = bundle.clone();
        let unannounced: Answer = Box::new(move |_, _| {
            let mut out = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
            out.extend_from_slice(&b);
            out
        });
        let mut url = String::new();
        for answer in [whole(&bundle), unannounced] {
            url = serve(answer).await.0;
            let short = DeployAction {
                bundle_size: bundle.len() as u64 - 10,
                ..action(&url, &bundle)
            };
            assert!(matches!(
                installer.download(Remote::bundle(&short)).await,
                Err(InstallError::Oversize { .. })
            ));
            assert!(!installer.part_path(&short.bundle_sha256).unwrap().exists());
        }
        let wrong = DeployAction {
            bundle_sha256: "ab".repeat(32),
            ..action(&url, &bundle)
        };
        assert!(matches!(
            installer.download(Remote::bundle(&wrong)).await,
            Err(InstallError::DigestMismatch { .. })
        ));
        assert!(!installer.part_path(&wrong.bundle_sha256).unwrap().exists());
        let hostile = DeployAction {
            bundle_sha256: "../../etc/passwd".into(),
            ..action(&url, &bundle)
        };
        assert!(matches!(
            installer.download(Remote::bundle(&hostile)).await,
            Err(InstallError::BadDigest(_))
        ));
    }
}
