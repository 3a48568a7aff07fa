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
use edgeloop_shared::protocol::SampleFormat;
use edgeloop_shared::signing::{Context, PublicKey};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::ingest::{IngestStats, IngestStatsSnapshot};
use crate::plan::RolloutPlan;
use crate::registry::ArtifactStore;
use crate::rollout::{self, Change, RolloutError, RolloutRequest};
use crate::store::{
    AuditEntry, DatasetRow, DeploymentEvent, DeviceRow, EnrollOutcome, EnrollmentRow, HourlyRow,
    ModelRow, RetrainingRow, RolloutRow, Store, StoreError, TelemetryRow, TokenRow,
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
    /// Signs what is published through the API.
    pub key: edgeloop_shared::signing::SecretKey,
    /// The retraining policies this controller runs (from its configuration).
    pub policies: Arc<Vec<crate::retrain::RetrainingPolicy>>,
    /// The embedded broker checks logins: an approved enrollment that proves its key gets
    /// a broker password.
    pub issue_broker_passwords: bool,
    /// What an enrolled device is told: where the broker is, the topic root, the keys to
    /// trust.
    pub device_settings: Arc<DeviceSettings>,
}

/// The settings an enrolled device needs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceSettings {
    pub mqtt_url: String,
    pub topic_root: String,
    pub trusted_keys: Vec<String>,
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
    #[error(transparent)]
    Publish(#[from] crate::registry::PublishError),
    #[error(transparent)]
    Dataset(#[from] crate::datasets::DatasetError),
    /// Refused with this status (an enrollment: 401, 403 or 409).
    #[error("{1}")]
    Refused(StatusCode, String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_)
            | ApiError::Rollout(
                RolloutError::NoDevices
                | RolloutError::Plan(_)
                | RolloutError::NoMatch { .. }
                | RolloutError::NotForDevices { .. }
                | RolloutError::DevicesAndTarget,
            )
            | ApiError::Trust(RelayError::Invalid(_) | RelayError::NoRoots) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Trust(RelayError::Stale(_) | RelayError::Raced) => StatusCode::CONFLICT,
            ApiError::Refused(status, _) => *status,
            ApiError::Dataset(e) => {
                use crate::datasets::DatasetError as D;
                match e {
                    D::Select(RolloutError::Store(_)) | D::Store(_) => {
                        tracing::error!(error = %self, "dataset request failed");
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                    // Devices sent samples that do not go together (another format or
                    // shape); the message names the device, `?devices=` leaves it out.
                    D::Merge(..) => StatusCode::CONFLICT,
                    D::UnknownDevice(_) | D::Incomplete(..) => StatusCode::NOT_FOUND,
                    _ => StatusCode::BAD_REQUEST,
                }
            }
            ApiError::Publish(e) => {
                use crate::registry::PublishError as P;
                match e {
                    P::NotNewer { .. } | P::Store(StoreError::Conflict(_)) => StatusCode::CONFLICT,
                    P::GateFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    P::NoBaseline { .. } => StatusCode::NOT_FOUND,
                    P::Store(_) | P::Artifact(_) | P::Baseline { .. } => {
                        tracing::error!(error = %self, "publish failed");
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                    _ => StatusCode::BAD_REQUEST,
                }
            }
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

/// The API, the dashboard and the bundle downloads; `loopback` when it listens on a loopback
/// address (see [`edgeloop_agent::api::refuse_browser_forgery`], which guards it); `logins`
/// the operators it admits (see [`crate::login`]).
pub fn router(state: AppState, loopback: bool, logins: crate::login::Logins) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}/telemetry", get(telemetry))
        .route("/api/v1/devices/{id}/telemetry/hourly", get(hourly))
        .route("/api/v1/devices/{id}/deployments", get(deployment_events))
        .route(
            "/api/v1/models",
            get(models).post(axum::handler::Handler::layer(
                publish,
                axum::extract::DefaultBodyLimit::max(MAX_PUBLISH_BYTES),
            )),
        )
        .route("/api/v1/rollouts", post(create_rollout).get(rollouts))
        .route("/api/v1/rollouts/{id}", get(rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(change_rollout))
        .route("/api/v1/datasets", post(request_dataset).get(datasets))
        .route("/api/v1/datasets/{id}", get(dataset))
        .route("/api/v1/datasets/{id}/file", get(dataset_file))
        .route("/api/v1/datasets/{id}/csv", get(dataset_csv))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/retrainings", get(retrainings))
        .route("/api/v1/retraining-policies", get(policies))
        .route("/api/v1/enrollment-tokens", post(create_token).get(tokens))
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/preauthorized-keys", post(create_preauthorized_key))
        .route("/api/v1/device-settings", get(device_settings))
        .route("/api/v1/enrollments", get(enrollments))
        .route("/api/v1/enrollments/{id}/approve", post(approve))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/trust", get(trust).post(publish_trust))
        .route("/artifacts/{name}/{version}", get(artifact))
        .route(
            "/artifacts/{name}/{version}/delta/{base}",
            get(delta_artifact),
        )
        .layer(axum::middleware::from_fn_with_state(
            logins,
            crate::login::require_login,
        ))
        .layer(axum::middleware::from_fn_with_state(
            loopback,
            edgeloop_agent::api::refuse_browser_forgery,
        ))
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

/// An hourly aggregate with the hour's own drift scores.
#[derive(Debug, serde::Serialize)]
pub struct HourlyView {
    #[serde(flatten)]
    pub row: HourlyRow,
    /// The largest feature PSI of all the hour's inputs together against the model's
    /// reference (`stats` is rescored the same way); absent when the model's bundle
    /// cannot be read. `psi_max` stays the worst single window's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psi_hour: Option<f64>,
}

/// `GET /api/v1/devices/{id}/telemetry/hourly`: each hour's merged counts rescored
/// against its model's reference profile and drift policy, as if the hour were one window.
async fn hourly(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<HourlyView>> {
    use edgeloop_shared::drift::{DriftPolicy, ReferenceProfile, WindowStats};
    let rows = s.store.hourly(device_id(&id)?, limit(&q)?).await?;
    let mut profiles: std::collections::HashMap<
        (String, u64),
        Option<(ReferenceProfile, DriftPolicy)>,
    > = std::collections::HashMap::new();
    let mut views = Vec::with_capacity(rows.len());
    for mut row in rows {
        let key = (row.model_name.clone(), row.model_version);
        if !profiles.contains_key(&key) {
            let published = crate::registry::published_manifest(
                s.store.as_ref(),
                &s.artifacts,
                &s.key,
                &key.0,
                key.1,
            )
            .await;
            let profile = match published {
                Ok(manifest) => Some((manifest.reference, manifest.drift.unwrap_or_default())),
                Err(e) => {
                    tracing::debug!(model = %key.0, version = key.1, error = %e,
                        "hourly aggregates not rescored");
                    None
                }
            };
            profiles.insert(key.clone(), profile);
        }
        let mut psi_hour = None;
        if let Some((profile, policy)) = &profiles[&key]
            && let Ok(mut stats) = serde_json::from_value::<WindowStats>(row.stats.clone())
            && stats.rescore(profile, policy).is_ok()
        {
            psi_hour = Some(stats.psi_max);
            row.stats = serde_json::to_value(&stats).expect("window statistics serialize");
        }
        views.push(HourlyView { row, psi_hour });
    }
    Ok(Json(views))
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

/// The largest publish request: the model (base64) and its CSV data.
const MAX_PUBLISH_BYTES: usize = 256 << 20;

/// `POST /api/v1/models`: what `edgeloop model publish` takes, with the files inline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    pub name: String,
    pub version: u64,
    #[serde(default)]
    pub label: Option<String>,
    /// The ONNX model, base64 (standard alphabet, padded).
    pub onnx_base64: String,
    /// Reference data: CSV text with a header; the columns are the model's features.
    #[serde(default)]
    pub reference_csv: Option<String>,
    /// For a model of tensor input instead: its reference inputs as a NumPy `.npy` array
    /// `(N, d1, d2, …)`, base64.
    #[serde(default)]
    pub reference_npy_base64: Option<String>,
    #[serde(default)]
    pub label_column: Option<String>,
    /// Features profiled as categorical.
    #[serde(default)]
    pub categorical: Vec<String>,
    /// Class labels in output order; for a regression, at most one: what it predicts.
    #[serde(default)]
    pub labels: Vec<String>,
    /// The model predicts a value (one output column) rather than class scores.
    #[serde(default)]
    pub regression: bool,
    /// Per-feature scaling devices apply before the model: `{"offset": [...], "scale": [...]}`.
    #[serde(default)]
    pub preprocess: Option<edgeloop_shared::bundle::Preprocess>,
    /// A tensor model's channel axis (its reference is then `reference_npy_base64`).
    #[serde(default)]
    pub channel_axis: Option<u32>,
    /// `"channels_last"`: devices send a channels-first model's rows (and the reference)
    /// channels last.
    #[serde(default)]
    pub layout: Option<edgeloop_shared::bundle::RowLayout>,
    #[serde(default)]
    pub latency_budget_ms: Option<f64>,
    #[serde(default)]
    pub min_agent_version: Option<String>,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub boards: Vec<String>,
    #[serde(default)]
    pub drift: Option<edgeloop_shared::drift::DriftPolicy>,
    /// Lineage: the version this one was trained from, and the training data's SHA-256.
    #[serde(default)]
    pub parent_version: Option<u64>,
    #[serde(default)]
    pub training_data_sha256: Option<String>,
    /// Labelled holdout data (CSV text): with it the model is signed only if it passes
    /// the quality gate (`gate`, defaults as in the CLI) against `against` (default: the
    /// newest published version).
    #[serde(default)]
    pub holdout_csv: Option<String>,
    /// A tensor model's labelled holdout instead: base64 of an NPY array of records `x`,
    /// `predicted`, `label` (the devices' sample format).
    #[serde(default)]
    pub holdout_npy_base64: Option<String>,
    #[serde(default)]
    pub gate: Option<crate::gate::GatePolicy>,
    #[serde(default)]
    pub against: Option<u64>,
}

async fn publish(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<PublishBody>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<ModelRow>), ApiError> {
    use base64::Engine as _;
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let actor = actor(&headers)?;
    let onnx = base64::engine::general_purpose::STANDARD
        .decode(body.onnx_base64.as_bytes())
        .map_err(|e| ApiError::BadRequest(format!("onnx_base64: {e}")))?;
    if let Some(policy) = &body.drift {
        policy
            .validate()
            .map_err(|e| ApiError::BadRequest(format!("drift: {e}")))?;
    }
    if let Some(digest) = &body.training_data_sha256
        && (digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ApiError::BadRequest(
            "training_data_sha256: expected 64 hex digits".into(),
        ));
    }
    let has_holdout = match (&body.holdout_csv, &body.holdout_npy_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give the holdout as either holdout_csv or holdout_npy_base64".into(),
            ));
        }
        (csv, npy) => csv.is_some() || npy.is_some(),
    };
    let gate = match (has_holdout, body.gate) {
        (true, policy) => {
            let policy = policy.unwrap_or_default();
            policy
                .validate()
                .map_err(|e| ApiError::BadRequest(format!("gate: {e}")))?;
            Some(policy)
        }
        (false, Some(_)) => {
            return Err(ApiError::BadRequest(
                "gate: a quality gate needs holdout_csv (or holdout_npy_base64)".into(),
            ));
        }
        (false, None) => None,
    };
    // The registry reads its data from files, as the CLI hands it.
    let dir = tempfile::tempdir()
        .map_err(|e| ApiError::Artifact(std::io::Error::other(format!("temporary dir: {e}"))))?;
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).map_err(ApiError::Artifact)?;
        Ok::<_, ApiError>(path)
    };
    let write_base64 = |field: &str, name: &str, text: &str| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|e| ApiError::BadRequest(format!("{field}: {e}")))?;
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).map_err(ApiError::Artifact)?;
        Ok::<_, ApiError>(path)
    };
    let reference = match (&body.reference_csv, &body.reference_npy_base64) {
        (Some(csv), None) => write("reference.csv", csv)?,
        (None, Some(npy)) => write_base64("reference_npy_base64", "reference.npy", npy)?,
        _ => {
            return Err(ApiError::BadRequest(
                "give the reference data as either reference_csv or reference_npy_base64".into(),
            ));
        }
    };
    let holdout = match (&body.holdout_csv, &body.holdout_npy_base64) {
        (Some(csv), _) => Some(write("holdout.csv", csv)?),
        (None, Some(npy)) => Some(write_base64("holdout_npy_base64", "holdout.npy", npy)?),
        (None, None) => None,
    };
    let lineage =
        (body.parent_version.is_some() || body.training_data_sha256.is_some()).then(|| {
            edgeloop_shared::bundle::Lineage {
                parent_version: body.parent_version,
                training_data_sha256: body.training_data_sha256.map(|d| d.to_ascii_lowercase()),
                ..Default::default()
            }
        });
    let row = crate::registry::publish(
        s.store.as_ref(),
        &s.artifacts,
        &s.key,
        crate::registry::PublishRequest {
            name: &body.name,
            version: body.version,
            label: body.label,
            onnx: &onnx,
            reference_csv: &reference,
            label_column: body.label_column.as_deref(),
            categorical: body.categorical,
            regression: body.regression,
            class_labels: body.labels,
            preprocess: body.preprocess,
            layout: body.layout,
            channel_axis: body.channel_axis,
            created_ms: now_ms(),
            requirements: edgeloop_shared::bundle::Requirements {
                latency_budget_ms: body.latency_budget_ms,
                min_agent_version: body.min_agent_version,
                targets: body.targets,
                boards: body.boards,
            },
            drift: body.drift,
            lineage,
            gate: match (&holdout, gate) {
                (Some(holdout), Some(policy)) => Some(crate::registry::QualityGate {
                    holdout,
                    policy,
                    against: body.against,
                }),
                _ => None,
            },
        },
    )
    .await?;
    crate::store::record_audit_now(
        s.store.as_ref(),
        &actor,
        "model.publish",
        format!("model/{}/{}", row.name, row.version),
        row.lineage
            .as_ref()
            .and_then(|l| l.gates.get("quality"))
            .map(|verdict| format!("quality gate {verdict}")),
    )
    .await;
    Ok((StatusCode::CREATED, Json(row)))
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
    /// Instead of `devices`: the devices of this group…
    pub group: Option<String>,
    /// …and/or with all these tags.
    #[serde(default)]
    pub tags: Vec<String>,
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
            target: (body.group.is_some() || !body.tags.is_empty()).then_some(
                crate::rollout::Target {
                    group: body.group,
                    tags: body.tags,
                },
            ),
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

