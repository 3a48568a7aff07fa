//! Harness for edgeloop's end-to-end tests: a real controller (store, broker, ingest,
//! dispatcher, HTTP API) and real agents, connected through the embedded broker and SQLite,
//! or through the external services the environment names: the broker of
//! `EDGELOOP_TEST_MQTT_URL` and, when `EDGELOOP_TEST_PG_URL` is set too, that PostgreSQL.
//!
//! Every test gets its own topic root, MQTT client ids, directories and database schema,
//! so tests can run in parallel against shared services.

pub mod fixtures;

use std::time::{Duration, Instant};

use edgeloop_agent::config::AgentConfig;
use edgeloop_agent::source::{ShiftControl, VibrationGenerator};
use edgeloop_agent::{Agent, now_ms};
use edgeloop_controller::config::ControllerConfig;
use edgeloop_controller::demo::{
    CLASS_LABELS, MODEL_NAME, MODEL_V1, MODEL_V2, REFERENCE_V1, REFERENCE_V2,
};
use edgeloop_controller::registry::PublishRequest;
use edgeloop_controller::server::Controller;
use edgeloop_controller::store::ModelRow;
use edgeloop_shared::command::{Command, CommandAction, DeployAction, SignedCommand};
use edgeloop_shared::protocol::{Envelope, Message, ModelRef};
use edgeloop_shared::signing::SecretKey;
use edgeloop_shared::topics::{Channel, Topics};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const MQTT_URL_VAR: &str = "EDGELOOP_TEST_MQTT_URL";
pub const PG_URL_VAR: &str = "EDGELOOP_TEST_PG_URL";

/// Which services a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerChoice {
    /// The controller's embedded rumqttd and SQLite.
    Embedded,
    /// The broker named by `EDGELOOP_TEST_MQTT_URL` (Mosquitto in CI) and, if
    /// `EDGELOOP_TEST_PG_URL` is set, PostgreSQL instead of SQLite.
    External,
}

