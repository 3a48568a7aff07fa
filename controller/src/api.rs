//! The JSON API, the dashboard and bundle downloads. Every error becomes an HTTP status in
//! one place, [`ApiError::into_response`].

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use edgeloop_agent::now_ms;
use edgeloop_shared::is_valid_identifier;
use serde::Deserialize;
use tokio::sync::Notify;

use crate::ingest::{IngestStats, IngestStatsSnapshot};
use crate::plan::RolloutPlan;
use crate::registry::ArtifactStore;
use crate::rollout::{self, Change, RolloutError, RolloutRequest};
use crate::store::{
    AuditEntry, DeploymentEvent, DeviceRow, HourlyRow, ModelRow, RetrainingRow, RolloutRow, Store,
    StoreError, TelemetryRow,
};
use crate::trust::{Current, RelayError};
use edgeloop_shared::trust::SignedTrust;

const DASHBOARD_HTML: &str = include_str!("dashboard.html");
const DEFAULT_LIMIT: u32 = 20;
const MAX_LIMIT: u32 = 1000;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub stats: Arc<IngestStats>,
    pub artifacts: ArtifactStore,
    pub offline_after: Duration,
    pub dispatcher_wake: Arc<Notify>,
    pub trust: Arc<crate::trust::TrustRelay>,
    /// The retraining policies this controller runs (from its configuration).
    pub policies: Arc<Vec<crate::retrain::RetrainingPolicy>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error("cannot read artifact: {0}")]
    Artifact(std::io::Error),
    #[error(transparent)]
    Trust(#[from] RelayError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_)
            | ApiError::Rollout(RolloutError::NoDevices | RolloutError::Plan(_))
            | ApiError::Trust(RelayError::Invalid(_) | RelayError::NoRoots) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Trust(RelayError::Stale(_) | RelayError::Raced) => StatusCode::CONFLICT,
            ApiError::NotFound(_)
            | ApiError::Store(StoreError::NotFound(_))
            | ApiError::Rollout(RolloutError::Store(StoreError::NotFound(_))) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Store(StoreError::Conflict(_))
            | ApiError::Rollout(
                RolloutError::Store(StoreError::Conflict(_)) | RolloutError::WrongState { .. },
            ) => StatusCode::CONFLICT,
            ApiError::Store(_)
            | ApiError::Rollout(_)
            | ApiError::Artifact(_)
            | ApiError::Trust(_) => {
                tracing::error!(error = %self, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}/telemetry", get(telemetry))
        .route("/api/v1/devices/{id}/telemetry/hourly", get(hourly))
        .route("/api/v1/devices/{id}/deployments", get(deployment_events))
        .route("/api/v1/models", get(models))
        .route("/api/v1/rollouts", post(create_rollout).get(rollouts))
        .route("/api/v1/rollouts/{id}", get(rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(change_rollout))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/retrainings", get(retrainings))
        .route("/api/v1/retraining-policies", get(policies))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/trust", get(trust).post(publish_trust))
        .route("/artifacts/{name}/{version}", get(artifact))
        .with_state(state)
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD_HTML)
}

/// A device as the API shows it: `online` also requires having been heard from within
/// `offline_after`.
pub fn with_presence(mut row: DeviceRow, offline_after: Duration, now_ms: u64) -> DeviceRow {
    row.online =
        row.online && now_ms.saturating_sub(row.last_seen_ms) <= offline_after.as_millis() as u64;
    row
}

async fn devices(State(s): State<AppState>) -> ApiResult<Vec<DeviceRow>> {
    let now = now_ms();
    Ok(Json(
        s.store
            .devices()
            .await?
            .into_iter()
            .map(|d| with_presence(d, s.offline_after, now))
            .collect(),
    ))
}

#[derive(Debug, Deserialize)]
struct LimitQuery {
    limit: Option<u32>,
}

fn limit(q: &LimitQuery) -> Result<u32, ApiError> {
    match q.limit {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit {n} is not in 1..={MAX_LIMIT}"
        ))),
    }
}

fn device_id(id: &str) -> Result<&str, ApiError> {
    if is_valid_identifier(id) {
        Ok(id)
    } else {
        Err(ApiError::BadRequest(format!(
            "`{id}` is not a valid device id"
        )))
    }
}