/// `POST /api/v1/enrollment-tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// The group devices enrolled with the token join.
    pub group: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// How long the token is valid, in seconds.
    #[serde(default = "CreateToken::default_ttl_s")]
    pub ttl_s: u64,
    /// Enrollments it allows; null: any number until it expires.
    #[serde(default = "CreateToken::default_uses")]
    pub uses: Option<u64>,
    /// Approve its devices at once; false: an operator approves each.
    #[serde(default = "CreateToken::default_auto_approve")]
    pub auto_approve: bool,
}

impl CreateToken {
    fn default_ttl_s() -> u64 {
        86_400
    }
    fn default_uses() -> Option<u64> {
        Some(1)
    }
    fn default_auto_approve() -> bool {
        true
    }
}

/// A new token: its row, and the secret, shown this once.
#[derive(Debug, serde::Serialize)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub row: TokenRow,
    pub token: String,
}

/// Makes and stores an enrollment token; the secret is returned, only its hash is kept.
pub async fn new_token(
    store: &dyn Store,
    body: CreateToken,
    actor: &str,
) -> Result<CreatedToken, ApiError> {
    let mut secret = [0u8; 24];
    let mut id = [0u8; 4];
    getrandom::fill(&mut secret)
        .and_then(|()| getrandom::fill(&mut id))
        .map_err(|e| ApiError::BadRequest(format!("no entropy: {e}")))?;
    let token = format!("elt_{}", hex::encode(secret));
    let row = store_token(
        store,
        body,
        actor,
        format!("tok-{}", hex::encode(id)),
        &edgeloop_shared::sha256_hex(token.as_bytes()),
    )
    .await?;
    Ok(CreatedToken { row, token })
}

