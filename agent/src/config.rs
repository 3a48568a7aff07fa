//! Agent configuration: built-in defaults, then a TOML file, then environment variables,
//! then command-line flags; validated right after loading.

use std::path::{Path, PathBuf};

use edgeloop_shared::signing::{KeyError, TrustedKeys};
use edgeloop_shared::topics::Topics;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The default configuration, commented; `edgeloop-agent print-default-config` prints it.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");
pub const CONFIG_VERSION: u32 = 1;
pub const ENV_PREFIX: &str = "EDGELOOP_AGENT_";

/// Why layered configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error(transparent)]
    Figment(#[from] Box<figment::Error>),
}

/// Reads `T` from layers: `defaults`, then the TOML `file` if given (it must exist), then
/// the environment variables `env` selects. Later layers override single keys of earlier
/// ones; unknown keys are refused when `T` denies them.
pub fn load_layered<T: Serialize + DeserializeOwned>(
    defaults: &T,
    file: Option<&Path>,
    env: Env,
) -> Result<T, LoadError> {
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        if !path.exists() {
            return Err(LoadError::Missing(path.to_path_buf()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment
        .merge(env)
        .extract()
        .map_err(|e| LoadError::Figment(Box::new(e)))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load agent configuration: {0}")]
    Load(#[from] LoadError),
    #[error("config_version {found} is not supported (expected {CONFIG_VERSION})")]
    Version { found: u32 },
    #[error("invalid `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("invalid trusted key: {0}")]
    TrustedKey(#[from] KeyError),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub config_version: u32,
    pub device_id: String,
    pub broker_url: String,
    /// The broker login; empty: the one issued at enrollment, if any, else none.
    pub broker_username: String,
    pub broker_password: String,
    pub topic_root: String,
    pub controller_url: String,
    pub trusted_keys: Vec<String>,
    /// Keys that may sign trust documents (rotating and revoking `trusted_keys`).
    #[serde(default)]
    pub root_keys: Vec<String>,
    pub state_dir: PathBuf,
    pub heartbeat_interval_s: u64,
    pub drift_window_samples: u64,
    /// A drift window also closes after this many seconds (0: by count only).
    pub drift_window_s: u64,
    /// Bytes kept for the sample of inputs (`reservoir`); 0 keeps none.
    pub reservoir_bytes: u64,
    /// Threads tract may split one inference's matrix multiplications across (1: each
    /// inference runs on the thread that asked for it).
    #[serde(default = "one_thread")]
    pub inference_threads: u16,
    pub max_bundle_bytes: u64,
    /// How bundles are fetched: over HTTP from `controller_url`, in pieces over MQTT, or
    /// HTTP first and MQTT when the controller cannot be reached.
    pub bundle_transfer: BundleTransfer,
    pub max_inflight: u16,
    pub outbox: OutboxConfig,
    pub batching: BatchingConfig,
    /// For an `mqtts://` broker.
    pub tls: crate::link::TlsFiles,
    pub source: SourceConfig,
    pub api: ApiConfig,
    pub health: HealthConfig,
    /// Enrollment (see `enroll`): a token from the controller; empty: no enrollment.
    pub enrollment_token: String,
    /// Enroll without a token, with the device key an operator pre-authorized
    /// (`edgeloop device preauthorize`), proving it by signing the request.
    pub enroll_with_key: bool,
    /// The board this device is (`rpi4`, `jetson-orin-nano`…), reported at enrollment.
    pub board: String,
    /// Seconds between enrollment attempts while waiting for approval or the controller.
    pub enrollment_retry_s: u64,
}

/// The health window: how a newly activated model is watched, and when the device goes
/// back to the previous one by itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds a new model is watched before it is committed (0: committed at once).
    pub window_s: u64,
    /// Share of failed inferences over which the model is rolled back.
    pub max_error_rate: f64,
    /// Inferences needed before the error rate is judged.
    pub min_inferences: u64,
    /// A drift window whose largest PSI exceeds this rolls the model back (0: off).
    pub max_psi: f64,
    /// Restarts of the agent during the window beyond which the model is rolled back.
    pub max_restarts: u32,
    /// The new model's p99 inference latency may be at most this many times the previous
    /// model's, once both have `min_inferences` timed (0: off).
    pub max_latency_ratio: f64,
    /// The new model's accuracy on ground-truth labels may fall at most this far below
    /// the previous model's, once both have `min_labels` (0: off).
    pub max_accuracy_drop: f64,
    /// A regression's mean absolute error on true values may rise at most this share
    /// above the previous model's, once both have `min_labels` (0: off).
    pub max_error_rise: f64,
    pub min_labels: u64,
}

impl HealthConfig {
    /// The limits the new model's latency and accuracy are judged by.
    pub fn service_limits(&self) -> crate::health::ServiceLimits {
        crate::health::ServiceLimits {
            max_latency_ratio: self.max_latency_ratio,
            min_inferences: self.min_inferences,
            max_accuracy_drop: self.max_accuracy_drop,
            max_error_rise: self.max_error_rise,
            min_labels: self.min_labels,
        }
    }
}

/// The local inference API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port` to listen on; empty turns the API off.
    pub listen: String,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most rows in one request.
    pub max_rows: usize,
    /// Requests inferring at once; 0 is one per CPU core.
    pub max_concurrency: usize,
    /// Requests remembered so that feedback can label their predictions.
    pub feedback_memory: usize,
}

impl ApiConfig {
    /// The address to listen on, or `None` when the API is off.
    pub fn addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen
            .parse()
            .map(Some)
            .map_err(|e| format!("`{}` is not host:port ({e})", self.listen))
    }

    pub fn limits(&self) -> crate::api::ApiLimits {
        crate::api::ApiLimits {
            max_body_bytes: self.max_body_bytes,
            max_rows: self.max_rows,
            max_concurrency: match self.max_concurrency {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
            feedback_memory: self.feedback_memory,
        }
    }
}

/// The store-and-forward queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Most payload bytes the outbox holds; beyond it the lowest-priority, oldest entries
    /// are dropped (and counted).
    pub budget_bytes: u64,
    /// Seconds to wait for the controller's receipt before sending a message again.
    pub receipt_timeout_s: u64,
}

/// How queued messages are packed into MQTT publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most messages in one publish (1 sends each message alone).
    pub max_messages: usize,
    /// Largest MQTT payload sent, in bytes; batches are split to stay under it.
    pub max_payload_bytes: usize,
    /// "zstd" or "none".
    pub compression: Compression,
    /// How each message is spelled: "msgpack" (MessagePack: a third fewer bytes, and a
    /// third of the controller's work to read) or "json" (readable with any MQTT client).
    pub format: edgeloop_shared::protocol::Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Zstd,
}

/// Where inputs come from. One flat table (rather than one per kind) so that layered
/// configuration can switch the kind without leaving the other kind's keys behind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(rename = "type")]
    pub kind: SourceKind,
    /// Inputs per second.
    pub rate_hz: f64,
    /// synthetic: random seed.
    pub seed: u64,
    /// csv: the file to replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// npy: the names of the array's columns, in order (an NPY file has none); none for
    /// an array of tensors `(rows, d1, d2, …)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// csv, npy: start again at the end of the file.
    #[serde(rename = "loop")]
    pub repeat: bool,
    /// synthetic, sensor on the simulated bus: the simulated machine's ground truth comes
    /// back as feedback.
    pub labels: bool,
    /// csv, npy: the column holding each row's ground truth (a class index for a
    /// classifier, the true value for a regression), counted as feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_column: Option<String>,
    /// sensor: the I2C bus, its devices and the window the features are computed over.
    pub sensor: SensorConfig,
}