impl BrokerChoice {
    /// The external broker's URL, or `None` when the variable is unset (the test is then
    /// skipped). When it is set, the broker must answer: an unreachable broker fails the
    /// test rather than skipping it.
    pub fn external_url() -> Option<String> {
        let url = std::env::var(MQTT_URL_VAR).ok().filter(|u| !u.is_empty())?;
        let addr = edgeloop_agent::link::BrokerAddr::parse(&url)
            .unwrap_or_else(|e| panic!("{MQTT_URL_VAR}: {e}"));
        std::net::TcpStream::connect((addr.host.as_str(), addr.port)).unwrap_or_else(|e| {
            panic!("{MQTT_URL_VAR}={url} is set but the broker is unreachable: {e}")
        });
        Some(url)
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A running controller with its own data directory and topic root.
pub struct TestController {
    pub controller: Controller,
    pub root: String,
    pub database: Database,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
}

impl TestController {
    /// Starts a controller, or returns `None` when the external broker was asked for and
    /// `EDGELOOP_TEST_MQTT_URL` is unset.
    pub async fn start(broker: BrokerChoice) -> Option<Self> {
        Self::start_with(broker, |_| {}).await
    }

    /// [`TestController::start`], with changes to the test configuration.
    pub async fn start_with(
        broker: BrokerChoice,
        configure: impl FnOnce(&mut ControllerConfig),
    ) -> Option<Self> {
        init_tracing();
        let (mqtt_url, root, database) = test_services(broker).await?;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ControllerConfig {
            data_dir: dir.path().join("controller"),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            mqtt_url,
            database_url: database.url(),
            mqtt_listen: "127.0.0.1:0".parse().unwrap(),
            mqtt_client_id: format!("{root}-controller"),
            topic_root: root.clone(),
            offline_after_s: 10,
            resend_after_s: 5,
            ..ControllerConfig::default()
        };
        configure(&mut config);
        let key = edgeloop_controller::keys::generate().expect("entropy");
        let shutdown = CancellationToken::new();
        let controller = Controller::start(config, key, shutdown.clone())
            .await
            .expect("controller starts");
        Some(TestController {
            controller,
            root,
            database,
            dir,
            http: reqwest::Client::new(),
            shutdown,
        })
    }

    /// An agent config pointing at this controller: fast heartbeats, small windows.
    pub fn agent_config(&self, device_id: &str, window: u64) -> AgentConfig {
        agent_config(
            device_id,
            window,
            &ControllerEndpoints {
                mqtt_url: self.controller.mqtt_url.clone(),
                http_url: self.controller.http_url(),
                trusted_key: self.controller.signing_key().public().to_text(),
                root: self.root.clone(),
            },
            &self.dir.path().join("agents").join(device_id),
        )
    }

    /// Starts an agent with a synthetic sensor.
    pub fn spawn_agent(&self, device_id: &str, window: u64) -> TestAgent {
        self.spawn_agent_with(self.agent_config(device_id, window))
    }

    /// Starts an agent with this configuration (and the synthetic source steered by
    /// [`TestAgent::shift`] when the configuration names it).
    pub fn spawn_agent_with(&self, config: AgentConfig) -> TestAgent {
        TestAgent::spawn(config, &self.shutdown)
    }

    pub async fn publish_example(&self, version: u64) -> ModelRow {
        self.publish_example_as(MODEL_NAME, version, Default::default())
            .await
    }

    /// Publishes the vibration example's `version` under `name`, with these requirements
    /// (target architectures and boards, latency budget…).
    pub async fn publish_example_as(
        &self,
        name: &str,
        version: u64,
        requirements: edgeloop_shared::bundle::Requirements,
    ) -> ModelRow {
        let (onnx, reference) = match version % 2 {
            1 => (MODEL_V1, REFERENCE_V1),
            _ => (MODEL_V2, REFERENCE_V2),
        };
        let csv = self
            .dir
            .path()
            .join(format!("reference-{name}-{version}.csv"));
        std::fs::write(&csv, reference).unwrap();
        self.controller
            .publish(PublishRequest {
                class_labels: CLASS_LABELS.iter().map(|s| s.to_string()).collect(),
                requirements,
                ..PublishRequest::new(name, version, onnx, &csv)
            })
            .await
            .expect("publish")
    }

    /// Publishes the vibration model `version` as an MLP of about 270 kB (4-256-256-2)
    /// whose last layer's seed is `head`: versions that differ in `head` alone are one
    /// model with its head retrained, so publishing makes a delta bundle between them.
    pub async fn publish_mlp(&self, version: u64, head: u64) -> ModelRow {
        let csv = self.dir.path().join(format!("mlp-reference-{version}.csv"));
        std::fs::write(&csv, REFERENCE_V1).unwrap();
        let onnx = edgeloop_controller::trainer::mlp(&[4, 256, 256, 2], &[1, 2, head]);
        self.controller
            .publish(PublishRequest {
                class_labels: CLASS_LABELS.iter().map(|s| s.to_string()).collect(),
                ..PublishRequest::new(MODEL_NAME, version, &onnx, &csv)
            })
            .await
            .expect("publish")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.controller.http_url())
    }

    /// A published bundle as the controller serves it to devices, verified against its
    /// signing key.
    pub async fn published_bundle(
        &self,
        name: &str,
        version: u64,
    ) -> edgeloop_shared::bundle::VerifiedBundle {
        let bytes = self
            .http
            .get(self.url(&format!("/artifacts/{name}/{version}")))
            .send()
            .await
            .expect("GET bundle")
            .bytes()
            .await
            .expect("bundle bytes");
        let trusted = edgeloop_shared::signing::TrustedKeys::new([self
            .controller
            .signing_key()
            .public()
            .clone()]);
        edgeloop_shared::bundle::verify(&bytes, &trusted, &Default::default())
            .expect("a bundle signed by the controller")
    }

    pub async fn get(&self, path: &str) -> Value {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("JSON")
    }

    /// `POST /api/v1/rollouts`; returns the status code and body.
    pub async fn post_rollout(&self, body: Value) -> (u16, Value) {
        self.post_as("api", "/api/v1/rollouts", body).await
    }

    /// `POST path` with a JSON body on behalf of `actor` (the audit log's name for who
    /// acted); returns the status code and body.
    pub async fn post_as(&self, actor: &str, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .header(edgeloop_controller::api::ACTOR_HEADER, actor)
            .json(&body)
            .send()
            .await
            .expect("POST");
        (
            response.status().as_u16(),
            response.json().await.expect("JSON"),
        )
    }

    /// Messages the controller held back because their device was not in the registry.
    pub async fn stats_unknown_device(&self) -> u64 {
        self.get("/api/v1/stats").await["unknown_device"]
            .as_u64()
            .expect("a count")
    }

    /// Asserts that one of the last 100 audit entries matches, showing them all if none does.
    pub async fn assert_audited(&self, what: &str, matches: impl Fn(&Value) -> bool) {
        let audit = self.get("/api/v1/audit?limit=100").await;
        assert!(
            audit.as_array().unwrap().iter().any(matches),
            "no audit entry {what}: {audit}"
        );
    }

    pub async fn device(&self, id: &str) -> Option<Value> {
        self.get("/api/v1/devices")
            .await
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
    }

    /// Waits until `id` is online and reports `version` (or no model for `None`).
    pub async fn wait_for_model(&self, id: &str, version: Option<u64>) {
        wait_until(
            &format!("{id} online on {version:?}"),
            Duration::from_secs(30),
            || async {
                self.device(id)
                    .await
                    .is_some_and(|d| d["online"] == true && d["model_version"].as_u64() == version)
            },
        )
        .await;
    }

    /// Stored drift summaries of a device, oldest first: (model version, window seq,
    /// samples, per-feature bin totals including NaN).
    pub async fn stored_windows(&self, device: &str) -> Vec<(u64, u64, u64, Vec<u64>)> {
        let mut rows = self
            .controller
            .store
            .telemetry(device, 1000)
            .await
            .expect("telemetry");
        rows.reverse();
        rows.iter()
            .map(|r| {
                let totals = r.summary["stats"]["features"]
                    .as_array()
                    .expect("features")
                    .iter()
                    .map(|f| {
                        f["counts"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|c| c.as_u64().unwrap())
                            .sum::<u64>()
                            + f["nan"].as_u64().unwrap()
                    })
                    .collect();
                (r.model_version, r.window_seq, r.samples, totals)
            })
            .collect()
    }

    /// Rewrites the bundle digest the registry holds for a model version, as an attacker
    /// with write access to the database could.
    pub async fn set_model_digest(&self, name: &str, version: u64, sha256: &str) {
        match &self.database {
            Database::Sqlite => {
                let path = self
                    .controller
                    .config
                    .data_dir
                    .join(edgeloop_controller::server::DATABASE_FILE);
                rusqlite::Connection::open(path)
                    .unwrap()
                    .execute(
                        "UPDATE models SET bundle_sha256 = ?1 WHERE name = ?2 AND version = ?3",
                        rusqlite::params![sha256, name, version as i64],
                    )
                    .unwrap();
            }
            Database::Postgres { url, .. } => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client
                    .execute(
                        "UPDATE models SET bundle_sha256 = $1 WHERE name = $2 AND version = $3",
                        &[&sha256, &name, &(version as i64)],
                    )
                    .await
                    .unwrap();
            }
        }
    }