/// The SHA-256 under which a pre-authorized key is kept as a single-use token. Its input
/// holds a NUL, which no token secret may, so no secret a client sends can reach it: only
/// an enrollment signed with the key can.
fn preauthorized_secret_sha256(key: &PublicKey) -> String {
    edgeloop_shared::sha256_hex(
        format!("edgeloop/v1/preauthorized-key\0{}", key.to_text()).as_bytes(),
    )
}

/// Pre-authorizes a device key: a single-use token bound to the key, with which the device
/// holding it enrolls without a secret, by signing its request.
pub async fn preauthorize_key(
    store: &dyn Store,
    body: PreauthorizeKey,
    actor: &str,
) -> Result<TokenRow, ApiError> {
    let key = PublicKey::parse(&body.public_key)
        .map_err(|e| ApiError::BadRequest(format!("public_key: {e}")))?;
    store_token(
        store,
        CreateToken {
            group: body.group,
            tags: body.tags,
            ttl_s: body.ttl_s,
            uses: Some(1),
            auto_approve: body.auto_approve,
        },
        actor,
        format!("key-{}", key.id()),
        &preauthorized_secret_sha256(&key),
    )
    .await
}

/// Checks a token's terms and stores it under `secret_sha256`, audited.
async fn store_token(
    store: &dyn Store,
    body: CreateToken,
    actor: &str,
    id: String,
    secret_sha256: &str,
) -> Result<TokenRow, ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    if !is_valid_identifier(&body.group) {
        return bad(format!(
            "group `{}` must be 1-64 characters of [A-Za-z0-9_.-]",
            body.group
        ));
    }
    if let Some(t) = body.tags.iter().find(|t| !is_valid_identifier(t)) {
        return bad(format!(
            "tag `{t}` must be 1-64 characters of [A-Za-z0-9_.-]"
        ));
    }
    if !(1..=366 * 86_400).contains(&body.ttl_s) {
        return bad("ttl_s must be from 1 s to a year".into());
    }
    if body.uses == Some(0) {
        return bad("uses must be at least 1 (null: unlimited)".into());
    }
    let now = now_ms();
    let row = TokenRow {
        id,
        group: body.group,
        tags: body.tags,
        expires_ms: now + body.ttl_s * 1000,
        uses_left: body.uses,
        auto_approve: body.auto_approve,
        created_ms: now,
        created_by: actor.to_string(),
    };
    store.create_token(&row, secret_sha256).await?;
    let what = if row.id.starts_with("key-") {
        "key.preauthorize"
    } else {
        "token.create"
    };
    crate::store::record_audit_now(
        store,
        actor,
        what,
        format!("token/{}", row.id),
        Some(format!(
            "group {} tags {:?}, {} uses, {}",
            row.group,
            row.tags,
            row.uses_left.map_or("unlimited".into(), |u| u.to_string()),
            if row.auto_approve {
                "auto-approved"
            } else {
                "approved by an operator"
            }
        )),
    )
    .await;
    Ok(row)
}