async fn telemetry(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<TelemetryRow>> {
    Ok(Json(s.store.telemetry(device_id(&id)?, limit(&q)?).await?))
}

async fn hourly(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<HourlyRow>> {
    Ok(Json(s.store.hourly(device_id(&id)?, limit(&q)?).await?))
}

async fn deployment_events(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<DeploymentEvent>> {
    Ok(Json(
        s.store
            .deployment_events(device_id(&id)?, limit(&q)?)
            .await?,
    ))
}

async fn models(State(s): State<AppState>) -> ApiResult<Vec<ModelRow>> {
    Ok(Json(s.store.models().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    pub model: String,
    pub version: u64,
    /// Devices to deploy to; every known device when absent.
    pub devices: Option<Vec<String>>,
    /// Send rollback commands, with which devices install a version that is not above
    /// their active one (plain deploys of such a version are refused).
    #[serde(default)]
    pub rollback: bool,
    /// Waves, thresholds and the device timeout; all at once when absent.
    #[serde(default)]
    pub plan: RolloutPlan,
    /// Why, for the audit log.
    pub reason: Option<String>,
}

/// The header in which an operator's tool names who acts, for the audit log.
pub const ACTOR_HEADER: &str = "x-edgeloop-actor";

/// Who a request acts for: the `x-edgeloop-actor` header, `api` when there is none.
fn actor(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get(ACTOR_HEADER) {
        None => Ok("api".into()),
        Some(v) => v
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|a| !a.is_empty() && a.len() <= 128)
            .map(str::to_string)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{ACTOR_HEADER} must be 1 to 128 visible ASCII characters"
                ))
            }),
    }
}

async fn create_rollout(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CreateRollout>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<RolloutRow>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if let Some(devices) = &body.devices {
        for d in devices {
            device_id(d)?;
        }
    }
    let row = rollout::create(
        s.store.as_ref(),
        RolloutRequest {
            name: body.model,
            version: body.version,
            rollback: body.rollback,
            devices: body.devices,
            plan: body.plan,
            actor: actor(&headers)?,
            reason: body.reason,
        },
    )
    .await?;
    s.dispatcher_wake.notify_one();
    Ok((StatusCode::CREATED, Json(row)))
}

/// The body of pause, resume and abort; all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRollout {
    /// Why, for the audit log and the rollout's `reason`.
    pub reason: Option<String>,
    /// Abort only: roll the devices that run the new version back to their previous model.
    #[serde(default)]
    pub rollback: bool,
}

/// What pause, resume and abort answer: the rollout, and the rollbacks an abort started.
#[derive(Debug, serde::Serialize)]
pub struct Changed {
    pub rollout: RolloutRow,
    pub rollbacks: Vec<RolloutRow>,
}

/// `POST /api/v1/rollouts/{id}/pause|resume|abort`, with an optional JSON body.
async fn change_rollout(
    State(s): State<AppState>,
    Path((id, action)): Path<(u64, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Changed> {
    // The body is optional: no body means no reason.
    let body: ChangeRollout = if body.iter().all(u8::is_ascii_whitespace) {
        ChangeRollout::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?
    };
    let change = match action.as_str() {
        "abort" => Change::Abort {
            rollback: body.rollback,
        },
        "pause" | "resume" if body.rollback => {
            return Err(ApiError::BadRequest(
                "`rollback` goes with abort only".into(),
            ));
        }
        "pause" => Change::Pause,
        "resume" => Change::Resume,
        other => {
            return Err(ApiError::NotFound(format!(
                "rollout action `{other}` (pause, resume or abort)"
            )));
        }
    };
    let (rollout, rollbacks) = rollout::change(
        s.store.as_ref(),
        id,
        change,
        &actor(&headers)?,
        body.reason.as_deref(),
    )
    .await?;
    s.dispatcher_wake.notify_one();
    Ok(Json(Changed { rollout, rollbacks }))
}

async fn policies(State(s): State<AppState>) -> Json<Vec<crate::retrain::RetrainingPolicy>> {
    Json(s.policies.as_ref().clone())
}

async fn retrainings(
    State(s): State<AppState>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<RetrainingRow>> {
    Ok(Json(s.store.retrainings(limit(&q)?).await?))
}

async fn audit(
    State(s): State<AppState>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<AuditEntry>> {
    Ok(Json(s.store.audit(limit(&q)?).await?))
}

async fn rollouts(State(s): State<AppState>) -> ApiResult<Vec<RolloutRow>> {
    Ok(Json(s.store.rollouts().await?))
}

async fn rollout(State(s): State<AppState>, Path(id): Path<u64>) -> ApiResult<RolloutRow> {
    s.store
        .rollout(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("rollout {id}")))
}

async fn trust(State(s): State<AppState>) -> ApiResult<Current> {
    s.trust
        .current()
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("trust document".into()))
}

/// Relays a trust document signed offline with a root key to the fleet.
async fn publish_trust(
    State(s): State<AppState>,
    body: Result<Json<SignedTrust>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Current>), ApiError> {
    let Json(signed) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    Ok((StatusCode::CREATED, Json(s.trust.replace(signed).await?)))
}

async fn stats(State(s): State<AppState>) -> Json<IngestStatsSnapshot> {
    Json(s.stats.snapshot())
}

/// A byte range a client asked for, resolved against a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
enum ByteRange {
    /// No usable `Range` header: the whole file.
    Whole,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// The range starts past the end (answered 416).
    Unsatisfiable,
}

/// Reads a `Range` header with one range (`bytes=S-`, `bytes=S-E` or `bytes=-N`), as an
/// agent resuming a download sends. Anything else is ignored, which RFC 9110 allows: the
/// whole file is sent.
fn byte_range(header: Option<&str>, len: u64) -> ByteRange {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return ByteRange::Whole;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return ByteRange::Whole;
    };
    if spec.contains(',') {
        return ByteRange::Whole;
    }
    let (first, last) = (first.trim(), last.trim());
    let parse = |t: &str| t.parse::<u64>().ok();
    let (start, end) = match (first.is_empty(), last.is_empty()) {
        (true, false) => match parse(last) {
            Some(0) => return ByteRange::Unsatisfiable,
            Some(n) => (len.saturating_sub(n), len.saturating_sub(1)),
            None => return ByteRange::Whole,
        },
        (false, true) => match parse(first) {
            Some(start) => (start, len.saturating_sub(1)),
            None => return ByteRange::Whole,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(start), Some(end)) if start <= end => (start, end.min(len.saturating_sub(1))),
            _ => return ByteRange::Whole,
        },
        (true, true) => return ByteRange::Whole,
    };
    if start >= len {
        return ByteRange::Unsatisfiable;
    }
    ByteRange::Part { start, end }
}