    /// Waits until `device` has reported a deployment stage `stage` whose detail contains
    /// `detail`.
    pub async fn wait_for_report(&self, device: &str, stage: &str, detail: &str) {
        let path = format!("/api/v1/devices/{device}/deployments?limit=100");
        wait_until(
            &format!("{device} reports {stage}: …{detail}…"),
            Duration::from_secs(30),
            || async {
                self.get(&path).await.as_array().unwrap().iter().any(|e| {
                    e["stage"] == stage && e["detail"].as_str().is_some_and(|d| d.contains(detail))
                })
            },
        )
        .await;
    }

    /// A deploy command for `device` of vibration `version`, valid for a minute.
    pub fn deploy_command(
        device: &str,
        seq: u64,
        rollout_id: u64,
        version: u64,
        bundle_sha256: &str,
        bundle_size: u64,
    ) -> Command {
        Command {
            device_id: device.into(),
            seq,
            issued_ms: now_ms(),
            expires_ms: now_ms() + 60_000,
            action: CommandAction::Deploy(DeployAction {
                rollout_id,
                model: ModelRef {
                    name: MODEL_NAME.into(),
                    version,
                },
                bundle_url: format!("/artifacts/{MODEL_NAME}/{version}"),
                bundle_sha256: bundle_sha256.into(),
                bundle_size,
                delta: None,
            }),
        }
    }

