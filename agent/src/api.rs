//! The device's local inference API: applications on the device (or its trusted network)
//! send inputs and get predictions, and every input they send is counted into the drift
//! window like the agent's own sensor inputs.
//!
//! - `POST /v1/infer`: JSON `{"rows": [[…], …]}` or `{"instances": [{"feature": value, …}]}`,
//!   or a binary body (`Content-Type: application/octet-stream`, little-endian f32 values,
//!   rows × features given by the `X-Edgeloop-Shape: ROWSxFEATURES` header). For a tensor
//!   input each row is one tensor, nested or flat (`Nxd1xd2…` in the binary header).
//!   Each row's output is `{"class", "label", "scores"}`, or a regression's `{"value"}`.
//! - `POST /v1/feedback`: `{"request_id": "…", "label": "fault" | 1, "row": 0}` attaches
//!   the ground truth to a prediction of one of the last `feedback_memory` requests; it
//!   goes into the drift window's confusion counts and accuracy. For a regression the
//!   label is the true value, and goes into the window's errors.
//! - `GET /v1/model`: the model being served, its inputs and outputs.
//! - `GET /healthz`: 200 while a model is serving, 503 before.
//! - `GET /metrics`: Prometheus text.
//!
//! What a web page could send through a browser is refused ([`refuse_browser_forgery`]).
//!
//! The served model is an `Arc` swapped by the agent actor when an update becomes active: a
//! request takes the current one when it starts and finishes on it, so no request fails
//! during a swap. Inference runs on blocking threads, at most `max_concurrency` requests at
//! once.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgeloop_shared::drift::Target;
use edgeloop_shared::protocol::ModelRef;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::runtime::{LoadedModel, RuntimeError};

/// Header giving a binary body's shape, `ROWSxFEATURES`.
pub const SHAPE_HEADER: &str = "x-edgeloop-shape";
/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// What the API tells the agent actor, for the drift window. Each names the model that
/// made the prediction: an observation of a model swapped out since is dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// One input the API inferred.
    Inferred {
        model: ModelRef,
        row: Vec<f32>,
        /// Its class, or a regression's value.
        predicted: Target,
        /// A classifier's top score, as a probability (`None` for a regression).
        confidence: Option<f64>,
        /// The request's inference time per row, in milliseconds.
        latency_ms: f64,
        /// `{request_id}/{row}`, by which feedback names it later.
        request_key: String,
        /// A tensor model's input itself (`row` is its channels' statistics), handed over
        /// for the sample with the chance given; None when it was not (see
        /// [`crate::reservoir`]'s thinning).
        tensor: Option<(Vec<f32>, f64)>,
    },
    /// Rows the model failed on (a valid input, an internal error).
    Failed { model: ModelRef, rows: u64 },
    /// The ground truth for an earlier prediction.
    Labelled {
        model: ModelRef,
        /// The true class, or a regression's true value.
        label: Target,
        predicted: Target,
        request_key: String,
    },
}

/// The model's confidence in a prediction: its top score when the scores are
/// probabilities, the top softmax probability of them otherwise.
pub fn confidence(scores: &[f32]) -> f64 {
    let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !top.is_finite() {
        return 0.0;
    }
    let sum: f32 = scores.iter().sum();
    if scores.iter().all(|s| (0.0..=1.0).contains(s)) && (sum - 1.0).abs() < 1e-3 {
        return f64::from(top);
    }
    let exp_sum: f64 = scores.iter().map(|&s| f64::from(s - top).exp()).sum();
    1.0 / exp_sum
}

/// The predictions of the last requests, so that feedback can name them by request id.
#[derive(Debug)]
struct Recent {
    capacity: usize,
    order: VecDeque<String>,
    by_id: HashMap<String, RecentRequest>,
}

#[derive(Debug)]
struct RecentRequest {
    model: ModelRef,
    /// What the model predicted for each row of the request.
    predicted: Vec<Target>,
    labelled: Vec<bool>,
}

impl Recent {
    fn new(capacity: usize) -> Self {
        Recent {
            capacity,
            order: VecDeque::new(),
            by_id: HashMap::new(),
        }
    }