/// A bundle file, or the part of it a `Range` header asks for (downloads resume).
async fn artifact(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, u64)>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if !is_valid_identifier(&name) {
        return Err(ApiError::BadRequest(format!(
            "`{name}` is not a valid model name"
        )));
    }
    let model = s
        .store
        .model(&name, version)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("model {name} v{version}")))?;
    let path = s.artifacts.path(&name, version, &model.bundle_sha256);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound(format!("bundle {name} v{version}")));
        }
        Err(e) => return Err(ApiError::Artifact(e)),
    };
    let len = file.metadata().await.map_err(ApiError::Artifact)?.len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let content_type = (
        header::CONTENT_TYPE,
        "application/vnd.edgeloop.bundle".to_string(),
    );
    let accept_ranges = (header::ACCEPT_RANGES, "bytes".to_string());
    match byte_range(range, len) {
        ByteRange::Whole => {
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
            Ok((
                [
                    content_type,
                    accept_ranges,
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                body,
            )
                .into_response())
        }
        ByteRange::Part { start, end } => {
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let mut file = file;
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(ApiError::Artifact)?;
            let count = end - start + 1;
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(file.take(count)));
            Ok((
                StatusCode::PARTIAL_CONTENT,
                [
                    content_type,
                    accept_ranges,
                    (header::CONTENT_LENGTH, count.to_string()),
                    (header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}")),
                ],
                body,
            )
                .into_response())
        }
        ByteRange::Unsatisfiable => Ok((
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{len}"))],
        )
            .into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_resolve_against_the_file_length() {
        use ByteRange::*;
        let r = |h: &str| byte_range(Some(h), 100);
        assert_eq!(byte_range(None, 100), Whole);
        assert_eq!(r("bytes=40-"), Part { start: 40, end: 99 });
        assert_eq!(r("bytes=0-9"), Part { start: 0, end: 9 });
        assert_eq!(r("bytes=90-500"), Part { start: 90, end: 99 });
        assert_eq!(r("bytes=-10"), Part { start: 90, end: 99 });
        assert_eq!(r("bytes=-500"), Part { start: 0, end: 99 });
        assert_eq!(r("bytes=100-"), Unsatisfiable);
        assert_eq!(r("bytes=-0"), Unsatisfiable);
        // Not understood, so ignored: the whole file.
        for h in [
            "bytes=0-1,5-6",
            "bytes=9-3",
            "items=0-1",
            "bytes=x-",
            "bytes=-",
            "bytes",
        ] {
            assert_eq!(r(h), Whole, "{h}");
        }
    }
}