    /// Signs `command` with `key` and publishes it on its device's command topic, as the
    /// controller would (or an attacker holding `key`). Keep the client it returns until the
    /// command has had its effect: dropping it ends its connection.
    pub async fn send_command(
        &self,
        command: &Command,
        key: &SecretKey,
        msg_id: &str,
    ) -> RawClient {
        let envelope = Envelope::new(
            command.device_id.clone(),
            msg_id,
            edgeloop_agent::now_ms(),
            Message::Command(SignedCommand::sign(command, key)),
        );
        let topic = Topics::new(&self.root)
            .unwrap()
            .device(&command.device_id, Channel::Commands)
            .unwrap();
        let client = self.raw_client(&format!("sender-{msg_id}")).await;
        client.publish(&topic, envelope.encode()).await;
        client
    }

    /// A raw MQTT client on the same broker, for injecting messages.
    pub async fn raw_client(&self, name: &str) -> RawClient {
        RawClient::connect(&self.controller.mqtt_url, &format!("{}-{name}", self.root)).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.controller.stop().await;
        self.database.drop_schema().await;
    }
}

/// The broker URL (empty: embedded), a fresh topic root and a fresh database for one test;
/// `None` when the external broker was asked for and is not configured.
pub async fn test_services(broker: BrokerChoice) -> Option<(String, String, Database)> {
    let mqtt_url = match broker {
        BrokerChoice::Embedded => String::new(),
        BrokerChoice::External => BrokerChoice::external_url()?,
    };
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let root = format!("edgeloop-test-{id}");
    let database = match broker {
        BrokerChoice::Embedded => Database::Sqlite,
        BrokerChoice::External => Database::postgres_schema(&format!("edgeloop_test_{id}")).await,
    };
    Some((mqtt_url, root, database))
}

/// Where agents find a controller.
#[derive(Debug, Clone)]
pub struct ControllerEndpoints {
    pub mqtt_url: String,
    pub http_url: String,
    /// The controller's public key, as devices trust it.
    pub trusted_key: String,
    pub root: String,
}

/// An agent config for tests: fast heartbeats, small windows, 100 inputs a second.
pub fn agent_config(
    device_id: &str,
    window: u64,
    controller: &ControllerEndpoints,
    state_dir: &std::path::Path,
) -> AgentConfig {
    let mut config = AgentConfig {
        device_id: device_id.to_string(),
        broker_url: controller.mqtt_url.clone(),
        topic_root: controller.root.clone(),
        controller_url: controller.http_url.clone(),
        trusted_keys: vec![controller.trusted_key.clone()],
        state_dir: state_dir.to_path_buf(),
        heartbeat_interval_s: 1,
        drift_window_samples: window,
        ..AgentConfig::default()
    };
    config.source.rate_hz = 100.0;
    // Many agents run at once: each test that wants the local API gives it a free port.
    config.api.listen.clear();
    config
}

/// The controller's database in a test.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite,
    /// A schema of its own in the PostgreSQL of `EDGELOOP_TEST_PG_URL`.
    Postgres {
        url: String,
        admin_url: String,
        schema: String,
    },
}

impl Database {
    /// A fresh schema in the PostgreSQL of `EDGELOOP_TEST_PG_URL`, or SQLite when it is
    /// unset. When it is set, PostgreSQL must answer.
    async fn postgres_schema(schema: &str) -> Self {
        let Some(admin_url) = std::env::var(PG_URL_VAR).ok().filter(|u| !u.is_empty()) else {
            return Database::Sqlite;
        };
        let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!("{PG_URL_VAR}={admin_url} is set but PostgreSQL is unreachable: {e}")
            });
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let sep = if admin_url.contains('?') { '&' } else { '?' };
        Database::Postgres {
            url: format!("{admin_url}{sep}options=-csearch_path%3D{schema}"),
            admin_url,
            schema: schema.to_string(),
        }
    }

    /// The controller's `database_url`.
    pub fn url(&self) -> String {
        match self {
            Database::Sqlite => String::new(),
            Database::Postgres { url, .. } => url.clone(),
        }
    }

    pub async fn drop_schema(&self) {
        if let Database::Postgres {
            admin_url, schema, ..
        } = self
            && let Ok((client, connection)) =
                tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            if let Err(e) = client
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
            {
                eprintln!("cannot drop test schema {schema}: {e}");
            }
        }
    }
}