    fn remember(&mut self, id: String, model: ModelRef, predicted: Vec<Target>) {
        if self.capacity == 0 {
            return;
        }
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        let labelled = vec![false; predicted.len()];
        self.order.push_back(id.clone());
        self.by_id.insert(
            id,
            RecentRequest {
                model,
                predicted,
                labelled,
            },
        );
    }
}
/// The model the API serves, swapped by the agent actor.
#[derive(Debug, Clone, Default)]
pub struct ServedModel(Arc<RwLock<Option<Arc<LoadedModel>>>>);

impl ServedModel {
    pub fn set(&self, model: Option<Arc<LoadedModel>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = model;
    }

    pub fn get(&self) -> Option<Arc<LoadedModel>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The API's limits.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    pub max_body_bytes: usize,
    pub max_rows: usize,
    pub max_concurrency: usize,
    /// Requests remembered for feedback.
    pub feedback_memory: usize,
}

#[derive(Debug, Default)]
struct Metrics {
    requests_ok: AtomicU64,
    requests_bad: AtomicU64,
    requests_unavailable: AtomicU64,
    requests_failed: AtomicU64,
    rows: AtomicU64,
    observations_dropped: AtomicU64,
    feedback_ok: AtomicU64,
    feedback_refused: AtomicU64,
    /// Cumulative counts per bucket of `LATENCY_BUCKETS`, then +Inf.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
}

impl Metrics {
    fn observe_latency(&self, seconds: f64) {
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct ApiState {
    served: ServedModel,
    observed: mpsc::Sender<Observation>,
    limits: ApiLimits,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    recent: Arc<Mutex<Recent>>,
}

/// Binds `addr` and serves the API until `shutdown`. Returns the bound address (useful
/// with port 0).
pub async fn serve(
    addr: SocketAddr,
    served: ServedModel,
    observed: mpsc::Sender<Observation>,
    limits: ApiLimits,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let state = ApiState {
        served,
        observed,
        permits: Arc::new(Semaphore::new(limits.max_concurrency.max(1))),
        metrics: Arc::new(Metrics::default()),
        recent: Arc::new(Mutex::new(Recent::new(limits.feedback_memory))),
        limits: limits.clone(),
    };
    let app = Router::new()
        .route("/v1/infer", post(infer))
        .route("/v1/feedback", post(feedback))
        .route("/v1/model", get(model))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            local.ip().is_loopback(),
            refuse_browser_forgery,
        ))
        .with_state(state);
    info!(%local, "local inference API listening");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            warn!(error = %e, "local inference API stopped");
        }
    });
    Ok(local)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// Guards an HTTP API (this one and the controller's) against what a web page can do through
/// a browser that reaches it, which sends the operator's login too when it has one (the
/// controller's Basic login). Two refusals, each a 403:
/// - a request that changes something, sent for a page of another origin (cross-site
///   request forgery): a form or a `no-cors` fetch needs no permission, and would label
///   predictions here, or approve a device or abort a rollout on the controller. Browsers
///   name where a request comes from in `Sec-Fetch-Site`, older ones in `Origin`; the CLI,
///   curl, applications and devices send neither and pass;
/// - on an API listening on loopback (`loopback`), a request for a name that is not
///   loopback's (DNS rebinding: a page whose own name was made to point at 127.0.0.1 is of
///   the same origin as what it reaches, and could read and change everything). An API
///   listening on the network answers any name.
pub async fn refuse_browser_forgery(
    axum::extract::State(loopback): axum::extract::State<bool>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if loopback
        && let Some(host) = request.headers().get(header::HOST)
        && !host.to_str().is_ok_and(loopback_host)
    {
        return error(
            StatusCode::FORBIDDEN,
            "this API listens on loopback and answers only requests for localhost or a \
             loopback address",
        );
    }
    if from_another_origin(request.method(), request.headers()) {
        return error(
            StatusCode::FORBIDDEN,
            "a browser page of another origin cannot change anything here",
        );
    }
    next.run(request).await
}

/// Whether a `Host` names the loopback interface: `localhost` or a name under it, or a
/// loopback address; with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let name = name.to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    }
}