/// `POST /api/v1/preauthorized-keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreauthorizeKey {
    /// The device's public key (`ed25519:<base64>`), from `edgeloop-agent device-key`.
    pub public_key: String,
    pub group: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// How long the pre-authorization holds, in seconds (default a year).
    #[serde(default = "PreauthorizeKey::default_ttl_s")]
    pub ttl_s: u64,
    #[serde(default = "CreateToken::default_auto_approve")]
    pub auto_approve: bool,
}

impl PreauthorizeKey {
    fn default_ttl_s() -> u64 {
        365 * 86_400
    }
}

async fn create_preauthorized_key(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<PreauthorizeKey>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<TokenRow>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let row = preauthorize_key(s.store.as_ref(), body, &actor(&headers)?).await?;
    Ok((StatusCode::CREATED, Json(row)))
}

async fn create_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let created = new_token(s.store.as_ref(), body, &actor(&headers)?).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn tokens(State(s): State<AppState>) -> ApiResult<Vec<TokenRow>> {
    Ok(Json(s.store.tokens().await?))
}

/// `POST /api/v1/enroll`: what a device sends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollBody {
    /// The token's secret; without one the key must be pre-authorized and the request
    /// signed.
    #[serde(default)]
    pub token: Option<String>,
    pub device_id: String,
    pub public_key: String,
    /// Proof of the key: the time (ms) and the base64 signature of
    /// [`edgeloop_shared::signing::enroll_proof_bytes`] under the key.
    #[serde(default)]
    pub issued_ms: Option<u64>,
    #[serde(default)]
    pub signature: Option<String>,
    pub board: Option<String>,
    pub arch: Option<String>,
    pub agent_version: Option<String>,
}