/// The vibration and temperature sensors of a `sensor` source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    /// `"sim"` for the simulated bus, or a Linux I2C adapter such as `"/dev/i2c-1"`.
    pub bus: String,
    /// The ADXL345 accelerometer's 7-bit address.
    pub accelerometer_address: u8,
    /// The TMP102 thermometer's 7-bit address.
    pub thermometer_address: u8,
    /// The accelerometer axis along which the machine vibrates.
    pub axis: SensorAxis,
    /// Samples per window; each window becomes one input row.
    pub window: u32,
    /// The accelerometer's output data rate, in Hz (rounded up to one it offers).
    pub sample_rate_hz: u32,
    /// The accelerometer's range, in g: 2, 4, 8 or 16.
    pub range_g: u8,
    /// sim: the share of windows during which the simulated machine is faulty.
    pub fault_rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorAxis {
    X,
    Y,
    Z,
}

impl SensorConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_string(),
        };
        if self.bus.is_empty() {
            return Err(invalid(
                "source.sensor.bus",
                "name the simulated bus (\"sim\") or an I2C adapter (\"/dev/i2c-1\")",
            ));
        }
        for (key, address) in [
            (
                "source.sensor.accelerometer_address",
                self.accelerometer_address,
            ),
            (
                "source.sensor.thermometer_address",
                self.thermometer_address,
            ),
        ] {
            // 0x00–0x07 and 0x78–0x7F are reserved by the I2C specification.
            if !(0x08..=0x77).contains(&address) {
                return Err(invalid(key, "must be a 7-bit address in 0x08..=0x77"));
            }
        }
        if self.accelerometer_address == self.thermometer_address {
            return Err(invalid(
                "source.sensor.thermometer_address",
                "must differ from the accelerometer's",
            ));
        }
        if !(8..=65_536).contains(&self.window) {
            return Err(invalid(
                "source.sensor.window",
                "must be in 8..=65536 samples",
            ));
        }
        if !(1..=3200).contains(&self.sample_rate_hz) {
            return Err(invalid(
                "source.sensor.sample_rate_hz",
                "must be in 1..=3200 (the ADXL345's fastest rate)",
            ));
        }
        if ![2, 4, 8, 16].contains(&self.range_g) {
            return Err(invalid("source.sensor.range_g", "must be 2, 4, 8 or 16"));
        }
        if !(0.0..=1.0).contains(&self.fault_rate) {
            return Err(invalid("source.sensor.fault_rate", "must be in [0, 1]"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleTransfer {
    /// HTTP, and MQTT when the HTTP endpoint cannot be reached.
    Auto,
    Http,
    /// Pieces over MQTT only, for devices that reach nothing but the broker.
    Mqtt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A simulated vibration sensor.
    Synthetic,
    /// Rows of a CSV file with a header line.
    Csv,
    /// Rows of a NumPy `.npy` array, its columns named by `columns`.
    Npy,
    /// Windows of an I2C accelerometer and thermometer (real or simulated), as features.
    Sensor,
    /// None: inputs come only from the local inference API.
    Api,
}

impl Default for AgentConfig {
    fn default() -> Self {
        toml::from_str(DEFAULT_CONFIG_TOML).expect("the built-in default config parses")
    }
}

impl AgentConfig {
    /// Defaults, then `file` (if given), then `EDGELOOP_AGENT_*` variables; validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let config: AgentConfig = load_layered(
            &AgentConfig::default(),
            file,
            Env::prefixed(ENV_PREFIX).split("__"),
        )?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.config_version != CONFIG_VERSION {
            return Err(ConfigError::Version {
                found: self.config_version,
            });
        }
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_string(),
        };
        if !edgeloop_shared::is_valid_identifier(&self.device_id) {
            return Err(invalid(
                "device_id",
                "use 1-64 characters of [A-Za-z0-9_.-]",
            ));
        }
        let broker = crate::link::BrokerAddr::parse(&self.broker_url)
            .map_err(|e| invalid("broker_url", &e.to_string()))?;
        if broker.tls {
            self.tls
                .client_config()
                .map_err(|e| invalid("tls", &e.to_string()))?;
        }
        Topics::new(&self.topic_root).map_err(|e| invalid("topic_root", &e.to_string()))?;
        if !(1..=256).contains(&self.inference_threads) {
            return Err(invalid("inference_threads", "use 1 to 256"));
        }
        if !(self.controller_url.starts_with("http://")
            || self.controller_url.starts_with("https://"))
        {
            return Err(invalid(
                "controller_url",
                "must start with http:// or https://",
            ));
        }
        self.trusted_keys()?;
        TrustedKeys::parse_all(self.root_keys.iter().map(String::as_str))?;
        if self.heartbeat_interval_s == 0 {
            return Err(invalid("heartbeat_interval_s", "must be at least 1"));
        }
        if self.enrollment_token.len() > 256
            || self.enrollment_token.chars().any(|c| c.is_whitespace())
        {
            return Err(invalid(
                "enrollment_token",
                "must be the token as printed, without spaces",
            ));
        }
        if !(self.board.is_empty() || edgeloop_shared::is_valid_identifier(&self.board)) {
            return Err(invalid("board", "use 1-64 characters of [A-Za-z0-9_.-]"));
        }
        if !self.broker_password.is_empty() && self.broker_username.is_empty() {
            return Err(invalid(
                "broker_password",
                "needs broker_username (empty: the login issued at enrollment)",
            ));
        }
        if self.enrollment_retry_s == 0 {
            return Err(invalid("enrollment_retry_s", "must be at least 1"));
        }
        self.api.addr().map_err(|e| invalid("api.listen", &e))?;
        if self.api.max_body_bytes < 64 {
            return Err(invalid("api.max_body_bytes", "must be at least 64"));
        }
        if self.api.max_rows == 0 {
            return Err(invalid("api.max_rows", "must be at least 1"));
        }
        if self.drift_window_samples == 0 {
            return Err(invalid("drift_window_samples", "must be at least 1"));
        }
        if self.max_inflight == 0 {
            return Err(invalid("max_inflight", "must be at least 1"));
        }
        if self.outbox.budget_bytes < 4096 {
            return Err(invalid("outbox.budget_bytes", "must be at least 4096"));
        }
        if self.outbox.receipt_timeout_s == 0 {
            return Err(invalid("outbox.receipt_timeout_s", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.health.max_error_rate) {
            return Err(invalid("health.max_error_rate", "must be in [0, 1]"));
        }
        if !(self.health.max_psi.is_finite() && self.health.max_psi >= 0.0) {
            return Err(invalid("health.max_psi", "must be a number ≥ 0 (0: off)"));
        }
        if !(self.health.max_latency_ratio.is_finite()
            && (self.health.max_latency_ratio == 0.0
                || self.health.max_latency_ratio >= crate::health::MIN_LATENCY_RATIO))
        {
            return Err(invalid(
                "health.max_latency_ratio",
                "must be 0 (off) or at least 2.5 (latencies are compared by histogram \
                 bucket, up to 2.5x apart)",
            ));
        }
        if !(0.0..=1.0).contains(&self.health.max_accuracy_drop) {
            return Err(invalid("health.max_accuracy_drop", "must be 0 (off) to 1"));
        }
        if !(self.health.max_error_rise.is_finite() && self.health.max_error_rise >= 0.0) {
            return Err(invalid(
                "health.max_error_rise",
                "must be 0 (off) or a share above 0 (0.2: 20 % more)",
            ));
        }
        if !(1..=edgeloop_shared::batch::MAX_BATCH_MESSAGES).contains(&self.batching.max_messages) {
            return Err(invalid(
                "batching.max_messages",
                &format!(
                    "must be in 1..={}",
                    edgeloop_shared::batch::MAX_BATCH_MESSAGES
                ),
            ));
        }
        let max_payload = edgeloop_shared::protocol::MAX_MESSAGE_BYTES;
        if !(1024..=max_payload).contains(&self.batching.max_payload_bytes) {
            return Err(invalid(
                "batching.max_payload_bytes",
                &format!("must be in 1024..={max_payload}"),
            ));
        }
        if matches!(self.source.kind, SourceKind::Csv | SourceKind::Npy)
            && self.source.path.is_none()
        {
            return Err(invalid("source.path", "a csv or npy source needs a path"));
        }
        if self.source.label_column.is_some()
            && !matches!(self.source.kind, SourceKind::Csv | SourceKind::Npy)
        {
            return Err(invalid(
                "source.label_column",
                "only a csv or npy source has columns to read labels from",
            ));
        }
        if self.source.kind == SourceKind::Sensor {
            self.source.sensor.validate()?;
        }
        let rate = self.source.rate_hz;
        if !(rate.is_finite() && rate > 0.0 && rate <= 100_000.0) {
            return Err(invalid("source.rate_hz", "must be in (0, 100000]"));
        }
        Ok(())
    }

    pub fn trusted_keys(&self) -> Result<TrustedKeys, KeyError> {
        TrustedKeys::parse_all(self.trusted_keys.iter().map(String::as_str))
    }

    pub fn topics(&self) -> Topics {
        Topics::new(&self.topic_root).expect("validated")
    }
}

fn one_thread() -> u16 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_valid() {
        AgentConfig::default().validate().unwrap();
    }

    #[test]
    fn a_file_overrides_defaults_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "device_id = \"pump-7\"\n[source]\ntype = \"csv\"\nrate_hz = 2.0\npath = \"x.csv\"\n",
        )
        .unwrap();
        let c = AgentConfig::load(Some(&path)).unwrap();
        assert_eq!(c.device_id, "pump-7");
        assert_eq!(c.heartbeat_interval_s, 10);
        assert_eq!(c.source.kind, SourceKind::Csv);
        assert!(c.source.repeat);

        std::fs::write(&path, "[source]\ntype = \"csv\"\n").unwrap();
        let err = AgentConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("source.path"), "{err}");

        std::fs::write(&path, "device_id = \"a/b\"\n").unwrap();
        let err = AgentConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("device_id"), "{err}");

        // Without columns, an npy source replays an array of tensors (checked when the
        // file is read: a table's columns must be named).
        std::fs::write(&path, "[source]\ntype = \"npy\"\npath = \"x.npy\"\n").unwrap();
        AgentConfig::load(Some(&path)).unwrap();

        std::fs::write(
            &path,
            "[source]\ntype = \"synthetic\"\nlabel_column = \"y\"\n",
        )
        .unwrap();
        let err = AgentConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("source.label_column"), "{err}");
        std::fs::write(
            &path,
            "[source]\ntype = \"csv\"\npath = \"r.csv\"\nlabel_column = \"y\"\n",
        )
        .unwrap();
        let c = AgentConfig::load(Some(&path)).unwrap();
        assert_eq!(c.source.label_column.as_deref(), Some("y"));

        std::fs::write(&path, "inference_threads = 0\n").unwrap();
        let err = AgentConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("inference_threads"), "{err}");
        std::fs::write(&path, "inference_threads = 2\n").unwrap();
        assert_eq!(AgentConfig::load(Some(&path)).unwrap().inference_threads, 2);

        std::fs::write(&path, "device_idd = \"x\"\n").unwrap();
        let err = AgentConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("device_idd"), "{err}");

        std::fs::write(&path, "trusted_keys = [\"ed25519:nope\"]\n").unwrap();
        assert!(matches!(
            AgentConfig::load(Some(&path)),
            Err(ConfigError::TrustedKey(_))
        ));
        assert!(AgentConfig::load(Some(&dir.path().join("missing.toml"))).is_err());
    }

    #[test]
    fn the_health_windows_latency_and_accuracy_limits_are_checked() {
        let with = |change: fn(&mut HealthConfig)| {
            let mut config = AgentConfig::default();
            change(&mut config.health);
            config.validate().map_err(|e| e.to_string())
        };
        assert!(with(|h| h.max_latency_ratio = 3.0).is_ok());
        assert!(with(|h| h.max_accuracy_drop = 0.05).is_ok());
        let err = with(|h| h.max_latency_ratio = 1.5).unwrap_err();
        assert!(err.contains("health.max_latency_ratio"), "{err}");
        assert!(with(|h| h.max_latency_ratio = f64::NAN).is_err());
        let err = with(|h| h.max_accuracy_drop = 1.5).unwrap_err();
        assert!(err.contains("health.max_accuracy_drop"), "{err}");
        assert!(with(|h| h.max_accuracy_drop = -0.1).is_err());
        assert!(with(|h| h.max_error_rise = 0.2).is_ok());
        let err = with(|h| h.max_error_rise = -0.2).unwrap_err();
        assert!(err.contains("health.max_error_rise"), "{err}");
    }
}