/// Whether a request that is not a read comes from another origin's page: `Sec-Fetch-Site`
/// other than `same-origin` or `none` (typed by the user), or without it an `Origin` whose
/// host and port are not the `Host` the request was sent to.
fn from_another_origin(method: &axum::http::Method, headers: &HeaderMap) -> bool {
    use axum::http::Method;
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return false;
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        return !matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let origin = origin.to_str().ok().and_then(|o| o.split_once("://"));
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin, host) {
        (Some((_, origin)), Some(host)) => !origin.eq_ignore_ascii_case(host),
        // `Origin: null` (a sandboxed page, a file) or no Host to compare with.
        _ => true,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferJson {
    #[serde(default)]
    rows: Option<Vec<Vec<Option<f32>>>>,
    #[serde(default)]
    instances: Option<Vec<serde_json::Map<String, Value>>>,
    /// Rows by input name: `{"inputs": {"a": [[…]], "b": [[…]]}}`.
    #[serde(default)]
    inputs: Option<serde_json::Map<String, Value>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum RowOutput {
    Class {
        class: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        label: Option<String>,
        scores: Vec<f32>,
    },
    /// A regression's predicted value.
    Value { value: f32 },
}

/// How errors name what a row of a table model feeds, and its width: "input `x`", or
/// for several inputs "inputs `a` + `b`" (a row is their features one after the other).
fn input_text(model: &LoadedModel) -> (String, usize) {
    let features = model.plan.features();
    let names: Vec<&str> = model
        .plan
        .inputs()
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    let text = match names[..] {
        [one] => format!("input `{one}`"),
        _ => format!("inputs `{}`", names.join("` + `")),
    };
    (text, features)
}

/// Reads the request's rows, or says what is wrong with them: the input's name, the shape
/// it expects and the shape received.
fn read_rows(
    model: &LoadedModel,
    headers: &HeaderMap,
    body: &[u8],
    max_rows: usize,
) -> Result<Vec<Vec<f32>>, String> {
    if model.is_tensor() {
        return read_tensor_rows(model, headers, body, max_rows);
    }
    let (input, width) = input_text(model);
    let expected = format!("[N, {width}] f32 (N ≤ {max_rows})");
    let binary = is_binary(headers);
    let rows: Vec<Vec<f32>> = if binary {
        let (shape, dims) = shape_header(headers, "ROWSxFEATURES")?;
        let [n, f] = dims[..] else {
            return Err(format!(
                "{input} expects {expected}; {SHAPE_HEADER} gives rank {}",
                dims.len()
            ));
        };
        if f != width {
            return Err(format!("{input} expects {expected}; received [{n}, {f}]"));
        }
        f32_rows(body, shape, n, f)?
    } else {
        let request: InferJson = serde_json::from_slice(body).map_err(|e| {
            format!(
                "body is not {{\"rows\": [[…]]}}, {{\"instances\": [{{…}}]}} or \
                 {{\"inputs\": {{\"name\": [[…]]}}}}: {e}"
            )
        })?;
        match (request.rows, request.instances, request.inputs) {
            (None, None, Some(inputs)) => rows_by_input(model, inputs, max_rows)?,
            (Some(rows), None, None) => rows
                .into_iter()
                .enumerate()
                .map(|(i, row)| {
                    if row.len() != width {
                        return Err(format!(
                            "{input} expects {expected}; row {i} has {} values",
                            row.len()
                        ));
                    }
                    // `null` stands for a missing value: refused below, by feature name.
                    Ok(row.into_iter().map(|v| v.unwrap_or(f32::NAN)).collect())
                })
                .collect::<Result<_, _>>()?,
            (None, Some(instances), None) => {
                let names = model.feature_names();
                instances
                    .iter()
                    .enumerate()
                    .map(|(i, instance)| {
                        if let Some(unknown) = instance.keys().find(|k| !names.contains(k)) {
                            return Err(format!(
                                "instance {i}: `{unknown}` is not a feature of {input} ({})",
                                names.join(", ")
                            ));
                        }
                        names
                            .iter()
                            .map(|name| match instance.get(name) {
                                Some(Value::Number(n)) => Ok(n.as_f64().unwrap_or(f64::NAN) as f32),
                                Some(Value::Null) | None => Err(format!(
                                    "instance {i}: feature `{name}` of {input} is missing"
                                )),
                                Some(other) => Err(format!(
                                    "instance {i}: feature `{name}` of {input} is {other}, not a number"
                                )),
                            })
                            .collect::<Result<Vec<f32>, _>>()
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => return Err("give one of `rows`, `instances` or `inputs`".into()),
        }
    };
    counted(rows, &input, &expected, max_rows)
}

/// The rows of `{"inputs": {"a": [[…]], "b": [[…]]}}`: every input of the model by name,
/// each with the same number of rows of its own width, put together into rows of
/// features in the graph's order.
fn rows_by_input(
    model: &LoadedModel,
    mut given: serde_json::Map<String, Value>,
    max_rows: usize,
) -> Result<Vec<Vec<f32>>, String> {
    let inputs = model.plan.inputs();
    let known: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
    if let Some(unknown) = given.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!(
            "`{unknown}` is not an input of the model (`{}`)",
            known.join("`, `")
        ));
    }
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for (k, input) in inputs.iter().enumerate() {
        let expected = format!("[N, {}] {} (N ≤ {max_rows})", input.len, input.dtype.name());
        let name = &input.name;
        let value = given
            .remove(name)
            .ok_or_else(|| format!("input `{name}` ({expected}) is missing"))?;
        let parts: Vec<Vec<Option<f32>>> = serde_json::from_value(value)
            .map_err(|e| format!("input `{name}` expects {expected}: {e}"))?;
        if parts.len() > max_rows {
            return Err(format!(
                "input `{name}` expects {expected}; received {} rows",
                parts.len()
            ));
        }
        if k == 0 {
            rows = vec![Vec::with_capacity(model.plan.features()); parts.len()];
        } else if parts.len() != rows.len() {
            return Err(format!(
                "inputs `{}` and `{name}` give {} and {} rows: every input gives the same rows",
                inputs[0].name,
                rows.len(),
                parts.len()
            ));
        }
        for (i, (row, part)) in rows.iter_mut().zip(parts).enumerate() {
            if part.len() != input.len {
                return Err(format!(
                    "input `{name}` expects {expected}; row {i} has {} values",
                    part.len()
                ));
            }
            // `null` stands for a missing value: refused by the model, by feature name.
            row.extend(part.into_iter().map(|v| v.unwrap_or(f32::NAN)));
        }
    }
    Ok(rows)
}

/// A binary body's shape header: its text and the dimensions it gives (`form` says what
/// it should look like, for the messages).
fn shape_header<'h>(headers: &'h HeaderMap, form: &str) -> Result<(&'h str, Vec<usize>), String> {
    let shape = headers
        .get(SHAPE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| format!("a binary body needs the {SHAPE_HEADER} header ({form})"))?;
    let dims = shape
        .split('x')
        .map(|d| d.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{SHAPE_HEADER} `{shape}` is not {form}"))?;
    Ok((shape, dims))
}

/// Whether the body is binary f32 values (`application/octet-stream`) rather than JSON.
fn is_binary(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"))
}

/// The rows, unless there are none or more than `max_rows`.
fn counted(
    rows: Vec<Vec<f32>>,
    input: &str,
    expected: &str,
    max_rows: usize,
) -> Result<Vec<Vec<f32>>, String> {
    if rows.is_empty() {
        return Err(format!("{input} expects {expected}; received no rows"));
    }
    if rows.len() > max_rows {
        return Err(format!(
            "{input} expects {expected}; received {} rows",
            rows.len()
        ));
    }
    Ok(rows)
}

/// `n` rows of `len` little-endian f32 values each from a binary body, whose size must
/// be exactly that (`shape` is the header, for the message).
fn f32_rows(body: &[u8], shape: &str, n: usize, len: usize) -> Result<Vec<Vec<f32>>, String> {
    let needed = n.checked_mul(len).and_then(|v| v.checked_mul(4));
    if needed != Some(body.len()) {
        return Err(format!(
            "{SHAPE_HEADER} `{shape}` needs {} bytes of f32; the body has {}",
            needed.map_or_else(|| "more".to_string(), |b| b.to_string()),
            body.len()
        ));
    }
    Ok(body
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect::<Vec<_>>()
        .chunks(len.max(1))
        .map(<[f32]>::to_vec)
        .collect())
}

/// The request's rows for a tensor input (`[N, d1, d2, …]`): JSON `{"rows": [...]}` with
/// each row nested as the tensor is (`[[[…]]]`, as numpy's `tolist()` writes it) or flat
/// in row-major order, or a binary body whose shape header is `Nxd1xd2…` (or `NxL`, L the
/// numbers in a row). Each row comes back flat, in row-major order.
fn read_tensor_rows(
    model: &LoadedModel,
    headers: &HeaderMap,
    body: &[u8],
    max_rows: usize,
) -> Result<Vec<Vec<f32>>, String> {
    let input = &model.manifest.inputs[0].name;
    let dims = model.plan.row_shape();
    let len = model.plan.features();
    let dims_text: Vec<String> = dims.iter().map(usize::to_string).collect();
    let expected = format!("[N, {}] f32 (N ≤ {max_rows})", dims_text.join(", "));
    let binary = is_binary(headers);
    let rows: Vec<Vec<f32>> = if binary {
        let (shape, given) = shape_header(headers, &format!("Nx{}", dims_text.join("x")))?;
        let Some((&n, row)) = given.split_first() else {
            return Err(format!("{SHAPE_HEADER} is empty"));
        };
        if row != dims && row != [len] {
            return Err(format!(
                "input `{input}` expects {expected}; received [{}]",
                given
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        f32_rows(body, shape, n, len)?
    } else {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct TensorJson {
            rows: Vec<Value>,
        }
        let request: TensorJson = serde_json::from_slice(body).map_err(|e| {
            format!("body is not {{\"rows\": [...]}} with one {expected} tensor per row: {e}")
        })?;
        if request.rows.len() > max_rows {
            return Err(format!(
                "input `{input}` expects {expected}; received {} rows",
                request.rows.len()
            ));
        }
        request
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let mut flat = Vec::with_capacity(len);
                let flat_form = row
                    .as_array()
                    .is_some_and(|a| a.len() == len && a.iter().all(|v| !v.is_array()));
                let dims: &[usize] = if flat_form { &[len] } else { dims };
                flatten_row(row, dims, &mut flat, &mut Vec::new()).map_err(|fault| {
                    format!("input `{input}` expects {expected}; row {i}: {fault}")
                })?;
                Ok(flat)
            })
            .collect::<Result<_, String>>()?
    };
    counted(rows, &format!("input `{input}`"), &expected, max_rows)
}

/// Appends the numbers of `value`, nested as `dims` says, to `out`; or says where the
/// nesting or a number is wrong (`at` is the index reached so far).
fn flatten_row(
    value: &Value,
    dims: &[usize],
    out: &mut Vec<f32>,
    at: &mut Vec<usize>,
) -> Result<(), String> {
    let here = || {
        if at.is_empty() {
            String::new()
        } else {
            format!(
                " at [{}]",
                at.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    match (dims.split_first(), value) {
        (None, Value::Number(n)) => {
            out.push(n.as_f64().unwrap_or(f64::NAN) as f32);
            Ok(())
        }
        // `null` stands for a missing value: refused by the model's finite check, by index.
        (None, Value::Null) => {
            out.push(f32::NAN);
            Ok(())
        }
        (None, other) => Err(format!("{other} is not a number{}", here())),
        (Some((&dim, rest)), Value::Array(items)) => {
            if items.len() != dim {
                return Err(format!(
                    "{} values where {dim} belong{}",
                    items.len(),
                    here()
                ));
            }
            for (j, item) in items.iter().enumerate() {
                at.push(j);
                flatten_row(item, rest, out, at)?;
                at.pop();
            }
            Ok(())
        }
        (Some((&dim, _)), other) => Err(format!(
            "{} where an array of {dim} belongs{}",
            if other.is_number() {
                "a number"
            } else {
                "a non-array"
            },
            here()
        )),
    }
}

async fn infer(State(state): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let metrics = state.metrics.clone();
    let Some(model) = state.served.get() else {
        metrics.requests_unavailable.fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::SERVICE_UNAVAILABLE, "no model is serving yet");
    };
    let rows = match read_rows(&model, &headers, &body, state.limits.max_rows) {
        Ok(rows) => rows,
        Err(message) => {
            metrics.requests_bad.fetch_add(1, Ordering::Relaxed);
            return error(StatusCode::BAD_REQUEST, message);
        }
    };
    let Ok(permit) = state.permits.clone().acquire_owned().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping");
    };
    let running = model.clone();
    let inferred = tokio::task::spawn_blocking(move || {
        // Held by the work itself: a caller that hangs up does not free its slot early.
        let _permit = permit;
        let outputs = rows
            .iter()
            .enumerate()
            .map(|(i, row)| running.infer(row).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>();
        (rows, outputs)
    })
    .await;
    let (rows, outputs) = match inferred {
        Ok((rows, Ok(outputs))) => (rows, outputs),
        // What the caller sent: the wrong width, a missing or infinite value, a value the
        // model's input type cannot hold.
        Ok((
            _,
            Err((
                i,
                e @ (RuntimeError::WidthMismatch { .. }
                | RuntimeError::NonFinite { .. }
                | RuntimeError::NotRepresentable { .. }),
            )),
        )) => {
            metrics.requests_bad.fetch_add(1, Ordering::Relaxed);
            return error(StatusCode::BAD_REQUEST, format!("row {i}: {e}"));
        }
        // The model failed on a valid input: the health window and the drift window hear
        // of it.
        Ok((_, Err((i, e)))) => {
            metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "inference failed");
            let failed = Observation::Failed {
                model: model.manifest.model_ref(),
                rows: 1,
            };
            if state.observed.try_send(failed).is_err() {
                metrics.observations_dropped.fetch_add(1, Ordering::Relaxed);
            }
            return error(StatusCode::INTERNAL_SERVER_ERROR, format!("row {i}: {e}"));
        }
        Err(e) => {
            metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("inference task: {e}"),
            );
        }
    };
    let model_ref = model.manifest.model_ref();
    let latency_ms = started.elapsed().as_secs_f64() * 1e3 / rows.len().max(1) as f64;
    let request_id = uuid::Uuid::now_v7().to_string();
    let regression = model.is_regression();
    let predicted: Vec<Target> = outputs.iter().map(|o| o.target(regression)).collect();
    for (i, ((row, output), &predicted)) in
        rows.into_iter().zip(&outputs).zip(&predicted).enumerate()
    {
        // A tensor row is counted as its channels' statistics, computed here rather than
        // on the agent's loop; the tensor itself crosses over only as often as the sample
        // may keep it.
        let (row, tensor) = if model.is_tensor() {
            let statistics = model.drift_row(&row).into_owned();
            (statistics, model.sample_chance.draw().map(|c| (row, c)))
        } else {
            (row, None)
        };
        let observation = Observation::Inferred {
            model: model_ref.clone(),
            row,
            predicted,
            confidence: (!regression).then(|| confidence(&output.scores)),
            latency_ms,
            request_key: format!("{request_id}/{i}"),
            tensor,
        };
        // The drift window is a statistic: when the actor is behind, an input goes
        // uncounted (and counted as such) rather than slowing the caller.
        if state.observed.try_send(observation).is_err() {
            metrics.observations_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    let labels = model.manifest.served_output().names.clone();
    state
        .recent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remember(request_id.clone(), model_ref.clone(), predicted);
    let body = json!({
        "request_id": request_id,
        "model": model_ref,
        "outputs": outputs
            .into_iter()
            .map(|p| match regression {
                true => RowOutput::Value { value: p.scores[0] },
                false => RowOutput::Class {
                    label: labels.get(p.class).cloned(),
                    class: p.class,
                    scores: p.scores,
                },
            })
            .collect::<Vec<_>>(),
    });
    metrics.rows.fetch_add(
        body["outputs"].as_array().map_or(0, Vec::len) as u64,
        Ordering::Relaxed,
    );
    metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
    metrics.observe_latency(started.elapsed().as_secs_f64());
    axum::Json(body).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Feedback {
    request_id: String,
    /// A class name of the model's output, or a class index; for a regression, the true
    /// value.
    label: Value,
    /// Which row of the request (0 for a single-row request).
    #[serde(default)]
    row: usize,
}

async fn feedback(State(state): State<ApiState>, body: Bytes) -> Response {
    let refused = |status: StatusCode, message: String| {
        state
            .metrics
            .feedback_refused
            .fetch_add(1, Ordering::Relaxed);
        error(status, message)
    };
    let feedback: Feedback = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            return refused(
                StatusCode::BAD_REQUEST,
                format!("feedback must be {{\"request_id\", \"label\", \"row\"}}: {e}"),
            );
        }
    };
    let (model, predicted, label) = {
        let mut recent = state.recent.lock().unwrap_or_else(|e| e.into_inner());
        let Some(request) = recent.by_id.get_mut(&feedback.request_id) else {
            return refused(
                StatusCode::NOT_FOUND,
                format!(
                    "request `{}` is unknown or older than the last {} requests",
                    feedback.request_id, state.limits.feedback_memory
                ),
            );
        };
        let rows = request.predicted.len();
        let Some(&predicted) = request.predicted.get(feedback.row) else {
            return refused(
                StatusCode::BAD_REQUEST,
                format!(
                    "request `{}` has {rows} rows, no row {}",
                    feedback.request_id, feedback.row
                ),
            );
        };
        let names = state
            .served
            .get()
            .filter(|m| m.manifest.model_ref() == request.model)
            .map(|m| m.manifest.served_output().names.clone())
            .unwrap_or_default();
        let label = match (predicted, &feedback.label) {
            (Target::Value(_), Value::Number(n)) => n
                .as_f64()
                .filter(|v| v.is_finite())
                .map(Target::Value)
                .ok_or_else(|| format!("label {n} is not a finite number")),
            (Target::Value(_), other) => Err(format!(
                "the model predicts a value: label must be the true value, a number, got {other}"
            )),
            (Target::Class(_), Value::String(name)) => names
                .iter()
                .position(|n| n == name)
                .map(Target::Class)
                .ok_or_else(|| {
                    format!("label `{name}` is not one of the model's classes {names:?}")
                }),
            (Target::Class(_), Value::Number(n)) => n
                .as_u64()
                .map(|i| i as usize)
                .filter(|&i| names.is_empty() || i < names.len())
                .map(Target::Class)
                .ok_or_else(|| format!("label {n} is not a class index of the model")),
            (Target::Class(_), other) => {
                Err(format!("label must be a class name or index, got {other}"))
            }
        };
        let label = match label {
            Ok(l) => l,
            Err(message) => return refused(StatusCode::BAD_REQUEST, message),
        };
        if std::mem::replace(&mut request.labelled[feedback.row], true) {
            return refused(
                StatusCode::CONFLICT,
                format!(
                    "row {} of request `{}` is already labelled",
                    feedback.row, feedback.request_id
                ),
            );
        }
        (request.model.clone(), predicted, label)
    };
    let observation = Observation::Labelled {
        model: model.clone(),
        label,
        predicted,
        request_key: format!("{}/{}", feedback.request_id, feedback.row),
    };
    if state.observed.try_send(observation).is_err() {
        state
            .metrics
            .observations_dropped
            .fetch_add(1, Ordering::Relaxed);
    }
    state.metrics.feedback_ok.fetch_add(1, Ordering::Relaxed);
    let mut body = json!({
        "request_id": feedback.request_id,
        "row": feedback.row,
        "model": model,
    });
    match (label, predicted) {
        (Target::Value(truth), Target::Value(value)) => {
            body["label"] = json!(truth);
            body["predicted"] = json!(value);
            body["error"] = json!(value - truth);
        }
        (Target::Class(label), Target::Class(class)) => {
            body["label"] = json!(label);
            body["predicted"] = json!(class);
            body["correct"] = json!(label == class);
        }
        _ => unreachable!("a label is parsed as the kind of its prediction"),
    }
    axum::Json(body).into_response()
}

async fn model(State(state): State<ApiState>) -> Response {
    let Some(model) = state.served.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no model is serving yet");
    };
    let m = &model.manifest;
    axum::Json(json!({
        "name": m.name,
        "version": m.version,
        "label": m.label,
        "inputs": m.inputs,
        "outputs": m.outputs,
        "features": model.feature_names(),
    }))
    .into_response()
}

async fn healthz(State(state): State<ApiState>) -> Response {
    match state.served.get() {
        Some(model) => {
            axum::Json(json!({"status": "serving", "model": model.manifest.model_ref()}))
                .into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "no model"})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let m = &state.metrics;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut out = String::new();
    out.push_str("# HELP edgeloop_agent_requests_total Inference requests by outcome.\n");
    out.push_str("# TYPE edgeloop_agent_requests_total counter\n");
    for (outcome, counter) in [
        ("ok", &m.requests_ok),
        ("bad_request", &m.requests_bad),
        ("unavailable", &m.requests_unavailable),
        ("error", &m.requests_failed),
    ] {
        out.push_str(&format!(
            "edgeloop_agent_requests_total{{outcome=\"{outcome}\"}} {}\n",
            get(counter)
        ));
    }
    out.push_str("# HELP edgeloop_agent_feedback_total Ground-truth labels by outcome.\n");
    out.push_str("# TYPE edgeloop_agent_feedback_total counter\n");
    for (outcome, counter) in [("ok", &m.feedback_ok), ("refused", &m.feedback_refused)] {
        out.push_str(&format!(
            "edgeloop_agent_feedback_total{{outcome=\"{outcome}\"}} {}\n",
            get(counter)
        ));
    }
    out.push_str("# HELP edgeloop_agent_rows_total Rows inferred through the API.\n");
    out.push_str("# TYPE edgeloop_agent_rows_total counter\n");
    out.push_str(&format!("edgeloop_agent_rows_total {}\n", get(&m.rows)));
    out.push_str("# HELP edgeloop_agent_drift_observations_dropped_total Inferred rows not counted into the drift window because the agent was behind.\n");
    out.push_str("# TYPE edgeloop_agent_drift_observations_dropped_total counter\n");
    out.push_str(&format!(
        "edgeloop_agent_drift_observations_dropped_total {}\n",
        get(&m.observations_dropped)
    ));
    out.push_str(
        "# HELP edgeloop_agent_request_seconds Latency of successful inference requests.\n",
    );
    out.push_str("# TYPE edgeloop_agent_request_seconds histogram\n");
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += get(&m.latency[i]);
        out.push_str(&format!(
            "edgeloop_agent_request_seconds_bucket{{le=\"{bound}\"}} {cumulative}\n"
        ));
    }
    cumulative += get(&m.latency[LATENCY_BUCKETS.len()]);
    out.push_str(&format!(
        "edgeloop_agent_request_seconds_bucket{{le=\"+Inf\"}} {cumulative}\n"
    ));
    out.push_str(&format!(
        "edgeloop_agent_request_seconds_sum {}\n",
        get(&m.latency_sum_us) as f64 / 1e6
    ));
    out.push_str(&format!(
        "edgeloop_agent_request_seconds_count {cumulative}\n"
    ));
    if let Some(model) = state.served.get() {
        let r = model.manifest.model_ref();
        out.push_str("# HELP edgeloop_agent_model_info The model being served.\n");
        out.push_str("# TYPE edgeloop_agent_model_info gauge\n");
        out.push_str(&format!(
            "edgeloop_agent_model_info{{name=\"{}\",version=\"{}\"}} 1\n",
            r.name, r.version
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_are_told_from_other_names() {
        for host in [
            "127.0.0.1:8181",
            "127.0.0.1",
            "127.8.9.10:80",
            "localhost:8080",
            "LocalHost",
            "api.localhost:8080",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:8181",
            "evil.example",
            "192.168.1.20:8080",
            "localhost.evil.example:8080",
            "[::2]:8080",
            "[fe80::1]",
            "127.0.0.1.nip.io:8080",
            "",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn only_a_browser_page_of_another_origin_is_refused_a_change() {
        use axum::http::{HeaderValue, Method};
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        let host = ("host", "127.0.0.1:8080");
        let refused = |pairs: &[(&'static str, &'static str)]| {
            from_another_origin(&Method::POST, &headers(pairs))
        };
        // Tools and devices send neither header.
        assert!(!refused(&[host]));
        assert!(!refused(&[]));
        // Browsers that send Sec-Fetch-Site.
        assert!(!refused(&[host, ("sec-fetch-site", "same-origin")]));
        assert!(!refused(&[host, ("sec-fetch-site", "none")]));
        for site in ["cross-site", "same-site", "something-new"] {
            let pairs = [
                host,
                ("sec-fetch-site", site),
                ("origin", "http://127.0.0.1:8080"),
            ];
            assert!(refused(&pairs), "{site}");
        }
        // Older browsers: Origin against Host.
        assert!(!refused(&[host, ("origin", "http://127.0.0.1:8080")]));
        assert!(!refused(&[
            ("host", "Fleet.local:8080"),
            ("origin", "https://fleet.local:8080")
        ]));
        assert!(refused(&[host, ("origin", "http://127.0.0.1:9999")]));
        assert!(refused(&[host, ("origin", "http://evil.example")]));
        assert!(refused(&[host, ("origin", "null")]));
        assert!(refused(&[("origin", "http://127.0.0.1:8080")]));
        // Reads are never refused: a page may show the fleet.
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            let h = headers(&[host, ("sec-fetch-site", "cross-site")]);
            assert!(!from_another_origin(&method, &h), "{method}");
        }
        assert!(from_another_origin(
            &Method::DELETE,
            &headers(&[host, ("sec-fetch-site", "cross-site")])
        ));
    }
}