/// What an enrolling device is told.
#[derive(Debug, serde::Serialize)]
pub struct Enrolled {
    pub device_id: String,
    /// `approved`, or `pending` until an operator approves.
    pub status: crate::store::EnrollmentStatus,
    pub group: String,
    pub tags: Vec<String>,
    #[serde(flatten)]
    pub settings: DeviceSettings,
    /// The device's broker login (its id and a new password), when the broker checks
    /// logins and the request proved the device's key. Shown this once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_password: Option<String>,
}

async fn enroll(
    State(s): State<AppState>,
    body: Result<Json<EnrollBody>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Enrolled>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    device_id(&body.device_id)?;
    let key = PublicKey::parse(&body.public_key)
        .map_err(|e| ApiError::BadRequest(format!("public_key: {e}")))?;
    let now = now_ms();
    let proven = match (body.issued_ms, &body.signature) {
        (None, None) => false,
        (Some(at), Some(signature)) => {
            use base64::Engine as _;
            let unproven = |why: String| {
                ApiError::Refused(StatusCode::UNAUTHORIZED, format!("proof of key: {why}"))
            };
            if at.abs_diff(now) > edgeloop_shared::command::MAX_CLOCK_SKEW_MS {
                return Err(unproven(format!(
                    "issued_ms {at} is more than 5 minutes from the controller's clock ({now})"
                )));
            }
            let signature = base64::engine::general_purpose::STANDARD
                .decode(signature)
                .map_err(|e| unproven(format!("signature is not base64: {e}")))?;
            let bytes =
                edgeloop_shared::signing::enroll_proof_bytes(&body.device_id, &body.public_key, at);
            key.verify(Context::Enroll, &bytes, &signature)
                .map_err(|e| unproven(e.to_string()))?;
            true
        }
        _ => {
            return Err(ApiError::BadRequest(
                "issued_ms and signature go together".into(),
            ));
        }
    };
    let secret = match &body.token {
        Some(token) if token.is_empty() || token.chars().any(char::is_control) => {
            return Err(ApiError::BadRequest(
                "token must be non-empty visible text".into(),
            ));
        }
        Some(token) => edgeloop_shared::sha256_hex(token.as_bytes()),
        None if proven => preauthorized_secret_sha256(&key),
        None => {
            return Err(ApiError::BadRequest(
                "without a token, a device enrolls with a pre-authorized key and signs the request (issued_ms, signature)".into(),
            ));
        }
    };
    for (field, value) in [
        ("board", &body.board),
        ("arch", &body.arch),
        ("agent_version", &body.agent_version),
    ] {
        if let Some(v) = value
            && (v.is_empty()
                || v.len() > 64
                || v.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            return Err(ApiError::BadRequest(format!(
                "{field} `{v}` must be 1-64 visible characters"
            )));
        }
    }
    let request = crate::store::EnrollRequest {
        device_id: body.device_id,
        public_key: body.public_key,
        board: body.board,
        arch: body.arch,
        agent_version: body.agent_version,
    };
    let what = if body.token.is_some() {
        "the enrollment token"
    } else {
        "the key's pre-authorization"
    };
    let row = match s.store.enroll(&secret, &request, now).await? {
        EnrollOutcome::Enrolled(row) => *row,
        EnrollOutcome::BadToken if body.token.is_some() => {
            return Err(ApiError::Refused(
                StatusCode::UNAUTHORIZED,
                "the enrollment token is unknown or has expired".into(),
            ));
        }
        EnrollOutcome::BadToken => {
            return Err(ApiError::Refused(
                StatusCode::UNAUTHORIZED,
                format!(
                    "key {} is not pre-authorized, or its pre-authorization expired",
                    key.id()
                ),
            ));
        }
        EnrollOutcome::UsedUp => {
            return Err(ApiError::Refused(
                StatusCode::FORBIDDEN,
                format!("{what} has been used as often as it allows"),
            ));
        }
        EnrollOutcome::KeyConflict => {
            return Err(ApiError::Refused(
                StatusCode::CONFLICT,
                format!("device {} is enrolled with another key", request.device_id),
            ));
        }
    };
    if row.created_ms == now {
        crate::store::record_audit_now(
            s.store.as_ref(),
            &row.device_id,
            "device.enroll",
            format!("device/{}", row.device_id),
            Some(format!(
                "with token {} into group {}: {}",
                row.token_id,
                row.group,
                crate::store::enrollment_status_str(row.status)
            )),
        )
        .await;
    }
    let status = match row.status {
        crate::store::EnrollmentStatus::Approved => StatusCode::OK,
        crate::store::EnrollmentStatus::Pending => StatusCode::ACCEPTED,
    };
    let mut login = None;
    if s.issue_broker_passwords && proven && row.status == crate::store::EnrollmentStatus::Approved
    {
        let mut secret = [0u8; 24];
        getrandom::fill(&mut secret)
            .map_err(|e| ApiError::BadRequest(format!("no entropy: {e}")))?;
        let password = hex::encode(secret);
        let hash = edgeloop_shared::sha256_hex(password.as_bytes());
        if s.store.set_broker_password(&row.device_id, &hash).await? {
            login = Some((row.device_id.clone(), password));
        }
    }
    Ok((
        status,
        Json(Enrolled {
            device_id: row.device_id,
            status: row.status,
            group: row.group,
            tags: row.tags,
            settings: s.device_settings.as_ref().clone(),
            mqtt_username: login.as_ref().map(|(user, _)| user.clone()),
            mqtt_password: login.map(|(_, password)| password),
        }),
    ))
}