/// An agent running in this process.
pub struct TestAgent {
    pub config: AgentConfig,
    pub shift: ShiftControl,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestAgent {
    pub fn spawn(config: AgentConfig, parent: &CancellationToken) -> Self {
        let shift = ShiftControl::default();
        // The synthetic source is built here so that the test can steer its shift.
        let source: Box<dyn edgeloop_agent::source::InputSource> =
            if config.source.kind == edgeloop_agent::config::SourceKind::Synthetic {
                Box::new(
                    VibrationGenerator::new(config.source.seed, shift.clone())
                        .with_labels(config.source.labels),
                )
            } else {
                edgeloop_agent::source::from_config(&config.source).expect("the source opens")
            };
        let agent = Agent::new(config.clone(), source).expect("valid agent config");
        let token = parent.child_token();
        let task = tokio::spawn({
            let token = token.clone();
            async move { agent.run(token).await.expect("agent runs") }
        });
        TestAgent {
            config,
            shift,
            token,
            task,
        }
    }

    pub async fn stop(self) {
        self.token.cancel();
        self.task.await.expect("agent task");
    }
}

/// Polls `check` every 100 ms until it holds; panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain MQTT client with its event loop polled in the background, for publishing what
/// no well-behaved device would.
pub struct RawClient {
    pub client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl RawClient {
    pub async fn connect(url: &str, client_id: &str) -> Self {
        let addr = edgeloop_agent::link::BrokerAddr::parse(url).unwrap();
        let mut options = rumqttc::MqttOptions::new(client_id, addr.host, addr.port);
        options.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("raw client connects")
            .unwrap();
        RawClient { client, task }
    }

    /// Publishes at QoS 1.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `scenario` against the embedded broker, or against the external one when asked for
/// and configured.
#[macro_export]
macro_rules! on_both_brokers {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded_broker() {
                super::$scenario($crate::BrokerChoice::Embedded).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn external_broker() {
                super::$scenario($crate::BrokerChoice::External).await;
            }
        }
    };
}

/// A binary of this workspace. `cargo test --workspace` builds every binary into the
/// directory above the test executables.
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` (`cargo test --workspace` does)",
        path.display()
    );
    path
}

/// A child process, killed when dropped.
pub struct Process {
    child: std::process::Child,
}

impl Process {
    pub fn spawn(command: &mut std::process::Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Process { child }
    }

    /// SIGKILL: no shutdown code runs, as in a power cut of the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `edgeloop-agent run` with `config` written to `path`.
pub fn spawn_agent_process(config: &AgentConfig, path: &std::path::Path) -> Process {
    std::fs::write(
        path,
        toml::to_string(config).expect("agent config serializes"),
    )
    .unwrap();
    Process::spawn(
        std::process::Command::new(binary("edgeloop-agent"))
            .args(["run", "--config"])
            .arg(path)
            .env("RUST_LOG", "warn"),
    )
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `edgeloop serve` as a real process, on fixed ports so that it can be killed and started
/// again where the devices expect it.
pub struct ControllerProcess {
    pub endpoints: ControllerEndpoints,
    pub database: Database,
    pub dir: tempfile::TempDir,
    config_path: std::path::PathBuf,
    process: Option<Process>,
}

impl ControllerProcess {
    /// Starts it, or returns `None` when the external broker was asked for and
    /// `EDGELOOP_TEST_MQTT_URL` is unset.
    pub async fn start(broker: BrokerChoice) -> Option<Self> {
        let mut controller = Self::prepare(broker).await?;
        controller.run().await;
        Some(controller)
    }

    /// Like [`ControllerProcess::start`], without starting the process: its key, ports and
    /// configuration are ready, so devices can be pointed at it first.
    pub async fn prepare(broker: BrokerChoice) -> Option<Self> {
        init_tracing();
        let (mqtt_url, root, database) = test_services(broker).await?;
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("controller");
        let key = edgeloop_controller::keys::keygen(&data_dir.join("keys")).expect("keygen");
        let mqtt_listen: std::net::SocketAddr =
            format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = ControllerConfig {
            data_dir,
            http_addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            mqtt_url: mqtt_url.clone(),
            database_url: database.url(),
            mqtt_listen,
            mqtt_client_id: format!("{root}-controller"),
            topic_root: root.clone(),
            offline_after_s: 10,
            resend_after_s: 5,
            ..ControllerConfig::default()
        };
        let config_path = dir.path().join("controller.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let endpoints = ControllerEndpoints {
            mqtt_url: if mqtt_url.is_empty() {
                format!("mqtt://{mqtt_listen}")
            } else {
                mqtt_url
            },
            http_url: format!("http://{}", config.http_addr),
            trusted_key: key.public().to_text(),
            root,
        };
        Some(ControllerProcess {
            endpoints,
            database,
            dir,
            config_path,
            process: None,
        })
    }

    /// Starts the process and waits until its API answers.
    pub async fn run(&mut self) {
        assert!(self.process.is_none(), "already running");
        let mut process = Process::spawn(
            std::process::Command::new(binary("edgeloop"))
                .args(["serve", "--config"])
                .arg(&self.config_path)
                .env("RUST_LOG", "warn,rumqttd=off"),
        );
        let url = format!("{}/api/v1/stats", self.endpoints.http_url);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            assert!(!process.exited(), "edgeloop serve exited while starting");
            assert!(Instant::now() < deadline, "edgeloop serve did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.process = Some(process);
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }

    /// Runs the `edgeloop` CLI with this controller's configuration.
    pub fn cli(&self, args: &[&str]) {
        let out = std::process::Command::new(binary("edgeloop"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "edgeloop {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Publishes example model `version` through the CLI, as an operator would.
    pub fn publish_example(&self, version: u64) {
        let (onnx, reference) = match version % 2 {
            1 => (MODEL_V1, REFERENCE_V1),
            _ => (MODEL_V2, REFERENCE_V2),
        };
        let model = self.dir.path().join(format!("model-{version}.onnx"));
        let csv = self.dir.path().join(format!("reference-{version}.csv"));
        std::fs::write(&model, onnx).unwrap();
        std::fs::write(&csv, reference).unwrap();
        self.cli(&[
            "model",
            "publish",
            model.to_str().unwrap(),
            "--name",
            MODEL_NAME,
            "--version",
            &version.to_string(),
            "--reference",
            csv.to_str().unwrap(),
        ]);
    }

    pub async fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.endpoints.http_url);
        let response = reqwest::get(&url).await.expect("GET");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("JSON")
    }

    pub async fn rollout(&self, version: u64) {
        self.post(
            "/api/v1/rollouts",
            serde_json::json!({"model": MODEL_NAME, "version": version}),
        )
        .await;
    }

    /// `POST path` with a JSON body; the request must succeed. Returns the answer.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.endpoints.http_url))
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON");
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    /// Window sequence numbers stored for a device's model `version`, sorted, with
    /// repeats kept (a repeat would be a window stored twice).
    pub async fn stored_seqs(&self, device: &str, version: u64) -> Vec<u64> {
        let rows = self
            .get(&format!("/api/v1/devices/{device}/telemetry?limit=1000"))
            .await;
        assert!(
            rows.as_array().unwrap().len() < 1000,
            "more windows than one API page holds: make the test produce fewer"
        );
        let mut seqs: Vec<u64> = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["model_version"] == version)
            .map(|r| r["window_seq"].as_u64().unwrap())
            .collect();
        seqs.sort_unstable();
        seqs
    }

    pub async fn stop(mut self) {
        self.kill9();
        self.database.drop_schema().await;
    }
}

/// The last window number an agent has given out for a model version, read from its
/// outbox database (the agent may be running or dead).
pub fn agent_window_seq(state_dir: &std::path::Path, version: u64) -> u64 {
    let conn = rusqlite::Connection::open(state_dir.join("outbox.sqlite")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(
        "SELECT value FROM sequences WHERE name = ?1",
        [format!("window/{MODEL_NAME}/{version}")],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v as u64)
    .unwrap_or(0)
}

/// Message ids of the drift summaries waiting in an agent's outbox.
pub fn agent_outbox_telemetry(state_dir: &std::path::Path) -> Vec<String> {
    agent_outbox(state_dir, "telemetry")
}

/// Window numbers of the drift summaries waiting in an agent's outbox.
pub fn agent_outbox_window_seqs(state_dir: &std::path::Path) -> Vec<u64> {
    let conn = rusqlite::Connection::open(state_dir.join("outbox.sqlite")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    // Each entry is one envelope, in the format the agent sends (MessagePack by default).
    let mut stmt = conn
        .prepare("SELECT payload FROM outbox WHERE topic LIKE '%/telemetry' ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(
            |payload| match Envelope::decode(&payload.unwrap()).map(|e| e.message) {
                Ok(Message::DriftSummary(s)) => s.window_seq,
                other => panic!("not a drift summary in the outbox: {other:?}"),
            },
        )
        .collect()
}

/// Message ids waiting in an agent's outbox for one channel (`status`, `telemetry`, …).
/// Empty while the agent has not created its outbox yet.
pub fn agent_outbox(state_dir: &std::path::Path, channel: &str) -> Vec<String> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(
        state_dir.join("outbox.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
    ) else {
        return Vec::new();
    };
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let Ok(mut stmt) =
        conn.prepare("SELECT msg_id FROM outbox WHERE topic LIKE '%/' || ?1 ORDER BY id")
    else {
        return Vec::new();
    };
    stmt.query_map([channel], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A private Mosquitto process, for tests that stop, restart or reconfigure the broker.
pub struct Mosquitto {
    child: std::process::Child,
}

impl Mosquitto {
    /// Whether the `mosquitto` binary runs here. When it does not, a test that needs it is
    /// skipped, unless `EDGELOOP_TEST_MQTT_URL` says real services are expected: then this
    /// panics.
    pub fn available() -> bool {
        let runs = std::process::Command::new("mosquitto")
            .arg("-h")
            .output()
            .is_ok();
        assert!(
            runs || std::env::var_os(MQTT_URL_VAR).is_none(),
            "{MQTT_URL_VAR} is set but the mosquitto binary cannot be run"
        );
        runs
    }

    /// Runs `mosquitto -c config`.
    pub fn start(config: &std::path::Path) -> Self {
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(config)
            .spawn()
            .expect("the mosquitto binary runs (it is installed on development and CI machines)");
        Mosquitto { child }
    }

    /// Writes `mosquitto.conf` in `dir`: a plain listener on 127.0.0.1:`port` for anonymous
    /// clients, then the `extra` lines. Returns its path.
    pub fn write_config(dir: &std::path::Path, port: u16, extra: &str) -> std::path::PathBuf {
        let path = dir.join("mosquitto.conf");
        std::fs::write(
            &path,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}"),
        )
        .unwrap();
        path
    }

    /// A directory Mosquitto can use: started as root, it drops to its own user.
    pub fn writable_dir(parent: &std::path::Path, name: &str) -> std::path::PathBuf {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        dir
    }

    /// SIGTERM, so that Mosquitto saves its persistence file, then wait for it to exit.
    pub fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something listens on a local port.
pub async fn wait_for_port(port: u16) {
    wait_until("the port listens", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
}

#[cfg(test)]
mod tests {
    use edgeloop_agent::outbox::{NewEntry, Outbox, Priority, SqliteOutbox};
    use edgeloop_shared::drift::WindowStats;
    use edgeloop_shared::protocol::{DriftSummary, Format};

    use super::*;

    #[test]
    fn the_outbox_window_numbers_are_read_in_either_format() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(
            SqliteOutbox::open(&dir.path().join("outbox.sqlite")).unwrap(),
            1 << 20,
        );
        for (seq, format) in [(7, Format::Msgpack), (8, Format::Json)] {
            let summary = Message::DriftSummary(DriftSummary {
                model: ModelRef {
                    name: MODEL_NAME.into(),
                    version: 1,
                },
                window_seq: seq,
                stats: WindowStats::default(),
            });
            let msg_id = format!("w{seq}");
            let payload = Envelope::new("d1", &msg_id, 1, summary).encode_as(format);
            outbox
                .enqueue(NewEntry {
                    topic: "edgeloop/v1/devices/d1/telemetry",
                    msg_id: &msg_id,
                    priority: Priority::Telemetry,
                    payload: &payload,
                })
                .unwrap();
        }
        assert_eq!(agent_outbox_window_seqs(dir.path()), [7, 8]);
    }
}
