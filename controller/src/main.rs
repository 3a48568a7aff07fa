//! `edgeloop`: the fleet controller and operator CLI.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use edgeloop_agent::now_ms;
use edgeloop_controller::config::{ControllerConfig, DEFAULT_CONFIG_TOML};
use edgeloop_controller::demo::{self, DemoOptions};
use edgeloop_controller::registry::{ArtifactStore, PublishRequest};
use edgeloop_controller::server::{Controller, open_store};
use edgeloop_controller::{keys, registry};

#[derive(Parser)]
#[command(
    name = "edgeloop",
    version,
    about = "edgeloop fleet controller: telemetry, model registry, signed rollouts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the whole loop locally: controller, embedded broker, SQLite, simulated devices.
    Demo {
        /// Number of simulated devices.
        #[arg(long, default_value_t = 5)]
        devices: usize,
        /// Stop after this many seconds (at least 15); without it, run until Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
        /// The API and dashboard.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: SocketAddr,
        /// `json` makes the last line of output one JSON object with the final state.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Keep the database, artifacts and device state here (default: a temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Create an ed25519 signing key (mode 0600) and its public key in a directory.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the controller.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Use this broker (mqtt://host:port) instead of the embedded one.
        #[arg(long)]
        mqtt_url: Option<String>,
        /// Where the embedded broker listens.
        #[arg(long)]
        mqtt_listen: Option<SocketAddr>,
        #[arg(long)]
        http_addr: Option<SocketAddr>,
    },
    /// Manage models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Manage the device registry.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Enrollment tokens for devices to join with.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage rollouts through a running controller's API.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Datasets of the devices' input samples, through a running controller's API.
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// The retraining policies the controller runs (its `[[retraining]]` configuration).
    Policies {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Retrainings the policies fired, and how far each got.
    Retrainings {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Read the audit log: who created, paused, resumed or aborted what, and what the
    /// rollout engine did by itself.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Rotate and revoke signing keys with trust documents signed by a root key.
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// Print the built-in default configuration (a commented TOML file).
    PrintDefaultConfig,
    /// Operators who may use the API and dashboard (the controller's `[[operators]]`).
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Make a token for a new operator: prints the token (once: hand it to them) and the
    /// `[[operators]]` entry to add to the controller's configuration, which keeps only its
    /// SHA-256. The controller admits the operator once it restarts with the entry.
    Add {
        /// The operator's name, which the audit log will show for what they do.
        name: String,
    },
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Ask devices to upload their input samples (a signed command); prints the dataset.
    Request {
        /// Only devices that run this model (unless --devices names them).
        #[arg(long)]
        model: Option<String>,
        /// These devices, comma-separated.
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<String>>,
        /// The devices of this group.
        #[arg(long)]
        group: Option<String>,
        /// The devices with all these tags, comma-separated.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// At most this many rows per device.
        #[arg(long)]
        max_rows: Option<u64>,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Datasets, newest first, with each device's part.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Download a dataset's file (the parts complete so far) and check its SHA-256: CSV
    /// for a table model's samples, NPY for a tensor model's.
    Get {
        id: u64,
        /// Write it here (default: standard output, which takes CSV only).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The controller's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        controller: String,
    },
}

/// A dataset as one line per part under a headline.
fn dataset_lines(d: &serde_json::Value) -> String {
    let mut text = format!(
        "dataset {}{}: {} parts, by {}{}",
        d["id"],
        d["model_name"]
            .as_str()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default(),
        d["parts"].as_array().map_or(0, Vec::len),
        d["created_by"].as_str().unwrap_or(""),
        d["reason"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    for p in d["parts"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "\n  {:<24} {:<10} {}{}",
            p["device_id"].as_str().unwrap_or(""),
            p["status"].as_str().unwrap_or(""),
            p["rows"]
                .as_u64()
                .map(|r| format!("{r} rows, {} bytes", p["bytes"]))
                .unwrap_or_default(),
            p["detail"]
                .as_str()
                .map(|r| format!(" {r}"))
                .unwrap_or_default()
        ));
    }
    text
}

async fn dataset_command(command: DatasetCommand) -> anyhow::Result<()> {
    match command {
        DatasetCommand::Request {
            model,
            devices,
            group,
            tags,
            max_rows,
            reason,
            api,
        } => {
            let body = serde_json::json!({
                "model": model, "devices": devices, "group": group, "tags": tags,
                "max_rows": max_rows, "reason": reason,
            });
            let text = post_json(&api.url("/api/v1/datasets"), &body).await?;
            let row: serde_json::Value = serde_json::from_str(&text)?;
            if api.output == Output::Json {
                println!("{row}");
            } else {
                println!("{}", dataset_lines(&row));
            }
        }
        DatasetCommand::List { limit, api } => {
            list(
                &api,
                &format!("/api/v1/datasets?limit={limit}"),
                dataset_lines,
            )
            .await?;
        }
        DatasetCommand::Get {
            id,
            out,
            controller,
        } => {
            let url = format!(
                "{}/api/v1/datasets/{id}/file",
                controller.trim_end_matches('/')
            );
            let response = api_client()?
                .get(&url)
                .send()
                .await
                .with_context(|| format!("cannot reach the controller at {url}"))?;
            let status = response.status();
            let declared = response
                .headers()
                .get(edgeloop_controller::api::SHA256_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = response.bytes().await?;
            if !status.is_success() {
                bail!(
                    "controller answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            let digest = edgeloop_shared::sha256_hex(&bytes);
            if declared.as_deref() != Some(digest.as_str()) {
                bail!("dataset {id} arrived with SHA-256 {digest}, not the declared {declared:?}");
            }
            match out {
                Some(path) => {
                    std::fs::write(&path, &bytes)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "dataset {id}: {} bytes, sha256 {digest}, written to {}",
                        bytes.len(),
                        path.display()
                    );
                }
                None if bytes.starts_with(edgeloop_shared::npy::MAGIC) => bail!(
                    "dataset {id} holds a tensor model's inputs, an NPY file: name it with --out"
                ),
                None => {
                    use std::io::Write as _;
                    std::io::stdout().write_all(&bytes)?;
                }
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Sign a trust document with a root key (keep root keys offline; create one with
    /// `edgeloop keygen --out DIR`). Prints the signed document as JSON.
    Sign {
        /// The root key's secret file (mode 0600).
        #[arg(long)]
        root_key: PathBuf,
        /// Above the version of every document published before.
        #[arg(long)]
        version: u64,
        /// Root keys from now on: `ed25519:…` texts or files holding one, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        root_keys: Vec<String>,
        /// Keys that sign bundles and commands from now on, as for --root-keys.
        #[arg(long, value_delimiter = ',', required = true)]
        signing_keys: Vec<String>,
        /// Key ids (16 hex digits) never to trust again, comma-separated.
        #[arg(long, value_delimiter = ',')]
        revoke: Vec<String>,
        /// Write the document here instead of to standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Hand a signed document to a running controller, which publishes it to the fleet.
    Publish {
        /// The signed document (from `edgeloop trust sign`).
        document: PathBuf,
        /// The controller's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        controller: String,
    },
}

/// POSTs `body` to the controller's API; its answer, or its error as the controller said it.
async fn post_json(url: &str, body: &serde_json::Value) -> anyhow::Result<String> {
    send(api_client()?.post(url).json(body), url).await
}

/// Prints what a listing endpoint answers: as it is with `--output json`, else a line per
/// entry.
async fn list(
    api: &ApiArgs,
    path: &str,
    line: impl Fn(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    let rows = get_json(&api.url(path)).await?;
    if api.output == Output::Json {
        println!("{rows}");
    } else {
        for row in rows.as_array().into_iter().flatten() {
            println!("{}", line(row));
        }
    }
    Ok(())
}

async fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    let text = send(api_client()?.get(url), url).await?;
    serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))
}

/// The environment variable from which the CLI takes its operator token.
const API_TOKEN_VAR: &str = "EDGELOOP_API_TOKEN";

/// Who the CLI acts for in the audit log: `EDGELOOP_ACTOR`, else the login name (a
/// controller with operators records the token's operator instead).
fn cli_actor() -> String {
    ["EDGELOOP_ACTOR", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|a| !a.trim().is_empty()))
        .unwrap_or_else(|| "cli".into())
}

/// A client for the controller's API: it names the CLI's actor and, from
/// `EDGELOOP_API_TOKEN`, shows the operator's token.
fn api_client() -> anyhow::Result<reqwest::Client> {
    use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
    let mut headers = HeaderMap::new();
    headers.insert(
        edgeloop_controller::api::ACTOR_HEADER,
        HeaderValue::from_str(&cli_actor()).context("the actor name is not a header value")?,
    );
    if let Some(token) = std::env::var(API_TOKEN_VAR)
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .with_context(|| format!("{API_TOKEN_VAR} is not a header value"))?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

async fn send(request: reqwest::RequestBuilder, url: &str) -> anyhow::Result<String> {
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the controller at {url}"))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("controller answered {status}: {text}");
    }
    Ok(text)
}

/// A public key given on the command line: its text, or a file holding it.
fn public_key_arg(arg: &str) -> anyhow::Result<String> {
    use edgeloop_shared::signing::PublicKey;
    let text = if arg.starts_with(edgeloop_shared::signing::PUBLIC_KEY_PREFIX) {
        arg.to_string()
    } else {
        std::fs::read_to_string(arg)
            .with_context(|| format!("`{arg}` is neither a public key nor a readable file"))?
            .trim()
            .to_string()
    };
    PublicKey::parse(&text).with_context(|| format!("`{arg}` does not hold a public key"))?;
    Ok(text)
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ModelCommand {
    /// Check a model with tract, profile its reference data, sign it and store it.
    Publish {
        /// The ONNX model.
        model: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: u64,
        /// Reference data: CSV with a header, the columns the model's input features; or,
        /// for a model of tensor input (images, sequences), a NumPy .npy array of reference
        /// inputs (N, d1, d2, …).
        #[arg(long)]
        reference: PathBuf,
        /// A column of the reference data that is not an input (for example the label).
        #[arg(long)]
        label_column: Option<String>,
        /// Features that are categorical codes (site, mode, …), comma-separated: profiled by
        /// category, with the chi-square test, instead of by quantile bins.
        #[arg(long, value_delimiter = ',')]
        categorical: Vec<String>,
        /// Class labels in output order, comma-separated. Default: the classes the graph
        /// names (a scikit-learn export carries them), else class_0, class_1, … For a
        /// regression: the name of what it predicts.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// The model predicts a value (its output has one column) rather than class
        /// scores: devices serve the value, watch its distribution for drift and, given
        /// true values as feedback, report its mean absolute and root mean squared error.
        #[arg(long)]
        regression: bool,
        /// Preprocessing devices apply before the model, `x' = (x - offset) * scale` per
        /// feature: the offsets, comma-separated in feature order (a standard scaler's
        /// means). Reference data, holdout and drift stay in the units devices receive.
        #[arg(
            long,
            value_delimiter = ',',
            allow_negative_numbers = true,
            requires = "scale"
        )]
        offset: Vec<f64>,
        /// The scales, comma-separated in feature order (one over a standard scaler's
        /// standard deviations).
        #[arg(
            long,
            value_delimiter = ',',
            allow_negative_numbers = true,
            requires = "offset"
        )]
        scale: Vec<f64>,
        /// For a model of tensor input (its --reference an NPY array (N, d1, d2, …)): the
        /// axis of its channels, counting the batch as 0. Default: 2 for [batch, time,
        /// features] sequences, 1 (NCHW) for images.
        #[arg(long)]
        channel_axis: Option<u32>,
        /// For a tensor model whose channels come first (`[N, C, H, W]`): devices send rows
        /// channels last (`[N, H, W, C]`, as cameras give images), and so does the NPY
        /// reference; the agent transposes each row for the model.
        #[arg(long)]
        channels_last: bool,
        /// A human-readable description of this version.
        #[arg(long)]
        label: Option<String>,
        /// Devices refuse the model if one inference takes longer (median, measured at
        /// install), in milliseconds.
        #[arg(long)]
        latency_budget_ms: Option<f64>,
        /// Devices with an older agent refuse the model.
        #[arg(long)]
        min_agent_version: Option<String>,
        /// CPU architectures the model is for (x86_64, aarch64, arm), comma-separated;
        /// default: any.
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        /// Boards the model is for (rpi4, rpi5, jetson-orin-nano, beaglebone-black,
        /// linux-x86_64, linux-aarch64, android-arm64), comma-separated; default: any.
        #[arg(long, value_delimiter = ',')]
        boards: Vec<String>,
        /// When a feature and a window count as drifted: a TOML file of drift policy keys
        /// (`method = "ks"`, `ks_alpha = 0.01`, `dataset_share = 0.5`, …); default: PSI
        /// at 0.25.
        #[arg(long)]
        drift_policy: Option<PathBuf>,
        /// Lineage: the version this one was trained from.
        #[arg(long)]
        parent_version: Option<u64>,
        /// Lineage: the training data, whose SHA-256 goes into the manifest.
        #[arg(long)]
        training_data: Option<PathBuf>,
        #[command(flatten)]
        gate: GateArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List published models with their lineage.
    List {
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Compare two published versions on a labelled holdout, as the quality gate would judge
    /// the second against the first. Exits non-zero when the gate would fail.
    Compare {
        name: String,
        /// The version to compare with (the current model).
        baseline: u64,
        /// The version judged (the candidate).
        candidate: u64,
        #[command(flatten)]
        gate: GateArgs,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// The quality and bias gate, on the command line.
#[derive(clap::Args)]
struct GateArgs {
    /// Labelled holdout data (CSV with the model's features and a label column of class
    /// indices, or a regression's true values; for a tensor model an NPY array of records
    /// `x`, `predicted`, `label`, as `edgeloop dataset get` writes one). With it, `publish`
    /// signs the model only if it passes the gate.
    #[arg(long)]
    holdout: Option<PathBuf>,
    /// The holdout's label column.
    #[arg(long, default_value = "label")]
    holdout_label: String,
    /// accuracy or f1 (macro) for a classifier, mae or rmse for a regression. Default:
    /// accuracy, or mae for a regression.
    #[arg(long)]
    gate_metric: Option<edgeloop_controller::gate::Metric>,
    /// How much worse than the current model the candidate may be: by this much accuracy
    /// or F1, or, for an error, by this share of the current model's.
    #[arg(long, default_value_t = 0.01)]
    gate_tolerance: f64,
    /// The lowest share of its overall figure any segment may reach.
    #[arg(long, default_value_t = 0.8)]
    parity: f64,
    /// Segments for the bias check: a holdout column (device group, board) or
    /// FEATURE:BUCKETS (quantile buckets of a feature).
    #[arg(long)]
    segment_by: Option<String>,
    /// Segments with fewer rows are not judged.
    #[arg(long, default_value_t = edgeloop_controller::gate::DEFAULT_MIN_SEGMENT_ROWS)]
    min_segment_rows: usize,
    /// publish only: the version to compare with (default: the newest published).
    #[arg(long)]
    against: Option<u64>,
}

impl GateArgs {
    fn policy(&self) -> anyhow::Result<edgeloop_controller::gate::GatePolicy> {
        use edgeloop_controller::gate::GatePolicy;
        let segments = match &self.segment_by {
            Some(s) => Some(
                s.parse()
                    .map_err(|e: String| anyhow::anyhow!("--segment-by: {e}"))?,
            ),
            None => None,
        };
        let policy = GatePolicy {
            metric: self.gate_metric,
            tolerance: self.gate_tolerance,
            parity: self.parity,
            label_column: self.holdout_label.clone(),
            segments,
            min_segment_rows: self.min_segment_rows,
        };
        policy.validate()?;
        Ok(policy)
    }

    fn gate(&self) -> anyhow::Result<Option<registry::QualityGate<'_>>> {
        let Some(holdout) = &self.holdout else {
            return Ok(None);
        };
        Ok(Some(registry::QualityGate {
            holdout,
            policy: self.policy()?,
            against: self.against,
        }))
    }
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register devices, so that a controller with `accept_unknown_devices = false` hears
    /// them.
    Add {
        /// Device ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Enrollments, pending and approved.
    Enrollments {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Approve a pending enrollment: the device joins the registry and is heard.
    Approve {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Pre-authorize a device's key (from `edgeloop-agent device-key` on the device): the
    /// device enrolls once without a token, signing its request with the key.
    Preauthorize {
        /// The device's public key (`ed25519:…`) or a file holding it.
        #[arg(long)]
        key: String,
        #[arg(long)]
        group: String,
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Seconds the pre-authorization holds.
        #[arg(long, default_value_t = 365 * 86_400)]
        ttl_s: u64,
        /// The device waits for `edgeloop device approve`.
        #[arg(long)]
        review: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Write a provisioning bundle to copy onto a device's image before flashing: the agent
    /// configuration with a new enrollment token, the controller's keys, a systemd unit and
    /// the board's settings.
    Provision {
        #[command(flatten)]
        request: edgeloop_controller::provision::Request,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Manage enrollment tokens through a running controller's API.
#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; prints its secret once.
    Create {
        #[arg(long)]
        group: String,
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Seconds it is valid.
        #[arg(long, default_value_t = 86_400)]
        ttl_s: u64,
        /// Enrollments it allows.
        #[arg(long, default_value_t = 1, conflicts_with = "unlimited")]
        uses: u64,
        /// Any number of enrollments until it expires.
        #[arg(long)]
        unlimited: bool,
        /// Its devices wait for `edgeloop device approve`.
        #[arg(long)]
        review: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
}

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum RolloutCommand {
    /// Deploy a model version to every known device, or to the listed ones.
    Create {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: u64,
        /// Comma-separated device ids (default: every known device).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
        /// Roll back: devices install this version although it is not above their active
        /// one (without this they refuse it).
        #[arg(long)]
        rollback: bool,
        /// Cumulative reach of each wave, devices or percentages, the last `100%`; for
        /// example `1,10%,50%,100%` (default: every device at once).
        #[arg(long, value_delimiter = ',')]
        waves: Vec<String>,
        /// Share of a wave that must commit before the next wave starts (default 1).
        #[arg(long)]
        success_threshold: Option<f64>,
        /// Share of a wave's executed deployments that, failed, stops the rollout (default:
        /// never stops early).
        #[arg(long)]
        failure_threshold: Option<f64>,
        /// Deployments of a wave that must have executed before thresholds are judged.
        #[arg(long)]
        min_executed: Option<u64>,
        /// What a failed wave does: pause, or abort and roll back.
        #[arg(long, value_enum)]
        on_failure: Option<OnFailureArg>,
        /// Seconds a device has, from its wave's start, to commit or fail (default 3600).
        #[arg(long)]
        device_timeout_s: Option<u64>,
        /// Telemetry gate: the next wave opens only if the new version's median drift is at
        /// most this many times the old version's over the same period.
        #[arg(long)]
        max_drift_ratio: Option<f64>,
        /// Telemetry gate: … and its accuracy on feedback labels at most this far below the
        /// old version's.
        #[arg(long)]
        max_accuracy_drop: Option<f64>,
        /// Telemetry gate, for a regression: … and its mean absolute error on true values at
        /// most this share above the old version's (0.1: a tenth more).
        #[arg(long)]
        max_mae_rise: Option<f64>,
        /// Telemetry gate: … and its median p99 latency at most this many times the old
        /// version's.
        #[arg(long)]
        max_latency_ratio: Option<f64>,
        /// Telemetry gate: … and its share of failed inferences at most this much above the
        /// old version's.
        #[arg(long)]
        max_error_rate_increase: Option<f64>,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List rollouts.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one rollout with its deployments.
    Show {
        id: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop sending commands; deployments in flight finish.
    Pause {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Go on; a rollout paused by a failed wave moves on to the next wave.
    Resume {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop for good; commands not yet sent are cancelled.
    Abort {
        id: u64,
        /// Roll the devices that run the new version back to their previous model.
        #[arg(long)]
        rollback: bool,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnFailureArg {
    Pause,
    Abort,
}

/// How the CLI reaches a running controller.
#[derive(clap::Args)]
struct ApiArgs {
    /// The controller's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    controller: String,
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

impl ApiArgs {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.controller.trim_end_matches('/'))
    }
}

async fn rollout_command(command: RolloutCommand) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Create {
            model,
            version,
            devices,
            rollback,
            waves,
            success_threshold,
            failure_threshold,
            min_executed,
            on_failure,
            device_timeout_s,
            max_drift_ratio,
            max_accuracy_drop,
            max_mae_rise,
            max_latency_ratio,
            max_error_rate_increase,
            reason,
            api,
        } => {
            let mut plan = serde_json::Map::new();
            if !waves.is_empty() {
                plan.insert("waves".into(), serde_json::json!(waves));
            }
            let mut set = |key: &str, value: Option<serde_json::Value>| {
                if let Some(v) = value {
                    plan.insert(key.into(), v);
                }
            };
            set("success_threshold", success_threshold.map(Into::into));
            set("failure_threshold", failure_threshold.map(Into::into));
            set("min_executed", min_executed.map(Into::into));
            set("device_timeout_s", device_timeout_s.map(Into::into));
            let mut gate = serde_json::Map::new();
            for (key, value) in [
                ("max_drift_ratio", max_drift_ratio),
                ("max_accuracy_drop", max_accuracy_drop),
                ("max_mae_rise", max_mae_rise),
                ("max_latency_ratio", max_latency_ratio),
                ("max_error_rate_increase", max_error_rate_increase),
            ] {
                if let Some(v) = value {
                    gate.insert(key.into(), v.into());
                }
            }
            set(
                "telemetry_gate",
                (!gate.is_empty()).then_some(serde_json::Value::Object(gate)),
            );
            set(
                "on_failure",
                on_failure.map(|o| match o {
                    OnFailureArg::Pause => "pause".into(),
                    OnFailureArg::Abort => "abort".into(),
                }),
            );
            let mut body = serde_json::json!({
                "model": model, "version": version, "rollback": rollback, "plan": plan,
            });
            if !devices.is_empty() {
                body["devices"] = serde_json::json!(devices);
            }
            if let Some(reason) = reason {
                body["reason"] = reason.into();
            }
            let row = post_json(&api.url("/api/v1/rollouts"), &body).await?;
            print_rollouts(&api, &[serde_json::from_str(&row)?]);
        }
        RolloutCommand::List { api } => {
            let rows = get_json(&api.url("/api/v1/rollouts")).await?;
            print_rollouts(&api, rows.as_array().map(Vec::as_slice).unwrap_or_default());
        }
        RolloutCommand::Show { id, api } => {
            let row = get_json(&api.url(&format!("/api/v1/rollouts/{id}"))).await?;
            if api.output == Output::Json {
                println!("{row}");
            } else {
                print_rollouts(&api, std::slice::from_ref(&row));
                for d in row["deployments"].as_array().into_iter().flatten() {
                    println!(
                        "  wave {:<3} {:<24} {:<12} {}",
                        d["wave"],
                        d["device_id"].as_str().unwrap_or(""),
                        d["status"].as_str().unwrap_or(""),
                        d["detail"].as_str().unwrap_or("")
                    );
                }
            }
        }
        RolloutCommand::Pause { id, reason, api } => {
            change_rollout(&api, id, "pause", serde_json::json!({ "reason": reason })).await?
        }
        RolloutCommand::Resume { id, reason, api } => {
            change_rollout(&api, id, "resume", serde_json::json!({ "reason": reason })).await?
        }
        RolloutCommand::Abort {
            id,
            rollback,
            reason,
            api,
        } => {
            change_rollout(
                &api,
                id,
                "abort",
                serde_json::json!({ "reason": reason, "rollback": rollback }),
            )
            .await?
        }
    }
    Ok(())
}

async fn change_rollout(
    api: &ApiArgs,
    id: u64,
    action: &str,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let text = post_json(&api.url(&format!("/api/v1/rollouts/{id}/{action}")), &body).await?;
    let changed: serde_json::Value = serde_json::from_str(&text)?;
    if api.output == Output::Json {
        println!("{changed}");
        return Ok(());
    }
    print_rollouts(api, std::slice::from_ref(&changed["rollout"]));
    for r in changed["rollbacks"].as_array().into_iter().flatten() {
        print!("rollback started: ");
        print_rollouts(api, std::slice::from_ref(r));
    }
    Ok(())
}

/// Rollouts as JSON (one array), or a line each: id, model, status, wave and counts.
fn print_rollouts(api: &ApiArgs, rows: &[serde_json::Value]) {
    if api.output == Output::Json {
        println!("{}", serde_json::Value::Array(rows.to_vec()));
        return;
    }
    for r in rows {
        let deployments = r["deployments"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let count = |states: &[&str]| {
            deployments
                .iter()
                .filter(|d| states.contains(&d["status"].as_str().unwrap_or("")))
                .count()
        };
        println!(
            "rollout {} {} v{}{}: {}, wave {} of {}, {} committed, {} failed of {}{}",
            r["id"],
            r["model_name"].as_str().unwrap_or(""),
            r["model_version"],
            if r["rollback"] == true {
                " (rollback)"
            } else {
                ""
            },
            r["status"].as_str().unwrap_or(""),
            r["current_wave"].as_u64().unwrap_or(0) + 1,
            r["plan"]["waves"].as_array().map_or(1, Vec::len),
            count(&["committed"]),
            count(&edgeloop_controller::store::FAILED_STATES),
            deployments.len(),
            r["reason"]
                .as_str()
                .map(|why| format!(" ({why})"))
                .unwrap_or_default(),
        );
    }
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML configuration (defaults, then this file, then EDGELOOP_* variables, then flags).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PostgreSQL (postgres://…) instead of SQLite in the data directory.
    #[arg(long)]
    database_url: Option<String>,
    /// The signing key (default: {data_dir}/keys/signing.key).
    #[arg(long)]
    key: Option<PathBuf>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<ControllerConfig> {
        let mut config = ControllerConfig::load(self.config.as_deref())?;
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(url) = &self.database_url {
            config.database_url = url.clone();
        }
        if let Some(key) = &self.key {
            config.signing_key = key.display().to_string();
        }
        Ok(config)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn load_key(config: &ControllerConfig) -> anyhow::Result<edgeloop_shared::signing::SecretKey> {
    let path = config.signing_key_path();
    if !path.exists() {
        bail!(
            "no signing key at {}: create one with `edgeloop keygen --out {}`",
            path.display(),
            path.parent()
                .map_or(".".into(), |p| p.display().to_string())
        );
    }
    Ok(keys::load(&path)?)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    edgeloop_agent::exit_with(run().await)
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::PrintDefaultConfig => print!("{DEFAULT_CONFIG_TOML}"),
        Command::Operator {
            command: OperatorCommand::Add { name },
        } => {
            let (token, operator) =
                edgeloop_controller::login::Operator::create(&name).map_err(anyhow::Error::msg)?;
            println!("token for {name} (shown once; the CLI reads it from EDGELOOP_API_TOKEN):");
            println!("{token}");
            println!("add to the controller's configuration, then restart it:");
            print!(
                "{}",
                toml::to_string(&serde_json::json!({ "operators": [operator] }))?
            );
        }
        Command::Keygen { out } => {
            let key = keys::keygen(&out)?;
            println!("key id {}", key.id());
            println!(
                "secret key: {} (mode 0600)",
                out.join(keys::SECRET_FILE).display()
            );
            println!("public key: {}", out.join(keys::PUBLIC_FILE).display());
            println!(
                "put this line in each device's trusted_keys:\n{}",
                key.public().to_text()
            );
        }
        Command::Serve {
            config,
            mqtt_url,
            mqtt_listen,
            http_addr,
        } => {
            init_tracing("info,rumqttd=off,rumqttc=warn");
            let mut config = config.load()?;
            if let Some(url) = mqtt_url {
                config.mqtt_url = url;
            }
            if let Some(listen) = mqtt_listen {
                config.mqtt_listen = listen;
            }
            if let Some(addr) = http_addr {
                config.http_addr = addr;
            }
            config.validate()?;
            let key = load_key(&config)?;
            let shutdown = edgeloop_agent::shutdown_on_ctrl_c();
            let controller = Controller::start(config, key, shutdown.clone()).await?;
            eprintln!(
                "edgeloop controller: API and dashboard on {}, MQTT on {}",
                controller.http_url(),
                controller.mqtt_url
            );
            shutdown.cancelled().await;
            controller.stop().await;
        }
        Command::Model {
            command:
                ModelCommand::Publish {
                    model,
                    name,
                    version,
                    reference,
                    label_column,
                    categorical,
                    labels,
                    regression,
                    offset,
                    scale,
                    channel_axis,
                    channels_last,
                    label,
                    latency_budget_ms,
                    min_agent_version,
                    targets,
                    boards,
                    drift_policy,
                    parent_version,
                    training_data,
                    gate,
                    config,
                },
        } => {
            init_tracing("warn");
            let drift = match &drift_policy {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let policy: edgeloop_shared::drift::DriftPolicy = toml::from_str(&text)
                        .with_context(|| format!("drift policy {}", path.display()))?;
                    policy
                        .validate()
                        .with_context(|| format!("drift policy {}", path.display()))?;
                    Some(policy)
                }
                None => None,
            };
            let training_data_sha256 = match &training_data {
                Some(path) => Some(edgeloop_shared::sha256_hex(
                    &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
                )),
                None => None,
            };
            let lineage = (parent_version.is_some() || training_data_sha256.is_some()).then(|| {
                edgeloop_shared::bundle::Lineage {
                    parent_version,
                    training_data_sha256,
                    ..Default::default()
                }
            });
            let config = config.load()?;
            config.validate()?;
            let key = load_key(&config)?;
            let onnx =
                std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
            std::fs::create_dir_all(&config.data_dir)?;
            let store = open_store(&config).await?;
            let artifacts = ArtifactStore::new(config.data_dir.join("artifacts"));
            let row = registry::publish(
                store.as_ref(),
                &artifacts,
                &key,
                PublishRequest {
                    name: &name,
                    version,
                    label,
                    onnx: &onnx,
                    reference_csv: &reference,
                    label_column: label_column.as_deref(),
                    categorical,
                    regression,
                    class_labels: labels,
                    preprocess: (!offset.is_empty() || !scale.is_empty())
                        .then_some(edgeloop_shared::bundle::Preprocess { offset, scale }),
                    layout: channels_last
                        .then_some(edgeloop_shared::bundle::RowLayout::ChannelsLast),
                    channel_axis,
                    created_ms: now_ms(),
                    requirements: edgeloop_shared::bundle::Requirements {
                        latency_budget_ms,
                        min_agent_version,
                        targets,
                        boards,
                    },
                    drift,
                    lineage,
                    gate: gate.gate()?,
                },
            )
            .await?;
            println!(
                "published {} v{}: {} bytes, sha256 {}, features {}, signed by {}",
                row.name,
                row.version,
                row.bundle_size,
                row.bundle_sha256,
                row.features.join(","),
                row.signed_by
            );
            if let Some(verdict) = row.lineage.as_ref().and_then(|l| l.gates.get("quality")) {
                println!("quality gate {verdict}");
            }
        }
        Command::Model {
            command: ModelCommand::List { output, config },
        } => {
            let config = config.load()?;
            let store = open_store(&config).await?;
            let models = store.models().await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string(&models)?);
            } else {
                for m in models {
                    let lineage = m.lineage.unwrap_or_default();
                    println!(
                        "{} v{}{}  {} bytes  signed by {}{}{}",
                        m.name,
                        m.version,
                        m.label.map(|l| format!(" ({l})")).unwrap_or_default(),
                        m.bundle_size,
                        m.signed_by,
                        lineage
                            .parent_version
                            .map(|p| format!("  parent v{p}"))
                            .unwrap_or_default(),
                        lineage
                            .gates
                            .get("quality")
                            .map(|g| format!("  gate {g}"))
                            .unwrap_or_default(),
                    );
                }
            }
        }
        Command::Model {
            command:
                ModelCommand::Compare {
                    name,
                    baseline,
                    candidate,
                    gate,
                    output,
                    config,
                },
        } => {
            init_tracing("warn");
            let Some(holdout) = &gate.holdout else {
                bail!("compare needs --holdout");
            };
            let config = config.load()?;
            let key = load_key(&config)?;
            let store = open_store(&config).await?;
            let artifacts = ArtifactStore::new(config.data_dir.join("artifacts"));
            let open = |version| {
                registry::open_published(store.as_ref(), &artifacts, &key, &name, version)
            };
            let current = open(baseline).await?;
            let (_, judged) = open(candidate).await?;
            let features: Vec<String> = judged
                .manifest
                .reference
                .feature_names()
                .map(str::to_string)
                .collect();
            let report = registry::run_gate(
                &registry::QualityGate {
                    holdout,
                    policy: gate.policy()?,
                    against: Some(baseline),
                },
                &judged.model,
                judged.manifest.row_preprocess().as_ref(),
                &features,
                judged.manifest.inputs.first().filter(|i| i.is_tensor()),
                judged.manifest.is_regression(),
                Some(&current),
            )?;
            if output == Output::Json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "{name} v{candidate} against v{baseline}: {}",
                    report.summary()
                );
                for (segment, score) in &report.candidate.segments {
                    let before = report
                        .current
                        .as_ref()
                        .and_then(|c| c.segments.get(segment))
                        .map(|s| format!("{:.4}", s.value))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "  {segment:<24} {:.4}  (v{baseline}: {before})  {} rows",
                        score.value, score.rows
                    );
                }
            }
            if !report.passed {
                bail!("v{candidate} would not pass the quality gate against v{baseline}");
            }
        }
        Command::Device {
            command: DeviceCommand::Add { ids, config },
        } => {
            let config = config.load()?;
            config.validate()?;
            if let Some(bad) = ids
                .iter()
                .find(|id| !edgeloop_shared::is_valid_identifier(id))
            {
                bail!("`{bad}` is not a valid device id: use 1-64 characters of [A-Za-z0-9_.-]");
            }
            std::fs::create_dir_all(&config.data_dir)?;
            let store = open_store(&config).await?;
            let added = store.register_devices(&ids).await?;
            println!(
                "{added} device(s) added, {} already registered",
                ids.len() as u64 - added
            );
        }
        Command::Device {
            command: DeviceCommand::Enrollments { api },
        } => {
            list(&api, "/api/v1/enrollments", |r| {
                format!(
                    "{:<24} {:<9} group {} tags {} board {} token {}",
                    r["device_id"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or(""),
                    r["group"].as_str().unwrap_or(""),
                    r["tags"],
                    r["board"].as_str().unwrap_or("-"),
                    r["token_id"].as_str().unwrap_or("")
                )
            })
            .await?;
        }
        Command::Device {
            command: DeviceCommand::Approve { id, api },
        } => {
            let row = post_json(
                &api.url(&format!("/api/v1/enrollments/{id}/approve")),
                &serde_json::json!({}),
            )
            .await?;
            if api.output == Output::Json {
                println!("{row}");
            } else {
                println!("{id} approved");
            }
        }
        Command::Device {
            command:
                DeviceCommand::Preauthorize {
                    key,
                    group,
                    tags,
                    ttl_s,
                    review,
                    api,
                },
        } => {
            let body = serde_json::json!({
                "public_key": public_key_arg(&key)?, "group": group, "tags": tags,
                "ttl_s": ttl_s, "auto_approve": !review,
            });
            let row = post_json(&api.url("/api/v1/preauthorized-keys"), &body).await?;
            if api.output == Output::Json {
                println!("{row}");
            } else {
                let row: serde_json::Value = serde_json::from_str(&row)?;
                println!(
                    "{} pre-authorized for group {} (expires at {} ms)",
                    row["id"].as_str().unwrap_or(""),
                    row["group"].as_str().unwrap_or(""),
                    row["expires_ms"]
                );
            }
        }
        Command::Device {
            command: DeviceCommand::Provision { request, api },
        } => {
            let written =
                edgeloop_controller::provision::write(&api.controller, request, &api_client()?)
                    .await?;
            if api.output == Output::Json {
                println!("{}", serde_json::to_string(&written)?);
            } else {
                println!(
                    "provisioning bundle for {} in {} (token {} for group {})",
                    written.device_id,
                    written.dir.display(),
                    written.token_id,
                    written.group,
                );
                for f in &written.files {
                    println!("  {f}");
                }
            }
        }
        Command::Token { command } => match command {
            TokenCommand::Create {
                group,
                tags,
                ttl_s,
                uses,
                unlimited,
                review,
                api,
            } => {
                let body = serde_json::json!({
                    "group": group, "tags": tags, "ttl_s": ttl_s,
                    "uses": (!unlimited).then_some(uses), "auto_approve": !review,
                });
                let created: serde_json::Value = serde_json::from_str(
                    &post_json(&api.url("/api/v1/enrollment-tokens"), &body).await?,
                )?;
                if api.output == Output::Json {
                    println!("{created}");
                } else {
                    println!(
                        "token {} for group {}: {}\n(shown once; put it in the device's enrollment_token)",
                        created["id"].as_str().unwrap_or(""),
                        created["group"].as_str().unwrap_or(""),
                        created["token"].as_str().unwrap_or("")
                    );
                }
            }
            TokenCommand::List { api } => {
                list(&api, "/api/v1/enrollment-tokens", |t| {
                    format!(
                        "{} group {} tags {} expires {} uses left {} {}",
                        t["id"].as_str().unwrap_or(""),
                        t["group"].as_str().unwrap_or(""),
                        t["tags"],
                        t["expires_ms"],
                        t["uses_left"],
                        if t["auto_approve"] == true {
                            "auto-approved"
                        } else {
                            "reviewed"
                        }
                    )
                })
                .await?;
            }
        },
        Command::Trust {
            command:
                TrustCommand::Sign {
                    root_key,
                    version,
                    root_keys,
                    signing_keys,
                    revoke,
                    out,
                },
        } => {
            use edgeloop_shared::signing::KeyId;
            use edgeloop_shared::trust::{SignedTrust, TrustDocument};
            let root = keys::load(&root_key)?;
            let document = TrustDocument {
                version,
                issued_ms: edgeloop_agent::now_ms(),
                root_keys: root_keys
                    .iter()
                    .map(|k| public_key_arg(k))
                    .collect::<anyhow::Result<_>>()?,
                signing_keys: signing_keys
                    .iter()
                    .map(|k| public_key_arg(k))
                    .collect::<anyhow::Result<_>>()?,
                revoked: revoke
                    .iter()
                    .map(|id| KeyId::parse(id).with_context(|| format!("--revoke {id}")))
                    .collect::<anyhow::Result<_>>()?,
            };
            document
                .check()
                .context("no device would apply this document")?;
            let json = serde_json::to_string_pretty(&SignedTrust::sign(&document, &root))?;
            match out {
                Some(path) => std::fs::write(&path, format!("{json}\n"))
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => println!("{json}"),
            }
        }
        Command::Trust {
            command:
                TrustCommand::Publish {
                    document,
                    controller,
                },
        } => {
            let text = std::fs::read_to_string(&document)
                .with_context(|| format!("cannot read {}", document.display()))?;
            let body: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", document.display()))?;
            let url = format!("{}/api/v1/trust", controller.trim_end_matches('/'));
            println!("{}", post_json(&url, &body).await?);
        }
        Command::Rollout { command } => rollout_command(command).await?,
        Command::Policies { api } => {
            list(&api, "/api/v1/retraining-policies", |p| {
                format!(
                        "{}: PSI >= {} in {} consecutive windows on >= {} devices and >= {} of them; cooldown {} s{}; trainer {}; waves {}",
                        p["model"].as_str().unwrap_or(""),
                        p["psi_threshold"],
                        p["consecutive_windows"],
                        p["min_devices"],
                        p["min_share"],
                        p["cooldown_s"],
                        p["schedule_s"]
                            .as_u64()
                            .map(|s| format!("; every {s} s"))
                            .unwrap_or_default(),
                        p["trainer"]["kind"].as_str().unwrap_or(""),
                        p["rollout"]["waves"],
                )
            })
            .await?;
        }
        Command::Dataset { command } => dataset_command(command).await?,
        Command::Retrainings { limit, api } => {
            list(&api, &format!("/api/v1/retrainings?limit={limit}"), |r| {
                format!(
                    "retraining {} {} v{}: {}{}{}\n  fired: {}\n  {}",
                    r["id"],
                    r["model_name"].as_str().unwrap_or(""),
                    r["from_version"],
                    r["status"].as_str().unwrap_or(""),
                    r["candidate_version"]
                        .as_u64()
                        .map(|v| format!(", candidate v{v}"))
                        .unwrap_or_default(),
                    r["rollout_id"]
                        .as_u64()
                        .map(|v| format!(", rollout {v}"))
                        .unwrap_or_default(),
                    r["reason"].as_str().unwrap_or(""),
                    r["detail"].as_str().unwrap_or(""),
                )
            })
            .await?;
        }
        Command::Audit { limit, api } => {
            list(&api, &format!("/api/v1/audit?limit={limit}"), |e| {
                format!(
                    "{}  {:<12} {:<18} {:<12} {}",
                    e["at_ms"],
                    e["actor"].as_str().unwrap_or(""),
                    e["action"].as_str().unwrap_or(""),
                    e["target"].as_str().unwrap_or(""),
                    e["detail"].as_str().unwrap_or("")
                )
            })
            .await?;
        }
        Command::Demo {
            devices,
            duration,
            http_addr,
            output,
            data_dir,
        } => {
            init_tracing("warn,rumqttd=off");
            let duration = duration.map(Duration::from_secs);
            if let Some(d) = duration
                && d < demo::MIN_DURATION
            {
                bail!(
                    "--duration must be at least {} seconds",
                    demo::MIN_DURATION.as_secs()
                );
            }
            if devices == 0 {
                bail!("--devices must be at least 1");
            }
            let shutdown = edgeloop_agent::shutdown_on_ctrl_c();
            let mut stdout = std::io::stdout();
            let report = demo::run(
                DemoOptions {
                    devices,
                    duration,
                    http_addr,
                    data_dir,
                },
                shutdown,
                &mut stdout,
            )
            .await?;
            let converged = report.converged(2, devices);
            if output == Output::Json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "demo finished: {} of {devices} devices online on {} v2",
                    report
                        .devices
                        .iter()
                        .filter(|d| d.online && d.model_version == Some(2))
                        .count(),
                    demo::MODEL_NAME
                );
            }
            if duration.is_some() && !converged {
                bail!("not every device ended online on v2 with a drift figure");
            }
        }
    }
    Ok(())
}