async fn device_settings(State(s): State<AppState>) -> Json<DeviceSettings> {
    Json(s.device_settings.as_ref().clone())
}

async fn enrollments(State(s): State<AppState>) -> ApiResult<Vec<EnrollmentRow>> {
    Ok(Json(s.store.enrollments().await?))
}

async fn approve(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<EnrollmentRow> {
    let actor = actor(&headers)?;
    let row = s
        .store
        .approve_enrollment(device_id(&id)?, &actor, now_ms())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("pending enrollment of {id}")))?;
    crate::store::record_audit_now(
        s.store.as_ref(),
        &actor,
        "device.approve",
        format!("device/{id}"),
        None,
    )
    .await;
    Ok(Json(row))
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

/// `POST /api/v1/datasets`: ask devices for their input samples.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetBody {
    /// Only devices running this model (unless `devices` names them).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// At most this many rows per device.
    #[serde(default)]
    pub max_rows: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
}

async fn request_dataset(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<DatasetBody>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<DatasetRow>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    for d in body.devices.iter().flatten() {
        device_id(d)?;
    }
    if let Some(model) = &body.model
        && !is_valid_identifier(model)
    {
        return Err(ApiError::BadRequest(format!(
            "`{model}` is not a valid model name"
        )));
    }
    let row = crate::datasets::request(
        s.store.as_ref(),
        crate::datasets::DatasetRequest {
            model: body.model,
            devices: body.devices,
            target: (body.group.is_some() || !body.tags.is_empty()).then_some(
                crate::rollout::Target {
                    group: body.group,
                    tags: body.tags,
                },
            ),
            max_rows: body.max_rows,
            actor: actor(&headers)?,
            reason: body.reason,
        },
    )
    .await?;
    s.dispatcher_wake.notify_one();
    Ok((StatusCode::CREATED, Json(row)))
}

async fn datasets(
    State(s): State<AppState>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<DatasetRow>> {
    Ok(Json(s.store.datasets(limit(&q)?).await?))
}

async fn dataset(State(s): State<AppState>, Path(id): Path<u64>) -> ApiResult<DatasetRow> {
    s.store
        .dataset(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("dataset {id}")))
}

/// The header that carries a dataset file's SHA-256.
pub const SHA256_HEADER: &str = "x-edgeloop-sha256";

#[derive(Debug, Deserialize)]
struct DatasetCsvQuery {
    /// Only these devices' parts, comma-separated.
    devices: Option<String>,
}

/// `GET /api/v1/datasets/{id}/file[?devices=a,b]`: the merge of the parts complete so far,
/// or of exactly the named ones: CSV for a table model's samples, NPY for a tensor model's
/// (its format in `x-edgeloop-format`); its SHA-256 in `x-edgeloop-sha256` (and as the
/// ETag), the devices in it in `x-edgeloop-devices`.
async fn dataset_file(
    State(s): State<AppState>,
    Path(id): Path<u64>,
    Query(q): Query<DatasetCsvQuery>,
) -> Result<Response, ApiError> {
    Ok(file_response(merged_dataset(&s, id, q).await?))
}

/// Dataset `id`'s merge, of the parts the query names or of every complete one.
async fn merged_dataset(
    s: &AppState,
    id: u64,
    q: DatasetCsvQuery,
) -> Result<crate::datasets::DatasetFile, ApiError> {
    let only: Option<Vec<String>> = q
        .devices
        .map(|list| list.split(',').map(str::to_string).collect());
    crate::datasets::file(s.store.as_ref(), id, only.as_deref())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("dataset {id}")))
}

/// `GET /api/v1/datasets/{id}/csv[?devices=a,b]`: the same as `…/file` for a table model's
/// samples; 409 for a tensor model's, which are NPY.
async fn dataset_csv(
    State(s): State<AppState>,
    Path(id): Path<u64>,
    Query(q): Query<DatasetCsvQuery>,
) -> Result<Response, ApiError> {
    let file = merged_dataset(&s, id, q).await?;
    if file.format != SampleFormat::Csv {
        return Err(ApiError::Refused(
            StatusCode::CONFLICT,
            format!(
                "dataset {id} holds a tensor model's inputs, an NPY file: GET \
                 /api/v1/datasets/{id}/file"
            ),
        ));
    }
    Ok(file_response(file))
}

fn file_response(file: crate::datasets::DatasetFile) -> Response {
    let (content_type, extension) = match file.format {
        SampleFormat::Csv => ("text/csv", "csv"),
        SampleFormat::Npy => ("application/octet-stream", "npy"),
    };
    (
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"dataset-{}.{extension}\"",
                    file.row.id
                ),
            ),
            (
                header::HeaderName::from_static("x-edgeloop-format"),
                extension.to_string(),
            ),
            (header::ETAG, format!("\"{}\"", file.sha256)),
            (
                header::HeaderName::from_static(SHA256_HEADER),
                file.sha256.clone(),
            ),
            (
                header::HeaderName::from_static("x-edgeloop-devices"),
                file.devices.join(","),
            ),
        ],
        file.bytes,
    )
        .into_response()
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
    headers: HeaderMap,
    body: Result<Json<SignedTrust>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Current>), ApiError> {
    let actor = actor(&headers)?;
    let Json(signed) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let current = s.trust.replace(signed).await?;
    crate::store::record_audit_now(
        s.store.as_ref(),
        &actor,
        "trust.publish",
        format!("trust/{}", current.document.version),
        current.warning.clone(),
    )
    .await;
    Ok((StatusCode::CREATED, Json(current)))
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
    serve_bundle(&path, &format!("bundle {name} v{version}"), &headers).await
}

/// The delta bundle of a model version against an earlier one, or part of it.
async fn delta_artifact(
    State(s): State<AppState>,
    Path((name, version, base)): Path<(String, u64, u64)>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if !is_valid_identifier(&name) {
        return Err(ApiError::BadRequest(format!(
            "`{name}` is not a valid model name"
        )));
    }
    let what = format!("delta bundle of {name} v{version} against v{base}");
    let delta = s
        .store
        .model_deltas(&name, version)
        .await?
        .into_iter()
        .find(|d| d.base_version == base)
        .ok_or_else(|| ApiError::NotFound(what.clone()))?;
    let path = s.artifacts.path(&name, version, &delta.bundle_sha256);
    serve_bundle(&path, &what, &headers).await
}

/// A bundle file, whole or the byte range the request asks for.
async fn serve_bundle(
    path: &std::path::Path,
    what: &str,
    headers: &axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound(what.to_string()));
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
    fn a_dataset_whose_parts_do_not_merge_is_a_conflict_naming_the_device() {
        let e = ApiError::Dataset(crate::datasets::DatasetError::Merge(
            3,
            "the sample of cam-2 is CSV, that of cam-1 NPY".into(),
        ));
        assert_eq!(
            e.to_string(),
            "dataset 3: the sample of cam-2 is CSV, that of cam-1 NPY"
        );
        assert_eq!(e.into_response().status(), StatusCode::CONFLICT);
    }

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
